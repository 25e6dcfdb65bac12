"""draw_kept(): what was kept, drawn over the input image, for any grid (needs Pillow).
The demo draws its panels with it; `d2pruner_kernels.hf` re-exports it."""
from __future__ import annotations

import numpy as np
import torch


def _as_array(image) -> np.ndarray:
    """A PIL image, an HxWx3 / HxW array, or a tensor [3, H, W] / [H, W, 3] (uint8, or
    floats in [0, 1]) -> uint8 HxWx3."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.dim() == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
            image = image.permute(1, 2, 0)
        image = image.numpy()
    a = np.asarray(image)
    if a.dtype != np.uint8:
        a = np.clip(a.astype(np.float32) * (255.0 if a.max() <= 1.0 else 1.0), 0, 255)
        a = a.astype(np.uint8)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3):
        raise ValueError(f"image must be a PIL image, HxWx3 or 3xHxW, got shape {a.shape}")
    return np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a


def draw_kept(image, kept, grid, *, dim: float = 0.38, outline=(255, 255, 255),
              highlight=None, highlight_outline=(255, 140, 0)):
    """The image with the pruned patches dimmed and greyed and the kept ones outlined.

    image: the picture the model saw (PIL image, array or tensor); it is divided evenly into
           the grid's cells, so pass it at the aspect ratio the processor resized it to. For a
           (t, H, W) grid with t > 1, a list of t frames (drawn side by side).
    kept:  1-D int indices into the image's tokens (a `pruner.kept[b][i]`), row-major.
    grid:  (H, W) or (t, H, W) in LLM tokens (`pruner.grids[b][i]`).
    highlight: optional indices among `kept` outlined in `highlight_outline`, 2 px (the
           demo marks D2Pruner's greedy-MIS picks so).
    Returns a PIL RGB image of the input's size (frames: their widths side by side).
    """
    from PIL import Image, ImageDraw

    g = tuple(int(v) for v in grid)
    if len(g) == 2:
        g = (1, *g)
    if len(g) != 3 or min(g) < 1:
        raise ValueError(f"grid must be (H, W) or (t, H, W) of positive ints, got {grid!r}")
    t, gh, gw = g
    frames = list(image) if t > 1 else [image]
    if len(frames) != t:
        raise ValueError(f"grid {grid} has {t} frames: pass a list of {t} images")
    idx = torch.as_tensor(kept).flatten().long().tolist()
    n = t * gh * gw
    if any(not 0 <= i < n for i in idx):
        raise ValueError(f"kept indices must be in [0, {n}) for grid {grid}")
    keep = np.zeros(n, bool)
    keep[idx] = True
    keep = keep.reshape(t, gh, gw)
    special = np.zeros(n, bool)
    if highlight is not None:
        special[torch.as_tensor(highlight).flatten().long().numpy()] = True
    special = special.reshape(t, gh, gw)
    out = []
    for f, frame in enumerate(frames):
        x = _as_array(frame).astype(np.float32)
        h, w = x.shape[:2]
        ys = (np.arange(h) * gh) // h  # the grid row of each pixel row
        xs = (np.arange(w) * gw) // w
        mask = keep[f][ys[:, None], xs[None, :]][..., None]
        grey = x.mean(-1, keepdims=True)
        dark = dim * (0.3 * x + 0.7 * grey) + 28.0
        panel = Image.fromarray(np.where(mask, x, dark).clip(0, 255).astype(np.uint8))
        d = ImageDraw.Draw(panel)
        for r, c in zip(*np.nonzero(keep[f])):
            x0, x1 = (c * w) // gw, ((c + 1) * w) // gw - 1
            y0, y1 = (r * h) // gh, ((r + 1) * h) // gh - 1
            if special[f, r, c]:
                d.rectangle((x0, y0, x1, y1), outline=highlight_outline, width=2)
            else:
                d.rectangle((x0, y0, x1, y1), outline=outline)
        out.append(panel)
    if len(out) == 1:
        return out[0]
    strip = Image.new("RGB", (sum(p.width for p in out), max(p.height for p in out)))
    x = 0
    for p in out:
        strip.paste(p, (x, 0))
        x += p.width
    return strip
