"""Where the greedy walk settles: how many rows of the candidate graph the MIS reads before
its m-th member, on the benchmark inputs and on a look-alike scene (reference stages, any
device, no timing).

The lazy graph (`kernels/lazy_graph.py`, on graphs with more tiles than SMs) computes a prefix
of P rows first and the rest only for images whose walk has not settled within P. So the
depth says how much of the graph work (C^2 * D, a prefix costs P^2 * D) an input really
needs, and whether P is well chosen. It is a property of the data: the benchmark inputs
(random clusters: few look-alikes among the best-ranked tokens) are easy, the look-alike
scene (grid rows of near-copies, as a photo's sky and grass) is hard, and a real model's
features need not agree with either.

    python -m benchmarks.walk_depth [--quick] [--copies 2]
"""
from __future__ import annotations

import argparse
import statistics

import torch

from d2pruner_kernels.checks import pivot_count, resolve_k
from d2pruner_kernels.kernels.graph import default_config
from d2pruner_kernels.kernels.lazy_graph import prefix_rows
from d2pruner_kernels.reference import walk_depths

from .shapes import CPU_SHAPES, GPU_SHAPES, PIVOT_RATIO, make_inputs
from .tables import md_row


SCENE_GRID, SCENE_D, SCENE_HEADS = (24, 24), 256, 8   # LLaVA-1.5's patch grid
REDUCTIONS = (0.75, 0.90)                               # share of the tokens pruned


def lookalike_scene(seed: int):
    """tokens [1, N, D], attention [1, H, N], prior [N] of a hard input for the lazy graph: a
    24x24 grid whose every row is a band of near-copies (each row's feature drifts from the
    row above: cosine ~0.9 to the next row, less further on), with one patch in eight an
    object of one of 8 kinds; the attention favours the objects under a LLaVA-like bias
    towards the bottom rows, and the prior is that bias."""
    g = torch.Generator().manual_seed(seed)
    (h, w), d = SCENE_GRID, SCENE_D
    n = h * w
    e = torch.randn(h, d, generator=g)
    rows = [e[0]]
    for r in range(1, h):
        rows.append(0.9 * rows[-1] + (1 - 0.9 ** 2) ** 0.5 * e[r])
    tokens = torch.stack(rows).repeat_interleave(w, 0)
    objects = torch.randperm(n, generator=g)[: n // 8]
    tokens[objects] = torch.randn(8, d, generator=g)[torch.arange(len(objects)) % 8]
    tokens = tokens + 0.15 * torch.randn(n, d, generator=g)
    salient = torch.full((n,), 0.12)
    salient[objects] = 1.0
    bias = torch.exp(3.5 * torch.linspace(0, 1, n))
    attn = salient * bias * torch.exp(0.35 * torch.randn(SCENE_HEADS, n, generator=g))
    return tokens[None], attn[None], bias / bias.mean()


def report(name, c, m, ds, tokens) -> str:
    block = default_config(tokens.dtype, tokens.shape[-1])["BLOCK"]  # P's granule
    p = prefix_rows(c, m, block)
    settled = sum(x <= p for x in ds)
    return md_row([name, c, m, f"{min(ds)} / {statistics.median(ds):g} / {max(ds)}",
                   f"{statistics.median(ds) / max(m, 1):.1f}", p,
                   f"{settled}/{len(ds)}", f"{p * p / (c * c):.0%}"])


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="the small CPU shapes and the scene")
    ap.add_argument("--copies", type=int, default=2, help="input seeds per shape")
    args = ap.parse_args(argv)
    print(md_row(["input", "C", "m", "depth min / median / max", "median / m",
                  "first range P (if lazy)", "settled in P", "prefix work P² / C²"]))
    print(md_row(["---"] * 8))
    for shape in CPU_SHAPES if args.quick else GPU_SHAPES:
        ds = []
        for seed in range(args.copies):
            x = make_inputs(shape, "cpu", seed)
            ds += walk_depths(x.tokens, x.attn, x.prior, shape.grid, shape.k_int, PIVOT_RATIO)
        print(report(shape.name, shape.candidates, shape.k_int - shape.n_pivots, ds, x.tokens),
              flush=True)
    n = SCENE_GRID[0] * SCENE_GRID[1]
    for reduction in REDUCTIONS:
        k = resolve_k(1.0 - reduction, n)
        n_p = pivot_count(PIVOT_RATIO, k)
        ds = []
        for seed in range(args.copies):
            tokens, attn, prior = lookalike_scene(seed)
            ds += walk_depths(tokens, attn, prior, SCENE_GRID, k, PIVOT_RATIO)
        print(report(f"look-alike scene, {reduction:.0%} pruned", n - n_p, k - n_p, ds, tokens))


if __name__ == "__main__":
    main()
