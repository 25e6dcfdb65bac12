"""Steps 5-7 (docs/spec.md): greedy MIS in rank order stopped at m, fill, ascending output;
and `walk_depths`, how far into the graph the walk reads."""
from __future__ import annotations

import numpy as np
import torch

from ..checks import as_3d, pivot_count
from ..layout import unpack_symmetric
from ..options import DEFAULTS
from .graph import similarity_edges
from .rank import rank_order
from .scores import debiased_scores


def greedy_members(edges: torch.Tensor, m: int) -> list[int]:
    """Steps 5-6 of one image: candidates (rank positions) the greedy walk takes, in order.

    edges: bool [C, C] symmetric. Walk in rank order, take a candidate that no taken
    candidate touches, stop at m (fewer when the MIS runs out). Deciding candidate v reads
    row v, so the walk reads rows [0, taken[m - 1]] when it reaches m members.
    """
    adj = edges.cpu().numpy()
    blocked = np.zeros(adj.shape[0], dtype=bool)
    taken: list[int] = []
    for v in range(adj.shape[0]):
        if len(taken) == m:
            break
        if not blocked[v]:
            taken.append(v)
            blocked |= adj[v]
    return taken


def greedy_walk(edges: torch.Tensor, m: int) -> list[int]:
    """Steps 5-6, then the fill: the members, then untaken candidates in rank order, m in all."""
    taken = greedy_members(edges, m)
    chosen = set(taken)
    fill = [v for v in range(edges.shape[0]) if v not in chosen][: m - len(taken)]
    return taken + fill


def greedy_mis(adj: torch.Tensor, order: torch.Tensor, n_pivots: int, k: int) -> torch.Tensor:
    """Kept token indices int64 [B, k], ascending: pivots, the MIS picks and the fill.

    adj: packed int32 [B, C, words] (see `layout`); order: int64 [B, N] rank order.
    """
    c = order.shape[1] - n_pivots
    m = k - n_pivots
    out = []
    for b in range(order.shape[0]):
        picks = greedy_walk(unpack_symmetric(adj[b:b + 1], c)[0], m) if m > 0 else []
        positions = list(range(n_pivots)) + [n_pivots + p for p in picks]
        out.append(torch.sort(order[b, positions]).values)
    return torch.stack(out)


def walk_depths(tokens, attn, prior, grid, k: int,
                pivot_ratio: float = DEFAULTS.pivot_ratio) -> list[int]:
    """Rows of the candidate graph each image's walk reads: up to its m-th member, or all C
    if it finds fewer (0 when m = 0). What the lazy graph's first range must cover for the
    image to settle there (`kernels/lazy_graph.py`)."""
    n_p = pivot_count(pivot_ratio, k)
    c, m = tokens.shape[1] - n_p, k - n_p
    order = rank_order(debiased_scores(attn, prior))
    out = []
    for b in range(tokens.shape[0]):
        edges = similarity_edges(tokens[b:b + 1], order[b:b + 1], n_p, as_3d(grid))[0]
        taken = greedy_members(edges, m)
        out.append(taken[-1] + 1 if m and len(taken) == m else (0 if m == 0 else c))
    return out
