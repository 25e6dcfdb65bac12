"""d2pruner_kernels.hf on tiled images (issue 23): LLaVA-NeXT and LLaVA-OneVision (anyres:
base image + high-resolution map with newline tokens) and InternVL (tiles stitched + a
thumbnail), on tiny random models built from configs (fp32, CPU, nothing downloaded), held
to references written here.

Each image's expected layout comes from the processors' arithmetic (tiny.anyres_map and
tiny.internvl_tiles, from image_sizes; for InternVL's rows x cols the processor's own
get_optimal_tiled_canvas), not from the adapter (which reads the newline tokens in the
prompt for anyres, and searches the processor's settings for InternVL). The
reference runs every decoder layer on the full sequence with an explicit mask that hides
the pruned image tokens as keys from layer K on, and decodes greedily by recomputing the
whole sequence at every step (no cache).
"""
import pytest

pytest.importorskip("transformers", reason="the hf extra is not installed: "
                    "pip install 'transformers>=5.16.1,<6' -c <(echo torch==2.13.0)")

import torch  # noqa: E402

import d2pruner_kernels as d2p  # noqa: E402
from d2pruner_kernels import TokenLayout, hf  # noqa: E402
from d2pruner_kernels.hf import tiny  # noqa: E402
import hf_reference as ref  # noqa: E402

LAYER = 2
STEPS = 3
FAMILIES = ("llava_next", "llava_onevision", "internvl")
_MODELS = {}


def model_for(family, impl="sdpa"):
    key = (family, impl)
    if key not in _MODELS:
        build = {"llava_next": tiny.tiny_llava_next,
                 "llava_onevision": tiny.tiny_llava_onevision,
                 "internvl": tiny.tiny_internvl}[family]
        _MODELS[key] = build(attn_implementation=impl)
    return _MODELS[key]


# Samples: images of different aspect ratios (tall, wide, large); OneVision's second sample
# holds two images (each its base + one newline); the last sample has no image.
SIZES = {"llava_next": [[(100, 180)], [(150, 60), (60, 300)], []],
         "llava_onevision": [[(400, 400)], [(100, 180), (150, 60)], []],
         # 2 x 3 tiles, then 3 x 1 tiles beside a one-tile image (no thumbnail)
         "internvl": [[(200, 300)], [(300, 100), (80, 80)], []]}


def make(family, model, sizes, texts):
    build = tiny.internvl_inputs if family == "internvl" else tiny.anyres_inputs
    return build(model, sizes, texts=texts)
TEXTS = [[5, 6, 7, 8, 9], [11], [12, 13]]


def batched(family, model):
    return make(family, model, SIZES[family], TEXTS)


def alone(family, model):
    """Each sample of batched() alone, with the same pixels."""
    full = batched(family, model)
    out, i = [], 0
    for sizes, text in zip(SIZES[family], TEXTS):
        s = make(family, model, [sizes], [text])
        if sizes:
            n = s["pixel_values"].shape[0]  # images (anyres) or tiles (InternVL)
            s["pixel_values"] = full["pixel_values"][i:i + n]
            i += n
        out.append(s)
    return out


def single(family, model):
    return make(family, model, SIZES[family][:1], TEXTS[:1])


def canvas(size, max_patches=12):
    """(rows, cols): InternVL's processor's canvas (get_optimal_tiled_canvas -> cols, rows)."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
        get_optimal_tiled_canvas)
    cols, rows = get_optimal_tiled_canvas(tuple(size), (112, 112), 1, max_patches)
    return rows, cols


def expected(model, inputs):
    """Per sample [(start, end, TokenLayout)], from input_ids and image_sizes only."""
    if type(model).__name__.startswith("InternVL"):
        return expected_internvl(model, inputs)
    cfg = model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    sizes = iter(inputs.get("image_sizes", torch.zeros(0, 2)).tolist())
    counts = inputs.get("batch_num_images")
    out = []
    for b, row in enumerate(inputs["input_ids"].tolist()):
        patched = counts is None or int(counts[b]) == 1
        found = []
        for i, j in ref.runs_of(row, (tiny.IMAGE,)):
            h, w = tiny.anyres_map(model, tuple(next(sizes)), patched)
            layout = TokenLayout.grid(side, side) + (TokenLayout.grid(h, w + 1) if h else
                                                     TokenLayout.grid(1, 1))
            assert layout.cells == j - i
            found.append((i, j, layout))
        out.append(found)
    return out


def expected_internvl(model, inputs):
    sizes = iter(inputs.get("image_sizes", torch.zeros(0, 2)).tolist())
    out = []
    for row in inputs["input_ids"].tolist():
        found = []
        for i, j in ref.runs_of(row, (tiny.IMAGE,)):
            size = tuple(next(sizes))
            tiles = tiny.internvl_tiles(model, size)
            if tiles == 1:
                layout = TokenLayout.grid(4, 4)
            else:
                layout = TokenLayout.tiles(*canvas(size), (4, 4)) + TokenLayout.grid(4, 4)
            assert layout.cells == j - i == 16 * tiles
            found.append((i, j, layout))
        out.append(found)
    return out


def keep_mask(model, inputs, kept):
    return ref.keep_mask(inputs, kept, expected(model, inputs))


def reference(model, inputs, keep, steps=STEPS):
    """(greedy tokens [B, steps], per step logits [B, n, V]) with pruned keys hidden."""
    return ref.masked_greedy(model, inputs, keep, LAYER, steps)


def generate(model, inputs, **kw):
    return ref.generate(model, inputs, STEPS, **kw)


# -- the layout ------------------------------------------------------------------------------

def test_the_tiny_models_give_the_layouts_the_tests_expect():
    """The placeholder counts tiny.anyres_inputs computes are the model's (a forward
    accepts them), and the layouts span what the issue names: a wide, a tall and a
    downscaled (anyres_max_9) map, the lone newline of a multi-image OneVision sample."""
    got = {f: [[lay.describe() for *_, lay in s] for s in expected(model_for(f),
                                                                   batched(f, model_for(f)))]
           for f in FAMILIES}
    assert got == {"llava_next": [["8x8 + 8x15"], ["8x8 + 16x7", "8x8 + 4x25"], []],
                   "llava_onevision": [["8x8 + 24x25"], ["8x8 + 1x1", "8x8 + 1x1"], []],
                   "internvl": [["2x3 tiles of 4x4 + 4x4"], ["3x1 tiles of 4x4 + 4x4", "4x4"],
                                []]}


# -- keep-all and restore ----------------------------------------------------------------------

@pytest.mark.parametrize("k", [1.0, 10_000])  # an int k above an image's tokens: at most k
@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_is_the_unpruned_model(family, k):
    model = model_for(family)
    inputs = batched(family, model)
    layouts = [[lay for *_, lay in s] for s in expected(model, inputs)]

    def check(pruner):
        assert pruner.grids == layouts

    ref.assert_keep_all_is_unpruned(model, inputs, k, STEPS, check, step_logits=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_restores_bit_identical_outputs(family):
    model = model_for(family)
    ref.assert_remove_restores(model, single(family, model), 0.25, STEPS)


# -- the selection -----------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_kept_is_prune_on_the_eager_row_and_the_hidden_states(family):
    """kept == prune(hidden states entering layer K, eager row of layer K - 1, the layout),
    per image of a left-padded batch; kept indexes the image's tokens in sequence order,
    newline tokens included. spatial_weight=0.9: an edge is exactly a spatial neighbour in
    the layout (random features are never similar enough to matter), so the test sees the
    layout's edges."""
    opts = {"spatial_weight": 0.9}
    model = model_for(family, "eager")
    inputs = batched(family, model)
    hidden, _, attn = ref.entering(model, inputs, LAYER, eager=True)
    last = ref.last_tokens(inputs)
    with hf.apply(model, 0.25, **opts) as pruner:
        with torch.no_grad():
            model(**inputs)
    newline_kept = layout_mattered = 0
    for b, sample in enumerate(expected(model, inputs)):
        assert len(pruner.kept[b]) == len(sample)
        for i, (s, e, layout) in enumerate(sample):
            row = attn[b, :, last[b], s:e].mean(0)
            torch.testing.assert_close(pruner.importance[b][i], row, rtol=1e-5, atol=1e-8)
            want = d2p.prune(hidden[b, s:e], row, layout, 0.25, **opts)
            assert torch.equal(pruner.kept[b][i], want), (b, i)
            assert pruner.grids[b][i] == layout
            flat = d2p.prune(hidden[b, s:e], row, (1, e - s), 0.25, **opts)  # a line
            layout_mattered += not torch.equal(want, flat)
            if family != "internvl":
                newline_kept += len(set(pruner.kept[b][i].tolist()) & newlines(layout))
    assert pruner.kept[2] == [] and pruner.grids[2] == []
    # newline tokens compete for the budget and some win
    assert newline_kept > 0 if family != "internvl" else newline_kept == 0
    assert layout_mattered > 0  # the layout's spatial edges changed some image's selection


def newlines(layout):
    """The local indices of an anyres layout's newline tokens: the last column of its
    second piece."""
    base, newline_map = layout.pieces
    _, h, w1 = newline_map.grid
    return {base.cells + r * w1 + w1 - 1 for r in range(h)}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_positional_prior_is_spread_over_the_pieces(family):
    model = model_for(family)
    inputs = single(family, model)
    side = 4 if family == "internvl" else 8  # a prior for one tile / the base image
    prior = d2p.PositionalPrior((side, side))
    prior.update(torch.linspace(1.0, 3.0, side * side))
    with hf.apply(model, 0.25, prior=prior) as pruner:
        with torch.no_grad():
            model(**inputs)
    hidden, _, _ = ref.entering(model, inputs, LAYER)
    (s, e, layout), = expected(model, inputs)[0]
    row = pruner.importance[0][0]
    want = d2p.prune(hidden[0, s:e], row, layout, 0.25, prior=prior)
    assert torch.equal(pruner.kept[0][0], want)
    assert not torch.equal(want, d2p.prune(hidden[0, s:e], row, layout, 0.25))


# -- against the reference -----------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_generate_equal_the_reference(family, impl):
    model = model_for(family, impl)
    inputs = single(family, model)
    out, kept, gen = ref.pruned_run(model, inputs, 0.25, STEPS)
    keep = keep_mask(model, inputs, kept)
    n_kept = int(keep.sum())
    full = inputs["input_ids"].shape[1]
    lengths = ref.cache_lengths(out, len(model.model.language_model.layers))
    assert lengths == [full] * LAYER + [n_kept] * (len(lengths) - LAYER)
    assert n_kept < full
    tokens, logits = reference(model, inputs, keep)
    ref.assert_equals_reference(out, gen, keep, tokens, logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_equals_each_sample_alone(family):
    """Samples whose images have different aspect ratios and token counts (OneVision: one
    anyres image beside a two-image sample) in one left-padded batch."""
    model = model_for(family)
    inputs = batched(family, model)
    kept = ref.assert_batch_equals_alone(model, inputs, alone(family, model), 0.25, STEPS)
    assert [len(s) for s in kept] == [len(s) for s in SIZES[family]]


def test_images_back_to_back_and_the_single_patch_branch():
    """LLaVA-NeXT's single-patch branch (base + one newline; get_image_features never takes
    it in transformers 5.x, pre-encoded features can) right after an anyres image in one
    run of placeholders: cut into two images, the lone newline a 1x1 piece of its own."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    model = model_for("llava_next")
    inner = model.model
    g = torch.Generator().manual_seed(3)
    d = model.config.text_config.hidden_size
    h, w = tiny.anyres_map(model, (100, 180))
    nl = inner.image_newline.detach()
    first = torch.cat([torch.randn(64, d, generator=g)]
                      + [torch.cat([torch.randn(w, d, generator=g), nl[None]]) for _ in range(h)])
    second = torch.cat([torch.randn(64, d, generator=g), nl[None]])
    n = first.shape[0] + second.shape[0]
    ids = torch.tensor([[1, 4] + [tiny.IMAGE] * n + [9, 5, 6]])
    enc = {"image": BaseModelOutputWithPooling(pooler_output=[first, second])}
    with hf.apply(model, 16) as pruner:
        with torch.no_grad():
            model(input_ids=ids, mm_encoder_outputs=enc)
    assert pruner.grids == [[TokenLayout.grid(8, 8) + TokenLayout.grid(h, w + 1),
                             TokenLayout.grid(8, 8) + TokenLayout.grid(1, 1)]]
    assert [len(k) for k in pruner.kept[0]] == [16, 16]


# -- misuse ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_misuse_raises_at_apply(family):
    model = model_for(family)
    with pytest.raises(ValueError, match=r"tiles its images: use where='llm'"):
        hf.apply(model, 16, where="vision")
    with pytest.raises(ValueError, match=r"layer must be in \[1, 3\]"):
        hf.apply(model, 16, layer=4)
    with pytest.raises(ValueError, match=r"k must be an int >= 1"):
        hf.apply(model, 0)
    with pytest.raises(TypeError, match=r"unknown prune option"):
        hf.apply(model, 16, foo=1)
    with hf.apply(model, 16):  # nothing was left installed by the refusals
        pass
    if family == "llava_next":
        model.config.vision_feature_select_strategy = "full"
        try:
            with pytest.raises(ValueError, match=r"vision_feature_select_strategy='full' keeps "
                               r"the CLS token"):
                hf.apply(model, 16)
        finally:
            model.config.vision_feature_select_strategy = "default"


def test_image_tokens_that_are_not_an_anyres_image_raise():
    model = model_for("llava_next")
    ids = torch.tensor([[1] + [tiny.IMAGE] * 70 + [9, 5]])  # placeholders, no features
    with hf.apply(model, 16):
        with pytest.raises(ValueError, match=r"sample 0, image 0 \(tokens from 1\): no "
                           r"image_newline token after the base image"):
            with torch.no_grad():
                model(input_ids=ids)


# -- InternVL: where the canvas comes from ------------------------------------------------------

def test_internvl_needs_image_sizes_for_tiles_and_derives_the_canvas_as_the_processor():
    model = model_for("internvl")
    inputs = batched("internvl", model)
    plain = {k: v for k, v in inputs.items() if k != "image_sizes"}
    with hf.apply(model, 0.25):
        with pytest.raises(ValueError, match=r"sample 0, image 0 \(tokens 3..114\): 6 tiles "
                           r"and a thumbnail; the pruner needs each image's original size"):
            with torch.no_grad():
                model(**plain)
        with pytest.raises(ValueError, match=r"image_sizes must be \[3, 2\] \(one \(height, "
                           r"width\) per image of the batch, in order\) or per sample, a list "
                           r"of lists, got shape \[2, 2\]"):
            with torch.no_grad():
                model(**plain, image_sizes=inputs["image_sizes"][:2])
        wrong = inputs["image_sizes"].flip(0)  # (80, 80) first: 1 tile, not 6
        with pytest.raises(ValueError, match=r"an image of size \(80, 80\) with 6 tiles of "
                           r"112 px: no max_patches setting"):
            with torch.no_grad():
                model(**plain, image_sizes=wrong)
        one_tile = tiny.internvl_inputs(model, [[(80, 80)]])  # one tile: no size needed
        del one_tile["image_sizes"]
        with torch.no_grad():
            model(**one_tile)
    # a processor run with max_patches=6 cuts (300, 400) into 2 x 3 tiles, not the 3 x 4 of
    # the default 12: the adapter finds the setting that gives the prompt's tile count
    six = tiny.internvl_inputs(model, [[(300, 400)]], max_patches=6)
    assert tiny.internvl_tiles(model, (300, 400), 6) == 7
    with hf.apply(model, 0.25) as pruner:
        with torch.no_grad():
            model(**six)
    assert pruner.grids == [[TokenLayout.tiles(2, 3, (4, 4)) + TokenLayout.grid(4, 4)]]
    assert canvas((300, 400), 6) == (2, 3) and canvas((300, 400)) == (3, 4)


@pytest.mark.parametrize("family", FAMILIES)
def test_beams_give_each_expanded_row_its_sample_alone(family):
    """generate(num_beams=2): each expanded row is its sample pruned alone, a sample of two
    images included (InternVL: image_sizes per sample, which generate passes unchanged)."""
    model = model_for(family)
    inputs = batched(family, model)
    if family == "internvl":  # per sample: generate expands a tensor of rows in place
        inputs["image_sizes"] = [list(map(list, sizes)) for sizes in SIZES[family]]
    samples = alone(family, model)
    with hf.apply(model, 0.25) as pruner:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, num_beams=2, do_sample=False)
        expanded = pruner.kept
        singles = []
        for s in samples:
            with torch.no_grad():
                model(**s)
            singles.append(pruner.kept[0])
    assert len(expanded) == 2 * len(samples)
    for b, want in enumerate(singles):
        for row in expanded[2 * b:2 * b + 2]:
            assert len(row) == len(want)
            assert all(torch.equal(x, y) for x, y in zip(row, want, strict=True)), b


def test_calibrate_prior_over_tiles_and_pieces():
    """InternVL: every tile and the thumbnail is one 4 x 4 map (the per-tile prior apply()
    repeats over the tiles); anyres: base and map resampled to grid=(8, 8)."""
    model = model_for("internvl")
    inputs = single("internvl", model)
    with hf.apply(model, 1.0) as pruner:
        with torch.no_grad():
            model(**inputs)
        row = pruner.importance[0][0]
    prior = hf.calibrate_prior(model, [inputs], progress=False)
    assert prior.grid == (4, 4) and prior.count == 7  # 2 x 3 tiles + the thumbnail
    torch.testing.assert_close(prior.as_tensor().double(),
                               row.double().view(7, 16).mean(0), rtol=1e-6, atol=1e-9)

    model = model_for("llava_next")
    inputs = single("llava_next", model)
    with pytest.raises(ValueError, match=r"image 1 has grid \(8, 15\) but the first image has "
                       r"\(8, 8\): pass grid="):
        hf.calibrate_prior(model, [inputs], progress=False)
    prior = hf.calibrate_prior(model, [inputs], grid=(8, 8), progress=False)
    assert prior.grid == (8, 8) and prior.count == 2


def test_internvl_look_alike_samples_need_image_sizes_per_sample():
    """Two samples with the same text and two images each, wide ones then tall ones: a
    [total, 2] image_sizes reads like generate's expansion of one sample, so it is refused,
    naming the per-sample form; given per sample, each equals its sample alone."""
    model = model_for("internvl")
    wide, tall = (300, 400), (400, 300)
    sizes = [[wide, wide], [tall, tall]]
    inputs = make("internvl", model, sizes, [[5, 6], [5, 6]])
    with hf.apply(model, 0.25) as pruner:
        with pytest.raises(ValueError, match=r"image_sizes is ambiguous for this batch.*a list "
                                             r"of lists"):
            with torch.no_grad():
                model(**inputs)
        with torch.no_grad():
            model(**dict(inputs, image_sizes=[list(map(list, s)) for s in sizes]))
        batched_grids = pruner.grids
        singles = []
        for i, one in enumerate(sizes):
            alone_inputs = make("internvl", model, [one], [[5, 6]])
            with torch.no_grad():
                model(**alone_inputs)
            singles.append(pruner.grids[0])
    assert batched_grids == singles and singles[0] != singles[1]
