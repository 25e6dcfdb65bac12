"""A ragged batch end to end: `prune_varlen` on a Qwen2-VL-like batch of 8 images of
different sizes, against a Python loop of `prune()` over the images and the peer-style
baselines (also looped), in the same run, with the floor. Runs where it is (CPU: the
windowed walk per image; CUDA: one launch per stage for the whole batch).

    python -m benchmarks.ragged [--repeats R] [--quick]

Inputs are built per image like benchmarks/shapes.py (clustered features, softmax
attention, a smooth prior on the image's grid), packed back to back. Grids run from 16x16
to 46x46 merged tokens (Qwen2-VL's 2x2 merge of 32..92 patches a side), D = 3584, 25 %
kept. The CPU floor is the windowed walk's GEMM work, visited x m x D multiply-adds summed
over the images, at the float32 rate of a torch.matmul measured in the same run.
"""
from __future__ import annotations

import argparse
import math
import os

import torch

from d2pruner_kernels import prune, prune_varlen
from d2pruner_kernels.checks import resolve_k
from d2pruner_kernels.timing import median_seconds

from . import baselines
from .cpu_walk import walk_stats
from .shapes import Shape, make_inputs

GRIDS = [(16, 16), (20, 24), (24, 24), (28, 30), (32, 32), (36, 40), (40, 44), (46, 46)]
QUICK_GRIDS = [(6, 6), (5, 9), (8, 8)]
RATIO = 0.25


def packed_batch(grids, d, device, dtype, seed=0):
    """Per-image inputs packed back to back: tokens [total, D], attn [H, total], prior
    [total], cu_seqlens int32 [B + 1], and the per-image views."""
    shapes = [Shape(f"img{i}", grid=g, d=d, k=RATIO, heads=28, gpu=dtype != torch.float32)
              for i, g in enumerate(grids)]
    images = [make_inputs(shape, device, seed + i) for i, shape in enumerate(shapes)]
    tokens = torch.cat([x.tokens[0] for x in images])
    attn = torch.cat([x.attn[0] for x in images], dim=-1)
    prior = torch.cat([x.prior for x in images])
    lengths = [math.prod(g) for g in grids]
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32)
    return tokens, attn, prior, cu, images, shapes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="three small images (CI smoke)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    grids, d = (QUICK_GRIDS, 64) if args.quick else (GRIDS, 3584)
    r = 2 if args.quick else args.repeats
    tokens, attn, prior, cu, images, shapes = packed_batch(grids, d, device, dtype)
    ks = [resolve_k(RATIO, math.prod(g)) for g in grids]

    def ours():
        return prune_varlen(tokens, attn, cu, grids, RATIO, prior=prior)

    def loop():
        return [prune(x.tokens[0], x.attn[0], g, RATIO, prior=x.prior)
                for x, g in zip(images, grids)]

    def naive():
        return [baselines.naive_d2pruner(x.tokens[0], x.attn[0], g, kb, prior=x.prior)
                for x, g, kb in zip(images, grids, ks)]

    def divprune():
        return [baselines.divprune(x.tokens[0], x.attn[0], kb) for x, kb in zip(images, ks)]

    keep, cu_keep = ours()
    want = loop()
    for b, w in enumerate(want):  # the contract, checked on the timed input
        assert torch.equal(keep[cu_keep[b]:cu_keep[b + 1]], w + int(cu[b])), b
    t_ours = median_seconds(ours, r, device=device)
    t_loop = median_seconds(loop, r, device=device)
    slow = 1 if args.quick else 3
    t_naive = median_seconds(naive, slow, device=device)
    t_div = median_seconds(divprune, slow, device=device)

    floor = ""
    if device.type == "cpu":
        visited = macs = 0
        for x, shape in zip(images, shapes):
            depth = walk_stats(shape, x)["depth"][0]
            visited += depth
            macs += depth * (shape.k_int - shape.n_pivots) * d
        a, b = torch.randn(max(visited, 1024), d), torch.randn(d, 64)
        rate = 2 * a.shape[0] * 64 * d / median_seconds(lambda: a @ b, 10)
        floor = f"{2 * macs / rate * 1e3:.3f} ms ({visited} candidates visited, GEMM {rate / 1e9:.0f} GFLOP/s)"

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    total = int(cu[-1])
    print(f"{where}, torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}; "
          f"python -m benchmarks.ragged{' --quick' if args.quick else ''}")
    print(f"batch: {len(grids)} images, grids {grids[0]} .. {grids[-1]}, {total} tokens, "
          f"D={d}, {str(dtype).replace('torch.', '')}, k = {RATIO:.0%} per image ({sum(ks)} kept)\n")
    print("| variant | median | ours faster by |")
    print("|---|---|---|")
    for name, t in (("prune_varlen (ours)", t_ours), ("a Python loop of prune()", t_loop),
                    ("naive D2Pruner, looped", t_naive), ("DivPrune-style, looped", t_div)):
        print(f"| {name} | {t * 1e3:.2f} ms | {t / t_ours:.1f}x |")
    if floor:
        print(f"\nfloor: {floor}")


if __name__ == "__main__":
    main()
