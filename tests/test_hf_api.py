"""d2pruner_kernels.hf: misuse (message by message), a failed apply() and an exception in the
`with` block leave the model as it was, calibrate_prior, draw_kept, the example script, and
the core package staying free of transformers."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers", reason="the hf extra is not installed: "
                    "pip install 'transformers>=5.16.1,<6' -c <(echo torch==2.13.0)")

import torch  # noqa: E402

import d2pruner_kernels as d2p  # noqa: E402
from d2pruner_kernels import hf  # noqa: E402
from d2pruner_kernels.hf import tiny  # noqa: E402
import hf_reference as ref  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MODELS = {}


def llava():
    if "llava" not in _MODELS:
        _MODELS["llava"] = tiny.tiny_llava()
    return _MODELS["llava"]


def qwen():
    if "qwen" not in _MODELS:
        _MODELS["qwen"] = tiny.tiny_qwen2_vl()
    return _MODELS["qwen"]


def ours(hooks) -> int:
    """The hooks of d2pruner_kernels among a module's hooks (transformers adds its own,
    lazily, for output capturing)."""
    return sum(getattr(getattr(h, "func", h), "__module__", "").startswith("d2pruner_kernels")
               for h in hooks.values())


def state(model):
    """Everything apply() touches: our hooks on every module, every module's config object
    and attention implementation."""
    hooks = [(ours(m._forward_pre_hooks), ours(m._forward_hooks)) for m in model.modules()]
    configs = [(id(c), c._attn_implementation) for m in model.modules()
               if (c := getattr(m, "config", None)) is not None]
    return hooks, configs


# -- misuse at apply() -----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, message", [
    ({"k": 64, "where": "tokens"}, ValueError, r"where must be 'llm' or 'vision', got 'tokens'"),
    ({"k": 64, "layer": 0}, ValueError, r"layer must be in \[1, 3\] \(the model has 4 decoder"),
    ({"k": 64, "layer": 4}, ValueError, r"layer must be in \[1, 3\]"),
    ({"k": 64, "layer": 2.0}, TypeError, r"layer must be an int, got float 2.0"),
    ({"k": 64, "layer": True}, TypeError, r"layer must be an int, got bool"),
    ({"k": 0}, ValueError, r"k must be in \[1, N=576\], got 0"),
    ({"k": 577}, ValueError, r"k must be in \[1, N=576\], got 577"),
    ({"k": 1.5}, ValueError, r"k as a ratio must be in \(0, 1\], got 1.5"),
    ({"k": "64"}, TypeError, r"k must be an int >= 1 \(tokens kept\) or a float ratio in \(0, 1\], got str"),
    ({"k": True}, TypeError, r"got bool True"),
    ({"k": 64, "foo": 1}, TypeError, r"unknown prune option\(s\) 'foo'; hf.apply\(\) takes"),
    ({"k": 64, "pivot_ratio": 2.0}, ValueError, r"pivot_ratio"),
    ({"k": 64, "radius": 1.5}, TypeError, r"radius"),
    ({"k": 64, "prior": torch.ones(100)}, ValueError,
     r"the prior tensor has 100 entries but the image has 576 tokens"),
    ({"k": 64, "prior": torch.ones(2, 576)}, ValueError, r"prior as a tensor must be 1-D"),
    ({"k": 64, "prior": d2p.PositionalPrior((24, 24))}, ValueError, r"has no data"),
    ({"k": 64, "prior": "flat"}, TypeError, r"prior must be None, a tensor or a PositionalPrior, got str"),
    ({"k": 64, "where": "vision", "layer": 3}, ValueError,
     r"where='vision' reads the vision tower \(LLaVA: the CLIP layer of config.vision_feature_layer"),
])
def test_misuse_raises_at_apply_and_leaves_the_model_alone(kwargs, error, message):
    model = llava()
    before = state(model)
    with pytest.raises(error, match=message):
        hf.apply(model, **kwargs)
    assert state(model) == before


def test_unsupported_models_and_configurations():
    from transformers import LlamaConfig, LlamaForCausalLM
    text = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=2))
    with pytest.raises(TypeError, match=r"supports LlavaForConditionalGeneration, "
                       r"Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration, "
                       r"LlavaNextForConditionalGeneration, "
                       r"LlavaOnevisionForConditionalGeneration, InternVLForConditionalGeneration, "
                       r"Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration"
                       r"(, \w+)*; "
                       r"got LlamaForCausalLM"):
        hf.apply(text, 8)
    with pytest.raises(ValueError, match=r"where='vision' is for LLaVA \(a CLS row\), Qwen2.5-VL and "
                       r"Qwen3-VL \(their towers' attention\); "
                       r"Qwen2VLForConditionalGeneration has none"):
        hf.apply(qwen(), 0.5, where="vision")
    with pytest.raises(ValueError, match=r"k must be an int >= 1 \(tokens kept\) or a float ratio in \(0, 1\], got 0"):
        hf.apply(qwen(), 0)

    model = llava()
    before = state(model)
    lm_config = model.model.language_model.config
    lm_config._attn_implementation = "flex_attention"
    try:
        with pytest.raises(ValueError, match=r"the language model uses "
                           r"attn_implementation='flex_attention'; d2pruner_kernels.hf supports"):
            hf.apply(model, 64)
    finally:
        lm_config._attn_implementation = "sdpa"
    model.config.vision_feature_select_strategy = "full"
    try:
        with pytest.raises(ValueError, match=r"vision_feature_select_strategy='full' feeds 577 "
                           r"tokens per image"):
            hf.apply(model, 64)
    finally:
        model.config.vision_feature_select_strategy = "default"
    assert state(model) == before


def test_applying_twice_raises_and_the_first_pruner_still_works():
    model = llava()
    inputs = tiny.llava_inputs(model, [[5, 6]])
    before = state(model)
    with hf.apply(model, 64) as pruner:
        assert state(model) != before  # (the comparisons below see our hooks)
        with pytest.raises(RuntimeError, match=r"a Pruner is already applied to this "
                           r"LlavaForConditionalGeneration: call its remove\(\) first"):
            hf.apply(model, 32, where="vision")
        with torch.no_grad():
            assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1] - 512
        assert pruner.kept[0][0].numel() == 64
        with pytest.raises(RuntimeError, match=r"call its remove\(\) before calibrating"):
            hf.calibrate_prior(model, [inputs], progress=False)
    assert state(model) == before


def test_an_exception_in_the_with_block_restores_the_model():
    model = llava()
    inputs = tiny.llava_inputs(model, [[5, 6]])
    before = state(model)
    with torch.no_grad():
        base = model(**inputs).logits
    with pytest.raises(KeyError):
        with hf.apply(model, 64):
            raise KeyError("boom")
    assert state(model) == before
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, base)


# -- nothing the package holds keeps a model alive (issue 21, item 5) ---------------------------

@pytest.mark.parametrize("family, where", [("llava", "llm"), ("llava", "vision"),
                                           ("qwen", "llm")])
def test_a_model_dropped_without_remove_is_freed(family, where):
    import gc
    import weakref
    if family == "llava":
        model = tiny.tiny_llava()
        inputs = tiny.llava_inputs(model, [[5, 6]])
    else:
        model = tiny.tiny_qwen2_vl()
        inputs = tiny.qwen_inputs(model, [[(16, 16)]])
    pruner = hf.apply(model, 0.25, where=where)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert pruner.kept[0][0].numel() > 0
    # the pruner dropped, the model kept: still applied (its hooks hold it), still refused
    del pruner
    gc.collect()
    with pytest.raises(RuntimeError, match=r"a Pruner is already applied"):
        hf.apply(model, 0.5)
    dead = weakref.ref(model)
    del model, inputs
    gc.collect()
    assert dead() is None


# -- a family added through the public adapter interface (issue 21, item 15) --------------------

def _tiny_internvl():
    from transformers import (InternVLConfig, InternVLForConditionalGeneration,
                              InternVLVisionConfig, Qwen2Config)
    vision = InternVLVisionConfig(image_size=112, patch_size=14, hidden_size=32,
                                  intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    text = Qwen2Config(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    cfg = InternVLConfig(vision_config=vision, text_config=text, image_token_id=tiny.IMAGE,
                         image_seq_length=16)  # 112 / 14 = 8, pixel shuffle 0.5: 4 x 4 per tile
    torch.manual_seed(0)
    return InternVLForConditionalGeneration(cfg).eval()


def _docs_example():
    """Runs the example of docs/integration.md as written (it registers InternVLAdapter) and
    returns the adapter; hf.register_adapter's docstring shows the same class."""
    import re
    blocks = re.findall(r"```python\n(.*?)```", open(os.path.join(ROOT, "docs", "integration.md"))
                        .read(), re.S)
    assert len(blocks) == 1
    namespace = {}
    exec(compile(blocks[0], "docs/integration.md", "exec"), namespace)
    body = blocks[0][blocks[0].index("class InternVLAdapter"):]
    for line in body.splitlines():
        assert line.strip() in hf.register_adapter.__doc__, line
    return namespace["InternVLAdapter"]


def test_register_adapter_adds_a_family():
    from transformers import InternVLForConditionalGeneration
    model = _tiny_internvl()
    ids = torch.tensor([[1, 5] + [tiny.IMAGE] * 32 + [9, 6]])  # one image of two tiles
    inputs = {"input_ids": ids, "pixel_values": torch.randn(2, 3, 112, 112,
                                                             generator=torch.Generator().manual_seed(1))}
    with hf.apply(model, 4):  # the built-in adapter (hf/internvl.py) until then
        with pytest.raises(ValueError, match=r"2 tiles of tokens, but a thumbnail follows"):
            with torch.no_grad():
                model(**inputs)  # 32 tokens: not an image as InternVL's processor cuts it
    adapter = _docs_example()  # registers it
    assert hf.register_adapter(InternVLForConditionalGeneration, adapter) is adapter
    try:
        with torch.no_grad():
            plain = model(**inputs, output_hidden_states=True)
        with hf.apply(model, 4) as pruner:  # layer 2: features enter decoder layer 2
            assert repr(pruner).startswith("Pruner(InternVLForConditionalGeneration, k=4")
            with torch.no_grad():
                logits = model(**inputs).logits
            assert logits.shape[1] == ids.shape[1] - 2 * 12
            assert [[len(k) for k in sample] for sample in pruner.kept] == [[4, 4]]
            assert pruner.grids == [[(4, 4), (4, 4)]]
            features = plain.hidden_states[2][0]
            for i, start in enumerate((2, 18)):
                want = d2p.prune(features[start:start + 16], pruner.importance[0][i], (4, 4), 4)
                assert torch.equal(pruner.kept[0][i], want.cpu())
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
            assert out.shape[1] == ids.shape[1] + 2
        with pytest.raises(ValueError, match=r"InternVL: where='llm' only"):
            hf.apply(model, 4, where="vision")
        with hf.apply(model, 1.0):  # keep-all: the unpruned model, exactly
            with torch.no_grad():
                assert torch.equal(model(**inputs).logits, plain.logits)
        prior = hf.calibrate_prior(model, [inputs], progress=False)
        assert prior.grid == (4, 4) and prior.count == 2
    finally:
        assert hf.register_adapter(InternVLForConditionalGeneration, None) is adapter
    with hf.apply(model, 4):  # unregistered: the built-in one again
        with pytest.raises(ValueError, match=r"2 tiles of tokens, but a thumbnail follows"):
            with torch.no_grad():
                model(**inputs)


def test_register_adapter_refuses_what_is_not_a_model_class_or_an_adapter():
    from transformers import InternVLForConditionalGeneration
    with pytest.raises(TypeError, match=r"model_class must be a torch.nn.Module subclass"):
        hf.register_adapter(_tiny_internvl(), hf.LlavaAdapter)
    with pytest.raises(TypeError, match=r"model_class must be a torch.nn.Module subclass"):
        hf.register_adapter("InternVLForConditionalGeneration", hf.LlavaAdapter)
    with pytest.raises(TypeError, match=r"adapter must be a subclass of "
                       r"d2pruner_kernels.hf.Adapter \(or None"):
        hf.register_adapter(InternVLForConditionalGeneration, lambda model: None)
    with pytest.raises(TypeError, match=r"adapter must be a subclass"):
        hf.register_adapter(InternVLForConditionalGeneration, hf.LlavaAdapter(llava()))
    assert hf.register_adapter(InternVLForConditionalGeneration, None) is None


def test_each_built_in_class_has_one_adapter_whatever_the_table_order(monkeypatch):
    from d2pruner_kernels.hf import _pruner
    want = {"LlavaForConditionalGeneration": "LlavaAdapter",
            "Qwen2VLForConditionalGeneration": "Qwen2VLAdapter",
            "Qwen2_5_VLForConditionalGeneration": "QwenVideoAdapter",
            "LlavaNextForConditionalGeneration": "LlavaNextAdapter",
            "LlavaOnevisionForConditionalGeneration": "LlavaOnevisionAdapter",
            "InternVLForConditionalGeneration": "InternVLAdapter",
            "Qwen3VLForConditionalGeneration": "Qwen3VLAdapter",
            "Qwen3VLMoeForConditionalGeneration": "Qwen3VLAdapter",
            "Qwen3_5ForConditionalGeneration": "Qwen3_5Adapter",
            "Qwen3_5MoeForConditionalGeneration": "Qwen3_5Adapter",
            "Gemma3ForConditionalGeneration": "Gemma3Adapter"}
    named = [(name, a.__name__) for a in _pruner.ADAPTERS for name in a.model_classes]
    assert len(named) == len(set(dict(named))) and dict(named) == want
    model = tiny.tiny_qwen2_vl(layers=2, v2_5=True)  # Qwen2VLAdapter's family, not its class
    sub = type("MyQwen", (type(model),), {})
    for order in (_pruner.ADAPTERS, _pruner.ADAPTERS[::-1]):
        monkeypatch.setattr(_pruner, "ADAPTERS", order)
        assert type(_pruner._adapter(model)) is hf.QwenVideoAdapter
        model.__class__ = sub  # a subclass: the nearest named class in its MRO
        assert type(_pruner._adapter(model)) is hf.QwenVideoAdapter
        model.__class__ = sub.__mro__[1]
        assert type(_pruner._adapter(qwen())) is hf.Qwen2VLAdapter


# -- what docs/integration.md says users will meet (issue 21, item 14) ---------------------------

def test_generate_without_a_cache_prunes_at_every_step():
    model = llava()
    inputs = tiny.llava_inputs(model, [[5, 6], [7]])
    with hf.apply(model, 64) as pruner:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False)
            last = [k.clone() for sample in pruner.kept for k in sample]
            # the same as three pruned prefills, each over the whole sequence so far
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
            for _ in range(3):
                logits = model(input_ids=ids, attention_mask=mask,
                               pixel_values=inputs["pixel_values"], use_cache=False).logits
                ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                step = [k.clone() for sample in pruner.kept for k in sample]
            assert torch.equal(ids, out)
            assert all(torch.equal(a, b) for a, b in zip(step, last))
            # the final step's prefill read the attention of a generated token, not the
            # prompt's last one: its selection differs from the cached run's
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
            assert any(not torch.equal(a, b) for a, b in
                       zip(last, [k for sample in pruner.kept for k in sample]))


@pytest.mark.parametrize("expand", [{"num_beams": 3, "num_return_sequences": 2},
                                    {"do_sample": True, "num_return_sequences": 2}])
def test_beams_and_returned_sequences_give_one_kept_entry_per_expanded_row(expand):
    model = llava()
    inputs = tiny.llava_inputs(model, [[5, 6], [7]])
    with hf.apply(model, 64) as pruner:
        with torch.no_grad():
            model(**inputs)
            per_sample = pruner.kept
            torch.manual_seed(0)
            model.generate(**inputs, max_new_tokens=2, **expand)
    n = expand.get("num_beams", expand["num_return_sequences"])
    assert len(pruner.kept) == 2 * n
    for b in range(2):
        for j in range(n):
            assert torch.equal(pruner.kept[b * n + j][0], per_sample[b][0])


# -- misuse found at the prefill -----------------------------------------------------------------

def test_an_int_k_above_an_images_tokens_keeps_that_image_whole():
    # Qwen's token count depends on the image: an int k means "at most k" (docs/spec.md)
    model = qwen()
    inputs = tiny.qwen_inputs(model, [[(16, 16)], [(16, 16), (8, 8)]])  # 64, 64 and 16 tokens
    with hf.apply(model, 32) as pruner:
        with torch.no_grad():
            model(**inputs)
    assert [[len(kept) for kept in sample] for sample in pruner.kept] == [[32], [32, 16]]
    assert torch.equal(pruner.kept[1][1].cpu(), torch.arange(16))


def test_image_tokens_that_do_not_match_their_grid_raise():
    model = llava()
    ids = torch.tensor([[1] + [tiny.IMAGE] * 575 + [9, 5]])  # placeholders, no pixels
    with hf.apply(model, 64):
        with pytest.raises(ValueError, match=r"sample 0: 575 image tokens at positions 1..575 "
                           r"are not a whole number of images of 576 tokens \(grid 24x24\)"):
            with torch.no_grad():
                model(input_ids=ids)
    model = qwen()
    ids = torch.tensor([[1, tiny.VISION_START] + [tiny.IMAGE] * 12 + [tiny.VISION_END, 5]])
    with hf.apply(model, 0.5):
        with pytest.raises(ValueError, match=r"sample 0 has image tokens but the language "
                           r"model got no M-RoPE position ids \[3, B, L\]: pass image_grid_thw"):
            with torch.no_grad():
                model(input_ids=ids)  # no image_grid_thw: text positions
        line = torch.arange(ids.shape[1]).expand(3, 1, -1)  # a line, not a grid
        with pytest.raises(ValueError, match=r"sample 0, image 0: its 12 tokens at positions "
                           r"2..13 do not form a \(t, h, w\) grid in their M-RoPE positions"):
            with torch.no_grad():
                model(input_ids=ids, position_ids=line)


# -- calibrate_prior -----------------------------------------------------------------------------

def test_calibrate_prior_averages_the_rows_apply_uses():
    model = llava()
    batches = [tiny.llava_inputs(model, [[5, 6], [7]], seed=1),
               tiny.llava_inputs(model, [[8, 9, 10]], seed=2)]
    rows = ref.importance_rows(model, batches, 64)
    prior = hf.calibrate_prior(model, batches, progress=False)
    assert (prior.layer, prior.query) == (1, "last") and len(rows) == 3
    ref.assert_prior_is_the_mean(prior, (24, 24), rows)
    with hf.apply(model, 64, prior=prior) as pruner:  # and it is usable right away
        with torch.no_grad():
            model(**batches[1])
        assert pruner.kept[0][0].numel() == 64

    vision = hf.calibrate_prior(model, batches, where="vision", progress=False)
    assert (vision.grid, vision.count, vision.layer, vision.query) == ((24, 24), 3, 0, "cls")
    rows = []
    with hf.apply(model, 64, where="vision") as pruner:
        for batch in batches:
            with torch.no_grad():
                model(**batch)
            rows += [r for sample in pruner.importance for r in sample]
    torch.testing.assert_close(vision.mean, torch.stack(rows).double().mean(0),
                               rtol=1e-6, atol=1e-12)


def test_calibrate_prior_refuses_or_resamples_mixed_grids():
    model = qwen()
    batches = [tiny.qwen_inputs(model, [[(16, 16)], [(12, 20)]])]
    with pytest.raises(ValueError, match=r"image 1 has grid \(1, 6, 10\) but the first image "
                       r"has \(1, 8, 8\): pass grid=\.\.\. to resample"):
        hf.calibrate_prior(model, batches, progress=False)
    prior = hf.calibrate_prior(model, batches, grid=(8, 8), progress=False)
    assert prior.grid == (8, 8) and prior.count == 2
    with hf.apply(model, 0.25) as pruner:
        with torch.no_grad():
            model(**batches[0])
        first, second = pruner.importance[0][0], pruner.importance[1][0]
    second = torch.nn.functional.interpolate(second.double().view(1, 1, 6, 10), size=(8, 8),
                                             mode="bilinear", align_corners=False).flatten()
    torch.testing.assert_close(prior.mean, (first.double() + second) / 2, rtol=1e-6,
                               atol=1e-12)
    with pytest.raises(ValueError, match=r"the batches held no image"):
        hf.calibrate_prior(model, [tiny.qwen_inputs(model, [[]])], progress=False)


# -- draw_kept -----------------------------------------------------------------------------------

def test_draw_kept_dims_what_was_pruned():
    pytest.importorskip("PIL")
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (96, 64, 3), generator=g, dtype=torch.uint8).numpy()
    kept = torch.tensor([0, 5, 11])  # grid 4 x 3 (rows of 24 px, columns of ~21 px)
    out = hf.draw_kept(Image.fromarray(pixels), kept, (4, 3))
    assert out.size == (64, 96)
    a = torch.from_numpy(__import__("numpy").asarray(out).copy())
    src = torch.from_numpy(pixels)
    assert torch.equal(a[5:20, 5:16], src[5:20, 5:16])          # cell 0: kept, untouched
    assert not torch.equal(a[5:20, 26:37], src[5:20, 26:37])    # cell 1: pruned, dimmed
    assert (a[5:20, 26:37].float().mean() < src[5:20, 26:37].float().mean())
    frames = hf.draw_kept([pixels, pixels], torch.tensor([0, 12]), (2, 4, 3))
    assert frames.size == (128, 96)
    tensor = hf.draw_kept(torch.rand(3, 48, 48), [1, 2], (2, 2))
    assert tensor.size == (48, 48)
    with pytest.raises(ValueError, match=r"kept indices must be in \[0, 12\)"):
        hf.draw_kept(pixels, [12], (4, 3))
    with pytest.raises(ValueError, match=r"grid \(2, 4, 3\) has 2 frames"):
        hf.draw_kept(pixels, [0], (2, 4, 3))


# -- packaging -----------------------------------------------------------------------------------

def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_the_core_package_never_imports_transformers():
    r = _run("import sys, d2pruner_kernels as d; d.prune, d.attention_scores, d.PositionalPrior;"
             "print('transformers' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
    r = _run("import sys; sys.modules['transformers'] = None\n"
             "from d2pruner_kernels import hf")
    assert r.returncode != 0
    assert "pip install 'd2pruner_kernels[hf]'" in r.stderr


def test_the_example_runs():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "llava_generate.py"),
                        "--new-tokens", "4"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "pruned   [582, 582, 70, 70]" in r.stdout
    assert "kept 64 of 576 image tokens" in r.stdout


def test_apply_takes_a_pruneoptions_object():
    """hf.apply(model, k, options=PruneOptions(...)) as prune() does; keywords and `prior`
    win over its fields; one object reaches prune()."""
    model = llava()
    opts = d2p.PruneOptions(spatial_weight=0.5, sim_threshold=0.6, radius=1)
    with hf.apply(model, 64, options=opts) as pruner:
        assert pruner.options == opts
    with hf.apply(model, 64, options=opts, radius=3) as pruner:
        assert pruner.options == opts.replace(radius=3)
    with pytest.raises(TypeError, match=r"options must be a PruneOptions, got dict"):
        hf.apply(model, 64, options={"radius": 1})
