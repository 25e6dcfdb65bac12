"""The ragged table (kernels/ragged.py) as the Triton kernels read it: its field numbers as
constexprs and the @triton.jit readers shared by the rank and graph launches."""
from __future__ import annotations

import triton
import triton.language as tl

from . import ragged

FIELDS = tl.constexpr(ragged.FIELDS)
TOKEN_OFFSET = tl.constexpr(ragged.TOKEN_OFFSET)
TOKENS = tl.constexpr(ragged.TOKENS)
PIVOTS = tl.constexpr(ragged.PIVOTS)
ADJ_OFFSET = tl.constexpr(ragged.ADJ_OFFSET)
ROW_BEGIN = tl.constexpr(ragged.ROW_BEGIN)
ROW_END = tl.constexpr(ragged.ROW_END)
TILE_START = tl.constexpr(ragged.TILE_START)
RANK_START = tl.constexpr(ragged.RANK_START)
GRID_H = tl.constexpr(ragged.GRID_H)
GRID_W = tl.constexpr(ragged.GRID_W)
SLICE_STEPS = tl.constexpr(ragged.SLICE_STEPS)
TEMPORAL_RADIUS = tl.constexpr(ragged.TEMPORAL_RADIUS)
IMAGE_CHUNK = tl.constexpr(128)


@triton.jit
def image_of(table_ptr, column: tl.constexpr, pid, n_images):
    """The image a program of a ragged launch works on: the last b whose first program
    table[b, column] (a non-decreasing column: TILE_START or RANK_START) is <= pid.
    One vector load per 128 images and a count: no search loop of dependent loads."""
    count = tl.zeros([IMAGE_CHUNK], dtype=tl.int32)
    for c0 in range(0, n_images, IMAGE_CHUNK):
        i = c0 + tl.arange(0, IMAGE_CHUNK)
        ok = i < n_images
        start = tl.load(table_ptr + column + i.to(tl.int64) * FIELDS, mask=ok, other=0)
        count += (ok & (start <= pid)).to(tl.int32)
    return tl.sum(count, axis=0) - 1


@triton.jit
def row_of(table_ptr, image):
    """Image `image`'s row of the table (a pointer: read its fields as row + FIELD)."""
    return table_ptr + image.to(tl.int64) * FIELDS


@triton.jit
def field32(row, column: tl.constexpr):
    """A size field of a row (N_b, n_pivots_b, a row or program number), as int32."""
    return tl.load(row + column).to(tl.int32)
