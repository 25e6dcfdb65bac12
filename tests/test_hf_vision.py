"""d2pruner_kernels.hf, where="vision" (LLaVA): the CLS row of the CLIP layer behind the
selected features picks k of the projected features per image, and the LLM gets a shorter
prompt. Held to a reference written here: the unpruned model fed the shortened prompt with
those features scattered in (inputs_embeds), decoded greedily without a cache."""
import pytest

pytest.importorskip("transformers", reason="the hf extra is not installed: "
                    "pip install 'transformers>=5.16.1,<6' -c <(echo torch==2.13.0)")

import torch  # noqa: E402

import d2pruner_kernels as d2p  # noqa: E402
from d2pruner_kernels import hf  # noqa: E402
from d2pruner_kernels.hf import tiny  # noqa: E402
import hf_reference as ref  # noqa: E402

K = 48
STEPS = 4
N = 576
_MODELS = {}


def model_for(impl="sdpa"):
    if impl not in _MODELS:
        _MODELS[impl] = tiny.tiny_llava(attn_implementation=impl)
    return _MODELS[impl]


def vision_selection(model, pixel_values, k=K):
    """(kept [n, k], projected features [n, N, D], CLS rows [n, N]) from the eager CLIP's
    attention weights of the layer that produces vision_feature_layer."""
    tower = model.model.vision_tower
    layers = len(getattr(tower, "vision_model", tower).encoder.layers)
    feature = model.config.vision_feature_layer
    j = feature % (layers + 1) - 1
    with torch.no_grad():
        out = tower(pixel_values, output_hidden_states=True, output_attentions=True)
        feats = model.model.multi_modal_projector(out.hidden_states[feature][:, 1:])
    rows = out.attentions[j][:, :, 0, 1:].mean(1)
    return d2p.prune(feats, rows, (24, 24), k), feats, rows


def shortened(model, inputs, kept, feats, k=K):
    """The prompt the LLM should see: k placeholders per image, the kept features in them,
    left padding for samples that lose fewer tokens; (inputs_embeds, mask, position_ids)."""
    rows, masks, images = [], [], iter(range(feats.shape[0]))
    vecs = []
    emb = model.get_input_embeddings()
    for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"]):
        ids, mask = ids.tolist(), mask.tolist()
        out_ids, out_mask, out_vecs, i = [], [], [], 0
        while i < len(ids):
            if ids[i] == tiny.IMAGE:
                img = next(images)
                chosen = feats[img, kept[img]]
                out_ids += [tiny.IMAGE] * k
                out_mask += [1] * k
                out_vecs += list(chosen)
                i += N
            else:
                out_ids.append(ids[i])
                out_mask.append(mask[i])
                i += 1
        rows.append(out_ids)
        masks.append(out_mask)
        vecs.append(out_vecs)
    width = max(len(r) for r in rows)
    e = []
    mask_t = torch.zeros(len(rows), width, dtype=torch.long)
    for b, (r, m, v) in enumerate(zip(rows, masks, vecs)):
        pad = width - len(r)
        ids_t = torch.tensor([tiny.PAD] * pad + r)
        with torch.no_grad():
            x = emb(ids_t)
        where = (ids_t == tiny.IMAGE).nonzero().flatten()
        if len(v):
            x[where] = torch.stack(v)
        e.append(x)
        mask_t[b, pad:] = torch.tensor(m)
    pos = (mask_t.cumsum(1) - 1).masked_fill(mask_t == 0, 0)
    return torch.stack(e), mask_t, pos


def reference(model, embeds, mask, pos, steps=STEPS):
    tokens, logits = [], []
    with torch.no_grad():
        for _ in range(steps):
            out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                        use_cache=False).logits
            logits.append(out)
            nxt = out[:, -1].argmax(-1)
            tokens.append(nxt)
            embeds = torch.cat([embeds, model.get_input_embeddings()(nxt)[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            pos = torch.cat([pos, pos[:, -1:] + 1], 1)
    return torch.stack(tokens, 1), logits


def generate(model, inputs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=STEPS, do_sample=False,
                              output_logits=True, return_dict_in_generate=True)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_vision_pruning_equals_the_reference(impl):
    model = model_for(impl)
    inputs = tiny.llava_inputs(model, [[5, 6, 7]], images_per_sample=[2])
    kept, feats, rows = vision_selection(model_for("eager"), inputs["pixel_values"])
    with hf.apply(model, K, where="vision") as pruner:
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
        gen = generate(model, inputs)
    assert [len(s) for s in pruner.kept] == [2]
    for i in range(2):
        assert torch.equal(pruner.kept[0][i], kept[i])
        torch.testing.assert_close(pruner.importance[0][i], rows[i], rtol=1e-5, atol=1e-8)
    embeds, mask, pos = shortened(model, inputs, kept, feats)
    tokens, logits = reference(model, embeds, mask, pos)
    full = inputs["input_ids"].shape[1]
    assert out.logits.shape[1] == full - 2 * (N - K)
    cache = getattr(out, "cache", None) or out.past_key_values
    assert cache.get_seq_length() == full - 2 * (N - K)
    torch.testing.assert_close(out.logits, logits[0], rtol=1e-4, atol=1e-4)
    assert torch.equal(gen.sequences[:, full:], tokens)
    for step, got in enumerate(gen.logits):  # cached decoding == uncached recomputation
        torch.testing.assert_close(got, logits[step][:, -1], rtol=1e-4, atol=1e-4)


def test_vision_keep_all_is_the_unpruned_model():
    model = model_for()
    inputs = tiny.llava_inputs(model, [[5, 6, 7], [8]], images_per_sample=[1, 2])
    with torch.no_grad():
        base = model(**inputs).logits
    base_gen = generate(model, inputs)
    with hf.apply(model, N, where="vision"):
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, base)
        assert torch.equal(generate(model, inputs).sequences, base_gen.sequences)


def test_vision_left_padded_batch_equals_each_sample_alone():
    model = model_for()
    texts, counts = [[5, 6, 7, 8, 9, 10], [11], [12, 13]], [1, 2, 0]
    samples = [tiny.llava_inputs(model, [t], images_per_sample=[c], seed=b)
               for b, (t, c) in enumerate(zip(texts, counts))]
    inputs = tiny.llava_inputs(model, texts, images_per_sample=counts)
    inputs["pixel_values"] = torch.cat([s["pixel_values"] for s in samples if "pixel_values" in s])
    with hf.apply(model, K, where="vision") as pruner:
        gen = generate(model, inputs)
        kept = pruner.kept
        alone = [(generate(model, s), pruner.kept[0]) for s in samples]
    full = inputs["input_ids"].shape[1]
    assert kept[2] == []
    for b, (g, k) in enumerate(alone):
        assert len(kept[b]) == len(k) == counts[b]
        for mine, theirs in zip(kept[b], k):
            assert torch.equal(mine, theirs)
        n = samples[b]["input_ids"].shape[1]
        assert torch.equal(gen.sequences[b, full:], g.sequences[0, n:]), b
        for step in range(STEPS):
            torch.testing.assert_close(gen.logits[step][b], g.logits[step][0],
                                       rtol=1e-4, atol=1e-4)


# -- continuing from a cache, beam search, several sequences (issue 21, items 2 and 4) ----------

def test_vision_continues_from_a_returned_cache():
    """The documented chat pattern: generate, then generate(input_ids=out.sequences,
    past_key_values=out.past_key_values): the same tokens and logits as generating in one
    go, with another prompt's generate in between; a cache the pruner did not fill that
    leaves image placeholders to feed, or new images after a cache, are refused clearly."""
    model = model_for()
    inputs = tiny.llava_inputs(model, [[5, 6, 7], [8]], images_per_sample=[1, 2])
    other = tiny.llava_inputs(model, [[9, 10]], seed=7)
    with hf.apply(model, K, where="vision"):
        with torch.no_grad():
            whole = model.generate(**inputs, max_new_tokens=2 * STEPS, do_sample=False,
                                   output_logits=True, return_dict_in_generate=True)
        first = generate(model, inputs)
        generate(model, other)  # another conversation in between
        import copy
        copied = copy.deepcopy(first.past_key_values)  # a branch of the chat
        for cache in (None, copied):
            second = ref.continue_generation(model, first, inputs, STEPS, cache=cache)
            assert torch.equal(second.sequences, whole.sequences)
            for a, b in zip(second.logits, whole.logits[STEPS:], strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        bare = copy.deepcopy(first.past_key_values)
        vars(bare).pop("_d2pruner_layout")  # pruned, but with no mark: the prompt's tail
        with pytest.raises(ValueError, match=r"continues from a cache \(past_key_values"):
            ref.continue_generation(model, first, inputs, STEPS, cache=bare)
        again = generate(model, inputs)
        turn = tiny.llava_inputs(model, [[11], [12]], seed=3)  # a new image after the cache
        ids = torch.cat([again.sequences, turn["input_ids"]], 1)
        mask = torch.ones_like(ids)
        with pytest.raises(ValueError,
                           match=r"prunes images in a prefill only.*image placeholders"):
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=mask,
                               past_key_values=again.past_key_values, max_new_tokens=1,
                               pixel_values=turn["pixel_values"])


@pytest.mark.parametrize("search", [dict(num_beams=3, num_return_sequences=2),
                                    dict(num_beams=1, num_return_sequences=2, do_sample=True)])
def test_vision_beam_search_and_several_sequences(search):
    """At keep-all the pruned model is the unpruned one; at K it is the unpruned model fed
    the shortened prompt (the reference's inputs_embeds); pruner.kept has one entry per
    expanded row."""
    model = model_for()
    inputs = tiny.llava_inputs(model, [[5, 6, 7], [8]], images_per_sample=[1, 2])
    full = inputs["input_ids"].shape[1]
    kw = dict(max_new_tokens=STEPS, output_scores=True, return_dict_in_generate=True,
              **({"do_sample": False} if "do_sample" not in search else {}), **search)

    def gen(**given):
        torch.manual_seed(0)
        with torch.no_grad():
            return model.generate(**given, **kw)

    base = gen(**inputs)
    with hf.apply(model, N, where="vision"):
        assert torch.equal(gen(**inputs).sequences, base.sequences)
    kept, feats, _ = vision_selection(model_for("eager"), inputs["pixel_values"])
    embeds, mask, _ = shortened(model, inputs, kept, feats)
    want = gen(inputs_embeds=embeds, attention_mask=mask)
    with hf.apply(model, K, where="vision") as pruner:
        got = gen(**inputs)
    assert torch.equal(got.sequences[:, full:], want.sequences)
    if "sequences_scores" in want:
        torch.testing.assert_close(got.sequences_scores, want.sequences_scores,
                                   rtol=1e-4, atol=1e-4)
    expand = search.get("num_beams", 1) * (search["num_return_sequences"]
                                           if search.get("num_beams", 1) == 1 else 1)
    assert [len(s) for s in pruner.kept] == [1] * expand + [2] * expand
    for row in range(expand):
        assert torch.equal(pruner.kept[row][0], kept[0])
        assert torch.equal(pruner.kept[expand + row][1], kept[2])


def test_an_image_token_id_without_pixels_after_a_cache_is_a_token():
    """A decode step whose ids hold the image token but no pixels (a small random model can
    generate that id) is a plain token to the model, as unpruned: never refused. Held at
    keep-all to the unpruned model continuing the same way; at k = K it runs."""
    model = model_for()
    inputs = tiny.llava_inputs(model, [[5, 6, 7]], images_per_sample=[1])

    def continue_with_the_image_id():
        with torch.no_grad():
            first = model.generate(**inputs, max_new_tokens=2, do_sample=False,
                                   return_dict_in_generate=True)
            ids = torch.cat([first.sequences, torch.tensor([[tiny.IMAGE, 9]])], 1)
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  past_key_values=first.past_key_values, max_new_tokens=2,
                                  do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
    want = continue_with_the_image_id()
    with hf.apply(model, 1.0, where="vision"):
        got = continue_with_the_image_id()
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with hf.apply(model, K, where="vision"):
        assert continue_with_the_image_id().sequences.shape == want.sequences.shape
