"""What only a GPU can show: large shapes, determinism, no host sync, CUDA graphs."""
import pytest
import torch

import d2pruner_kernels as d2p
from d2pruner_kernels import layout, prune, reference
from d2pruner_kernels.checks import as_3d, pivot_count
from d2pruner_kernels.kernels import mis
from helpers import assert_edges_match, clustered_tokens, distinct_attention, in_band

from d2pruner_kernels.reference import walk_depths as depths

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def llava_like(b, n, d, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = clustered_tokens(b, n, d, clusters=32, noise=0.6, dtype=dtype, generator=g).cuda()
    a = distinct_attention(b, 8, n, generator=g).cuda()
    return x, a


@pytest.mark.parametrize("n,grid,d", [(576, (24, 24), 4096), (2880, (48, 60), 1024),
                                      (3136, (16, 14, 14), 256)])
def test_large_shapes_match_reference_stage_by_stage(n, grid, d):
    x, a = llava_like(2, n, d)
    k = n // 8
    n_p = pivot_count(0.7, k)
    s = d2p.debiased_scores(a, backend="kernels")
    torch.testing.assert_close(s, reference.debiased_scores(a), rtol=1e-6, atol=0)
    order = d2p.rank_order(s)
    grid3 = as_3d(grid)
    got = d2p.similarity_graph(x, order, n_p, grid, backend="kernels")
    want = d2p.similarity_graph(x, order, n_p, grid, backend="reference")
    c = n - n_p
    assert_edges_match(got, want, c, in_band(x, order, n_p, grid3, 0.8, 0.0))
    # Same graph in, same selection out: the CUDA MIS against the reference walk.
    assert torch.equal(mis.greedy_mis(got, order, n_p, k), reference.greedy_mis(got, order, n_p, k))


@pytest.mark.parametrize("n,grid,k", [(2880, (48, 60), 320), (8192, (32, 16, 16), 819)])
def test_lazy_prune_equals_the_full_graph_selection(n, grid, k):
    """At these sizes prune() builds a prefix of the graph first (kernels/lazy_graph.py): image 0
    settles there, image 1 (near-duplicates: the walk runs out) needs the whole graph; the
    answer must be the reference walk's on the whole graph, image by image."""
    from d2pruner_kernels.kernels import lazy_graph
    x, a = llava_like(2, n, 512, seed=5)
    x[1] = x[1, :1] + 0.01 * x[1]
    n_p = pivot_count(0.7, k)
    first = lazy_graph.prefix_rows(n - n_p, k - n_p, 64)
    depth = depths(x, a, None, grid, k)
    assert depth[0] <= first < depth[1], (first, depth)
    got = prune(x, a, grid, k)
    order = d2p.rank_order(d2p.debiased_scores(a))
    adj = d2p.similarity_graph(x, order, n_p, grid, backend="kernels")
    assert torch.equal(got, reference.greedy_mis(adj, order, n_p, k))


@pytest.mark.parametrize("b,d", [(8, 512), (1, 4096)])  # lazy ranges / split-K
def test_identical_over_100_runs(b, d):
    x, a = llava_like(b, 576, d, seed=1)
    first = prune(x, a, (24, 24), 64)
    for _ in range(100):
        assert torch.equal(prune(x, a, (24, 24), 64), first)


def test_split_k_graph_at_llava_size():
    """B = 1, N = 576, D = 4096: 45 tiles cannot fill the GPU, so K is split over programs;
    the edges must still be the reference's (outside the band), those of an unsplit launch,
    and bit for bit those of one program adding the same slices (what a batch runs)."""
    from d2pruner_kernels.kernels import graph
    x, a = llava_like(1, 576, 4096, seed=3)
    order = d2p.rank_order(d2p.debiased_scores(a))
    rows = graph.GraphRows(x, order, 44, (1, 24, 24))
    assert rows.splits > 1 and graph.launch_slices(rows.n_tiles, rows.splits, x.device)
    rows.rows(0, rows.c)
    cfg = graph.default_config(x.dtype, 4096)
    one = graph.similarity_graph(x, order, 44, (1, 24, 24), config=dict(cfg, SPLITS=1))
    sliced = graph.similarity_graph(x, order, 44, (1, 24, 24),
                                    config=dict(cfg, SPLITS=rows.splits, SPLIT_LAUNCH=False))
    want = d2p.similarity_graph(x, order, 44, (24, 24), backend="reference")
    band = in_band(x, order, 44, (1, 24, 24), 0.8, 0.0)
    for got in (rows.adj, one):
        assert_edges_match(got, want, rows.c, band)
    assert torch.equal(layout.unpack_lower(sliced, rows.c), layout.unpack_lower(rows.adj, rows.c))


def test_an_image_selects_the_same_alone_or_in_a_batch():
    """Alone, one LLaVA-1.5 image's graph is split-K; in a batch of 3 (135 tiles: the GPU
    is full) each program adds the same K slices itself (chosen per image shape), so the
    selection cannot depend on the batch."""
    x, a = llava_like(3, 576, 4096, seed=4)
    batched = prune(x, a, (24, 24), 64)
    for i in range(3):
        assert torch.equal(prune(x[i:i + 1], a[i:i + 1], (24, 24), 64), batched[i:i + 1])


@pytest.mark.parametrize("n", [576, 8192, 16384])
def test_rank_kernel_equals_stable_sort_at_size(monkeypatch, n):
    from d2pruner_kernels.kernels import rank
    monkeypatch.setattr(rank, "MAX_N", n)  # the kernel itself, past its usual cut-over too
    g = torch.Generator().manual_seed(n)
    s = (torch.randint(0, 50, (4, n), generator=g).float() / 7).cuda()  # many ties
    s[0, ::97] = float("nan")
    s[1, ::89] = -float("nan")  # CUDA's torch.sort puts -NaN last; we (and reference) first
    assert torch.equal(rank.rank_and_norms(s, None)[0], reference.rank_order(s))


# (1, 4096): the graph whole, K split over programs; (4, 4096): lazy ranges, the prefix
# split-K, the rest with the slices added in each program (the workspace made mid-call)
PATHS = [(1, 4096), (4, 4096)]


@pytest.mark.parametrize("b,d", PATHS)
def test_no_host_sync_inside_prune(b, d):
    x, a = llava_like(b, 576, d, seed=2)
    prior = torch.rand(576, device="cuda") + 0.5
    prune(x, a, (24, 24), 64, prior=prior)  # warm up (compilation may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        prune(x, a, (24, 24), 64, prior=prior)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("b,d", PATHS)
def test_cuda_graph_capture_and_replay(b, d):
    x, a = llava_like(b, 576, d, seed=3)
    want = prune(x, a, (24, 24), 64)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        prune(x, a, (24, 24), 64)  # warm up on the side stream
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = prune(x, a, (24, 24), 64)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)
    x2, a2 = llava_like(b, 576, d, seed=4)  # new data through the same graph
    x.copy_(x2)
    a.copy_(a2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, prune(x2, a2, (24, 24), 64))


def test_oversize_n_is_refused_before_the_launch():
    order = torch.arange(200_000, device="cuda")[None]
    adj = torch.zeros(1, 200_000 - 10, layout.num_words(200_000 - 10), dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="supports N <="):
        mis.greedy_mis(adj, order, 10, 20)
