"""Triton rank kernel == torch.sort(descending, stable) exactly; its norms == vector_norm."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import d2pruner_kernels as d2p
from d2pruner_kernels import reference
from helpers import DEVICE

SORT = dict(dim=-1, descending=True, stable=True)


def rank_module():
    from d2pruner_kernels.kernels import rank  # Triton: imported after conftest's setup
    return rank


def scores_with_ties(b, n, g):
    """Few distinct values (many ties), NaN, +-inf and -0.0 sprinkled in."""
    s = torch.randint(-4, 5, (b, n), generator=g).float() / 4
    specials = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0])
    pick = torch.rand(b, n, generator=g) < 0.2
    s[pick] = specials[torch.randint(0, 5, (int(pick.sum()),), generator=g)]
    return s


@pytest.mark.parametrize("n", [1, 2, 63, 64, 65, 577, 1500])
@pytest.mark.parametrize("kind", ["ties", "distinct"])
def test_rank_equals_stable_sort(n, kind):
    g = torch.Generator().manual_seed(n)
    s = scores_with_ties(3, n, g) if kind == "ties" else torch.randn(3, n, generator=g)
    s = s.to(DEVICE)
    order, norms = rank_module().rank_and_norms(s, None)
    assert norms is None and order.dtype == torch.int64
    assert torch.equal(order, torch.sort(s, **SORT).indices)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1,
                max_size=300))
def test_rank_equals_stable_sort_on_any_floats(values):
    """Subnormals, signed zeros, infinities, NaN, duplicates: whatever float32 holds."""
    s = torch.tensor(values, dtype=torch.float32)[None].to(DEVICE)
    assert torch.equal(rank_module().rank_and_norms(s, None)[0], reference.rank_order(s))


def test_negative_nan_ranks_first_like_any_nan():
    s = torch.tensor([[1.0, float("nan"), 2.0, -float("nan"), float("inf")] * 40]).to(DEVICE)
    assert torch.signbit(s[0, 3]) and torch.isnan(s[0, 3])
    want = torch.tensor([i for i in range(200) if i % 5 in (1, 3)]
                        + [i for i in range(200) if i % 5 == 4]
                        + [i for i in range(200) if i % 5 == 2]
                        + [i for i in range(200) if i % 5 == 0])
    assert reference.rank_order(s)[0].tolist() == want.tolist()
    assert d2p.rank_order(s, backend="kernels")[0].tolist() == want.tolist()


def test_rank_order_stage_backends_agree_and_big_n_falls_back(monkeypatch):
    g = torch.Generator().manual_seed(7)
    s = scores_with_ties(2, 300, g).to(DEVICE)
    want = reference.rank_order(s)
    assert torch.equal(d2p.rank_order(s, backend="kernels"), want)
    monkeypatch.setattr(rank_module(), "MAX_N", 100)  # past the limit: torch.sort ranks
    ranked, rank_and_norms = [], rank_module().rank_and_norms
    monkeypatch.setattr(rank_module(), "rank_and_norms", lambda scores, tokens: (
        ranked.append(scores is not None) or rank_and_norms(scores, tokens)))
    assert torch.equal(d2p.rank_order(s, backend="kernels"), want)
    assert ranked == []  # the dispatcher sorted, the kernel never ranked
    x = torch.randn(2, 300, 9, generator=g).to(DEVICE)
    _, norms = rank_module().rank_and_norms(None, x)  # the norms still from the kernel
    torch.testing.assert_close(norms, torch.linalg.vector_norm(x, dim=-1), rtol=2e-6, atol=0)
    # prune()'s fused path past the limit: torch.sort ranks, the kernels do the rest
    a = torch.rand(2, 300, generator=g).to(DEVICE)
    assert torch.equal(d2p.prune(x, a, (15, 20), 40, backend="kernels"),
                       d2p.prune(x, a, (15, 20), 40, backend="reference"))
    assert True not in ranked  # the kernel made norms only


def test_rank_order_of_other_dtypes_and_shapes_is_torch_sort():
    """float64 scores closer than a float32 ulp, bf16 scores, one unbatched row: never
    squeezed through the float32 kernel."""
    base = torch.tensor([1.0, 1.0 + 1e-12, 0.5, 1.0 + 2e-12], dtype=torch.float64)
    for s in (base[None], base[None].bfloat16(), base.float()):
        s = s.to(DEVICE)
        assert torch.equal(d2p.rank_order(s, backend="kernels"), torch.sort(s, **SORT).indices)
    assert d2p.rank_order(base[None].to(DEVICE), backend="kernels")[0].tolist() == [3, 1, 0, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,d", [(1, 1), (5, 37), (130, 2049), (577, 64)])
def test_norms_match_vector_norm(dtype, n, d):
    g = torch.Generator().manual_seed(n + d)
    x = (3 * torch.randn(2, n, d, generator=g)).to(dtype).to(DEVICE)
    x[0, 0] = 0  # a zero row has norm 0 (the graph clamps it later)
    s = torch.randn(2, n, generator=g).to(DEVICE)
    order, norms = rank_module().rank_and_norms(s, x)  # both jobs in one launch
    want = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)
    torch.testing.assert_close(norms, want, rtol=2e-6, atol=0)
    assert norms[0, 0] == 0
    assert torch.equal(order, torch.sort(s, **SORT).indices)


def test_norms_of_strided_tokens():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 40, 2, 33, generator=g).to(DEVICE)[:, :, 1]  # row stride 66
    _, norms = rank_module().rank_and_norms(None, x)
    torch.testing.assert_close(norms, torch.linalg.vector_norm(x, dim=-1), rtol=2e-6, atol=0)
