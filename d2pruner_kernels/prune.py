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
from .checks import as_3d, check_prune_inputs, grid_str, pivot_count, resolve_k
from .options import PruneOptions, of, takes_options
from .prior import PositionalPrior
from .token_layout import TokenLayout, layout_prior


@takes_options()
def prune(tokens: torch.Tensor, attn: torch.Tensor, grid_hw, k, *,
          options: PruneOptions | None = None, **kwargs) -> torch.Tensor:
    """Indices of the visual tokens D2Pruner keeps, int64, ascending (docs/spec.md).

    tokens: [B, N, D] or [N, D] features (fp16 / bf16 / fp32).
    attn:   [B, N] or [B, H, N] (or unbatched [N] / [H, N]) importance; heads are averaged.
            A row of a full attention map is a view: attn_full[:, :, row, start:end].
    grid_hw: (H, W) or (T, H, W), product N, or a TokenLayout of N tokens (tiles,
            thumbnails, anyres pieces: token_layout.py).  k: int in [1, N] or ratio in (0, 1].
    options: a PruneOptions, and/or its fields as keywords (prior, pivot_ratio,
            sim_threshold, spatial_weight, radius, temporal_radius, eps, check_finite,
            backend, fusion; options.py has their defaults and meaning). The keywords win.
    prior:  [N] or [B, N] positive positional prior (or a PositionalPrior), None = no debiasing.
    Returns [B, k] (or [k]) on the input's device.
    """
    opts = of(options, kwargs)
    if opts.check_finite and torch.compiler.is_compiling():
        raise ValueError("check_finite=True reads values (a device sync): not supported under "
                         "torch.compile; check the inputs outside the compiled region")
    prior = opts.prior
    prior_obj = prior if isinstance(prior, PositionalPrior) else None
    batched, n, grid = check_prune_inputs(tokens, attn, grid_hw,
                                          None if prior_obj is not None else prior,
                                          opts.check_finite)
    if prior_obj is not None and isinstance(grid, TokenLayout):  # spread over its pieces
        prior = layout_prior(prior_obj, grid, tokens.device)
    elif prior_obj is not None:  # calibrated for this grid; one device copy, cached
        if as_3d(prior_obj.grid) != grid:
            raise ValueError(f"prior is calibrated for grid {tuple(prior_obj.grid)}, "
                             f"got grid_hw {grid_str(grid_hw)}")
        prior = prior_obj._device_tensor(device=tokens.device)  # cached, never handed out
    k = resolve_k(k, n)
    if not batched:
        tokens, attn = tokens.unsqueeze(0), attn.unsqueeze(0)
    n_pivots = pivot_count(opts.pivot_ratio, k)
    if torch.compiler.is_compiling():
        if isinstance(grid, TokenLayout):
            raise ValueError("a TokenLayout grid is not supported under torch.compile yet: "
                             "compile around prune() or pass a (T, H, W) grid")
        out = _prune_op(tokens, attn, prior, list(grid), k, n_pivots, opts.sim_threshold,
                        opts.spatial_weight, opts.radius, opts.temporal_radius, opts.eps,
                        opts.backend, opts.fusion)
    else:
        out = dispatch.select(tokens, attn, prior, grid, k, n_pivots, opts)
    return out if batched else out[0]


# The custom op's schema takes scalars: the options cross it as their fields (prior apart).
@torch.library.custom_op("d2pruner::prune", mutates_args=())
def _prune_op(tokens: torch.Tensor, attn: torch.Tensor, prior: Optional[torch.Tensor],
              grid: List[int], k: int, n_pivots: int, sim_threshold: float,
              spatial_weight: float, radius: int, temporal_radius: int, eps: float,
              backend: str, fusion: str) -> torch.Tensor:
    opts = PruneOptions(sim_threshold=sim_threshold, spatial_weight=spatial_weight,
                        radius=radius, temporal_radius=temporal_radius, eps=eps, backend=backend,
                        fusion=fusion)
    return dispatch.select(tokens, attn, prior, tuple(grid), k, n_pivots, opts)


@_prune_op.register_fake
def _(tokens, attn, prior, grid, k, n_pivots, sim_threshold, spatial_weight, radius,
      temporal_radius, eps, backend, fusion):
    return tokens.new_empty((tokens.shape[0], k), dtype=torch.int64)
