"""The CPU path (`prune(backend="auto")` on a CPU: the graph-free windowed walk of
kernels/cpu_walk.py) end to end on this CPU, against the dense CPU path it replaced (the
whole candidate graph in torch, then the C++ walk) and the naive baselines, with the floor.

    python -m benchmarks.cpu_walk [--repeats R] [--quick] [--layouts]

"ours" is `prune(..., backend="auto")` on float32 inputs built like benchmarks/shapes.py
(clustered features, softmax attention, a smooth prior; four input copies rotated), held to
prune(backend="reference") on each row. Each time of ours is the lowest of three medians
of R runs (`timing.median_seconds`); the slow variants: one median of 3 runs. The floor of
a row is the walk's GEMM work, visited x m x D multiply-adds (visited: candidates the exact
walk visits, summed over the images), at the float32 rate of a torch.matmul [V, D] x [D, m]
measured in the same run. Overhead: prune() at N = 576 with D = 16, where compute is nil.
The 2 cores may be shared: other work inflates every time (the load average is printed).

Layout rows (`LAYOUTS`: an InternVL image of 3 x 4 tiles + thumbnail, a LLaVA-NeXT anyres
image, base 24 x 24 + a 48 x 48 map with its newline column) prune a TokenLayout with
spatial_weight=0.5 (with beta = 0 the layout changes no edge); their inputs are those of a
raster shape of the same N (the `Shape` row), and the naive baseline, which takes (T, H, W)
grids only, is not run on them. --layouts: those rows only.
"""
from __future__ import annotations

import argparse
import os

import torch

from d2pruner_kernels import TokenLayout, debiased_scores, prune, rank_order, reference
from d2pruner_kernels.checks import as_3d
from d2pruner_kernels.kernels import cpu_walk
from d2pruner_kernels.kernels import mis as mis_kernel
from d2pruner_kernels.options import PruneOptions
from d2pruner_kernels.timing import median_seconds

from . import baselines
from .shapes import Shape, input_copies


def median_ms(fn, inputs, repeats):
    """Median time of fn(input) over `repeats` calls (inputs rotated), after a warm-up."""
    return 1e3 * median_seconds([lambda i=i: fn(i) for i in inputs], repeats)


def robust_ms(fn, inputs, repeats, blocks=3):
    """The lowest of `blocks` medians of `repeats` runs: a burst of other work on the shared
    cores spoils a block, not the number."""
    return min(median_ms(fn, inputs, repeats) for _ in range(blocks))


# Rows pruned as a TokenLayout: shape name -> (layout of shape.n tokens, its options).
LAYOUTS = {
    "internvl 3x4 tiles + thumbnail": (TokenLayout.tiles(3, 4, (16, 16))
                                       + TokenLayout.grid(16, 16), dict(spatial_weight=0.5)),
    "llavanext anyres 24x24 + 48x(48+1)": (TokenLayout.grid(24, 24) + TokenLayout.grid(48, 49),
                                            dict(spatial_weight=0.5)),
    "small tiles 2x2 + thumbnail": (TokenLayout.tiles(2, 2, (6, 6)) + TokenLayout.grid(6, 6),
                                    dict(spatial_weight=0.5)),
}


def grid_of(shape: Shape):
    """What prune() takes for this row: its TokenLayout, or its (T, H, W) grid."""
    return LAYOUTS[shape.name][0] if shape.name in LAYOUTS else as_3d(shape.grid)


def options_of(shape: Shape) -> PruneOptions:
    extra = LAYOUTS[shape.name][1] if shape.name in LAYOUTS else {}
    return PruneOptions(temporal_radius=shape.temporal_radius, **extra)


def describe(shape: Shape) -> str:
    if shape.name not in LAYOUTS:
        return shape.describe()
    layout, extra = LAYOUTS[shape.name]
    raster = "x".join(map(str, shape.grid))
    return shape.describe().replace(f"grid={raster}", f"layout={layout.describe()} " + " ".join(
        f"{k}={v}" for k, v in extra.items()))


def ours(shape: Shape):
    grid, opts = grid_of(shape), options_of(shape)
    return lambda i: prune(i.tokens, i.attn, grid, shape.k_int, prior=i.prior, options=opts)


def walk_stats(shape: Shape, i) -> dict:
    """The walk's counters (visited per image, windows) on one input."""
    stats = {}
    order = rank_order(debiased_scores(i.attn, i.prior))
    cpu_walk.greedy_mis_without_graph(i.tokens, order, shape.n_pivots, shape.k_int,
                                      grid_of(shape), options_of(shape), stats=stats)
    return stats


def dense(shape: Shape):
    """The CPU path before the walk: the whole candidate graph in torch, the compiled MIS."""
    grid, k, n_p = grid_of(shape), shape.k_int, shape.n_pivots
    params = options_of(shape)

    def call(i):
        order = rank_order(debiased_scores(i.attn, i.prior))
        return mis_kernel.greedy_mis(reference.similarity_graph(i.tokens, order, n_p, grid, params),
                                     order, n_p, k)
    return call


def singles(shape: Shape):
    one = ours(shape)
    return lambda i: [one(type(i)(i.tokens[b:b + 1], i.attn[b:b + 1], i.prior))
                      for b in range(i.tokens.shape[0])]


def naive(shape: Shape):
    return lambda i: baselines.run_batched(
        baselines.naive_d2pruner, i.tokens, i.attn, shape.grid, shape.k_int, prior=i.prior,
        temporal_radius=shape.temporal_radius)


def divprune(shape: Shape):
    return lambda i: baselines.run_batched(baselines.divprune, i.tokens, i.attn, shape.k_int)


def floor_ms(visited: list[int], m: int, d: int, repeats: int) -> tuple[float, float]:
    """(floor in ms, GFLOP/s): 2 * sum(visited) * m * D FLOPs at the rate of a float32
    torch.matmul [V, D] x [D, m], V = max(sum(visited), 1024) rows (large enough that the
    rate is the GEMM's, not one call's overhead)."""
    rows = max(sum(visited), 1024)
    a, b = torch.randn(rows, d), torch.randn(d, m)
    t = robust_ms(lambda _: torch.matmul(a, b), [None], max(repeats, 20))
    gflops = 2 * rows * m * d / t / 1e6
    return 2 * sum(visited) * m * d / gflops / 1e6, gflops


ROWS = [
    Shape("llavanext 48x60", grid=(48, 60), d=1024, k=320, gpu=False),
    Shape("video 32x16x16", grid=(32, 16, 16), d=1024, k=820, gpu=False),
    Shape("llava 24x24", grid=(24, 24), d=4096, k=64, gpu=False),
    Shape("llava 24x24 B=8", grid=(24, 24), d=4096, k=128, batch=8, gpu=False),
]


QUICK_ROWS = [Shape("small 12x12", grid=(12, 12), d=64, k=36, gpu=False),
              Shape("small 12x12 B=3", grid=(12, 12), d=64, k=36, batch=3, gpu=False),
              Shape("small tiles 2x2 + thumbnail", grid=(5, 6, 6), d=64, k=36, gpu=False)]

# N = 13 x 256 = 3328 (InternVL: 16 x 16 tokens per tile) and 576 + 48 x 49 = 2928.
LAYOUT_ROWS = [Shape("internvl 3x4 tiles + thumbnail", grid=(13, 16, 16), d=1024, k=0.1,
                     gpu=False),
               Shape("llavanext anyres 24x24 + 48x(48+1)", grid=(48, 61), d=1024, k=320,
                     gpu=False)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="small shapes, a few runs (CI smoke)")
    ap.add_argument("--layouts", action="store_true", help="the TokenLayout rows only")
    args = ap.parse_args(argv)
    r, slow = (3, 1) if args.quick else (args.repeats, 3)
    print(f"CPU ({os.cpu_count()} cores), {torch.get_num_threads()} torch threads, torch "
          f"{torch.__version__}, load average {os.getloadavg()[0]:.2f} at start; "
          f"python -m benchmarks.cpu_walk{' --quick' if args.quick else ''}"
          f"{' --layouts' if args.layouts else ''}\n")
    head = ("| shape | ours: prune() ms | dense graph + C++ walk ms | x | naive D2Pruner ms | x "
            "| DivPrune ms | x | floor ms | ours / floor | visited | windows |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    notes = []
    rows = QUICK_ROWS if args.quick else LAYOUT_ROWS if args.layouts else ROWS + LAYOUT_ROWS
    for shape in rows:
        inputs = input_copies(shape, "cpu")
        got = ours(shape)(inputs[0])
        want = prune(inputs[0].tokens, inputs[0].attn, grid_of(shape), shape.k_int,
                     prior=inputs[0].prior, options=options_of(shape), backend="reference")
        assert torch.equal(got, want), f"{shape.name}: differs from the reference"
        stats = walk_stats(shape, inputs[0])
        m = shape.k_int - shape.n_pivots
        t_ours = robust_ms(ours(shape), inputs, r)
        t_dense = median_ms(dense(shape), inputs, slow)
        if shape.name in LAYOUTS:  # the naive baseline takes (T, H, W) grids only
            naive_cells = "n/a | n/a"
        else:
            t_naive = median_ms(naive(shape), inputs, slow)
            naive_cells = f"{t_naive:.1f} | {t_naive / t_ours:.0f}"
        t_div = median_ms(divprune(shape), inputs, slow)
        fl, gflops = floor_ms(stats["depth"], m, shape.d, r)
        print(f"| {describe(shape)} | {t_ours:.2f} | {t_dense:.1f} | {t_dense / t_ours:.0f} "
              f"| {naive_cells} | {t_div:.1f} | {t_div / t_ours:.0f} "
              f"| {fl:.3f} | {t_ours / fl:.1f} | {sum(stats['depth'])} (m={m}) "
              f"| {stats['windows']} |")
        notes.append(f"{shape.name}: floor GEMM at {gflops:.0f} GFLOP/s")
        if shape.batch > 1:
            t_single = robust_ms(singles(shape), inputs, r)
            notes.append(f"{shape.name}: {shape.batch} single calls {t_single:.2f} ms, one "
                         f"batched call {t_ours:.2f} ms: {t_single / t_ours:.2f}x")
    tiny = Shape("overhead", grid=(24, 24), d=16, k=64, gpu=False)
    t_pipe = robust_ms(ours(tiny), input_copies(tiny, "cpu"), max(r, 100))
    print()
    for note in notes:
        print(f"- {note}")
    print(f"- per-call overhead: prune() at N=576, D=16, k=64: {t_pipe:.3f} ms")
    print(f"- load average {os.getloadavg()[0]:.2f} at the end (other work on the 2 cores "
          f"inflates every time)")


if __name__ == "__main__":
    main()
