"""d2pruner_kernels.hf, where="llm" (pruning inside the language model at layer K), on tiny
random LLaVA, Qwen2-VL and Qwen2.5-VL models built from configs (fp32, CPU, nothing
downloaded), held to an independent reference written here.

The reference never gathers: it runs every decoder layer on the full sequence with an
explicit mask that, from layer K on, hides the pruned image tokens as keys; the outputs at
the kept positions are then exactly those of the pruned sequence. It decodes greedily by
recomputing the whole sequence at every step (no cache), so the pruner's cached decoding is
held to an uncached recomputation too.
"""
import pytest

pytest.importorskip("transformers", reason="the hf extra is not installed: "
                    "pip install 'transformers>=5.16.1,<6' -c <(echo torch==2.13.0)")

import torch  # noqa: E402

import d2pruner_kernels as d2p  # noqa: E402
from d2pruner_kernels import hf  # noqa: E402
from d2pruner_kernels.hf import tiny  # noqa: E402
import hf_reference as ref  # noqa: E402

LAYER = 2
STEPS = 4
FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl")
_MODELS = {}


def model_for(family, impl="sdpa"):
    key = (family, impl)
    if key not in _MODELS:
        if family == "llava":
            _MODELS[key] = tiny.tiny_llava(attn_implementation=impl)
        else:
            _MODELS[key] = tiny.tiny_qwen2_vl(attn_implementation=impl,
                                              v2_5=family == "qwen2_5_vl")
    return _MODELS[key]


def single(family, model):
    """One sample (two images for Qwen, of two sizes)."""
    if family == "llava":
        return tiny.llava_inputs(model, [[5, 6, 7]])
    return tiny.qwen_inputs(model, [[(16, 16), (12, 20)]])


def batch_samples(family, model):
    """Prompts of different lengths: with one image, two images and none."""
    if family == "llava":
        return [tiny.llava_inputs(model, [[5, 6, 7, 8, 9, 10]], seed=1),
                tiny.llava_inputs(model, [[11]], images_per_sample=[2], seed=2),
                tiny.llava_inputs(model, [[12, 13]], images_per_sample=[0])]
    return [tiny.qwen_inputs(model, [[(16, 16)]], texts=[[5, 6, 7, 8, 9]], seed=1),
            tiny.qwen_inputs(model, [[(12, 20), (8, 8)]], texts=[[11]], seed=2),
            tiny.qwen_inputs(model, [[]], texts=[[12, 13]])]


def batched(family, model):
    """The samples of batch_samples() in one left-padded batch."""
    if family == "llava":
        return tiny.llava_inputs(model, [[5, 6, 7, 8, 9, 10], [11], [12, 13]],
                                 images_per_sample=[1, 2, 0], seed=0), None
    samples = batch_samples(family, model)
    return tiny.qwen_inputs(model, [[(16, 16)], [(12, 20), (8, 8)], []],
                            texts=[[5, 6, 7, 8, 9], [11], [12, 13]]), samples


def fix_pixels(batch, samples):
    """Gives the batch the pixels of the single samples (so both see the same images)."""
    pix = [s["pixel_values"] for s in samples if "pixel_values" in s]
    batch["pixel_values"] = torch.cat(pix)
    return batch


def spans(family, model, inputs):
    """Per sample [(start, end, grid)], found here from the prompt (independently)."""
    ids = inputs["input_ids"]
    out = []
    grids = iter(inputs["image_grid_thw"].tolist()) if "image_grid_thw" in inputs else None
    for row in ids:
        found = []
        for i, j in ref.runs_of(row.tolist(), (tiny.IMAGE,)):
            if family == "llava":
                found += [(s, s + 576, (24, 24)) for s in range(i, j, 576)]
            else:
                t, h, w = next(grids)
                found.append((i, j, (t, h // 2, w // 2)))
        out.append(found)
    return out


def keep_mask(family, model, inputs, kept):
    """bool [B, L]: the positions the pruner kept (text and padding always)."""
    return ref.keep_mask(inputs, kept, spans(family, model, inputs))


def reference(model, inputs, keep, layer=LAYER, steps=STEPS):
    """(greedy tokens [B, steps], per step logits [B, n, V]): every layer on the full
    sequence, pruned keys hidden from `layer` on, recomputed from scratch each step."""
    return ref.masked_greedy(model, inputs, keep, layer, steps)


def generate(model, inputs, **kw):
    return ref.generate(model, inputs, STEPS, **kw)


def budget(family):
    return 64 if family == "llava" else 0.25


# -- keep-all and restore ------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_is_the_unpruned_model(family):
    model = model_for(family)
    inputs, samples = batched(family, model)
    if samples:
        inputs = fix_pixels(inputs, samples)
    found = spans(family, model, inputs)

    def check(pruner):
        assert [len(s) for s in pruner.kept] == [len(s) for s in found]

    ref.assert_keep_all_is_unpruned(model, inputs, 576 if family == "llava" else 1.0, STEPS,
                                    check)


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_restores_bit_identical_outputs(family):
    model = model_for(family)
    ref.assert_remove_restores(model, single(family, model), budget(family), STEPS)


# -- the selection ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_kept_is_prune_on_the_eager_row_and_the_hidden_states(family):
    """kept == prune(hidden states entering layer K, eager attention row of layer K - 1),
    on a left-padded batch (the padding embedding is not zero: padding keys would change
    the softmax)."""
    model = model_for(family, "eager")
    inputs, samples = batched(family, model)
    if samples:
        inputs = fix_pixels(inputs, samples)
    hidden, _, attn = ref.entering(model, inputs, LAYER, eager=True)  # attn: [B, Hq, L, L]
    last = ref.last_tokens(inputs)
    with hf.apply(model, budget(family)) as pruner:
        with torch.no_grad():
            model(**inputs)
    for b, sample in enumerate(spans(family, model, inputs)):
        assert len(pruner.kept[b]) == len(sample)
        for i, (s, e, grid) in enumerate(sample):
            row = attn[b, :, last[b], s:e].mean(0)
            torch.testing.assert_close(pruner.importance[b][i], row, rtol=1e-5, atol=1e-8)
            want = d2p.prune(hidden[b, s:e], row, grid, budget(family))
            assert torch.equal(pruner.kept[b][i], want), (b, i)
            assert pruner.grids[b][i] == grid
    assert pruner.kept[2] == [] and pruner.grids[2] == []


# -- against the reference -------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_generate_equal_the_reference(family, impl):
    model = model_for(family, impl)
    inputs = single(family, model)
    out, kept, gen = ref.pruned_run(model, inputs, budget(family), STEPS)
    keep = keep_mask(family, model, inputs, kept)
    n_kept = int(keep.sum())
    lengths = ref.cache_lengths(out, len(model.model.language_model.layers))
    full = inputs["input_ids"].shape[1]
    assert lengths == [full] * LAYER + [n_kept] * (len(lengths) - LAYER)  # no filler slots
    tokens, logits = reference(model, inputs, keep)
    ref.assert_equals_reference(out, gen, keep, tokens, logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_equals_each_sample_alone(family):
    model = model_for(family)
    inputs, samples = batched(family, model)
    samples = samples or batch_samples(family, model)
    inputs = fix_pixels(inputs, samples)
    ref.assert_batch_equals_alone(model, inputs, samples, budget(family), STEPS)


def test_generate_without_cache_prunes_again_at_every_step():
    """use_cache=False: every step is a prefill, pruned again from its newest token."""
    family = "llava"
    model = model_for(family)
    inputs = single(family, model)
    with hf.apply(model, budget(family)) as pruner:
        with torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False)
        last_kept = pruner.kept
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        steps = []
        with torch.no_grad():
            for _ in range(3):
                logits = model(input_ids=ids, attention_mask=mask,
                               pixel_values=inputs["pixel_values"], use_cache=False).logits
                steps.append(pruner.kept)
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, nxt], 1)
                mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    assert torch.equal(gen, ids)
    assert torch.equal(last_kept[0][0], steps[-1][0][0])
    with hf.apply(model, budget(family)) as pruner:  # the first step is the cached prefill
        first = generate(model, inputs).sequences[:, inputs["input_ids"].shape[1]]
    assert torch.equal(first, gen[:, inputs["input_ids"].shape[1]])


def _entering(model, inputs):
    """The hidden states entering decoder layer LAYER of an unpruned forward."""
    entering = {}
    hook = model.model.language_model.layers[LAYER].register_forward_pre_hook(
        lambda mod, args: entering.setdefault("h", args[0]))
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        hook.remove()
    return entering["h"]


def test_prior_divides_the_importance():
    """A PositionalPrior (resized to each Qwen image's grid) or a tensor for the grid."""
    family = "llava"
    model = model_for(family)
    inputs = single(family, model)
    prior = torch.linspace(1.0, 3.0, 576)
    with hf.apply(model, 64, prior=prior) as pruner:
        with torch.no_grad():
            model(**inputs)
        row = pruner.importance[0][0]
        kept = pruner.kept[0][0]
    hidden = _entering(model, inputs)
    want = d2p.prune(hidden[0, 1:577], row, (24, 24), 64, prior=prior)
    assert torch.equal(kept, want)
    assert not torch.equal(kept, d2p.prune(hidden[0, 1:577], row, (24, 24), 64))

    qwen = model_for("qwen2_vl")
    q_inputs = single("qwen2_vl", qwen)
    calibrated = d2p.PositionalPrior((4, 4))
    calibrated.update(torch.linspace(1.0, 2.0, 16))
    with hf.apply(qwen, 0.25, prior=calibrated) as pruner:
        with torch.no_grad():
            qwen(**q_inputs)
    hidden = _entering(qwen, q_inputs)
    for i, (s, e, grid) in enumerate(spans("qwen2_vl", qwen, q_inputs)[0]):
        assert pruner.grids[0][i] == grid
        h, row = hidden[0, s:e], pruner.importance[0][i]
        resized = calibrated.resized(grid[-2:]).as_tensor()  # the 4 x 4 prior on this grid
        want = d2p.prune(h, row, grid, 0.25, prior=resized)
        assert torch.equal(pruner.kept[0][i], want)
        assert not torch.equal(want, d2p.prune(h, row, grid, 0.25))  # the prior mattered


def test_inputs_embeds_and_videos():
    """Placeholders found from inputs_embeds as transformers finds them; Qwen video tokens
    are left as they are (only images are pruned)."""
    model = model_for("llava")
    inputs = single("llava", model)
    with hf.apply(model, 64) as pruner:
        with torch.no_grad():
            by_ids = model(**inputs).logits
            kept = pruner.kept
            embeds = model.get_input_embeddings()(inputs["input_ids"])
            by_embeds = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                              pixel_values=inputs["pixel_values"]).logits
        assert torch.equal(pruner.kept[0][0], kept[0][0])
    torch.testing.assert_close(by_embeds, by_ids)

    model = model_for("qwen2_vl")
    inputs = tiny.qwen_inputs(model, [[(16, 16)]], videos=[[(2, 8, 8)]])
    with hf.apply(model, 0.25) as pruner:
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
        kept = pruner.kept
    assert [len(s) for s in kept] == [1] and kept[0][0].numel() == 16
    keep = keep_mask("qwen2_vl", model, inputs, kept)  # video tokens: all kept
    assert int((inputs["input_ids"] == tiny.VIDEO).sum()) == 32
    assert out.logits.shape[1] == int(keep.sum()) == inputs["input_ids"].shape[1] - 48
    tokens, logits = reference(model, inputs, keep, steps=1)
    torch.testing.assert_close(out.logits[0], logits[0][0, keep[0]], rtol=1e-4, atol=1e-4)


# -- continuing from a cache, beam search, several sequences (issue 21, items 2 and 4) ----------

@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_generate_continues_from_a_returned_cache(family):
    """generate, then generate(input_ids=out.sequences, past_key_values=...): the tokens and
    logits of generating in one go, from the cache or a copy of it (a branch of the chat).
    LLaVA with another prompt's generate in between (Qwen's own rope_deltas are the last
    prefill's, unpruned too: none there). A cache pruned at another layer, or one pruned
    with no mark, is refused, naming the cache."""
    import copy
    model = model_for(family)
    inputs, samples = batched(family, model)
    if samples:
        inputs = fix_pixels(inputs, samples)
    with hf.apply(model, budget(family)):
        with torch.no_grad():
            whole = model.generate(**inputs, max_new_tokens=2 * STEPS, do_sample=False,
                                   output_logits=True, return_dict_in_generate=True)
        first = generate(model, inputs)
        if family == "llava":
            generate(model, single(family, model))  # another conversation in between
        copied = copy.deepcopy(first.past_key_values)
        for cache in (None, copied):
            second = ref.continue_generation(model, first, inputs, STEPS, cache=cache)
            assert torch.equal(second.sequences, whole.sequences)
            for a, b in zip(second.logits, whole.logits[STEPS:], strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    one = single(family, model)  # every sample pruned: layers from K hold fewer tokens
    with hf.apply(model, budget(family), layer=1):
        lone = generate(model, one)
    with hf.apply(model, budget(family)):
        with pytest.raises(ValueError, match=r"cache \(past_key_values\) pruned with "
                                             r"where='llm', layer=1"):
            ref.continue_generation(model, lone, one, STEPS)
        bare = copy.deepcopy(lone.past_key_values)
        vars(bare).pop("_d2pruner_layout")  # pruned, but with no mark to read
        with pytest.raises(ValueError, match=r"continues from a pruned cache \(past_key_values"):
            ref.continue_generation(model, lone, one, STEPS, cache=bare)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_beam_search_and_several_sequences(family):
    """Keep-all is the unpruned model under beam search; at a small k each expanded row is
    its sample pruned alone (pruner.kept one entry per expanded row) and beam search over
    the batch gives each sample's beams alone."""
    model = model_for(family)
    inputs = single(family, model)
    kw = dict(max_new_tokens=STEPS, num_beams=3, num_return_sequences=2, do_sample=False,
              output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        base = model.generate(**inputs, **kw)
        with hf.apply(model, 576 if family == "llava" else 1.0):
            assert torch.equal(model.generate(**inputs, **kw).sequences, base.sequences)
        with hf.apply(model, budget(family)) as pruner:
            model(**inputs)
            alone = pruner.kept
            got = model.generate(**inputs, **kw)
            assert len(pruner.kept) == 3  # num_beams rows for the one sample
            for row in pruner.kept:
                assert all(torch.equal(a, b) for a, b in zip(row, alone[0], strict=True))
    assert got.sequences.shape == base.sequences.shape
