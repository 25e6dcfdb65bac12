"""The shapes users have, the small CPU stand-ins, and the input builders of the benchmarks.

GPU shapes are bf16 at the models' real sizes; CPU shapes are small fp32 ones so that a smoke
run under the Triton interpreter takes seconds. Inputs are random, never zeros: clustered
features whose per-token noise spreads the cosines across the threshold (so the graph is
neither empty nor a union of cliques), attention with distinct head-means, and a smooth
positive positional prior.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from d2pruner_kernels.checks import pivot_count, resolve_k
from d2pruner_kernels.token_layout import TokenLayout

PIVOT_RATIO = 0.7  # prune()'s default; the benchmarks keep every default but the shape's


@dataclass(frozen=True)
class Shape:
    name: str
    grid: tuple            # (H, W) or (T, H, W)
    d: int                 # feature size of the LLM layer where pruning happens
    k: int | float         # tokens kept, or a ratio of N
    heads: int = 32        # attention heads averaged into the score
    batch: int = 1
    temporal_radius: int = 1
    gpu: bool = True       # real (bf16) shape; False: small fp32 CPU smoke shape

    @property
    def n(self) -> int:
        return math.prod(self.grid)

    @property
    def k_int(self) -> int:
        return resolve_k(self.k, self.n)

    @property
    def n_pivots(self) -> int:
        return pivot_count(PIVOT_RATIO, self.k_int)

    @property
    def candidates(self) -> int:
        return self.n - self.n_pivots

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.gpu else torch.float32

    def describe(self) -> str:
        k = f"{self.k_int} ({self.k:.0%})" if isinstance(self.k, float) else str(self.k)
        return (f"N={self.n} grid={'x'.join(map(str, self.grid))} D={self.d} k={k} "
                f"B={self.batch} {str(self.dtype).replace('torch.', '')}")


LLAVA15 = dict(grid=(24, 24), d=4096, heads=32)
QWEN25VL = dict(d=3584, heads=28)

GPU_SHAPES = [
    Shape("llava15-k64", k=64, **LLAVA15),
    Shape("llava15-k128", k=128, **LLAVA15),
    Shape("llava15-k192", k=192, **LLAVA15),
    Shape("llava15-k128-b8", k=128, batch=8, **LLAVA15),
    Shape("llava15-k128-b32", k=128, batch=32, **LLAVA15),
    Shape("llavanext-k320", grid=(48, 60), d=4096, heads=32, k=320),
    # 13 tiles of 16x16, as 13 "frames" that are not neighbours of each other.
    Shape("internvl25-13tiles", grid=(13, 16, 16), d=4096, heads=32, k=0.1, temporal_radius=0),
    Shape("qwen25vl-64x64", grid=(64, 64), k=0.1, **QWEN25VL),
    Shape("video-16x14x14", grid=(16, 14, 14), k=0.1, **QWEN25VL),
    Shape("video-32x16x16", grid=(32, 16, 16), k=0.1, **QWEN25VL),
]

CPU_SHAPES = [
    Shape("cpu-8x8", grid=(8, 8), d=64, heads=4, k=16, gpu=False),
    Shape("cpu-12x12", grid=(12, 12), d=128, heads=4, k=32, gpu=False),
    Shape("cpu-video-4x6x6", grid=(4, 6, 6), d=64, heads=4, k=0.1, gpu=False),
    Shape("cpu-12x12-b4", grid=(12, 12), d=128, heads=4, k=32, batch=4, gpu=False),
]

ALL_SHAPES = GPU_SHAPES + CPU_SHAPES

# Images pruned as TokenLayouts (issue 23, docs/spec.md §13): name -> (the Shape its inputs
# are built from, a raster stand-in of the same N, D and k; the layout its tokens sit in).
# Pruned with spatial_weight=0.5 (at beta = 0 a layout changes no edge).
LAYOUT_SHAPES = {
    # InternVL 2.5 / 3: 12 tiles of 16x16 (3 x 4) + the thumbnail, N = 3328
    "internvl-13tiles-layout": (
        Shape("internvl-13tiles-layout", grid=(13, 16, 16), d=4096, heads=32, k=0.1),
        TokenLayout.tiles(3, 4) + TokenLayout.grid(16, 16)),
    # LLaVA-NeXT anyres (672 x 672: 2 x 2 patches): 24x24 base + 48x48 map with its newline
    # column, N = 576 + 48 x 49 = 2928
    "llavanext-anyres-layout": (
        Shape("llavanext-anyres-layout", grid=(61, 48), d=4096, heads=32, k=0.1),
        TokenLayout.grid(24, 24) + TokenLayout.grid(48, 48 + 1)),
    "cpu-tiles-2x2-thumb-layout": (
        Shape("cpu-tiles-2x2-thumb-layout", grid=(5, 6, 6), d=64, heads=4, k=0.1, gpu=False),
        TokenLayout.tiles(2, 2, (6, 6)) + TokenLayout.grid(6, 6)),
    "cpu-anyres-layout": (
        Shape("cpu-anyres-layout", grid=(9, 12), d=64, heads=4, k=0.1, gpu=False),
        TokenLayout.grid(6, 6) + TokenLayout.grid(8, 8 + 1)),
}
LAYOUT_OPTIONS = dict(spatial_weight=0.5)


@dataclass
class Inputs:
    tokens: torch.Tensor   # [B, N, D]
    attn: torch.Tensor     # [B, H, N]
    prior: torch.Tensor    # [N], positive


def clustered_tokens(b, n, d, *, dtype, device, generator, clusters=None, noise=None):
    """Cluster centre + per-token noise of std in [0.2, 0.9]: cosines inside a cluster spread
    over ~[0.55, 0.96], so the 0.8 threshold cuts clusters into partial cliques. A fixed
    `noise` std instead puts every cosine inside a cluster near 1 / (1 + noise^2)."""
    clusters = clusters or max(8, n // 16)
    g = generator
    centres = torch.randn(b, clusters, d, generator=g, device=device)
    assign = torch.randint(0, clusters, (b, n), generator=g, device=device)
    x = torch.gather(centres, 1, assign.unsqueeze(-1).expand(-1, -1, d))
    sigma = (0.2 + 0.7 * torch.rand(b, n, 1, generator=g, device=device) if noise is None
             else torch.full((b, n, 1), noise, device=device))
    return (x + sigma * torch.randn(b, n, d, generator=g, device=device)).to(dtype)


def attention(b, h, n, *, dtype, device, generator):
    """Softmax-like rows [B, H, N]: positive, summing to ~1, head-means without ties."""
    logits = 2.0 * torch.randn(b, h, n, generator=generator, device=device)
    return torch.softmax(logits, dim=-1).to(dtype)


def positional_prior(grid, *, device):
    """A smooth positive prior favouring the bottom rows (LLaVA's bias), [N] float32."""
    h, w = grid[-2:]
    rows = torch.arange(h, device=device, dtype=torch.float32).repeat_interleave(w)
    prior = 1.0 + rows / h
    return (prior / prior.sum()).repeat(math.prod(grid[:-2]))


def make_inputs(shape: Shape, device, seed: int = 0) -> Inputs:
    g = torch.Generator(device=device).manual_seed(seed)
    kw = dict(dtype=shape.dtype, device=device, generator=g)
    return Inputs(tokens=clustered_tokens(shape.batch, shape.n, shape.d, **kw),
                  attn=attention(shape.batch, shape.heads, shape.n, **kw),
                  prior=positional_prior(shape.grid, device=device))


def input_copies(shape: Shape, device, copies: int = 4) -> list[Inputs]:
    """A few independent inputs to rotate among, so no timing is a cache-only number."""
    return [make_inputs(shape, device, seed) for seed in range(copies)]
