"""`make demo`: D2Pruner on an embedded example, next to the two baselines it improves on.

    python -m d2pruner_kernels.demo --out demo_out          # writes demo_out/demo.png
    python -m d2pruner_kernels.demo --png docs/demo.png     # the figure at an explicit path

Everything is drawn and computed here, seeded, nothing is downloaded:

* a 336x336 picture (sky gradient, clouds, sun, house, tree, textured grass, a path), cut
  into the 24x24 grid of 14-px patches of a LLaVA-1.5 vision tower (N = 576 tokens);
* patch features: colour mean / spread and edge statistics of every patch, lifted to D=256
  by a fixed random projection with a tanh, so that look-alike patches (two bits of sky,
  two bits of grass) have cosine near 1 and different things do not;
* an 8-head attention map over the patches: content saliency (objects and their outlines)
  times a LLaVA-like positional bias that grows along the raster order towards the bottom
  rows, with head-wise noise;
* the positional prior that debiasing divides by.

It prunes at 75% and 90% reduction with raw-attention top-k, debiased top-k and D2Pruner,
prints what each kept and how long prune() took (median of `timing.median_seconds`), and
writes `<out>/demo.png` (or `--png PATH`), a 256-colour PNG in two parts:

* why: the picture, the head-mean attention, the positional prior and the debiased score
  attention / (prior + eps), each a heat map over the patch grid at the picture's size
  (dark = low, bright = high, each scaled to its own min..max): the attention is brightest
  on the bottom rows, the prior is that bias alone, the debiased score is what is left;
* what: one row per reduction, the kept tokens of raw top-k, debiased top-k and D2Pruner
  (kept patches bright, pruned dimmed, D2Pruner's greedy-MIS picks outlined in orange) and
  a chart of the tokens each method keeps per grid row.
"""
from __future__ import annotations

import argparse
import math
import os

import numpy as np
import torch

from . import dispatch, reference, stages, timing
from .checks import pivot_count, resolve_k
from .draw import draw_kept
from .prune import prune

PATCH = 14                    # pixels per patch side (CLIP ViT-L/14 at 336 px)
GRID = (24, 24)               # patch grid (rows, columns)
IMG = PATCH * GRID[0]         # 336
N = GRID[0] * GRID[1]         # 576 visual tokens
D = 256                       # feature width
HEADS = 8
REDUCTIONS = (0.75, 0.90)     # share of the tokens pruned
BIAS_STRENGTH = 3.5           # log of the bias ratio last token / first token
CONTENT_FLOOR = 0.12          # attention every patch gets whatever its content
BOTTOM_ROWS = 4               # "bottom rows" in the printed summary: rows 20..23
REGIONS = ("sky", "cloud", "sun", "house", "roof", "tree", "grass", "path")
METHODS = ("raw top-k", "debiased top-k", "D2Pruner")
EXPLAIN = ("picture", "attention", "prior", "debiased")   # the panels of the "why" row
EPS = 1e-7                    # prune()'s default eps, in the debiased score

# figure layout (pixels): 4 columns; the "why" row, then one row per reduction
MARGIN = 12
HEADER_H = 34                 # a section heading
TITLE_H = 44                  # a panel's title and subtitle
CBAR_H = 40                   # colour bar and its labels under a heat map
AXIS_H = 22                   # tick labels under the per-row chart
COLS = 4
PICK_COLOUR = (255, 140, 0)
METHOD_COLOURS = {"raw top-k": (214, 69, 65), "debiased top-k": (66, 133, 244),
                  "D2Pruner": (255, 140, 0)}
PNG_COLOURS = 256             # the figure is saved as a palette PNG (well under 300 KB) ...
HEAT_COLOURS = 64             # ... of which these many are kept for the heat-map ramp


def kept_count(reduction: float, n: int = N) -> int:
    """Tokens kept at a given reduction, as prune() reads a ratio k (75% -> 144, 90% -> 58)."""
    return resolve_k(1.0 - reduction, n)


def panel_boxes(reductions=REDUCTIONS) -> dict:
    """(left, top, right, bottom) of every IMG x IMG panel in demo.png: keys EXPLAIN
    ("picture", "attention", "prior", "debiased"), then (reduction, method) for the
    METHODS and (reduction, "rows") for the kept-per-grid-row chart."""
    col = lambda i: MARGIN + i * (IMG + MARGIN)  # noqa: E731
    y = HEADER_H + TITLE_H
    boxes = {name: (col(i), y, col(i) + IMG, y + IMG) for i, name in enumerate(EXPLAIN)}
    y += IMG + CBAR_H + HEADER_H
    for reduction in reductions:
        y += TITLE_H
        for i, name in enumerate(METHODS + ("rows",)):
            boxes[reduction, name] = (col(i), y, col(i) + IMG, y + IMG)
        y += IMG + AXIS_H
    return boxes


def figure_size(reductions=REDUCTIONS) -> tuple[int, int]:
    """(width, height) of demo.png."""
    bottom = max(b[3] for b in panel_boxes(reductions).values())
    return MARGIN + COLS * (IMG + MARGIN), bottom + AXIS_H


# --------------------------------------------------------------------------- the picture

def draw_scene(seed: int = 0):
    """The example picture, uint8 [336, 336, 3], and the region label of every pixel."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    h = w = IMG
    horizon = 16 * PATCH                                      # grass from patch row 16 on
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)

    # sky: deep blue at the top to pale blue at the horizon
    t = (yy / horizon)[..., None]
    top, low = np.array([30, 80, 185], np.float32), np.array([190, 220, 248], np.float32)
    img = (1 - t) * top + t * low
    label = np.zeros((h, w), np.uint8)                        # 0 = sky

    # grass: green with per-pixel grain and darker/lighter blades
    grass = yy >= horizon
    shade = 0.85 + 0.3 * ((yy - horizon) / (h - horizon))     # a bit lighter towards the viewer
    base = np.stack([60 * shade, 140 * shade, 45 * shade], -1)
    img[grass] = base[grass]
    label[grass] = REGIONS.index("grass")

    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    lab = Image.fromarray(label)
    d, dl = ImageDraw.Draw(im), ImageDraw.Draw(lab)

    def shape(kind, xy, fill, region, **kw):
        getattr(d, kind)(xy, fill=fill, **kw)
        getattr(dl, kind)(xy, fill=REGIONS.index(region), **kw)

    for _ in range(900):                                      # grass blades
        x0, y0 = rng.integers(0, w), rng.integers(horizon + 4, h)
        ln = rng.integers(4, 10)
        c = tuple(int(v) for v in rng.choice([[35, 95, 30], [95, 175, 60]]))
        d.line([(x0, y0), (x0 + rng.integers(-2, 3), y0 - ln)], fill=c, width=1)

    # clouds
    for cx, cy, s in ((70, 52, 1.0), (150, 88, 0.7)):
        for dx, dy, r in ((-22, 4, 16), (0, -6, 22), (24, 4, 17), (8, 10, 16)):
            r = r * s
            shape("ellipse", (cx + dx * s - r, cy + dy * s - r * 0.8,
                              cx + dx * s + r, cy + dy * s + r * 0.8), (246, 248, 252), "cloud")
    # sun with rays
    sx, sy, sr = 272, 58, 28
    for a in range(0, 360, 30):
        ca, sa = math.cos(math.radians(a)), math.sin(math.radians(a))
        shape("line", ((sx + ca * (sr + 5), sy + sa * (sr + 5)),
                       (sx + ca * (sr + 16), sy + sa * (sr + 16))), (255, 200, 40), "sun", width=4)
    shape("ellipse", (sx - sr, sy - sr, sx + sr, sy + sr), (255, 215, 60), "sun")

    # path from the door to the bottom edge
    shape("polygon", ((166, 252), (188, 252), (236, h), (122, h)), (196, 170, 120), "path")
    # house: walls, roof, door, windows, chimney
    shape("rectangle", (214, 104, 228, 140), (120, 60, 50), "roof")
    shape("rectangle", (120, 152, 234, 252), (226, 206, 170), "house")
    shape("polygon", ((108, 154), (246, 154), (177, 92)), (175, 58, 40), "roof")
    shape("rectangle", (164, 196, 190, 252), (110, 65, 35), "house")
    for x0 in (132, 204):
        shape("rectangle", (x0 - 2, 168, x0 + 20, 190), (250, 250, 250), "house")
        shape("rectangle", (x0, 170, x0 + 18, 188), (95, 150, 210), "house")
        d.line(((x0 + 9, 170), (x0 + 9, 188)), fill=(250, 250, 250), width=2)
        d.line(((x0, 179), (x0 + 18, 179)), fill=(250, 250, 250), width=2)
    # tree: trunk and a leafy crown
    shape("rectangle", (50, 185, 66, 262), (105, 70, 40), "tree")
    for dx, dy, r in ((0, -10, 36), (-22, 8, 24), (22, 8, 24), (0, -36, 22)):
        shape("ellipse", (58 + dx - r, 168 + dy - r, 58 + dx + r, 168 + dy + r), (40, 115, 45), "tree")

    img = np.asarray(im).astype(np.float32)
    tree = np.asarray(lab) == REGIONS.index("tree")
    leaves = tree & (yy < 185)                                # texture on the crown
    img[leaves] += rng.normal(0, 18, (int(leaves.sum()), 1)) * np.array([0.6, 1.0, 0.5])
    img += rng.normal(0, 3.0, img.shape)                      # sensor noise everywhere
    return np.clip(img, 0, 255).astype(np.uint8), np.asarray(lab)


def patchify(img: np.ndarray) -> np.ndarray:
    """[336, 336, C] -> [576, 14, 14, C] patches in row-major grid order."""
    gh, gw = GRID
    c = img.shape[-1]
    return img.reshape(gh, PATCH, gw, PATCH, c).transpose(0, 2, 1, 3, 4).reshape(N, PATCH, PATCH, c)


def patch_regions(label: np.ndarray) -> np.ndarray:
    """Majority region of every patch, int [576]."""
    p = patchify(label[..., None])[..., 0].reshape(N, -1)
    return np.array([np.bincount(row, minlength=len(REGIONS)).argmax() for row in p])


# --------------------------------------------------------------------------- features

def patch_features(img: np.ndarray, seed: int = 0) -> torch.Tensor:
    """[576, 256] float32 features: per-patch statistics lifted by a seeded random map.

    Statistics (14 per patch): mean RGB, RGB std, mean |d/dx|, mean |d/dy| and a 4-bin
    gradient-orientation histogram of the luminance, plus brightness and saturation. They
    are z-scored over the patches and weighted (colour counts most), then x = tanh(z W)
    with a fixed Gaussian W [14, 256]: a smooth nonlinear lift that keeps the geometry, so
    look-alike patches get cosine near 1 and different ones much less.
    """
    x = img.astype(np.float32) / 255.0
    lum = x @ np.array([0.299, 0.587, 0.114], np.float32)
    gy, gx = np.gradient(lum)
    p = patchify(x).reshape(N, -1, 3)
    pgx = patchify(gx[..., None]).reshape(N, -1)
    pgy = patchify(gy[..., None]).reshape(N, -1)
    mag = np.hypot(pgx, pgy)
    ang = np.mod(np.arctan2(pgy, pgx), np.pi)                 # orientation in [0, pi)
    bins = np.minimum((ang / (np.pi / 4)).astype(int), 3)
    hist = np.stack([(mag * (bins == b)).mean(1) for b in range(4)], 1)
    mean, std = p.mean(1), p.std(1)
    bright, sat = mean.max(1), mean.max(1) - mean.min(1)
    stats = np.concatenate([mean, std, np.abs(pgx).mean(1, keepdims=True),
                            np.abs(pgy).mean(1, keepdims=True), hist,
                            bright[:, None], sat[:, None]], 1)
    weights = np.array([1.0] * 3 + [0.3] * 3 + [0.3] * 2 + [0.2] * 4 + [0.6, 0.6], np.float32)
    z = (stats - stats.mean(0)) / (stats.std(0) + 1e-6) * weights
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.randn(z.shape[1], D, generator=g) / math.sqrt(z.shape[1])
    return torch.tanh(torch.from_numpy(z).float() @ w * 1.2).contiguous()


# --------------------------------------------------------------------------- attention

def content_saliency(img: np.ndarray) -> np.ndarray:
    """[576] in [0, 1]: how much a patch stands out (colour rarity + contrast to its
    neighbours); objects and their outlines score high, sky and grass low."""
    x = img.astype(np.float32) / 255.0
    mean = patchify(x).reshape(N, -1, 3).mean(1)              # [N, 3]
    rarity = np.linalg.norm(mean[:, None] - mean[None], axis=-1).mean(1)
    m = mean.reshape(*GRID, 3)
    pad = np.pad(m, ((1, 1), (1, 1), (0, 0)), mode="edge")
    surround = sum(pad[1 + dy:1 + dy + GRID[0], 1 + dx:1 + dx + GRID[1]]
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx) / 8
    contrast = np.linalg.norm(m - surround, axis=-1).reshape(N)
    norm = lambda v: (v - v.min()) / (v.max() - v.min() + 1e-12)  # noqa: E731
    return norm(0.5 * norm(rarity) + 0.5 * norm(contrast))


def positional_bias(strength: float = BIAS_STRENGTH) -> np.ndarray:
    """[576] LLaVA-like positional bias: the last text token attends more to the visual
    tokens near it in the sequence, i.e. later in raster order, i.e. the bottom rows."""
    pos = np.arange(N, dtype=np.float64) / (N - 1)
    return np.exp(strength * pos)


def head_attention(saliency: np.ndarray, seed: int = 0) -> torch.Tensor:
    """[8, 576] attention of the last text token over the visual tokens, per head:
    softmax(log content + log bias + head noise), each head with its own temperature."""
    rng = np.random.default_rng(seed + 2)
    content = CONTENT_FLOOR + saliency
    logits = []
    for h in range(HEADS):
        temp = rng.uniform(0.8, 1.4)                          # how peaked this head's content is
        noise = rng.normal(0.0, 0.35, N)                      # head-wise noise
        logits.append(temp * np.log(content) + np.log(positional_bias()) + noise)
    logits = np.stack(logits)
    a = np.exp(logits - logits.max(1, keepdims=True))
    return torch.from_numpy(a / a.sum(1, keepdims=True)).float()


def calibration_prior(saliency: np.ndarray) -> torch.Tensor:
    """[576] positional prior, computed analytically.

    In real use the prior is the same attention averaged offline over ~1000 calibration
    images. Over many images the content term averages out to a constant,
    so that mean is (bias x average content): the demo writes it down directly instead of
    simulating a calibration set, with the mean content of this picture as the constant.
    Normalised to mean 1 (only its shape matters to the ranking).
    """
    p = positional_bias() * (CONTENT_FLOOR + saliency).mean()
    return torch.from_numpy(p / p.mean()).float()


# --------------------------------------------------------------------------- pruning

def run_methods(tokens, attn, prior, k, repeats, device):
    """{name: (kept indices as a numpy array, median ms)} for the three methods. The first
    call gives the kept set and is the warm-up; then timing.median_seconds over `repeats`."""
    calls = {
        # plain top-k of the head-mean attention: no prior, all of the budget as pivots
        "raw top-k": lambda: prune(tokens, attn, GRID, k, prior=None, pivot_ratio=1.0),
        # top-k of the debiased score: docs/spec.md says rho = 1 is exactly that
        "debiased top-k": lambda: prune(tokens, attn, GRID, k, prior=prior, pivot_ratio=1.0),
        # D2Pruner with the defaults: 70% pivots, diverse rest from the similarity graph
        "D2Pruner": lambda: prune(tokens, attn, GRID, k, prior=prior),
    }
    assert tuple(calls) == METHODS
    out = {}
    for name, fn in calls.items():
        kept = fn().cpu().numpy()
        ms = timing.median_seconds(fn, repeats, warmup=0, device=device) * 1e3
        out[name] = (kept, ms)
    return out


def row_counts(kept: np.ndarray) -> np.ndarray:
    return np.bincount(kept // GRID[1], minlength=GRID[0])


# --------------------------------------------------------------------------- the figure

def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 without sizes
        return ImageFont.load_default()


# inferno-like anchors: black -> purple -> red -> orange -> pale yellow, luminance rising
_HEAT = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]],
                 np.float32)


def heat_colours(v: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] colours of values in [0, 1]: dark = low, bright = high."""
    t = np.clip(np.asarray(v, np.float64), 0.0, 1.0) * (len(_HEAT) - 1)
    i = np.minimum(t.astype(int), len(_HEAT) - 2)
    f = (t - i)[..., None]
    return np.rint((1 - f) * _HEAT[i] + f * _HEAT[i + 1]).astype(np.uint8)


def render_heat(values) -> tuple:
    """[576] values -> (IMG x IMG heat map over the patch grid, one 14-px cell per patch,
    scaled linearly to the values' own min..max; min; max)."""
    from PIL import Image

    v = np.asarray(values, np.float64).reshape(GRID)
    lo, hi = float(v.min()), float(v.max())
    cells = heat_colours((v - lo) / (hi - lo + 1e-30))
    return Image.fromarray(np.repeat(np.repeat(cells, PATCH, 0), PATCH, 1)), lo, hi


def render_picture(img: np.ndarray):
    """The picture with the patch grid drawn faintly."""
    from PIL import Image

    x = img.astype(np.float32)
    lines = np.zeros(GRID[0] * PATCH, bool)
    lines[::PATCH] = True
    grid = (lines[:, None] | lines[None, :])[..., None]
    return Image.fromarray(np.where(grid, 0.8 * x, x).astype(np.uint8))


def render_panel(img: np.ndarray, kept: np.ndarray, picks: np.ndarray | None = None):
    """The picture with pruned patches dimmed and greyed, kept patches bright with a white
    outline; `picks` (D2Pruner's greedy-MIS picks, a subset of kept) get an orange one."""
    return draw_kept(img, kept, GRID, highlight=picks, highlight_outline=PICK_COLOUR)


CHART_LEFT = 30               # the per-row chart: room for the row numbers
CHART_MAX = 24                # its x axis: 0..24 tokens (a grid row has 24)


def chart_x(count: float) -> int:
    """x (within the chart panel) of `count` kept tokens."""
    return CHART_LEFT + round(count * (IMG - CHART_LEFT - 8) / CHART_MAX)


def render_rows_chart(res: dict):
    """IMG x IMG chart, its rows aligned with the grid rows of the panels beside it: for
    every grid row one bar per method, the tokens that method keeps in the row."""
    from PIL import Image, ImageDraw

    panel = Image.new("RGB", (IMG, IMG), (255, 255, 255))
    d = ImageDraw.Draw(panel)
    bottom = (GRID[0] - BOTTOM_ROWS) * PATCH
    d.rectangle((CHART_LEFT, bottom, IMG - 1, IMG - 1), fill=(236, 236, 236))
    label = f"bottom {BOTTOM_ROWS} rows"
    first = max(row_counts(res[name][0])[GRID[0] - BOTTOM_ROWS] for name in METHODS)
    if chart_x(first) + 8 + d.textlength(label, font=_font(12)) < IMG - 6:  # clear of the bars
        _put(d, IMG - 6, bottom + 1, label, 12, (110, 110, 110), "right")
    for t in range(0, CHART_MAX + 1, 6):
        d.line((chart_x(t), 0, chart_x(t), IMG - 1), fill=(205, 205, 205))
    for r in range(GRID[0]):
        if r % 4 == 0 or r == GRID[0] - 1:
            _put(d, CHART_LEFT - 5, r * PATCH + 1, str(r), 11, (90, 90, 90), "right")
    for m, name in enumerate(METHODS):
        counts = row_counts(res[name][0])
        for r, c in enumerate(counts):
            if c:
                y = r * PATCH + 1 + 4 * m
                d.rectangle((chart_x(0), y, chart_x(c), y + 3), fill=METHOD_COLOURS[name])
    d.line((CHART_LEFT, 0, CHART_LEFT, IMG - 1), fill=(80, 80, 80))
    return panel


def _text(d, xy, text, size, fill, width=IMG):
    """Text at xy in the largest font up to `size` that fits in `width` px."""
    for s in range(size, 8, -1):
        font = _font(s)
        if d.textlength(text, font=font) <= width:
            break
    d.text(xy, text, fill=fill, font=font)


def _put(d, x, y, text, size, fill, align="left"):
    """Text with its left, centre or right end at x (computed: no anchors, which the
    bitmap font of an old Pillow does not take)."""
    font = _font(size)
    w = d.textlength(text, font=font)
    d.text((x - {"left": 0, "centre": w / 2, "right": w}[align], y), text, fill=fill, font=font)


EXPLAIN_TITLES = {
    "picture": ("picture", f"{IMG}x{IMG} px, {GRID[0]}x{GRID[1]} patches of {PATCH} px (N={N})"),
    "attention": ("attention (head mean)", f"mean of {HEADS} heads: the bottom rows inflated"),
    "prior": ("positional prior", "calibration mean: the positional bias alone"),
    "debiased": ("debiased score", "attention / (prior + eps): the content is left"),
}


def make_figure(img: np.ndarray, maps: dict, results: dict, picks: dict, path: str):
    """Writes the figure to `path` (a 256-colour PNG) and returns it (RGB).

    maps: {"attention", "prior", "debiased": [576] values}; results: {reduction: {method:
    (kept, ms)}}; picks: {reduction: D2Pruner's greedy-MIS picks}."""
    from PIL import Image, ImageDraw

    boxes = panel_boxes(tuple(results))
    fig = Image.new("RGB", figure_size(tuple(results)), (255, 255, 255))
    d = ImageDraw.Draw(fig)
    black, grey = (0, 0, 0), (70, 70, 70)
    width = fig.size[0] - 2 * MARGIN

    _text(d, (MARGIN, 8), "Why: a LLaVA-like attention is inflated on the bottom rows; the "
          "positional prior is that bias alone, and dividing by it leaves the content.",
          17, black, width)
    for name in EXPLAIN:
        x0, y0, x1, y1 = boxes[name]
        title, sub = EXPLAIN_TITLES[name]
        _text(d, (x0, y0 - TITLE_H + 2), title, 17, black)
        _text(d, (x0, y0 - TITLE_H + 22), sub, 14, grey)
        if name == "picture":
            fig.paste(render_picture(img), (x0, y0))
            continue
        heat, lo, hi = render_heat(maps[name])
        fig.paste(heat, (x0, y0))
        bar = heat_colours(np.linspace(0.0, 1.0, IMG))[None].repeat(10, 0)
        fig.paste(Image.fromarray(bar), (x0, y1 + 6))
        d.rectangle((x0 - 1, y1 + 5, x1, y1 + 16), outline=(150, 150, 150))
        _put(d, x0, y1 + 20, f"{lo:.2g}", 12, grey)
        _put(d, (x0 + x1) // 2, y1 + 20, "dark = low, bright = high", 12, grey, "centre")
        _put(d, x1, y1 + 20, f"{hi:.2g}", 12, grey, "right")

    first = min(boxes[r, "rows"][1] for r in results) - TITLE_H
    _text(d, (MARGIN, first - HEADER_H + 8), "What each method keeps (bright: kept, dimmed: "
          "pruned; orange outline: D2Pruner's greedy-MIS picks), and how the kept tokens fall "
          "over the grid rows.", 17, black, width)
    for reduction, res in results.items():
        k = kept_count(reduction)
        for name in METHODS:
            kept = res[name][0]
            x0, y0, _, _ = boxes[reduction, name]
            _text(d, (x0, y0 - TITLE_H + 2), name, 17, black)
            _text(d, (x0, y0 - TITLE_H + 22), f"{reduction:.0%} reduction: k={k} of {N}, "
                  f"{len(np.unique(kept // GRID[1]))} of {GRID[0]} rows hit", 14, grey)
            extra = picks[reduction] if name == "D2Pruner" else None
            fig.paste(render_panel(img, kept, extra), (x0, y0))
        x0, y0, x1, y1 = boxes[reduction, "rows"]
        _text(d, (x0, y0 - TITLE_H + 2), f"kept per grid row, {reduction:.0%} reduction", 17,
              black)
        x = x0
        for name in METHODS:                                 # the legend: swatch + name
            d.rectangle((x, y0 - TITLE_H + 26, x + 11, y0 - TITLE_H + 35),
                        fill=METHOD_COLOURS[name])
            d.text((x + 15, y0 - TITLE_H + 22), name, fill=grey, font=_font(14))
            x += 15 + int(d.textlength(name, font=_font(14))) + 14
        fig.paste(render_rows_chart(res), (x0, y0))
        for t in range(0, CHART_MAX + 1, 6):
            _put(d, x0 + chart_x(t), y1 + 4, str(t), 12, grey, "centre")
        _put(d, x0 + CHART_LEFT - 5, y1 + 4, "kept:", 12, grey, "right")

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    to_palette(fig).save(path, optimize=True)
    return fig


def to_palette(fig):
    """The figure as a PNG_COLOURS palette image: HEAT_COLOURS evenly spaced colours of the
    heat ramp (so heat maps and colour bars do not band) and an octree cut of the rest (it
    keeps every patch's mean colour within a few levels; a median cut, led by the white
    background, shifts the deep-blue sky by ~15)."""
    from PIL import Image

    rest = PNG_COLOURS - HEAT_COLOURS
    cut = fig.quantize(rest, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    pal = cut.getpalette()[:3 * rest]
    pal += heat_colours(np.linspace(0.0, 1.0, HEAT_COLOURS)).reshape(-1).tolist()
    ref = Image.new("P", (1, 1))
    ref.putpalette(pal + [0] * (3 * 256 - len(pal)))
    return fig.quantize(palette=ref, dither=Image.Dither.NONE)


# --------------------------------------------------------------------------- main

def build_example(seed: int = 0, device="cpu"):
    """Picture, region label per patch, tokens [576, 256], attention [8, 576], prior [576]."""
    img, label = draw_scene(seed)
    sal = content_saliency(img)
    tokens = patch_features(img, seed).to(device)
    attn = head_attention(sal, seed).to(device)
    prior = calibration_prior(sal).to(device)
    return img, patch_regions(label), tokens, attn, prior


def _fmt_kept(name, kept, ms, regions, width):
    rows = row_counts(kept)
    reg = np.bincount(regions[kept], minlength=len(REGIONS))
    lines = [f"  {name:<{width}} rows 0-23: {' '.join(f'{c:2d}' for c in rows)}",
             f"  {'':<{width}} {len(np.unique(kept // GRID[1])):2d} rows hit, "
             f"{rows[-BOTTOM_ROWS:].sum():3d} in the bottom {BOTTOM_ROWS} rows | "
             + ", ".join(f"{r} {c}" for r, c in zip(REGIONS, reg) if c)
             + f" | {ms:.2f} ms",
             f"  {'':<{width}} first indices: {' '.join(str(int(i)) for i in kept[:12])} ..."]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m d2pruner_kernels.demo", description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--out", default="demo_out", help="folder for demo.png (default: demo_out)")
    ap.add_argument("--png", default=None, metavar="PATH",
                    help="write the figure to PATH instead (default: OUT/demo.png); "
                         "missing folders are created")
    ap.add_argument("--repeats", type=int, default=5, help="timed prune() calls per method (median)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads while the demo runs (default 1: at N=576 more threads "
                         "buy little and stall badly on a busy machine; 0 = leave torch's setting)")
    args = ap.parse_args(argv)
    saved = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return _demo(args)
    finally:
        torch.set_num_threads(saved)


def _demo(args) -> dict:
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise SystemExit("the demo draws with Pillow: pip install 'd2pruner_kernels[demo]'")
    dev = torch.device("cuda" if args.device == "cuda" or
                       (args.device == "auto" and torch.cuda.is_available()) else "cpu")

    img, regions, tokens, attn, prior = build_example(args.seed, dev)
    edges = reference.similarity_edges(tokens[None], torch.arange(N, device=dev)[None], 0, (1, *GRID))
    n_edges = int(edges.sum()) // 2
    where = (torch.cuda.get_device_name(dev) + " (GPU)") if dev.type == "cuda" \
        else f"CPU of this machine ({os.cpu_count()} cores), {torch.get_num_threads()} torch thread(s)"
    print(f"D2Pruner demo: drawn {IMG}x{IMG} picture -> {GRID[0]}x{GRID[1]} patches of {PATCH} px "
          f"(N={N}), features D={D}, attention H={HEADS} heads with a bottom-row bias")
    print(f"similarity graph over all {N} tokens at sim_threshold=0.8: {n_edges} edges "
          f"(mean degree {2 * n_edges / N:.1f})")
    clock = "CUDA events" if dev.type == "cuda" else "perf_counter"
    print(f"prune(backend='auto') on {dev.type}: {dispatch.describe(dev, N)}; times are the "
          f"median of {args.repeats} prune() calls after a warm-up (timing.median_seconds, "
          f"{clock}) on the {where}")

    results, picks = {}, {}
    width = max(len(s) for s in METHODS)
    debiased = stages.debiased_scores(attn[None], prior[None], EPS)
    order = stages.rank_order(debiased)[0].cpu().numpy()
    for reduction in REDUCTIONS:
        k = kept_count(reduction)
        res = run_methods(tokens, attn, prior, k, args.repeats, dev)
        n_p = pivot_count(0.7, k)
        # D2Pruner's kept set = the n_p best debiased tokens (pivots) + the MIS picks
        picks[reduction] = np.setdiff1d(res["D2Pruner"][0], order[:n_p])
        results[reduction] = res
        print(f"\n{reduction:.0%} reduction: keep k={k} of {N} "
              f"(D2Pruner: {n_p} pivots + {k - n_p} from the greedy MIS)")
        for name, (kept, ms) in res.items():
            print(_fmt_kept(name, kept, ms, regions, width))
        reg = np.bincount(regions[picks[reduction]], minlength=len(REGIONS))
        print(f"  {'':<{width}} its {len(picks[reduction])} greedy-MIS picks: "
              + ", ".join(f"{r} {c}" for r, c in zip(REGIONS, reg) if c))

    maps = {"attention": attn.mean(0).cpu().numpy(), "prior": prior.cpu().numpy(),
            "debiased": debiased[0].cpu().numpy()}
    path = args.png if args.png is not None else os.path.join(args.out, "demo.png")
    make_figure(img, maps, results, picks, path)
    print(f"\nwrote {path} ({os.path.getsize(path) / 1024:.0f} KB)")
    return {"png": path, "results": results, "picks": picks, "regions": regions, "maps": maps}


if __name__ == "__main__":
    main()
