// The CPU twin of the CUDA MIS kernel (mis_cuda.cu): the same windows, Luby rounds and rules
// (mis_rules.h), one simulated thread per candidate, then the same assembly (fill, pivots,
// ascending output).
// A batch is dense (the scalars of MisArgs apply to every image) or ragged (each image's
// sizes and offsets from its row of the table: image_of in mis.h, which checks them).
#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "mis.h"
#include "mis_rules.h"

namespace d2p {
namespace {

// Steps 6-7 for one image: the first m candidates of `in` (rank order), then the fill
// (candidates not in `in`, rank order) up to m, plus the pivots; written ascending, the
// image's token offset added.
// `order` was checked to be a permutation (check_orders) before any image ran; the bound
// checks below keep even an unchecked order inside the buffers: an id outside [0, N) is
// skipped, duplicates collapse, and kept entries left over are written as -1 (as the
// CUDA kernel does).
void assemble(const Image& im, const std::vector<uint32_t>& in) {
  const int C = im.candidates(), m = im.k - im.n_pivots;
  std::vector<char> keep(im.n_tokens, 0);
  auto keep_token = [&](int64_t t) { if (t >= 0 && t < im.n_tokens) keep[t] = 1; };
  for (int i = 0; i < im.n_pivots; ++i) keep_token(im.order[i]);
  int taken = 0;
  for (int v = 0; v < C && taken < m; ++v)
    if (in[v / 32] >> (v % 32) & 1u) keep_token(im.order[im.n_pivots + v]), ++taken;
  for (int v = 0; v < C && taken < m; ++v)
    if (!(in[v / 32] >> (v % 32) & 1u)) keep_token(im.order[im.n_pivots + v]), ++taken;
  int j = 0;
  for (int t = 0; t < im.n_tokens && j < im.k; ++t)
    if (keep[t]) im.kept[j++] = im.token_offset + t;
  for (; j < im.k; ++j) im.kept[j] = -1;
}

// Every image of a ragged table must describe buffers inside the packed ones (all images,
// skipped or not: the table is read either way).
void check_table(const MisArgs& a) {
  if (!a.ragged.table) return;
  static const char* const why[] = {"", "sizes outside 1 <= N <= max_tokens, 0 <= n_pivots <= k <= N",
                                    "tokens outside the packed order", "kept ids outside the packed kept",
                                    "adjacency outside the packed adjacency"};
  Image im;
  for (int b = 0; b < a.batch; ++b)
    if (const int err = image_of(a, b, &im))
      throw std::invalid_argument("d2pruner MIS: ragged table: image " + std::to_string(b) +
                                  " has " + why[err]);
}

// Every image's order (of the images not skipped) must be a permutation of 0..N-1: checked
// for all of them before any work, so a bad order raises (std::invalid_argument, a Python
// ValueError) with nothing written. O(B N), small next to the walk.
void check_orders(const MisArgs& a) {
  std::vector<uint8_t> seen;
  Image im;
  for (int b = 0; b < a.batch; ++b) {
    if (a.skip && a.skip[b]) continue;
    image_of(a, b, &im);  // checked by check_table
    seen.assign(im.n_tokens, 0);
    for (int i = 0; i < im.n_tokens; ++i) {
      const int64_t t = im.order[i];
      const char* why = t < 0 || t >= im.n_tokens ? "holds" : seen[t] ? "repeats" : nullptr;
      if (why)
        throw std::invalid_argument(
            "d2pruner MIS: order must be a permutation of 0..N-1 (N=" +
            std::to_string(im.n_tokens) + ") in every image; image " + std::to_string(b) +
            " " + why + " " + std::to_string(t) + " at position " + std::to_string(i));
      seen[t] = 1;
    }
  }
}

// The CUDA kernel's schedule, one simulated thread per candidate of a window of kWindow:
// an external pass against the decided candidates before the window, then synchronous
// (Jacobi) Luby rounds inside it until the m best-ranked members are settled. Returns
// whether they settled within rows [0, rows_ready); counts rounds into *rounds.
bool rounds_one(const Image& im, std::vector<uint32_t>& in, int* rounds_out) {
  const int C = im.rows_ready, m = im.k - im.n_pivots, words = im.words_c();
  std::vector<uint32_t> out(words, 0);
  std::vector<uint8_t> st(kWindow), ns(kWindow);
  auto set = [](std::vector<uint32_t>& bits, int v) { bits[v / 32] |= 1u << (v % 32); };
  int& rounds = *rounds_out;
  int total = 0;
  if (m <= 0) return true;
  for (int lo = 0; lo < C; lo += kWindow) {
    const int hi = std::min(C, lo + kWindow);
    for (int v = lo; v < hi; ++v) {
      const uint32_t* row = im.adj + static_cast<size_t>(v) * words;
      st[v - lo] = luby_rule(row, in.data(), out.data(), v, 0, window_first_word(lo)) == kOut ? kOut : kUndecided;
      if (st[v - lo] == kOut) set(out, v);
    }
    ++rounds;
    for (;;) {
      for (int v = lo; v < hi; ++v) {
        const uint32_t* row = im.adj + static_cast<size_t>(v) * words;
        ns[v - lo] = st[v - lo] != kUndecided ? st[v - lo]
                     : luby_rule(row, in.data(), out.data(), v, window_first_word(lo), row_end_word(v));
      }
      for (int v = lo; v < hi; ++v) {
        if (ns[v - lo] != st[v - lo]) set(ns[v - lo] == kIn ? in : out, v);
        st[v - lo] = ns[v - lo];
      }
      ++rounds;
      int first = hi, count = 0;  // first undecided; members settled before it
      for (int v = lo; v < hi && first == hi; ++v) if (st[v - lo] == kUndecided) first = v;
      for (int v = lo; v < first; ++v) count += st[v - lo] == kIn;
      if (total + count >= m) return true;
      if (first == hi) { total += count; break; }
    }
  }
  return false;
}

}  // namespace

// Per image: skip, run the rounds, then write the kept tokens unless the rows ready did not
// suffice.
void mis_rounds_cpu(const MisArgs& a) {
  check_table(a);
  check_orders(a);
  Image im;
  for (int b = 0; b < a.batch; ++b) {
    if (a.skip && a.skip[b]) continue;
    image_of(a, b, &im);
    std::vector<uint32_t> in(im.words_c() + 1, 0);
    int rounds = 0;
    const bool settled = rounds_one(im, in, &rounds);
    const bool complete = settled || im.rows_ready >= im.candidates();
    if (a.rounds) a.rounds[b] = rounds;
    if (a.done) a.done[b] = complete;
    if (complete) assemble(im, in);
  }
}

}  // namespace d2p
