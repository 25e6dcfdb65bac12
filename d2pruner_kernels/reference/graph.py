"""Step 4 (docs/spec.md): the hybrid (semantic + spatial) graph over the candidates, in rank order."""
from __future__ import annotations

import torch

from ..layout import pack_lower
from ..options import DEFAULTS, PruneOptions
from ..token_layout import TokenLayout, coords_table
from .numerics import matmul_fp32


def grid_coords(n: int, grid, temporal_radius: int, device=None):
    """(t, y, x) of every token of a row-major (T, H, W) grid, each int64 [N], and the
    temporal radius to compare t with. A TokenLayout: its coordinates, pieces apart along t
    (TokenLayout.coords)."""
    if isinstance(grid, TokenLayout):
        table, temporal_radius = coords_table(grid, temporal_radius)
        t, y, x = table.to(device=device, dtype=torch.int64).unbind(1)
        return t, y, x, temporal_radius
    _, h, w = grid
    i = torch.arange(n, device=device)
    return i // (h * w), (i // w) % h, i % w, temporal_radius


def similarity_edges(tokens: torch.Tensor, order: torch.Tensor, n_pivots: int,
                     grid, params: PruneOptions = DEFAULTS) -> torch.Tensor:
    """Dense bool [B, C, C] edges among the C = N - n_pivots candidates, rank order.
    grid: (T, H, W) or a TokenLayout.

    f_ij = (1 - beta) * cos_ij + beta * sp_ij; edge iff f_ij >= theta and i != j
    (fusion="binarized": binarized_edges).
    """
    b, n, _ = tokens.shape
    cand = order[:, n_pivots:]                                   # [B, C] token ids
    x = tokens.float()
    x_hat = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)
    xc = torch.gather(x_hat, 1, cand.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    cos = matmul_fp32(xc, xc.transpose(1, 2))                  # [B, C, C]
    *tyx, temporal_radius = grid_coords(n, grid, params.temporal_radius, tokens.device)
    t, y, xx = (c[cand] for c in tyx)
    near = lambda a, r: (a.unsqueeze(2) - a.unsqueeze(1)).abs() <= r  # noqa: E731
    sp = near(y, params.radius) & near(xx, params.radius) & near(t, temporal_radius)
    eye = torch.eye(cand.shape[1], dtype=torch.bool, device=tokens.device)
    if params.fusion == "binarized":
        return binarized_edges(cos, sp, params) & ~eye
    f = params.cos_weight * cos + params.spatial_weight * sp.float()
    return (f >= params.sim_threshold) & ~eye


def binarized_edges(cos: torch.Tensor, near: torch.Tensor, params: PruneOptions) -> torch.Tensor:
    """fusion="binarized": (1 - beta) [cos > theta] + beta [near] > 0.5, that is
    cos > theta (beta < 0.5), cos > theta and near (beta = 0.5), near (beta > 0.5)."""
    beta = params.spatial_weight
    if beta > 0.5:
        return near.clone()
    similar = cos > params.sim_threshold  # NaN: False
    return similar & near if beta == 0.5 else similar


def similarity_graph(tokens, order, n_pivots, grid, params: PruneOptions = DEFAULTS) -> torch.Tensor:
    """The same graph in the packed layout of `d2pruner_kernels.layout`."""
    return pack_lower(similarity_edges(tokens, order, n_pivots, grid, params))

