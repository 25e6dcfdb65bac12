"""The ragged table (prune_varlen's fused GPU path, docs/design.md "Ragged batches"): one row
of FIELDS int64 per image, built on the host from the validated sizes by `build_table` (the
one builder: kernels/varlen.py, the tests and .ci/asan_cases.py all use it), copied to the
device once per call (or cached), read by the rank, graph and MIS launches. Plain ints, no
Triton: the MIS side (mis.py, csrc/mis.h's RaggedField, the same numbers) imports it too;
the Triton kernels read it through kernels/ragged_jit.py.

A table is [R, B, FIELDS]: one [B, FIELDS] slice per range of graph rows (the lazy graph:
R = 1 or 2); only ROW_BEGIN, ROW_END and TILE_START differ between the slices.
"""
from __future__ import annotations

import dataclasses

from ..layout import num_words

TOKEN_OFFSET = 0  # its first token in the packed tokens / norms / scores / order
TOKENS = 1        # N_b
PIVOTS = 2        # n_pivots_b
KEEP = 3          # k_b
KEEP_OFFSET = 4   # its first entry in the packed kept
ADJ_OFFSET = 5    # first int32 word of its [C_b, words(C_b)] graph in the packed adjacency
ROW_BEGIN = 6     # graph rows [ROW_BEGIN, ROW_END) built by this range's launch (multiples of
ROW_END = 7       #   the tile, but ROW_END <= C_b); the MIS reads rows [0, min(ROW_END, C_b))
TILE_START = 8    # its first program in this range's graph launch (tiles of earlier images)
RANK_START = 9    # its first program in the rank launch
GRID_H = 10       # its grid (T, H, W): H and W (the spatial term)
GRID_W = 11
SLICE_STEPS = 12  # K steps of the graph's BLOCK_K in each of its K slices (graph.split_count
#                   of the image alone: the slices it gets in its own prune())
TEMPORAL_RADIUS = 13  # the graph's temporal radius' for this image's coordinate table
#                       (TokenLayout.coords; read only by a graph launch given the table)
FIELDS = 16       # row stride (14-15 unused)


def _tri(r: int) -> int:
    return r * (r + 1) // 2


@dataclasses.dataclass(frozen=True)
class Table:
    """A built table and the totals its launches are sized by."""
    rows: list          # [R][B][FIELDS] ints
    total_tokens: int   # sum N_b: the packed tokens / order
    kept_len: int       # sum k_b: the packed kept
    adj_words: int      # sum C_b * words(C_b): the packed adjacency
    rank_programs: int  # programs of the rank launch (0 without rank_block)
    range_tiles: list   # programs of each range's graph launch (0s without block)


def build_table(tokens, pivots, keeps, *, ranges=None, block: int | None = None, grids=None,
                slice_steps=None, rank_block: int | None = None,
                temporal_radii=None) -> Table:
    """The table of a batch of images with N_b = tokens[b], n_pivots_b = pivots[b] and
    k_b = keeps[b], laid out back to back in that order (every offset is the sum of the
    sizes before it). ranges: per range, per image, its graph rows (begin, end) (default:
    one range, every image's whole graph [0, C_b)); block: the graph tile, for each range's
    TILE_START (else 0); grids: (T, H, W) per image (else 0); slice_steps: per image (else
    0); rank_block: tokens per rank program, for RANK_START (else 0); temporal_radii: per
    image, for TEMPORAL_RADIUS (else 0). Sizes are taken as
    given (the public entry points validated them; the MIS checks each row again)."""
    b = len(tokens)
    cands = [n - n_p for n, n_p in zip(tokens, pivots)]
    if ranges is None:
        ranges = [[(0, c) for c in cands]]
    base = []
    tok = keep = adj = rank = 0
    for i in range(b):
        r = [0] * FIELDS
        r[TOKEN_OFFSET], r[TOKENS], r[PIVOTS], r[KEEP] = tok, tokens[i], pivots[i], keeps[i]
        r[KEEP_OFFSET], r[ADJ_OFFSET], r[RANK_START] = keep, adj, rank
        if grids is not None:
            r[GRID_H], r[GRID_W] = grids[i][-2], grids[i][-1]
        if slice_steps is not None:
            r[SLICE_STEPS] = slice_steps[i]
        if temporal_radii is not None:
            r[TEMPORAL_RADIUS] = temporal_radii[i]
        tok, keep = tok + tokens[i], keep + keeps[i]
        adj += cands[i] * num_words(cands[i])
        if rank_block is not None:
            rank += -(-tokens[i] // rank_block)
        base.append(r)
    rows, range_tiles = [], []
    for spans in ranges:
        start, slab = 0, []
        for r, (begin, end) in zip(base, spans):
            r = list(r)
            r[ROW_BEGIN], r[ROW_END], r[TILE_START] = begin, end, start
            if block is not None and end > begin:
                start += _tri(-(-end // block)) - _tri(begin // block)
            slab.append(r)
        rows.append(slab)
        range_tiles.append(start)
    return Table(rows, tok, keep, adj, rank, range_tiles)
