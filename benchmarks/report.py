"""One markdown table: prune() against its peers and against the hardware floor.

    python -m benchmarks.report [--out FILE] [--quick] [--sync-check]

--quick        the small CPU shapes only (CI smoke: seconds)
--sync-check   only run prune() once under torch.cuda.set_sync_debug_mode("error") and
               report pass/fail (exit status 1 on fail); the full report includes it too.

Floor of a shape (README.md, "Speed"): the largest of
    bytes  = tokens + attention read once + output written, over the measured copy bandwidth
    flops  = B * C^2 * D (the lower triangle of the candidate Gram matrix, 2 flops per MAC),
             over the measured matmul peak (bf16 on GPU, fp32 on CPU)
    launch = launches of prune() (LAUNCHES) x the measured cost of one tiny kernel launch
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import sys
import time

import torch

from d2pruner_kernels import prune, stages

from .harness import (DEVICE, ON_GPU, bound_calls, device_name, median_seconds,
                      prune_variants, synchronize, wall_seconds)
from .shapes import CPU_SHAPES, GPU_SHAPES, Shape, input_copies, make_inputs

LAUNCHES = 4  # scores, rank + norms, graph, MIS: the fewest (split-K and the lazy graph add)
TOO_SLOW_S = 30.0      # total time allowed to one baseline at one shape
REPS_FAST = 50 if ON_GPU else 20
REPS_SLOW = 5


# --- the device -----------------------------------------------------------------------------

def _events_seconds(fn, reps: int) -> float:
    """Median seconds of fn() by CUDA events (after one warm-up call)."""
    fn()
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
             for _ in range(reps)]
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in pairs) / 1e3


def _host_seconds(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_compute(quick: bool) -> dict:
    """Matmul peak (bf16 on GPU, fp32 on CPU) and the cost of one tiny launch."""
    timer = _events_seconds if ON_GPU else _host_seconds
    size, dtype = (8192, torch.bfloat16) if ON_GPU else (512 if quick else 2048, torch.float32)
    a = torch.randn(size, size, device=DEVICE, dtype=dtype)
    b = torch.randn(size, size, device=DEVICE, dtype=dtype)
    peak = 2 * size**3 / timer(lambda: a @ b, 10)
    del a, b
    x = torch.ones(1, device=DEVICE)
    burst = 100  # back-to-back launches: the cost of one in a stream of launches

    def tiny_launches():
        for _ in range(burst):
            x.add_(1)
    launch = timer(tiny_launches, 20) / burst
    return dict(peak=peak, peak_dtype=str(dtype).replace("torch.", ""), launch=launch)


def measure_bandwidth(quick: bool) -> float:
    """Bytes read + written per second by a large copy. Measured after the shapes: on small
    CPU VMs a large copy was seen to slow every later multi-threaded op by ~8 ms."""
    timer = _events_seconds if ON_GPU else _host_seconds
    copy_bytes = (1024 if ON_GPU else 64 if quick else 256) * 2**20
    src = torch.rand(copy_bytes // 4, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * copy_bytes / timer(lambda: dst.copy_(src), 10)


def floor_terms(shape: Shape, hw: dict) -> dict:
    elt = torch.tensor([], dtype=shape.dtype).element_size()
    b, n = shape.batch, shape.n
    moved = b * n * shape.d * elt + b * shape.heads * n * elt + b * shape.k_int * 8
    flops = b * shape.candidates**2 * shape.d   # 2 * C * C / 2 * D per image
    terms = dict(bytes=moved / hw["bandwidth"], flops=flops / hw["peak"],
                 launch=LAUNCHES * hw["launch"])
    terms["floor"] = max(terms.values())
    return terms


# --- one shape ------------------------------------------------------------------------------

def estimated_dense_seconds(shape: Shape, hw: dict) -> float:
    """Lower bound on a baseline that builds the N x N similarity in float32."""
    fp32_peak = hw["peak"] / (8 if ON_GPU else 1)  # bf16 tensor cores vs fp32, roughly
    return shape.batch * 2 * shape.n**2 * shape.d / fp32_peak


def time_shape(shape: Shape, hw: dict) -> dict:
    """{variant name: seconds, or a string saying why there is no number}."""
    copies = input_copies(shape, DEVICE)
    cells = {}
    for v in prune_variants(shape):
        if v.cuda_graph and not ON_GPU:
            cells[v.name] = "n/a (no CUDA)"
            continue
        reps = REPS_SLOW if v.slow else REPS_FAST
        budget = TOO_SLOW_S / (reps + 1)
        if v.slow and v.dense_nn and estimated_dense_seconds(shape, hw) > budget:
            cells[v.name] = "skipped (too slow)"
            continue
        calls = bound_calls(v, copies)
        first = wall_seconds(calls[0])  # also the warm-up (compiles the Triton kernels)
        if v.slow and first > budget:
            cells[v.name] = f"skipped (too slow: one call {first:.1f} s)"
            continue
        cells[v.name] = median_seconds(calls, reps, warmup=1 if v.slow else 3)
        del calls
    del copies
    if ON_GPU:
        torch.cuda.empty_cache()
    return cells


# --- the table ------------------------------------------------------------------------------

def fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def fmt_ratio(r: float) -> str:
    return f"{r:.0f}×" if r >= 100 else f"{r:.1f}×" if r >= 10 else f"{r:.2f}×"


def table(rows: list[tuple[Shape, dict, dict]]) -> str:
    names = [v.name for v in prune_variants(rows[0][0])]
    head = (["shape", "N / D / k / B"] + names +
            ["floor: bytes", "floor: FLOPs", "floor: launches", "floor", "ours / floor"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for shape, cells, floor in rows:
        ours = cells["ours"]
        row = [shape.name, f"{shape.n} / {shape.d} / {shape.k_int} / {shape.batch}"]
        for name in names:
            t = cells[name]
            if isinstance(t, str):
                row.append(t)
            elif name == "ours":
                row.append(fmt_time(t))
            else:  # baseline / ours: how many times slower than prune() eagerly
                row.append(f"{fmt_time(t)} ({fmt_ratio(t / ours)})")
        row += [fmt_time(floor[key]) for key in ("bytes", "flops", "launch", "floor")]
        ratio = fmt_ratio(ours / floor["floor"])
        graph = cells.get("ours (CUDA graph)")
        if not isinstance(graph, str):
            ratio += f" (graph {fmt_ratio(graph / floor['floor'])})"
        row.append(ratio)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def sync_check() -> str:
    """prune() once (after a warm-up) with torch's sync debug mode set to raise."""
    if not ON_GPU:
        return "n/a (no CUDA)"
    shape = next(s for s in GPU_SHAPES if s.batch == 8)  # lazy graph ranges, skip / done
    i = make_inputs(shape, DEVICE)
    run = lambda: prune(i.tokens, i.attn, shape.grid, shape.k_int, prior=i.prior)  # noqa: E731
    run()
    synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
        result = "pass"
    except RuntimeError as e:
        result = f"FAIL ({str(e).splitlines()[0]})"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    synchronize()
    return result


def header(command: str, hw: dict, sync: str) -> str:
    import triton
    cuda = torch.version.cuda or "none"
    timing = ("CUDA events, L2 flushed before each call" if ON_GPU else "time.perf_counter")
    return "\n".join([
        "# d2pruner_kernels: prune() against its peers and the hardware floor",
        "",
        f"- device: {device_name()}",
        f"- torch {torch.__version__}, triton {triton.__version__}, CUDA {cuda}",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- command: `{command}`",
        f"- ours = `prune(backend=\"auto\")` here: "
        f"{stages.describe(DEVICE, max(s.n for s in GPU_SHAPES))}",
        f"- timing: median of {REPS_FAST} calls (ours) / {REPS_SLOW} calls (reference and "
        f"baselines) after warm-up, {timing}, inputs rotated among 4 random copies",
        f"- measured: copy bandwidth {hw['bandwidth'] / 1e9:.0f} GB/s, {hw['peak_dtype']} "
        f"matmul {hw['peak'] / 1e12:.3g} TFLOP/s, one launch {hw['launch'] * 1e6:.2f} µs "
        f"(x {LAUNCHES} launches)",
        f"- sync check (`set_sync_debug_mode('error')`): {sync}",
        "- cells: median time (baseline time / ours); a baseline is skipped where it would "
        f"take more than {TOO_SLOW_S:.0f} s at that shape",
        "", "",
    ])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the markdown here (default: stdout)")
    parser.add_argument("--quick", action="store_true", help="small CPU shapes only (CI smoke)")
    parser.add_argument("--sync-check", action="store_true",
                        help="only check that prune() never synchronises (GPU)")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.report " + shlex.join(sys.argv[1:] if argv is None else argv)

    sync = sync_check()
    if args.sync_check:
        print(f"sync check: {sync}")
        return 1 if sync.startswith("FAIL") else 0

    hw = measure_compute(args.quick)
    timed = []
    for shape in CPU_SHAPES if args.quick else GPU_SHAPES:
        start = time.perf_counter()
        timed.append((shape, time_shape(shape, hw)))
        print(f"{shape.name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    hw["bandwidth"] = measure_bandwidth(args.quick)
    rows = [(shape, cells, floor_terms(shape, hw)) for shape, cells in timed]
    text = header(command.strip(), hw, sync) + table(rows) + "\n"
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
