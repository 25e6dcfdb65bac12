"""hf/qwen_vision.py: the vision-side importance of Qwen2.5-VL and Qwen3-VL (docs/spec.md
§15.5), the rule the vLLM plugin prunes by, against a dense computation of the same attention
and against transformers' own window order; and `hf.apply(model, k, where="vision")` on
both families against the rule written by hand (tests/vllm_helper.py's qwen_hf_reference:
the tower once per image, prune() per image, the language model run by hand on the kept
rows with their original M-RoPE positions), the model the vLLM tests hold the plugin to."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import vllm_helper as helper  # noqa: E402
from d2pruner_kernels import hf, prune  # noqa: E402
from d2pruner_kernels.hf import tiny  # noqa: E402
from d2pruner_kernels.hf.qwen_vision import (qwen3_hf_importance,  # noqa: E402
                                             qwen25_hf_importance, vision_importance,
                                             window_order)
from hf_reference import assert_prior_is_the_mean, continue_generation  # noqa: E402

K = 16
FAMILIES = ["qwen25", "qwen3"]

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


def _model(family):
    return helper.tiny_qwen3() if family == "qwen3" else helper.tiny_qwen25()


def _generate(model, inputs, steps, **kw):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps,
                              do_sample=False, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_vision_equals_the_rule_written_by_hand(family):
    """Kept indices and greedy tokens, each prompt alone and all four in one left-padded
    batch (images of two sizes, two images in one prompt)."""
    want = helper.qwen_hf_reference(K, family=family)
    assert helper.qwen_hf_apply(K, family) == want
    assert helper.qwen_hf_apply(K, family, batches=[list(helper.Q_PROMPTS)]) == want
    assert all(len(kept) == K for p in want.values() for kept in p["kept"])


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_vision_keep_all_continuation_and_beams(family):
    model = _model(family)
    inputs = helper.qwen_inputs(["batch_a", "two_images"], family)
    plain = _generate(model, inputs, 8)
    with hf.apply(model, 1.0, where="vision"):
        assert torch.equal(_generate(model, inputs, 8), plain)      # keep-all: unpruned
    with hf.apply(model, K, where="vision") as pruner:
        full = _generate(model, inputs, 8)
        kept = [[x.tolist() for x in sample] for sample in pruner.kept]
        assert not torch.equal(full, plain)
        # continuing from the returned cache (every layer holds the shortened prompt)
        first = _generate(model, inputs, 4, return_dict_in_generate=True)
        second = continue_generation(model, first, inputs, 4, min_new_tokens=4)
        assert torch.equal(second.sequences, full)
        # beams: generate encodes once and repeats the images; each row finds its own
        _generate(model, inputs, 3, num_beams=2, num_return_sequences=2)
        assert [[x.tolist() for x in s] for s in pruner.kept] == [kept[0], kept[0],
                                                                   kept[1], kept[1]]


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_vision_in_a_forward_loop_equals_generate(family):
    """model(input_ids=token, past_key_values=cache), no mask nor positions: the cache holds
    the shortened prompt, the token goes where generate() puts it (the unpruned count)."""
    model = _model(family)
    inputs = helper.qwen_inputs(["single"], family)
    with hf.apply(model, K, where="vision"):
        want = _generate(model, inputs, 4)[0, inputs["input_ids"].shape[1]:].tolist()
        got = []
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
            for _ in range(4):
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                got.append(int(token))
                out = model(input_ids=token, past_key_values=out.past_key_values,
                            use_cache=True)
    assert got == want


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_vision_prunes_a_video_by_the_same_rule(family):
    """A video is one item: its importance is the tower's rule over its frames (full
    attention within each frame), its kept tokens prune() of its features on (t, h, w)."""
    if family == "qwen3":
        model = tiny.tiny_qwen3_vl()
        inputs = tiny.qwen3_vl_inputs(model, [[(8, 8)], [(4, 6)]], videos=[[(2, 4, 4)], []])
        rule = lambda p, g: qwen3_hf_importance(model, p, g)[:2]  # noqa: E731
    else:
        model = tiny.tiny_qwen2_vl(v2_5=True)
        inputs = tiny.qwen_inputs(model, [[(8, 8)], [(4, 6)]], videos=[[(2, 4, 4)], []])
        rule = lambda p, g: qwen25_hf_importance(model, p, g)  # noqa: E731
    with hf.apply(model, 5, where="vision") as pruner:
        _generate(model, inputs, 2)
    assert pruner.kinds == [["image", "video"], ["image"]]
    scores, feats = rule(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    torch.testing.assert_close(pruner.importance[0][1], scores, rtol=0, atol=0)
    assert pruner.grids[0][1] == (2, 2, 2)
    assert pruner.kept[0][1].tolist() == prune(feats.float(), scores, (2, 2, 2), 5).tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_calibrate_prior_on_the_vision_rows(family):
    model = _model(family)
    batches = [helper.qwen_inputs([name], family) for name in ("single", "batch_b")]
    prior = hf.calibrate_prior(model, batches, where="vision", progress=False)
    with hf.apply(model, K, where="vision") as pruner:
        rows = []
        for batch in batches:
            _generate(model, batch, 1)
            rows += [r for sample in pruner.importance for r in sample]
    assert_prior_is_the_mean(prior, (1, 8, 8), rows)
    block = (model.config.vision_config.fullatt_block_indexes[-1] if family == "qwen25"
             else model.config.vision_config.depth - 1)
    assert (prior.layer, prior.query) == (block, "mean")
    # debiased by it, each image as prune() debiases its row (the tall one: resized)
    batch = helper.qwen_inputs(["batch_a"], family)
    with hf.apply(model, K, where="vision", prior=prior) as pruner:
        _generate(model, batch, 1)
    rule = qwen3_hf_importance if family == "qwen3" else qwen25_hf_importance
    scores, feats = rule(model, batch["pixel_values"], batch["image_grid_thw"])[:2]
    grid = pruner.grids[0][0]
    want = prune(feats.float(), scores, grid, K, prior=prior.for_grid(grid))
    assert pruner.kept[0][0].tolist() == want.tolist() and grid == (1, 10, 6)


def test_where_vision_is_refused_where_there_is_no_rule():
    with pytest.raises(ValueError, match="where='vision' is for LLaVA .* Qwen2.5-VL and "
                                         "Qwen3-VL"):
        hf.apply(tiny.tiny_qwen2_vl(), 4, where="vision")      # Qwen2-VL
    with pytest.raises(ValueError, match="layer=2 applies to where='llm' only"):
        hf.apply(helper.tiny_qwen25(), 4, where="vision", layer=2)


def test_where_vision_needs_the_images_encoded_under_the_pruner():
    model = helper.tiny_qwen25()
    inputs = helper.qwen_inputs(["single"])
    with torch.no_grad():  # image features made before apply(): no importance was read
        enc = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                             return_dict=True)
    given = {k: v for k, v in inputs.items() if k != "pixel_values"}
    with hf.apply(model, K, where="vision"):
        with pytest.raises(ValueError, match="sample 0, image 0 is none of the items the "
                                             "vision tower encoded"):
            with torch.no_grad():
                model(**given, mm_encoder_outputs={"image": enc})
