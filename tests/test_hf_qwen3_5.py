"""d2pruner_kernels.hf, where="llm", on a tiny random Qwen3.5 (Qwen3_5ForConditionalGeneration:
Gated DeltaNet linear-attention layers interleaved with full-attention ones), held to an
independent reference written here.

The reference cannot hide pruned tokens with a mask as tests/test_hf_llm.py does: a
linear-attention layer has no mask over keys, its recurrence runs over every token it is
given. So it runs the layers below K on the whole sequence and the layers from K on, by
hand, on the kept tokens only (gathered here, with their RoPE), for one sample; greedy
decoding recomputes everything at every step (no cache), so cached decoding (the linear
layers' conv and recurrent states built from the kept tokens) is held to recomputation.
"""
import pytest

pytest.importorskip("transformers", reason="the hf extra is not installed: "
                    "pip install 'transformers>=5.16.1,<6' -c <(echo torch==2.13.0)")

import torch  # noqa: E402

import d2pruner_kernels as d2p  # noqa: E402
from d2pruner_kernels import hf  # noqa: E402
from d2pruner_kernels.hf import tiny  # noqa: E402
import hf_reference as ref  # noqa: E402

LAYER = 2   # the default of tiny.QWEN3_5_LAYERS: layer 1 is the first full-attention layer
STEPS = 3
K = 0.25
_MODELS = {}


def model_for(impl="sdpa", moe=False):
    if (impl, moe) not in _MODELS:
        _MODELS[impl, moe] = tiny.tiny_qwen3_5(attn_implementation=impl, moe=moe)
    return _MODELS[impl, moe]


def single(model):
    return tiny.qwen_inputs(model, [[(16, 16), (12, 20)]])


def samples(model):
    return [tiny.qwen_inputs(model, [[(16, 16)]], texts=[[5, 6, 7, 8, 9]], seed=1),
            tiny.qwen_inputs(model, [[(12, 20), (8, 8)]], texts=[[11]], seed=2),
            tiny.qwen_inputs(model, [[]], texts=[[12, 13]])]


def batched(model):
    """The samples in one left-padded batch, with their pixels."""
    batch = tiny.qwen_inputs(model, [[(16, 16)], [(12, 20), (8, 8)], []],
                             texts=[[5, 6, 7, 8, 9], [11], [12, 13]])
    batch["pixel_values"] = torch.cat([s["pixel_values"] for s in samples(model)
                                       if "pixel_values" in s])
    return batch


def spans(inputs):
    """Per sample [(start, end, grid)] from the prompt and image_grid_thw (2x2 merge)."""
    grids = iter(inputs["image_grid_thw"].tolist()) if "image_grid_thw" in inputs else None
    out = []
    for row in inputs["input_ids"].tolist():
        found = []
        for i, j in ref.runs_of(row, (tiny.IMAGE,)):
            t, h, w = next(grids)
            found.append((i, j, (t, h // 2, w // 2)))
        out.append(found)
    return out


def keep_mask(inputs, kept):
    return ref.keep_mask(inputs, kept, spans(inputs))


def _run(lm, layers, h, pe):
    """Decoder layers by hand on one unpadded sample: full attention with an explicit causal
    mask, linear attention with none (nothing is padded)."""
    n = h.shape[1]
    causal = torch.where(torch.ones(n, n, dtype=torch.bool).tril(), 0.0,
                         torch.finfo(h.dtype).min)[None, None]
    for lay in layers:
        full = lay.block_type == "full_attention"
        out = lay(h, position_embeddings=pe, attention_mask=causal if full else None,
                  position_ids=None, cache=None)
        h = out[0] if isinstance(out, tuple) else out
    return h


def reference(model, inputs, keep, layer=LAYER, steps=STEPS):
    """(greedy tokens [1, steps], per-step logits [1, n, V] at the kept positions) of one
    sample: layers < layer on everything, layers >= layer on the kept tokens only."""
    assert inputs["input_ids"].shape[0] == 1
    kw = ref.lm_kwargs(model, inputs)
    lm = model.model.language_model
    emb, pos = kw["inputs_embeds"], kw["position_ids"]
    assert pos.dim() == 3 and pos.shape[0] == 3
    keep = keep[0]
    tokens, logits_steps = [], []
    with torch.no_grad():
        for _ in range(steps):
            pe = lm.rotary_emb(emb, pos)
            h = _run(lm, lm.layers[:layer], emb, pe)
            sel = torch.nonzero(keep).flatten()
            pe_k = tuple(t[:, sel] for t in pe)
            h = _run(lm, lm.layers[layer:], h[:, sel], pe_k)
            logits = model.lm_head(lm.norm(h))
            logits_steps.append(logits)
            nxt = logits[:, -1].argmax(-1)
            tokens.append(nxt)
            emb = torch.cat([emb, model.get_input_embeddings()(nxt)[:, None]], 1)
            pos = torch.cat([pos, (pos.amax(dim=(0, 2)) + 1).view(1, 1, 1).expand(3, 1, 1)], -1)
            keep = torch.cat([keep, torch.ones(1, dtype=torch.bool)])
    return torch.stack(tokens, 1), logits_steps


def generate(model, inputs, steps=STEPS):
    return ref.generate(model, inputs, steps)


def test_layer_types_default_layer_and_misuse():
    """transformers 5.25's Qwen3.5 layer types; the default layer is the first
    full-attention layer + 1; a layer whose layer - 1 is linear raises, naming it and the
    nearest valid choices; where='vision' and a layer out of range raise at apply()."""
    model = model_for()
    types = model.model.language_model.config.layer_types
    assert types == tiny.QWEN3_5_LAYERS
    assert [type(lay.linear_attn if t == "linear_attention" else lay.self_attn).__name__
            for lay, t in zip(model.model.language_model.layers, types)] == \
        ["Qwen3_5GatedDeltaNet", "Qwen3_5Attention"] * 2 + ["Qwen3_5GatedDeltaNet"]
    with hf.apply(model, K) as pruner:
        assert pruner.layer == LAYER
    with hf.apply(model, K, layer=4) as pruner:
        assert pruner.layer == 4
    with pytest.raises(ValueError, match=r"layer=3: .*decoder layer 2 is a linear-attention "
                                         r".*layer=2 or layer=4"):
        hf.apply(model, K, layer=3)
    with pytest.raises(ValueError, match=r"layer=1: .*layer 0 is a linear.*layer=2$"):
        hf.apply(model, K, layer=1)
    with pytest.raises(ValueError, match="where='vision'"):
        hf.apply(model, K, where="vision")
    with pytest.raises(ValueError, match=r"layer must be in \[1, 4\]"):
        hf.apply(model, K, layer=5)
    with pytest.raises(ValueError, match=r"a ratio in \(0, 1\]|k"):
        hf.apply(model, 1.5)
    # the released models' pattern (every 4th layer full): default layer 4
    real = tiny.tiny_qwen3_5(layer_types=["linear_attention"] * 3 + ["full_attention"]
                             + ["linear_attention"] * 3 + ["full_attention"])
    with hf.apply(real, K) as pruner:
        assert pruner.layer == 4
    with pytest.raises(ValueError, match=r"layer=6: .*layer=4$"):
        hf.apply(real, K, layer=6)
    assert all(hf._pruner._active(m) is None for m in (model, real))  # nothing left applied


def test_keep_all_is_the_unpruned_model():
    model = model_for()

    def check(pruner):
        assert [len(s) for s in pruner.kept] == [1, 2, 0]

    ref.assert_keep_all_is_unpruned(model, batched(model), 1.0, STEPS, check)


def test_remove_restores_bit_identical_outputs():
    model = model_for()
    ref.assert_remove_restores(model, single(model), K, STEPS)


def test_kept_is_prune_on_the_eager_row_and_the_hidden_states():
    """On a left-padded batch: the row of layer K - 1 (full attention, eager weights read by
    a hook on its attention module) and the hidden states entering layer K."""
    model = model_for("eager")
    inputs = batched(model)
    hidden, _, attn = ref.entering(model, inputs, LAYER, eager=True)  # attn: [B, Hq, L, L]
    last = ref.last_tokens(inputs)
    with hf.apply(model, K) as pruner:
        with torch.no_grad():
            model(**inputs)
    for b, sample in enumerate(spans(inputs)):
        assert len(pruner.kept[b]) == len(sample)
        for i, (s, e, grid) in enumerate(sample):
            row = attn[b, :, last[b], s:e].mean(0)
            torch.testing.assert_close(pruner.importance[b][i], row, rtol=1e-5, atol=1e-8)
            assert torch.equal(pruner.kept[b][i], d2p.prune(hidden[b, s:e], row, grid, K))
            assert pruner.grids[b][i] == grid
    assert pruner.kept[2] == []


@pytest.mark.parametrize("impl, moe", [("sdpa", False), ("eager", False), ("sdpa", True)])
def test_logits_and_generate_equal_the_reference(impl, moe):
    """Prefill logits at the kept positions, greedy tokens and every decoding step's logits
    equal the reference that runs the layers from K (linear ones included) on the kept
    tokens only; the full-attention caches from K on hold the kept tokens, the
    linear-attention layers from K on have seen only them. Also the MoE variant."""
    model = model_for(impl, moe)
    inputs = single(model)
    out, kept, gen = ref.pruned_run(model, inputs, K, STEPS)
    keep = keep_mask(inputs, kept)
    n_kept, full = int(keep.sum()), inputs["input_ids"].shape[1]
    seen = ref.cache_lengths(out, len(tiny.QWEN3_5_LAYERS))
    assert seen == [full] * LAYER + [n_kept] * (len(seen) - LAYER)
    assert n_kept < full
    tokens, logits = reference(model, inputs, keep)  # run on the kept tokens only
    ref.assert_equals_reference(out, gen, keep, tokens, logits, prefill=logits[0][0])
    # the reference is not trivially satisfied: the unpruned model answers differently
    with torch.no_grad():
        unpruned = model(**inputs).logits[0, -1]
    assert not torch.allclose(unpruned, logits[0][0, -1], rtol=1e-3, atol=1e-3)


def test_left_padded_batch_equals_each_sample_alone():
    """Filler slots of the pruned batch reach the linear layers zeroed, like padding."""
    model = model_for()
    inputs = batched(model)
    ref.assert_batch_equals_alone(model, inputs, samples(model), K, STEPS)


def test_calibrate_prior():
    """calibrate_prior averages the rows apply() reads (default layer), per grid."""
    model = model_for()
    batch = tiny.qwen_inputs(model, [[(16, 16)], [(16, 16)]], texts=[[5, 6], [7]], seed=3)
    prior = hf.calibrate_prior(model, [batch], progress=False)
    rows = ref.importance_rows(model, [batch], K)
    assert prior.layer == LAYER - 1 and len(rows) == 2
    ref.assert_prior_is_the_mean(prior, (1, 8, 8), rows, rtol=1e-5, atol=1e-9)
