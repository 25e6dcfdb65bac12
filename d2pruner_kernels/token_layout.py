"""Where an image's tokens sit (docs/spec.md §13): one or more pieces, each its own grid,
for images that are not one raster (InternVL tiles + thumbnail, LLaVA-NeXT / OneVision base
image + high-resolution map with newline tokens).

    TokenLayout.grid(24, 24)                    one raster piece: the same as grid (24, 24)
    TokenLayout.tiles(2, 3, tile=(16, 16))      six 16x16 tiles cut row-major from a 2x3 tile
                                                grid, each tile row-major inside, stitched: a
                                                token's neighbours cross tile borders
    TokenLayout.grid(24, 24) + TokenLayout.grid(20, 33)   pieces in sequence order

The spatial term of the graph (step 4) holds between two tokens of the same piece whose
coordinates are within `radius` (rows and columns) and `temporal_radius` (frames) of each
other; tokens of different pieces are never spatial neighbours. The semantic term holds
between any two tokens of the image. A raster piece's (T, H, W) grid is the layout every
function takes as grid_hw / grids today; a TokenLayout of one raster piece is that grid.

A piece's tokens are `cells` consecutive tokens of the sequence, pieces one after the other.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch


def _ints(name: str, values, length: int) -> tuple[int, ...]:
    """`length` ints >= 1, as a tuple (lists, NumPy ints and torch.Size taken)."""
    from .checks import check_int  # (checks.py imports this module)
    if not isinstance(values, (tuple, list, torch.Size)) or len(values) != length:
        raise TypeError(f"{name} must be {length} ints, got {values!r}")
    return tuple(check_int(f"{name} entries", v, lo=1) for v in values)


@dataclasses.dataclass(frozen=True)
class Piece:
    """One piece: `grid` (T, H, W) of its stitched picture; `tile` (th, tw) when its tokens
    come tile by tile (tiles row-major over the grid, each tile row-major inside), else None
    (raster order)."""
    grid: tuple[int, int, int]
    tile: tuple[int, int] | None = None

    def __post_init__(self):  # valid by construction: sizes >= 1, tiles that fit
        object.__setattr__(self, "grid", _ints("Piece grid (T, H, W)", self.grid, 3))
        if self.tile is not None:
            th, tw = _ints("Piece tile (th, tw)", self.tile, 2)
            object.__setattr__(self, "tile", (th, tw))
            t, h, w = self.grid
            if t != 1 or h % th or w % tw:
                raise ValueError(f"a tiled piece's grid must be one frame of whole "
                                 f"{th}x{tw} tiles, got grid {self.grid}")

    @property
    def cells(self) -> int:
        return math.prod(self.grid)

    def coords(self) -> torch.Tensor:
        """(t, y, x) of its tokens in sequence order, int64 [cells, 3]."""
        t_, h, w = self.grid
        i = torch.arange(self.cells)
        if self.tile is None:
            return torch.stack([i // (h * w), (i // w) % h, i % w], dim=1)
        th, tw = self.tile
        per_tile, tiles_per_row = th * tw, w // tw
        tile, inside = i // per_tile, i % per_tile
        return torch.stack([torch.zeros_like(i), (tile // tiles_per_row) * th + inside // tw,
                            (tile % tiles_per_row) * tw + inside % tw], dim=1)

    def describe(self) -> str:
        size = "x".join(map(str, self.grid[1:] if self.grid[0] == 1 else self.grid))
        if self.tile is None:
            return size
        rows, cols = self.grid[1] // self.tile[0], self.grid[2] // self.tile[1]
        return f"{rows}x{cols} tiles of {self.tile[0]}x{self.tile[1]}"


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """An image's pieces, in sequence order. Build it with grid(), tiles() and +."""
    pieces: tuple[Piece, ...]

    def __post_init__(self):
        if not isinstance(self.pieces, tuple) or not self.pieces:
            raise ValueError("a TokenLayout needs at least one piece")
        for i, p in enumerate(self.pieces):
            if not isinstance(p, Piece):
                raise TypeError(f"piece {i} must be a Piece, got {type(p).__name__}")

    @staticmethod
    def grid(*dims: int) -> "TokenLayout":
        """One raster piece of (H, W) or (T, H, W) tokens."""
        if len(dims) not in (2, 3):
            raise TypeError(f"TokenLayout.grid takes (H, W) or (T, H, W), got {dims}")
        return TokenLayout((Piece(dims if len(dims) == 3 else (1, *dims)),))

    @staticmethod
    def tiles(rows: int, cols: int, tile: tuple[int, int] = (16, 16)) -> "TokenLayout":
        """rows x cols tiles of tile = (th, tw) tokens, cut row-major from the stitched
        picture, each tile's tokens row-major inside it (InternVL's order)."""
        rows, cols = _ints("TokenLayout.tiles (rows, cols)", (rows, cols), 2)
        th, tw = _ints("TokenLayout.tiles tile", tile, 2)
        return TokenLayout((Piece((1, rows * th, cols * tw), (th, tw) if rows * cols > 1
                                  else None),))

    def __add__(self, other: "TokenLayout") -> "TokenLayout":
        if not isinstance(other, TokenLayout):
            return NotImplemented
        return TokenLayout(self.pieces + other.pieces)

    @property
    def cells(self) -> int:
        """N: the image's tokens."""
        return sum(p.cells for p in self.pieces)

    def raster(self) -> tuple[int, int, int] | None:
        """The (T, H, W) grid when the layout is one raster piece, else None."""
        (p, *rest) = self.pieces
        return p.grid if not rest and p.tile is None else None

    def describe(self) -> str:
        return " + ".join(p.describe() for p in self.pieces)

    def __repr__(self) -> str:
        return f"TokenLayout({self.describe()}: {self.cells} tokens)"

    def coords(self, temporal_radius: int) -> tuple[torch.Tensor, int]:
        """(t', y, x) int32 [N, 3] of every token, pieces apart along t' by more than the
        temporal radius: the spatial term of one (T, H, W) grid, |dt'| <= temporal_radius'
        and |dy|, |dx| <= radius, is then exactly "same piece and near". temporal_radius' =
        min(temporal_radius, T_max - 1) (the same edges inside a piece); it is returned with
        the table: (coords, temporal_radius'). A new tensor, yours to edit."""
        table, radius = coords_table(self, temporal_radius)
        return table.clone(), radius


def coords_table(layout: TokenLayout, temporal_radius: int) -> tuple[torch.Tensor, int]:
    """TokenLayout.coords, cached and shared by the backends: read it, never write it."""
    t_max = max(p.grid[0] for p in layout.pieces)
    return _coords(layout, min(temporal_radius, t_max - 1))


@functools.lru_cache(maxsize=256)
def _coords(layout: TokenLayout, temporal_radius: int):
    t_max = max(p.grid[0] for p in layout.pieces)
    gap = t_max + temporal_radius + 1  # > (t_max - 1) + temporal_radius: never near
    parts = []
    for i, p in enumerate(layout.pieces):
        c = p.coords()
        c[:, 0] += i * gap
        parts.append(c)
    table = torch.cat(parts).to(torch.int32)
    if len(layout.pieces) * gap >= 2**31:
        raise ValueError(f"{layout!r}: too many pieces for 32-bit coordinates")
    return table, temporal_radius


def layout_prior(prior, layout: TokenLayout, device, dtype=torch.float32) -> torch.Tensor:
    """A PositionalPrior spread over a layout's pieces, [N] on `device` (docs/spec.md §13,
    ours): a raster piece gets the prior for its grid (PositionalPrior.for_grid: resized,
    per frame), a tiled piece the prior for one tile, repeated over its tiles. Made from the
    prior's cached device copies: no host-to-device copy after the first call."""
    parts = []
    for p in layout.pieces:
        if p.tile is None:
            grid = p.grid if p.grid[0] > 1 else p.grid[1:]
            parts.append(prior.for_grid(grid)._device_tensor(device, dtype))
        else:
            tiles = (p.grid[1] // p.tile[0]) * (p.grid[2] // p.tile[1])
            parts.append(prior.for_grid(p.tile)._device_tensor(device, dtype).repeat(tiles))
    return parts[0] if len(parts) == 1 else torch.cat(parts)
