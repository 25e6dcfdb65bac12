"""Steps 4-7 on the kernels backend (docs/spec.md), given the rank order and the feature
norms (`rank.py` makes both in one launch): the graph, built lazily, and the MIS. Rows the
walk never reaches are never computed.

The greedy walk stopped at m members reads only the rows of the candidates up to its m-th
member, and with a small budget that is a short prefix of the rank order. So the graph is
built in growing row ranges [0, P_1), [P_1, P_2), ..., [P_(L-1), C), and after each range
the MIS settles the images whose m-th member lies inside it: they are written and marked
done, and later ranges (graph and MIS launches alike) skip them at once.

Which launches run depends on the shapes only (one range when P_1 covers C), never on
values: no host sync, capturable in a CUDA graph. The result is exactly the full-graph
selection, whatever the ranges.
P_1 = max(PREFIX_MIN, PREFIX_PER_MEMBER * m); then P_(i+1) = PREFIX_GROWTH * P_i,
or C at once when PREFIX_GROWTH < 2; each rounded up to the graph tile, at most C. A graph
whose tiles all fit in LAZY_MIN_WAVES waves over the SMs is built whole (one range): a
prefix would save it little time and cost it three more launches.

Choosing P: the walk reaches its m-th member after ~1.1-1.3 m candidates on the benchmark
inputs (`python -m benchmarks.walk_depth`). The demo scene, whose patches have many
look-alikes, needs 157 rows at m = 18 (90% pruned: 8 m = 144 rounded up to the tile, 160
for its float32 features, holds them) and, at 75% pruned, runs out of independent tokens
and reads every row.
"""
from __future__ import annotations

import math

import torch

from ..options import PruneOptions
from . import cdiv, mis
from .graph import GraphRows

PREFIX_MIN = 128
PREFIX_PER_MEMBER = 8
PREFIX_GROWTH = 0
LAZY_MIN_WAVES = 1.0


def prefix_rows(c: int, m: int, block: int) -> int:
    """P_1: the rows of the first range."""
    p = max(PREFIX_MIN, PREFIX_PER_MEMBER * m)
    return min(c, cdiv(p, block) * block)


def row_ranges(c: int, m: int, block: int, waves: float = math.inf) -> list[int]:
    """The ends P_1 < P_2 < ... < C of the row ranges; `waves`: the whole graph's tiles
    over the SMs (GraphRows.waves)."""
    ends = [c if waves <= LAZY_MIN_WAVES else prefix_rows(c, m, block)]
    while ends[-1] < c:
        p = int(ends[-1] * PREFIX_GROWTH) if PREFIX_GROWTH >= 2 else c
        ends.append(min(c, cdiv(p, block) * block))
    return ends


def kept_ids(tokens, order, norms, n_pivots: int, k: int, grid,
             params: PruneOptions) -> torch.Tensor:
    """Steps 4-7: kept token ids int64 [B, k], ascending, from the features [B, N, D] (unit last
    stride), the rank order int64 [B, N] and the float32 norms [B, N] (n_pivots < k: the
    dispatcher takes the plain top-k itself)."""
    g = GraphRows(tokens, order, n_pivots, grid, params, norms=norms)
    ends = row_ranges(g.c, k - n_pivots, g.block, g.waves)
    g.rows(0, ends[0])
    if len(ends) == 1:
        return mis.greedy_mis(g.adj, g.order, n_pivots, k)
    done = torch.empty(order.shape[0], dtype=torch.int32, device=order.device)
    kept = mis.greedy_mis(g.adj, g.order, n_pivots, k, rows_ready=ends[0], done=done)
    for start, end in zip(ends, ends[1:]):  # done is read (skip) before it is rewritten
        g.rows(start, end, skip=done)
        mis.greedy_mis(g.adj, g.order, n_pivots, k, rows_ready=end, skip=done, done=done,
                       kept=kept)
    return kept
