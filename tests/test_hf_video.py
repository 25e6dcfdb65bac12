"""Videos in d2pruner_kernels.hf (where="llm"): Qwen2.5-VL (a video is one run of video
tokens, temporal positions stepping by tokens_per_second) and Qwen3-VL (a video is one
run per frame with timestamp text between them), tiny random models, held to the
independent reference of tests/test_hf_qwen3_vl.py (layers re-run by hand, pruned keys
masked).

A video is one item with grid (t, h/2, w/2), k per video, listed with the sample's images
in sequence order; pruner.kinds says which is which.
"""
import pytest

pytest.importorskip("transformers", reason="the hf extra is not installed: "
                    "pip install 'transformers>=5.16.1,<6' -c <(echo torch==2.13.0)")

import torch  # noqa: E402

import d2pruner_kernels as d2p  # noqa: E402
from d2pruner_kernels import hf  # noqa: E402
from d2pruner_kernels.hf import tiny  # noqa: E402
import hf_reference as ref  # noqa: E402
from test_hf_qwen3_vl import (STEPS, generate, items, keep_mask, model_for,  # noqa: E402
                              reference)

FAMILIES = ("qwen2_5_vl", "qwen3_vl")
LAYER = 2


def inputs_for(family, model, images, videos, texts=None, seed=0, video_first=False):
    if family == "qwen3_vl":
        return tiny.qwen3_vl_inputs(model, images, videos=videos, texts=texts, seed=seed,
                                    video_first=video_first)
    assert not video_first
    return tiny.qwen_inputs(model, images, videos=videos, texts=texts, seed=seed)


def single(family, model):
    """An image and a video in one prompt (Qwen3-VL: the video first, then the image)."""
    return inputs_for(family, model, [[(8, 12)]], [[(3, 8, 8)]],
                      video_first=family == "qwen3_vl")


def video_only(family, model):
    return inputs_for(family, model, [[]], [[(2, 8, 12), (2, 8, 8)]])


def samples_and_batch(family, model):
    samples = [inputs_for(family, model, [[]], [[(2, 8, 8)]], texts=[[5, 6, 7]], seed=1),
               inputs_for(family, model, [[(8, 8)]], [[(3, 12, 8)]], texts=[[11]], seed=2),
               inputs_for(family, model, [[]], [[]], texts=[[12, 13]])]
    batch = inputs_for(family, model, [[], [(8, 8)], []], [[(2, 8, 8)], [(3, 12, 8)], []],
                       texts=[[5, 6, 7], [11], [12, 13]])
    batch["pixel_values"] = samples[1]["pixel_values"]
    batch["pixel_values_videos"] = torch.cat([s["pixel_values_videos"] for s in samples[:2]])
    return samples, batch


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_is_the_unpruned_model(family):
    model = model_for(family)
    samples, inputs = samples_and_batch(family, model)

    def check(pruner):
        assert pruner.kinds == [["video"], ["image", "video"], []]

    ref.assert_keep_all_is_unpruned(model, inputs, 1.0, STEPS, check)


@pytest.mark.parametrize("family", FAMILIES)
def test_kept_is_prune_on_the_eager_row_and_the_hidden_states(family):
    """Each video one item on (t, h, w), prune options passed on; kinds in sequence order;
    the timestamp text between Qwen3-VL's frames is not part of the item."""
    model = model_for(family, "eager")
    for inputs in (single(family, model), video_only(family, model)):
        hidden, _, attn = ref.entering(model, inputs, LAYER, eager=True)
        last = inputs["input_ids"].shape[1] - 1
        with hf.apply(model, 0.3, temporal_radius=0, sim_threshold=0.0) as pruner:
            with torch.no_grad():
                model(**inputs)
        found = items(inputs, family == "qwen3_vl")[0]
        assert pruner.kinds[0] == [kind for kind, _, _ in found]
        for i, (kind, pos, grid) in enumerate(found):
            row = attn[0, :, last, pos].mean(0)
            torch.testing.assert_close(pruner.importance[0][i], row, rtol=1e-5, atol=1e-8)
            want = d2p.prune(hidden[0, pos], row, grid, 0.3, temporal_radius=0,
                             sim_threshold=0.0)
            assert torch.equal(pruner.kept[0][i], want), i
            assert pruner.grids[0][i] == grid
            assert grid[0] > 1 if kind == "video" else grid[0] == 1
    if family == "qwen3_vl":  # frames apart: the video's positions are not contiguous
        video = [pos for kind, pos, _ in found if kind == "video"][0]
        assert video[-1] - video[0] + 1 > len(video)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_generate_equal_the_reference(family, impl):
    """An image and a video in one prompt; the timestamps (Qwen3-VL) are kept."""
    model = model_for(family, impl)
    inputs = single(family, model)
    out, kept, gen = ref.pruned_run(model, inputs, 0.25, STEPS)
    keep = keep_mask(inputs, kept, items(inputs, family == "qwen3_vl"))
    ids = inputs["input_ids"][0]
    visual = ids.eq(tiny.IMAGE) | ids.eq(tiny.VIDEO)
    assert bool(keep[0, ~visual].all()) and int((~keep[0]).sum()) > 0  # text never pruned
    tokens, logits = reference(model, inputs, keep, LAYER)
    ref.assert_equals_reference(out, gen, keep, tokens, logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_equals_each_sample_alone(family):
    model = model_for(family)
    samples, inputs = samples_and_batch(family, model)
    # an int: at most 5 per image, 5 per video
    kept = ref.assert_batch_equals_alone(model, inputs, samples, 5, STEPS)
    assert [[k.numel() for k in s] for s in kept] == [[5], [5, 5], []]


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_groups_frames_by_the_encoder_outputs(family):
    """generate()'s prefill gets no video_grid_thw (the vision tower ran before it): the
    frames are grouped by the per-video split of its outputs, as a plain forward groups
    them by video_grid_thw; a ratio is resolved per video. Two videos back to back."""
    model = model_for(family)
    inputs = video_only(family, model)
    seen = []
    hook = model.model.register_forward_pre_hook(
        lambda mod, args, kw: seen.append((kw.get("video_grid_thw"),
                                           kw.get("mm_encoder_outputs"))), with_kwargs=True)
    try:
        with hf.apply(model, 0.25) as pruner:
            with torch.no_grad():
                model(**inputs)
            forward = pruner.kept
            generate(model, inputs)
            assert pruner.grids[0] == [(2, 4, 6), (2, 4, 4)]
            assert [k.numel() for k in pruner.kept[0]] == [12, 8]
    finally:
        hook.remove()
    assert seen[1][0] is None and seen[1][1]["video"] is not None  # generate's prefill
    assert all(torch.equal(a, b) for a, b in zip(forward[0], pruner.kept[0], strict=True))


def test_videos_without_counts_raise():
    """Video tokens with neither video_grid_thw nor the encoder outputs: refused, not
    guessed from the runs."""
    model = model_for("qwen3_vl")
    inputs = video_only("qwen3_vl", model)
    kw = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    lm_in = {}
    h = model.model.language_model.register_forward_pre_hook(
        lambda mod, a, k: lm_in.update(k), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        h.remove()
    with hf.apply(model, 0.25):
        with pytest.raises(ValueError, match="neither video_grid_thw nor the vision tower"):
            with torch.no_grad():
                model(**kw, position_ids=lm_in["position_ids"])


def test_qwen2_vl_videos_are_left_alone():
    """Qwen2-VL keeps its images-only behaviour (video tokens untouched)."""
    model = tiny.tiny_qwen2_vl()
    inputs = tiny.qwen_inputs(model, [[(8, 8)]], videos=[[(2, 8, 8)]])
    with hf.apply(model, 0.25) as pruner:
        with torch.no_grad():
            model(**inputs)
    assert pruner.kinds == [["image"]] and pruner.grids == [[(1, 4, 4)]]


def test_calibrate_prior_per_frame():
    """Qwen2.5-VL: a video's row is t maps of (1, h, w); images and frames average together,
    mixed sizes resampled with grid=."""
    model = model_for("qwen2_5_vl")
    batches = [tiny.qwen_inputs(model, [[(8, 8)]], videos=[[(2, 8, 8)]], seed=4),
               tiny.qwen_inputs(model, [[]], videos=[[(3, 8, 12)]], seed=5)]
    with pytest.raises(ValueError, match=r"has grid \(1, 4, 6\) but the first image has "
                                         r"\(1, 4, 4\)"):
        hf.calibrate_prior(model, batches, progress=False)
    prior = hf.calibrate_prior(model, batches[:1], progress=False)
    with hf.apply(model, 0.25) as pruner:
        with torch.no_grad():
            model(**batches[0])
        rows = [pruner.importance[0][0], *pruner.importance[0][1].view(2, 16)]
    ref.assert_prior_is_the_mean(prior, (1, 4, 4), rows)
    resampled = hf.calibrate_prior(model, batches, grid=(4, 4), progress=False)
    assert resampled.grid == (4, 4) and resampled.count == 6


@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search_expands_the_videos(family):
    """num_beams / num_return_sequences: keep-all is the unpruned model; at a small k every
    expanded row is its sample pruned alone (the encoder outputs expanded by generate are
    grouped per row)."""
    model = model_for(family)
    _, inputs = samples_and_batch(family, model)
    kw = dict(max_new_tokens=STEPS, num_beams=2, num_return_sequences=2, do_sample=False)
    with torch.no_grad():
        base = model.generate(**inputs, **kw)
        with hf.apply(model, 1.0):
            assert torch.equal(model.generate(**inputs, **kw), base)
        with hf.apply(model, 0.25) as pruner:
            model(**inputs)
            alone = pruner.kept
            model.generate(**inputs, **kw)
            assert len(pruner.kept) == 6
            assert pruner.kinds == [k for k in [["video"], ["image", "video"], []]
                                    for _ in range(2)]
            for r, row in enumerate(pruner.kept):
                assert all(torch.equal(a, b) for a, b in zip(row, alone[r // 2], strict=True))
