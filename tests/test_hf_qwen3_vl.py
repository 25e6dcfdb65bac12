"""d2pruner_kernels.hf on Qwen3-VL (dense and MoE), tiny random models built from configs
(fp32, CPU), held to an independent reference written here.

The reference never gathers: it re-runs every decoder layer by hand on the full sequence
with an explicit mask that, from layer K on, hides the pruned visual tokens as keys, and
adds DeepStack's levels itself: level i after layer i, at every visual position for i < K,
at the kept visual positions only for i >= K (each with its own token's row). Outputs at
the kept positions are then those of the pruned sequence. Greedy decoding recomputes the
whole sequence at every step (no cache), so cached decoding is held to recomputation.
Also used by tests/test_hf_video.py (Qwen2.5-VL: no DeepStack).
"""
import pytest

pytest.importorskip("transformers", reason="the hf extra is not installed: "
                    "pip install 'transformers>=5.16.1,<6' -c <(echo torch==2.13.0)")

import torch  # noqa: E402

import d2pruner_kernels as d2p  # noqa: E402
from d2pruner_kernels import hf  # noqa: E402
from d2pruner_kernels.hf import tiny  # noqa: E402
import hf_reference as ref  # noqa: E402

STEPS = 3
_MODELS = {}


def model_for(family="qwen3_vl", impl="sdpa"):
    key = (family, impl)
    if key not in _MODELS:
        if family == "qwen2_5_vl":
            _MODELS[key] = tiny.tiny_qwen2_vl(attn_implementation=impl, v2_5=True)
        else:
            _MODELS[key] = tiny.tiny_qwen3_vl(attn_implementation=impl,
                                              moe=family == "qwen3_vl_moe")
    return _MODELS[key]


def items(inputs, frames_apart: bool):
    """Per sample [(kind, positions, grid)] in sequence order, found here from the prompt and
    the grids: each image one run; each video video_grid_thw[v][0] runs (Qwen3-VL: one per
    frame, frames_apart=True) or one run (Qwen2.5-VL)."""
    ids = inputs["input_ids"]
    img = iter(inputs["image_grid_thw"].tolist()) if "image_grid_thw" in inputs else None
    vid = iter(inputs["video_grid_thw"].tolist()) if "video_grid_thw" in inputs else None
    out = []
    for row in ids.tolist():
        found, video = [], None
        for i, j in ref.runs_of(row, (tiny.IMAGE, tiny.VIDEO)):
            if row[i] == tiny.IMAGE:
                t, h, w = next(img)
                found.append(("image", list(range(i, j)), (t, h // 2, w // 2)))
            else:
                if video is None:
                    t, h, w = next(vid)
                    video = ("video", [], (t, h // 2, w // 2))
                    found.append(video)
                video[1].extend(range(i, j))
                t, h, w = video[2]
                if len(video[1]) == t * h * w:
                    video = None
        out.append(found)
    return out


def keep_mask(inputs, kept, found):
    keep = torch.ones(inputs["input_ids"].shape, dtype=torch.bool)
    for b, sample in enumerate(found):
        assert len(kept[b]) == len(sample)
        for (_, pos, _), k in zip(sample, kept[b]):
            pos = torch.tensor(pos)
            keep[b, pos] = False
            keep[b, pos[k]] = True
    return keep


def decode_positions(model, inputs, steps):
    """The M-RoPE positions [3, B, 1] the unpruned model gives each decoding step of a greedy
    generate (its rope_deltas rule: for a Qwen2.5-VL video, whose temporal positions pass
    the text's, that is not simply the prompt's largest position + 1)."""
    got = []
    h = model.model.language_model.register_forward_pre_hook(
        lambda mod, a, kw: got.append(kw["position_ids"]), with_kwargs=True)
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=steps, do_sample=False)
    finally:
        h.remove()
    return [p[-3:] for p in got[1:]]


def reference(model, inputs, keep, layer, steps=STEPS):
    """(greedy tokens [B, steps], per-step logits [B, n, V]), by hand (see the module doc)."""
    nxt_positions = decode_positions(model, inputs, steps)

    def next_pos(pos, step):
        return nxt_positions[step] if step + 1 < steps else None

    def deepstack(i, h, kw, keep):
        levels = kw.get("deepstack_visual_embeds") or []
        if i >= len(levels):
            return h
        vis = kw.get("visual_pos_masks")
        b, n = h.shape[:2]
        at = torch.zeros(b, n, dtype=torch.bool)
        at[:, :vis.shape[1]] = vis
        rows = torch.zeros(b, n, h.shape[-1])
        rows[at] = levels[i]  # each visual token's own row
        if i >= layer:
            at = at & keep  # only the kept tokens get theirs
        return h + torch.where(at[..., None], rows, 0.0)

    return ref.masked_greedy(model, inputs, keep, layer, steps, next_pos, deepstack)


def generate(model, inputs, **kw):
    return ref.generate(model, inputs, STEPS, **kw)


def single(model):
    """One sample: an image, then a two-frame video (timestamps between its frames)."""
    return tiny.qwen3_vl_inputs(model, [[(8, 12)]], videos=[[(2, 8, 8)]])


def batch_samples(model):
    return [tiny.qwen3_vl_inputs(model, [[(8, 8)]], texts=[[5, 6, 7, 8]], seed=1),
            tiny.qwen3_vl_inputs(model, [[(12, 8)]], videos=[[(3, 8, 8)]], texts=[[11]],
                                 seed=2),
            tiny.qwen3_vl_inputs(model, [[]], texts=[[12, 13]])]


def batched(model, samples):
    out = tiny.qwen3_vl_inputs(model, [[(8, 8)], [(12, 8)], []],
                               videos=[[], [(3, 8, 8)], []],
                               texts=[[5, 6, 7, 8], [11], [12, 13]])
    out["pixel_values"] = torch.cat([s["pixel_values"] for s in samples if "pixel_values" in s])
    out["pixel_values_videos"] = torch.cat([s["pixel_values_videos"] for s in samples
                                            if "pixel_values_videos" in s])
    return out


# -- keep-all, remove -----------------------------------------------------------------------------

@pytest.mark.parametrize("family,layer", [("qwen3_vl", 1), ("qwen3_vl", 2), ("qwen3_vl", 3),
                                          ("qwen3_vl", 4), ("qwen3_vl_moe", 2)])
def test_keep_all_is_the_unpruned_model(family, layer):
    model = model_for(family)
    samples = batch_samples(model)
    inputs = batched(model, samples)

    def check(pruner):
        assert pruner.kinds == [["image"], ["image", "video"], []]

    ref.assert_keep_all_is_unpruned(model, inputs, 1.0, STEPS, check, layer=layer)


def test_remove_restores_bit_identical_outputs():
    model = model_for()
    ref.assert_remove_restores(model, single(model), 0.25, STEPS)
    assert len(model.model.language_model._forward_hooks) == 0
    assert all(len(lay._forward_hooks) == 0 for lay in model.model.language_model.layers)


# -- the selection ----------------------------------------------------------------------------------

@pytest.mark.parametrize("layer", [1, 2, 3])
def test_kept_is_prune_on_the_eager_row_and_the_hidden_states_after_deepstack(layer):
    """kept == prune(the hidden states entering `layer`, i.e. after DeepStack's addition at
    layer - 1 where layer - 1 < 3, the eager row of layer - 1), on a left-padded batch."""
    model = model_for("qwen3_vl", "eager")
    samples = batch_samples(model)
    inputs = batched(model, samples)
    with torch.no_grad():
        out = model(**inputs, output_attentions=True, use_cache=False)
    attn = out.attentions[layer - 1]
    hidden, before, _ = ref.entering(model, inputs, layer)
    vis = inputs["input_ids"].eq(tiny.IMAGE) | inputs["input_ids"].eq(tiny.VIDEO)
    if layer - 1 < 3:  # DeepStack added a level after layer - 1: the two states differ
        assert not torch.equal(hidden[vis], before[vis])
    last = [int(torch.nonzero(m).max()) for m in inputs["attention_mask"]]
    with hf.apply(model, 0.25, layer=layer) as pruner:
        with torch.no_grad():
            model(**inputs)
    found = items(inputs, True)
    for b, sample in enumerate(found):
        assert [kind for kind, _, _ in sample] == pruner.kinds[b]
        for i, (kind, pos, grid) in enumerate(sample):
            row = attn[b, :, last[b], pos].mean(0)
            torch.testing.assert_close(pruner.importance[b][i], row, rtol=1e-5, atol=1e-8)
            want = d2p.prune(hidden[b, pos], row, grid, 0.25)
            assert torch.equal(pruner.kept[b][i], want), (b, i)
            assert pruner.grids[b][i] == grid
    assert pruner.kept[2] == []


# -- against the reference ---------------------------------------------------------------------------

@pytest.mark.parametrize("family,impl,layer", [
    ("qwen3_vl", "sdpa", 1), ("qwen3_vl", "sdpa", 2), ("qwen3_vl", "sdpa", 3),
    ("qwen3_vl", "sdpa", 4), ("qwen3_vl", "eager", 2), ("qwen3_vl_moe", "sdpa", 2),
    ("qwen3_vl_moe", "eager", 1)])
def test_logits_and_generate_equal_the_reference(family, impl, layer):
    """Before (1, 2: levels 1, 2 at the kept tokens), inside and after (3, 4) the DeepStack
    range; cached decoding == the reference's recomputation."""
    model = model_for(family, impl)
    inputs = single(model)
    out, kept, gen = ref.pruned_run(model, inputs, 0.25, STEPS, layer=layer)
    keep = keep_mask(inputs, kept, items(inputs, True))
    n_kept = int(keep.sum())
    n_layers = len(model.model.language_model.layers)
    full = inputs["input_ids"].shape[1]
    assert ref.cache_lengths(out, n_layers) == [full] * layer + [n_kept] * (n_layers - layer)
    tokens, logits = reference(model, inputs, keep, layer)
    ref.assert_equals_reference(out, gen, keep, tokens, logits)
    if layer < 3:  # the reference has teeth: DeepStack at every visual position differs
        everywhere = reference(model, inputs, keep, layer=3, steps=1)[1][0]
        deep = torch.where(keep[0])[0]
        assert not torch.allclose(out.logits[0], everywhere[0, deep], rtol=1e-4, atol=1e-4)


def test_left_padded_batch_equals_each_sample_alone():
    model = model_for()
    samples = batch_samples(model)
    inputs = batched(model, samples)
    ref.assert_batch_equals_alone(model, inputs, samples, 0.25, STEPS)


# -- misuse, calibration --------------------------------------------------------------------------

def test_misuse_raises_at_apply():
    model = model_for()
    hooks = len(model.model.language_model._forward_pre_hooks)
    with pytest.raises(ValueError, match="layer=3 applies to where='llm' only"):
        hf.apply(model, 4, where="vision", layer=3)  # where="vision": test_hf_qwen_vision.py
    with pytest.raises(ValueError, match=r"layer must be in \[1, 4\]"):
        hf.apply(model, 4, layer=5)
    with pytest.raises(ValueError, match=r"layer must be in \[1, 4\]"):
        hf.apply(model, 4, layer=0)
    with pytest.raises(ValueError, match=r"k must be an int >= 1 .* got 0"):
        hf.apply(model, 0)
    with pytest.raises(ValueError, match=r"k as a ratio must be in \(0, 1\], got 1.5"):
        hf.apply(model, 1.5)
    with pytest.raises(TypeError, match=r"unknown prune option\(s\) 'no_such_option'"):
        hf.apply(model, 4, no_such_option=1)
    assert len(model.model.language_model._forward_pre_hooks) == hooks
    with hf.apply(model, 4) as pruner:  # an int k keeps at most k per image / video
        with torch.no_grad():
            model(**single(model))
        assert [k.numel() for k in pruner.kept[0]] == [4, 4]
    with hf.apply(model, 100) as pruner:  # above an item's tokens: kept whole
        with torch.no_grad():
            model(**single(model))
        assert [k.numel() for k in pruner.kept[0]] == [24, 32]


def test_calibrate_prior_images_and_video_frames():
    """Qwen3-VL: each image one map, each video frame one map on (1, h, w); the prior
    applies to a video per frame."""
    model = model_for()
    batches = [tiny.qwen3_vl_inputs(model, [[(8, 8)]], videos=[[(2, 8, 8)]], seed=3)]
    prior = hf.calibrate_prior(model, batches, progress=False)
    with hf.apply(model, 0.25) as pruner:
        with torch.no_grad():
            model(**batches[0])
        rows = [pruner.importance[0][0], *pruner.importance[0][1].view(2, 16)]
    ref.assert_prior_is_the_mean(prior, (1, 4, 4), rows)
    with hf.apply(model, 0.25, prior=prior) as pruner:
        with torch.no_grad():
            model(**batches[0])
        video_row, video_kept = pruner.importance[0][1], pruner.kept[0][1]
    hidden, _, _ = ref.entering(model, batches[0], 2)
    pos = items(batches[0], True)[0][1][1]
    per_frame = prior.mean.float().repeat(2)
    want = d2p.prune(hidden[0, pos], video_row, (2, 4, 4), 0.25, prior=per_frame)
    assert torch.equal(video_kept, want)


def test_an_exception_leaves_the_deepstack_state_clean():
    """An exception inside a pruned layer after DeepStack's levels were moved: the next
    forward gives exactly what a fresh pruner gives."""
    model = model_for()
    inputs = single(model)
    with hf.apply(model, 0.25, layer=1) as pruner:
        with torch.no_grad():
            want = model(**inputs).logits

        def boom(mod, args):
            raise RuntimeError("boom")
        h = model.model.language_model.layers[2].register_forward_pre_hook(boom)
        with pytest.raises(RuntimeError, match="boom"):
            with torch.no_grad():
                model(**inputs)
        h.remove()
        assert pruner.active
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, want)
