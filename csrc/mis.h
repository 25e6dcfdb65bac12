// Entry points of the MIS stage (docs/spec.md, steps 5-7): packed rank-ordered adjacency + rank order
// in, kept token indices (pivots, MIS picks, fill) out, ascending, int64 [B, k].
#pragma once
#include <cstdint>

#include "mis_rules.h"

namespace d2p {

struct MisArgs {
  const uint32_t* adj;   // [B, C, words_c], C = n_tokens - n_pivots
  const int64_t* order;  // [B, n_tokens], token ids in rank order
  int64_t* kept;         // [B, k] output
  int32_t* rounds;       // [B] Luby rounds taken, or nullptr
  int batch, n_tokens, n_pivots, k;
  // Lazy graphs: only rows [0, rows_ready) of adj exist yet (rows_ready == C: the whole graph).
  // An image whose m members settle inside those rows is written and marked done[b] = 1;
  // otherwise done[b] = 0 and nothing is written. Images with skip[b] != 0 are untouched.
  int rows_ready;
  const int32_t* skip;  // [B] or nullptr; may alias done: read before done is written
  int32_t* done;        // [B] or nullptr
  D2P_HD int candidates() const { return n_tokens - n_pivots; }
  D2P_HD int words_c() const { return (candidates() + 31) / 32; }
};

// CPU: the sequential greedy walk (production path on CPU; fastest there). Whole graphs only.
void mis_walk_cpu(const MisArgs& a);
// CPU twin of the CUDA kernel: the same windows, Luby rounds and rules, threads as loops.
void mis_rounds_cpu(const MisArgs& a);
// CUDA: one block per image, one launch for the batch, on `stream`. Throws on CUDA errors.
void mis_rounds_cuda(const MisArgs& a, int device, void* stream);
// Largest N the CUDA kernel takes for any n_pivots (its bitsets + scratch in 48 KiB).
int max_cuda_tokens();
int cuda_device_count();  // 0 where no driver/GPU (never throws)

}  // namespace d2p
