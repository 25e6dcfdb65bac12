"""The demo's figure (demo.png), a 256-colour PNG in two parts:

* why: the picture, the head-mean attention, the positional prior and the debiased score
  attention / (prior + eps), each a heat map over the patch grid at the picture's size
  (dark = low, bright = high, each scaled to its own min..max): the attention is brightest
  on the bottom rows, the prior is that bias alone, the debiased score is what is left;
* what: one row per reduction, the kept tokens of raw top-k, debiased top-k and D2Pruner
  (kept patches bright, pruned dimmed, D2Pruner's greedy-MIS picks outlined in orange, drawn
  by the library's `draw_kept`) and a chart of the tokens each method keeps per grid row.
"""
from __future__ import annotations

import os

import numpy as np

from d2pruner_kernels.draw import draw_kept
from scene import (BOTTOM_ROWS, GRID, HEADS, IMG, METHODS, N, PATCH, REDUCTIONS, kept_count,
                   row_counts)

EXPLAIN = ("picture", "attention", "prior", "debiased")   # the panels of the "why" row

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
