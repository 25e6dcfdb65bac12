"""The numbers that decide the ragged path and the odd feature dimension (issue 22, items 7
and 8), each row checked for the same answer before it is timed:

  equal images   prune_varlen() on B equal LLaVA-1.5 images (24x24, D 4096, bf16, k 64)
                 against the dense prune() on the same [B, N, D] batch: the ragged graph
                 kernel keeps two fp32 accumulators live (168 registers against 127 on
                 sm_90), so it may lose even where nothing is ragged.
  mixed batch    prune_varlen() on benchmarks.ragged's 8 Qwen2-VL-like images (D 3584, 25 %)
                 against a Python loop of prune() over them (eager, and each as one CUDA graph).
  odd D          prune() at D = 1176 (not a multiple of 16: no divisibility hint, no cp.async,
                 spills on sm_90) against D = 1152 and against D = 1176 zero-padded to 1184
                 (the padding copy timed with it; zeros change no dot product or norm, so the
                 indices are the same: asserted).
  attention      attention_scores at a Qwen2-VL prefill row, plain and with the padding mask
                 and int64 / int32 q_positions (48 -> ~130 registers on sm_90 with int64).

    python -m benchmarks.varlen_ab [--quick] [--reps R] [--out FILE] [--record [FILE]]

Rows go to table "varlen" of the history (`ours eager` / `ours graph` seconds, the device
named in every record): `python -m benchmarks.tables` renders it like the stages table.
--quick: tiny shapes, one repeat, no CUDA graphs (the CPU dry run of .ci/gpu_check.py under
TRITON_INTERPRET=1, where the kernels backend runs in the interpreter: the plumbing, not
the speed).
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from d2pruner_kernels import prune, prune_varlen, timing
from d2pruner_kernels.checks import resolve_k

from . import history, shapes, tables
from .ragged import GRIDS, QUICK_GRIDS, RATIO, packed_batch

TIMING = ("median of REPS calls after WARMUP warm-up calls, CUDA events around each, no L2 flush; "
          "eager = calls back to back, graph = replays of a CUDA graph of one call (a loop "
          "of prune() captured whole)")


class Bench:
    def __init__(self, rec: history.Recorder, device: torch.device, reps: int, quick: bool):
        self.rec, self.device, self.reps, self.quick = rec, device, reps, quick
        self.graphs = device.type == "cuda" and not quick

    def inputs(self, b, grid, d, seed=0):
        """benchmarks.stage_times' recipe on this device: clustered features, softmax
        attention over 32 heads, the smooth positional prior [N]; bf16 on a GPU, float32 on a
        CPU (the interpreter's bf16 dot is wrong)."""
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        g = torch.Generator(device=self.device).manual_seed(seed)
        kw = dict(dtype=dtype, device=self.device, generator=g)
        n = math.prod(grid)
        x = shapes.clustered_tokens(b, n, d, clusters=64, noise=0.7, **kw)
        heads = 4 if self.quick else 32
        return x, shapes.attention(b, heads, n, **kw), shapes.positional_prior(grid, device=self.device)

    def seconds(self, fn, graph=False) -> float:
        if graph:
            fn = timing.graph_replay(fn)
        return timing.median_seconds(fn, self.reps, warmup=0 if self.quick else 3,
                                     device=self.device)

    def row(self, name: str, shape: str, fn, note: str = "") -> dict:
        cells = {"ours eager": self.seconds(fn)}
        if self.graphs:
            cells["ours graph"] = self.seconds(fn, graph=True)
        for column, value in cells.items():
            self.rec.add(name, shape, column, value, note=note)
        print(f"{name} | {shape} | " + " | ".join(f"{c} {v * 1e6:.1f} µs" for c, v in cells.items())
              + (f" | {note}" if note else ""), flush=True)
        return cells


def ratio_note(base: dict, other: dict, what: str) -> str:
    """`what`: other's time over base's, eager and (where timed) replayed."""
    parts = [f"{c.split()[-1]} {other[c] / base[c]:.2f}x" for c in base if c in other]
    return f"{what}: " + ", ".join(parts)


def equal_images(bench: Bench, b: int) -> None:
    """The same B images through the dense batch and through the ragged path."""
    q = bench.quick
    grid, d, k = ((6, 6), 32, 8) if q else ((24, 24), 4096, 64)
    n = math.prod(grid)
    x, a, prior = bench.inputs(b, grid, d)
    xp, ap = x.reshape(b * n, d), a.transpose(0, 1).reshape(a.shape[1], b * n)
    packed_prior = prior.repeat(b)  # prune_varlen's prior is packed like the tokens
    cu = torch.arange(0, (b + 1) * n, n, dtype=torch.int32, device=x.device)
    grids = [grid] * b

    def dense():
        return prune(x, a, grid, k, prior=prior, backend="kernels")

    def ragged():
        return prune_varlen(xp, ap, cu, grids, k, prior=packed_prior, backend="kernels")

    want = dense()
    keep, _ = ragged()
    offsets = torch.arange(0, b * n, n, device=x.device)[:, None]
    assert torch.equal(keep.view(b, k), want + offsets), "prune_varlen != prune() on equal images"
    shape = f"B={b} N={n} D={d} k={k} {str(x.dtype).replace('torch.', '')}"
    t_dense = bench.row("prune(), dense batch (equal images)", shape, dense)
    t_ragged = bench.row("prune_varlen (equal images)", shape, ragged)
    print(f"  -> {ratio_note(t_dense, t_ragged, 'prune_varlen / dense prune()')}", flush=True)
    bench.rec.fact(f"prune_varlen / dense prune(), {shape}",
                   round(t_ragged["ours eager"] / t_dense["ours eager"], 3), "x",
                   note="eager" + (f"; graph {t_ragged['ours graph'] / t_dense['ours graph']:.3f}x"
                                   if bench.graphs else ""))


def mixed_batch(bench: Bench) -> None:
    """benchmarks.ragged's batch: the ragged path against a loop of prune()."""
    grids, d = (QUICK_GRIDS, 32) if bench.quick else (GRIDS, 3584)
    dtype = torch.bfloat16 if bench.device.type == "cuda" else torch.float32
    tokens, attn, prior, cu, images, _ = packed_batch(grids, d, bench.device, dtype)

    def ragged():
        return prune_varlen(tokens, attn, cu, grids, RATIO, prior=prior, backend="kernels")

    def loop():
        return [prune(x.tokens[0], x.attn[0], g, RATIO, prior=x.prior, backend="kernels")
                for x, g in zip(images, grids)]

    keep, cu_keep = ragged()
    for b, w in enumerate(loop()):  # the contract, on the timed input
        assert torch.equal(keep[cu_keep[b]:cu_keep[b + 1]], w + int(cu[b])), b
    ks = [resolve_k(RATIO, math.prod(g)) for g in grids]
    shape = (f"{len(grids)} images {grids[0]}..{grids[-1]}, {int(cu[-1])} tokens, D={d}, "
             f"k={RATIO:.0%} ({sum(ks)} kept)")
    t_loop = bench.row("a loop of prune() (mixed batch)", shape, loop)
    t_ragged = bench.row("prune_varlen (mixed batch)", shape, ragged)
    print(f"  -> {ratio_note(t_ragged, t_loop, 'loop of prune() / prune_varlen')}", flush=True)
    bench.rec.fact(f"loop of prune() / prune_varlen, {len(grids)} mixed images",
                   round(t_loop["ours eager"] / t_ragged["ours eager"], 3), "x", note="eager")


def odd_feature_dim(bench: Bench) -> None:
    """D = 1176 as it is, zero-padded to 1184 (the copy included), and D = 1152."""
    b, grid, k = (2, (6, 6), 8) if bench.quick else (8, (24, 24), 64)
    dims = (24, 32) if bench.quick else (1176, 1152)
    odd, even = dims
    pad = -odd % 16
    for d in dims:
        x, a, prior = bench.inputs(b, grid, d, seed=d)
        shape = f"B={b} N={math.prod(grid)} D={d} k={k} {str(x.dtype).replace('torch.', '')}"
        bench.row(f"prune(), D={d}", shape, lambda: prune(x, a, grid, k, prior=prior,
                                                        backend="kernels"))
        if d == odd and pad:
            def padded():
                return prune(F.pad(x, (0, pad)), a, grid, k, prior=prior, backend="kernels")
            assert torch.equal(padded(), prune(x, a, grid, k, prior=prior, backend="kernels")), \
                "zero-padding D changed the selection"
            bench.row(f"prune(), D={d} zero-padded to {d + pad}", shape, padded,
                      note="the padding copy included")


def attention_positions(bench: Bench) -> None:
    """attention_scores at a Qwen2-VL-7B prefill row (Hq 28 / Hk 4, d 128, bf16, a batch of 4
    left-padded to 1500 keys): plain, with the padding mask and int64 q_positions (about 130
    registers against 48 on sm_90), and with int32 positions: whether the positions' dtype
    is worth a cast."""
    from d2pruner_kernels import attention_scores
    b, hq, hk, d, n_keys = (2, 4, 2, 32, 60) if bench.quick else (4, 28, 4, 128, 1500)
    span = (n_keys // 4, n_keys // 4 + n_keys // 2)
    dev = bench.device
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(b, hq, 1, d, device=dev, generator=g).to(dtype)
    k = torch.randn(b, hk, n_keys, d, device=dev, generator=g).to(dtype)
    mask = torch.arange(n_keys, device=dev)[None] >= torch.tensor([0, 7, 30, 3][:b], device=dev)[:, None]
    pos64 = torch.full((b, 1), n_keys - 1, device=dev)
    shape = f"B={b} Hq={hq} Hk={hk} d={d} L={n_keys} span={span[1] - span[0]}"
    plain = bench.row("attention_scores", shape, lambda: attention_scores(q, k, key_span=span,
                                                                          backend="kernels"))
    for name, pos in (("int64", pos64), ("int32", pos64.int())):
        t = bench.row(f"attention_scores + mask + {name} q_positions", shape,
                      lambda: attention_scores(q, k, key_span=span, key_padding_mask=mask,
                                               q_positions=pos, backend="kernels"))
        print(f"  -> {ratio_note(plain, t, f'mask + {name} positions / plain')}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.varlen_ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU dry run)")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--only", nargs="*", choices=["equal", "mixed", "odd", "attention"],
                        default=["equal", "mixed", "odd", "attention"])
    tables.add_output_arguments(parser)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reps = 1 if args.quick else args.reps
    rec = history.Recorder("varlen", history.command("benchmarks.varlen_ab", argv))
    rec.fact("timing", TIMING.replace("REPS", str(reps)).replace("WARMUP", "0" if args.quick else "3"))
    bench = Bench(rec, device, reps, args.quick)
    if "equal" in args.only:
        for b in ((2,) if args.quick else (8, 32)):
            equal_images(bench, b)
    if "mixed" in args.only:
        mixed_batch(bench)
    if "odd" in args.only:
        odd_feature_dim(bench)
    if "attention" in args.only:
        attention_positions(bench)
    tables.finish(rec, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
