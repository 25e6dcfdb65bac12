"""The Triton kernels as compiled for Hopper (sm_90) and Ampere (sm_80), ahead of time, no
GPU needed: no register spills anywhere, and the graph kernel's K loop pipelined (cp.async)
onto the tensor cores (wgmma on sm_90, mma.sync on sm_80). A change that silently loses
either is a slowdown no CPU test sees."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def compiled():
    tool = os.path.join(os.path.dirname(importlib.util.find_spec("triton").origin),
                        "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        pytest.skip(f"this Triton build ships no cuobjdump ({tool})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real compiles
    out = subprocess.run([sys.executable, "-m", "benchmarks.codegen", "--json"], env=env,
                         capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-3000:]
    return {(r["arch"], r["label"], r["kernel"]): r for r in json.loads(out.stdout)}


@pytest.mark.parametrize("arch", [90, 80])
def test_every_kernel_compiles_without_spills(compiled, arch):
    launches = {(label, kernel) for a, label, kernel in compiled if a == arch}
    assert {("scores, H=32", "_debiased_scores_kernel"), ("rank + norms", "_rank_norms_kernel"),
            ("graph bf16", "_graph_kernel"), ("graph bf16 split-K", "_slice_kernel"),
            ("graph bf16 split-K", "_sum_slices_kernel"), ("graph bf16 4 slices", "_graph_kernel"),
            ("graph bf16 spatial", "_graph_kernel"), ("graph fp32", "_graph_kernel"),
            ("rank + norms ragged", "_rank_norms_kernel"),
            ("graph bf16 ragged", "_ragged_graph_kernel"),
            ("graph bf16 ragged spatial", "_ragged_graph_kernel"),
            ("graph fp32 ragged", "_ragged_graph_kernel"),
            ("attention rows", "_lse_partials_kernel"),
            ("attention rows", "_span_probs_kernel"),
            # issue 23: a TokenLayout's coordinate table (COORDS), the binarized fusion
            ("graph bf16 layout", "_graph_kernel"),
            ("graph bf16 layout split-K", "_sum_slices_kernel"),
            ("graph bf16 binarized", "_graph_kernel"),
            ("graph bf16 binarized layout", "_graph_kernel"),
            ("graph bf16 ragged layout", "_ragged_graph_kernel"),
            ("graph bf16 ragged binarized", "_ragged_graph_kernel")} <= launches
    for (a, label, kernel), r in compiled.items():
        if a == arch:
            assert r["stack"] == 0 and r["local"] == 0, f"sm_{arch} {label} {kernel} spills: {r}"


@pytest.mark.parametrize("label,kernel", [("graph bf16", "_graph_kernel"),
                                          ("graph bf16 split-K", "_slice_kernel"),
                                          ("graph bf16 4 slices", "_graph_kernel"),
                                          ("graph bf16 ragged", "_ragged_graph_kernel"),
                                          ("graph bf16 layout", "_graph_kernel"),
                                          ("graph bf16 ragged layout", "_ragged_graph_kernel")])
def test_graph_k_loop_is_pipelined_onto_the_tensor_cores(compiled, label, kernel):
    r = compiled[(90, label, kernel)]
    assert r["cp_async"] > 0 and r["wgmma"] > 0, r
    assert r["smem"] >= 3 * 2 * 64 * 64 * 2, f"three stages of two 64x64 bf16 tiles: {r}"
    r = compiled[(80, label, kernel)]
    assert r["cp_async"] > 0 and r["mma_sync"] > 0, r
