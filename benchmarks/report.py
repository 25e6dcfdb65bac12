"""One markdown table: prune() against its peers and against the hardware floor.

    python -m benchmarks.report [--out FILE] [--record [FILE]] [--quick] [--sync-check]

--quick        the small CPU shapes only (CI smoke: seconds)
--record       append the measurements to benchmarks/results/history.jsonl (or FILE), from
               which `python -m benchmarks.tables` makes results/<device>_report.md
--sync-check   only run prune() once under torch.cuda.set_sync_debug_mode("error") and
               report pass/fail (exit status 1 on fail); the full report includes it too.

Floor of a shape (docs/design.md §7): the largest of
    bytes  = tokens + attention read once + output written, over the measured copy bandwidth
    flops  = B * C^2 * D (the lower triangle of the candidate Gram matrix, 2 flops per MAC),
             over the measured matmul peak (bf16 on GPU, fp32 on CPU)
    launch = launches of prune() (LAUNCHES) x the measured cost of one tiny kernel launch
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from d2pruner_kernels import dispatch, prune, timing

from . import history, tables
from .harness import DEVICE, ON_GPU, bound_calls, prune_variants
from .shapes import CPU_SHAPES, GPU_SHAPES, Shape, input_copies, make_inputs

LAUNCHES = 4  # scores, rank + norms, graph, MIS: the fewest (split-K and the lazy graph add)
TOO_SLOW_S = 30.0      # total time allowed to one baseline at one shape
REPS_FAST = 50 if ON_GPU else 20
REPS_SLOW = 5


# --- the device -----------------------------------------------------------------------------

def measure_compute(quick: bool) -> dict:
    """Matmul peak (bf16 on GPU, fp32 on CPU) and the cost of one tiny launch."""
    size, dtype = (8192, torch.bfloat16) if ON_GPU else (512 if quick else 2048, torch.float32)
    a = torch.randn(size, size, device=DEVICE, dtype=dtype)
    b = torch.randn(size, size, device=DEVICE, dtype=dtype)
    peak = 2 * size**3 / timing.median_seconds(lambda: a @ b, 10, device=DEVICE)
    del a, b
    x = torch.ones(1, device=DEVICE)
    burst = 100  # back-to-back launches: the cost of one in a stream of launches

    def tiny_launches():
        for _ in range(burst):
            x.add_(1)
    launch = timing.median_seconds(tiny_launches, 20, device=DEVICE) / burst
    return dict(peak=peak, peak_dtype=str(dtype).replace("torch.", ""), launch=launch)


def measure_bandwidth(quick: bool) -> float:
    """Bytes read + written per second by a large copy. Measured after the shapes: on small
    CPU VMs a large copy was seen to slow every later multi-threaded op by ~8 ms."""
    copy_bytes = (1024 if ON_GPU else 64 if quick else 256) * 2**20
    src = torch.rand(copy_bytes // 4, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * copy_bytes / timing.median_seconds(lambda: dst.copy_(src), 10, device=DEVICE)


def floor_terms(shape: Shape, hw: dict) -> dict:
    """The report's floor columns, in seconds."""
    elt = torch.tensor([], dtype=shape.dtype).element_size()
    b, n = shape.batch, shape.n
    moved = b * n * shape.d * elt + b * shape.heads * n * elt + b * shape.k_int * 8
    flops = b * shape.candidates**2 * shape.d   # 2 * C * C / 2 * D per image
    terms = {"floor: bytes": moved / hw["bandwidth"], "floor: FLOPs": flops / hw["peak"],
             "floor: launches": LAUNCHES * hw["launch"]}
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
        # one call alone, synchronised: also the warm-up (compiles the Triton kernels)
        first = timing.median_seconds(calls[0], 1, warmup=0, device=DEVICE)
        if v.slow and first > budget:
            cells[v.name] = f"skipped (too slow: one call {first:.1f} s)"
            continue
        cells[v.name] = timing.median_seconds(calls, reps, warmup=1 if v.slow else 3,
                                              device=DEVICE, flush=True)
        del calls
    del copies
    if ON_GPU:
        torch.cuda.empty_cache()
    return cells


# --- the run -------------------------------------------------------------------------------

def sync_check() -> str:
    """prune() once (after a warm-up) with torch's sync debug mode set to raise."""
    if not ON_GPU:
        return "n/a (no CUDA)"
    shape = next(s for s in GPU_SHAPES if s.batch == 8)  # lazy graph ranges, skip / done
    i = make_inputs(shape, DEVICE)
    run = lambda: prune(i.tokens, i.attn, shape.grid, shape.k_int, prior=i.prior)  # noqa: E731
    run()
    timing.synchronize(DEVICE)
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
        result = "pass"
    except RuntimeError as e:
        result = f"FAIL ({str(e).splitlines()[0]})"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    timing.synchronize(DEVICE)
    return result


def record_facts(rec: history.Recorder, hw: dict, sync: str) -> None:
    """The header of the table: what ran, how it was timed, the measured device."""
    timer = "CUDA events, L2 flushed before each call" if ON_GPU else "time.perf_counter"
    rec.fact('ours = `prune(backend="auto")` here',
             dispatch.describe(DEVICE, max(s.n for s in GPU_SHAPES)))
    rec.fact("timing", f"median of {REPS_FAST} calls (ours) / {REPS_SLOW} calls (reference and "
             f"baselines) after warm-up, {timer}, inputs rotated among 4 random copies")
    rec.fact("copy bandwidth", hw["bandwidth"], "B/s")
    rec.fact("matmul peak", hw["peak"], "FLOP/s", note=hw["peak_dtype"])
    rec.fact("one launch", hw["launch"], "s", note=f"x {LAUNCHES} launches")
    rec.fact("sync check (`set_sync_debug_mode('error')`)", sync)
    rec.fact("cells", "median time (baseline time / ours); a baseline is skipped where it "
             f"would take more than {TOO_SLOW_S:.0f} s at that shape")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    tables.add_output_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="small CPU shapes only (CI smoke)")
    parser.add_argument("--sync-check", action="store_true",
                        help="only check that prune() never synchronises (GPU)")
    args = parser.parse_args(argv)

    sync = sync_check()
    if args.sync_check:
        print(f"sync check: {sync}")
        return 1 if sync.startswith("FAIL") else 0

    rec = history.Recorder("report", history.command("benchmarks.report", argv))
    hw = measure_compute(args.quick)
    timed = []
    for shape in CPU_SHAPES if args.quick else GPU_SHAPES:
        start = time.perf_counter()
        timed.append((shape, time_shape(shape, hw)))
        print(f"{shape.name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    hw["bandwidth"] = measure_bandwidth(args.quick)
    record_facts(rec, hw, sync)
    for shape, cells in timed:
        sizes = f"{shape.n} / {shape.d} / {shape.k_int} / {shape.batch}"
        for column, value in {**cells, **floor_terms(shape, hw)}.items():
            rec.add(shape.name, sizes, column, value)
    tables.finish(rec, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
