"""kernels/lazy_graph.py: the graph built in growing row ranges, each image's MIS settling as
soon as its rows are there; exact whatever the ranges (the reference's answer)."""
import pytest
import torch

from d2pruner_kernels import prune
from d2pruner_kernels.checks import pivot_count
from d2pruner_kernels.reference import walk_depths as depths
from helpers import DEVICE, band_free, clustered_tokens, distinct_attention


@pytest.mark.parametrize("splits,growth,mixed", [(1, 0, False), (3, 0, False), (1, 2, False),
                                                (3, 0, True), (3, 2, True)])
@pytest.mark.parametrize("k,rho,clusters,settle", [(12, 0.5, 40, "110"), (40, 0.0, 4, "000"),
                                                  (70, 0.3, 3, "000")])
def test_lazy_prefix_gives_the_full_graph_answer(monkeypatch, k, rho, clusters, settle, splits,
                                                 growth, mixed):
    """With a 64-row prefix, images settle inside it (many clusters, small m: `settle`, by
    the reference walk) or need the rest of the graph (few clusters or a larger m); either way
    the answer is the reference's: with K slices or not, in two row ranges or three (64,
    128, C), the slices split-K'd in every launch or (mixed) in the prefix's only (3 tiles,
    later launches 6 and more: each program adds its slices). (The protocol itself,
    settled and unsettled images in one batch, is tested in test_mis_kernel.py.)"""
    from d2pruner_kernels.kernels import graph, lazy_graph
    monkeypatch.setattr(graph, "split_count", lambda *args: splits)
    if mixed:
        monkeypatch.setattr(graph, "launch_slices", lambda tiles, s, device: s > 1 and tiles < 5)
    monkeypatch.setattr(lazy_graph, "PREFIX_MIN", 64)
    monkeypatch.setattr(lazy_graph, "PREFIX_PER_MEMBER", 1)
    monkeypatch.setattr(lazy_graph, "PREFIX_GROWTH", growth)
    monkeypatch.setattr(lazy_graph, "LAZY_MIN_WAVES", 0.0)  # lazy on a GPU too, at this small size
    n_p = pivot_count(rho, k)
    assert len(lazy_graph.row_ranges(150 - n_p, k - n_p, 64)) == 3 - (growth == 0)
    g = torch.Generator().manual_seed(k)
    n, grid = 150, (10, 15)
    x, a, _ = band_free(lambda i: (torch.cat([clustered_tokens(1, n, 16, clusters=c, generator=g)
                                              for c in (clusters, 40, 3)]).to(DEVICE),
                                   distinct_attention(3, 2, n, generator=g).to(DEVICE), None),
                        n_p, grid)
    depth = depths(x.cpu(), a.cpu(), None, grid, k, pivot_ratio=rho)
    assert "".join(str(int(d <= 64)) for d in depth) == settle
    got = prune(x, a, grid, k, pivot_ratio=rho, backend="kernels")
    assert torch.equal(got, prune(x, a, grid, k, pivot_ratio=rho, backend="reference"))


def test_row_ranges():
    from d2pruner_kernels.kernels import lazy_graph
    m, block = 20, 64
    p1 = lazy_graph.prefix_rows(5000, m, block)
    assert p1 % block == 0 and p1 >= max(lazy_graph.PREFIX_MIN, lazy_graph.PREFIX_PER_MEMBER * m)
    assert lazy_graph.row_ranges(5000, m, block) == [p1, 5000]
    assert lazy_graph.row_ranges(p1 - 1, m, block) == [p1 - 1]  # the prefix covers the graph
    assert lazy_graph.row_ranges(5000, m, block, waves=lazy_graph.LAZY_MIN_WAVES) == [5000]  # built whole
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lazy_graph, "PREFIX_GROWTH", 3)
        ends = lazy_graph.row_ranges(5000, m, block, waves=100.0)
    assert ends[0] == p1 and ends[-1] == 5000 and len(ends) > 2
    assert all(e % block == 0 and 3 * a <= e <= 3 * a + block for a, e in zip(ends, ends[1:-1]))


def test_lazy_prefix_really_splits(monkeypatch):
    """The protocol under test: one image settles in the prefix, one does not."""
    from d2pruner_kernels.kernels import graph, lazy_graph, mis
    monkeypatch.setattr(lazy_graph, "PREFIX_MIN", 64)
    monkeypatch.setattr(lazy_graph, "PREFIX_PER_MEMBER", 1)
    g = torch.Generator().manual_seed(0)
    x = torch.cat([clustered_tokens(1, 150, 16, clusters=40, generator=g),
                   clustered_tokens(1, 150, 16, clusters=2, generator=g)]).to(DEVICE)
    order = torch.stack([torch.randperm(150, generator=g) for _ in range(2)]).to(DEVICE)
    rows = graph.GraphRows(x, order, 5, (1, 10, 15))
    rows.rows(0, 64)
    done = torch.full((2,), -1, dtype=torch.int32, device=DEVICE)
    mis.greedy_mis(rows.adj, rows.order, 5, 20, rows_ready=64, done=done)
    assert done.tolist() == [1, 0]
