"""Per-stage GPU timings at the shapes the kernel issues name (bf16, D = 4096):
scores, rank (+ norms), graph, MIS (with Luby round counts) and prune() end to end, each
next to the reference on the same device, then side by side: the rank kernel against
torch.sort, the lazy graph's prefix sizes, and graph-kernel configurations (split-K,
stages, tiles). TIMING says how they are timed (`d2pruner_kernels.timing`).

    python -m benchmarks.stage_times [--out FILE] [--record [FILE]]

--record appends the measurements to benchmarks/results/history.jsonl (or FILE), from which
`python -m benchmarks.tables` makes results/<device>_stages.md.
"""
from __future__ import annotations

import argparse
import math

import torch

import d2pruner_kernels as d2p
from d2pruner_kernels import reference, timing
from d2pruner_kernels.checks import pivot_count
from d2pruner_kernels.kernels import graph as graph_kernel
from d2pruner_kernels.kernels import lazy_graph
from d2pruner_kernels.kernels import mis as mis_kernel
from d2pruner_kernels.kernels import rank as rank_kernel

from . import history, shapes, tables
from .shapes import PIVOT_RATIO

DEVICE = torch.device("cuda")  # a GPU script (CUDA graphs)
REPS, WARMUP, REPS_SLOW = 100, 10, 3
TIMING = (f"median of {REPS} calls after {WARMUP} warm-up calls (a reference that loops in "
          f"Python: {REPS_SLOW}, no warm-up), CUDA events around each, no L2 flush (one input, "
          "L2 warm); eager = calls back to back, graph = replays of a CUDA graph of one call")


def inputs(b, grid, d, heads=32, seed=0, clusters=64, noise=0.7):
    """bf16 features in clusters with a fixed noise: cosine ~1 / (1 + noise^2) inside one
    (0.67 at the default 0.7: few edges at the 0.8 threshold); the benchmarks' attention
    and positional prior (shapes.py)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    kw = dict(dtype=torch.bfloat16, device=DEVICE, generator=g)
    n = math.prod(grid)
    x = shapes.clustered_tokens(b, n, d, clusters=clusters, noise=noise, **kw)
    return x, shapes.attention(b, heads, n, **kw), shapes.positional_prior(grid, device=DEVICE)


def graph_stage(x, order, n_p, grid, config=None):
    """The graph launch(es) alone: the norms (the rank launch's job in prune()) made once."""
    norms = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)
    return lambda: graph_kernel.GraphRows(x, order, n_p, (1, *grid), config=config,
                                          norms=norms).rows(0, x.shape[1])


def seconds(fn, graph=False, slow=False) -> float:
    """fn's median seconds as TIMING says (graph: replays of fn captured in a CUDA graph)."""
    if graph:
        fn = timing.graph_replay(fn)
    reps, warmup = (REPS_SLOW, 0) if slow else (REPS, WARMUP)
    return timing.median_seconds(fn, reps, warmup=warmup, device=DEVICE)


def add(rec: history.Recorder, stage: str, shape: str, ours_fn, ref_fn=None, note: str = "",
        ref_slow: bool = False) -> None:
    """One row: ours eagerly and from a CUDA graph, and the reference if given."""
    cells = {"ours eager": seconds(ours_fn), "ours graph": seconds(ours_fn, graph=True)}
    if ref_fn is not None:
        cells["reference"] = seconds(ref_fn, slow=ref_slow)
    for column, value in cells.items():
        rec.add(stage, shape, column, value, note=note)
    print(f"{stage} | {shape} | " + " | ".join(f"{c} {v * 1e6:.1f} µs" for c, v in cells.items())
          + f" | {note}", flush=True)


def prefix_rows_ab(rec: history.Recorder) -> None:
    """prune() with the lazy graph's row ranges (kernels/lazy_graph.py) at their default and
    smaller first ranges (more launches, far fewer rows), with how deep these inputs' walks
    go (`reference.walk_depths`). The last case is 8 near-cliques (cosine ~0.92): fewer than m
    independent tokens, so the walk reads the whole graph (a small prefix's worst case)."""
    knobs = ("PREFIX_MIN", "PREFIX_PER_MEMBER", "PREFIX_GROWTH", "LAZY_MIN_WAVES")
    defaults = tuple(getattr(lazy_graph, name) for name in knobs)
    settings = (defaults, (1024, 8, 0, 0.0), (128, 8, 0, 0.0), (128, 2, 4, 0.0))
    few = dict(clusters=8, noise=0.3)
    for b, n, grid, k, kind in ((1, 576, (24, 24), 64, {}), (32, 576, (24, 24), 128, {}),
                                (1, 2880, (48, 60), 320, {}), (1, 576, (24, 24), 64, few)):
        x, attn, prior = inputs(b, grid, 4096, **kind)
        n_p = pivot_count(PIVOT_RATIO, k)
        ds = reference.walk_depths(x, attn, prior, grid, k, PIVOT_RATIO)
        shape = f"B={b} N={n} D=4096 k={k}" + (" near-cliques" if kind else "")
        order = d2p.rank_order(d2p.debiased_scores(attn, prior))
        waves = graph_kernel.GraphRows(x, order, n_p, (1, *grid)).waves
        for setting in settings:
            for name, value in zip(knobs, setting):
                setattr(lazy_graph, name, value)
            ends = lazy_graph.row_ranges(n - n_p, k - n_p, 64, waves)
            f = lambda: d2p.prune(x, attn, grid, k, prior=prior)  # noqa: E731
            note = (f"ranges end at {ends} (min, per member, growth, min waves = {setting}; "
                    f"whole graph {waves:.1f} waves); "
                    f"{sum(d <= ends[0] for d in ds)}/{b} walks settle in the first "
                    f"(deepest {max(ds)})")
            add(rec, "prune, prefix", shape, f, note=note)
    for name, value in zip(knobs, defaults):
        setattr(lazy_graph, name, value)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stage_times", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    tables.add_output_arguments(parser)
    args = parser.parse_args(argv)
    rec = history.Recorder("stages", history.command("benchmarks.stage_times", argv))
    rec.fact("timing", TIMING)
    for n, grid in ((576, (24, 24)), (2880, (48, 60))):
        x, attn, prior = inputs(1, grid, 4096)
        shape = f"B=1 N={n} D=4096 H=32"
        add(rec, "scores", shape, lambda: d2p.debiased_scores(attn, prior, backend="kernels"),
            lambda: reference.debiased_scores(attn, prior))
        s = d2p.debiased_scores(attn, prior)
        add(rec, "rank", shape, lambda: d2p.rank_order(s, backend="kernels"),
            lambda: reference.rank_order(s), note="vs torch.sort(stable)")
        add(rec, "rank + norms", shape, lambda: rank_kernel.rank_and_norms(s, x),
            lambda: (reference.rank_order(s),
                     torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)),
            note="one launch vs sort + vector_norm")
        order = d2p.rank_order(s)
        for frac in (0.10, 0.25):
            k = max(1, math.floor(frac * n + 0.5))
            n_p = pivot_count(PIVOT_RATIO, k)
            kshape = f"{shape} k={k}"
            adj = d2p.similarity_graph(x, order, n_p, grid, backend="kernels")
            add(rec, "graph (full)", kshape, graph_stage(x, order, n_p, grid),
                lambda: reference.similarity_graph(x, order, n_p, (1, *grid)),
                note=f"C={n - n_p}, {2 * (n - n_p) ** 2 / 2 * 4096 / 1e9:.1f} GFLOP")
            _, rounds = mis_kernel.greedy_mis(adj, order, n_p, k, return_rounds=True)
            add(rec, "MIS", kshape, lambda: mis_kernel.greedy_mis(adj, order, n_p, k),
                lambda: reference.greedy_mis(adj, order, n_p, k), ref_slow=True,
                note=f"{int(rounds.max())} Luby rounds")
            add(rec, "prune (e2e)", kshape,
                lambda: d2p.prune(x, attn, grid, k, prior=prior),
                lambda: d2p.prune(x, attn, grid, k, prior=prior, backend="reference"),
                ref_slow=True)
    # a batch of 64 LLaVA-1.5 images
    x, attn, prior = inputs(64, (24, 24), 4096)
    order = d2p.rank_order(d2p.debiased_scores(attn, prior))
    for k in (58, 144):
        n_p = pivot_count(PIVOT_RATIO, k)
        adj = d2p.similarity_graph(x, order, n_p, (24, 24), backend="kernels")
        _, rounds = mis_kernel.greedy_mis(adj, order, n_p, k, return_rounds=True)
        add(rec, "MIS", f"B=64 N=576 k={k}", lambda: mis_kernel.greedy_mis(adj, order, n_p, k),
            lambda: reference.greedy_mis(adj, order, n_p, k), ref_slow=True,
            note=f"max {int(rounds.max())} Luby rounds")
        add(rec, "prune (e2e)", f"B=64 N=576 D=4096 k={k}",
            lambda: d2p.prune(x, attn, (24, 24), k, prior=prior))
    # rank by counting (O(N^2)) against torch.sort around the cut-over rank.MAX_N
    limit, rank_kernel.MAX_N = rank_kernel.MAX_N, 1 << 20
    for n in (4096, 8192, 16384):
        s = torch.rand(1, n, device=DEVICE)
        add(rec, "rank (forced)", f"B=1 N={n}", lambda: rank_kernel.rank_and_norms(s, None),
            lambda: reference.rank_order(s), note=f"kernel used up to N={limit}")
    rank_kernel.MAX_N = limit
    prefix_rows_ab(rec)
    # graph configurations: split-K at N=576 (45 tiles; the slices launched or added in one
    # program, alone and in a batch of 32), tiles at N=2880 (the heaviest stage)
    base = dict(BLOCK=64, BLOCK_K=64, num_warps=4, num_stages=3)
    sliced = [dict(base, SPLITS=4, SPLIT_LAUNCH=launch) for launch in (True, False)]
    for b, n, grid, n_p, cfgs in (
            (1, 576, (24, 24), 44, [dict(base, SPLITS=s) for s in (1, 2, 4, 8)] + sliced[1:]
             + [dict(base, SPLITS=4, num_stages=4), dict(base, BLOCK_K=128, SPLITS=4)]),
            (32, 576, (24, 24), 89, [dict(base, SPLITS=1)] + sliced),
            (1, 2880, (48, 60), 224, [base, dict(base, BLOCK=128, num_warps=8),
                                      dict(base, BLOCK=128), dict(base, num_stages=4)])):
        x, attn, prior = inputs(b, grid, 4096)
        order = d2p.rank_order(d2p.debiased_scores(attn, prior))
        for cfg in cfgs:
            add(rec, "graph config", str(cfg), graph_stage(x, order, n_p, grid, cfg),
                note=f"B={b} N={n} n_p={n_p}")
    tables.finish(rec, args)


if __name__ == "__main__":
    main()
