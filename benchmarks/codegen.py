"""What the Triton kernels compile to on Hopper (sm_90) and Ampere (sm_80), without a GPU:
registers, spills, shared memory, and whether the K loops are pipelined (cp.async) onto the
tensor cores (wgmma on sm_90, mma.sync on sm_80).

Each kernel is specialised exactly as its launch wrapper would launch it at LLaVA-1.5 size
(the wrappers run with the kernel swapped for a recorder; CPU tensors stand in for the
GPU ones, 16-byte aligned like the caching allocator's), then compiled ahead of time for
each target by Triton's own toolchain, and the cubin is read with cuobjdump. No driver needed.

    python -m benchmarks.codegen [--arch 90 80] [--json]

Registers decide occupancy and spills cost local-memory round trips; on a latency-bound
kernel both show up directly in time. The GPU timings stay the judge (benchmarks.stage_times).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from d2pruner_kernels.checks import pivot_count
from d2pruner_kernels.kernels import attention, graph, rank, scores, varlen
from d2pruner_kernels.options import PruneOptions
from d2pruner_kernels.token_layout import TokenLayout

from .shapes import PIVOT_RATIO

ARCHS = (90, 80)
DENSE_GRAPH = "_graph_kernel|_slice_kernel|_sum_slices_kernel"  # whichever the launch takes
SMS = {90: 132, 80: 108}  # H100 / H200, A100: the split-K and lazy-range decisions follow them
TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
         torch.int64: "i64", torch.int32: "i32"}


class Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` is recorded."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def specialise(fn, args, kwargs):
    """The ASTSource the JIT would build: ints of value 1 become constants, pointers and
    ints divisible by 16 carry tt.divisibility=16, constexpr arguments are constants.
    Arguments come by position or by keyword, as the launch wrappers pass them."""
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    bound = dict(zip(fn.arg_names, args), **kwargs)
    sig, const, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        v = bound[name]
        if param.is_constexpr:
            const[name] = v
            continue
        if isinstance(v, torch.Tensor):
            sig[name], aligned = "*" + TYPES[v.dtype], v.data_ptr() % 16 == 0
        elif isinstance(v, bool):
            sig[name], aligned = "i1", False
        elif isinstance(v, int) and v == 1:
            const[name] = 1
            continue
        elif isinstance(v, int):
            sig[name], aligned = ("i32" if -2 ** 31 <= v < 2 ** 31 else "i64"), v % 16 == 0
        else:
            sig[name], aligned = "fp32", False
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, sig, const, attrs), options


CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resources(cubin: bytes) -> dict:
    tool = CUOBJDUMP
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    return {k.lower(): int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def launches():
    """(label, module, kernel names, thunk that calls the wrapper) at LLaVA-1.5 size."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 576, 4096, generator=g).bfloat16()
    x32 = x.float()
    attn = torch.rand(1, 32, 576, generator=g).bfloat16()
    prior = torch.rand(576, generator=g) + 0.5
    s = torch.randn(1, 576, generator=g)
    order = torch.sort(s, descending=True, stable=True).indices
    norms = torch.linalg.vector_norm(x32, dim=-1)

    # the same 576 tokens as a TokenLayout (issue 23): 2 x 2 tiles of 12 x 12 (COORDS)
    tiles = TokenLayout.tiles(2, 2, tile=(12, 12))

    def graph_rows(tokens, splits, beta=0.0, split_launch=True, skip=False, grid=(1, 24, 24),
                   fusion="weighted"):
        cfg = dict(graph.default_config(tokens.dtype, tokens.shape[-1]), SPLITS=splits,
                   SPLIT_LAUNCH=split_launch)
        rows = graph.GraphRows(tokens, order, 44, grid,
                               PruneOptions(spatial_weight=beta, fusion=fusion), config=cfg,
                               norms=norms)
        done = torch.zeros(1, dtype=torch.int32) if skip else None  # a lazy graph's later range
        return lambda: rows.rows(0, rows.c, skip=done)

    # A ragged batch (prune_varlen): a LLaVA-1.5 image and a 16 x 20 one, packed.
    grids = [(1, 24, 24), (1, 16, 20)]
    images, ks = [(0, 576), (576, 896)], [64, 40]
    n_pivots = [pivot_count(PIVOT_RATIO, k) for k in ks]
    xr = torch.randn(896, 4096, generator=g).bfloat16()
    sr = torch.randn(896, generator=g)
    order_r = torch.cat([torch.randperm(576, generator=g), torch.randperm(320, generator=g)])
    norms_r = torch.linalg.vector_norm(xr.float(), dim=-1)

    def ragged_graph(beta=0.0, tokens=xr, skip=False, grids=grids, fusion="weighted"):
        opts = PruneOptions(spatial_weight=beta, fusion=fusion)
        p = varlen.Plan(images, grids, ks, n_pivots, 4096, tokens.dtype, tokens.device,
                        temporal_radius=opts.temporal_radius)
        adj = torch.empty(p.adj_words, dtype=torch.int32)
        done = torch.zeros(len(images), dtype=torch.int32) if skip else None
        return lambda: graph.ragged_rows(tokens, norms_r, order_r, adj, p.table[0],
                                         p.range_tiles[0], opts, p.config, skip=done,
                                         coords=p.coords)

    # the 16 x 20 image as base + newline-column map (TokenLayout pieces: COORDS)
    layout_grids = [grids[0], TokenLayout.grid(8, 8) + TokenLayout.grid(8, 31 + 1)]

    def ragged_rank():
        p = varlen.Plan(images, grids, ks, n_pivots, 4096, xr.dtype, xr.device)
        return lambda: rank.rank_and_norms_ragged(sr, xr, p.table[0], p.rank_programs)

    q = torch.randn(1, 32, 1, 128, generator=g).bfloat16()
    k = torch.randn(1, 8, 4096, 128, generator=g).bfloat16()
    return [
        ("scores, H=32", scores, "_debiased_scores_kernel",
         lambda: scores.debiased_scores(attn, prior, PruneOptions().eps)),
        ("rank + norms", rank, "_rank_norms_kernel", lambda: rank.rank_and_norms(s, x)),
        ("graph bf16", graph, DENSE_GRAPH, graph_rows(x, 1)),
        ("graph bf16 split-K", graph, DENSE_GRAPH, graph_rows(x, 4)),
        ("graph bf16 4 slices", graph, DENSE_GRAPH,
         graph_rows(x, 4, split_launch=False)),  # a batch: one program adds its slices
        ("graph bf16 spatial", graph, DENSE_GRAPH, graph_rows(x, 1, beta=0.3)),
        ("graph fp32", graph, DENSE_GRAPH, graph_rows(x32, 1)),
        ("graph bf16 skip", graph, DENSE_GRAPH, graph_rows(x, 1, skip=True)),
        ("graph bf16 layout", graph, DENSE_GRAPH, graph_rows(x, 1, beta=0.3, grid=tiles)),
        ("graph bf16 layout split-K", graph, DENSE_GRAPH,
         graph_rows(x, 4, beta=0.3, grid=tiles)),
        ("graph bf16 binarized", graph, DENSE_GRAPH,
         graph_rows(x, 1, beta=0.5, fusion="binarized")),
        ("graph bf16 binarized layout", graph, DENSE_GRAPH,
         graph_rows(x, 1, beta=0.5, grid=tiles, fusion="binarized")),
        ("rank + norms ragged", rank, "_rank_norms_kernel", ragged_rank()),
        ("graph bf16 ragged", graph, "_ragged_graph_kernel", ragged_graph()),
        ("graph bf16 ragged spatial", graph, "_ragged_graph_kernel", ragged_graph(0.3)),
        ("graph fp32 ragged", graph, "_ragged_graph_kernel", ragged_graph(tokens=xr.float())),
        ("graph bf16 ragged skip", graph, "_ragged_graph_kernel", ragged_graph(skip=True)),
        ("graph bf16 ragged layout", graph, "_ragged_graph_kernel",
         ragged_graph(0.3, grids=layout_grids)),
        ("graph bf16 ragged binarized", graph, "_ragged_graph_kernel",
         ragged_graph(0.5, fusion="binarized")),
        ("attention rows", attention, "_lse_partials_kernel|_span_probs_kernel",
         lambda: attention.attention_scores(q, k, (34, 34 + 2880), 128 ** -0.5)),
    ]


def report(arch: int = 90) -> list[dict]:
    """One row per compiled launch for the target sm_`arch`."""
    target = GPUTarget("cuda", arch, 32)
    rows = []
    for label, module, names, thunk in launches():
        saved = {n: getattr(module, n) for n in names.split("|")}
        recorders = {n: Recorder(fn) for n, fn in saved.items()}
        saved_sms = getattr(module, "sm_count", None)
        try:
            for n, r in recorders.items():
                setattr(module, n, r)
            if saved_sms is not None:
                module.sm_count = lambda device: SMS[arch]
            try:
                thunk()
            except RuntimeError:  # CPU tensors where a GPU result is read back: not needed
                pass
        finally:
            for n, fn in saved.items():
                setattr(module, n, fn)
            if saved_sms is not None:
                module.sm_count = saved_sms
        for n, r in recorders.items():
            for _, args, kwargs in r.calls:
                src, options = specialise(r.fn, args, kwargs)
                kernel = triton.compile(src, target=target, options=options)
                ptx = kernel.asm["ptx"]
                rows.append(dict(arch=arch, label=label, kernel=n,
                                 **resources(kernel.asm["cubin"]),
                                 smem=kernel.metadata.shared,
                                 cp_async=ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
                                 wgmma=ptx.count("wgmma.mma_async"),
                                 mma_sync=ptx.count("mma.sync"), **options))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS),
                    help="compute capabilities to compile for (default: 90 80)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = [r for arch in args.arch for r in report(arch)]
    if args.json:
        print(json.dumps(rows))
        return
    print(f"Triton {triton.__version__}, targets {', '.join(f'sm_{a}' for a in args.arch)}, "
          f"LLaVA-1.5 shapes (bf16, N=576, D=4096)\n")
    print("| sm | launch | kernel | regs | stack B | local B | smem B | cp.async | wgmma | "
          "mma.sync | warps | stages |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arch']} | {r['label']} | {r['kernel']} | {r['reg']} | {r['stack']} | {r['local']} | "
              f"{r['smem']} | {r['cp_async']} | {r['wgmma']} | {r['mma_sync']} | {r.get('num_warps', '')} | "
              f"{r.get('num_stages', '')} |")


if __name__ == "__main__":
    main()
