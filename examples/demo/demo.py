"""`make demo`: D2Pruner on an embedded example, next to the two baselines it improves on.

    python examples/demo/demo.py --out demo_out          # writes demo_out/demo.png
    python examples/demo/demo.py --png docs/demo.png     # the figure at an explicit path

The example (scene.py) is a drawn picture on LLaVA-1.5's 24x24 patch grid with patch
features, a bottom-row-biased 8-head attention map and its positional prior, all seeded,
nothing downloaded. The demo prunes it at 75% and 90% reduction with raw-attention top-k,
debiased top-k and D2Pruner (three calls of `d2pruner_kernels.prune`), prints what each kept
and how long prune() took (median of `timing.median_seconds`), and writes `<out>/demo.png`
(or `--png PATH`, figure.py). It needs Pillow: pip install 'd2pruner_kernels[demo]'.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from d2pruner_kernels import debiased_scores, dispatch, prune, rank_order, reference, timing
from d2pruner_kernels.checks import pivot_count
from figure import make_figure
from scene import (BOTTOM_ROWS, D, EPS, GRID, HEADS, IMG, METHODS, N, PATCH, REDUCTIONS,
                   REGIONS, build_example, kept_count, row_counts)


# --------------------------------------------------------------------------- pruning

def run_methods(tokens, attn, prior, k, repeats, device):
    """{name: (kept indices as a numpy array, median ms)} for the three methods. The first
    call gives the kept set and is the warm-up; then timing.median_seconds over `repeats`."""
    calls = {
        # plain top-k of the head-mean attention: no prior, all of the budget as pivots
        "raw top-k": lambda: prune(tokens, attn, GRID, k, prior=None, pivot_ratio=1.0),
        # top-k of the debiased score: docs/spec.md says rho = 1 is exactly that
        "debiased top-k": lambda: prune(tokens, attn, GRID, k, prior=prior, pivot_ratio=1.0),
        # D2Pruner with the defaults: 70% pivots, diverse rest from the similarity graph
        "D2Pruner": lambda: prune(tokens, attn, GRID, k, prior=prior),
    }
    assert tuple(calls) == METHODS
    out = {}
    for name, fn in calls.items():
        kept = fn().cpu().numpy()
        ms = timing.median_seconds(fn, repeats, warmup=0, device=device) * 1e3
        out[name] = (kept, ms)
    return out


def _fmt_kept(name, kept, ms, regions, width):
    rows = row_counts(kept)
    reg = np.bincount(regions[kept], minlength=len(REGIONS))
    lines = [f"  {name:<{width}} rows 0-23: {' '.join(f'{c:2d}' for c in rows)}",
             f"  {'':<{width}} {len(np.unique(kept // GRID[1])):2d} rows hit, "
             f"{rows[-BOTTOM_ROWS:].sum():3d} in the bottom {BOTTOM_ROWS} rows | "
             + ", ".join(f"{r} {c}" for r, c in zip(REGIONS, reg) if c)
             + f" | {ms:.2f} ms",
             f"  {'':<{width}} first indices: {' '.join(str(int(i)) for i in kept[:12])} ..."]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python examples/demo/demo.py", description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--out", default="demo_out", help="folder for demo.png (default: demo_out)")
    ap.add_argument("--png", default=None, metavar="PATH",
                    help="write the figure to PATH instead (default: OUT/demo.png); "
                         "missing folders are created")
    ap.add_argument("--repeats", type=int, default=5, help="timed prune() calls per method (median)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads while the demo runs (default 1: at N=576 more threads "
                         "buy little and stall badly on a busy machine; 0 = leave torch's setting)")
    args = ap.parse_args(argv)
    saved = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return _demo(args)
    finally:
        torch.set_num_threads(saved)


def _demo(args) -> dict:
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise SystemExit("the demo draws with Pillow: pip install 'd2pruner_kernels[demo]'")
    dev = torch.device("cuda" if args.device == "cuda" or
                       (args.device == "auto" and torch.cuda.is_available()) else "cpu")

    img, regions, tokens, attn, prior = build_example(args.seed, dev)
    edges = reference.similarity_edges(tokens[None], torch.arange(N, device=dev)[None], 0, (1, *GRID))
    n_edges = int(edges.sum()) // 2
    where = (torch.cuda.get_device_name(dev) + " (GPU)") if dev.type == "cuda" \
        else f"CPU of this machine ({os.cpu_count()} cores), {torch.get_num_threads()} torch thread(s)"
    print(f"D2Pruner demo: drawn {IMG}x{IMG} picture -> {GRID[0]}x{GRID[1]} patches of {PATCH} px "
          f"(N={N}), features D={D}, attention H={HEADS} heads with a bottom-row bias")
    print(f"similarity graph over all {N} tokens at sim_threshold=0.8: {n_edges} edges "
          f"(mean degree {2 * n_edges / N:.1f})")
    clock = "CUDA events" if dev.type == "cuda" else "perf_counter"
    print(f"prune(backend='auto') on {dev.type}: {dispatch.describe(dev, N)}; times are the "
          f"median of {args.repeats} prune() calls after a warm-up (timing.median_seconds, "
          f"{clock}) on the {where}")

    results, picks = {}, {}
    width = max(len(s) for s in METHODS)
    debiased = debiased_scores(attn[None], prior[None], EPS)
    order = rank_order(debiased)[0].cpu().numpy()
    for reduction in REDUCTIONS:
        k = kept_count(reduction)
        res = run_methods(tokens, attn, prior, k, args.repeats, dev)
        n_p = pivot_count(0.7, k)
        # D2Pruner's kept set = the n_p best debiased tokens (pivots) + the MIS picks
        picks[reduction] = np.setdiff1d(res["D2Pruner"][0], order[:n_p])
        results[reduction] = res
        print(f"\n{reduction:.0%} reduction: keep k={k} of {N} "
              f"(D2Pruner: {n_p} pivots + {k - n_p} from the greedy MIS)")
        for name, (kept, ms) in res.items():
            print(_fmt_kept(name, kept, ms, regions, width))
        reg = np.bincount(regions[picks[reduction]], minlength=len(REGIONS))
        print(f"  {'':<{width}} its {len(picks[reduction])} greedy-MIS picks: "
              + ", ".join(f"{r} {c}" for r, c in zip(REGIONS, reg) if c))

    maps = {"attention": attn.mean(0).cpu().numpy(), "prior": prior.cpu().numpy(),
            "debiased": debiased[0].cpu().numpy()}
    path = args.png if args.png is not None else os.path.join(args.out, "demo.png")
    make_figure(img, maps, results, picks, path)
    print(f"\nwrote {path} ({os.path.getsize(path) / 1024:.0f} KB)")
    return {"png": path, "results": results, "picks": picks, "regions": regions, "maps": maps}


if __name__ == "__main__":
    main()
