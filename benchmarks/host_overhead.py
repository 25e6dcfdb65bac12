"""Host time of prune()'s own Python glue on the kernels path (validation, dispatch,
allocations, launch arguments, the MIS binding's checks), with the launches themselves
stubbed out, the backend choice stubbed to the GPU's (it asks the driver) and the graph
built whole and split 4 ways as at LLaVA-1.5 size on a GPU, so that it runs on any CPU.
In eager mode on a GPU this adds to Triton's launch cost per kernel; inside a CUDA graph
or torch.compile it disappears.

    python -m benchmarks.host_overhead [--calls 2000]
"""
from __future__ import annotations

import argparse
import math
from unittest import mock

import torch

import d2pruner_kernels as d2p
from d2pruner_kernels import dispatch, timing
from d2pruner_kernels.kernels import graph, lazy_graph, mis, rank, scores


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def glue_us(calls: int) -> float:
    x = torch.randn(1, 576, 4096).bfloat16()
    attn = torch.rand(1, 32, 576).bfloat16()
    # a PositionalPrior: checked once when made, so no per-call value check (which a CPU
    # tensor prior gets and a GPU one does not) is timed
    prior = d2p.PositionalPrior((24, 24)).update(torch.rand(576) + 0.5)
    with mock.patch.object(graph, "_graph_kernel", _NoLaunch()), \
            mock.patch.object(graph, "_slice_kernel", _NoLaunch()), \
            mock.patch.object(graph, "_sum_slices_kernel", _NoLaunch()), \
            mock.patch.object(rank, "_rank_norms_kernel", _NoLaunch()), \
            mock.patch.object(scores, "_debiased_scores_kernel", _NoLaunch()), \
            mock.patch.object(mis._C, "mis_rounds_cpu", lambda *args: None), \
            mock.patch.object(dispatch, "use_triton", lambda backend, device: True), \
            mock.patch.object(dispatch, "use_compiled_mis", lambda *args: True), \
            mock.patch.object(graph, "split_count", lambda *args: 4), \
            mock.patch.object(lazy_graph, "LAZY_MIN_WAVES", math.inf):  # as on a GPU: one range
        f = lambda: d2p.prune(x, attn, (24, 24), 64, prior=prior)  # noqa: E731
        for _ in range(calls // 10):  # warm-up
            f()
        return 1e6 * timing.back_to_back_seconds(f, calls)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args(argv)
    print(f"prune() glue, LLaVA-1.5 shape, launches stubbed: {glue_us(args.calls):.1f} µs per call")


if __name__ == "__main__":
    main()
