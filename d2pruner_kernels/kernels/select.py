"""SPEC steps 2-7 on the kernels backend: the rank order and the feature norms in one
launch (`rank.py`), then the graph, lazily: rows the walk never reaches are never computed.

The greedy walk stopped at m members reads only the rows of the candidates up to its m-th
member, and with a small budget that is a short prefix of the rank order. So:

  1. graph rows [0, P);
  2. MIS over them: images whose m members settle there are written and marked done;
  3. graph rows [P, C), for the images not done;
  4. MIS over the whole graph, for the images not done.

Which launches run depends on the shapes only (when P covers C, 1 and 2 are all), never on
values: no host sync, capturable in a CUDA graph; 3 and 4 return at once for finished
images. The result is exactly the full-graph selection.
P = max(PREFIX_MIN, PREFIX_PER_MEMBER * m) rounded up to the graph tile, at most C.
"""
from __future__ import annotations

import torch

from . import cdiv, mis, rank
from .graph import GraphRows

PREFIX_MIN = 1024
PREFIX_PER_MEMBER = 8


def prefix_rows(c: int, m: int, block: int) -> int:
    p = max(PREFIX_MIN, PREFIX_PER_MEMBER * m)
    return min(c, cdiv(p, block) * block)


def select(tokens, scores, n_pivots, k, grid, sim_threshold, spatial_weight, radius,
           temporal_radius) -> torch.Tensor:
    """Kept token ids int64 [B, k], ascending, from the features and the debiased scores."""
    need_graph = n_pivots < k
    tokens = tokens if tokens.stride(-1) == 1 else tokens.contiguous()  # one copy at most
    order, norms = rank.rank_and_norms(scores, tokens if need_graph else None)
    if not need_graph:  # no supplements: plain top-k
        return torch.sort(order[:, :k], dim=1).values
    g = GraphRows(tokens, order, n_pivots, grid, sim_threshold, spatial_weight, radius,
                  temporal_radius, norms=norms)
    method = "rounds"  # Luby rounds: the CUDA kernel on a GPU, its CPU twin under the interpreter
    p = prefix_rows(g.c, k - n_pivots, g.block)
    g.rows(0, p)
    if p >= g.c:
        return mis.greedy_mis(g.adj, g.order, n_pivots, k, method=method)
    done = torch.empty(order.shape[0], dtype=torch.int32, device=order.device)
    kept = mis.greedy_mis(g.adj, g.order, n_pivots, k, method=method, rows_ready=p, done=done)
    g.rows(p, g.c, skip=done)
    mis.greedy_mis(g.adj, g.order, n_pivots, k, method=method, skip=done, kept=kept)
    return kept
