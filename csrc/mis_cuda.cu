// CUDA MIS stage: one block per image, one launch for the whole batch, no host round-trip.
//
// Each block walks its candidates in windows of kWindow (one thread per candidate). A window
// starts with one external pass (is a member before the window a better-ranked neighbour?),
// then runs synchronous Luby rounds (mis_rules.h) until every candidate of the window is
// decided, and stops the whole walk as soon as the m best-ranked members are settled: with a
// small budget most of the graph is never read. Bitsets of members / non-members and of the
// kept tokens live in shared memory. The tail (first m members, fill, pivots, ascending
// output) is a block-wide scan over those bitsets.
#include <cuda_runtime.h>

#include <climits>
#include <stdexcept>
#include <string>

#include "mis.h"
#include "mis_rules.h"

namespace d2p {
namespace {

constexpr int kThreads = kWindow;
constexpr int kWarps = kThreads / 32;

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

struct Scratch {
  int warp_sums[kWarps];
  int total;
  int first[2];  // first undecided candidate of the round, double-buffered by round parity
};

// Exclusive prefix sum of x over the block; *total receives the block's sum. All threads call.
__device__ int block_exclusive_scan(int x, Scratch& s, int* total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int incl = x;
  for (int d = 1; d < 32; d <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, incl, d);
    if (lane >= d) incl += y;
  }
  if (lane == 31) s.warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int mine = lane < kWarps ? s.warp_sums[lane] : 0;
    int acc = mine;
    for (int d = 1; d < 32; d <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, acc, d);
      if (lane >= d) acc += y;
    }
    if (lane < kWarps) s.warp_sums[lane] = acc - mine;
    if (lane == 31) s.total = acc;
  }
  __syncthreads();
  const int result = s.warp_sums[warp] + incl - x;
  *total = s.total;
  __syncthreads();  // scratch reusable
  return result;
}

// Calls visit(position, index) for the first `limit` set bits of word(0 .. n_words), in
// position order, index = 0, 1, ...; returns how many were visited. All threads call.
template <typename Word, typename Visit>
__device__ int visit_first_bits(int n_words, int limit, Word word, Visit visit, Scratch& s) {
  int base = 0;  // uniform: set bits before this chunk of words
  for (int w0 = 0; w0 < n_words && base < limit; w0 += kThreads) {
    const int w = w0 + threadIdx.x;
    uint32_t bits = w < n_words ? word(w) : 0u;
    int total;
    int idx = base + block_exclusive_scan(popcount32(bits), s, &total);
    for (; bits && idx < limit; bits &= bits - 1, ++idx) visit(32 * w + __ffs(bits) - 1, idx);
    base += total;
  }
  return min(base, limit);
}

// kRagged: a ragged batch (a.ragged.table set); a separate instance, so a dense batch runs
// the code (and registers) it always did.
template <bool kRagged>
__global__ void __launch_bounds__(kThreads) mis_rounds_kernel(MisArgs a) {
  extern __shared__ uint32_t bitsets[];
  __shared__ Scratch s;
  const int b = blockIdx.x;
  if (a.skip && a.skip[b]) return;  // finished by an earlier launch
  // This block's image: the batch's scalars, or its row of the ragged table. A row that
  // does not fit the packed buffers (never one prune_varlen builds) is not worked on: the
  // image is marked done and nothing of it is written, so no access leaves a buffer.
  Image im;
  if (!kRagged) {
    dense_image(a, b, &im);
  } else if (ragged_image(a, b, &im) != kImageOk) {
    if (threadIdx.x == 0 && a.rounds) a.rounds[b] = 0;
    if (threadIdx.x == 0 && a.done) a.done[b] = 1;
    return;
  }
  const int C = im.candidates(), R = im.rows_ready, m = im.k - im.n_pivots;
  const int words_c = im.words_c(), words_n = (im.n_tokens + 31) / 32, tid = threadIdx.x;
  uint32_t* in = bitsets;            // decided members          [words_c]
  uint32_t* out = in + words_c;      // decided non-members      [words_c]
  uint32_t* keep = out + words_c;    // kept tokens, token order [words_n]
  const uint32_t* adj = im.adj;
  const int64_t* order = im.order;

  for (int i = tid; i < 2 * words_c + words_n; i += kThreads) bitsets[i] = 0u;
  if (tid < 2) s.first[tid] = INT_MAX;
  __syncthreads();

  // Step 5: windows of Luby rounds over the rows ready. rounds/total/settled/first are
  // block-uniform.
  int rounds = 0, total = 0, parity = 0;
  bool settled = m <= 0;
  for (int lo = 0; lo < R && !settled; lo += kThreads) {
    const int hi = min(R, lo + kThreads), v = lo + tid;
    const bool mine = v < hi;
    const uint32_t* row = adj + static_cast<size_t>(mine ? v : 0) * words_c;
    State st = kUndecided;
    if (mine && luby_rule(row, in, out, v, 0, window_first_word(lo)) == kOut) {
      st = kOut;
      atomicOr(&out[v / 32], 1u << (v % 32));
    }
    ++rounds;
    __syncthreads();
    for (;;) {
      const State next = (mine && st == kUndecided)
          ? luby_rule(row, in, out, v, window_first_word(lo), row_end_word(v)) : st;
      __syncthreads();  // every read of this round is done before anyone writes
      if (next != st) atomicOr(next == kIn ? &in[v / 32] : &out[v / 32], 1u << (v % 32));
      st = next;
      if (mine && st == kUndecided) atomicMin(&s.first[parity], v);
      if (tid == 0) s.first[parity ^ 1] = INT_MAX;  // last read before the previous barrier
      ++rounds;
      __syncthreads();
      const int first = min(s.first[parity], hi);
      const int count = __syncthreads_count(mine && st == kIn && v < first);
      parity ^= 1;
      if (total + count >= m) { settled = true; break; }
      if (first == hi) { total += count; break; }
    }
  }

  if (tid == 0 && a.rounds) a.rounds[b] = rounds;
  const bool complete = settled || R >= C;  // else: more rows needed, a later launch decides
  if (tid == 0 && a.done) a.done[b] = complete;
  if (!complete) return;

  // Steps 6-7: the m best-ranked members, the fill, the pivots, written ascending (plus
  // the image's token offset: ragged batches write packed positions).
  // `order` is not checked on the GPU (that would cost a sync): a token id outside
  // [0, N) is skipped, so no access leaves the bitsets, and duplicates collapse; kept
  // entries the bitset cannot fill are written as -1 (a defined output). A permutation,
  // what prune() always passes, fills all k.
  const int n_tokens = im.n_tokens, n_pivots = im.n_pivots, k = im.k;
  auto keep_token = [&](int64_t t) {
    if (t >= 0 && t < n_tokens) atomicOr(&keep[t / 32], 1u << (t % 32));
  };
  auto keep_candidate = [&](int v, int) { keep_token(order[n_pivots + v]); };
  const int taken = visit_first_bits(words_c, m, [&](int w) { return in[w]; }, keep_candidate, s);
  if (taken < m)  // the walk ran out of members: fill with non-members in rank order
    visit_first_bits(words_c, m - taken, [&](int w) { return ~in[w] & lower_bits(C, w); },
                     keep_candidate, s);
  for (int i = tid; i < n_pivots; i += kThreads) keep_token(order[i]);
  __syncthreads();
  int64_t* kept = im.kept;
  const int64_t offset = im.token_offset;
  const int written = visit_first_bits(words_n, k, [&](int w) { return keep[w]; },
                                       [&](int t, int j) { kept[j] = offset + t; }, s);
  for (int j = written + tid; j < k; j += kThreads) kept[j] = -1;  // only if order was bad
}

}  // namespace

static size_t mis_shared_bytes(int n_tokens, int n_pivots) {
  const size_t words_c = (n_tokens - n_pivots + 31) / 32, words_n = (n_tokens + 31) / 32;
  return (2 * words_c + words_n) * sizeof(uint32_t);
}

int max_cuda_tokens() {  // n_pivots = 0 needs the most words: 3 * ceil(N / 32)
  return static_cast<int>((48 * 1024 - sizeof(Scratch)) / (3 * sizeof(uint32_t))) * 32;
}

void mis_rounds_cuda(const MisArgs& a, int device, void* stream) {
  // ragged batches: n_tokens is the largest image, sized for n_pivots = 0 (the most words)
  const size_t smem = mis_shared_bytes(a.n_tokens, a.ragged.table ? 0 : a.n_pivots);
  if (smem + sizeof(Scratch) > 48 * 1024)
    throw std::invalid_argument("d2pruner MIS kernel: N=" + std::to_string(a.n_tokens) +
                                " tokens need more than 48 KiB of shared memory");
  if (a.batch == 0) return;
  int current = -1;
  check(cudaGetDevice(&current), "cudaGetDevice");
  if (current != device) check(cudaSetDevice(device), "cudaSetDevice");
  const auto st = static_cast<cudaStream_t>(stream);
  if (a.ragged.table)
    mis_rounds_kernel<true><<<a.batch, kThreads, smem, st>>>(a);
  else
    mis_rounds_kernel<false><<<a.batch, kThreads, smem, st>>>(a);
  const cudaError_t err = cudaGetLastError();
  if (current != device) cudaSetDevice(current);  // leave the caller's device as it was
  check(err, "d2pruner MIS kernel launch");
}

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error (e.g. 35: no driver)
    return 0;
  }
  return n;
}

}  // namespace d2p
