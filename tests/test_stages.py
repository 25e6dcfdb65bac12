"""The public stages' boundary (d2pruner_kernels/stages.py) under orders that are not
permutations: every compiled and Triton entry point stays inside its buffers whatever the
values of `order`, and where a bad value can be seen without a device sync it is refused
with a ValueError naming the argument, before any work (docs/spec.md §9).

Reproducers that crashed the process before the memory-safety fix (segfault, heap
corruption) run in a subprocess, so a crash fails its test instead of ending the run. The
CUDA-only tests (the kernels on values they are not allowed to check) need a GPU."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import d2pruner_kernels as d2p
from d2pruner_kernels import layout, reference
from d2pruner_kernels.kernels import interpreting
from helpers import ON_GPU, run_json, run_python

needs_gpu = pytest.mark.skipif(not ON_GPU, reason="the CUDA kernels need a GPU")
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1


# -- 1. greedy_mis trusts `order` -----------------------------------------------------------

BAD_ORDERS = {  # the reproducers: adj zeros [1, 6, 1], n_pivots = 2, k = 5
    "zeros": [0] * 8,                            # returned uninitialised memory
    "past_n": [8, 9, 10, 11, 12, 13, 14, 15],    # invalid write (valgrind)
    "negative": [-1, -100000, 2, 3, 4, 5, 6, 7],  # "double free or corruption", abort
    "huge": [10**12, 1, 2, 3, 4, 5, 6, 7],       # segfault
}


@pytest.mark.parametrize("name", BAD_ORDERS)
def test_greedy_mis_refuses_an_order_that_is_not_a_permutation(name):
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


def test_the_cpu_check_runs_before_any_work():
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
def test_every_backend_refuses_bad_sizes(backend, n_pivots, k, match):
    # the reference used to return [1, 9] or [1, 6] rows, or wrong picks, instead
    c = 8 - n_pivots
    adj = torch.zeros(1, max(c, 0), layout.num_words(max(c, 0)), dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        d2p.greedy_mis(adj, torch.arange(8)[None], n_pivots, k, backend=backend)


def test_bad_metadata_is_refused_on_every_backend():
    adj, order = torch.zeros(1, 6, 1, dtype=torch.int32), torch.arange(8)[None]
    with pytest.raises(TypeError, match=r"order must be int64"):
        d2p.greedy_mis(adj, order.int(), 2, 5, backend="reference")
    with pytest.raises(ValueError, match=r"adjacency must be \[B, C, words\] = \[1, 6, 1\]"):
        d2p.greedy_mis(adj[:, :5], order, 2, 5, backend="reference")
    with pytest.raises(TypeError, match=r"k must be an int"):
        d2p.greedy_mis(adj, order, 2, 5.0, backend="reference")


@needs_gpu
def test_the_cuda_kernel_skips_ids_out_of_range():
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

def test_similarity_graph_refuses_ids_out_of_range():
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


def test_a_repeated_token_is_refused():
    x = torch.randn(1, 16, 8)
    order = torch.arange(16)[None].clone()
    order[0, 3] = 5
    with pytest.raises(ValueError, match=r"image 0 repeats token 5"):
        d2p.similarity_graph(x, order, 0, (4, 4), backend="reference")


def test_the_kernel_clamps_ids_into_the_buffer():
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
def test_auto_on_cuda_does_not_read_order_on_the_host():
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
    out = run_python(f"import test_stages as t; t.{fuzz}(); print('fuzzed')", timeout=400)
    assert out.returncode == 0 and "fuzzed" in out.stdout, out.stderr[-4000:]
