// Window resolver of the graph-free CPU walk: the sequential part of steps 5-6 of
// docs/spec.md (see walk_cpu.h). The GEMMs and the check against earlier windows' members
// run in torch.
#include "walk_cpu.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace d2p {
namespace {

[[noreturn]] void fail(const std::string& what) {
  throw std::invalid_argument("d2pruner walk_window_cpu: " + what);
}

struct Coord { int64_t t, y, x; };

// The edge rule of `Fusion` (walk_cpu.h) for a cosine c and the spatial term near.
template <int Fusion>
inline bool edge(const WalkWindowArgs& a, float c, bool near) {
  if constexpr (Fusion == kWeighted) {
    // The reference's float32 expression; NaN (a NaN feature) compares false: no edge.
    return a.cos_weight * c + a.spatial_weight * (near ? 1.0f : 0.0f) >= a.threshold;
  } else if constexpr (Fusion == kSimilar) {
    return c > a.threshold;  // NaN: false
  } else if constexpr (Fusion == kSimilarAndNear) {
    return near && c > a.threshold;
  } else {
    return near;
  }
}

// Resolve image slot `s`: survivors in rank order against the members taken in this window.
template <int Fusion>
void resolve_one(const WalkWindowArgs& a, int s) {
  const int S = a.survivors, D = a.dim, C = a.n_tokens - a.n_pivots;
  const int64_t b = a.image[s];
  if (b < 0 || b >= a.batch) fail("image index out of range");
  int64_t cnt = a.count[s];
  if (cnt < 0 || cnt > a.m) fail("member count out of range");
  const int64_t* pos = a.pos + static_cast<size_t>(s) * S;
  const int64_t* order = a.order + static_cast<size_t>(b) * a.n_tokens;
  // Validate every index of this slot before writing anything.
  std::vector<Coord> xyz(S);
  for (int j = 0; j < S; ++j) {
    if (pos[j] < -1 || pos[j] >= C) fail("candidate position out of range");
    if (pos[j] < 0) continue;
    const int64_t tok = order[a.n_pivots + pos[j]];
    if (tok < 0 || tok >= a.n_tokens) fail("token id in order out of range");
    if (a.coord_table) {  // tok is in [0, n_tokens): a row of the [n_tokens, 3] table
      const int32_t* c3 = a.coord_table + static_cast<size_t>(tok) * 3;
      xyz[j] = {c3[0], c3[1], c3[2]};
    } else {
      const int64_t hw = static_cast<int64_t>(a.grid_h) * a.grid_w;
      xyz[j] = {tok / hw, tok / a.grid_w % a.grid_h, tok % a.grid_w};
    }
  }
  const float* cos = a.cos + static_cast<size_t>(s) * S * S;
  std::vector<int> in_window;  // survivors taken in this window (indices j)
  for (int j = 0; j < S && cnt < a.m; ++j) {
    if (pos[j] < 0) continue;
    const float* row = cos + static_cast<size_t>(j) * S;
    bool blocked = false;
    for (const int q : in_window) {
      const bool near = std::llabs(xyz[j].t - xyz[q].t) <= a.temporal_radius &&
                        std::llabs(xyz[j].y - xyz[q].y) <= a.radius &&
                        std::llabs(xyz[j].x - xyz[q].x) <= a.radius;
      if (edge<Fusion>(a, row[q], near)) { blocked = true; break; }
    }
    if (blocked) continue;
    in_window.push_back(j);
    const size_t slot = static_cast<size_t>(s) * a.m + cnt;
    std::memcpy(a.members + slot * D, a.rows + (static_cast<size_t>(s) * S + j) * D,
                sizeof(float) * D);
    int64_t* c3 = a.coords + slot * 3;
    c3[0] = xyz[j].t, c3[1] = xyz[j].y, c3[2] = xyz[j].x;
    a.taken[static_cast<size_t>(b) * C + pos[j]] = 1;
    ++cnt;
  }
  a.count[s] = cnt;
}

}  // namespace

void walk_window_cpu(const WalkWindowArgs& a) {
  if (a.batch < 1 || a.active < 0 || a.active > a.batch || a.survivors < 0 || a.dim < 1 ||
      a.n_tokens < 1 || a.n_pivots < 0 || a.n_pivots >= a.n_tokens || a.m < 1 ||
      a.m > a.n_tokens - a.n_pivots || a.radius < 0 || a.temporal_radius < 0)
    fail("inconsistent sizes");
  // Without a coordinate table the grid arithmetic must cover exactly the N tokens.
  if (!a.coord_table && (a.grid_t < 1 || a.grid_h < 1 || a.grid_w < 1 ||
                         static_cast<int64_t>(a.grid_t) * a.grid_h * a.grid_w != a.n_tokens))
    fail("inconsistent sizes (grid)");
  if (a.fusion < 0 || a.fusion >= kWalkFusions) fail("unknown fusion rule");
  if (a.active == 0 || a.survivors == 0) return;
  if (!a.cos || !a.rows || !a.pos || !a.order || !a.image || !a.members || !a.coords ||
      !a.count || !a.taken)
    fail("null pointer");
  // Images are independent; one window's work is small (S^2 comparisons), so one thread.
  void (*resolve)(const WalkWindowArgs&, int) =
      a.fusion == kWeighted ? resolve_one<kWeighted>
      : a.fusion == kSimilar ? resolve_one<kSimilar>
      : a.fusion == kSimilarAndNear ? resolve_one<kSimilarAndNear> : resolve_one<kNear>;
  for (int s = 0; s < a.active; ++s) resolve(a, s);
  // NaN rows between each image's members and the most any image has: the next window's
  // GEMM reads that many member rows per image, and NaN cosines are no edges.
  int64_t most = 0;
  for (int s = 0; s < a.active; ++s) most = std::max(most, a.count[s]);
  for (int s = 0; s < a.active; ++s)
    std::fill(a.members + (static_cast<size_t>(s) * a.m + a.count[s]) * a.dim,
              a.members + (static_cast<size_t>(s) * a.m + most) * a.dim,
              std::numeric_limits<float>::quiet_NaN());
}

}  // namespace d2p
