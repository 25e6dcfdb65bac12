"""prune(): the API contract, the error contract, and kernels == reference end to end."""

import numpy as np
import pytest
import torch

import d2pruner_kernels as d2p
from d2pruner_kernels import prune
from d2pruner_kernels.checks import pivot_count, resolve_k
from d2pruner_kernels.kernels import interpreting
from helpers import DEVICE, ON_GPU, band_free, clustered_tokens, distinct_attention


def case(b=2, n=48, d=16, h=3, seed=0, dtype=torch.float32, grid=(6, 8), device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    x = clustered_tokens(b, n, d, dtype=dtype, generator=g)
    a = distinct_attention(b, h, n, generator=g)
    return x.to(device), a.to(device), grid


# ---- end to end parity ----------------------------------------------------------------

def band_free_case(b, n, d, h, grid, k, rho, beta, radius, dtype, seed):
    x, a, _ = band_free(lambda i: (*case(b, n, d, h, seed + i, dtype, grid)[:2], None),
                        pivot_count(rho, k), grid, beta, radius)
    return x, a


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,grid,k,rho,beta,radius", [
    (48, (6, 8), 12, 0.7, 0.0, 2),
    (77, (7, 11), 0.25, 0.5, 0.5, 1),
    (90, (2, 5, 9), 30, 0.0, 0.5, 2),
    (60, (6, 10), 60, 0.7, 0.0, 2),
    (48, (6, 8), 12, 1.0, 0.0, 2),  # all pivots: the plain top-k branch
    (33, (3, 11), 1, 0.7, 0.0, 2),
])
def test_kernels_equal_reference(dtype, n, grid, k, rho, beta, radius):
    x, a = band_free_case(3, n, 24, 4, grid, resolve_k(k, n), rho,
                          beta, radius, dtype, seed=n)
    kw = dict(pivot_ratio=rho, spatial_weight=beta, radius=radius)
    got = prune(x, a, grid, k, backend="kernels", **kw)
    want = prune(x, a, grid, k, backend="reference", **kw)
    assert got.device == x.device and got.dtype == torch.int64
    assert torch.equal(got, want)
    assert torch.equal(prune(x, a, grid, k, backend="auto", **kw), want)


def test_unbatched_shapes_and_ratio_k():
    x, a, grid = case(b=1)
    out = prune(x[0], a[0], grid, 0.25)
    assert out.shape == (12,) and torch.equal(out, prune(x, a, grid, 12)[0])
    assert torch.equal(prune(x[0], a[0, 0], grid, 5), prune(x[:1], a[:1, 0], grid, 5)[0])
    assert prune(x[0], a[0], grid, 0.001).shape == (1,)  # max(1, floor(ratio*N + 0.5))
    assert prune(x[0], a[0], grid, 1.0).shape == (48,)


@pytest.mark.parametrize("backend", ["reference", "kernels"])
def test_batched_equals_per_item(backend):
    x, a, grid = case(b=4, seed=3)
    prior = (torch.rand(4, 48) + 0.5).to(DEVICE)
    kw = dict(spatial_weight=0.5, backend=backend)
    out = prune(x, a, grid, 10, prior=prior, **kw)
    for b in range(4):
        assert torch.equal(out[b], prune(x[b], a[b], grid, 10, prior=prior[b], **kw))


@pytest.mark.parametrize("backend", ["reference", "kernels"])
def test_inputs_are_never_modified(backend):
    x, a, grid = case()
    prior = (torch.rand(48) + 0.5).to(DEVICE)
    saved = [t.clone() for t in (x, a, prior)]
    prune(x, a, grid, 10, prior=prior, backend=backend)
    assert all(torch.equal(s, t) for s, t in zip(saved, (x, a, prior)))


def test_prior_changes_the_selection_as_the_formula_says():
    x, a, grid = case(b=1, seed=4)
    prior = (torch.rand(48, generator=torch.Generator().manual_seed(9)) + 0.1).to(DEVICE)
    for eps in (1e-7, 0.5):
        top = prune(x, a, grid, 6, prior=prior, pivot_ratio=1.0, eps=eps)[0]
        assert torch.equal(top, (a[0].mean(0) / (prior + eps)).topk(6).indices.sort().values)


# ---- the error contract -----------------------------------------------------------------

X, A, GRID = case(device="cpu")  # metadata checks: the same on every device

BAD = [
    (dict(tokens=X[0, 0]), ValueError, "tokens must be 2-D or 3-D"),
    (dict(tokens=X.long()), TypeError, "tokens must be float16, bfloat16 or float32"),
    (dict(tokens=X.double()), TypeError, "got torch.float64"),
    (dict(tokens=X[:0]), ValueError, "empty batch"),
    (dict(attn=A[0, 0]), ValueError, "attn must be 2-D or 3-D"),
    (dict(attn=A[:1]), ValueError, "attn has batch 1 but tokens has B=2"),
    (dict(attn=A[..., :40]), ValueError, "attn has N=40 but tokens has N=48"),
    (dict(attn=A.long()), TypeError, "attn must be float16"),
    (dict(grid_hw=(6, 7)), ValueError, "grid (6, 7) has 42 cells but tokens has N=48"),
    (dict(grid_hw=48), TypeError, "grid_hw must be a tuple"),
    (dict(grid_hw=(2, 3, 4, 2)), TypeError, "grid_hw must be a tuple"),
    (dict(grid_hw=(6.0, 8)), TypeError, "grid_hw entries must be an int"),
    (dict(k=0), ValueError, "k must be in [1, N=48], got 0"),
    (dict(k=49), ValueError, "k must be in [1, N=48], got 49"),
    (dict(k=0.0), ValueError, "k as a ratio must be in (0, 1], got 0.0"),
    (dict(k=1.5), ValueError, "k as a ratio must be in (0, 1]"),
    (dict(k=float("nan")), ValueError, "k as a ratio"),
    (dict(k=True), TypeError, "got bool"),
    (dict(k="10"), TypeError, "k must be an int"),
    (dict(prior=torch.rand(47) + 1), ValueError, "prior has N=47 but tokens has N=48"),
    (dict(prior=torch.rand(3, 48) + 1), ValueError, "prior has batch 3 but tokens has B=2"),
    (dict(prior=torch.rand(2, 47) + 1), ValueError, "prior has N=47 but tokens has N=48"),
    (dict(prior=-torch.rand(48)), ValueError, "prior must be positive"),
    (dict(prior=torch.zeros(48)), ValueError, "prior must be positive"),
    (dict(prior=torch.ones(48, dtype=torch.int64)), TypeError, "prior must be float16"),
    (dict(pivot_ratio=1.2), ValueError, "pivot_ratio must be in [0.0, 1.0], got 1.2"),
    (dict(pivot_ratio=float("nan")), ValueError, "pivot_ratio"),
    (dict(sim_threshold=1.5), ValueError, "sim_threshold must be in [-1.0, 1.0]"),
    (dict(spatial_weight=-0.1), ValueError, "spatial_weight must be in [0.0, 1.0]"),
    (dict(radius=-1), ValueError, "radius must be >= 0, got -1"),
    (dict(radius=1.5), TypeError, "radius must be an int"),
    (dict(temporal_radius=-2), ValueError, "temporal_radius must be >= 0"),
    (dict(eps=-1e-3), ValueError, "eps must be in"),
    (dict(backend="triton"), ValueError, "backend must be one of"),
    (dict(check_finite="yes"), TypeError, "check_finite must be a bool"),
]


@pytest.mark.parametrize("override,error,message", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_input_raises_with_a_message(override, error, message):
    args = dict(tokens=X, attn=A, grid_hw=GRID, k=10)
    args.update(override)
    with pytest.raises(error) as info:
        prune(args.pop("tokens"), args.pop("attn"), args.pop("grid_hw"), args.pop("k"), **args)
    assert message in str(info.value)


def test_check_finite_rejects_nan_and_inf_only_when_asked():
    x = X.clone()
    x[1, 3, 2] = float("inf")
    prune(x, A, GRID, 10)  # default: no value check, the steps handle it
    with pytest.raises(ValueError, match="tokens holds NaN or Inf"):
        prune(x, A, GRID, 10, check_finite=True)
    a = A.clone()
    a[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="attn holds NaN or Inf"):
        prune(X, a, GRID, 10, check_finite=True)


def test_attn_without_heads_is_rejected():
    with pytest.raises(ValueError, match="attn has no heads"):
        prune(X, A[:, :0], GRID, 10)


def test_a_positional_prior_object_prunes_as_its_tensor():
    from d2pruner_kernels import PositionalPrior
    prior = PositionalPrior(GRID).update(torch.rand(3, 48, generator=torch.Generator().manual_seed(7)) + 0.2)
    out = prune(X, A, GRID, 10, prior=prior)
    assert torch.equal(out, prune(X, A, GRID, 10, prior=prior.as_tensor()))
    prior.update(torch.rand(48, generator=torch.Generator().manual_seed(8)) + 0.2)  # new data
    assert torch.equal(prune(X, A, GRID, 10, prior=prior),
                       prune(X, A, GRID, 10, prior=prior.as_tensor()))
    with pytest.raises(ValueError, match=r"prior is calibrated for grid \(6, 8\), got grid_hw \(8, 6\)"):
        prune(X, A, (8, 6), 10, prior=prior)


def test_check_finite_is_refused_under_compile():
    fn = torch.compile(lambda x, a: prune(x, a, GRID, 10, check_finite=True), backend="eager",
                       fullgraph=True)
    with pytest.raises(Exception, match="check_finite=True reads values"):
        fn(X, A)


@pytest.mark.parametrize("backend", ["reference", "kernels"])
def test_prior_broadcasts_from_one_row(backend):
    x, a, prior = X.to(DEVICE), A.to(DEVICE), (torch.rand(1, 48) + 0.5).to(DEVICE)
    assert torch.equal(prune(x, a, GRID, 10, prior=prior, backend=backend),
                       prune(x, a, GRID, 10, prior=prior[0], backend=backend))


@pytest.mark.skipif(DEVICE.type != "cuda", reason="TF32 exists on CUDA only")
def test_reference_float32_products_stay_ieee_under_tf32():
    """With TF32 allowed globally, the reference's float32 products are still the IEEE ones
    (float64 rounded once), and the global switch is left as the user set it."""
    from d2pruner_kernels.reference.numerics import matmul_fp32
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    saved = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        g = torch.Generator().manual_seed(0)
        a, b = (torch.randn(64, 4096, generator=g).to(DEVICE) for _ in range(2))
        assert torch.equal(matmul_fp32(a, b.T), (a.double() @ b.double().T).float())
        assert not torch.equal(a @ b.T, matmul_fp32(a, b.T)), "TF32 did not take effect"
        assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = saved


def test_dispatch_never_hands_other_devices_to_the_cpu_walk():
    from d2pruner_kernels import dispatch
    meta = torch.device("meta")
    assert not dispatch.use_compiled_mis("auto", meta, 48)
    with pytest.raises(RuntimeError, match="CPU tensors, got meta"):
        dispatch.use_compiled_mis("kernels", meta, 48)


def test_mixed_devices_are_rejected():
    meta = torch.empty(2, 48, device="meta")
    with pytest.raises(ValueError, match="attn is on meta but tokens is on cpu"):
        prune(X, meta, GRID, 10)


def test_stage_backends_reject_what_they_cannot_run():
    with pytest.raises(ValueError, match="backend must be one of"):
        d2p.debiased_scores(A, backend="fast")
    with pytest.raises(ValueError, match="query_row and key_span"):
        d2p.debiased_scores(torch.rand(1, 2, 5, 5))


# -- small inputs at the edges of the contract (docs/spec.md §9)

XS = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(5))
AS = torch.rand(2, 3, 16, generator=torch.Generator().manual_seed(6)) + 0.01


@pytest.mark.parametrize("backend", ["reference", "auto", "kernels"])
def test_a_huge_radius_means_the_whole_grid(backend):
    if backend == "kernels" and not (ON_GPU or interpreting()):
        pytest.skip("the Triton kernels need a GPU or the interpreter")
    x, a = XS.to("cuda" if ON_GPU else "cpu"), AS.to("cuda" if ON_GPU else "cpu")
    kw = dict(spatial_weight=0.5, sim_threshold=0.6, pivot_ratio=0.2, backend=backend)
    want = d2p.prune(x, a, (4, 4), 8, radius=4, temporal_radius=4, **kw)
    for r in (2**31, 2**63, 2**70):
        assert torch.equal(d2p.prune(x, a, (4, 4), 8, radius=r, temporal_radius=r, **kw), want)
    assert d2p.PruneOptions(radius=2**70).radius == 2**31 - 1
    order = torch.arange(16)[None].expand(2, -1).contiguous().to(x.device)
    g = d2p.similarity_graph(x, order, 3, (4, 4), radius=2**70, spatial_weight=0.5, backend=backend)
    assert torch.equal(g, d2p.similarity_graph(x, order, 3, (4, 4), radius=4,
                                               spatial_weight=0.5, backend=backend))


def test_an_unbatched_call_takes_a_one_row_prior():
    prior = torch.rand(16, generator=torch.Generator().manual_seed(2)) + 0.5
    want = d2p.prune(XS[0], AS[0], (4, 4), 6, prior=prior)
    assert torch.equal(d2p.prune(XS[0], AS[0], (4, 4), 6, prior=prior[None]), want)
    with pytest.raises(ValueError, match=r"prior has batch 2 but tokens has B=1"):
        d2p.prune(XS[0], AS[0], (4, 4), 6, prior=prior.expand(2, -1))


def test_check_finite_takes_a_numpy_bool():
    want = d2p.prune(XS, AS, (4, 4), 6)
    assert torch.equal(d2p.prune(XS, AS, (4, 4), 6, check_finite=np.bool_(True)), want)
    assert torch.equal(d2p.prune(XS, AS, (4, 4), 6, check_finite=np.bool_(False)), want)
    with pytest.raises(TypeError, match=r"check_finite must be a bool, got numpy.int64 1"):
        d2p.prune(XS, AS, (4, 4), 6, check_finite=np.int64(1))


@pytest.mark.parametrize("what", ["tokens", "attn", "prior", "graph tokens", "q", "k"])
def test_sparse_tensors_are_refused_at_the_check(what):
    sparse = lambda t: t.to_sparse()  # noqa: E731
    prior = torch.rand(16) + 0.5
    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 12, 8)
    calls = {
        "tokens": lambda: d2p.prune(sparse(XS), AS, (4, 4), 6),
        "attn": lambda: d2p.prune(XS, sparse(AS), (4, 4), 6),
        "prior": lambda: d2p.prune(XS, AS, (4, 4), 6, prior=sparse(prior)),
        "graph tokens": lambda: d2p.similarity_graph(sparse(XS), torch.arange(16)[None].expand(2, -1),
                                                     0, (4, 4), backend="reference"),
        "q": lambda: d2p.attention_scores(sparse(q), k, key_span=(0, 4), backend="reference"),
        "k": lambda: d2p.attention_scores(q, sparse(k), key_span=(0, 4), backend="reference"),
    }
    name = what.split()[-1]
    with pytest.raises(ValueError, match=rf"{name} must be a dense \(strided\) tensor"):
        calls[what]()

