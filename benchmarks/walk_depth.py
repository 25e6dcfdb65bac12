"""Where the greedy walk settles: how many rows of the candidate graph the MIS reads before
its m-th member, on the benchmark inputs and on the demo scene (reference stages, any
device, no timing).

The lazy graph (`kernels/lazy_graph.py`, on graphs with more tiles than SMs) computes a prefix
of P rows first and the rest only for images whose walk has not settled within P. So the
depth says how much of the graph work (C^2 * D, a prefix costs P^2 * D) an input really
needs, and whether P is well chosen. It is a property of the data: the benchmark inputs
and a real model's features need not agree.

    python -m benchmarks.walk_depth [--quick] [--copies 2]
"""
from __future__ import annotations

import argparse
import statistics

from d2pruner_kernels import demo
from d2pruner_kernels.checks import pivot_count
from d2pruner_kernels.kernels.graph import default_config
from d2pruner_kernels.kernels.lazy_graph import prefix_rows
from d2pruner_kernels.reference import walk_depths

from .shapes import CPU_SHAPES, GPU_SHAPES, PIVOT_RATIO, make_inputs
from .tables import md_row


def report(name, c, m, ds, tokens) -> str:
    block = default_config(tokens.dtype, tokens.shape[-1])["BLOCK"]  # P's granule
    p = prefix_rows(c, m, block)
    settled = sum(x <= p for x in ds)
    return md_row([name, c, m, f"{min(ds)} / {statistics.median(ds):g} / {max(ds)}",
                   f"{statistics.median(ds) / max(m, 1):.1f}", p,
                   f"{settled}/{len(ds)}", f"{p * p / (c * c):.0%}"])


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="the small CPU shapes and the demo")
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
    _, _, tokens, attn, prior = demo.build_example(0)
    for reduction in demo.REDUCTIONS:
        k = demo.kept_count(reduction)
        n_p = pivot_count(PIVOT_RATIO, k)
        ds = walk_depths(tokens[None], attn[None], prior, demo.GRID, k, PIVOT_RATIO)
        print(report(f"demo scene, {reduction:.0%} pruned", demo.N - n_p, k - n_p, ds, tokens))


if __name__ == "__main__":
    main()
