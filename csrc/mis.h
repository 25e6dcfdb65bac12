// Entry points of the MIS stage (docs/spec.md, steps 5-7): packed rank-ordered adjacency + rank order
// in, kept token indices (pivots, MIS picks, fill) out, ascending, int64 [B, k].
#pragma once
#include <cstdint>

#include "mis_rules.h"

namespace d2p {

// Ragged batches (prune_varlen): one row of kRaggedFields int64 per image, giving its own sizes
// and its places in the packed buffers. The graph and rank launches read the same table.
// Each field the MIS reads, as (C++ name, its name in d2pruner_kernels/kernels/ragged.py,
// column): written once here, exposed by bindings.cpp as _C.ragged_fields, and held to
// ragged.py's numbers by tests/test_mis_kernel.py. The other columns (ROW_BEGIN, TILE_START,
// ...) are the Triton launches' (ragged.py).
#define D2P_RAGGED_FIELDS(X)                                                              \
  X(kTokenOffset, TOKEN_OFFSET, 0) /* its first token in the packed order (local ids) */  \
  X(kTokens, TOKENS, 1)            /* N_b */                                              \
  X(kPivots, PIVOTS, 2)            /* n_pivots_b */                                       \
  X(kKeep, KEEP, 3)                /* k_b */                                              \
  X(kKeepOffset, KEEP_OFFSET, 4)   /* where its k_b kept ids go (token offset added) */   \
  X(kAdjOffset, ADJ_OFFSET, 5)     /* first word of its [C_b, words(C_b)] adjacency */    \
  X(kRowEnd, ROW_END, 7)           /* rows [0, min(row_end, C_b)) of its graph ready */   \
  X(kRaggedFields, FIELDS, 16)     /* the row stride */

enum RaggedField : int {
#define D2P_RAGGED_ENUM(cpp_name, py_name, column) cpp_name = column,
  D2P_RAGGED_FIELDS(D2P_RAGGED_ENUM)
#undef D2P_RAGGED_ENUM
};

struct Ragged {
  const int64_t* table = nullptr;  // [batch, kRaggedFields]; nullptr: a dense batch
  int64_t order_len = 0;           // lengths of the packed buffers, for the bound checks
  int64_t kept_len = 0;
  int64_t adj_words = 0;
};

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
  // Ragged batches: with ragged.table set, adj / order / kept are packed (each image at its
  // offsets, its own sizes from the table), n_tokens is the largest N_b (it sizes the CUDA
  // kernel's shared memory) and n_pivots, k, rows_ready are not used.
  Ragged ragged = {};
  D2P_HD int candidates() const { return n_tokens - n_pivots; }
  D2P_HD int words_c() const { return (candidates() + 31) / 32; }
};

// One image of a batch, as the walks see it: its buffers and sizes.
struct Image {
  const uint32_t* adj;   // [C, words_c()]
  const int64_t* order;  // [n_tokens], token ids 0..n_tokens-1 in rank order
  int64_t* kept;         // [k]
  int64_t token_offset;  // added to every kept id (ragged batches: the packed position)
  int n_tokens, n_pivots, k, rows_ready;
  D2P_HD int candidates() const { return n_tokens - n_pivots; }
  D2P_HD int words_c() const { return (candidates() + 31) / 32; }
};

// Why a ragged table row is refused (0: it is fine). The CPU raises, the CUDA kernel skips.
enum ImageError : int { kImageOk = 0, kBadSizes, kBadOrderRange, kBadKeptRange, kBadAdjRange };

// Image b of the batch: the scalars and strides of a dense batch, or its row of the ragged
// table, every size and offset checked against the packed buffers' lengths (int64 math).
D2P_HD void dense_image(const MisArgs& a, int b, Image* im) {
  const int64_t c = a.candidates(), w = a.words_c();
  *im = {a.adj + b * c * w, a.order + static_cast<int64_t>(b) * a.n_tokens,
         a.kept + static_cast<int64_t>(b) * a.k, 0, a.n_tokens, a.n_pivots, a.k, a.rows_ready};
}

D2P_HD int ragged_image(const MisArgs& a, int b, Image* im) {
  const int64_t* r = a.ragged.table + static_cast<int64_t>(b) * kRaggedFields;
  const int64_t n = r[kTokens], np = r[kPivots], k = r[kKeep];
  if (n < 1 || n > a.n_tokens || np < 0 || np > k || k > n) return kBadSizes;
  const int64_t c = n - np, w = (c + 31) / 32;
  const int64_t tok = r[kTokenOffset], keep = r[kKeepOffset], adj = r[kAdjOffset];
  if (tok < 0 || tok > a.ragged.order_len - n) return kBadOrderRange;
  if (keep < 0 || keep > a.ragged.kept_len - k) return kBadKeptRange;
  if (adj < 0 || adj > a.ragged.adj_words - c * w) return kBadAdjRange;
  const int64_t ready = r[kRowEnd] < 0 ? 0 : (r[kRowEnd] < c ? r[kRowEnd] : c);
  *im = {a.adj + adj, a.order + tok, a.kept + keep, tok, static_cast<int>(n),
         static_cast<int>(np), static_cast<int>(k), static_cast<int>(ready)};
  return kImageOk;
}

D2P_HD int image_of(const MisArgs& a, int b, Image* im) {
  if (a.ragged.table) return ragged_image(a, b, im);
  dense_image(a, b, im);
  return kImageOk;
}

// CPU twin of the CUDA kernel: the same windows, Luby rounds and rules, threads as loops.
// What the compiled MIS runs on CPU tensors (backend='kernels' under the Triton interpreter,
// the public greedy_mis stage); prune(backend='auto') on a CPU never builds the graph
// (kernels/cpu_walk.py), and the plain-torch reference is the CPU twin of record.
void mis_rounds_cpu(const MisArgs& a);
// CUDA: one block per image, one launch for the batch, on `stream`. Throws on CUDA errors.
void mis_rounds_cuda(const MisArgs& a, int device, void* stream);
// Largest N the CUDA kernel takes for any n_pivots (its bitsets + scratch in 48 KiB).
int max_cuda_tokens();
int cuda_device_count();  // 0 where no driver/GPU (never throws)

}  // namespace d2p
