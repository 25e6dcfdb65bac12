"""prune(): the public entry point. Validates (metadata only), then runs the stages.

On CUDA the whole call is free of host synchronisation: scores, then rank + norms, the
lazy graph and the MIS of `kernels/select.py`, all on the current stream, output shape
fixed by `k` (unless the compiled MIS cannot run: an extension built without CUDA, or
N > its limit; then the reference MIS reads the graph on the host). It is also a `torch.library` custom op (`torch.ops.d2pruner.prune`) with a
fake implementation, so `torch.compile(fullgraph=True)` traces through it and CUDA graphs
capture it.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from . import stages
from .prior import PositionalPrior
from .checks import (as_3d, check_backend, check_float, check_int, check_prune_inputs, pivot_count,
                     resolve_k)


def prune(tokens: torch.Tensor, attn: torch.Tensor, grid_hw, k, *,
          prior: torch.Tensor | None = None, pivot_ratio: float = 0.7,
          sim_threshold: float = 0.8, spatial_weight: float = 0.0, radius: int = 2,
          temporal_radius: int = 1, eps: float = 1e-7, check_finite: bool = False,
          backend: str = "auto") -> torch.Tensor:
    """Indices of the visual tokens D2Pruner keeps, int64, ascending (SPEC.md).

    tokens: [B, N, D] or [N, D] features (fp16 / bf16 / fp32).
    attn:   [B, N] or [B, H, N] (or unbatched [N] / [H, N]) importance; heads are averaged.
            A row of a full attention map is a view: attn_full[:, :, row, start:end].
    grid_hw: (H, W) or (T, H, W), product N.  k: int in [1, N] or ratio in (0, 1].
    prior:  [N] or [B, N] positive positional prior (or a PositionalPrior), None = no debiasing.
    Returns [B, k] (or [k]) on the input's device.
    """
    check_backend(backend)
    if not isinstance(check_finite, bool):
        raise TypeError(f"check_finite must be a bool, got {type(check_finite).__name__}")
    if check_finite and torch.compiler.is_compiling():
        raise ValueError("check_finite=True reads values (a device sync): not supported under "
                         "torch.compile; check the inputs outside the compiled region")
    prior_obj = prior if isinstance(prior, PositionalPrior) else None
    pivot_ratio = check_float("pivot_ratio", pivot_ratio, 0.0, 1.0)
    sim_threshold = check_float("sim_threshold", sim_threshold, -1.0, 1.0)
    spatial_weight = check_float("spatial_weight", spatial_weight, 0.0, 1.0)
    eps = check_float("eps", eps, 0.0, float("inf"))
    radius = check_int("radius", radius)
    temporal_radius = check_int("temporal_radius", temporal_radius)
    batched, n, grid = check_prune_inputs(tokens, attn, grid_hw,
                                          None if prior_obj is not None else prior, check_finite)
    if prior_obj is not None:  # calibrated for this grid; one device copy, cached
        if as_3d(prior_obj.grid) != grid:
            raise ValueError(f"prior is calibrated for grid {tuple(prior_obj.grid)}, "
                             f"got grid_hw {tuple(grid_hw)}")
        prior = prior_obj.as_tensor(device=tokens.device)
    k = resolve_k(k, n)
    if not batched:
        tokens, attn = tokens.unsqueeze(0), attn.unsqueeze(0)
    args = (tokens, attn, prior, list(grid), k, pivot_count(pivot_ratio, k), sim_threshold,
            spatial_weight, radius, temporal_radius, eps, backend)
    out = _prune_op(*args) if torch.compiler.is_compiling() else _stages(*args)
    return out if batched else out[0]


def _stages(tokens, attn, prior, grid, k, n_pivots, sim_threshold, spatial_weight, radius,
            temporal_radius, eps, backend) -> torch.Tensor:
    # Decide the path before any kernel runs ('kernels' raises here if it cannot run).
    fused = (stages.use_triton(backend, tokens.device)
             and stages.use_compiled_mis(backend, tokens.device, tokens.shape[1]))
    scores = stages.debiased_scores(attn, prior, eps, backend=backend)
    if n_pivots == k:  # no supplements: plain top-k, no graph needed
        return torch.sort(stages.rank_order(scores, backend=backend)[:, :k], dim=1).values
    if fused:  # steps 2-7: rank + norms in one launch, then the lazy graph + MIS
        from .kernels import select  # imports Triton: only when the kernels run
        return select.select(tokens, scores, n_pivots, k, tuple(grid), sim_threshold,
                             spatial_weight, radius, temporal_radius)
    order = stages.rank_order(scores, backend=backend)
    adj = stages.similarity_graph(tokens, order, n_pivots, grid, sim_threshold=sim_threshold,
                                  spatial_weight=spatial_weight, radius=radius,
                                  temporal_radius=temporal_radius, backend=backend)
    return stages.greedy_mis(adj, order, n_pivots, k, backend=backend)


@torch.library.custom_op("d2pruner::prune", mutates_args=())
def _prune_op(tokens: torch.Tensor, attn: torch.Tensor, prior: Optional[torch.Tensor],
              grid: List[int], k: int, n_pivots: int, sim_threshold: float,
              spatial_weight: float, radius: int, temporal_radius: int, eps: float,
              backend: str) -> torch.Tensor:
    return _stages(tokens, attn, prior, grid, k, n_pivots, sim_threshold, spatial_weight,
                   radius, temporal_radius, eps, backend)


@_prune_op.register_fake
def _(tokens, attn, prior, grid, k, n_pivots, sim_threshold, spatial_weight, radius,
      temporal_radius, eps, backend):
    return tokens.new_empty((tokens.shape[0], k), dtype=torch.int64)
