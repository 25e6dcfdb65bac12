"""d2pruner_kernels.hf, where="llm", on a tiny random Gemma 3 (Gemma3ForConditionalGeneration:
256 tokens per image on a 16 x 16 grid, sliding-window and full-attention layers, image
tokens bidirectional within their image through token_type_ids), held to an independent
reference written here.

The reference runs every decoder layer on the whole sequence with a mask written here from
the rules of transformers' Gemma 3 (causal, OR bidirectional within an image's run of
token_type_ids == 1, AND the sliding window on sliding layers, AND padding) and, from layer
K on, the pruned image tokens hidden as keys. The window is measured in original prompt
positions (our documented choice), so a kept token never sees further back than it did
unpruned. It decodes greedily by recomputing everything at every step: the pruner's cached
decoding (its sliding caches keep their last window - 1 kept entries) is held to it.
"""
import pytest

pytest.importorskip("transformers", reason="the hf extra is not installed: "
                    "pip install 'transformers>=5.16.1,<6' -c <(echo torch==2.13.0)")

import torch  # noqa: E402

import d2pruner_kernels as d2p  # noqa: E402
from d2pruner_kernels import hf  # noqa: E402
from d2pruner_kernels.hf import tiny  # noqa: E402
import hf_reference as ref  # noqa: E402

LAYER = 2   # tiny.GEMMA3_LAYERS: the importance layer 1 is a sliding one
STEPS = 3
K = 64
N = 256
_MODELS = {}


def model_for(impl="sdpa", window=300):
    key = (impl, window)
    if key not in _MODELS:
        _MODELS[key] = tiny.tiny_gemma3(attn_implementation=impl, sliding_window=window)
    return _MODELS[key]


def single(model):
    """Two images (a pan-and-scan crop is one more image like these), then text."""
    return tiny.gemma3_inputs(model, [[5, 6, 7, 8]], images_per_sample=[2])


def samples(model):
    return [tiny.gemma3_inputs(model, [[5, 6, 7, 8, 9, 10]], seed=1),
            tiny.gemma3_inputs(model, [[11]], images_per_sample=[2], seed=2),
            tiny.gemma3_inputs(model, [[12, 13]], images_per_sample=[0])]


def batched(model):
    batch = tiny.gemma3_inputs(model, [[5, 6, 7, 8, 9, 10], [11], [12, 13]],
                               images_per_sample=[1, 2, 0])
    batch["pixel_values"] = torch.cat([s["pixel_values"] for s in samples(model)
                                       if "pixel_values" in s])
    return batch


def spans(inputs):
    out = []
    for row in inputs["input_ids"].tolist():
        found = []
        for i, j in ref.runs_of(row, (tiny.IMAGE,)):
            assert (j - i) % N == 0
            found += [(s, s + N, (16, 16)) for s in range(i, j, N)]
        out.append(found)
    return out


def keep_mask(inputs, kept):
    return ref.keep_mask(inputs, kept, spans(inputs))


def reference(model, inputs, keep, layer=LAYER, steps=STEPS, blocks=True):
    """(greedy tokens [B, steps], per-step logits [B, n, V]) of an unpadded batch: masks
    written here; pruned keys hidden from `layer` on; blocks=False: no token_type_ids."""
    kw = ref.lm_kwargs(model, inputs)
    lm = model.model.language_model
    cfg = lm.config
    emb = kw["inputs_embeds"]
    b, n = emb.shape[:2]
    assert bool(inputs["attention_mask"].bool().all())
    window = cfg.sliding_window
    image = inputs["input_ids"] == tiny.IMAGE
    start = image & ~torch.nn.functional.pad(image, (1, 0))[:, :-1]
    blk = torch.where(image, start.long().cumsum(1) - 1, -1)
    low = torch.finfo(emb.dtype).min
    tokens, logits_steps = [], []
    with torch.no_grad():
        for _ in range(steps):
            n = emb.shape[1]
            pos = torch.arange(n)
            causal = pos[None, :] <= pos[:, None]                     # [q, kv]
            same = (blk[:, :, None] == blk[:, None, :]) & (blk[:, :, None] >= 0)
            base = causal[None] | same if blocks else causal[None].expand(b, n, n)
            near = pos[None, :] > pos[:, None] - window               # original positions
            eye = torch.eye(n, dtype=torch.bool)[None]  # a pruned query sees itself: no NaN
            masks = {"full_attention": base, "sliding_attention": base & near}
            h = emb
            ids = torch.arange(n)[None].expand(b, n)
            pe = {t: lm.rotary_emb(h, ids, t) for t in set(cfg.layer_types)}
            for i, lay in enumerate(lm.layers):
                t = cfg.layer_types[i]
                m = masks[t] & keep[:, None, :] | eye if i >= layer else masks[t]
                out = lay(h, attention_mask=torch.where(m, 0.0, low)[:, None],
                          position_embeddings=pe[t], position_ids=None, cache=None)
                h = out[0] if isinstance(out, tuple) else out
            logits = model.lm_head(lm.norm(h))
            logits_steps.append(logits)
            nxt = logits[:, -1].argmax(-1)
            tokens.append(nxt)
            emb = torch.cat([emb, model.get_input_embeddings()(nxt)[:, None]], 1)
            keep = torch.cat([keep, torch.ones(b, 1, dtype=torch.bool)], 1)
            blk = torch.cat([blk, torch.full((b, 1), -1)], 1)
    return torch.stack(tokens, 1), logits_steps


def generate(model, inputs, steps=STEPS):
    return ref.generate(model, inputs, steps)


def test_family_facts_and_misuse():
    """transformers 5.25's Gemma 3: 256 tokens per image (16 x 16), the layer kinds, one
    RoPE per kind; k above 256 and where='vision' are refused at apply()."""
    model = model_for()
    assert model.config.mm_tokens_per_image == N
    cfg = model.model.language_model.config
    assert cfg.layer_types == tiny.GEMMA3_LAYERS and cfg.sliding_window == 300
    assert set(cfg.rope_parameters) == {"sliding_attention", "full_attention"}
    with pytest.raises(ValueError, match="257"):
        hf.apply(model, 257)
    with pytest.raises(ValueError, match="where='vision'"):
        hf.apply(model, K, where="vision")
    with pytest.raises(ValueError, match=r"layer must be in \[1, 3\]"):
        hf.apply(model, K, layer=4)
    with hf.apply(model, N) as pruner:
        assert pruner.layer == LAYER
    assert hf._pruner._active(model) is None


def test_keep_all_is_the_unpruned_model():
    model = model_for()

    def check(pruner):
        assert [len(s) for s in pruner.kept] == [1, 2, 0]
        assert pruner.grids[1] == [(16, 16), (16, 16)]

    ref.assert_keep_all_is_unpruned(model, batched(model), N, STEPS, check)


def test_remove_restores_bit_identical_outputs():
    model = model_for()
    before, pruned = ref.assert_remove_restores(model, single(model), K, STEPS)
    assert pruned.shape[1] == before.shape[1] - 2 * (N - K)


@pytest.mark.parametrize("window", [300, 100])
def test_kept_is_prune_on_the_eager_row_and_the_hidden_states(window):
    """The importance layer 1 is a sliding one: its eager row covers the keys inside the
    window only (window 300: the first image partly, 100: not at all; the rows of keys
    outside it are 0), on a left-padded batch."""
    model = model_for("eager", window)
    inputs = batched(model)
    hidden, _, attn = ref.entering(model, inputs, LAYER, eager=True)  # attn: [B, Hq, L, L]
    last = ref.last_tokens(inputs)
    with hf.apply(model, K) as pruner:
        with torch.no_grad():
            model(**inputs)
    outside = 0
    for b, sample in enumerate(spans(inputs)):
        assert len(pruner.kept[b]) == len(sample)
        for i, (s, e, grid) in enumerate(sample):
            row = attn[b, :, last[b], s:e].mean(0)
            torch.testing.assert_close(pruner.importance[b][i], row, rtol=1e-5, atol=1e-8)
            far = torch.arange(s, e) <= last[b] - window
            assert bool((pruner.importance[b][i][far] == 0).all())
            outside += int(far.sum())
            assert torch.equal(pruner.kept[b][i], d2p.prune(hidden[b, s:e], row, grid, K))
    assert outside > 0  # the window did cut an image
    assert pruner.kept[2] == []


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("window", [300, 100])
def test_logits_and_generate_equal_the_reference(impl, window):
    """Window 300: the kept sequence (141 tokens) is shorter than the window, yet the text
    does not see the first image's early tokens (window in original positions); window 100:
    the sliding caches from K on are cut to their last 99 kept entries while decoding."""
    model = model_for(impl, window)
    inputs = single(model)
    out, kept, gen = ref.pruned_run(model, inputs, K, STEPS)
    keep = keep_mask(inputs, kept)
    n_kept, full = int(keep.sum()), inputs["input_ids"].shape[1]
    cache = out.cache
    kinds = model.model.language_model.config.layer_types
    seen = [cache.get_seq_length(i) for i in range(len(kinds))]
    assert seen == [full] * LAYER + [n_kept] * (len(seen) - LAYER)
    held = [cache.layers[i].keys.shape[-2] for i in range(len(kinds))]
    assert held == [min(n, window - 1) if t == "sliding_attention" else n
                    for n, t in zip(seen, kinds)]
    tokens, logits = reference(model, inputs, keep)
    ref.assert_equals_reference(out, gen, keep, tokens, logits)


def test_without_token_type_ids_the_masks_are_causal():
    """A forward given no token_type_ids gets Gemma 3's causal masks (no image blocks), in
    the pruned layers too."""
    model = model_for()
    inputs = single(model)
    bare = {k: v for k, v in inputs.items() if k != "token_type_ids"}
    with hf.apply(model, K) as pruner:
        with torch.no_grad():
            out = model(**bare)
        kept = pruner.kept
    keep = keep_mask(inputs, kept)
    _, logits = reference(model, bare, keep, steps=1, blocks=False)
    torch.testing.assert_close(out.logits[0], logits[0][0, keep[0]], rtol=1e-4, atol=1e-4)
    _, with_blocks = reference(model, inputs, keep, steps=1)
    assert not torch.allclose(with_blocks[0], logits[0], rtol=1e-3, atol=1e-3)


def test_left_padded_batch_equals_each_sample_alone():
    model = model_for()
    inputs = batched(model)
    ref.assert_batch_equals_alone(model, inputs, samples(model), K, STEPS)


def test_calibrate_prior():
    model = model_for()
    batch = tiny.gemma3_inputs(model, [[5, 6], [7]], images_per_sample=[1, 2], seed=3)
    prior = hf.calibrate_prior(model, [batch], progress=False)
    rows = ref.importance_rows(model, [batch], K)
    assert prior.layer == LAYER - 1 and len(rows) == 3
    ref.assert_prior_is_the_mean(prior, (16, 16), rows, rtol=1e-5, atol=1e-9)
