"""Triton hybrid-graph kernel == reference edges, bit for bit outside the parity band."""
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
