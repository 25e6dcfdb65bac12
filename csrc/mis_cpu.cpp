// CPU implementations of the MIS stage: the sequential greedy walk and the round-by-round
// twin of the CUDA kernel. Both end in the same assembly (fill, pivots, ascending output).
#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "mis.h"
#include "mis_rules.h"

namespace d2p {
namespace {

// Steps 6-7 for one image: the first m candidates of `in` (rank order), then the fill
// (candidates not in `in`, rank order) up to m, plus the pivots; written ascending.
// `order` was checked to be a permutation (check_orders) before any image ran; the bound
// checks below keep even an unchecked order inside the buffers: an id outside [0, N) is
// skipped, duplicates collapse, and kept entries left over are written as -1 (as the
// CUDA kernel does).
void assemble(const MisArgs& a, const int64_t* order, const std::vector<uint32_t>& in,
              int64_t* kept) {
  const int C = a.candidates(), m = a.k - a.n_pivots;
  std::vector<char> keep(a.n_tokens, 0);
  auto keep_token = [&](int64_t t) { if (t >= 0 && t < a.n_tokens) keep[t] = 1; };
  for (int i = 0; i < a.n_pivots; ++i) keep_token(order[i]);
  int taken = 0;
  for (int v = 0; v < C && taken < m; ++v)
    if (in[v / 32] >> (v % 32) & 1u) keep_token(order[a.n_pivots + v]), ++taken;
  for (int v = 0; v < C && taken < m; ++v)
    if (!(in[v / 32] >> (v % 32) & 1u)) keep_token(order[a.n_pivots + v]), ++taken;
  int j = 0;
  for (int t = 0; t < a.n_tokens && j < a.k; ++t)
    if (keep[t]) kept[j++] = t;
  for (; j < a.k; ++j) kept[j] = -1;
}

// Every image's order (of the images not skipped) must be a permutation of 0..N-1: checked
// for all of them before any work, so a bad order raises (std::invalid_argument, a Python
// ValueError) with nothing written. O(B N), small next to the walk.
void check_orders(const MisArgs& a) {
  std::vector<uint8_t> seen(a.n_tokens);
  for (int b = 0; b < a.batch; ++b) {
    if (a.skip && a.skip[b]) continue;
    const int64_t* order = a.order + static_cast<size_t>(b) * a.n_tokens;
    std::fill(seen.begin(), seen.end(), 0);
    for (int i = 0; i < a.n_tokens; ++i) {
      const int64_t t = order[i];
      const char* why = t < 0 || t >= a.n_tokens ? "holds" : seen[t] ? "repeats" : nullptr;
      if (why)
        throw std::invalid_argument(
            "d2pruner MIS: order must be a permutation of 0..N-1 (N=" +
            std::to_string(a.n_tokens) + ") in every image; image " + std::to_string(b) +
            " " + why + " " + std::to_string(t) + " at position " + std::to_string(i));
      seen[t] = 1;
    }
  }
}

// Sequential greedy walk: take v unless a taken candidate is a better-ranked neighbour.
void walk_one(const MisArgs& a, const uint32_t* adj, std::vector<uint32_t>& in) {
  const int C = a.candidates(), m = a.k - a.n_pivots, words = a.words_c();
  int taken = 0;
  for (int v = 0; v < C && taken < m; ++v) {
    const uint32_t* row = adj + static_cast<size_t>(v) * words;
    bool blocked = false;
    for (int w = 0; w < row_end_word(v) && !blocked; ++w) blocked = row[w] & lower_bits(v, w) & in[w];
    if (!blocked) in[v / 32] |= 1u << (v % 32), ++taken;
  }
}

// The CUDA kernel's schedule, one simulated thread per candidate of a window of kWindow:
// an external pass against the decided candidates before the window, then synchronous
// (Jacobi) Luby rounds inside it until the m best-ranked members are settled. Returns
// whether they settled within rows [0, rows_ready); counts rounds into *rounds.
bool rounds_one(const MisArgs& a, const uint32_t* adj, std::vector<uint32_t>& in, int* rounds_out) {
  const int C = a.rows_ready, m = a.k - a.n_pivots, words = a.words_c();
  std::vector<uint32_t> out(words, 0);
  std::vector<uint8_t> st(kWindow), ns(kWindow);
  auto set = [](std::vector<uint32_t>& bits, int v) { bits[v / 32] |= 1u << (v % 32); };
  int& rounds = *rounds_out;
  int total = 0;
  if (m <= 0) return true;
  for (int lo = 0; lo < C; lo += kWindow) {
    const int hi = std::min(C, lo + kWindow);
    for (int v = lo; v < hi; ++v) {
      const uint32_t* row = adj + static_cast<size_t>(v) * words;
      st[v - lo] = luby_rule(row, in.data(), out.data(), v, 0, window_first_word(lo)) == kOut ? kOut : kUndecided;
      if (st[v - lo] == kOut) set(out, v);
    }
    ++rounds;
    for (;;) {
      for (int v = lo; v < hi; ++v) {
        const uint32_t* row = adj + static_cast<size_t>(v) * words;
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

// Per image: skip, select, then write the kept tokens unless the rows ready did not suffice.
template <typename Select>
void run_cpu(const MisArgs& a, Select select) {
  check_orders(a);
  const size_t adj_stride = static_cast<size_t>(a.candidates()) * a.words_c();
  for (int b = 0; b < a.batch; ++b) {
    if (a.skip && a.skip[b]) continue;
    std::vector<uint32_t> in(a.words_c() + 1, 0);
    int rounds = 0;
    const bool settled = select(a, a.adj + b * adj_stride, in, &rounds);
    const bool complete = settled || a.rows_ready >= a.candidates();
    if (a.rounds) a.rounds[b] = rounds;
    if (a.done) a.done[b] = complete;
    if (complete)
      assemble(a, a.order + static_cast<size_t>(b) * a.n_tokens, in, a.kept + static_cast<size_t>(b) * a.k);
  }
}

}  // namespace

void mis_walk_cpu(const MisArgs& a) {
  run_cpu(a, [](const MisArgs& x, const uint32_t* adj, std::vector<uint32_t>& in, int*) {
    walk_one(x, adj, in);
    return true;
  });
}

void mis_rounds_cpu(const MisArgs& a) { run_cpu(a, rounds_one); }

}  // namespace d2p
