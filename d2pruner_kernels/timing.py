"""The one timer of the package: medians of repeated calls, on the CPU or a GPU. The demo
and every benchmark time through it, so their numbers mean the same thing.

    median_seconds(calls, reps)   one call's median; CUDA events on a GPU (optionally with
                                  the L2 flushed and the GPU idle before each call, so eager
                                  launch overhead counts), perf_counter on a CPU
    graph_replay(fn)              fn captured in a CUDA graph: a replay times the GPU work
                                  without Python's launch overhead
    back_to_back_seconds(fn, n)   n calls in a row, one sync at the end: the per-call cost
                                  a model loop pays (host overhead included)
"""
from __future__ import annotations

import itertools
import statistics
import time
from typing import Callable, Sequence

import torch

_flush_buffers: dict = {}


def synchronize(device: torch.device | None = None) -> None:
    if device is not None and device.type == "cuda" or device is None and torch.cuda.is_available():
        torch.cuda.synchronize(device)


def flush_l2(device: torch.device) -> None:
    """Overwrites 256 MiB on the device: no input stays in the L2 cache (H200: 60 MiB)."""
    if device not in _flush_buffers:
        _flush_buffers[device] = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
    _flush_buffers[device].zero_()


def median_seconds(calls: Callable[[], object] | Sequence[Callable[[], object]], reps: int, *,
                   warmup: int = 1, device: torch.device | str | None = None,
                   flush: bool = False) -> float:
    """Median seconds of one call, rotating over `calls` (one callable or several: inputs
    rotated so that no call finds the previous one's data in cache). On a CUDA `device`
    each call is timed by CUDA events; with `flush`, the L2 is flushed and the GPU idle
    before each call. On the CPU, time.perf_counter around each call."""
    cycle = itertools.cycle([calls] if callable(calls) else list(calls))
    device = torch.device(device) if device is not None else torch.device("cpu")
    for _ in range(warmup):
        next(cycle)()
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            next(cycle)()
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for start, end in events:
        if flush:
            flush_l2(device)
            torch.cuda.synchronize(device)  # start from an idle GPU: launch overhead counts
        start.record()
        next(cycle)()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in events) / 1e3


def captured(fn: Callable[[], object]):
    """fn warmed up on a side stream (Triton compiles there), then captured in a CUDA graph:
    (the graph, its static output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    torch.cuda.synchronize()
    return graph, out


def graph_replay(fn: Callable[[], object]) -> Callable[[], object]:
    """A function that replays fn's CUDA graph (`captured`) and returns its static output."""
    graph, out = captured(fn)
    return lambda: (graph.replay(), out)[1]


def back_to_back_seconds(fn: Callable[[], object], calls: int,
                         device: torch.device | str | None = None) -> float:
    """Mean seconds per call of `calls` calls in a row with one sync at the end."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / calls
