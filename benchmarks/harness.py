"""What the pytest benchmarks and the report share: the device, the timed variants of
prune() and its peers, input rotation and CUDA-graph capture. The timers are the
package's own (`d2pruner_kernels.timing`).

Timing method (METHOD):
* every call gets the next of a few independent input copies (random, never zeros);
* report.py: timing.median_seconds(flush=True): on GPU, CUDA events around each call;
  before each, the L2 cache is flushed (a 256 MiB write) and the host waits for the GPU, so
  every call starts on an idle GPU and an eager call's host-side launch overhead is part of
  its time. Median after warm-up. On CPU, time.perf_counter per call.
* pytest-benchmark times with its own host clock, so on GPU the timed function ends with
  torch.cuda.synchronize(): those numbers include one host round trip (~10 us) per call.
"""
from __future__ import annotations

import itertools
import platform
from dataclasses import dataclass
from typing import Callable

import torch

from d2pruner_kernels import prune, timing

from . import baselines
from .shapes import Inputs, Shape

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"


def device_name(device: torch.device = DEVICE) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def skip_reason(shape: Shape) -> str | None:
    """GPU shapes need CUDA; the small fp32 CPU shapes are for smoke runs without one."""
    if shape.gpu and not ON_GPU:
        return f"{shape.name} ({shape.describe()}) is a GPU shape: no CUDA device here"
    if not shape.gpu and ON_GPU:
        return f"{shape.name} is a small CPU smoke shape: GPU runs use the real shapes"
    return None


# --- the variants of the end-to-end comparison ----------------------------------------------

@dataclass
class Variant:
    name: str
    call: Callable[[Inputs], torch.Tensor]
    slow: bool = False          # Python loops: few repeats
    cuda_graph: bool = False    # replay a captured CUDA graph (GPU only)
    dense_nn: bool = True       # builds an N x N (or C x C) similarity: predictable cost


def prune_variants(shape: Shape) -> list[Variant]:
    grid, k, tr = shape.grid, shape.k_int, shape.temporal_radius

    def ours(backend):
        return lambda i: prune(i.tokens, i.attn, grid, k, prior=i.prior, temporal_radius=tr,
                               backend=backend)

    def peer(fn, *args, with_prior=False, **kw):
        def call(i):
            extra = dict(prior=i.prior) if with_prior else {}
            return baselines.run_batched(fn, i.tokens, i.attn, *args, **extra, **kw)
        return call

    return [
        Variant("ours", ours("auto")),
        Variant("ours (CUDA graph)", ours("auto"), cuda_graph=True),
        Variant("reference", ours("reference"), slow=True),
        Variant("naive D2Pruner", peer(baselines.naive_d2pruner, grid, k, with_prior=True,
                                       temporal_radius=tr), slow=True),
        Variant("DivPrune", peer(baselines.divprune, k), slow=True),
        Variant("CDPruner", peer(baselines.cdpruner, k), slow=True),
        Variant("DART", peer(baselines.dart, k), slow=True, dense_nn=False),
    ]


# --- rotation, CUDA graphs ------------------------------------------------------------------

def bound_calls(variant: Variant, copies: list[Inputs]) -> list[Callable[[], object]]:
    """One no-argument callable per input copy (for graph variants: the replay of a CUDA
    graph per copy, captured after a warm-up so that Triton compiles outside the capture)."""
    calls = [lambda i=i: variant.call(i) for i in copies]
    return [timing.graph_replay(c) for c in calls] if variant.cuda_graph else calls


def rotating(calls: list[Callable[[], object]]) -> Callable[[], object]:
    """A no-argument function for pytest-benchmark: the next copy each call, then a sync."""
    cycle = itertools.cycle(calls)

    def timed():
        out = next(cycle)()
        timing.synchronize(DEVICE)
        return out
    return timed


# --- pytest-benchmark -----------------------------------------------------------------------

def run_benchmark(benchmark, stage: str, shape: Shape, label: str, calls, *, slow=False,
                  **extra):
    """Time `calls` (rotated) with pytest-benchmark, grouped per stage and shape."""
    benchmark.group = f"{stage} {shape.name}"
    benchmark.extra_info.update(device=device_name(), shape=shape.describe(), variant=label,
                                **extra)
    if ON_GPU:
        rounds, warmup = (5, 1) if slow else (50, 5)
    else:
        rounds, warmup = (3, 1) if slow else (10, 2)
    return benchmark.pedantic(rotating(calls), rounds=rounds, warmup_rounds=warmup,
                              iterations=1)
