"""The demo (`make demo`) runs, writes its figure, and shows what it claims to show."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")

from d2pruner_kernels import demo, prune  # noqa: E402
from d2pruner_kernels.checks import pivot_count  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_out")
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        res = demo.main(["--out", str(out), "--repeats", "2"])
    return out, res, buf.getvalue()


def test_png_written_with_two_rows_of_three_panels(run):
    from PIL import Image

    out, res, text = run
    png = out / "demo.png"
    assert png.is_file() and res["png"] == str(png)
    assert str(png) in text
    with Image.open(png) as im:
        w, h = im.size
        assert im.mode == "RGB"
        assert (w, h) == demo.figure_size(rows=2, cols=3)
        assert 3 * demo.IMG <= w < 4 * demo.IMG            # three panels side by side
        assert 2 * demo.IMG <= h < 3 * demo.IMG            # one row per reduction
        pixels = np.asarray(im)
    # the panels hold the picture (many colours), not a blank canvas
    panel = pixels[demo.HEADER_H + demo.TITLE_H:, demo.MARGIN:demo.MARGIN + demo.IMG]
    assert len(np.unique(panel.reshape(-1, 3), axis=0)) > 1000


def test_output_names_both_budgets_and_the_backend(run):
    _, _, text = run
    assert "k=144" in text and "k=58" in text
    assert demo.kept_count(0.75) == 144 and demo.kept_count(0.90) == 58
    assert "backend='auto'" in text and " ms" in text
    for name in ("raw top-k", "debiased top-k", "D2Pruner"):
        assert text.count(name) >= 2


def test_kept_sets_are_valid(run):
    _, res, _ = run
    for reduction, methods in res["results"].items():
        k = demo.kept_count(reduction)
        for name, (kept, ms) in methods.items():
            assert kept.shape == (k,) and len(np.unique(kept)) == k, name
            assert np.all(np.diff(kept) > 0) and kept.min() >= 0 and kept.max() < demo.N
            assert ms > 0
        picks = res["picks"][reduction]
        assert 0 < len(picks) <= k - pivot_count(0.7, k)     # the greedy-MIS share of the budget


def test_baselines_are_what_they_say(run):
    """raw top-k = top k of the head-mean attention; the demo data has no near-ties."""
    _, res, _ = run
    _, _, tokens, attn, prior = demo.build_example(0)
    for reduction, methods in res["results"].items():
        k = demo.kept_count(reduction)
        top = torch.topk(attn.mean(0), k).indices.sort().values.numpy()
        np.testing.assert_array_equal(methods["raw top-k"][0], top)
        deb = torch.topk(attn.mean(0) / (prior + 1e-7), k).indices.sort().values.numpy()
        np.testing.assert_array_equal(methods["debiased top-k"][0], deb)
        # the demo's backend='auto' result agrees with the pure-torch reference
        ref = prune(tokens, attn, demo.GRID, k, prior=prior, backend="reference").numpy()
        np.testing.assert_array_equal(methods["D2Pruner"][0], ref)


def test_debiasing_and_diversity_show_on_the_demo_data(run):
    """What the figure is for: raw top-k piles onto the bottom rows (the positional bias),
    D2Pruner does not, and it spreads over more grid rows."""
    _, res, _ = run
    bottom = demo.GRID[0] - demo.BOTTOM_ROWS
    for reduction, methods in res["results"].items():
        raw, d2 = methods["raw top-k"][0], methods["D2Pruner"][0]
        rows_raw, rows_d2 = raw // demo.GRID[1], d2 // demo.GRID[1]
        assert (rows_raw >= bottom).sum() > (rows_d2 >= bottom).sum(), reduction
        assert len(np.unique(rows_d2)) > len(np.unique(rows_raw)), reduction
        # and the diverse picks reach regions that the pivots barely cover
        regions = res["regions"]
        assert len(np.unique(regions[res["picks"][reduction]])) >= 5


def test_demo_is_deterministic():
    a = demo.build_example(0)
    b = demo.build_example(0)
    np.testing.assert_array_equal(a[0], b[0])
    for x, y in zip(a[2:], b[2:]):
        assert torch.equal(x, y)
