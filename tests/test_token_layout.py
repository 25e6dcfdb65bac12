"""TokenLayout (d2pruner_kernels/token_layout.py, docs/spec.md §13): images that are not one
raster. Held to hand-worked coordinates and to prune() on the same image laid out as one
raster (an independent route: the tokens permuted into the stitched picture's order)."""
from __future__ import annotations

import math

import pytest
import torch

import d2pruner_kernels as d2p
from d2pruner_kernels import reference
from d2pruner_kernels.token_layout import Piece, TokenLayout

BACKENDS = ["auto", "reference", "kernels"]


def test_tile_coordinates_by_hand():
    # 2x2 tiles of 2x3 tokens: tile 0 = rows 0-1 cols 0-2, tile 1 = rows 0-1 cols 3-5, ...
    table, tr = TokenLayout.tiles(2, 2, tile=(2, 3)).coords(temporal_radius=1)
    assert tr == 0 and table.dtype == torch.int32
    yx = table[:, 1:].tolist()
    assert yx[:6] == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]        # tile (0, 0)
    assert yx[6:12] == [[0, 3], [0, 4], [0, 5], [1, 3], [1, 4], [1, 5]]      # tile (0, 1)
    assert yx[12] == [2, 0] and yx[18] == [2, 3] and yx[23] == [3, 5]        # tiles (1, *)
    assert sorted(map(tuple, yx)) == [(y, x) for y in range(4) for x in range(6)]


def test_pieces_are_never_spatial_neighbours():
    layout = TokenLayout.tiles(1, 2, tile=(2, 2)) + TokenLayout.grid(2, 2)   # mosaic + thumb
    for tr in (0, 1, 5, 2**31 - 1):
        table, tr_eff = layout.coords(tr)
        t = table[:, 0].long()
        near_t = (t[:, None] - t[None, :]).abs() <= tr_eff
        piece = torch.tensor([0] * 8 + [1] * 4)
        assert torch.equal(near_t, piece[:, None] == piece[None, :])


def test_one_raster_piece_is_its_grid():
    assert TokenLayout.grid(3, 4).raster() == (1, 3, 4)
    assert TokenLayout.tiles(1, 1, tile=(16, 16)).raster() == (1, 16, 16)
    assert TokenLayout.tiles(2, 1).raster() is None
    g = torch.Generator().manual_seed(0)
    x, a = torch.randn(2, 35, 16, generator=g), torch.rand(2, 3, 35, generator=g)
    for backend in BACKENDS:
        want = d2p.prune(x, a, (5, 7), 9, spatial_weight=0.5, backend=backend)
        got = d2p.prune(x, a, TokenLayout.grid(5, 7), 9, spatial_weight=0.5, backend=backend)
        assert torch.equal(got, want)


def _stitched_order(rows, cols, th, tw):
    """perm[j] = the tile-major position of the stitched picture's j-th token (row-major)."""
    table, _ = TokenLayout.tiles(rows, cols, (th, tw)).coords(0)
    raster = table[:, 1].long() * (cols * tw) + table[:, 2].long()
    return torch.argsort(raster)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows, cols, th, tw, beta, radius", [
    (2, 3, 3, 2, 0.5, 1), (3, 2, 2, 3, 0.5, 2), (1, 4, 3, 3, 0.3, 1), (2, 2, 4, 4, 0.6, 3)])
def test_tiles_prune_as_the_stitched_picture(backend, rows, cols, th, tw, beta, radius):
    """Tokens that come tile by tile select exactly what the same tokens select in the
    stitched picture's raster order: neighbours across tile borders count."""
    g = torch.Generator().manual_seed(rows * 100 + cols * 10 + th)
    n = rows * cols * th * tw
    x = torch.randn(1, n, 24, generator=g)
    x = x + 3 * torch.randn(1, 1, 24, generator=g)  # one cluster: the spatial term decides
    a = torch.rand(1, 4, n, generator=g)
    perm = _stitched_order(rows, cols, th, tw)
    k = n // 3
    opts = dict(spatial_weight=beta, radius=radius, sim_threshold=0.6, backend=backend)
    got = d2p.prune(x, a, TokenLayout.tiles(rows, cols, (th, tw)), k, **opts)
    raster = d2p.prune(x[:, perm], a[:, :, perm], (rows * th, cols * tw), k, **opts)
    assert torch.equal(got, torch.sort(perm[raster], dim=1).values)
    # and the frames reading (tiles as frames of a (T, H, W) grid) has other edges
    params = d2p.PruneOptions(spatial_weight=beta, radius=radius, sim_threshold=0.6,
                              temporal_radius=0)
    ids = torch.arange(n)[None]
    mosaic = reference.similarity_edges(x, ids, 0, TokenLayout.tiles(rows, cols, (th, tw)), params)
    frames = reference.similarity_edges(x, ids, 0, (rows * cols, th, tw), params)
    assert (mosaic & ~frames).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_pieces_prune_as_frames_that_are_never_neighbours(backend):
    """Pieces of equal shape equal the frames of a (T, H, W) grid with temporal_radius=0."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3 * 20, 24, generator=g) + 2 * torch.randn(2, 1, 24, generator=g)
    a = torch.rand(2, 3, 60, generator=g)
    layout = TokenLayout.grid(4, 5) + TokenLayout.grid(4, 5) + TokenLayout.grid(4, 5)
    opts = dict(spatial_weight=0.5, sim_threshold=0.6, backend=backend)
    for tr in (1, 7):  # the pieces' temporal radius never joins them
        got = d2p.prune(x, a, layout, 15, temporal_radius=tr, **opts)
        want = d2p.prune(x, a, (3, 4, 5), 15, temporal_radius=0, **opts)
        assert torch.equal(got, want)


def test_a_newline_column_neighbours_its_row():
    # LLaVA-NeXT: the unpadded map's rows end with a newline token at column W
    layout = TokenLayout.grid(3, 3) + TokenLayout.grid(2, 4 + 1)
    table, tr = layout.coords(1)
    y, x = table[9:, 1].long(), table[9:, 2].long()
    newline = 9 + 4  # row 0's newline: column 4 of piece 1
    assert (y[4].item(), x[4].item()) == (0, 4)
    edges = reference.similarity_edges(torch.ones(1, 19, 2), torch.arange(19)[None], 0, layout,
                                       d2p.PruneOptions(spatial_weight=1.0, sim_threshold=1.0,
                                                        radius=1))[0]
    assert edges[newline].nonzero().flatten().tolist() == [12, 17, 18]  # (0,3), (1,3), (1,4)
    assert not edges[newline, :9].any()     # never the base image's tokens


def test_prune_varlen_takes_layouts():
    g = torch.Generator().manual_seed(2)
    grids = [TokenLayout.tiles(2, 2, (2, 3)) + TokenLayout.grid(2, 3), (4, 5),
             TokenLayout.grid(3, 3) + TokenLayout.grid(2, 5)]
    lens = [30, 20, 19]
    x = torch.randn(sum(lens), 16, generator=g)
    a = torch.rand(sum(lens), generator=g)
    cu = torch.tensor([0, 30, 50, 69])
    for backend in BACKENDS:
        keep, cu_keep = d2p.prune_varlen(x, a, cu, grids, 0.3, spatial_weight=0.5,
                                         backend=backend)
        want = [d2p.prune(x[s:e], a[s:e], grid, 0.3, spatial_weight=0.5, backend=backend) + s
                for grid, s, e in zip(grids, cu[:-1].tolist(), cu[1:].tolist())]
        assert torch.equal(keep, torch.cat(want))
        assert cu_keep.tolist() == [0, 9, 15, 21]


def test_a_positional_prior_spreads_over_the_pieces():
    prior = d2p.PositionalPrior((2, 3)).update(torch.rand(6, dtype=torch.float64) + 0.5)
    layout = TokenLayout.tiles(2, 1, (2, 3)) + TokenLayout.grid(2, 3)
    g = torch.Generator().manual_seed(4)
    x, a = torch.randn(18, 8, generator=g), torch.rand(18, generator=g)
    want_prior = prior.as_tensor().repeat(3)   # each tile and the thumbnail: the same map
    got = d2p.prune(x, a, layout, 6, prior=prior, spatial_weight=0.5)
    assert torch.equal(got, d2p.prune(x, a, layout, 6, prior=want_prior, spatial_weight=0.5))


def test_a_layout_of_other_than_n_tokens_is_refused():
    with pytest.raises(ValueError, match=r"grid TokenLayout\(3x3: 9 tokens\) has 9 cells but "
                                         r"tokens has N=10"):
        d2p.prune(torch.rand(10, 4), torch.rand(10), TokenLayout.grid(3, 3), 3)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="at least one piece"):
        TokenLayout(())
    with pytest.raises(TypeError, match="piece 0 must be a Piece"):
        TokenLayout(((1, 2, 3),))
    with pytest.raises(ValueError, match=r"TokenLayout.tiles \(rows, cols\) entries must be >= 1"):
        TokenLayout.tiles(0, 2)
    with pytest.raises(TypeError, match="TokenLayout.grid takes"):
        TokenLayout.grid(5)
    assert math.prod((2, 3)) == TokenLayout.grid(2, 3).cells


def test_coords_hands_out_a_copy():
    """Editing what coords() returned never changes what prune() selects (issue 21's rule
    for PositionalPrior.for_grid, for layouts)."""
    layout = TokenLayout.tiles(2, 2, (2, 3)) + TokenLayout.grid(2, 3)
    g = torch.Generator().manual_seed(9)
    x, a = torch.randn(30, 8, generator=g), torch.rand(30, generator=g)
    want = d2p.prune(x, a, layout, 8, spatial_weight=0.9, sim_threshold=0.95)
    table, _ = layout.coords(1)
    table.zero_()
    for backend in BACKENDS:
        assert torch.equal(d2p.prune(x, a, layout, 8, spatial_weight=0.9, sim_threshold=0.95,
                                     backend=backend), want)


def test_pieces_are_valid_by_construction():
    assert Piece([1, 4, 4]).grid == (1, 4, 4)            # lists become tuples (hashable)
    with pytest.raises(TypeError, match=r"Piece grid \(T, H, W\) must be 3 ints"):
        Piece((4, 4))
    with pytest.raises(ValueError, match=r"Piece grid \(T, H, W\) entries must be >= 1"):
        Piece((1, 0, 4))
    with pytest.raises(ValueError, match=r"whole 3x5 tiles, got grid \(1, 4, 5\)"):
        Piece((1, 4, 5), (3, 5))
