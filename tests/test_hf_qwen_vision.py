"""hf/qwen_vision.py: the vision-side importance of Qwen2.5-VL (docs/spec.md §15.5), the rule
the vLLM plugin prunes by, against a dense computation of the same attention and against
transformers' own window order."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from d2pruner_kernels.hf import tiny  # noqa: E402
from d2pruner_kernels.hf.qwen_vision import (qwen25_hf_importance, vision_importance,  # noqa: E402
                                             window_order)

GRIDS = [(1, 8, 8), (1, 12, 6), (1, 6, 10)]  # patch grids (t, h, w); merged 4x4, 6x3, 3x5


@pytest.mark.parametrize("window", [1, 2, 4])
def test_window_order_is_transformers(window):
    from transformers.vision_utils import get_vision_window_index
    grid = torch.tensor(GRIDS)
    want, _ = get_vision_window_index(grid, spatial_merge_size=2, window_size=window * 28,
                                      patch_size=14)
    got, offset = [], 0
    for t, h, w in GRIDS:
        got.append(window_order(t, h, w, 2, window) + offset)
        offset += t * (h // 2) * (w // 2)
    assert torch.equal(torch.cat(got), want)


def _dense(q, k, grids, orders, scale):
    """The same rule with the full softmax matrix of each image (tiny sizes only)."""
    out, start = [], 0
    for (t, h, w), order in zip(grids, orders):
        n = t * h * w
        qs, ks = q[start:start + n].transpose(0, 1), k[start:start + n].transpose(0, 1)
        probs = torch.softmax(scale * qs.double() @ ks.double().transpose(1, 2), dim=-1)
        raw = probs.mean(dim=(0, 1))                 # over heads and query rows
        merged = raw.view(-1, 4).sum(-1)
        raster = torch.empty_like(merged)
        raster[order] = merged
        out.append(raster)
        start += n
    return torch.cat(out)


def test_vision_importance_equals_the_dense_attention():
    g = torch.Generator().manual_seed(0)
    total = sum(t * h * w for t, h, w in GRIDS)
    q = torch.randn(total, 2, 16, generator=g)
    k = torch.randn(total, 2, 16, generator=g)
    orders = [window_order(t, h, w, 2, 2) for t, h, w in GRIDS]
    got = vision_importance(q, k, GRIDS, orders, 2, scale=0.25)
    want = _dense(q, k, GRIDS, orders, 0.25)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


def test_transformers_tower_importance_is_a_distribution_per_image():
    model = tiny.tiny_qwen2_vl(v2_5=True)
    vc = model.config.vision_config
    g = torch.Generator().manual_seed(1)
    grid = torch.tensor(GRIDS)
    patches = sum(t * h * w for t, h, w in GRIDS)
    pixels = torch.randn(patches, 3 * vc.temporal_patch_size * vc.patch_size ** 2, generator=g)
    scores, feats = qwen25_hf_importance(model, pixels, grid)
    lengths = [t * (h // 2) * (w // 2) for t, h, w in GRIDS]
    assert scores.shape == (sum(lengths),) and feats.shape[0] == sum(lengths)
    for part in scores.split(lengths):   # mean softmax rows: each image's merged sum is 1
        assert float(part.sum()) == pytest.approx(1.0, abs=1e-5)
        assert float(part.min()) > 0 and float(part.std()) > 0
    # the features are the tower's own output (the hook does not change the forward)
    with torch.no_grad():
        plain = model.model.visual(pixels, grid_thw=grid)
    torch.testing.assert_close(feats, getattr(plain, "pooler_output", plain))
