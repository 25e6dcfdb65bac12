// Rules of the greedy MIS shared by the CUDA kernel and its CPU twin (compiled by nvcc for
// the device and by g++ for the host), so CI without a GPU runs the very same logic.
//
// Packed adjacency (see d2pruner_kernels/layout.py): uint32 words, row v = candidate of rank
// position v, bit (j % 32) of word (j / 32) = edge (v, j), only columns j < v are meaningful.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define D2P_HD __host__ __device__ __forceinline__
#else
#define D2P_HD inline
#endif

namespace d2p {

// Threads per block of the CUDA kernel = candidates per window of the Luby rounds. The CPU
// twin uses the same window, so both take the same rounds.
constexpr int kWindow = 1024;

enum State : uint8_t { kUndecided = 0, kIn = 1, kOut = 2 };

// Bits of word w of row v that are better-ranked candidates (columns j < v).
D2P_HD uint32_t lower_bits(int v, int w) {
  const int n = v - 32 * w;
  return n >= 32 ? 0xffffffffu : (n <= 0 ? 0u : ((1u << n) - 1u));
}

D2P_HD int popcount32(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return __popc(x);
#else
  return __builtin_popcount(x);
#endif
}

// Luby's rule with fixed priority = rank, for candidate v over words [w_begin, w_end) of
// its row. `in` / `out` are bitsets of candidates already decided.
//   kOut       a better-ranked neighbour is in the set: v can never join;
//   kIn        every better-ranked neighbour is out: v joins (the greedy walk would take it);
//   kUndecided some better-ranked neighbour is still undecided: wait for the next round.
// Iterated to a fixed point this yields the lexicographically first MIS, i.e. exactly the
// sequential greedy walk in rank order (Blelloch, Fineman & Shun, SPAA 2012).
// Words are read kBatch at a time, without a branch or an exit in between (a word past
// w_end is read at w_end - 1 and masked off), so a GPU thread has kBatch independent row
// loads in flight instead of one dependent load per word.
constexpr int kBatch = 8;

D2P_HD State luby_rule(const uint32_t* row, const uint32_t* in, const uint32_t* out, int v,
                       int w_begin, int w_end) {
  uint32_t pending = 0;
  for (int w0 = w_begin; w0 < w_end; w0 += kBatch) {
    uint32_t hit = 0;
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int u = 0; u < kBatch; ++u) {
      const int w = w0 + u;
      const int wr = w < w_end ? w : w_end - 1;  // in range, no branch
      const uint32_t nb = row[wr] & lower_bits(v, w) & (w < w_end ? 0xffffffffu : 0u);
      hit |= nb & in[wr];
      pending |= nb & ~out[wr];
    }
    if (hit) return kOut;
  }
  return pending ? kUndecided : kIn;
}

// Word range of the rounds for candidate v in the window starting at lo (lo % 32 == 0):
// the words before lo / 32 hold only decided candidates and are read once per window.
D2P_HD int window_first_word(int lo) { return lo / 32; }
D2P_HD int row_end_word(int v) { return v / 32 + 1; }

}  // namespace d2p
