"""Triton hybrid-graph kernel == reference edges, bit for bit outside the parity band."""
import math

import pytest
import torch

import d2pruner_kernels as d2p
from d2pruner_kernels import layout
from d2pruner_kernels.checks import as_3d
from d2pruner_kernels.options import PruneOptions
from helpers import DEVICE, assert_edges_match, clustered_tokens, in_band

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def compare(tokens, order, n_p, grid, theta=0.8, beta=0.0, radius=2, temporal_radius=1,
            config=None):
    kw = dict(sim_threshold=theta, spatial_weight=beta, radius=radius,
              temporal_radius=temporal_radius)
    grid3 = as_3d(grid)
    if config is None:
        got = d2p.similarity_graph(tokens, order, n_p, grid, backend="kernels", **kw)
    else:
        from d2pruner_kernels.kernels import graph
        got = graph.similarity_graph(tokens, order, n_p, grid3, PruneOptions(**kw), config=config)
    want = d2p.similarity_graph(tokens, order, n_p, grid, backend="reference", **kw)
    c = order.shape[1] - n_p
    assert got.shape == want.shape == (tokens.shape[0], c, layout.num_words(c))
    band = in_band(tokens, order, n_p, grid3, theta, beta, radius, temporal_radius)
    return assert_edges_match(got, want, c, band)


def inputs(b, n, d, dtype, seed, clusters=6):
    g = torch.Generator().manual_seed(seed)
    x = clustered_tokens(b, n, d, clusters=clusters, dtype=dtype, generator=g).to(DEVICE)
    order = torch.stack([torch.randperm(n, generator=g) for _ in range(b)]).to(DEVICE)
    return x, order


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,grid", [(1, 8, (1, 1)), (2, 5, (1, 2)), (33, 17, (3, 11)),
                                      (577, 65, (1, 577)), (130, 96, (2, 5, 13))])
def test_edges_match_reference(dtype, n, d, grid):
    x, order = inputs(2, n, d, dtype, seed=n * d)
    n_p = n // 5
    edges = compare(x, order, n_p, grid)
    if n > 30:  # plenty of pairs on both sides of the threshold
        frac = edges.float().sum() / max(1, (n - n_p) * (n - n_p - 1))
        assert 0.02 < frac < 0.5


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("radius", [0, 1, 2])
@pytest.mark.parametrize("grid,temporal_radius", [((9, 10), 1), ((3, 5, 6), 0), ((3, 5, 6), 1)])
def test_spatial_term(beta, radius, grid, temporal_radius):
    x, order = inputs(2, 90, 24, torch.float32, seed=radius + 7)
    compare(x, order, 10, grid, theta=0.8, beta=beta, radius=radius,
            temporal_radius=temporal_radius)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits,n,d", [(2, 130, 96), (3, 77, 17), (4, 200, 300)])
def test_split_k_matches_reference(dtype, splits, n, d):
    """K in slices, summed by split-K launches (a program per slice, a second launch adds
    them) or slice by slice in one program: the reference's edges, and each other's bit
    for bit. (3, d=17) leaves two slices empty; d=300 ends on a ragged slice."""
    from d2pruner_kernels.kernels import graph
    x, order = inputs(2, n, d, dtype, seed=splits * n)
    cfg = dict(graph.default_config(dtype, d), BLOCK_K=32, SPLITS=splits)
    split_k, one_program = (compare(x, order, n // 7, (1, n), beta=0.3, radius=1,
                                    config=dict(cfg, SPLIT_LAUNCH=launch))
                            for launch in (True, False))
    assert torch.equal(split_k, one_program)


@pytest.mark.parametrize("splits,d", [(2, 64), (3, 96)])
def test_slices_add_alike_in_one_program_and_in_split_k(splits, d):
    """The two slice paths run the same float operations, even where the order of the sum
    decides an edge. Tokens 0 and 1 have K-step products 1e8, 3 | -1e8, 3 (| 0, 0), 16-wide
    steps, two per slice: summed in K order the 3s survive (dot 3, cosine 1.5e-8: an edge at
    theta = 1e-8), slice by slice each slice rounds its 3 away (dot 0: no edge)."""
    from d2pruner_kernels.kernels import graph
    x = torch.randn(1, 20, d, generator=torch.Generator().manual_seed(d))
    x[0, :2] = 0.0
    x[0, 0, [0, 16, 32, 48]] = torch.tensor([1e4, 3.0, 1e4, 3.0])
    x[0, 1, [0, 16, 32, 48]] = torch.tensor([1e4, 1.0, -1e4, 1.0])
    x, order = x.to(DEVICE), torch.arange(20, device=DEVICE)[None]

    def edges(**cfg):
        cfg = dict(BLOCK=64, BLOCK_K=16, num_warps=4, num_stages=1, **cfg)
        adj = graph.similarity_graph(x, order, 0, (1, 1, 20), PruneOptions(sim_threshold=1e-8),
                                     config=cfg)
        return layout.unpack_lower(adj, 20)

    in_k_order = edges(SPLITS=1)
    one_program = edges(SPLITS=splits, SPLIT_LAUNCH=False)
    split_k = edges(SPLITS=splits, SPLIT_LAUNCH=True)
    assert in_k_order[0, 1, 0] and not one_program[0, 1, 0]  # the order decides this edge
    assert torch.equal(one_program, split_k)


def test_launch_slices_only_while_the_tiles_leave_sms_idle(monkeypatch):
    from d2pruner_kernels.kernels import graph
    monkeypatch.setattr(graph, "sm_count", lambda device: 132)
    cuda = torch.device("cuda", 0)
    assert graph.launch_slices(45, 4, cuda)               # one LLaVA-1.5 image
    assert not graph.launch_slices(32 * 45, 4, cuda)      # 32 of them fill the GPU
    assert not graph.launch_slices(45, 1, cuda)           # no slices


def test_rows_past_the_graph_are_clamped():
    """rows(0, end > C) computes rows [0, C), never a tile (nor a workspace slot) beyond."""
    from d2pruner_kernels.kernels import graph
    x, order = inputs(2, 150, 40, torch.float32, seed=8)
    cfg = dict(graph.default_config(x.dtype, 40), BLOCK_K=16, SPLITS=2)
    want = d2p.similarity_graph(x, order, 20, (10, 15), backend="reference")
    rows = graph.GraphRows(x, order, 20, (1, 10, 15), config=cfg)
    rows.rows(0, rows.c + 100)
    assert_edges_match(rows.adj, want, rows.c, in_band(x, order, 20, (1, 10, 15), 0.8, 0.0))


def test_split_count_fills_the_gpu_and_keeps_slices_long(monkeypatch):
    from d2pruner_kernels.kernels import graph
    monkeypatch.setattr(graph, "sm_count", lambda device: 132)
    cuda = torch.device("cuda", 0)
    assert graph.split_count(45, 64, cuda) == 4     # LLaVA-1.5: 45 tiles, D = 4096
    assert graph.split_count(903, 64, cuda) == 1    # enough tiles already
    assert graph.split_count(45, 16, cuda) == 2     # each slice keeps >= 8 K steps
    assert graph.split_count(1, 4096, cuda) == 8    # at most 8
    assert graph.split_count(1, 4096, torch.device("cpu")) == 1


def test_batch_items_have_their_own_graphs():
    x, order = inputs(3, 70, 32, torch.bfloat16, seed=3)
    edges = compare(x, order, 6, (7, 10))
    assert not torch.equal(edges[0], edges[1]) and not torch.equal(edges[1], edges[2])


def test_nan_and_zero_features():
    x, order = inputs(1, 40, 16, torch.float32, seed=4)
    x[0, 5] = 0.0
    x[0, 9, 3] = float("nan")
    edges = compare(x, order, 0, (5, 8), beta=0.5, radius=1)
    pos = {int(t): i for i, t in enumerate(order[0].tolist())}
    full = edges[0] | edges[0].T
    assert not full[pos[9]].any(), "a NaN token has no edges"


def test_interpreter_upcasts_bf16_dot():
    """bf16 straight through the interpreter's tl.dot is garbage (triton#11584); the
    kernel must upcast there. Values far from 1 make raw-bit products obviously wrong."""
    x, order = inputs(1, 64, 48, torch.bfloat16, seed=5)
    compare(x * 3.0, order, 0, (8, 8))


@pytest.mark.parametrize("n", [100, 1100])  # within and across the 1024-candidate window
def test_spare_words_are_never_read(n):
    """Words after i // 32 of row i are unspecified: poisoning them changes nothing, for
    the compiled MIS (the CUDA kernel on a GPU, its CPU twin here) and unpacking."""
    from d2pruner_kernels.kernels import mis
    x, order = inputs(1, n, 16, torch.float32, seed=6, clusters=40)
    adj = d2p.similarity_graph(x, order, 0, (1, n), backend="reference").to(DEVICE)
    poisoned = adj.clone()
    for i in range(n):
        poisoned[0, i, i // 32 + 1:] = -1
    assert torch.equal(layout.unpack_lower(adj, n), layout.unpack_lower(poisoned, n))
    for k in (30, n // 2, n):
        want = d2p.greedy_mis(adj, order, 0, k, backend="reference")
        assert torch.equal(mis.greedy_mis(poisoned, order, 0, k), want)


# -- TokenLayouts and the binarized fusion (issue 23): the kernels' own table / FUSION ------

from d2pruner_kernels.token_layout import TokenLayout  # noqa: E402

LAYOUTS = {
    "tiles+thumb": TokenLayout.tiles(2, 3, tile=(3, 4)) + TokenLayout.grid(3, 4),   # 84
    "base+newlines": TokenLayout.grid(5, 5) + TokenLayout.grid(6, 7 + 1),           # 73
    "pieces": TokenLayout.grid(2, 3, 4) + TokenLayout.tiles(1, 2, tile=(2, 3))
    + TokenLayout.grid(1, 1) + TokenLayout.grid(3, 5),                              # 52
}


def band_for(tokens, order, n_p, grid, theta, beta, fusion, radius, temporal_radius):
    """The pairs whose edge two correct backends may decide differently: the fused
    similarity near theta (weighted); the cosine near theta where the binarized rule reads
    it (beta <= 0.5), none where it does not."""
    if fusion == "binarized":
        if beta > 0.5:
            c = order.shape[1] - n_p
            return torch.zeros(tokens.shape[0], c, c, dtype=torch.bool, device=tokens.device)
        beta = 0.0
    return in_band(tokens, order, n_p, grid, theta, beta, radius, temporal_radius)


def compare_kernel(tokens, order, n_p, grid, theta=0.8, beta=0.0, radius=2, temporal_radius=1,
                   fusion="weighted", config=None):
    """The kernel module itself and the public stage on backend='kernels' == the reference."""
    from d2pruner_kernels.kernels import graph
    kw = dict(sim_threshold=theta, spatial_weight=beta, radius=radius,
              temporal_radius=temporal_radius, fusion=fusion)
    g = grid if isinstance(grid, TokenLayout) else as_3d(grid)
    got = graph.similarity_graph(tokens, order, n_p, g, PruneOptions(**kw), config=config)
    public = d2p.similarity_graph(tokens, order, n_p, grid, backend="kernels", **kw)
    want = d2p.similarity_graph(tokens, order, n_p, grid, backend="reference", **kw)
    c = order.shape[1] - n_p
    band = band_for(tokens, order, n_p, g, theta, beta, fusion, radius, temporal_radius)
    edges = assert_edges_match(got, want, c, band)
    assert torch.equal(layout.unpack_lower(public, c), edges)
    return edges


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("temporal_radius", [0, 1, 10**9])
def test_layout_edges_match_reference(dtype, name, temporal_radius):
    lay = LAYOUTS[name]
    x, order = inputs(2, lay.cells, 24, dtype, seed=lay.cells + temporal_radius % 7)
    edges = compare_kernel(x, order, lay.cells // 6, lay, beta=0.5, radius=1,
                           temporal_radius=temporal_radius)
    assert edges.any()


def test_layout_edges_cross_tile_borders_not_pieces():
    """Identical tokens: every edge is a spatial one (beta = 1, theta = 0.9). Token 3 (tile
    0's row 0, last column) and token 12 (tile 1's row 0, first column) are neighbours in
    the stitched picture; no token of the mosaic neighbours the thumbnail's."""
    lay = TokenLayout.tiles(1, 2, tile=(3, 4)) + TokenLayout.grid(3, 4)
    x = torch.ones(1, 36, 8, device=DEVICE)
    order = torch.arange(36, device=DEVICE)[None]
    e = compare_kernel(x, order, 0, lay, theta=0.9, beta=1.0, radius=1)[0]
    e = e | e.T
    assert e[3, 12] and e[7, 16] and not e[3, 16 + 4]
    assert not e[:24, 24:].any() and e[24, 25]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("grid", [(9, 10), (3, 5, 6), "tiles+thumb"])
def test_binarized_edges_match_reference(dtype, beta, grid):
    grid = LAYOUTS.get(grid, grid)
    n = grid.cells if isinstance(grid, TokenLayout) else math.prod(grid)
    x, order = inputs(2, n, 20, dtype, seed=n + int(10 * beta))
    edges = compare_kernel(x, order, 7, grid, theta=0.8, beta=beta, radius=1,
                           fusion="binarized")
    assert edges.any()


def test_binarized_reads_cos_above_theta_not_at_it():
    """cos == theta exactly is an edge for the weighted rule at beta = 0 (>=), not for the
    binarized rule (>); a NaN cosine is never above theta, and near alone (beta > 0.5)
    ignores it."""
    x = torch.zeros(1, 4, 4, device=DEVICE)
    x[0, 0, 0] = x[0, 1, 0] = 1.0          # cos(0, 1) = 1
    x[0, 2, 1] = 1.0
    x[0, 3, 2] = float("nan")
    order = torch.arange(4, device=DEVICE)[None]
    from d2pruner_kernels.kernels import graph
    for beta, fusion, want in [(0.0, "weighted", True), (0.0, "binarized", False),
                               (0.7, "binarized", True)]:
        e = layout.unpack_lower(graph.similarity_graph(
            x, order, 0, (1, 1, 4), PruneOptions(sim_threshold=1.0, spatial_weight=beta,
                                                 radius=1, fusion=fusion)), 4)[0]
        assert bool(e[1, 0]) == want, (beta, fusion)
        assert bool(e[3, 2]) == (beta > 0.5), (beta, fusion)  # NaN token 3, neighbour 2


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("fusion", ["weighted", "binarized"])
def test_layout_split_k_and_one_program_agree(splits, fusion):
    """The layout and fusion switches live in the shared epilogue: split-K launches and a
    program adding its slices give the reference's edges, and each other's bit for bit."""
    from d2pruner_kernels.kernels import graph
    lay = LAYOUTS["base+newlines"]
    x, order = inputs(2, lay.cells, 70, torch.float16, seed=11)
    cfg = dict(graph.default_config(x.dtype, 70), BLOCK_K=16, SPLITS=splits)
    a, b = (compare_kernel(x, order, 9, lay, beta=0.5, radius=1, fusion=fusion,
                           config=dict(cfg, SPLIT_LAUNCH=launch)) for launch in (True, False))
    assert torch.equal(a, b)


@pytest.mark.parametrize("fusion,beta", [("weighted", 0.4), ("binarized", 0.5)])
def test_layout_lazy_row_ranges_equal_the_whole_graph(monkeypatch, fusion, beta):
    """kept_ids in two row ranges (a prefix, then the rest) with a layout == the
    reference's selection (lazy_graph.py)."""
    from d2pruner_kernels.kernels import lazy_graph, rank
    monkeypatch.setattr(lazy_graph, "PREFIX_MIN", 64)
    monkeypatch.setattr(lazy_graph, "PREFIX_PER_MEMBER", 1)
    lay = TokenLayout.tiles(3, 4, tile=(4, 4)) + TokenLayout.grid(4, 4)   # 208 tokens
    x, order = inputs(2, lay.cells, 32, torch.float32, seed=5, clusters=30)
    opts = PruneOptions(spatial_weight=beta, radius=1, fusion=fusion)
    k, n_p = 20, 4
    norms = rank.rank_and_norms(None, x)[1]
    assert len(lazy_graph.row_ranges(lay.cells - n_p, k - n_p, 64)) == 2
    got = lazy_graph.kept_ids(x, order, norms, n_p, k, lay, opts)
    adj = d2p.similarity_graph(x, order, n_p, lay, backend="reference", options=opts)
    want = d2p.greedy_mis(adj, order, n_p, k, backend="reference")
    # outside the band (checked): the same edges, so the same selection
    band = band_for(x, order, n_p, lay, 0.8, beta, fusion, 1, 1)
    assert not band.any()
    assert torch.equal(got, want)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a GPU (split-K as the SMs decide it)")
@pytest.mark.parametrize("fusion,beta", [("weighted", 0.3), ("binarized", 0.5)])
def test_layout_edges_at_serving_size_on_gpu(fusion, beta):
    """InternVL's tiles + thumbnail at D = 4096 in bf16: few tiles for the SMs, so the K
    slices get programs of their own (split-K) on a GPU; the reference's edges outside the
    band."""
    from d2pruner_kernels.kernels import graph
    lay = TokenLayout.tiles(1, 2) + TokenLayout.grid(16, 16)   # 768 tokens
    x, order = inputs(1, lay.cells, 4096, torch.bfloat16, seed=21, clusters=40)
    g = graph.GraphRows(x, order, 60, lay, PruneOptions(spatial_weight=beta, fusion=fusion))
    assert g.splits > 1 and g._split(g.n_tiles)
    compare_kernel(x, order, 60, lay, beta=beta, radius=1, fusion=fusion)


def test_layout_coords_are_the_layouts_and_never_first_inside_a_capture(monkeypatch):
    """The dense launch's coordinate table is the layout's; a layout first met during a CUDA
    graph capture raises, naming the fix (the GPU test holds the cached, warmed-up case)."""
    from d2pruner_kernels.kernels import graph
    lay = LAYOUTS["pieces"]
    table, radius = graph.layout_coords(lay, 1, torch.device("cpu"))
    want, want_radius = lay.coords(1)
    assert torch.equal(table, want) and radius == want_radius == 1
    dev = torch.device("cuda", 0)  # only the cache key sees it: nothing touches a GPU
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="for the first time inside a CUDA graph capture"):
        graph.layout_coords(lay, 0, dev)


