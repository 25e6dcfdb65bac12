"""Triton kernel of step 4 (docs/spec.md): the hybrid graph over the candidates, as packed bits.

For candidates i, j (rank positions among the non-pivots, token ids t_i = order[n_p + i]):

    cos_ij = <x_i, x_j> / (max(|x_i|, 1e-12) * max(|x_j|, 1e-12))
    sp_ij  = max(|dy|, |dx|) <= radius  and  |dt| <= temporal_radius   on the (T, H, W) grid
             (a TokenLayout: on its (t', y, x) table, TokenLayout.coords; COORDS)
    f_ij   = (1 - beta) * cos_ij + beta * sp_ij;   edge iff f_ij >= theta and j < i
             (fusion="binarized", FUSION 1 / 2: cos_ij > theta [and sp_ij], or sp_ij alone)

One program per BLOCK x BLOCK tile of the strict lower triangle: the raw dot products run
on the tensor cores in the input dtype with float32 sums, never tf32 (`dot.dot_fp32_acc`),
the norms come from one float32 pass before (`rank.py`), and the epilogue fuses the normalisation, the spatial
term, the threshold and the bit packing. Only the packed bits reach memory (layout:
../layout.py); tiles above the diagonal are never launched work, their words stay
unwritten. Batches with fewer tiles than SMs split K over programs (`split_count`,
`launch_slices`). A ragged batch (prune_varlen, `ragged_rows`) is one launch over every
image's tiles, each image's sizes from the ragged table (kernels/ragged.py).
"""
from __future__ import annotations

import collections
import functools
import math

import triton
import triton.language as tl

import torch

from ..layout import num_words
from ..options import DEFAULTS, PruneOptions
from ..token_layout import TokenLayout, coords_table
from . import cdiv, interpreting, launch_device, next_pow2, sm_count
from . import ragged_jit
from .dot import dot_fp32_acc, upcast
from .rank import rank_and_norms


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _tile(order_img, n_pivots, row_block, col_block, row_end, C, N, BLOCK: tl.constexpr):
    """The tile prologue every graph kernel shares (flash-attention's BlockInfo): once a
    program knows its image (order_img: its rank order) and its tile, its candidate rows and
    columns, which of them exist, and their token ids. The ids are clamped into [0, N):
    whatever `order` holds (it is not checked on a GPU), every gather stays inside tokens
    and norms."""
    rows = row_block * BLOCK + tl.arange(0, BLOCK)
    cols = col_block * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < row_end  # row_end <= C: the rows asked for
    col_ok = cols < C
    ti = tl.load(order_img + n_pivots + rows, mask=row_ok, other=0)
    tj = tl.load(order_img + n_pivots + cols, mask=col_ok, other=0)
    ti = tl.minimum(tl.maximum(ti, 0), N - 1).to(tl.int32)  # now < N: 32 bits suffice
    tj = tl.minimum(tl.maximum(tj, 0), N - 1).to(tl.int32)
    return rows, cols, row_ok, col_ok, ti, tj


@triton.jit
def _k_step(xi, xj, k0, k_hi, offs_k, row_ok, col_ok, EVEN_K: tl.constexpr):
    """The row and column tiles of one K step [k0, k0 + BLOCK_K), zero past k_hi."""
    if EVEN_K:
        a = tl.load(xi + k0, mask=row_ok[:, None], other=0.0)
        c = tl.load(xj + k0, mask=col_ok[:, None], other=0.0)
    else:
        k_ok = (k0 + offs_k) < k_hi
        a = tl.load(xi + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        c = tl.load(xj + k0, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
    return a, c


@triton.jit
def _slice_dots(xi, xj, k_lo, k_hi, offs_k, row_ok, col_ok, BLOCK: tl.constexpr,
                BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr):
    """The tile's dot products over one K slice [k_lo, k_hi), summed from zero."""
    part = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        a, c = _k_step(xi, xj, k0, k_hi, offs_k, row_ok, col_ok, EVEN_K)
        part = dot_fp32_acc(a, tl.trans(c), part, UPCAST)
    return part


@triton.jit
def _store_edges(acc, norm_img, adj_img, row0, ti, tj, rows, cols, row_ok, col_ok, col_block,
                 n_words, grid_h, grid_w, coord_img, radius, temporal_radius, cos_weight,
                 spatial_weight, sim_threshold, BLOCK: tl.constexpr, SPATIAL: tl.constexpr,
                 COORDS: tl.constexpr, FUSION: tl.constexpr, SUM_BITS: tl.constexpr):
    """The epilogue: cosine, spatial term, threshold, then 32 columns -> one int32 word,
    stored in row row0 + i of adj_img (the image's packed [C, n_words] adjacency, or the
    batch's with row0 = b * C). COORDS: a token's (t', y, x) from coord_img (int32 [N, 3],
    TokenLayout.coords), else from the (T, H, W) grid. FUSION (`fusion_flags`): 0 the
    weighted sum >= theta; 1 cos > theta (and near with SPATIAL); 2 near alone."""
    ni = tl.maximum(tl.load(norm_img + ti, mask=row_ok, other=1.0), 1e-12)
    nj = tl.maximum(tl.load(norm_img + tj, mask=col_ok, other=1.0), 1e-12)
    cos = acc / ni[:, None] / nj[None, :]
    if SPATIAL:
        if COORDS:  # the layout's table: 3 int32 per token (ids < N: 32-bit offsets)
            ci = coord_img + ti * 3
            cj = coord_img + tj * 3
            dt = tl.abs(tl.load(ci, mask=row_ok, other=0)[:, None]
                        - tl.load(cj, mask=col_ok, other=0)[None, :])
            dy = tl.abs(tl.load(ci + 1, mask=row_ok, other=0)[:, None]
                        - tl.load(cj + 1, mask=col_ok, other=0)[None, :])
            dx = tl.abs(tl.load(ci + 2, mask=row_ok, other=0)[:, None]
                        - tl.load(cj + 2, mask=col_ok, other=0)[None, :])
        else:
            hw = grid_h * grid_w  # token ids in [0, N), int32: the grid arithmetic in 32 bits
            dy = tl.abs((ti // grid_w % grid_h)[:, None] - (tj // grid_w % grid_h)[None, :])
            dx = tl.abs((ti % grid_w)[:, None] - (tj % grid_w)[None, :])
            dt = tl.abs((ti // hw)[:, None] - (tj // hw)[None, :])
        near = (dy <= radius) & (dx <= radius) & (dt <= temporal_radius)
    if FUSION == 0:  # weighted
        if SPATIAL:
            f = cos_weight * cos + spatial_weight * near.to(tl.float32)
        else:  # beta = 0: f = 1 * cos + 0 * sp is cos itself (NaN stays NaN), no grid work
            f = cos
        edge = f >= sim_threshold
    elif FUSION == 1:  # binarized, beta <= 0.5: a NaN cosine is not > theta
        edge = cos > sim_threshold
        if SPATIAL:  # beta = 0.5
            edge = edge & near
    else:  # binarized, beta > 0.5
        edge = near
    edge = edge & (cols[None, :] < rows[:, None]) & col_ok[None, :]
    shifts = tl.arange(0, 32)
    bits = tl.reshape(edge.to(tl.int32), [BLOCK, BLOCK // 32, 32]) << shifts[None, None, :]
    if SUM_BITS:  # the interpreter: a sum (the bits are disjoint: no carry, the same word)
        words = tl.sum(bits, 2)  # is numpy's; a reduce calls _bit_or per pair in Python
    else:
        words = tl.reduce(bits, 2, _bit_or)
    word_idx = col_block * (BLOCK // 32) + tl.arange(0, BLOCK // 32)
    out = adj_img + (row0 + rows[:, None]) * n_words + word_idx[None, :]
    tl.store(out, words, mask=row_ok[:, None] & (word_idx[None, :] < n_words))


# K is cut into SPLITS slices of slice_steps K steps (slice_len = slice_steps * BLOCK_K
# elements; a choice of the image's shape: its split_count), each summed from zero, then
# added in slice order. _graph_kernel: a program does every slice of its tile in turn, then
# the epilogue. Split-K, for launches whose tiles cannot fill the GPU: _slice_kernel
# programs each reduce one slice into a float32 workspace tile, _sum_slices_kernel adds
# them in slice order and runs the epilogue. Both paths run the same float operations, so
# an image's edges do not depend on which one built them (nor on the batch around it).
# Dense grids: (column blocks [x SPLITS], row blocks from row_block_start, images); only
# tiles with j-block <= i-block work.

@triton.jit
def _graph_kernel(x_ptr, norm_ptr, order_ptr, adj_ptr, skip_ptr, N, C, row_end, D, n_pivots,
                  row_block_start, slice_len, stride_xb, stride_xn, stride_nb, stride_ob,
                  n_words, grid_h, grid_w, coord_ptr, radius, temporal_radius, cos_weight,
                  spatial_weight, sim_threshold, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
                  EVEN_K: tl.constexpr, UPCAST: tl.constexpr, HAS_SKIP: tl.constexpr,
                  SPATIAL: tl.constexpr, COORDS: tl.constexpr, FUSION: tl.constexpr,
                  SPLITS: tl.constexpr, SUM_BITS: tl.constexpr):
    col_block = tl.program_id(0)
    row_block = row_block_start + tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    if col_block > row_block:  # only j < i is stored
        return
    if HAS_SKIP:  # lazy graphs: this image's selection is already settled
        if tl.load(skip_ptr + b) != 0:
            return
    rows, cols, row_ok, col_ok, ti, tj = _tile(order_ptr + b * stride_ob, n_pivots, row_block,
                                               col_block, row_end, C, N, BLOCK)
    offs_k = tl.arange(0, BLOCK_K)
    xi = x_ptr + b * stride_xb + ti.to(tl.int64)[:, None] * stride_xn + offs_k[None, :]
    xj = x_ptr + b * stride_xb + tj.to(tl.int64)[:, None] * stride_xn + offs_k[None, :]
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for s in range(0, SPLITS):
        k_lo = s * slice_len
        part = _slice_dots(xi, xj, k_lo, tl.minimum(D, k_lo + slice_len), offs_k, row_ok,
                           col_ok, BLOCK, BLOCK_K, EVEN_K, UPCAST)
        if SPLITS == 1:
            acc = part
        else:
            acc += part
    _store_edges(acc, norm_ptr + b * stride_nb, adj_ptr, b * C, ti, tj, rows, cols, row_ok,
                 col_ok, col_block, n_words, grid_h, grid_w, coord_ptr, radius,
                 temporal_radius, cos_weight, spatial_weight, sim_threshold, BLOCK, SPATIAL,
                 COORDS, FUSION, SUM_BITS)


@triton.jit
def _slice_kernel(x_ptr, order_ptr, skip_ptr, ws_ptr, N, C, row_end, D, n_pivots,
                  row_block_start, slice_len, n_tiles, stride_xb, stride_xn, stride_ob,
                  BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                  UPCAST: tl.constexpr, HAS_SKIP: tl.constexpr, SPLITS: tl.constexpr):
    """Split-K, first launch: one K slice of one tile into its float32 workspace tile
    ([B, SPLITS, n_tiles, BLOCK, BLOCK], offsets in 64 bits: b is int64)."""
    col_block = tl.program_id(0) // SPLITS
    split = tl.program_id(0) % SPLITS
    row_block = row_block_start + tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    if col_block > row_block:
        return
    if HAS_SKIP:
        if tl.load(skip_ptr + b) != 0:
            return
    rows, cols, row_ok, col_ok, ti, tj = _tile(order_ptr + b * stride_ob, n_pivots, row_block,
                                               col_block, row_end, C, N, BLOCK)
    offs_k = tl.arange(0, BLOCK_K)
    xi = x_ptr + b * stride_xb + ti.to(tl.int64)[:, None] * stride_xn + offs_k[None, :]
    xj = x_ptr + b * stride_xb + tj.to(tl.int64)[:, None] * stride_xn + offs_k[None, :]
    tile = row_block * (row_block + 1) // 2 + col_block
    in_tile = tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for s in range(split, split + 1):  # this form compiles to the fewest registers (sm_80)
        k_lo = s * slice_len
        acc += _slice_dots(xi, xj, k_lo, tl.minimum(D, k_lo + slice_len), offs_k, row_ok,
                           col_ok, BLOCK, BLOCK_K, EVEN_K, UPCAST)
    slot = (b * SPLITS + split) * n_tiles + tile
    tl.store(ws_ptr + slot * (BLOCK * BLOCK) + in_tile, acc)


@triton.jit
def _sum_slices_kernel(norm_ptr, order_ptr, adj_ptr, skip_ptr, ws_ptr, N, C, row_end,
                       n_pivots, row_block_start, n_tiles, stride_nb, stride_ob, n_words,
                       grid_h, grid_w, coord_ptr, radius, temporal_radius, cos_weight,
                       spatial_weight, sim_threshold, BLOCK: tl.constexpr,
                       HAS_SKIP: tl.constexpr, SPATIAL: tl.constexpr, COORDS: tl.constexpr,
                       FUSION: tl.constexpr, SPLITS: tl.constexpr, SUM_BITS: tl.constexpr):
    """Split-K, second launch: a tile's slices added in slice order, then the epilogue."""
    col_block = tl.program_id(0)
    row_block = row_block_start + tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    if col_block > row_block:
        return
    if HAS_SKIP:
        if tl.load(skip_ptr + b) != 0:
            return
    rows, cols, row_ok, col_ok, ti, tj = _tile(order_ptr + b * stride_ob, n_pivots, row_block,
                                               col_block, row_end, C, N, BLOCK)
    tile = row_block * (row_block + 1) // 2 + col_block
    in_tile = tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for s in range(SPLITS):
        slot = (b * SPLITS + s) * n_tiles + tile
        acc += tl.load(ws_ptr + slot * (BLOCK * BLOCK) + in_tile)
    _store_edges(acc, norm_ptr + b * stride_nb, adj_ptr, b * C, ti, tj, rows, cols, row_ok,
                 col_ok, col_block, n_words, grid_h, grid_w, coord_ptr, radius,
                 temporal_radius, cos_weight, spatial_weight, sim_threshold, BLOCK, SPATIAL,
                 COORDS, FUSION, SUM_BITS)


@triton.jit
def _ragged_graph_kernel(x_ptr, norm_ptr, order_ptr, adj_ptr, skip_ptr, table_ptr, coord_ptr,
                         n_images, D, stride_xn, radius, temporal_radius, cos_weight,
                         spatial_weight, sim_threshold, BLOCK: tl.constexpr,
                         BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
                         HAS_SKIP: tl.constexpr, SPATIAL: tl.constexpr, COORDS: tl.constexpr,
                         FUSION: tl.constexpr, SUM_BITS: tl.constexpr):
    """A packed batch (prune_varlen), grid (tiles of this range,). The program's image
    comes from the table's TILE_START column, its tile from its index among the image's
    tiles of rows [ROW_BEGIN, ROW_END) (lower triangle, row-major, so no program is idle);
    N, n_pivots, C, the grid and the K slices are the image's own (the slices it gets
    alone: the same float operations as its own prune()); the tokens, norms and order are
    read at its token offset, its graph written at its adjacency offset in its own layout
    [C_b, words(C_b)]. COORDS: every image's (t', y, x) table packed like the tokens
    (coord_ptr [total, 3] int32, at its token offset) and its temporal radius' from the
    table's TEMPORAL_RADIUS (TokenLayout.coords; a raster grid's own table there too).
    """
    pid = tl.program_id(0)
    img = ragged_jit.image_of(table_ptr, ragged_jit.TILE_START, pid, n_images)
    b = img.to(tl.int64)
    meta = ragged_jit.row_of(table_ptr, img)
    N = ragged_jit.field32(meta, ragged_jit.TOKENS)
    n_pivots = ragged_jit.field32(meta, ragged_jit.PIVOTS)
    C = N - n_pivots
    n_words = (C + 31) // 32
    row_end = ragged_jit.field32(meta, ragged_jit.ROW_END)
    first_block = ragged_jit.field32(meta, ragged_jit.ROW_BEGIN) // BLOCK
    tile_start = ragged_jit.field32(meta, ragged_jit.TILE_START)
    g = first_block * (first_block + 1) // 2 + (pid - tile_start)
    # row_block = the r with r (r + 1) / 2 <= g < (r + 1) (r + 2) / 2: the float32 root
    # is off by at most one for any g of a graph the MIS takes (r < 4096), then corrected
    r = ((tl.sqrt(8.0 * g.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    r = tl.where((r + 1) * (r + 2) // 2 <= g, r + 1, r)
    r = tl.where(r * (r + 1) // 2 > g, r - 1, r)
    row_block = r
    col_block = g - r * (r + 1) // 2
    grid_h = ragged_jit.field32(meta, ragged_jit.GRID_H)
    grid_w = ragged_jit.field32(meta, ragged_jit.GRID_W)
    slice_len = ragged_jit.field32(meta, ragged_jit.SLICE_STEPS) * BLOCK_K
    base = tl.load(meta + ragged_jit.TOKEN_OFFSET)  # int64
    if HAS_SKIP:  # lazy graphs: this image's selection is already settled
        if tl.load(skip_ptr + b) != 0:
            return
    rows, cols, row_ok, col_ok, ti, tj = _tile(order_ptr + base, n_pivots, row_block,
                                               col_block, row_end, C, N, BLOCK)
    offs_k = tl.arange(0, BLOCK_K)
    x_img = x_ptr + base * stride_xn
    xi = x_img + ti.to(tl.int64)[:, None] * stride_xn + offs_k[None, :]
    xj = x_img + tj.to(tl.int64)[:, None] * stride_xn + offs_k[None, :]
    # The image's own slices, in order, in one loop over K whose bounds are kernel
    # arguments (bounds read from the table would keep the loads from being pipelined): a
    # slice's last step adds its sum to acc and restarts it from zero, the very float
    # operations of _graph_kernel. slice_len is a multiple of BLOCK_K, so no step
    # straddles two slices and the K mask is the same.
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    part = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        a, c = _k_step(xi, xj, k0, D, offs_k, row_ok, col_ok, EVEN_K)
        part = dot_fp32_acc(a, tl.trans(c), part, UPCAST)
        if ((k0 + BLOCK_K) % slice_len == 0) | (k0 + BLOCK_K >= D):
            acc += part  # 0 + part first: part's value (and edges: -0.0 >= t iff +0.0 >= t)
            part = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    adj_img = adj_ptr + tl.load(meta + ragged_jit.ADJ_OFFSET)
    if COORDS:
        coord_img = coord_ptr + base * 3
        temporal_radius = ragged_jit.field32(meta, ragged_jit.TEMPORAL_RADIUS)
    else:
        coord_img = coord_ptr
    _store_edges(acc, norm_ptr + base, adj_img, 0, ti, tj, rows, cols, row_ok, col_ok,
                 col_block, n_words, grid_h, grid_w, coord_img, radius, temporal_radius,
                 cos_weight, spatial_weight, sim_threshold, BLOCK, SPATIAL, COORDS, FUSION,
                 SUM_BITS)


def split_count(tiles: int, k_steps: int, device: torch.device) -> int:
    """K slices per tile (split-K) for one image's `tiles`: double while they leave SMs
    idle and the slices keep >= 8 K steps on average; at most 8. It depends on the image's
    shape and the GPU only, never on the batch size or on which rows a launch covers, so
    an image's dot products are summed the same way alone, in any batch, in the prefix or
    the rest of a lazy graph: its edges, hence its selection, never depend on those."""
    if device.type != "cuda":
        return 1
    sms = sm_count(device)
    s = 1
    while s < 8 and tiles * s < sms and k_steps // (2 * s) >= 8:
        s *= 2
    return s


def launch_slices(batch_tiles: int, splits: int, device: torch.device) -> bool:
    """Whether the K slices get programs of their own (split-K): on a GPU only while the
    batch's tiles leave SMs idle; else a program adds its tile's slices in turn, which
    saves the workspace's bytes and the summing launch. (On CPU, slices exist only when a
    test asks for them: they are launched.)"""
    if splits == 1:
        return False
    return device.type != "cuda" or batch_tiles < sm_count(device)


def default_config(dtype: torch.dtype, d: int) -> dict:
    if interpreting():  # few, large programs: each interpreted loop step costs ~ms
        return dict(BLOCK=64, BLOCK_K=min(256, next_pow2(d)), num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK=32, BLOCK_K=32, num_warps=4, num_stages=2)
    return dict(BLOCK=64, BLOCK_K=64, num_warps=4, num_stages=3)


def fusion_flags(params: PruneOptions) -> dict:
    """SPATIAL (the epilogue needs the spatial term) and FUSION (how the terms make an edge):
    weighted 0 (SPATIAL iff beta != 0); binarized (reference.binarized_edges) 1 for
    beta <= 0.5 (cos > theta, and near at beta = 0.5: SPATIAL), 2 for beta > 0.5 (near)."""
    beta = params.spatial_weight
    if params.fusion == "binarized":
        return dict(SPATIAL=beta >= 0.5, FUSION=2 if beta > 0.5 else 1)
    return dict(SPATIAL=beta != 0, FUSION=0)


@functools.lru_cache(maxsize=256)
def tile_flags(dtype: torch.dtype, d: int, block_k: int, params: PruneOptions,
               coords: bool = False) -> dict:
    """The kernel's compile-time flags that follow from the inputs (dense and ragged alike);
    coords: the spatial term reads a coordinate table (COORDS). Cached: read it, never
    write it."""
    return dict(BLOCK_K=block_k, EVEN_K=d % block_k == 0, UPCAST=upcast(dtype),
                COORDS=coords, SUM_BITS=interpreting(), **fusion_flags(params))


_coords: collections.OrderedDict = collections.OrderedDict()  # LRU of layout_coords
COORDS_CACHE_SIZE = 256


def _after_copy(hit, device: torch.device) -> None:
    """A cached table copied on another stream: the current one waits for that copy (not
    inside a CUDA graph capture, which cannot wait on an event recorded outside it: there
    the table was copied by the warm-up call, which the capture follows)."""
    if len(hit) > 2 and torch.cuda.current_stream(device) != hit[3] \
            and not torch.cuda.is_current_stream_capturing():
        torch.cuda.current_stream(device).wait_event(hit[4])


def layout_coords(layout: TokenLayout, temporal_radius: int, device: torch.device):
    """(table int32 [N, 3] on `device`, temporal_radius') of TokenLayout.coords: copied to
    the device once per layout, radius and device (LRU-cached; never written). A layout
    first met inside a CUDA graph capture raises (a host copy cannot be captured): run it
    once before capturing."""
    key = (layout, temporal_radius, device)
    hit = _coords.get(key)
    if hit is not None:
        _coords.move_to_end(key)
        _after_copy(hit, device)
        return hit[:2]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"the graph kernels met {layout!r} for the first time inside a CUDA graph "
            f"capture: its coordinate table cannot be copied to the device during a capture. "
            f"Run the same layout once before capturing (a warm-up call), then capture")
    table, radius = coords_table(layout, temporal_radius)
    if device.type == "cuda":  # from pinned memory, asynchronously: no wait for the host
        source = table.pin_memory()
        stream = torch.cuda.current_stream(device)
        copied = source.to(device, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)  # another stream that reads it later waits for this (no sync)
        hit = (copied, radius, source, stream, done)  # the pinned source outlives the copy
    else:
        hit = (table, radius)  # shared and read-only
    _coords[key] = hit
    if len(_coords) > COORDS_CACHE_SIZE:
        _coords.popitem(last=False)
    return hit[:2]


_SUM_FROM_DOTS = ("order_ptr", "N", "C", "n_pivots", "stride_ob", "BLOCK", "SPLITS",
                  "num_warps", "num_stages")  # _sum_slices_kernel reads no features


class GraphRows:
    """Launches the graph kernel over ranges of rows of one (tokens, order) pair, sharing
    the norms: the whole graph at once, or a prefix first and the rest later (lazy)."""

    def __init__(self, tokens, order, n_pivots: int, grid, params: PruneOptions = DEFAULTS,
                 config=None, norms=None):
        b, n, d = tokens.shape  # order [B, N], 0 <= n_pivots <= N: checks.check_graph_inputs
        self.x = tokens if tokens.stride(-1) == 1 else tokens.contiguous()
        self.order = order if order.stride(-1) == 1 else order.contiguous()
        # float32 |x_n|, from the rank launch when prune() made it, else one pass here
        self.norms = norms if norms is not None else rank_and_norms(None, self.x)[1]
        self.cfg = dict(config or default_config(self.x.dtype, d))
        self.block = self.cfg.pop("BLOCK")
        self.block_k = self.cfg.pop("BLOCK_K")
        self.c = n - n_pivots
        self.adj = torch.empty(b, self.c, num_words(self.c), dtype=torch.int32,
                               device=tokens.device)
        self.n_pivots, self.grid, self.params = n_pivots, grid, params
        # K slices: fixed per image shape (its full triangle), so its edges are too. Each
        # launch decides whether they get programs of their own (split-K, with a float32
        # workspace of SPLITS x tiles x BLOCK^2 per image): the sums are the same.
        row_blocks = cdiv(self.c, self.block)
        self.n_tiles = row_blocks * (row_blocks + 1) // 2
        k_steps = cdiv(d, self.block_k)
        self.splits = self.cfg.pop("SPLITS", None) or split_count(self.n_tiles, k_steps,
                                                                  tokens.device)
        self.slice_steps = cdiv(k_steps, self.splits)  # K steps per slice
        self.split_launch = self.cfg.pop("SPLIT_LAUNCH", None)  # None: `launch_slices`
        self.ws = None  # allocated by the first split-K launch
        # the launches' arguments that do not change between row ranges (by keyword): the
        # dot products' (_graph_kernel, _slice_kernel) and the epilogue's (_graph_kernel,
        # _sum_slices_kernel)
        coords = isinstance(grid, TokenLayout)  # a layout: its (t', y, x) table, else (T, H, W)
        if coords:
            table, temporal_radius = layout_coords(grid, params.temporal_radius, tokens.device)
            grid_h = grid_w = 1
        else:  # never read (COORDS=False): any int32 tensor
            table, temporal_radius, grid_h, grid_w = self.adj, params.temporal_radius, *grid[1:]
        x, f = self.x, tile_flags(self.x.dtype, d, self.block_k, params, coords)
        self._dots = dict(order_ptr=self.order, N=n, C=self.c, n_pivots=n_pivots,
                          stride_ob=self.order.stride(0), BLOCK=self.block,
                          SPLITS=self.splits, **self.cfg, x_ptr=x, D=d,
                          slice_len=self.slice_steps * self.block_k, stride_xb=x.stride(0),
                          stride_xn=x.stride(1), BLOCK_K=f["BLOCK_K"], EVEN_K=f["EVEN_K"],
                          UPCAST=f["UPCAST"])
        self._edges = dict(norm_ptr=self.norms, adj_ptr=self.adj,
                           stride_nb=self.norms.stride(0), n_words=self.adj.shape[2],
                           grid_h=grid_h, grid_w=grid_w, coord_ptr=table,
                           radius=params.radius, temporal_radius=temporal_radius,
                           cos_weight=params.cos_weight, spatial_weight=params.spatial_weight,
                           sim_threshold=params.sim_threshold, SPATIAL=f["SPATIAL"],
                           COORDS=f["COORDS"], FUSION=f["FUSION"], SUM_BITS=f["SUM_BITS"])
        # the whole graph's tiles per SM (the interpreter has no SMs: inf); a split-K
        # program does a slice of a tile, so tiles, not programs, measure the work
        self.waves = (b * self.n_tiles / sm_count(tokens.device)
                      if tokens.device.type == "cuda" else math.inf)

    def _split(self, tiles: int) -> bool:
        if self.split_launch is not None:
            return self.split_launch and self.splits > 1
        return launch_slices(tiles, self.splits, self.x.device)

    def rows(self, start: int, end: int, skip: torch.Tensor | None = None) -> None:
        """Computes rows [start, end) of adj (start a multiple of BLOCK); images with
        skip[b] != 0 are left alone."""
        if start % self.block:
            raise ValueError(f"start must be a multiple of the graph tile {self.block}, got {start}")
        end = min(end, self.c)  # no row block past the graph (nor its workspace tiles)
        first, last = start // self.block, cdiv(end, self.block)  # row blocks [first, last)
        if last <= first:
            return
        x, adj, b = self.x, self.adj, self.x.shape[0]
        split = self._split(b * (last * (last + 1) - first * (first + 1)) // 2)  # its tiles
        if split and self.ws is None:
            self.ws = torch.empty(b * self.splits * self.n_tiles * self.block ** 2,
                                  dtype=torch.float32, device=x.device)
        rows = dict(row_end=end, row_block_start=first, HAS_SKIP=skip is not None,
                    skip_ptr=adj if skip is None else skip)  # never read without HAS_SKIP
        with launch_device(x.device):  # grid: column blocks [0, last) x row blocks x images
            if not split:
                _graph_kernel[(last, last - first, b)](**self._dots, **self._edges, **rows)
            else:
                ws = dict(ws_ptr=self.ws, n_tiles=self.n_tiles)
                _slice_kernel[(last * self.splits, last - first, b)](**self._dots, **ws, **rows)
                dots = {k: self._dots[k] for k in _SUM_FROM_DOTS if k in self._dots}
                _sum_slices_kernel[(last, last - first, b)](**dots, **self._edges, **ws, **rows)


def similarity_graph(tokens: torch.Tensor, order: torch.Tensor, n_pivots: int,
                     grid: tuple[int, int, int] | TokenLayout, params: PruneOptions = DEFAULTS,
                     config: dict | None = None) -> torch.Tensor:
    """tokens [B, N, D] (fp16/bf16/fp32), order int64 [B, N] -> packed int32 [B, C, words].

    Memory-safe for any values of `order`: token ids are clamped into [0, N) in the kernel
    (an id out of range then reads the clamped token's row). The public stage
    (`stages.similarity_graph`) refuses a CPU order that is not a permutation."""
    g = GraphRows(tokens, order, n_pivots, grid, params, config)
    g.rows(0, g.c)
    return g.adj


def ragged_rows(tokens: torch.Tensor, norms: torch.Tensor, order: torch.Tensor,
                adj: torch.Tensor, table: torch.Tensor, tiles: int, params: PruneOptions,
                config: dict, skip: torch.Tensor | None = None,
                coords: torch.Tensor | None = None) -> None:
    """One launch for a ragged batch (prune_varlen): rows [ROW_BEGIN_b, ROW_END_b) of every
    image's graph into the packed adjacency (int32 [words], image b's [C_b, words(C_b)] at
    its ADJ_OFFSET). tokens [total, D] (unit last stride), norms float32 [total], order int64
    [total] (local ids at each TOKEN_OFFSET), table: this range's [B, FIELDS] on the device,
    `tiles` its programs (the TILE_START prefix's total). config: default_config of the
    tokens (the table's SLICE_STEPS count its BLOCK_K). Images with skip[b] != 0 are left
    alone. coords: int32 [total, 3], every image's (t', y, x) at its token offset (its
    temporal radius' in the table's TEMPORAL_RADIUS), or None: each image's (T, H, W) from
    GRID_H / GRID_W. Always in-program K slices: no workspace, no second launch."""
    if tiles == 0:
        return
    cfg = dict(config)
    block, block_k = cfg.pop("BLOCK"), cfg.pop("BLOCK_K")
    d = tokens.shape[1]
    p = params
    with launch_device(tokens.device):
        _ragged_graph_kernel[(tiles,)](
            x_ptr=tokens, norm_ptr=norms, order_ptr=order, adj_ptr=adj,
            skip_ptr=adj if skip is None else skip, table_ptr=table,
            coord_ptr=adj if coords is None else coords, n_images=table.shape[0],
            D=d, stride_xn=tokens.stride(0), radius=p.radius,
            temporal_radius=p.temporal_radius, cos_weight=p.cos_weight,
            spatial_weight=p.spatial_weight, sim_threshold=p.sim_threshold, BLOCK=block,
            HAS_SKIP=skip is not None,
            **tile_flags(tokens.dtype, d, block_k, p, coords is not None), **cfg)
