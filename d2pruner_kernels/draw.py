"""draw_kept(): what was kept, drawn over the input image, for any grid (needs Pillow).
The demo draws its panels with it; `d2pruner_kernels.hf` re-exports it.

Every argument is checked before anything is drawn: a bad one raises TypeError or
ValueError naming it (never a NumPy IndexError, a silent wrap-around or a PIL error)."""
from __future__ import annotations

import numbers

import numpy as np
import torch

from .token_layout import TokenLayout


def _as_array(image, what: str = "image") -> np.ndarray:
    """A PIL image, an HxWx3 / HxW array, or a tensor [3, H, W] / [H, W, 3] (uint8, or
    floats in [0, 1]) -> uint8 HxWx3."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.dim() == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
            image = image.permute(1, 2, 0)
        image = image.float().numpy() if image.dtype == torch.bfloat16 else image.numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{what} must be a PIL image, a NumPy array or a tensor, got "
                        f"{type(image).__name__}")
    a = image
    if a.dtype == np.bool_ or not (np.issubdtype(a.dtype, np.integer)
                                   or np.issubdtype(a.dtype, np.floating)):
        raise TypeError(f"{what} must hold uint8 values or floats in [0, 1], got {a.dtype}")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3) or 0 in a.shape:
        raise ValueError(f"{what} must be a PIL image, HxWx3, HxW or 3xHxW, got shape "
                         f"{list(image.shape)}")
    if a.dtype != np.uint8:
        a = np.clip(a.astype(np.float32) * (255.0 if a.max() <= 1.0 else 1.0), 0, 255)
        a = a.astype(np.uint8)
    return np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a


def _grid(grid) -> tuple[int, int, int]:
    """(H, W) or (t, H, W) of positive ints (Python, NumPy or a tensor's) -> (t, H, W)."""
    if isinstance(grid, torch.Tensor):
        grid = grid.tolist()
    if not isinstance(grid, (tuple, list)) or len(grid) not in (2, 3):
        raise ValueError(f"grid must be (H, W) or (t, H, W) in LLM tokens, got {grid!r}")
    for v in grid:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
            raise TypeError(f"grid must hold ints, got {type(v).__name__} {v!r} in {grid!r}")
        if v < 1:
            raise ValueError(f"grid must hold positive ints, got {tuple(grid)}")
    g = tuple(int(v) for v in grid)
    return g if len(g) == 3 else (1, *g)


def _indices(name: str, value, n: int, grid) -> np.ndarray:
    """Indices into the n tokens of one image: 1-D ints in [0, n), or a bool mask of n
    entries (1-D or shaped as the grid) -> int64 [m]."""
    if isinstance(value, torch.Tensor):
        a = value.detach().cpu().numpy()
    elif isinstance(value, np.ndarray):
        a = value
    elif isinstance(value, (list, tuple, range)):
        a = np.asarray(value) if len(value) else np.zeros(0, np.int64)
    else:
        raise TypeError(f"{name} must be a tensor, an array or a list of token indices, got "
                        f"{type(value).__name__}")
    if a.dtype == np.bool_:  # a mask over the image's tokens, documented
        if a.size != n or a.ndim not in (1, len(grid)) or (a.ndim > 1 and a.shape != grid):
            raise ValueError(f"{name} as a bool mask must have one entry per token: [{n}] or "
                             f"{list(grid)} for grid {grid}, got shape {list(a.shape)}")
        return np.flatnonzero(a)
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name} must hold integer token indices (or be a bool mask), got "
                        f"{a.dtype}")
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D: the indices of one image (pruner.kept[b][i]), "
                         f"got shape {list(a.shape)}; draw each image of a batch separately")
    if a.size and (a.min() < 0 or a.max() >= n):
        bad = a[(a < 0) | (a >= n)]
        raise ValueError(f"{name} indices must be in [0, {n}) for grid {grid}, got "
                         f"{bad[:5].tolist()}")
    return a.astype(np.int64)


def _crop_box(crop, w: int, h: int, what: str) -> tuple[int, int, int, int]:
    """The box (left, top, right, bottom) of the picture the model saw."""
    if crop is None:
        return 0, 0, w, h
    if isinstance(crop, str):
        if crop != "center":
            raise ValueError(f"crop must be None, 'center' or (left, top, right, bottom), got "
                             f"{crop!r}")
        m = min(w, h)
        return (w - m) // 2, (h - m) // 2, (w - m) // 2 + m, (h - m) // 2 + m
    if not isinstance(crop, (tuple, list)) or len(crop) != 4:
        raise ValueError(f"crop must be None, 'center' or (left, top, right, bottom), got "
                         f"{crop!r}")
    for v in crop:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
            raise TypeError(f"crop must hold int pixel coordinates, got {type(v).__name__} "
                            f"{v!r} in {crop!r}")
    left, top, right, bottom = (int(v) for v in crop)
    if not (0 <= left < right <= w and 0 <= top < bottom <= h):
        raise ValueError(f"crop {tuple(crop)} must be a non-empty box inside {what} of "
                         f"{w}x{h} pixels (left, top, right, bottom)")
    return left, top, right, bottom


def draw_kept(image, kept, grid, *, dim: float = 0.38, outline=(255, 255, 255),
              highlight=None, highlight_outline=(255, 140, 0), crop=None):
    """The image with the pruned patches dimmed and greyed and the kept ones outlined.

    image: the picture the model saw (PIL image, array or tensor); it is divided evenly into
           the grid's cells, so pass it at the aspect ratio the processor resized it to, or
           give `crop`. For a (t, H, W) grid with t > 1, a list of t frames (side by side).
    kept:  the kept token indices of ONE image (a `pruner.kept[b][i]`), row-major: 1-D ints
           in [0, N) (N = the grid's product), or a bool mask of N entries ([N] or shaped as
           the grid: True = kept). A batch [B, k], floats, or an index outside [0, N) raise.
    grid:  (H, W) or (t, H, W) in LLM tokens, positive ints (`pruner.grids[b][i]`), or a
           TokenLayout: then `image` is a list of one picture per piece (InternVL: the
           stitched picture, then the thumbnail; LLaVA-NeXT: the base picture, then the
           high-resolution one, whose last column of cells is the newline token's), each
           drawn with its piece's grid (tiles stitched), side by side.
    highlight: optional indices (or a mask) among `kept`, outlined in `highlight_outline`,
           2 px (the demo marks D2Pruner's greedy-MIS picks so); same rules as `kept`, and
           each must be kept.
    crop:  where in `image` the model's picture lies, when the processor cropped it:
           (left, top, right, bottom) in pixels, or "center" for the central square
           (LLaVA-1.5's processor resizes the short side to 336 and crops the middle: a
           non-square picture's sides were never seen). The grid is laid over the box and
           everything outside it is dimmed. None: the whole image (the default).
    Returns a PIL RGB image of the input's size (frames: their widths side by side).
    Raises TypeError / ValueError naming the argument: a bad image, kept, highlight, grid
    or crop, or a grid with more cells across than the (cropped) picture has pixels.
    """
    from PIL import Image, ImageDraw

    if isinstance(grid, TokenLayout):
        return _draw_layout(image, kept, grid, highlight=highlight, crop=crop,
                            dim=dim, outline=outline, highlight_outline=highlight_outline)
    t, gh, gw = g = _grid(grid)
    shape = g if t > 1 else g[1:]
    n = t * gh * gw
    if t > 1:
        stacked = isinstance(image, (torch.Tensor, np.ndarray)) and image.ndim == 4
        if not (isinstance(image, (list, tuple)) or stacked):
            raise ValueError(f"grid {tuple(grid)} has {t} frames: pass a list of {t} images, "
                             f"got one {type(image).__name__}")
        frames = list(image)
        if len(frames) != t:
            raise ValueError(f"grid {tuple(grid)} has {t} frames: pass a list of {t} images, "
                             f"got {len(frames)}")
    else:
        frames = [image]
    idx = _indices("kept", kept, n, shape)
    keep = np.zeros(n, bool)
    keep[idx] = True
    special = np.zeros(n, bool)
    if highlight is not None:
        hi = _indices("highlight", highlight, n, shape)
        if not keep[hi].all():
            raise ValueError(f"highlight indices must be among kept, got "
                             f"{hi[~keep[hi]][:5].tolist()} (not kept)")
        special[hi] = True
    keep, special = keep.reshape(t, gh, gw), special.reshape(t, gh, gw)
    arrays = [_as_array(f, "image" if t == 1 else f"image (frame {i})")
              for i, f in enumerate(frames)]
    boxes = []
    for i, x in enumerate(arrays):
        what = "the image" if t == 1 else f"frame {i}"
        box = _crop_box(crop, x.shape[1], x.shape[0], what)
        bw, bh = box[2] - box[0], box[3] - box[1]
        if gh > bh or gw > bw:
            raise ValueError(f"grid {tuple(grid)} has more cells across than {what} has pixels "
                             f"({bw}x{bh}{' in the crop' if crop is not None else ''}): pass the "
                             f"picture the model saw, at its resolution")
        boxes.append(box)
    out = []
    for f, (x, (left, top, right, bottom)) in enumerate(zip(arrays, boxes)):
        x = x.astype(np.float32)
        h, w = bottom - top, right - left
        ys = (np.arange(h) * gh) // h  # the grid row of each pixel row of the box
        xs = (np.arange(w) * gw) // w
        mask = np.zeros(x.shape[:2], bool)
        mask[top:bottom, left:right] = keep[f][ys[:, None], xs[None, :]]
        grey = x.mean(-1, keepdims=True)
        dark = dim * (0.3 * x + 0.7 * grey) + 28.0
        panel = Image.fromarray(np.where(mask[..., None], x, dark).clip(0, 255).astype(np.uint8))
        d = ImageDraw.Draw(panel)
        for r, c in zip(*np.nonzero(keep[f])):
            x0, x1 = left + (c * w) // gw, left + ((c + 1) * w) // gw - 1
            y0, y1 = top + (r * h) // gh, top + ((r + 1) * h) // gh - 1
            if special[f, r, c]:
                d.rectangle((x0, y0, x1, y1), outline=highlight_outline, width=2)
            else:
                d.rectangle((x0, y0, x1, y1), outline=outline)
        out.append(panel)
    return _side_by_side(out)


def _side_by_side(panels):
    from PIL import Image
    if len(panels) == 1:
        return panels[0]
    strip = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)))
    x = 0
    for p in panels:
        strip.paste(p, (x, 0))
        x += p.width
    return strip


def _draw_layout(image, kept, layout: TokenLayout, *, highlight, crop, **style):
    """draw_kept for a TokenLayout: each piece over its own picture, its tokens placed by
    the layout's coordinates (a tiled piece: the stitched picture's row-major cells)."""
    n, pieces = layout.cells, layout.pieces
    if not isinstance(image, (list, tuple)) or len(image) != len(pieces):
        raise ValueError(f"grid {layout!r} has {len(pieces)} pieces: pass a list of "
                         f"{len(pieces)} pictures, one per piece, got "
                         f"{len(image) if isinstance(image, (list, tuple)) else type(image).__name__}")
    idx = _indices("kept", kept, n, (n,))
    hi = None if highlight is None else _indices("highlight", highlight, n, (n,))
    panels, start = [], 0
    for i, (picture, piece) in enumerate(zip(image, pieces)):
        if piece.grid[0] != 1:
            raise ValueError(f"draw_kept draws layouts of one-frame pieces; piece {i} has grid "
                             f"{piece.grid}")
        table = piece.coords()  # (t, y, x) of the piece's tokens, sequence order
        raster = (table[:, 1] * piece.grid[2] + table[:, 2]).numpy()

        def local(a):
            inside = a[(a >= start) & (a < start + piece.cells)] - start
            return raster[inside]
        panels.append(draw_kept(picture, local(idx), piece.grid[1:], crop=crop,
                                highlight=None if hi is None else local(hi), **style))
        start += piece.cells
    return _side_by_side(panels)
