// The window resolver of the graph-free CPU walk (d2pruner_kernels/kernels/cpu_walk.py):
// steps 5-6 (docs/spec.md) for one window of candidates, given their cosines to each other.
#pragma once
#include <cstdint>

namespace d2p {

// One window, `active` images at once. Python has already dropped the window candidates that
// an earlier member blocks; the `survivors` left per image (padded, rank order) are walked
// here: survivor j joins unless a survivor taken earlier in this window shares an edge with it
// (the fusion rule below), until the image has m members. A new member's unit row,
// coordinates and rank position are appended to its image; then each image's member rows
// from its count up to the largest count are set to NaN.
//
// near: |dt| <= temporal_radius and |dy|, |dx| <= radius between the two tokens' (t, y, x):
// from the row-major (T, H, W) grid arithmetic, or, when coord_table is given, its rows
// (a TokenLayout's coordinates, pieces apart along t: token_layout.py).

// How cos and near make an edge (PruneOptions.fusion; reference/graph.py). The binarized
// reading (1 - beta) [cos > theta] + beta [near] > 0.5 is one of three rules by beta, which
// Python picks (beta < 0.5, == 0.5, > 0.5) so no float compare of beta happens here.
enum WalkFusion : int {
  kWeighted = 0,         // cos_weight * cos + spatial_weight * near >= threshold (float32)
  kSimilar = 1,          // binarized, beta < 0.5: cos > threshold
  kSimilarAndNear = 2,   // binarized, beta == 0.5: cos > threshold and near
  kNear = 3,             // binarized, beta > 0.5: near
  kWalkFusions = 4
};
// A NaN cosine makes no edge under the first three rules; kNear does not read the cosine.

struct WalkWindowArgs {
  const float* cos;      // [A, S, S] cosines among the survivors (row j, column j')
  const float* rows;     // [A, S, D] the survivors' unit feature rows
  const int64_t* pos;    // [A, S] candidate position (rank - n_pivots) of survivor j, -1: padding
  const int64_t* order;  // [B, N] token ids in rank order
  const int64_t* image;  // [A] image (row of order / taken) of each active slot
  float* members;        // [A, m, D] member unit rows, appended; NaN up to the largest count
  int64_t* coords;       // [A, m, 3] member (t, y, x), appended
  int64_t* count;        // [A] members so far, updated
  uint8_t* taken;        // [B, C] 1 at the candidate positions of members, written
  int batch, active, survivors, dim, n_tokens, n_pivots, m;
  int grid_t, grid_h, grid_w, radius, temporal_radius;
  float cos_weight, spatial_weight, threshold;
  const int32_t* coord_table = nullptr;  // [n_tokens, 3] (t, y, x) per token id, or null:
                                         // the grid's (then grid_t * grid_h * grid_w == N)
  int fusion = kWeighted;                // a WalkFusion
};

// Throws std::invalid_argument on inconsistent sizes or an index out of bounds (checked
// before anything is written for that image).
void walk_window_cpu(const WalkWindowArgs& a);

}  // namespace d2p
