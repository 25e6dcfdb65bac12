"""The demo (`make demo`: examples/demo/) runs, writes its figure, and shows what it claims to
show."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")

from d2pruner_kernels import prune  # noqa: E402
from d2pruner_kernels.checks import pivot_count  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "demo"
sys.path.insert(0, str(EXAMPLE))  # the example's modules import each other by name, as when run
import demo  # noqa: E402
import figure  # noqa: E402
import scene  # noqa: E402

LUMA = np.array([0.299, 0.587, 0.114])


def _main(argv):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        res = demo.main(argv)
    return res, buf.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One demo run with --png at a path whose folder does not exist yet."""
    tmp = tmp_path_factory.mktemp("demo")
    png = tmp / "docs" / "figure.png"
    res, text = _main(["--png", str(png), "--out", str(tmp / "unused"), "--repeats", "2"])
    return tmp, png, res, text


@pytest.fixture(scope="module")
def pixels(run):
    from PIL import Image

    with Image.open(run[1]) as im:
        return np.asarray(im.convert("RGB")).astype(np.float64)


@pytest.fixture(scope="module")
def example():
    return scene.build_example(0)


def _panel(pixels, key):
    x0, y0, x1, y1 = figure.panel_boxes()[key]
    return pixels[y0:y1, x0:x1]


def _cells(panel, inset=0):
    """[24, 24, 3] mean colour of every patch cell of a panel (inset px off each side)."""
    gh, gw = scene.GRID
    p = panel.reshape(gh, scene.PATCH, gw, scene.PATCH, 3)
    return p[:, inset:scene.PATCH - inset, :, inset:scene.PATCH - inset].mean((1, 3))


def _ranks(v):
    return np.argsort(np.argsort(v, kind="stable"), kind="stable").astype(np.float64)


def test_png_written_at_the_explicit_path(run):
    from PIL import Image

    tmp, png, res, text = run
    assert png.is_file() and res["png"] == str(png)
    assert f"wrote {png}" in text
    assert not (tmp / "unused").exists()            # --png replaces OUT/demo.png
    assert png.stat().st_size < 300 * 1024          # a palette PNG, fit to commit
    with Image.open(png) as im:
        assert im.mode == "P" and len(im.getcolors(256)) > 150
        assert im.size == figure.figure_size()
        w, h = im.size
    assert 4 * scene.IMG <= w < 5 * scene.IMG           # four columns
    assert 3 * scene.IMG <= h < 4 * scene.IMG           # the "why" row + one row per reduction


def test_layout_panels_inside_and_apart():
    boxes = figure.panel_boxes()
    w, h = figure.figure_size()
    assert len(boxes) == 4 + len(scene.REDUCTIONS) * 4
    for (x0, y0, x1, y1) in boxes.values():
        assert (x1 - x0, y1 - y0) == (scene.IMG, scene.IMG)
        assert 0 < x0 and x1 < w and 0 < y0 and y1 < h
    for a, b in itertools.combinations(boxes.values(), 2):
        assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)
    # the "why" row on top, then the reductions in order, each a row of four
    tops = [boxes[name][1] for name in figure.EXPLAIN]
    assert len(set(tops)) == 1
    for r in scene.REDUCTIONS:
        assert len({boxes[r, m][1] for m in scene.METHODS + ("rows",)}) == 1
    assert tops[0] < boxes[0.75, "D2Pruner"][1] < boxes[0.90, "D2Pruner"][1]


def test_explain_panels_differ_from_each_other(pixels, example):
    panels = {name: _panel(pixels, name) for name in figure.EXPLAIN}
    for a, b in itertools.combinations(figure.EXPLAIN, 2):
        assert np.abs(panels[a] - panels[b]).mean() > 20, (a, b)
    # the picture panel is the picture (under a faint patch grid)
    img = example[0].astype(np.float64)
    assert np.abs(_cells(panels["picture"], 2) - _cells(img, 2)).mean() < 4


def test_heat_colours_dark_low_bright_high():
    lum = figure.heat_colours(np.linspace(0, 1, 256)) @ LUMA
    assert np.all(np.diff(lum) > 0) and lum[0] < 10 and lum[-1] > 230


def test_heat_maps_are_the_maps(pixels):
    """Every heat map shows its values: cell brightness ranks as the values do."""
    _, _, tokens, attn, prior = scene.build_example(0)
    maps = {"attention": attn.mean(0).numpy(), "prior": prior.numpy(),
            "debiased": (attn.mean(0) / (prior + scene.EPS)).numpy()}
    for name, values in maps.items():
        lum = (_cells(_panel(pixels, name)) @ LUMA).reshape(-1)
        rho = np.corrcoef(_ranks(lum), _ranks(values))[0, 1]
        assert rho > 0.98, (name, rho)


def test_heat_maps_show_the_bias_and_its_removal(pixels, example):
    lum = {name: (_cells(_panel(pixels, name)) @ LUMA) for name in ("attention", "prior",
                                                                    "debiased")}
    b = scene.BOTTOM_ROWS
    att, pri, deb = lum["attention"], lum["prior"], lum["debiased"]
    # attention: the bottom rows are its brightest, brighter than the debiased bottom rows
    assert att[-b:].mean() > 2 * att[:-b].mean()
    assert att[-b:].mean() > deb[-b:].mean() + 60
    # the prior is the bias alone: brighter row by row down the picture
    assert np.all(np.diff(pri.mean(1)) > 0)
    # debiased: the bottom rows (grass, path) are below its average; and where the attention
    # ranks the grass over the sun, the debiased score ranks the sun far above the grass
    assert deb[-b:].mean() < deb.mean()
    region = example[1].reshape(scene.GRID)
    sun, grass = region == scene.REGIONS.index("sun"), region == scene.REGIONS.index("grass")
    assert att[grass].mean() > att[sun].mean()
    assert deb[sun].mean() > deb[grass].mean() + 60


def test_method_panels_show_exactly_the_kept_sets(run, pixels, example):
    """Per cell, kept = the picture unchanged, pruned = dimmed; MIS picks outlined orange."""
    _, _, res, _ = run
    img_cells = _cells(example[0].astype(np.float64), 3)
    for reduction, methods in res["results"].items():
        for name, (kept, _) in methods.items():
            panel = _panel(pixels, (reduction, name))
            diff = np.abs(_cells(panel, 3) - img_cells).mean(-1).reshape(-1)
            shown = np.flatnonzero(diff < 8)
            np.testing.assert_array_equal(shown, kept, err_msg=f"{reduction} {name}")
            assert diff[np.setdiff1d(np.arange(scene.N), kept)].min() > 12
        # the outline of a cell: orange for the greedy-MIS picks, white for the other kept
        panel = _panel(pixels, (reduction, "D2Pruner"))
        picks = set(int(i) for i in res["picks"][reduction])
        for i in methods["D2Pruner"][0]:
            r, c = divmod(int(i), scene.GRID[1])
            edge = panel[r * scene.PATCH, c * scene.PATCH + 3:c * scene.PATCH + 11].mean(0)
            want = figure.PICK_COLOUR if int(i) in picks else (255, 255, 255)
            assert np.abs(edge - want).max() < 30, (reduction, i, edge)


def test_rows_chart_bars_are_the_row_counts(run, pixels):
    _, _, res, _ = run
    for reduction, methods in res["results"].items():
        chart = _panel(pixels, (reduction, "rows"))
        for m, name in enumerate(scene.METHODS):
            counts = scene.row_counts(methods[name][0])
            colour = np.array(figure.METHOD_COLOURS[name], np.float64)
            for r, c in enumerate(counts):
                line = chart[r * scene.PATCH + 2 + 4 * m]
                bar = np.abs(line - colour).max(-1) < 30
                assert bar.sum() == figure.chart_x(c) - figure.chart_x(0), \
                    (reduction, name, r, c)
        # raw top-k's longest bars are in the bottom rows, D2Pruner's are not
        raw, d2 = (scene.row_counts(methods[n][0]) for n in ("raw top-k", "D2Pruner"))
        assert raw.argmax() >= scene.GRID[0] - scene.BOTTOM_ROWS > d2.argmax()


def test_default_path_and_the_package_timer(tmp_path, monkeypatch, pixels):
    """Without --png the figure goes to OUT/demo.png (the same figure), and the printed
    times come from timing.median_seconds (the demo has no timer of its own)."""
    from PIL import Image

    assert not hasattr(demo, "timed")
    calls = []

    def fake(fn, reps, *, warmup=1, device=None, flush=False):
        calls.append((reps, warmup, torch.device(device).type))
        fn()
        return 0.00125

    monkeypatch.setattr(demo.timing, "median_seconds", fake)
    res, text = _main(["--out", str(tmp_path / "o"), "--repeats", "3", "--device", "cpu"])
    assert res["png"] == str(tmp_path / "o" / "demo.png")
    assert calls == [(3, 0, "cpu")] * (len(scene.REDUCTIONS) * len(scene.METHODS))
    assert text.count("| 1.25 ms") == len(calls)
    with Image.open(res["png"]) as im:
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), pixels)


def test_the_committed_figure_is_what_the_demo_draws(pixels):
    """docs/demo.png (the README's picture) is this code's figure, pixel for pixel."""
    from PIL import Image

    with Image.open(EXAMPLE.parents[1] / "docs" / "demo.png") as im:
        committed = np.asarray(im.convert("RGB")).astype(np.float64)
    assert committed.shape == pixels.shape
    assert np.array_equal(committed, pixels), \
        "docs/demo.png is stale: python examples/demo/demo.py --png docs/demo.png"


def test_output_names_both_budgets_and_the_backend(run):
    _, _, _, text = run
    assert "k=144" in text and "k=58" in text
    assert scene.kept_count(0.75) == 144 and scene.kept_count(0.90) == 58
    assert "backend='auto'" in text and " ms" in text and "timing.median_seconds" in text
    for name in scene.METHODS:
        assert text.count(name) >= 2


def test_kept_sets_are_valid(run):
    _, _, res, _ = run
    for reduction, methods in res["results"].items():
        k = scene.kept_count(reduction)
        assert tuple(methods) == scene.METHODS
        for name, (kept, ms) in methods.items():
            assert kept.shape == (k,) and len(np.unique(kept)) == k, name
            assert np.all(np.diff(kept) > 0) and kept.min() >= 0 and kept.max() < scene.N
            assert ms > 0
        picks = res["picks"][reduction]
        assert 0 < len(picks) <= k - pivot_count(0.7, k)     # the greedy-MIS share of the budget


def test_baselines_are_what_they_say(run, example):
    """raw top-k = top k of the head-mean attention; the demo data has no near-ties."""
    _, _, res, _ = run
    _, _, tokens, attn, prior = example
    for reduction, methods in res["results"].items():
        k = scene.kept_count(reduction)
        top = torch.topk(attn.mean(0), k).indices.sort().values.numpy()
        np.testing.assert_array_equal(methods["raw top-k"][0], top)
        deb = torch.topk(attn.mean(0) / (prior + 1e-7), k).indices.sort().values.numpy()
        np.testing.assert_array_equal(methods["debiased top-k"][0], deb)
        # the demo's backend='auto' result agrees with the pure-torch reference
        ref = prune(tokens, attn, scene.GRID, k, prior=prior, backend="reference").numpy()
        np.testing.assert_array_equal(methods["D2Pruner"][0], ref)
    # and the maps the figure draws are these inputs
    np.testing.assert_allclose(res["maps"]["attention"], attn.mean(0).numpy())
    np.testing.assert_allclose(res["maps"]["prior"], prior.numpy())
    np.testing.assert_allclose(res["maps"]["debiased"], (attn.mean(0) / (prior + 1e-7)).numpy(),
                               rtol=1e-6)


def test_debiasing_and_diversity_show_on_the_demo_data(run):
    """What the figure is for: raw top-k piles onto the bottom rows (the positional bias),
    D2Pruner does not, and it spreads over more grid rows."""
    _, _, res, _ = run
    bottom = scene.GRID[0] - scene.BOTTOM_ROWS
    for reduction, methods in res["results"].items():
        raw, d2 = methods["raw top-k"][0], methods["D2Pruner"][0]
        rows_raw, rows_d2 = raw // scene.GRID[1], d2 // scene.GRID[1]
        assert (rows_raw >= bottom).sum() > (rows_d2 >= bottom).sum(), reduction
        assert len(np.unique(rows_d2)) > len(np.unique(rows_raw)), reduction
        # and the diverse picks reach regions that the pivots barely cover
        regions = res["regions"]
        assert len(np.unique(regions[res["picks"][reduction]])) >= 5


def test_demo_is_deterministic():
    a = scene.build_example(0)
    b = scene.build_example(0)
    np.testing.assert_array_equal(a[0], b[0])
    for x, y in zip(a[2:], b[2:]):
        assert torch.equal(x, y)


def test_the_painting_is_an_example_not_the_library():
    """The package ships no demo; the example is what `make demo` runs."""
    assert importlib.util.find_spec("d2pruner_kernels.demo") is None
    assert Path(demo.__file__).resolve().parent == EXAMPLE
    make = (EXAMPLE.parents[1] / "Makefile").read_text()
    assert "$(BIN)/python examples/demo/demo.py --out demo_out" in make
