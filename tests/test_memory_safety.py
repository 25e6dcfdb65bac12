"""Memory-safe on any input (the issue of that name, items 1-6): every compiled and Triton
entry point stays inside its buffers whatever the values of its inputs, and where a bad
value can be seen without a device sync it is refused with a ValueError naming the
argument, before any work.

Reproducers that crashed the process before the fix (segfault, heap corruption) run in a
subprocess, so a crash fails its test instead of ending the test run. The CUDA-only tests
(the kernels' behaviour on values they are not allowed to check) need a GPU."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import save_file

import d2pruner_kernels as d2p
from d2pruner_kernels import layout, reference
from d2pruner_kernels.calibrate import main as calibrate_main
from d2pruner_kernels.kernels import interpreting
from d2pruner_kernels.prior import PositionalPrior
from helpers import ON_GPU

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(d2p.__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="the CUDA kernels need a GPU")
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1


def run_python(code: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter on this checkout (the Triton interpreter as in
    conftest.py); a crash shows up as a non-zero return code, not a dead test run."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, TESTS]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def run_json(code: str):
    """run_python, which must exit 0 and print one JSON line last."""
    out = run_python(code)
    assert out.returncode == 0, (f"the subprocess died (exit {out.returncode}):\n"
                                 f"{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- 1. greedy_mis trusts `order` -----------------------------------------------------------

BAD_ORDERS = {  # the reproducers: adj zeros [1, 6, 1], n_pivots = 2, k = 5
    "zeros": [0] * 8,                            # returned uninitialised memory
    "past_n": [8, 9, 10, 11, 12, 13, 14, 15],    # invalid write (valgrind)
    "negative": [-1, -100000, 2, 3, 4, 5, 6, 7],  # "double free or corruption", abort
    "huge": [10**12, 1, 2, 3, 4, 5, 6, 7],       # segfault
}


@pytest.mark.parametrize("name", BAD_ORDERS)
def test_1_greedy_mis_refuses_an_order_that_is_not_a_permutation(name):
    got = run_json(f"""
        import json, torch
        from d2pruner_kernels import stages
        from d2pruner_kernels.kernels import mis
        adj, order = torch.zeros(1, 6, 1, dtype=torch.int32), torch.tensor([{BAD_ORDERS[name]}])
        calls = {{f"stages {{b}}": (lambda b=b: stages.greedy_mis(adj, order, 2, 5, backend=b))
                  for b in ("auto", "kernels", "reference")}}
        calls["kernels.mis"] = lambda: mis.greedy_mis(adj, order, 2, 5)
        calls["kernels.mis lazy"] = lambda: mis.greedy_mis(
            adj, order, 2, 5, rows_ready=3, done=torch.zeros(1, dtype=torch.int32))
        out = {{}}
        for label, call in calls.items():
            try:
                out[label] = ["returned", call().tolist()]
            except Exception as e:
                out[label] = [type(e).__name__, str(e)]
        print(json.dumps(out))
    """)
    for label, (kind, what) in got.items():
        assert kind == "ValueError" and "order" in what and "permutation" in what, (label, kind, what)


def test_1_the_cpu_check_runs_before_any_work():
    """A bad image beside a good one: nothing is written (kept keeps its sentinel); an image
    that `skip` marks is never read, so its order is not checked."""
    got = run_json(f"""
        import json, torch
        from d2pruner_kernels.kernels import mis
        adj = torch.zeros(2, 6, 1, dtype=torch.int32)
        order = torch.tensor([list(range(8)), {BAD_ORDERS["negative"]}])
        kept = torch.full((2, 5), 7, dtype=torch.int64)
        try:
            mis.greedy_mis(adj, order, 2, 5, kept=kept)
            err = None
        except ValueError as e:
            err = str(e)
        untouched = kept.tolist()
        skip = torch.tensor([0, 1], dtype=torch.int32)
        mis.greedy_mis(adj, order, 2, 5, skip=skip, kept=kept)
        print(json.dumps([err, untouched, kept.tolist()]))
    """)
    err, untouched, kept = got
    assert err is not None and "image 1 holds -1 at position 0" in err, err
    assert untouched == [[7] * 5] * 2
    assert kept == [[0, 1, 2, 3, 4], [7] * 5]


@pytest.mark.parametrize("backend", ["reference", "auto", "kernels"])
@pytest.mark.parametrize("n_pivots,k,match", [
    (2, 9, r"n_pivots <= k <= N, got n_pivots=2, k=9, N=8"),    # k > N
    (6, 5, r"n_pivots <= k <= N, got n_pivots=6, k=5"),         # n_pivots > k
    (-1, 5, r"n_pivots must be >= 0, got -1"),                  # negative
])
def test_1_every_backend_refuses_bad_sizes(backend, n_pivots, k, match):
    # the reference used to return [1, 9] or [1, 6] rows, or wrong picks, instead
    c = 8 - n_pivots
    adj = torch.zeros(1, max(c, 0), layout.num_words(max(c, 0)), dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        d2p.greedy_mis(adj, torch.arange(8)[None], n_pivots, k, backend=backend)


def test_1_bad_metadata_is_refused_on_every_backend():
    adj, order = torch.zeros(1, 6, 1, dtype=torch.int32), torch.arange(8)[None]
    with pytest.raises(TypeError, match=r"order must be int64"):
        d2p.greedy_mis(adj, order.int(), 2, 5, backend="reference")
    with pytest.raises(ValueError, match=r"adjacency must be \[B, C, words\] = \[1, 6, 1\]"):
        d2p.greedy_mis(adj[:, :5], order, 2, 5, backend="reference")
    with pytest.raises(TypeError, match=r"k must be an int"):
        d2p.greedy_mis(adj, order, 2, 5.0, backend="reference")


@needs_gpu
def test_1_the_cuda_kernel_skips_ids_out_of_range():
    """On a GPU the order is not read on the host: ids outside [0, N) are skipped,
    duplicates collapse, and the entries left over are -1 (documented in greedy_mis)."""
    want = {"zeros": [0, -1, -1, -1, -1], "past_n": [-1] * 5, "negative": [2, 3, 4, -1, -1],
            "huge": [1, 2, 3, 4, -1]}
    got = run_json(f"""
        import json, torch
        from d2pruner_kernels import stages
        from d2pruner_kernels.kernels import mis
        adj = torch.zeros(1, 6, 1, dtype=torch.int32, device="cuda")
        out = {{}}
        for name, o in {json.dumps(BAD_ORDERS)}.items():
            order = torch.tensor([o], device="cuda")
            a = mis.greedy_mis(adj, order, 2, 5).tolist()
            b = stages.greedy_mis(adj, order, 2, 5, backend="auto").tolist()
            torch.cuda.synchronize()
            out[name] = [a, b]
        print(json.dumps(out))
    """)
    for name, rows in want.items():
        assert got[name] == [[rows], [rows]], name


# -- 2. similarity_graph reads outside the token buffer -------------------------------------

def test_2_similarity_graph_refuses_ids_out_of_range():
    got = run_json("""
        import json, torch
        from d2pruner_kernels import stages
        from d2pruner_kernels.kernels import interpreting
        x = torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(0))
        backends = ["reference", "auto"] + (["kernels"] if interpreting() else [])
        out = {}
        for bad in (100000, -5, 16, 17, -2**63):
            order = torch.arange(16)[None].clone()
            order[0, 0] = bad
            for b in backends:
                try:
                    out[f"{bad} {b}"] = ["returned", stages.similarity_graph(
                        x, order, 0, (4, 4), backend=b).tolist()]
                except Exception as e:
                    out[f"{bad} {b}"] = [type(e).__name__, str(e)]
        print(json.dumps(out))
    """)
    for label, (kind, what) in got.items():
        assert kind == "ValueError" and "order" in what and "permutation" in what, (label, what)


def test_2_a_repeated_token_is_refused():
    x = torch.randn(1, 16, 8)
    order = torch.arange(16)[None].clone()
    order[0, 3] = 5
    with pytest.raises(ValueError, match=r"image 0 repeats token 5"):
        d2p.similarity_graph(x, order, 0, (4, 4), backend="reference")


def test_2_the_kernel_clamps_ids_into_the_buffer():
    """The Triton kernel itself (what `auto` runs on CUDA, where `order` is not checked):
    any id is clamped into [0, N), so the graph is the reference's for the clamped order."""
    device = "cuda" if ON_GPU else "cpu"
    if not (ON_GPU or interpreting()):
        pytest.skip("the Triton kernel needs a GPU or the interpreter")
    got = run_json(f"""
        import json, torch
        from d2pruner_kernels import layout, reference
        from d2pruner_kernels.kernels import graph
        from d2pruner_kernels.options import PruneOptions
        g = torch.Generator().manual_seed(1)
        eye = torch.eye(4)[torch.randint(0, 4, (1, 16), generator=g)]    # cos 0 or 1
        x = (eye * 2.0 ** torch.randint(-3, 4, (1, 16, 1), generator=g)).to("{device}")
        p = PruneOptions(sim_threshold=0.8, spatial_weight=0.5, radius=1)
        out = []
        for bad in (100000, -5, 16, 17, -2**63, 2**63 - 1, 10**12):
            order = torch.arange(16)[None].clone()
            order[0, 0], order[0, 9] = bad, -bad if bad > -2**63 else 3
            order = order.to("{device}")
            got = graph.similarity_graph(x, order, 0, (1, 4, 4), p)
            want = reference.similarity_graph(x, order.clamp(0, 15), 0, (1, 4, 4), p)
            out.append(torch.equal(layout.unpack_lower(got, 16), layout.unpack_lower(want, 16)))
        print(json.dumps(out))
    """)
    assert all(got), got


@needs_gpu
def test_2_auto_on_cuda_does_not_read_order_on_the_host():
    x = torch.randn(1, 16, 8, device="cuda")
    order = torch.arange(16, device="cuda")[None].clone()
    order[0, 0] = 100000
    adj = d2p.similarity_graph(x, order, 0, (4, 4), backend="auto")  # no sync, no error
    want = d2p.similarity_graph(x, order.clamp(0, 15), 0, (4, 4), backend="reference")
    assert torch.equal(layout.unpack_lower(adj, 16), layout.unpack_lower(want, 16))


# -- hypothesis: arbitrary int64 orders --------------------------------------------------------

@st.composite
def order_cases(draw):
    """(order int64 [B, N], n_pivots, k): permutations, permutations with entries replaced
    by arbitrary int64 values, and rows of arbitrary int64 values."""
    b, n = draw(st.integers(1, 2)), draw(st.integers(1, 12))
    anything = st.integers(INT64_MIN, INT64_MAX) | st.integers(-3, n + 3)
    rows = []
    for _ in range(b):
        row = list(draw(st.permutations(range(n))))
        kind = draw(st.sampled_from(["perm", "perm", "patched", "arbitrary"]))
        if kind == "patched":
            for i in draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=3)):
                row[i] = draw(anything)
        elif kind == "arbitrary":
            row = draw(st.lists(anything, min_size=n, max_size=n))
        rows.append(row)
    n_pivots = draw(st.integers(0, n))
    k = draw(st.integers(n_pivots, n))
    return torch.tensor(rows, dtype=torch.int64), n_pivots, k


def _is_permutation(order: torch.Tensor) -> bool:
    n = order.shape[1]
    return all(sorted(row) == list(range(n)) for row in order.tolist())


def _clean_error(e: ValueError) -> bool:
    return "order" in str(e) and "permutation" in str(e)


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=order_cases(), seed=st.integers(0, 2**16))
def fuzz_greedy_mis(case, seed):
    """Valid result (the reference's answer) or a ValueError naming `order`, never a crash."""
    from d2pruner_kernels.kernels import mis
    order, n_pivots, k = case
    b, n = order.shape
    c = n - n_pivots
    g = torch.Generator().manual_seed(seed)
    e = torch.rand(b, c, c, generator=g) < 0.3
    adj = layout.pack_lower((e | e.transpose(1, 2)) & ~torch.eye(c, dtype=torch.bool))
    want = reference.greedy_mis(adj, order, n_pivots, k) if _is_permutation(order) else None
    calls = [lambda be=be: d2p.greedy_mis(adj, order, n_pivots, k, backend=be)
             for be in ("auto", "kernels", "reference")]
    calls.append(lambda: mis.greedy_mis(adj, order, n_pivots, k))
    for call in calls:
        try:
            got = call()
        except ValueError as err:
            assert want is None and _clean_error(err), err
            continue
        assert want is not None and torch.equal(got, want), (order, got, want)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=order_cases(), seed=st.integers(0, 2**16))
def fuzz_similarity_graph(case, seed):
    """Public stage: the reference's graph or a ValueError naming `order`. Triton kernel
    (no check of its own): the graph of the order clamped into [0, N), whatever it holds."""
    from d2pruner_kernels.kernels import graph
    from d2pruner_kernels.options import PruneOptions
    order, n_pivots, _ = case
    b, n = order.shape
    g = torch.Generator().manual_seed(seed)
    x = torch.eye(4)[torch.randint(0, 4, (b, n), generator=g)]  # cosines exactly 0 or 1
    x = x * 2.0 ** torch.randint(-3, 4, (b, n, 1), generator=g)
    grid, c = (1, 1, n), n - n_pivots
    p = PruneOptions(sim_threshold=0.8, spatial_weight=0.5, radius=2)
    ok = _is_permutation(order)
    lower = lambda adj: layout.unpack_lower(adj, c) if c else adj  # noqa: E731  (C = 0: empty)
    for be in ("reference", "auto") + (("kernels",) if interpreting() else ()):
        try:
            got = d2p.similarity_graph(x, order, n_pivots, grid, sim_threshold=0.8,
                                       spatial_weight=0.5, radius=2, backend=be)
        except ValueError as err:
            assert not ok and _clean_error(err), err
            continue
        want = reference.similarity_graph(x, order, n_pivots, grid, p)
        assert ok and torch.equal(lower(got), lower(want))
    if interpreting():
        got = graph.similarity_graph(x, order, n_pivots, grid, p)
        want = reference.similarity_graph(x, order.clamp(0, n - 1), n_pivots, grid, p)
        assert torch.equal(lower(got), lower(want)), order


@pytest.mark.parametrize("fuzz", ["fuzz_greedy_mis", "fuzz_similarity_graph"])
def test_hypothesis_arbitrary_int64_orders(fuzz):
    """Runs the fuzzer in a subprocess: a memory error is a failed test, not a dead run."""
    out = run_python(f"import test_memory_safety as t; t.{fuzz}(); print('fuzzed')", timeout=400)
    assert out.returncode == 0 and "fuzzed" in out.stdout, out.stderr[-4000:]


# -- 3. attention_scores ------------------------------------------------------------------------

def test_3a_key_offsets_past_2_31_elements():
    """k a strided view whose row index x row stride passes 2^31 elements (a fused QKV
    buffer): the row offsets must be 64-bit. On the CPU the buffer is a sparse file mapped
    in memory (only the rows read take pages)."""
    got = run_json("""
        import json, os, tempfile, torch
        from d2pruner_kernels import attention_scores
        from d2pruner_kernels.kernels import interpreting
        L, d, stride = 4, 16, 2**30
        n = (L - 1) * stride + d
        if torch.cuda.is_available():
            buf, backend = torch.zeros(n, dtype=torch.float16, device="cuda"), "kernels"
        else:
            fd, path = tempfile.mkstemp()
            os.ftruncate(fd, 2 * n)
            os.close(fd)
            buf = torch.from_file(path, shared=True, size=n, dtype=torch.float16)
            os.unlink(path)
            backend = "kernels" if interpreting() else "reference"
        k = buf.as_strided((1, 1, L, d), (0, 0, stride, 1))
        g = torch.Generator().manual_seed(0)
        k.copy_(torch.randn(1, 1, L, d, generator=g).half())
        q = torch.randn(1, 2, 3, d, generator=g).half().to(buf.device)
        kc = k.contiguous()
        out = {}
        for pos in (None, torch.tensor([0, 2, 3], device=buf.device)):
            got = attention_scores(q, k, key_span=(1, L), q_positions=pos, backend=backend)
            want = attention_scores(q, kc, key_span=(1, L), q_positions=pos, backend="reference")
            out[str(pos is None)] = (got - want).abs().max().item()
        print(json.dumps(out))
    """)
    assert all(v < 1e-4 for v in got.values()), got


def _qk(seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, 3, 32, generator=g).to(dtype)
    k = torch.randn(2, 2, 70, 32, generator=g).to(dtype)
    return q.to(device), k.to(device)


def _kernel_backend():
    if not (ON_GPU or interpreting()):
        pytest.skip("the Triton kernels need a GPU or the interpreter")
    return "kernels"


@pytest.mark.parametrize("dtype,value", [(torch.int32, 2**31 - 1), (torch.int64, INT64_MAX),
                                         (torch.int64, 2**40), (torch.int64, INT64_MIN)])
def test_3b_extreme_q_positions(dtype, value):
    """INT32_MAX / INT64_MAX made `max(pos) + 1` overflow: pass 1 read no key and the result
    was unnormalised (sum 42.8 instead of 0.676)."""
    backend = _kernel_backend()
    device = "cuda" if ON_GPU else "cpu"
    q, k = _qk(device=device)
    pos = torch.tensor([value, 5, value], dtype=dtype, device=device)
    got = d2p.attention_scores(q, k, key_span=(10, 60), q_positions=pos, backend=backend)
    want = d2p.attention_scores(q, k, key_span=(10, 60), q_positions=pos, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scale", [1e8, 1e10, 1e20])
@pytest.mark.parametrize("with_lse", [False, True])
def test_3c_huge_scale_stays_finite(scale, with_lse):
    """A huge softmax scale still gives probabilities: finite, in [0, 1], row sums <= 1, and
    the reference's. With a given lse the result is ill-conditioned: exp(scale * <q, k> - lse)
    moves by e^(+-50) with one ulp of a 1e9 logit, and the kernel, cuBLAS and the reference
    (float64 logits rounded, on CUDA) each round the dot in their own order. So the
    comparison takes its lse from the very logits both sides compute: inputs on a 1/8 grid
    (every product and partial sum exact in float32, in any order: MMA, FMA, the
    interpreter), the scale the power of two nearest `scale` (scale * <q, k> exact too, an
    FMA contraction changes nothing), one largest logit per row, the lse in float64. On
    random inputs with an lse from float64 logits only the bounds are checked."""
    import math
    backend = _kernel_backend()
    device = "cuda" if ON_GPU else "cpu"
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float16):
        q, k = _qk(seed=3, dtype=dtype, device=device)
        if with_lse:
            q8 = (torch.randint(-8, 9, q.shape, generator=g) / 8).to(device, dtype)
            k8 = (torch.randint(-8, 9, k.shape, generator=g) / 8).to(device, dtype)
            exact = 2.0 ** round(math.log2(scale))
            logits = (q8.double() @ k8.double().repeat_interleave(2, 1).transpose(-1, -2)) * exact
            assert torch.equal(logits.float().double(), logits)  # exact in float32
            top2 = logits.topk(2, dim=-1).values
            assert (top2[..., 0] > top2[..., 1]).all(), "ties at the top: sums would exceed 1"
            lse8 = torch.logsumexp(logits, dim=-1).float()
            kw8 = dict(key_span=(5, 60), scale=exact, lse=lse8)
            got = d2p.attention_scores(q8, k8, backend=backend, **kw8)
            torch.testing.assert_close(got, d2p.attention_scores(q8, k8, backend="reference", **kw8),
                                       rtol=1e-4, atol=1e-5)
            assert got.sum() > 0  # some largest logit lies in the span: not all zeros
            # random inputs: bounds only (whatever the kernel's rounding, p = 2^min(e2, 0))
            lse = torch.logsumexp((q.double() @ k.double().repeat_interleave(2, 1)
                                   .transpose(-1, -2)) * scale, dim=-1).float()
        else:
            lse = None
        got = d2p.attention_scores(q, k, key_span=(5, 60), scale=scale, lse=lse, backend=backend)
        assert torch.isfinite(got).all() and (got >= 0).all() and (got <= 1).all()
        assert (got.sum(1) <= 1 + 1e-5).all()
        if lse is None:
            want = d2p.attention_scores(q, k, key_span=(5, 60), scale=scale, backend="reference")
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# -- 4. PositionalPrior.load ------------------------------------------------------------------

def _prior_file(path, mean=None, **meta):
    base = {"format": "d2pruner-positional-prior", "version": "1", "grid": "4,6",
            "count": "3", "model": "", "layer": "", "query": "", "transforms": ""}
    base.update(meta)
    tensors = {"mean": torch.rand(24, dtype=torch.float64) + 0.5 if mean is None else mean}
    save_file(tensors, str(path), metadata={k: v for k, v in base.items() if v is not None})
    return path


def test_4_a_huge_grid_is_refused_before_allocating(tmp_path):
    path = _prior_file(tmp_path / "huge.safetensors", grid="20000,20000")
    assert path.stat().st_size < 1000
    got = run_json(f"""
        import json, resource
        from d2pruner_kernels.prior import PositionalPrior
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            PositionalPrior.load({str(path)!r})
            err = None
        except Exception as e:
            err = [type(e).__name__, str(e)]
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(json.dumps([err, grown // 1024]))
    """)
    (err, grown_mb) = got
    assert err[0] == "ValueError" and str(path) in err[1] and "grid" in err[1], err
    assert grown_mb < 200, f"load allocated {grown_mb} MB for a {path.stat().st_size}-byte file"


@pytest.mark.parametrize("meta,field", [
    (dict(grid="1000000,1000000"), "grid"),   # was the allocator's RuntimeError
    (dict(grid="5"), "grid"),                 # was TypeError
    (dict(grid="0,24"), "grid"),              # was ValueError without the path
    (dict(grid="4,6,1,1"), "grid"),
    (dict(grid="4, 6"), "grid"),
    (dict(grid="-4,-6"), "grid"),
    (dict(grid="4,x"), "grid"),
    (dict(grid="9" * 5000 + ",1"), "grid"),
    (dict(grid="3,6"), "grid"),               # 18 cells, the tensor has 24
    (dict(grid=None), "grid"),
    (dict(count="-1"), "count"),              # loaded, then update() divided by zero
    (dict(count="0"), "count"),
    (dict(count="1.5"), "count"),
    (dict(count=None), "count"),
    (dict(layer="one"), "layer"),
    (dict(version="2"), "version"),
])
def test_4_malformed_metadata_names_the_path_and_the_field(tmp_path, meta, field):
    path = _prior_file(tmp_path / "p.safetensors", **meta)
    with pytest.raises(ValueError) as info:
        PositionalPrior.load(path)
    assert str(path) in str(info.value) and field in str(info.value), info.value


@pytest.mark.parametrize("tensors,field", [
    ({"mean": torch.rand(24, dtype=torch.float64) + 1, "extra": torch.zeros(3)}, "tensors"),
    ({"mean": torch.rand(24) + 1}, "mean"),                        # float32
    ({"mean": torch.rand(4, 6, dtype=torch.float64) + 1}, "mean"),  # 2-D
    ({"mean": -torch.rand(24, dtype=torch.float64)}, "mean"),       # not positive
    ({"mean": torch.full((24,), float("nan"), dtype=torch.float64)}, "mean"),
])
def test_4_malformed_tensors_name_the_path_and_the_field(tmp_path, tensors, field):
    path = tmp_path / "p.safetensors"
    save_file(tensors, str(path), metadata={"format": "d2pruner-positional-prior",
                                            "version": "1", "grid": "4,6", "count": "3"})
    with pytest.raises(ValueError) as info:
        PositionalPrior.load(path)
    assert str(path) in str(info.value) and field in str(info.value), info.value


def test_4_a_good_file_still_loads(tmp_path):
    prior = PositionalPrior((2, 3, 4), layer=-1).update(torch.rand(5, 24) + 0.1)
    prior.save(tmp_path / "p.safetensors")
    back = PositionalPrior.load(tmp_path / "p.safetensors", expected_grid=(2, 3, 4))
    assert back.count == 5 and back.layer == -1 and torch.equal(back.mean, prior.mean)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # atomic save


# -- 5. the calibrate CLI -----------------------------------------------------------------------

def _maps_dir(tmp_path, name="maps"):
    d = tmp_path / name
    d.mkdir()
    g = torch.Generator().manual_seed(0)
    torch.save(torch.rand(3, 4, 4, generator=g) + 0.1, d / "a.pt")
    save_file({"scores": torch.rand(2, 16, generator=g) + 0.1}, str(d / "b.safetensors"))
    return d


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("d2pruner-calibrate: error: "), err
    return err[0]


def _no_files_but(folder, names):
    assert sorted(os.listdir(folder)) == sorted(names), os.listdir(folder)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/d2pruner-pwned-by-calibrate",))


def test_5_a_pickle_inside_a_pt_file(tmp_path, capsys):
    d = _maps_dir(tmp_path)
    (d / "evil.pt").write_bytes(pickle.dumps(_Payload()))
    out = tmp_path / "p.safetensors"
    assert calibrate_main([str(d), "--grid", "4", "4", "--out", str(out), "--quiet"]) == 2
    line = _one_error_line(capsys)
    assert "evil.pt" in line and "pickled" in line
    assert not out.exists() and not os.path.exists("/tmp/d2pruner-pwned-by-calibrate")


def test_5_a_garbage_safetensors_file(tmp_path, capsys):
    d = _maps_dir(tmp_path)
    (d / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    out = tmp_path / "p.safetensors"
    assert calibrate_main([str(d), "--grid", "4", "4", "--out", str(out), "--quiet"]) == 2
    assert "junk.safetensors" in _one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("where", ["missing folder", "a directory"])
def test_5_an_out_that_cannot_be_written(tmp_path, capsys, where):
    d = _maps_dir(tmp_path)
    out = tmp_path / "nowhere" / "p.safetensors" if where == "missing folder" else tmp_path
    assert calibrate_main([str(d), "--grid", "4", "4", "--out", str(out), "--quiet"]) == 2
    assert str(out) in _one_error_line(capsys)
    _no_files_but(tmp_path, ["maps"])


def test_5_a_bad_png_extension_fails_before_anything_is_written(tmp_path, capsys):
    d = _maps_dir(tmp_path)
    out = tmp_path / "p.safetensors"
    assert calibrate_main([str(d), "--grid", "4", "4", "--out", str(out), "--png",
                           str(tmp_path / "map.xyz"), "--quiet"]) == 2
    assert "--png" in _one_error_line(capsys)
    _no_files_but(tmp_path, ["maps"])


def test_5_a_failed_run_leaves_an_existing_output_alone(tmp_path, capsys):
    d = _maps_dir(tmp_path)
    out = tmp_path / "p.safetensors"
    out.write_bytes(b"previous")
    torch.save(torch.rand(5), d / "c.pt")  # wrong N for the grid
    assert calibrate_main([str(d), "--grid", "4", "4", "--out", str(out), "--quiet"]) == 2
    assert "c.pt" in _one_error_line(capsys)
    assert out.read_bytes() == b"previous"
    _no_files_but(tmp_path, ["maps", "p.safetensors"])


def test_5_the_output_inside_the_input_folder_is_not_read_back(tmp_path, capsys):
    d = _maps_dir(tmp_path)
    out, png = d / "prior.safetensors", d / "prior.png"
    args = [str(d), "--grid", "4", "4", "--out", str(out), "--png", str(png), "--quiet"]
    assert calibrate_main(args) == 0
    first = PositionalPrior.load(out)
    capsys.readouterr()
    assert calibrate_main(args) == 0  # again: its own previous output is skipped, said so
    printed = capsys.readouterr()
    assert "skipping" in printed.err and str(out) in printed.err
    assert "5 maps from 2 files" in printed.out
    second = PositionalPrior.load(out)
    assert second.count == first.count == 5 and torch.equal(second.mean, first.mean)
    # another prior file among the inputs is refused, not averaged in as a score map
    first.save(d / "other_prior.safetensors")
    assert calibrate_main([str(d), "--grid", "4", "4", "--out", str(tmp_path / "x.safetensors"),
                           "--quiet"]) == 2
    assert "other_prior.safetensors is a positional prior" in _one_error_line(capsys)


def test_5_the_real_command_prints_one_line_and_exits_2(tmp_path):
    d = _maps_dir(tmp_path)
    (d / "evil.pt").write_bytes(pickle.dumps(_Payload()))
    out = subprocess.run([sys.executable, "-m", "d2pruner_kernels.calibrate", str(d), "--grid",
                          "4", "4", "--out", str(tmp_path / "p.safetensors"), "--quiet"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr


# -- 6. smaller ----------------------------------------------------------------------------------

X = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(5))
A = torch.rand(2, 3, 16, generator=torch.Generator().manual_seed(6)) + 0.01


def test_6_as_tensor_hands_out_a_copy():
    prior = PositionalPrior((4, 4)).update(torch.rand(3, 16) + 0.2)
    want = d2p.prune(X, A, (4, 4), 6, prior=prior.mean.float())
    t = prior.as_tensor()
    t.fill_(-1.0)  # an in-place edit of what as_tensor() returned...
    assert torch.equal(d2p.prune(X, A, (4, 4), 6, prior=prior), want)  # ...changes nothing
    assert (prior.as_tensor() > 0).all()


@pytest.mark.parametrize("backend", ["reference", "auto", "kernels"])
def test_6_a_huge_radius_means_the_whole_grid(backend):
    if backend == "kernels" and not (ON_GPU or interpreting()):
        pytest.skip("the Triton kernels need a GPU or the interpreter")
    x, a = X.to("cuda" if ON_GPU else "cpu"), A.to("cuda" if ON_GPU else "cpu")
    kw = dict(spatial_weight=0.5, sim_threshold=0.6, pivot_ratio=0.2, backend=backend)
    want = d2p.prune(x, a, (4, 4), 8, radius=4, temporal_radius=4, **kw)
    for r in (2**31, 2**63, 2**70):
        assert torch.equal(d2p.prune(x, a, (4, 4), 8, radius=r, temporal_radius=r, **kw), want)
    assert d2p.PruneOptions(radius=2**70).radius == 2**31 - 1
    order = torch.arange(16)[None].expand(2, -1).contiguous().to(x.device)
    g = d2p.similarity_graph(x, order, 3, (4, 4), radius=2**70, spatial_weight=0.5, backend=backend)
    assert torch.equal(g, d2p.similarity_graph(x, order, 3, (4, 4), radius=4,
                                               spatial_weight=0.5, backend=backend))


def test_6_an_unbatched_call_takes_a_one_row_prior():
    prior = torch.rand(16, generator=torch.Generator().manual_seed(2)) + 0.5
    want = d2p.prune(X[0], A[0], (4, 4), 6, prior=prior)
    assert torch.equal(d2p.prune(X[0], A[0], (4, 4), 6, prior=prior[None]), want)
    with pytest.raises(ValueError, match=r"prior has batch 2 but tokens has B=1"):
        d2p.prune(X[0], A[0], (4, 4), 6, prior=prior.expand(2, -1))


def test_6_check_finite_takes_a_numpy_bool():
    want = d2p.prune(X, A, (4, 4), 6)
    assert torch.equal(d2p.prune(X, A, (4, 4), 6, check_finite=np.bool_(True)), want)
    assert torch.equal(d2p.prune(X, A, (4, 4), 6, check_finite=np.bool_(False)), want)
    with pytest.raises(TypeError, match=r"check_finite must be a bool, got numpy.int64 1"):
        d2p.prune(X, A, (4, 4), 6, check_finite=np.int64(1))


@pytest.mark.parametrize("what", ["tokens", "attn", "prior", "graph tokens", "q", "k"])
def test_6_sparse_tensors_are_refused_at_the_check(what):
    sparse = lambda t: t.to_sparse()  # noqa: E731
    prior = torch.rand(16) + 0.5
    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 12, 8)
    calls = {
        "tokens": lambda: d2p.prune(sparse(X), A, (4, 4), 6),
        "attn": lambda: d2p.prune(X, sparse(A), (4, 4), 6),
        "prior": lambda: d2p.prune(X, A, (4, 4), 6, prior=sparse(prior)),
        "graph tokens": lambda: d2p.similarity_graph(sparse(X), torch.arange(16)[None].expand(2, -1),
                                                     0, (4, 4), backend="reference"),
        "q": lambda: d2p.attention_scores(sparse(q), k, key_span=(0, 4), backend="reference"),
        "k": lambda: d2p.attention_scores(q, sparse(k), key_span=(0, 4), backend="reference"),
    }
    name = what.split()[-1]
    with pytest.raises(ValueError, match=rf"{name} must be a dense \(strided\) tensor"):
        calls[what]()
