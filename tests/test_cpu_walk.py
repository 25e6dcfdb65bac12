"""The graph-free CPU walk (kernels/cpu_walk.py + csrc/walk_cpu.cpp) against the reference
graph + greedy MIS, exactly, on inputs with no candidate pair inside the parity band: (T, H, W)
grids and TokenLayouts, fusion "weighted" and "binarized"."""
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from d2pruner_kernels import TokenLayout, dispatch, prune, reference, testing
from d2pruner_kernels.checks import cells, pivot_count
from d2pruner_kernels.kernels import cpu_walk
from d2pruner_kernels.options import RADIUS_MAX, PruneOptions

from helpers import clustered_tokens, distinct_attention, in_band

pytestmark = pytest.mark.skipif(not cpu_walk.available(), reason="_C not built")


def rank(b, n, seed):
    g = torch.Generator().manual_seed(seed)
    return reference.rank_order(reference.debiased_scores(distinct_attention(b, 3, n, generator=g)))


def outside_band(tokens, order, n_p, grid, p):
    """No candidate pair within the parity band of theta: of f (weighted), of the cosine
    (binarized: [cos > theta] is the only float compare; beta > 0.5 reads none, but the
    band of the cosine is kept there too, a stricter draw)."""
    beta = 0.0 if p.fusion == "binarized" else p.spatial_weight
    return not in_band(tokens, order, n_p, grid, p.sim_threshold, beta, p.radius,
                       p.temporal_radius).any()


def want(tokens, order, n_p, k, grid, p):
    return reference.greedy_mis(reference.similarity_graph(tokens, order, n_p, grid, p),
                                order, n_p, k)


def check(tokens, order, n_p, k, grid, p, stats=None):
    """select == reference exactly (the input must be outside the parity band)."""
    assert outside_band(tokens, order, n_p, grid, p), "test input inside the parity band"
    got = cpu_walk.greedy_mis_without_graph(tokens, order, n_p, k, grid, p, stats=stats)
    assert got.dtype == torch.int64 and got.shape == (tokens.shape[0], k)
    assert torch.equal(got, want(tokens, order, n_p, k, grid, p))
    return got


def draw(b, grid, d, seed, dtype=torch.float32, clusters=6, noise=0.35):
    """Band-free clustered tokens and a rank order, for the default graph parameters."""
    n = cells(grid)
    for i in range(50):
        g = torch.Generator().manual_seed(1000 * seed + i)
        x = clustered_tokens(b, n, d, clusters=clusters, noise=noise, dtype=dtype, generator=g)
        yield x, rank(b, n, 1000 * seed + i)


def band_free(b, grid, d, seed, p, n_p, dtype=torch.float32, clusters=6, noise=0.35):
    """draw()'s tokens and rank order, the first outside the parity band for p: the shared
    testing.band_free (for binarized, the band of the cosine: its one float compare)."""
    n = cells(grid)

    def one(i):
        s = 1000 * seed + i
        x = clustered_tokens(b, n, d, clusters=clusters, noise=noise, dtype=dtype,
                             generator=torch.Generator().manual_seed(s))
        return x, distinct_attention(b, 3, n, generator=torch.Generator().manual_seed(s)), None
    beta = 0.0 if p.fusion == "binarized" else p.spatial_weight
    x, attn, _ = testing.band_free(one, n_p, grid, beta, p.radius, p.temporal_radius,
                                   p.sim_threshold)
    return x, reference.rank_order(reference.debiased_scores(attn))


SHAPES = [(1, (1, 8, 8), 16), (3, (1, 7, 9), 24), (1, (1, 24, 24), 64), (3, (1, 1, 37), 5),
          (2, (1, 13, 11), 130)]


@pytest.mark.parametrize("b,grid,d", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_matches_reference(b, grid, d, dtype, beta):
    n = math.prod(grid)
    p = PruneOptions(spatial_weight=beta)
    for k in sorted({1, max(1, n // 4), n // 2 + 1, n}):
        for rho in (0.0, 0.7, 1.0):
            n_p = pivot_count(rho, k)
            x, order = band_free(b, grid, d, k, p, n_p, dtype)
            check(x, order, n_p, k, grid, p)


@pytest.mark.parametrize("grid", [(3, 5, 7), (4, 6, 6), (2, 1, 9)])
@pytest.mark.parametrize("temporal_radius", [0, 1])
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_video_grids(grid, temporal_radius, beta):
    p = PruneOptions(spatial_weight=beta, temporal_radius=temporal_radius, radius=1)
    n = math.prod(grid)
    for k in (max(1, n // 5), n // 2):
        n_p = pivot_count(0.5, k)
        x, order = band_free(2, grid, 12, k, p, n_p)
        check(x, order, n_p, k, grid, p)


# TokenLayouts: InternVL tiles + thumbnail, LLaVA-NeXT base + high-resolution map with its
# newline column (W + 1), several pieces of frames, a lone newline piece.
LAYOUTS = {
    "tiles+thumbnail": TokenLayout.tiles(2, 3, (4, 4)) + TokenLayout.grid(4, 4),
    "base+newline map": TokenLayout.grid(5, 5) + TokenLayout.grid(4, 6 + 1),
    "frames pieces": (TokenLayout.grid(3, 4, 5) + TokenLayout.grid(2, 3, 3)
                      + TokenLayout.tiles(1, 2, (3, 2)) + TokenLayout.grid(1, 1)),
    "tall tiles": TokenLayout.tiles(3, 1, (2, 5)) + TokenLayout.grid(2, 5),
}


def differs_somewhere(cases):
    """At least one (want, other) pair differs: the inputs tell the two graphs apart, so a
    walk that ignored what is under test would fail."""
    return any(not torch.equal(a, b) for a, b in cases)


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("temporal_radius", [0, 1, RADIUS_MAX])
@pytest.mark.parametrize("fusion,beta", [("weighted", 0.0), ("weighted", 0.5),
                                         ("weighted", 1.0), ("binarized", 0.5),
                                         ("binarized", 0.7)])
def test_layouts_match_reference(name, temporal_radius, fusion, beta):
    layout = LAYOUTS[name]
    n = layout.cells
    p = PruneOptions(spatial_weight=beta, temporal_radius=temporal_radius, radius=1,
                     fusion=fusion)
    raster = (1, 1, n)  # the same tokens as one row: other spatial edges
    versus = []
    for k in (max(1, n // 6), n // 3, n // 2 + 1):
        for rho in (0.0, 0.5):
            n_p = pivot_count(rho, k)
            x, order = band_free(2, layout, 8, k, p, n_p, clusters=10)
            got = check(x, order, n_p, k, layout, p)
            versus.append((got, want(x, order, n_p, k, raster, p)))
    if beta:  # the layout's spatial edges change the answer on these inputs
        assert differs_somewhere(versus)


@pytest.mark.parametrize("grid", [(1, 9, 11), (3, 4, 5), LAYOUTS["tiles+thumbnail"],
                                  LAYOUTS["base+newline map"]])
@pytest.mark.parametrize("beta", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("theta", [0.8, 0.5, -0.2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_binarized_matches_reference(grid, beta, theta, dtype):
    p = PruneOptions(spatial_weight=beta, sim_threshold=theta, fusion="binarized")
    n = cells(grid)
    versus = []
    for k in (max(1, n // 5), n // 2):
        for rho in (0.0, 0.7):
            n_p = pivot_count(rho, k)
            x, order = band_free(3, grid, 12, 7 * k + n_p, p, n_p, dtype, clusters=8)
            got = check(x, order, n_p, k, grid, p)
            versus.append((got, want(x, order, n_p, k, grid, p.replace(fusion="weighted"))))
    assert differs_somewhere(versus)  # the two readings differ on these inputs


@pytest.mark.parametrize("grid", [(1, 10, 10), LAYOUTS["tiles+thumbnail"],
                                  LAYOUTS["frames pieces"]])
@pytest.mark.parametrize("fusion,beta", [("weighted", 0.5), ("binarized", 0.3),
                                         ("binarized", 0.5), ("binarized", 0.7)])
def test_nan_and_zero_rows_layouts_and_binarized(grid, fusion, beta):
    """NaN rows (no edge by the cosine; beta > 0.5 binarized: still near), zero rows (cosine
    0), exact duplicates, on layouts and both fusions."""
    p = PruneOptions(spatial_weight=beta, sim_threshold=0.7, fusion=fusion, radius=1)
    checked = 0
    for seed in range(6):
        x, order = next(draw(2, grid, 8, seed))
        x[0, order[0, 3]] = float("nan")
        x[0, order[0, 20], 2] = float("nan")
        x[1, order[1, 5]] = 0.0
        x[1, order[1, 7]] = 0.0
        x[0, order[0, 10:16]] = x[0, order[0, 9]].clone()
        x[1, order[1, 30:36]] = 3.0 * x[1, order[1, 29]].clone()
        if not outside_band(x, order, 5, grid, p):
            continue
        for k in (20, 50):
            check(x, order, 5, k, grid, p)
        checked += 1
    assert checked >= 2


@pytest.mark.parametrize("fusion,beta", [("binarized", 0.7), ("binarized", 0.5),
                                         ("binarized", 0.3), ("weighted", 0.5)])
def test_layout_many_windows(monkeypatch, fusion, beta):
    """Tiny caps on a layout: many windows, images leaving at different windows; under
    beta > 0.5 binarized the member rows past an image's count (NaN padding) must not count
    as members by their coordinates."""
    layout = LAYOUTS["tiles+thumbnail"]
    p = PruneOptions(spatial_weight=beta, fusion=fusion, radius=1)
    g = torch.Generator().manual_seed(5)
    n = layout.cells
    x = torch.stack([torch.randn(1, 16, generator=g) + 0.02 * torch.randn(n, 16, generator=g),
                     clustered_tokens(1, n, 16, generator=g)[0],
                     torch.randn(n, 16, generator=g)])
    order = rank(3, n, 5)
    assert outside_band(x, order, 4, layout, p)
    expected = want(x, order, 4, 40, layout, p)
    for caps in [dict(_WINDOW_FLOATS=1, _MIN_WINDOW=1), dict(_SURVIVOR_FLOATS=1, _MIN_SURVIVORS=1),
                 dict(_WINDOW_FLOATS=1, _MIN_WINDOW=5, _SURVIVOR_FLOATS=1, _MIN_SURVIVORS=3)]:
        with monkeypatch.context() as mp:
            for name, v in caps.items():
                mp.setattr(cpu_walk, name, v)
            stats = {}
            got = cpu_walk.greedy_mis_without_graph(x, order, 4, 40, layout, p, stats=stats)
        assert torch.equal(got, expected), caps
        assert stats["windows"] > 10


@pytest.mark.parametrize("grid", [LAYOUTS["tiles+thumbnail"], LAYOUTS["base+newline map"],
                                  (12, 12)])
@pytest.mark.parametrize("fusion,beta", [("weighted", 0.5), ("binarized", 0.5),
                                         ("binarized", 0.7)])
def test_prune_auto_runs_the_walk(monkeypatch, grid, fusion, beta):
    """prune(backend="auto") on a CPU takes the walk for layouts and both fusions (no graph
    built), and returns what backend="reference" returns."""
    n, k = cells(grid), cells(grid) // 4
    p = PruneOptions(spatial_weight=beta, fusion=fusion)
    g = torch.Generator().manual_seed(3)
    attn = distinct_attention(1, 2, n, generator=g)
    order = reference.rank_order(reference.debiased_scores(attn))
    n_p = pivot_count(p.pivot_ratio, k)
    flat = grid if isinstance(grid, TokenLayout) else (1, *grid)
    x = next(x for x in (clustered_tokens(1, n, 16, generator=g) for _ in range(50))
             if outside_band(x, order, n_p, flat, p))
    walked = []
    real = cpu_walk.greedy_mis_without_graph
    monkeypatch.setattr(cpu_walk, "greedy_mis_without_graph",
                        lambda *a, **kw: walked.append(1) or real(*a, **kw))
    monkeypatch.setattr(dispatch, "graph", lambda *a, **kw: pytest.fail("graph built"))
    got = prune(x, attn, grid, k, options=p)
    assert walked == [1]
    monkeypatch.undo()
    assert torch.equal(got, prune(x, attn, grid, k, options=p, backend="reference"))


@pytest.mark.parametrize("grid", [(1, 6, 8), LAYOUTS["tiles+thumbnail"]])
@pytest.mark.parametrize("theta", [0.0, 1.0])
@pytest.mark.parametrize("windows", ["one", "many"])
def test_cosine_exactly_at_theta(monkeypatch, grid, theta, windows):
    """One-hot features: every cosine is exactly 0 or 1 (exact in any summation order), so
    theta = 0 or 1 sits on the cosines themselves: an edge under "weighted" (>=), none under
    binarized's [cos > theta] (>). The walk agrees with the reference on both sides, in the
    C++ resolver (one window) and against earlier windows' members (one-candidate windows)."""
    if windows == "many":
        monkeypatch.setattr(cpu_walk, "_WINDOW_FLOATS", 1)
        monkeypatch.setattr(cpu_walk, "_MIN_WINDOW", 1)
    n = cells(grid)
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.one_hot(torch.randint(0, 5, (2, n), generator=g), 5).float()
    order = rank(2, n, 0)
    outs = {}
    for fusion, beta in [("weighted", 0.0), ("binarized", 0.3), ("binarized", 0.5),
                         ("weighted", 0.5)]:
        p = PruneOptions(sim_threshold=theta, spatial_weight=beta, fusion=fusion, radius=1)
        for k in (6, n // 2):
            got = cpu_walk.greedy_mis_without_graph(x, order, 2, k, grid, p)
            assert torch.equal(got, want(x, order, 2, k, grid, p)), (fusion, beta, k)
            outs[fusion, beta, k] = got
    assert any(not torch.equal(outs["weighted", 0.0, k], outs["binarized", 0.3, k])
               for k in (6, n // 2))


def test_many_windows_and_survivor_cap(monkeypatch):
    """Tiny caps: every window holds one candidate / ends at its first survivor, and images
    leave the batch at different windows."""
    p = PruneOptions(spatial_weight=0.5)
    x, order = band_free(3, (1, 12, 12), 16, 7, p, 0)
    expected = want(x, order, 0, 40, (1, 12, 12), p)
    for caps in [dict(_WINDOW_FLOATS=1, _MIN_WINDOW=1), dict(_SURVIVOR_FLOATS=1, _MIN_SURVIVORS=1),
                 dict(_WINDOW_FLOATS=1, _MIN_WINDOW=5, _SURVIVOR_FLOATS=1, _MIN_SURVIVORS=3)]:
        with monkeypatch.context() as mp:
            for name, v in caps.items():
                mp.setattr(cpu_walk, name, v)
            stats = {}
            got = cpu_walk.greedy_mis_without_graph(x, order, 0, 40, (1, 12, 12), p,
                                                    stats=stats)
        assert torch.equal(got, expected), caps
        assert stats["windows"] > 10


def test_clique_then_distinct_truncates_window():
    """A near-clique prefix of the rank order (one member, all else blocked: the next window
    is huge), then distinct tokens (more survivors than the cap 2m + 64)."""
    g = torch.Generator().manual_seed(3)
    n, d, m = 600, 64, 40
    order = rank(1, n, 3)
    x = torch.randn(1, n, d, generator=g)
    head = order[0, :150]
    x[0, head] = torch.randn(d, generator=g) + 0.01 * torch.randn(150, d, generator=g)
    p = PruneOptions()
    stats = {}
    check(x, order, 0, m, (1, 20, 30), p, stats)
    assert stats["members"] == [m] and stats["visited"] < n  # without the cap: all n


def test_nan_zero_and_duplicate_rows():
    p = PruneOptions(spatial_weight=0.5, sim_threshold=0.7)
    checked = 0
    for seed in range(4):
        x, order = next(draw(2, (1, 10, 10), 8, seed))
        x[0, order[0, 3]] = float("nan")          # NaN: no edges, always taken when reached
        x[0, order[0, 50], 2] = float("nan")
        x[1, order[1, 5]] = 0.0                    # zero: cosine 0 with everything
        x[1, order[1, 7]] = 0.0
        x[0, order[0, 10:20]] = x[0, order[0, 9]].clone()  # exact duplicates (ties): edges
        x[1, order[1, 30:40]] = 3.0 * x[1, order[1, 29]].clone()
        if not outside_band(x, order, 5, (1, 10, 10), p):
            continue
        for k in (20, 60):
            check(x, order, 5, k, (1, 10, 10), p)
        checked += 1
    assert checked >= 2  # the edits above left enough seeds outside the parity band


def test_all_nan_and_all_zero_rows():  # side cases, not the main inputs
    order = rank(2, 30, 0)
    for fill, p in [(float("nan"), PruneOptions()), (0.0, PruneOptions()),
                    (0.0, PruneOptions(sim_threshold=-0.5))]:
        x = torch.full((2, 30, 4), fill)
        for k in (2, 10, 30):
            got = cpu_walk.greedy_mis_without_graph(x, order, 2, k, (1, 5, 6), p)
            assert torch.equal(got, want(x, order, 2, k, (1, 5, 6), p))


def test_near_clique_fills():
    """All features nearly equal: the walk visits every candidate, takes one, fills the rest."""
    g = torch.Generator().manual_seed(0)
    b, n, d = 3, 400, 32
    x = torch.randn(b, 1, d, generator=g) + 0.01 * torch.randn(b, n, d, generator=g)
    order = rank(b, n, 0)
    stats = {}
    check(x, order, 14, 20, (1, 20, 20), PruneOptions(), stats)
    assert stats["members"] == [1] * b and stats["depth"] == [n - 14] * b
    assert stats["windows"] <= 3  # windows grow at once when almost everything is blocked


def test_stops_early():
    """Distinct tokens: the walk stops at the m-th member, far before the last candidate."""
    x, order = band_free(1, (1, 40, 40), 64, 0, PruneOptions(), 50, clusters=400)
    stats = {}
    check(x, order, 50, 90, (1, 40, 40), PruneOptions(), stats)
    assert stats["members"] == [40] and stats["depth"][0] < 200 and stats["visited"] < 400


def test_batch_equals_each_image():
    """Images that finish at different windows (a near-clique, clustered, distinct)."""
    g = torch.Generator().manual_seed(1)
    n, d = 300, 16
    x = torch.stack([torch.randn(1, d, generator=g) + 0.02 * torch.randn(n, d, generator=g),
                     clustered_tokens(1, n, d, generator=g)[0],
                     torch.randn(n, d, generator=g)])
    order = rank(3, n, 1)
    p = PruneOptions()
    assert outside_band(x, order, 10, (1, 15, 20), p)
    got = check(x, order, 10, 60, (1, 15, 20), p)
    for i in range(3):
        one = cpu_walk.greedy_mis_without_graph(x[i:i + 1], order[i:i + 1], 10, 60,
                                                (1, 15, 20), p)
        assert torch.equal(one, got[i:i + 1])


def test_strided_inputs_unchanged():
    p = PruneOptions(spatial_weight=0.5)
    x, order = band_free(2, (1, 9, 9), 20, 5, p, 4)
    base = x.transpose(1, 2).contiguous().transpose(1, 2)   # [B, N, D] with D-stride N
    strided_order = order.T.contiguous().T
    before = (base.clone(), strided_order.clone())
    got = cpu_walk.greedy_mis_without_graph(base, strided_order, 4, 30, (1, 9, 9), p)
    assert torch.equal(got, want(x, order, 4, 30, (1, 9, 9), p))
    assert torch.equal(base, before[0]) and torch.equal(strided_order, before[1])
    assert not base.is_contiguous() and not strided_order.is_contiguous()


def test_deterministic():
    x, order = band_free(2, (1, 16, 16), 32, 2, PruneOptions(), 20)
    runs = [cpu_walk.greedy_mis_without_graph(x, order, 20, 60, (1, 16, 16), PruneOptions())
            for _ in range(3)]
    assert all(torch.equal(r, runs[0]) for r in runs)


# Extra pieces of a drawn layout: raster (T, H, W) grids and tiled pieces.
PIECES = st.one_of(
    st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6)).map(
        lambda g: TokenLayout.grid(*g)),
    st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4)).map(
        lambda r: TokenLayout.tiles(r[0], r[1], (r[2], r[3]))))


@settings(max_examples=160, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 3), t=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9),
       pieces=st.lists(PIECES, max_size=3), base=st.booleans(),
       d=st.sampled_from([1, 2, 7, 32]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       rho=st.sampled_from([0.0, 0.3, 0.7, 1.0]), k_frac=st.floats(0.0, 1.0),
       beta=st.sampled_from([0.0, 0.3, 0.5, 0.7, 1.0]),
       theta=st.sampled_from([0.8, 0.5, 0.95, -0.2]), fusion=st.sampled_from(["weighted",
                                                                             "binarized"]),
       radius=st.integers(0, 3), tr=st.sampled_from([0, 1, 2, RADIUS_MAX]),
       clusters=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_random(b, t, h, w, pieces, base, d, dtype, rho, k_frac, beta, theta, fusion, radius, tr,
                clusters, seed):
    """(T, H, W) grids, and TokenLayouts made of the grid (or not) and up to 3 drawn pieces."""
    grid = (t, h, w)
    if pieces:
        layouts = ([TokenLayout.grid(t, h, w)] if base else []) + pieces
        grid = layouts[0]
        for piece in layouts[1:]:
            grid = grid + piece
    n = cells(grid)
    k = max(1, min(n, round(k_frac * n)))
    n_p = pivot_count(rho, k)
    p = PruneOptions(sim_threshold=theta, spatial_weight=beta, radius=radius, temporal_radius=tr,
                     fusion=fusion)
    g = torch.Generator().manual_seed(seed)
    x = clustered_tokens(b, n, d, clusters=clusters, dtype=dtype, generator=g)
    order = rank(b, n, seed)
    assume(outside_band(x, order, n_p, grid, p))
    check(x, order, n_p, k, grid, p)


def test_what_reaches_the_cpp_resolver_is_checked():
    """cpu_walk checks only what the C++ resolver reads through raw pointers (prune() checked
    the rest): host tensors and an int64 [B, N] order; the C++ side refuses sizes that do
    not fit (a grid of another N) and token ids outside [0, N)."""
    x, order = torch.randn(1, 12, 4), rank(1, 12, 0)
    p = PruneOptions()
    with pytest.raises(ValueError, match="order must be int64"):
        cpu_walk.greedy_mis_without_graph(x, order.int(), 1, 4, (1, 3, 4), p)
    with pytest.raises(ValueError, match="order must be int64"):
        cpu_walk.greedy_mis_without_graph(x, order[:, :10], 1, 4, (1, 3, 4), p)
    with pytest.raises(ValueError, match="CPU tensors"):
        cpu_walk.greedy_mis_without_graph(x.to("meta"), order, 1, 4, (1, 3, 4), p)
    with pytest.raises(ValueError, match="inconsistent sizes"):
        cpu_walk.greedy_mis_without_graph(x, order, 1, 4, (1, 3, 5), p)
    bad = order.clone()
    bad[0, 7] = 12  # out of range: torch indexing or the C++ bounds check refuses it
    with pytest.raises((IndexError, ValueError), match="out of range"):
        cpu_walk.greedy_mis_without_graph(x, bad, 1, 4, (1, 3, 4), p)


def test_cpp_bounds_checks():
    """The C++ side refuses out-of-range indices and sizes itself (nothing written)."""
    from d2pruner_kernels import _C
    b, n, d, m, s = 1, 6, 2, 2, 2
    cos, rows = torch.zeros(1, s, s), torch.ones(1, s, d)
    order = torch.arange(n).unsqueeze(0)
    image, count = torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    members, coords = torch.zeros(1, m, d), torch.zeros(1, m, 3, dtype=torch.int64)
    taken = torch.zeros(b, n, dtype=torch.uint8)

    def call(pos, order=order, image=image, count=count, **sizes):
        sizes = dict(dict(batch=b, active=1, survivors=s, dim=d, n_tokens=n, n_pivots=0, m=m,
                          grid_t=1, grid_h=2, grid_w=3), **sizes)
        _C.walk_window_cpu(cos=cos.data_ptr(), rows=rows.data_ptr(), pos=pos.data_ptr(),
                           order=order.data_ptr(), image=image.data_ptr(),
                           members=members.data_ptr(), coords=coords.data_ptr(),
                           count=count.data_ptr(), taken=taken.data_ptr(), radius=2,
                           temporal_radius=1, cos_weight=1.0, spatial_weight=0.0, threshold=0.8,
                           **sizes)

    ok = torch.tensor([[0, 1]])
    for bad_pos in ([[0, 6]], [[-2, 0]]):
        with pytest.raises(ValueError, match="position"):
            call(torch.tensor(bad_pos))
    with pytest.raises(ValueError, match="token id"):
        call(ok, order=torch.tensor([[0, 99, 2, 3, 4, 5]]))
    with pytest.raises(ValueError, match="image"):
        call(ok, image=torch.tensor([1]))
    with pytest.raises(ValueError, match="count"):
        call(ok, count=torch.tensor([3]))
    with pytest.raises(ValueError, match="sizes"):
        call(ok, active=2)  # more active slots than images
    with pytest.raises(ValueError, match="sizes"):
        call(ok, grid_w=4)  # a grid of 8 cells for N = 6
    with pytest.raises(ValueError, match="fusion"):
        call(ok, fusion=4)
    with pytest.raises(ValueError, match="fusion"):
        call(ok, fusion=-1)
    table = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 0, 2], [9, 0, 0], [9, 0, 1], [9, 0, 2]],
                         dtype=torch.int32)
    with pytest.raises(ValueError, match="token id"):  # with a table too: ids checked first
        call(ok, order=torch.tensor([[0, 6, 2, 3, 4, 5]]), coord_table=table.data_ptr(),
             grid_t=0, grid_h=0, grid_w=0)
    assert not taken.any() and not count.any()
    call(ok)  # both taken (cosine 0 < 0.8)
    assert count.tolist() == [2] and taken[0, :2].tolist() == [1, 1]
    # A coordinate table instead of the grid (grid sizes not read): binarized beta > 0.5
    # ("near"): token 0 blocks its table neighbour 1, not token 3 (another piece along t).
    for tok, blocked in [(1, True), (3, False)]:
        taken.zero_(), count.zero_(), coords.zero_()
        o = torch.tensor([[0, tok] + [i for i in range(n) if i not in (0, tok)]])
        call(ok, order=o, coord_table=table.data_ptr(), grid_t=0, grid_h=0, grid_w=0,
             fusion=_C.walk_fusions["near"])
        assert count.tolist() == [1 if blocked else 2]
        assert coords[0, :count[0]].tolist() == table[o[0, :2]][:count[0]].tolist()


MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from d2pruner_kernels.kernels import cpu_walk
    from d2pruner_kernels.options import PruneOptions
    torch.manual_seed(0)
    n, d, k = 16384, 1024, 2048
    order = torch.randperm(n).unsqueeze(0)
    distinct = torch.randn(1, n, d)
    clique = torch.randn(1, n, d).mul_(0.01).add_(torch.randn(1, 1, d))  # no temporaries
    grid = (1, 128, 128)
    n_p = int(0.7 * k + 1e-6)
    for x in (distinct, clique):  # warm up allocator and MKL buffers on a small input
        cpu_walk.greedy_mis_without_graph(x[:, :1024], torch.arange(1024).unsqueeze(0), 70, 100,
                                          (1, 32, 32), PruneOptions())
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for x in (distinct, clique):
        stats = {}
        cpu_walk.greedy_mis_without_graph(x, order, n_p, k, grid, PruneOptions(), stats=stats)
        print(stats["windows"], stats["members"][0], file=sys.stderr)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
""")


def test_memory_never_quadratic():
    """N = 16384, D = 1024: peak RSS growth stays far below the 1 GiB of a dense C x C
    float32 matrix, on distinct tokens (one window) and on a near-clique (the walk reads all
    candidates)."""
    r = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    growth = int(r.stdout.split()[-1])
    assert growth < 256 * 2**20, f"peak RSS grew by {growth / 2**20:.0f} MiB"
