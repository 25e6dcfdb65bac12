"""Triton debiased-scores kernel == reference, for every attention layout, dtype and prior."""
import pytest
import torch

import d2pruner_kernels as d2p
from d2pruner_kernels import reference
from helpers import DEVICE, distinct_attention

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_scores_equal(got, want):
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), "NaN/-inf positions differ"
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-6, atol=0)


def attn_in_layout(layout, b, h, n, dtype, g):
    a = distinct_attention(b, h, n, dtype=dtype, generator=g)
    if layout == "BN":
        return a[:, 0].to(DEVICE), {}
    if layout == "BHN":
        return a.to(DEVICE), {}
    if layout == "BHN_strided":  # heads and tokens interleaved in memory: a view, no copy
        return a.transpose(1, 2).contiguous().transpose(1, 2).to(DEVICE), {}
    # a query row of a full [B, H, L, L] map, visual keys at [3, 3 + n)
    L = n + 7
    full = torch.rand(b, h, L, L, generator=g).to(dtype)
    full[:, :, 2, 3:3 + n] = a
    return full.to(DEVICE), {"query_row": 2, "key_span": (3, 3 + n)}


@pytest.mark.parametrize("layout", ["BN", "BHN", "BHN_strided", "full_row"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prior_kind", [None, "N", "BN"])
@pytest.mark.parametrize("n", [1, 33, 577, 1500])
def test_scores_match_reference(layout, dtype, prior_kind, n):
    g = torch.Generator().manual_seed(n)
    b, h = 3, 5
    attn, kw = attn_in_layout(layout, b, h, n, dtype, g)
    prior = None
    if prior_kind:
        shape = (n,) if prior_kind == "N" else (b, n)
        prior = (torch.rand(shape, generator=g) + 0.25).to(DEVICE)
    got = d2p.debiased_scores(attn, prior, backend="kernels", **kw)
    want = d2p.debiased_scores(attn, prior, backend="reference", **kw)
    assert_scores_equal(got, want)
    # and the reference itself is the formula of docs/spec.md, step 1
    a = attn[:, :, kw["query_row"], slice(*kw["key_span"])] if kw else attn
    a = a.float() if a.dim() == 2 else a.float().mean(1)
    if prior is not None:
        a = a / (prior.float() + 1e-7)
    torch.testing.assert_close(want, a, rtol=1e-6, atol=0)


def test_nan_rows_and_values_rank_last():
    g = torch.Generator().manual_seed(0)
    attn = distinct_attention(3, 2, 50, generator=g)
    attn[0] = float("nan")          # a whole image
    attn[1, 1, 7] = float("nan")    # one head of one token
    attn = attn.to(DEVICE)
    got = d2p.debiased_scores(attn, backend="kernels")
    assert_scores_equal(got, reference.debiased_scores(attn))
    assert torch.isneginf(got[0]).all() and torch.isneginf(got[1, 7])
    assert torch.equal(reference.rank_order(got), reference.rank_order(reference.debiased_scores(attn)))


@pytest.mark.parametrize("h", [1, 8, 17, 32])
def test_head_counts_around_the_unrolled_step(h):
    """Heads are read 8 at a time: fewer, exactly 8, a ragged tail, several steps."""
    g = torch.Generator().manual_seed(h)
    attn = distinct_attention(2, h, 300, dtype=torch.bfloat16, generator=g).to(DEVICE)
    assert_scores_equal(d2p.debiased_scores(attn, backend="kernels"),
                        reference.debiased_scores(attn))


@pytest.mark.parametrize("eps", [0.0, 0.5])
def test_eps_reaches_the_division(eps):
    g = torch.Generator().manual_seed(11)
    attn = distinct_attention(2, 3, 70, generator=g).to(DEVICE)
    prior = (torch.rand(70, generator=g) + 0.1).to(DEVICE)
    want = attn.float().mean(1) / (prior + eps)
    for backend in ("kernels", "reference"):
        got = d2p.debiased_scores(attn, prior, eps, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_negative_zero_is_written_as_positive_zero():
    attn = torch.tensor([[0.0, -0.0, 1.0, -0.0]], device=DEVICE)
    got = d2p.debiased_scores(attn, backend="kernels")
    assert not torch.signbit(got).any()


def test_head_stride_beyond_32_bits():
    """A query row of a [B, H, L, L] map with (H-1)*L*L > 2^31: offsets must be 64-bit."""
    h, L, n = 9, 16384, 300
    try:  # 4.8 GB of address space, a few pages touched
        full = torch.empty(1, h, L, L, dtype=torch.float16, device=DEVICE)
    except (RuntimeError, MemoryError) as e:
        pytest.skip(f"cannot reserve a [1, {h}, {L}, {L}] tensor here: {e}")
    row = distinct_attention(1, h, n, dtype=torch.float16, generator=torch.Generator().manual_seed(2))
    full[:, :, L - 1, 5:5 + n] = row.to(DEVICE)
    kw = {"query_row": L - 1, "key_span": (5, 5 + n)}
    got = d2p.debiased_scores(full, backend="kernels", **kw)
    assert_scores_equal(got, reference.debiased_scores(row.to(DEVICE)))


def test_prior_shapes_broadcast_or_are_refused():
    attn = distinct_attention(3, 2, 20, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    prior = torch.rand(1, 20, device=DEVICE) + 0.5
    got = d2p.debiased_scores(attn, prior, backend="kernels")
    assert_scores_equal(got, reference.debiased_scores(attn, prior))
    with pytest.raises(ValueError, match=r"prior must be \[N\], \[1, N\] or \[B, N\]"):
        d2p.debiased_scores(attn, prior[:, :19], backend="kernels")
    with pytest.raises(ValueError, match="prior must be"):
        d2p.debiased_scores(attn, torch.rand(2, 20, device=DEVICE), backend="reference")


def test_inputs_are_not_modified():
    attn = distinct_attention(2, 3, 40, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    prior = torch.rand(40, device=DEVICE) + 0.5
    a0, p0 = attn.clone(), prior.clone()
    d2p.debiased_scores(attn, prior, backend="kernels")
    assert torch.equal(attn, a0) and torch.equal(prior, p0)
