"""prune_varlen against its contract: each image's block equals prune() on that image's
slice plus the image's offset, exactly, on every backend; misuse raises before any work,
naming the image."""
import math

import pytest
import torch

import d2pruner_kernels as d2p
from d2pruner_kernels import PositionalPrior, prune, prune_varlen
from helpers import DEVICE, clustered_tokens, distinct_attention

BACKENDS = ["reference", "kernels"]


def packed(grids, d, heads, seed, dtype=torch.float32, clusters=5):
    """Packed tokens [total, D], attention [H, total] (or [total] for heads=0), cu_seqlens."""
    g = torch.Generator().manual_seed(seed)
    lengths = [math.prod(gr) for gr in grids]
    x = torch.cat([clustered_tokens(1, n, d, clusters=clusters, generator=g)[0] for n in lengths])
    if heads:
        a = torch.cat([distinct_attention(1, heads, n, generator=g)[0] for n in lengths], dim=1)
    else:
        a = torch.cat([distinct_attention(1, 1, n, generator=g)[0, 0] for n in lengths])
    cu = torch.tensor([0] + lengths).cumsum(0)
    return x.to(dtype=dtype, device=DEVICE), a.to(DEVICE), cu


def per_image(x, a, cu, grids, ks, prior=None, **options):
    """The contract's right-hand side, image by image."""
    out = []
    for b, grid in enumerate(grids):
        s, e = int(cu[b]), int(cu[b + 1])
        p = prior if prior is None or isinstance(prior, PositionalPrior) else prior[s:e]
        if isinstance(p, PositionalPrior):
            p = p.resized(grid) if tuple(p.grid) != tuple(grid) else p
        out.append(prune(x[s:e], a[..., s:e], grid, ks[b], prior=p, **options) + s)
    return out


def check(x, a, cu, grids, k, ks, prior=None, **options):
    keep, cu_keep = prune_varlen(x, a, cu, grids, k, prior=prior, **options)
    want = per_image(x, a, cu, grids, ks, prior=prior, **options)
    assert keep.dtype == torch.int64 and keep.device == x.device
    assert cu_keep.dtype == cu.dtype and cu_keep.tolist() == [0] + torch.tensor(ks).cumsum(0).tolist()
    for b, w in enumerate(want):
        assert torch.equal(keep[cu_keep[b]:cu_keep[b + 1]], w), b
    return keep, cu_keep


MIXED = [(6, 7), (2, 4, 5), (9, 9), (5, 11), (3, 3, 3)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_mixed_grids_and_budgets(backend, dtype):
    x, a, cu = packed(MIXED, 24, 3, seed=1, dtype=dtype)
    lengths = [math.prod(g) for g in MIXED]
    ks = [1, lengths[1], 17, 30, 9]  # k_b = 1 and k_b = N_b among them
    check(x, a, cu, MIXED, ks, ks, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_ratio_for_every_image_and_spatial_options(backend):
    x, a, cu = packed(MIXED, 16, 2, seed=2)
    ks = [max(1, math.floor(0.3 * math.prod(g) + 0.5)) for g in MIXED]
    check(x, a, cu, MIXED, 0.3, ks, spatial_weight=0.5, radius=1, temporal_radius=0,
          pivot_ratio=0.5, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_image_and_one_large_among_small(backend):
    x, a, cu = packed([(12, 12)], 16, 4, seed=3)
    check(x, a, cu, [(12, 12)], 20, [20], backend=backend)
    grids = [(2, 3), (3, 2), (16, 16), (1, 1), (2, 2)]
    x, a, cu = packed(grids, 8, 0, seed=4)  # attn [total]: no heads
    ks = [3, 6, 40, 1, 2]
    check(x, a, cu, grids, ks, ks, backend=backend)


def test_many_small_images():
    grids = [(4 + i % 3, 5 + i % 4) for i in range(64)]
    x, a, cu = packed(grids, 12, 2, seed=5)
    ks = [1 + (i * 7) % (math.prod(g)) for i, g in enumerate(grids)]
    check(x, a, cu, grids, ks, ks, backend="reference")
    check(x, a, cu, grids, torch.tensor(ks, dtype=torch.int32), ks, backend="auto")


@pytest.mark.parametrize("backend", BACKENDS)
def test_equal_images_equal_the_batched_prune(backend):
    grids = [(7, 9)] * 4
    x, a, cu = packed(grids, 20, 3, seed=6)
    prior = 0.5 + torch.rand(x.shape[0], generator=torch.Generator().manual_seed(0)).to(DEVICE)
    keep, cu_keep = check(x, a, cu, grids, 15, [15] * 4, prior=prior, backend=backend)
    batched = prune(x.view(4, 63, 20), a.view(3, 4, 63).transpose(0, 1), (7, 9), 15,
                    prior=prior.view(4, 63), backend=backend)
    assert torch.equal(keep.view(4, 15) - cu[:-1, None].to(DEVICE), batched)


def test_int32_offsets_packed_prior_and_positional_prior():
    x, a, cu = packed(MIXED, 16, 2, seed=7)
    cu32 = cu.to(torch.int32)
    ks = [5, 7, 9, 11, 13]
    keep, cu_keep = check(x, a, cu32, MIXED, ks, ks)
    assert cu_keep.dtype == torch.int32
    packed_prior = 0.2 + torch.rand(x.shape[0], generator=torch.Generator().manual_seed(1)).to(DEVICE)
    check(x, a, cu, MIXED, ks, ks, prior=packed_prior)
    pp = PositionalPrior((6, 7)).update(0.5 + torch.rand(3, 42, generator=torch.Generator().manual_seed(2)))
    grids = [(6, 7), (9, 9), (5, 11)]  # 2-D grids: the prior is resized to each one
    x, a, cu = packed(grids, 16, 2, seed=8)
    keep, _ = check(x, a, cu, grids, 12, [12] * 3, prior=pp)
    without, _ = prune_varlen(x, a, cu, grids, 12)
    assert not torch.equal(keep, without)  # the prior was used


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_unchanged_and_repeatable(backend):
    x, a, cu = packed(MIXED, 16, 2, seed=9)
    copies = [t.clone() for t in (x, a, cu)]
    first = prune_varlen(x, a, cu, MIXED, 10, backend=backend)
    second = prune_varlen(x, a, cu, MIXED, 10, backend=backend)
    assert all(torch.equal(t, c) for t, c in zip((x, a, cu), copies))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_pruned_batch_is_tokens_at_keep():
    x, a, cu = packed(MIXED, 16, 2, seed=10)
    keep, cu_keep = prune_varlen(x, a, cu, MIXED, 0.25)
    pruned = x[keep]
    for b in range(len(MIXED)):
        s = int(cu[b])
        rows = prune(x[s:int(cu[b + 1])], a[..., s:int(cu[b + 1])], MIXED[b], 0.25) + s
        assert torch.equal(pruned[cu_keep[b]:cu_keep[b + 1]], x[rows])


def test_grids_as_a_tensor():
    grids = [(6, 7), (9, 9)]
    x, a, cu = packed(grids, 16, 2, seed=11)
    want, _ = prune_varlen(x, a, cu, grids, 10)
    got, _ = prune_varlen(x, a, cu, torch.tensor(grids), 10)
    assert torch.equal(got, want)
    got3, _ = prune_varlen(x, a, cu, torch.tensor([(1, 6, 7), (1, 9, 9)]), 10)
    assert torch.equal(got3, want)


def _bad():
    grids = [(3, 4), (2, 5)]
    x, a, cu = packed(grids, 8, 2, seed=12)
    return x, a, cu, grids


MISUSE = [
    (lambda x, a, cu, g: (x, a, cu, g, 0), ValueError, r"image 0: k: k must be in \[1, N=12\], got 0"),
    (lambda x, a, cu, g: (x, a, cu, g, [3, 11]), ValueError, r"image 1: k\[1\]: k must be in \[1, N=10\], got 11"),
    (lambda x, a, cu, g: (x, a, cu, g, [3]), ValueError, r"k must have one budget per image \(2\), got 1"),
    (lambda x, a, cu, g: (x, a, torch.tensor([0, 10, 22]), g, 3), ValueError,
     r"image 0: grid \(3, 4\) has 12 cells but its segment cu_seqlens\[0:2\] = \(0, 10\) holds 10 tokens"),
    (lambda x, a, cu, g: (x, a, torch.tensor([0, 12, 10]), g, 3), ValueError,
     r"cu_seqlens must be non-decreasing: cu_seqlens\[2\]=10 < cu_seqlens\[1\]=12"),
    (lambda x, a, cu, g: (x, a, torch.tensor([1, 12, 22]), g, 3), ValueError, r"cu_seqlens\[0\] must be 0, got 1"),
    (lambda x, a, cu, g: (x, a, torch.tensor([0, 12, 12, 22]), [(3, 4), (1, 1), (2, 5)], 1), ValueError,
     r"image 1 is empty: cu_seqlens\[1\] = cu_seqlens\[2\] = 12"),
    (lambda x, a, cu, g: (x, a, cu.float(), g, 3), TypeError, r"cu_seqlens must be int32 or int64, got torch.float32"),
    (lambda x, a, cu, g: (x, a, cu[:2], g, 3), ValueError, r"cu_seqlens must be \[B \+ 1\] = \[3\] for 2 grids, got shape \[2\]"),
    (lambda x, a, cu, g: (x, a, cu, [(3, 4), (2, 6)], 3), ValueError,
     r"image 1: grid \(2, 6\) has 12 cells but its segment cu_seqlens\[1:3\] = \(12, 22\) holds 10 tokens"),
    (lambda x, a, cu, g: (x, a, torch.tensor([0, 12, 24]), [(3, 4), (2, 6)], 3), ValueError,
     r"the grids hold 24 tokens in all but tokens has 22"),
    (lambda x, a, cu, g: (x, a, cu, [(3, 4), (2, 5.0)], 3), TypeError, r"grids\[1\] entries must be an int"),
    (lambda x, a, cu, g: (x, a, cu, [], 3), TypeError, r"grids must be a non-empty list"),
    (lambda x, a, cu, g: (x, a[:, :-1], cu, g, 3), ValueError, r"attn has 21 packed tokens but tokens has 22"),
    (lambda x, a, cu, g: (x[None], a, cu, g, 3), ValueError, r"tokens must be 2-D, got shape \[1, 22, 8\]"),
    (lambda x, a, cu, g: (x.long(), a, cu, g, 3), TypeError, r"tokens must be float16, bfloat16 or float32"),
    (lambda x, a, cu, g: (x, a, cu, torch.tensor([3, 4]), 3), ValueError, r"grids as a tensor must be int32/int64 \[B, 2\] or \[B, 3\]"),
    (lambda x, a, cu, g: (x, a, cu, g, torch.tensor([3, 4, 5])), ValueError, r"k as a tensor must be int32/int64 \[B\] = \[2\]"),
]


@pytest.mark.parametrize("make, error, message", MISUSE)
def test_misuse_raises_naming_what_is_wrong(make, error, message):
    with pytest.raises(error, match=message):
        prune_varlen(*make(*_bad()))


def test_bad_prior_and_options():
    x, a, cu, grids = _bad()
    with pytest.raises(ValueError, match=r"prior must be packed like tokens: \[total\] = \[22\], got \[12\]"):
        prune_varlen(x, a, cu, grids, 3, prior=torch.rand(12) + 1)
    with pytest.raises(ValueError, match=r"image 1: prior must be positive everywhere"):
        prune_varlen(x, a, cu, grids, 3, prior=torch.cat([torch.ones(12), -torch.ones(10)]))
    with pytest.raises(ValueError, match=r"sim_threshold must be in \[-1.0, 1.0\], got 2.0"):
        prune_varlen(x, a, cu, grids, 3, sim_threshold=2.0)
    with pytest.raises(ValueError, match=r"backend must be one of"):
        prune_varlen(x, a, cu, grids, 3, backend="gpu")
    with pytest.raises(ValueError, match=r"image 0: tokens holds NaN or Inf values"):
        prune_varlen(torch.full_like(x, float("nan")), a, cu, grids, 3, check_finite=True)


def test_exported():
    assert d2p.prune_varlen is prune_varlen
