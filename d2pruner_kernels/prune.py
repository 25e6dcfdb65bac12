"""prune(): the public entry point. Validates (metadata only), then hands the work to
`dispatch.select`, which decides what runs where.

On CUDA the whole call is free of host synchronisation: scores, then rank + norms, the
lazy graph and the MIS of `kernels/lazy_graph.py`, all on the current stream, output shape
fixed by `k` (unless the compiled MIS cannot run: an extension built without CUDA, or
N > its limit; then the reference MIS reads the graph on the host). It is also a
`torch.library` custom op (`torch.ops.d2pruner.prune`) with a fake implementation, so
`torch.compile(fullgraph=True)` traces through it and CUDA graphs capture it.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from . import dispatch
from .checks import (as_3d, check_backend, check_bool, check_float, check_prune_inputs,
                     pivot_count, resolve_k)
from .params import DEFAULTS, GraphParams
from .prior import PositionalPrior


def prune(tokens: torch.Tensor, attn: torch.Tensor, grid_hw, k, *,
          prior: torch.Tensor | None = None, pivot_ratio: float = 0.7,
          sim_threshold: float = DEFAULTS.sim_threshold,
          spatial_weight: float = DEFAULTS.spatial_weight, radius: int = DEFAULTS.radius,
          temporal_radius: int = DEFAULTS.temporal_radius, eps: float = 1e-7,
          check_finite: bool = False, backend: str = "auto") -> torch.Tensor:
    """Indices of the visual tokens D2Pruner keeps, int64, ascending (docs/spec.md).

    tokens: [B, N, D] or [N, D] features (fp16 / bf16 / fp32).
    attn:   [B, N] or [B, H, N] (or unbatched [N] / [H, N]) importance; heads are averaged.
            A row of a full attention map is a view: attn_full[:, :, row, start:end].
    grid_hw: (H, W) or (T, H, W), product N.  k: int in [1, N] or ratio in (0, 1].
    prior:  [N] or [B, N] positive positional prior (or a PositionalPrior), None = no debiasing.
    Returns [B, k] (or [k]) on the input's device.
    """
    check_backend(backend)
    check_finite = check_bool("check_finite", check_finite)
    if check_finite and torch.compiler.is_compiling():
        raise ValueError("check_finite=True reads values (a device sync): not supported under "
                         "torch.compile; check the inputs outside the compiled region")
    prior_obj = prior if isinstance(prior, PositionalPrior) else None
    pivot_ratio = check_float("pivot_ratio", pivot_ratio, 0.0, 1.0)
    params = GraphParams(sim_threshold, spatial_weight, radius, temporal_radius)
    eps = check_float("eps", eps, 0.0, float("inf"))
    batched, n, grid = check_prune_inputs(tokens, attn, grid_hw,
                                          None if prior_obj is not None else prior, check_finite)
    if prior_obj is not None:  # calibrated for this grid; one device copy, cached
        if as_3d(prior_obj.grid) != grid:
            raise ValueError(f"prior is calibrated for grid {tuple(prior_obj.grid)}, "
                             f"got grid_hw {tuple(grid_hw)}")
        prior = prior_obj._device_tensor(device=tokens.device)  # cached, never handed out
    k = resolve_k(k, n)
    if not batched:
        tokens, attn = tokens.unsqueeze(0), attn.unsqueeze(0)
    n_pivots = pivot_count(pivot_ratio, k)
    if torch.compiler.is_compiling():
        out = _prune_op(tokens, attn, prior, list(grid), k, n_pivots, params.sim_threshold,
                        params.spatial_weight, params.radius, params.temporal_radius, eps,
                        backend)
    else:
        out = dispatch.select(tokens, attn, prior, grid, k, n_pivots, params, eps, backend)
    return out if batched else out[0]


@torch.library.custom_op("d2pruner::prune", mutates_args=())
def _prune_op(tokens: torch.Tensor, attn: torch.Tensor, prior: Optional[torch.Tensor],
              grid: List[int], k: int, n_pivots: int, sim_threshold: float,
              spatial_weight: float, radius: int, temporal_radius: int, eps: float,
              backend: str) -> torch.Tensor:
    params = GraphParams(sim_threshold, spatial_weight, radius, temporal_radius)
    return dispatch.select(tokens, attn, prior, tuple(grid), k, n_pivots, params, eps, backend)


@_prune_op.register_fake
def _(tokens, attn, prior, grid, k, n_pivots, sim_threshold, spatial_weight, radius,
      temporal_radius, eps, backend):
    return tokens.new_empty((tokens.shape[0], k), dtype=torch.int64)
