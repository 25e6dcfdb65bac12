"""prune_varlen against its contract: each image's block equals prune() on that image's
slice plus the image's offset, exactly, on every backend; misuse raises before any work,
naming the image."""
import collections
import math

import pytest
import torch

import d2pruner_kernels as d2p
from d2pruner_kernels import PositionalPrior, dispatch, prune, prune_varlen
from d2pruner_kernels.checks import as_3d, pivot_count
from d2pruner_kernels.kernels import mis as mis_kernel
from d2pruner_kernels.options import PruneOptions
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
    (lambda x, a, cu, g: (x, a, cu, [], 3), ValueError, r"grids is empty: an empty batch \(B=0\)"),
    (lambda x, a, cu, g: (x, a, cu, {"a": 1}, 3), TypeError, r"grids must be a list .* got dict"),
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
    bad_attn = a.clone()
    bad_attn[1, 15] = float("inf")  # a token of image 1 (tokens 12..21)
    with pytest.raises(ValueError, match=r"image 1: attn holds NaN or Inf values"):
        prune_varlen(x, bad_attn, cu, grids, 3, check_finite=True)
    prune_varlen(x, bad_attn, cu, grids, 3)  # without check_finite: values are not read
    with pytest.raises(ValueError, match=r"image 0: tokens holds NaN or Inf values"):
        prune_varlen(torch.full_like(x, float("nan")), a, cu, grids, 3, check_finite=True)


def test_exported():
    assert d2p.prune_varlen is prune_varlen


# -- the fused ragged path (kernels backend): one launch per stage, equal to each image's prune


@pytest.fixture
def kernels_varlen():
    """The kernels backend's ragged path, with fresh plans (tests that change the graph's
    configuration must not reuse a table built under another)."""
    from d2pruner_kernels.kernels import varlen
    varlen._cache.clear()
    varlen._captured.clear()
    yield varlen
    varlen._cache.clear()
    varlen._captured.clear()


class Launches:
    """Counts every kernel launch of the fused path: the Triton kernels through the module
    globals their launch wrappers call, the MIS through the extension; the per-image path
    (dispatch.select) must not run at all."""

    def __init__(self, monkeypatch):
        from d2pruner_kernels.kernels import graph, rank, scores
        self.counts = collections.Counter()
        for stage, module, name in (("scores", scores, "_debiased_scores_kernel"),
                                    ("rank", rank, "_rank_norms_kernel"),
                                    ("graph", graph, "_ragged_graph_kernel"),
                                    ("dense graph", graph, "_graph_kernel"),
                                    ("dense graph", graph, "_slice_kernel"),
                                    ("dense graph", graph, "_sum_slices_kernel")):
            monkeypatch.setattr(module, name, self._kernel(stage, getattr(module, name)))
        for name in ("mis_rounds_cpu", "mis_rounds_cuda"):
            if hasattr(mis_kernel._C, name):
                monkeypatch.setattr(mis_kernel._C, name, self._call("mis", getattr(mis_kernel._C, name)))

        def per_image(*args, **kwargs):
            raise AssertionError("prune_varlen ran images one by one")
        monkeypatch.setattr(dispatch, "select", per_image)

    def _kernel(self, stage, kernel):
        counts = self.counts

        class Counted:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    counts[stage] += 1
                    return kernel[grid](*args, **kwargs)
                return launch
        return Counted()

    def _call(self, stage, fn):
        def call(*args):
            self.counts[stage] += 1
            return fn(*args)
        return call


def grouped(x, a, cu, grids, ks, prior=None, **options):
    """The contract's right-hand side for many images at once: the images of equal grid and
    budget go through one batched prune() (batched == per image, test_prune.py), each
    result then placed at its image with its offset added."""
    groups = collections.defaultdict(list)
    for b, (grid, k) in enumerate(zip(grids, ks)):
        groups[(tuple(grid), k)].append(b)
    out = [None] * len(grids)
    d = x.shape[-1]
    for (grid, k), members in groups.items():
        n = math.prod(grid)
        starts = [int(cu[b]) for b in members]
        xs = torch.stack([x[s:s + n] for s in starts])
        as_ = torch.stack([a[..., s:s + n] for s in starts])
        ps = None if prior is None else torch.stack([prior[s:s + n] for s in starts])
        kept = prune(xs.view(len(members), n, d), as_, grid, k, prior=ps, **options)
        for row, b, s in zip(kept, members, starts):
            out[b] = row + s
    return torch.cat(out)


def fused_check(x, a, cu, grids, k, ks, prior=None, **options):
    keep, cu_keep = prune_varlen(x, a, cu, grids, k, prior=prior, backend="kernels", **options)
    want = grouped(x, a, cu, grids, ks, prior=prior, backend="kernels", **options)
    assert torch.equal(keep, want)
    assert cu_keep.tolist() == [0] + torch.tensor(ks).cumsum(0).tolist()
    return keep


SMALL = [(4, 5), (5, 6), (2, 3, 4), (6, 6)]  # mixed 2-D and 3-D grids


@pytest.mark.parametrize("large", [False, True])
def test_fused_path_is_one_launch_per_stage(monkeypatch, kernels_varlen, large):
    """64 small images of mixed 2-D / 3-D grids, budgets k_b = 1, N_b and between (and a
    16 x 16 image among them, whose graph takes the lazy prefix: two row ranges): scores,
    rank and the graph's row ranges are one launch each for the whole batch, the MIS one
    per range; the selection is each image's own prune(). A second call reuses the plan."""
    grids = [SMALL[i % 4] for i in range(64)]
    if large:
        grids[17] = (16, 16)
    lengths = [math.prod(g) for g in grids]
    ks = [(1, n, max(1, n // 3))[i % 3] for i, n in enumerate(lengths)]
    if large:
        ks[17] = 20
    x, a, cu = packed(grids, 12, 2, seed=20)
    want = grouped(x, a, cu, grids, ks, backend="kernels")
    launches = Launches(monkeypatch)
    keep, _ = prune_varlen(x, a, cu, grids, ks, backend="kernels")
    assert torch.equal(keep, want)
    (plan,) = kernels_varlen._cache.values()
    ranges = plan.ranges  # on a GPU: 1 while the batch's tiles fit one wave on the SMs
    assert ranges == (2 if large and DEVICE.type == "cpu" else 1)
    assert launches.counts == {"scores": 1, "rank": 1, "graph": ranges, "mis": ranges}
    assert plan.table.shape == (ranges, 64, 16)
    again, _ = prune_varlen(x, a, cu, grids, ks, backend="kernels")
    assert torch.equal(again, keep) and len(kernels_varlen._cache) == 1


def test_fused_top_k_only_needs_no_graph(monkeypatch, kernels_varlen):
    grids = [(3, 4), (5, 5), (2, 2, 3)]
    x, a, cu = packed(grids, 8, 2, seed=21)
    ks = [5, 25, 1]
    want = grouped(x, a, cu, grids, ks, pivot_ratio=1.0, backend="kernels")
    launches = Launches(monkeypatch)
    keep, _ = prune_varlen(x, a, cu, grids, ks, pivot_ratio=1.0, backend="kernels")
    assert torch.equal(keep, want)
    assert launches.counts == {"scores": 1, "rank": 1, "mis": 1}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_every_dtype_spatial_and_prior(kernels_varlen, dtype):
    """β > 0 (the grid of each image in the graph kernel), a 3-D grid with its frames, a
    packed prior, pivot_ratio 0 (a pure MIS) on some budgets."""
    grids = [(6, 7), (2, 4, 5), (9, 9), (5, 11), (3, 3, 3), (1, 1)]
    x, a, cu = packed(grids, 24, 3, seed=22, dtype=dtype)
    prior = 0.5 + torch.rand(x.shape[0], generator=torch.Generator().manual_seed(3)).to(DEVICE)
    ks = [7, 40, 12, 55, 27, 1]
    fused_check(x, a, cu, grids, ks, ks, prior=prior, spatial_weight=0.4, radius=1,
                temporal_radius=1, sim_threshold=0.6)
    fused_check(x, a, cu, grids, ks, ks, pivot_ratio=0.0)


def test_fused_mixed_pivots_per_image(kernels_varlen):
    """n_pivots_b = k_b (top-k only, no graph rows) beside images with supplements, through
    dispatch.select_varlen itself (prune_varlen has one pivot ratio for all), against
    dispatch.select image by image."""
    grids = [(6, 7), (4, 5), (9, 9), (2, 3, 4), (5, 5)]
    x, a, cu = packed(grids, 16, 2, seed=23)
    ks = [10, 20, 30, 6, 25]
    n_pivots = [10, 3, 30, 0, pivot_count(0.7, 25)]
    images = [(int(cu[b]), int(cu[b + 1])) for b in range(len(grids))]
    grids3 = [as_3d(g) for g in grids]
    opts = PruneOptions(spatial_weight=0.25, backend="kernels")
    got = dispatch.select_varlen(x, a, images, grids3, ks, n_pivots, [None] * 5, None, opts)
    want = torch.cat([dispatch.select(x[s:e][None], a[:, s:e][None], None, g, k, n_p, opts)[0] + s
                      for (s, e), g, k, n_p in zip(images, grids3, ks, n_pivots)])
    assert torch.equal(got, want)


def test_fused_k_slices_as_each_image_gets_alone(monkeypatch, kernels_varlen):
    """Each image's dot products summed in the K slices it gets in its own prune() (there,
    on a CPU: split-K launches; in the ragged launch: in-program slices), bit for bit. The
    slice count is forced per image size (on a GPU it depends on the image's tiles)."""
    from d2pruner_kernels.kernels import graph
    config = graph.default_config
    block_k = 8 if DEVICE.type == "cpu" else 32  # a GPU dot needs K >= 16

    def small_k_steps(dtype, d):
        return dict(config(dtype, d), BLOCK_K=block_k)
    monkeypatch.setattr(graph, "default_config", small_k_steps)
    monkeypatch.setattr(graph, "split_count", lambda tiles, k_steps, device: 3 if tiles == 1 else 2)
    grids = [(6, 7), (9, 9), (12, 12), (2, 4, 5)]  # one tile each but (12, 12) (at BLOCK 64)
    x, a, cu = packed(grids, 5 * block_k, 2, seed=24)  # 5 K steps: slices 2 + 2 + 1 or 3 + 2
    ks = [20, 30, 50, 15]
    fused_check(x, a, cu, grids, ks, ks, spatial_weight=0.3)


@pytest.mark.parametrize("max_n", [None, 40])
def test_fused_rank_ties_nan_and_images_above_the_rank_kernel(monkeypatch, kernels_varlen,
                                                              max_n):
    """NaN attention (score -inf, ranks last) and exact ties (to the smaller index) in some
    images; with the rank kernel's limit lowered below some images, the whole batch is
    ranked by one padded torch.sort, -inf pads behind each image's -inf scores."""
    from d2pruner_kernels.kernels import rank
    if max_n is not None:
        monkeypatch.setattr(rank, "MAX_N", max_n)
    grids = [(6, 7), (4, 5), (9, 9), (3, 3, 3)]
    x, a, cu = packed(grids, 16, 2, seed=25)
    a[:, 3:20] = float("nan")          # image 0: many -inf scores
    a[:, 62:70] = 0.5                  # image 1: ties
    a[:, 70:150:3] = float("nan")      # image 2
    ks = [30, 12, 40, 9]
    fused_check(x, a, cu, grids, ks, ks)
    if max_n is not None:
        (plan,) = kernels_varlen._cache.values()
        assert plan.sort_rank


def test_only_the_kernels_take_the_fused_path(monkeypatch, kernels_varlen):
    """The reference and the CPU 'auto' path run image by image."""
    def never(*args, **kwargs):
        raise AssertionError("the fused path ran")
    monkeypatch.setattr(kernels_varlen, "prune_ragged", never)
    x, a, cu = packed(MIXED, 16, 2, seed=26)
    for backend in ("reference",) + (("auto",) if DEVICE.type == "cpu" else ()):
        keep, _ = prune_varlen(x, a, cu, MIXED, 9, backend=backend)
        assert torch.equal(keep, torch.cat(per_image(x, a, cu, MIXED, [9] * 5, backend=backend)))


def test_fused_equals_the_reference_on_band_free_inputs(kernels_varlen, monkeypatch):
    """The fused kernels against the plain-torch reference (not only against the per-image
    kernels): each image drawn outside the parity band, where every backend must agree."""
    from d2pruner_kernels.testing import band_free
    grids, ks = [(6, 7), (2, 4, 5), (9, 9), (5, 11)], [9, 14, 20, 1]
    xs, attns = [], []
    for i, (grid, k) in enumerate(zip(grids, ks)):
        n = math.prod(grid)

        def draw(t, n=n, i=i):
            g = torch.Generator().manual_seed(100 * i + t)
            return (clustered_tokens(1, n, 16, generator=g),
                    distinct_attention(1, 2, n, generator=g), None)
        x, a, _ = band_free(draw, pivot_count(0.7, k), grid)
        xs.append(x[0])
        attns.append(a[0])
    x, a = torch.cat(xs).to(DEVICE), torch.cat(attns, dim=1).to(DEVICE)
    cu = torch.tensor([0] + [math.prod(g) for g in grids]).cumsum(0)
    calls, prune_ragged = [], kernels_varlen.prune_ragged
    monkeypatch.setattr(kernels_varlen, "prune_ragged",
                        lambda *args: calls.append(1) or prune_ragged(*args))
    keep, _ = prune_varlen(x, a, cu, grids, ks, backend="kernels")
    assert calls == [1]  # the fused path ran
    assert torch.equal(keep, torch.cat(per_image(x, a, cu, grids, ks, backend="reference")))


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a GPU")
def test_fused_on_gpu_never_syncs_and_replays_from_a_cuda_graph(kernels_varlen):
    """A new layout and a cached one, cu_seqlens on the GPU too, under
    set_sync_debug_mode('error'); then captured once and replayed on new values."""
    grids = [(24, 24), (16, 20), (2, 8, 8), (10, 10)]
    ks = [64, 80, 32, 10]
    x, a, cu = packed(grids, 64, 4, seed=30, dtype=torch.bfloat16)
    cu = cu.to(DEVICE)
    want = grouped(x, a, cu.cpu(), grids, ks, backend="kernels")
    prune_varlen(x, a, cu, grids, ks, backend="kernels")  # Triton compiles on first use
    kernels_varlen._cache.clear()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        first, cu_keep = prune_varlen(x, a, cu, grids, ks, backend="kernels")  # new layout
        second, _ = prune_varlen(x, a, cu, grids, ks, backend="kernels")       # cached
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(first, want) and torch.equal(second, want)
    assert cu_keep.device == cu.device and cu_keep.tolist() == [0, 64, 144, 176, 186]

    xs, as_ = x.clone(), a.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph wants
        prune_varlen(xs, as_, cu, grids, ks, backend="kernels")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, out_cu = prune_varlen(xs, as_, cu, grids, ks, backend="kernels")
    x2, a2, _ = packed(grids, 64, 4, seed=31, dtype=torch.bfloat16)
    xs.copy_(x2)
    as_.copy_(a2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, grouped(x2, a2, cu.cpu(), grids, ks, backend="kernels"))
    assert out_cu.tolist() == [0, 64, 144, 176, 186]


@pytest.mark.parametrize("splits,d", [(2, 64), (3, 96)])
def test_ragged_graph_sums_each_image_in_its_own_slices(monkeypatch, splits, d):
    """The ragged graph launch against the dense one, bit for bit, on an image whose edge
    depends on the order of the sum (test_graph_kernel.py's input: summed in K order the 3s
    survive, slice by slice they round away) beside an image of another size that keeps
    one slice: each image's edges are those of its own slices."""
    from d2pruner_kernels import layout
    from d2pruner_kernels.kernels import graph, rank
    from d2pruner_kernels.kernels import varlen as kernels_varlen
    cfg = dict(BLOCK=64, BLOCK_K=16, num_warps=4, num_stages=1)
    monkeypatch.setattr(graph, "default_config", lambda dtype, dim: dict(cfg))
    monkeypatch.setattr(graph, "split_count", lambda tiles, k_steps, device: splits if tiles == 1 else 1)
    xa = torch.randn(20, d, generator=torch.Generator().manual_seed(d))
    xa[:2] = 0.0
    xa[0, [0, 16, 32, 48]] = torch.tensor([1e4, 3.0, 1e4, 3.0])
    xa[1, [0, 16, 32, 48]] = torch.tensor([1e4, 1.0, -1e4, 1.0])
    xb = clustered_tokens(1, 100, d, generator=torch.Generator().manual_seed(1))[0]
    x = torch.cat([xa, xb]).to(DEVICE)
    order = torch.cat([torch.arange(20), torch.arange(100)]).to(DEVICE)
    params = PruneOptions(sim_threshold=1e-8)
    p = kernels_varlen.Plan([(0, 20), (20, 120)], [(1, 1, 20), (1, 10, 10)], [10, 30], [0, 0],
                            d, x.dtype, x.device)
    from d2pruner_kernels.kernels import ragged
    assert p.ranges == 1
    assert p.table[0, :, ragged.SLICE_STEPS].tolist() == [-(-(d // 16) // splits), d // 16]  # K steps
    adj = torch.empty(p.adj_words, dtype=torch.int32, device=DEVICE)
    norms = rank.rank_and_norms(None, x[None])[1][0]
    graph.ragged_rows(x, norms, order, adj, p.table[0], p.range_tiles[0], params, p.config)
    got_a = layout.unpack_lower(adj[:20].view(1, 20, 1), 20)
    got_b = layout.unpack_lower(adj[20:].view(1, 100, 4), 100)

    def dense(xs, n, **extra):
        a = graph.similarity_graph(xs[None].to(DEVICE), torch.arange(n, device=DEVICE)[None], 0,
                                   (1, 1, n), params, config=dict(cfg, **extra))
        return layout.unpack_lower(a, n)
    assert dense(xa, 20, SPLITS=1)[0, 1, 0] and not got_a[0, 1, 0]  # the order decides it
    assert torch.equal(got_a, dense(xa, 20, SPLITS=splits, SPLIT_LAUNCH=True))
    assert torch.equal(got_b, dense(xb, 100, SPLITS=1))


def test_ragged_table_lays_images_back_to_back():
    """The one row builder (kernels/ragged.py): offsets are the sums of the sizes before
    each image, each range's tiles follow the images' lower-triangle tiles of its rows."""
    from d2pruner_kernels.kernels import ragged
    ranges = [[(0, 64), (0, 0), (0, 128)], [(64, 100), (0, 0), (128, 130)]]
    t = ragged.build_table([110, 3, 135], [10, 3, 5], [20, 3, 30], ranges=ranges, block=64,
                           grids=[(1, 10, 11), (1, 1, 3), (3, 5, 9)], slice_steps=[4, 1, 2],
                           rank_block=32)
    first, second = t.rows
    assert [r[ragged.TOKEN_OFFSET] for r in first] == [0, 110, 113] and t.total_tokens == 248
    assert [r[ragged.KEEP_OFFSET] for r in first] == [0, 20, 23] and t.kept_len == 53
    assert [r[ragged.ADJ_OFFSET] for r in first] == [0, 100 * 4, 400] and t.adj_words == 400 + 130 * 5
    assert [r[ragged.RANK_START] for r in first] == [0, 4, 5] and t.rank_programs == 10
    assert [r[ragged.TILE_START] for r in first] == [0, 1, 1] and t.range_tiles[0] == 1 + 3
    assert [r[ragged.TILE_START] for r in second] == [0, 2, 2] and t.range_tiles[1] == 2 + 3
    assert [(r[ragged.GRID_H], r[ragged.GRID_W], r[ragged.SLICE_STEPS]) for r in second] == [
        (10, 11, 4), (1, 3, 1), (5, 9, 2)]
    assert all(len(r) == ragged.FIELDS for r in first + second)
    for a, b in zip(first, second):  # only the row range and its tiles differ
        same = [f for f in range(ragged.FIELDS)
                if f not in (ragged.ROW_BEGIN, ragged.ROW_END, ragged.TILE_START)]
        assert [a[f] for f in same] == [b[f] for f in same]


def test_a_layout_first_met_inside_a_capture_raises_before_any_work(monkeypatch, kernels_varlen):
    """Building a plan pins and copies host memory, which a CUDA graph capture forbids: a
    layout not planned before the capture raises, naming the fix; a planned one is served
    from the cache without building anything."""
    dev = torch.device("cuda", 0)  # only the plan's key sees it: nothing touches a GPU
    layout = ([(0, 20), (20, 50)], [(1, 4, 5), (1, 5, 6)], [5, 9], [3, 6], 16, torch.float16)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    built = []
    monkeypatch.setattr(kernels_varlen, "Plan", lambda *args: built.append(args))
    with pytest.raises(RuntimeError, match=r"for the first time inside a CUDA graph capture.*"
                                           r"Run the same layout once before capturing"):
        kernels_varlen.plan(*layout, dev)
    assert built == [] and not kernels_varlen._cache
    key = tuple(tuple(v) for v in layout[:4]) + (16, torch.float16, dev)
    kernels_varlen._cache[key] = planned = object()
    assert kernels_varlen.plan(*layout, dev) is planned and built == []


def _gpu_layout():
    grids = [(24, 24), (16, 20), (2, 8, 8), (10, 10)]
    ks = [64, 80, 32, 10]
    x, a, cu = packed(grids, 64, 4, seed=30, dtype=torch.bfloat16)
    return grids, ks, x, a, cu


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a GPU (two CUDA streams)")
def test_cached_plan_on_a_second_stream_waits_for_its_copy(kernels_varlen):
    """The plan's table is copied on the stream that built it, here queued behind ~0.1 s
    of sleep; a second stream reusing the cached plan at once must wait for that copy
    (an event, no host sync), else its kernels read the table before it arrives."""
    grids, ks, x, a, cu = _gpu_layout()
    want = grouped(x, a, cu, grids, ks, backend="kernels")
    prune_varlen(x, a, cu, grids, ks, backend="kernels")  # Triton compiles on first use
    kernels_varlen._cache.clear()
    first, second = torch.cuda.Stream(), torch.cuda.Stream()
    for stream in (first, second):
        stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(first):
        torch.cuda._sleep(200_000_000)  # the copy waits behind this on `first`
        out_first, _ = prune_varlen(x, a, cu, grids, ks, backend="kernels")
    with torch.cuda.stream(second):  # the cached plan, its copy still queued on `first`
        out_second, _ = prune_varlen(x, a, cu, grids, ks, backend="kernels")
    torch.cuda.synchronize()
    assert len(kernels_varlen._cache) == 1
    assert torch.equal(out_first, want) and torch.equal(out_second, want)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a GPU (CUDA graph capture)")
def test_captured_replay_outlives_the_plan_cache(kernels_varlen):
    """Warm-up, then capture: the graph copies the table from the plan's pinned rows at
    each replay, and that plan is kept for good: clearing the cache, freeing cached pinned
    and device memory and reusing it cannot change what a replay reads."""
    grids, ks, x, a, cu = _gpu_layout()
    cu = cu.to(DEVICE)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the warm-up builds the plan on the side stream
        prune_varlen(x, a, cu, grids, ks, backend="kernels")
    torch.cuda.current_stream().wait_stream(side)
    xs, as_ = x.clone(), a.clone()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out, _ = prune_varlen(xs, as_, cu, grids, ks, backend="kernels")
    assert len(kernels_varlen._captured) == 1
    kernels_varlen._cache.clear()
    for i in range(kernels_varlen.CACHE_SIZE + 2):  # other layouts through the cache
        gi = [(2 + i // 8, 5 + i % 8), (3, 3)]
        xi, ai, cui = packed(gi, 64, 2, seed=100 + i, dtype=torch.bfloat16)
        prune_varlen(xi, ai, cui, gi, [7, 4], backend="kernels")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    junk = [torch.full((16, 4096), -1, dtype=torch.int64).pin_memory() for _ in range(8)]
    x2, a2, _ = packed(grids, 64, 4, seed=31, dtype=torch.bfloat16)
    xs.copy_(x2)
    as_.copy_(a2)
    g.replay()
    torch.cuda.synchronize()
    del junk
    assert torch.equal(out, grouped(x2, a2, cu.cpu(), grids, ks, backend="kernels"))


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a GPU (CUDA graph capture)")
def test_first_use_inside_a_capture_fails_clearly_and_leaves_the_stream_usable(kernels_varlen):
    grids, ks, x, a, cu = _gpu_layout()
    want = grouped(x, a, cu, grids, ks, backend="kernels")
    prune_varlen(x, a, cu, grids, ks, backend="kernels")  # Triton compiles on first use
    kernels_varlen._cache.clear()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="for the first time inside a CUDA graph capture"):
        with torch.cuda.graph(g):
            prune_varlen(x, a, cu, grids, ks, backend="kernels")
    assert not kernels_varlen._cache and not kernels_varlen._captured
    keep, _ = prune_varlen(x, a, cu, grids, ks, backend="kernels")  # eager, then capture
    assert torch.equal(keep, want)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out, _ = prune_varlen(x, a, cu, grids, ks, backend="kernels")
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)


# -- TokenLayouts and the binarized fusion on the fused path (issue 23) ----------------------

from d2pruner_kernels.token_layout import TokenLayout  # noqa: E402

LAYOUT_MIX = [TokenLayout.tiles(2, 2, tile=(3, 4)) + TokenLayout.grid(3, 4),   # tiles + thumb
              (5, 6),
              TokenLayout.grid(4, 4) + TokenLayout.grid(3, 5 + 1),            # base + newlines
              (2, 3, 4),
              TokenLayout.grid(2, 2, 3) + TokenLayout.grid(1, 1) + TokenLayout.grid(2, 5)]


def packed_any(grids, d, heads, seed, dtype=torch.float32, clusters=5):
    """`packed` for grids and TokenLayouts alike."""
    return packed([(g.cells,) if isinstance(g, TokenLayout) else g for g in grids], d, heads,
                  seed, dtype, clusters)


def layout_check(kernels_varlen, monkeypatch, x, a, cu, grids, ks, ranges=None, **options):
    """prune_varlen(backend='kernels') runs the fused path (one prune_ragged call, with a
    coordinate table) and equals each image's prune() on the kernels backend."""
    calls, prune_ragged = [], kernels_varlen.prune_ragged
    monkeypatch.setattr(kernels_varlen, "prune_ragged",
                        lambda *args: calls.append(1) or prune_ragged(*args))
    keep, cu_keep = prune_varlen(x, a, cu, grids, ks, backend="kernels", **options)
    assert calls == [1]
    plan = next(reversed(kernels_varlen._cache.values()))
    assert plan.coords is not None and plan.coords.shape == (x.shape[0], 3)
    if ranges is not None:
        assert plan.ranges == ranges
    want = per_image(x, a, cu, grids, ks, backend="kernels", **options)
    for b, w in enumerate(want):
        assert torch.equal(keep[cu_keep[b]:cu_keep[b + 1]], w), b
    return keep


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("temporal_radius", [0, 1, 10**9])
def test_fused_layouts_among_grids(monkeypatch, kernels_varlen, dtype, temporal_radius):
    x, a, cu = packed_any(LAYOUT_MIX, 24, 3, seed=40 + temporal_radius % 5, dtype=dtype)
    ks = [9, 30, 14, 1, 16]
    layout_check(kernels_varlen, monkeypatch, x, a, cu, LAYOUT_MIX, ks, ranges=1,
                 spatial_weight=0.5, radius=1, temporal_radius=temporal_radius,
                 sim_threshold=0.7)


@pytest.mark.parametrize("beta", [0.3, 0.5, 0.7])
def test_fused_binarized_on_layouts_and_grids(monkeypatch, kernels_varlen, beta):
    x, a, cu = packed_any(LAYOUT_MIX, 16, 2, seed=41)
    ks = [12, 8, 20, 5, 11]
    layout_check(kernels_varlen, monkeypatch, x, a, cu, LAYOUT_MIX, ks, spatial_weight=beta,
                 radius=1, fusion="binarized")


@pytest.mark.parametrize("fusion", ["weighted", "binarized"])
def test_fused_layout_in_two_row_ranges(monkeypatch, kernels_varlen, fusion):
    """A 13-piece-like mosaic (3 x 4 tiles + thumbnail, 208 tokens) with a small budget:
    its graph takes the lazy prefix on the CPU (two row ranges, the second skipping the
    images already settled)."""
    grids = [TokenLayout.tiles(3, 4, tile=(4, 4)) + TokenLayout.grid(4, 4), (6, 7),
             TokenLayout.grid(5, 5) + TokenLayout.grid(8, 9 + 1)]
    x, a, cu = packed_any(grids, 16, 2, seed=42, clusters=30)
    ks = [12, 20, 15]
    layout_check(kernels_varlen, monkeypatch, x, a, cu, grids, ks,
                 ranges=2 if DEVICE.type == "cpu" else None, spatial_weight=0.5, radius=1,
                 fusion=fusion)


@pytest.mark.parametrize("fusion,beta", [("weighted", 0.5), ("binarized", 0.3),
                                         ("binarized", 0.5)])
def test_fused_layouts_equal_the_reference_on_band_free_inputs(kernels_varlen, fusion, beta):
    """Against the plain-torch reference, each image drawn outside the parity band (the
    binarized rule reads the cosine alone: its band is the cosine's)."""
    from d2pruner_kernels.testing import band_free
    grids, ks = [LAYOUT_MIX[0], (6, 7), LAYOUT_MIX[2]], [9, 14, 20]
    xs, attns = [], []
    for i, (grid, k) in enumerate(zip(grids, ks)):
        n = grid.cells if isinstance(grid, TokenLayout) else math.prod(grid)

        def draw(t, n=n, i=i):
            g = torch.Generator().manual_seed(300 * i + t)
            return (clustered_tokens(1, n, 16, generator=g),
                    distinct_attention(1, 2, n, generator=g), None)
        x, a, _ = band_free(draw, pivot_count(0.7, k), grid,
                            beta=0.0 if fusion == "binarized" else beta, radius=1)
        xs.append(x[0])
        attns.append(a[0])
    x, a = torch.cat(xs).to(DEVICE), torch.cat(attns, dim=1).to(DEVICE)
    cu = torch.tensor([0] + [int(t.shape[0]) for t in xs]).cumsum(0)
    opts = dict(spatial_weight=beta, radius=1, fusion=fusion)
    keep, _ = prune_varlen(x, a, cu, grids, ks, backend="kernels", **opts)
    assert torch.equal(keep, torch.cat(per_image(x, a, cu, grids, ks, backend="reference",
                                                 **opts)))


def test_plans_of_layouts_are_keyed_by_the_temporal_radius(kernels_varlen):
    """A layout's coordinate table depends on the temporal radius (TokenLayout.coords): two
    radii, two plans; grids alone share one plan whatever the radius."""
    x, a, cu = packed_any(LAYOUT_MIX, 8, 1, seed=43)
    for tr in (0, 1):
        prune_varlen(x, a, cu, LAYOUT_MIX, 0.3, spatial_weight=0.5, temporal_radius=tr,
                     backend="kernels")
    radii = sorted(p.table[0][:, kernels_varlen.ragged.TEMPORAL_RADIUS].tolist()[4]
                   for p in kernels_varlen._cache.values())
    assert len(kernels_varlen._cache) == 2 and radii == [0, 1]
    kernels_varlen._cache.clear()
    grids = [(4, 5), (2, 3, 3)]
    x, a, cu = packed(grids, 8, 1, seed=44)
    for tr in (0, 1):
        prune_varlen(x, a, cu, grids, 0.3, temporal_radius=tr, backend="kernels")
    (plan,) = kernels_varlen._cache.values()
    assert plan.coords is None


def _gpu_layouts():
    """Serving-size layouts among grids: an InternVL image (3 x 4 tiles + thumbnail), a
    LLaVA-NeXT anyres image (24 x 24 base + 24 x (36 + 1) map), two grids."""
    grids = [TokenLayout.tiles(3, 4) + TokenLayout.grid(16, 16), (16, 20),
             TokenLayout.grid(24, 24) + TokenLayout.grid(24, 37), (2, 8, 8)]
    ks = [333, 80, 150, 32]
    x, a, cu = packed_any(grids, 64, 4, seed=32, dtype=torch.bfloat16)
    return grids, ks, x, a, cu


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a GPU (two CUDA streams, a capture)")
def test_fused_layouts_on_a_second_stream_and_in_a_capture(kernels_varlen):
    """The coordinate table is the plan's too: a second stream reusing the cached plan
    waits for its copy; a captured replay copies it from the plan's pinned rows."""
    grids, ks, x, a, cu = _gpu_layouts()
    opts = dict(spatial_weight=0.5, radius=1, backend="kernels")
    want = torch.cat(per_image(x, a, cu, grids, ks, **opts))
    prune_varlen(x, a, cu, grids, ks, **opts)  # Triton compiles on first use
    kernels_varlen._cache.clear()
    first, second = torch.cuda.Stream(), torch.cuda.Stream()
    for stream in (first, second):
        stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(first):
        torch.cuda._sleep(200_000_000)  # the copies wait behind this on `first`
        out_first, _ = prune_varlen(x, a, cu, grids, ks, **opts)
    with torch.cuda.stream(second):
        out_second, _ = prune_varlen(x, a, cu, grids, ks, **opts)
    torch.cuda.synchronize()
    assert torch.equal(out_first, want) and torch.equal(out_second, want)
    (plan,) = kernels_varlen._cache.values()
    assert plan.coords is not None
    cu = cu.to(DEVICE)
    xs, as_ = x.clone(), a.clone()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out, _ = prune_varlen(xs, as_, cu, grids, ks, **opts)
    kernels_varlen._cache.clear()
    torch.cuda.empty_cache()
    x2, a2, _ = packed_any(grids, 64, 4, seed=33, dtype=torch.bfloat16)
    xs.copy_(x2)
    as_.copy_(a2)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, torch.cat(per_image(x2, a2, cu.cpu(), grids, ks, **opts)))


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a GPU (the lazy prefix and split-K "
                                                  "as the SMs decide them)")
@pytest.mark.parametrize("fusion", ["weighted", "binarized"])
def test_fused_layouts_at_serving_size_equal_each_prune(kernels_varlen, fusion):
    grids, ks, x, a, cu = _gpu_layouts()
    opts = dict(spatial_weight=0.5, radius=1, fusion=fusion, backend="kernels")
    keep, _ = prune_varlen(x, a, cu, grids, ks, **opts)
    assert torch.equal(keep, torch.cat(per_image(x, a, cu, grids, ks, **opts)))
