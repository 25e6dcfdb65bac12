"""Tools for testing a backend against the contract (docs/spec.md, numerics and parity):
random inputs (clustered features with plenty of pairs on both sides of the similarity
threshold, attention with distinct scores), the float64 fused similarity, and the parity
band within which two correct backends may disagree on an edge. The package's tests and
benchmarks use them; so can anyone checking their own implementation."""
from __future__ import annotations

import torch

from . import layout, reference
from .checks import grid_or_layout


def clustered_tokens(b: int, n: int, d: int, *, clusters: int = 6, noise: float = 0.35,
                     dtype=torch.float32, device="cpu", generator=None) -> torch.Tensor:
    """Features = one of `clusters` random centres + Gaussian noise: cosines spread over
    [-0.3, 1], so the default threshold 0.8 cuts through real pairs."""
    g = generator
    centres = torch.randn(b, clusters, d, generator=g)
    assign = torch.randint(0, clusters, (b, n), generator=g)
    x = torch.gather(centres, 1, assign.unsqueeze(-1).expand(-1, -1, d))
    x = x + noise * torch.randn(b, n, d, generator=g)
    return x.to(dtype=dtype, device=device)


def distinct_attention(b: int, h: int, n: int, *, dtype=torch.float32, device="cpu",
                       generator=None) -> torch.Tensor:
    """[B, H, N] attention whose head-mean has no near-ties (a random permutation of a grid
    of well separated values, plus small noise on every head that sums to zero over the
    heads: the mean is unchanged up to rounding, and every head differs from the others)."""
    base = torch.stack([torch.randperm(n, generator=generator) for _ in range(b)]).float()
    base = (base + 1.0) / n  # distinct, gap 1/N
    noise = 0.25 / n * torch.rand(b, h, n, generator=generator)
    heads = base.unsqueeze(1) + noise - noise.mean(1, keepdim=True)
    return heads.to(dtype=dtype, device=device)


def fused_similarity64(tokens, order, n_pivots, grid, beta, radius=2, temporal_radius=1):
    """f_ij of step 4 in float64 over the candidates, [B, C, C]."""
    x = tokens.double()
    xh = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)
    cand = order[:, n_pivots:]
    xc = torch.gather(xh, 1, cand.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    cos = xc @ xc.transpose(1, 2)
    *tyx, temporal_radius = reference.grid_coords(tokens.shape[1], grid, temporal_radius,
                                                  tokens.device)
    t, y, xx = (c[cand] for c in tyx)
    near = lambda a, r: (a.unsqueeze(2) - a.unsqueeze(1)).abs() <= r  # noqa: E731
    sp = (near(y, radius) & near(xx, radius) & near(t, temporal_radius)).double()
    return (1 - beta) * cos + beta * sp


def in_band(tokens, order, n_pivots, grid, theta, beta, radius=2, temporal_radius=1, band=1e-5):
    """bool [B, C, C]: candidate pairs with |f_ij - theta| <= band, where two correct
    backends may disagree on the edge (docs/spec.md: numerics and parity)."""
    f = fused_similarity64(tokens, order, n_pivots, grid, beta, radius, temporal_radius)
    return (f - theta).abs() <= band


def band_free(draw, n_pivots, grid, beta=0.0, radius=2, temporal_radius=1, theta=0.8,
              tries=50):
    """The first draw(i) -> (tokens [B, N, D], attn, prior or None) of `tries` whose
    candidates (in the reference's rank order) have no pair within 1e-5 of theta: the
    inputs every backend must agree on exactly (docs/spec.md: numerics and parity)."""
    for i in range(tries):
        tokens, attn, prior = draw(i)
        order = reference.rank_order(reference.debiased_scores(attn, prior))
        if band_margin(tokens, order, n_pivots, grid_or_layout("grid", grid), theta, beta, radius,
                       temporal_radius) > 1e-5:
            return tokens, attn, prior
    raise AssertionError(f"no input outside the parity band in {tries} draws")


def assert_edges_match(got, want, c, band):
    """Two packed graphs of C candidates hold the same edges outside the parity band;
    returns got's edges, bool [B, C, C]."""
    e_got = layout.unpack_lower(got, c)
    differ = (e_got != layout.unpack_lower(want, c)) & ~band
    assert not differ.any(), f"{int(differ.sum())} edges differ outside the band"
    return e_got


def band_margin(tokens, order, n_pivots, grid, theta, beta, radius=2, temporal_radius=1):
    """Smallest |f_ij - theta| over candidate pairs i != j (float64)."""
    f = fused_similarity64(tokens, order, n_pivots, grid, beta, radius, temporal_radius)
    c = f.shape[1]
    off = ~torch.eye(c, dtype=torch.bool, device=f.device)
    gap = (f - theta).abs()[:, off]
    return gap.min().item() if gap.numel() else float("inf")


def random_graph(b: int, c: int, density: float, n_pivots: int, generator=None):
    """A random MIS input: packed adjacency int32 [B, C, words] of a symmetric graph with
    edge probability `density` over C candidates, and a random rank order int64 [B, C + n_p]."""
    e = torch.rand(b, c, c, generator=generator) < density
    e = (e | e.transpose(1, 2)) & ~torch.eye(c, dtype=torch.bool)
    order = torch.stack([torch.randperm(c + n_pivots, generator=generator) for _ in range(b)])
    return layout.pack_lower(e), order
