"""d2pruner_kernels.hf: every integration state change survives an exception (issue 21,
"Also"). An exception inside generate() or a forward (an ordinary one, or a
KeyboardInterrupt, which torch's always_call hooks do not see) at any stage (the vision
tower, the importance layer, the pruned layers, a decoding step) leaves the pruned model
giving exactly what a fresh pruner gives; an exception inside the `with` block leaves the
model exactly as it was (hooks, configs, outputs bit for bit), for every family, mode and
attention implementation."""
import pytest

pytest.importorskip("transformers", reason="the hf extra is not installed: "
                    "pip install 'transformers>=5.16.1,<6' -c <(echo torch==2.13.0)")

import torch  # noqa: E402

from d2pruner_kernels import hf  # noqa: E402
from d2pruner_kernels.hf import tiny  # noqa: E402

LAYER = 2
CASES = [(family, where, impl) for family, where in
         [("llava", "llm"), ("llava", "vision"), ("qwen2_vl", "llm"), ("qwen2_5_vl", "llm")]
         for impl in ("sdpa", "eager")]


class Boom(Exception):
    pass


def build(family, impl):
    if family == "llava":
        return tiny.tiny_llava(attn_implementation=impl)
    return tiny.tiny_qwen2_vl(attn_implementation=impl, v2_5=family == "qwen2_5_vl")


def inputs_for(family, model):
    if family == "llava":
        return tiny.llava_inputs(model, [[5, 6, 7], [8]], images_per_sample=[1, 2])
    return tiny.qwen_inputs(model, [[(16, 16)], [(12, 20), (8, 8)]], texts=[[5, 6, 7], [8]])


def state(model):
    """Every hook of every module (all kinds), every module's config object and attention
    implementation, every attribute name of every module."""
    hooks = [tuple(len(getattr(m, name)) for name in
                   ("_forward_pre_hooks", "_forward_hooks", "_forward_hooks_with_kwargs",
                    "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs"))
             for m in model.modules()]
    configs = [(id(c), c._attn_implementation) for m in model.modules()
               if (c := getattr(m, "config", None)) is not None]
    names = [tuple(sorted(vars(m))) for m in model.modules()]
    return hooks, configs, names


def stages(family, where, model):
    """(name, module) where an exception is injected."""
    lm = model.model.language_model
    out = [("importance layer", lm.layers[LAYER - 1]), ("pruned layer", lm.layers[LAYER]),
           ("lm_head", model.lm_head)]
    tower = model.model.vision_tower if family == "llava" else model.model.visual
    return [("vision tower", tower)] + out


def raising(module, exc, at_call):
    calls = {"n": 0}

    def hook(mod, args, output):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise exc
    return module.register_forward_hook(hook)


def lm_call(model, embeds):
    """The language model called directly (no outer model: nothing to prune)."""
    with torch.no_grad():
        return model.model.language_model(inputs_embeds=embeds, use_cache=False)[0]


def generate(model, inputs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=3, do_sample=False,
                              output_logits=True, return_dict_in_generate=True)


@pytest.mark.parametrize("family, where, impl", CASES)
def test_an_exception_leaves_the_model_as_it_was(family, where, impl):
    model = build(family, impl)
    inputs = inputs_for(family, model)
    k = 48 if family == "llava" else 0.25
    with torch.no_grad():
        unpruned = model(**inputs).logits
    generate(model, inputs)  # transformers adds its own hooks lazily, at the first calls
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    lm_want = lm_call(model, embeds)
    before = state(model)
    with hf.apply(model, k, where=where) as pruner:
        with torch.no_grad():
            want = model(**inputs).logits
        want_kept = pruner.kept
        want_gen = generate(model, inputs)
    for name, module in stages(family, where, model):
        for exc in (Boom("injected"), KeyboardInterrupt()):
            # at the prefill, and (lm_head) at a decoding step
            for at_call in ((1, 2) if name == "lm_head" else (1,)):
                with pytest.raises(type(exc)):
                    with hf.apply(model, k, where=where) as pruner:
                        with torch.no_grad():
                            assert torch.equal(model(**inputs).logits, want)
                        handle = raising(module, exc, at_call)
                        try:
                            generate(model, inputs)
                        finally:
                            handle.remove()
                        raise AssertionError("no exception")
                assert state(model) == before, (name, exc, at_call)
                with torch.no_grad():
                    assert torch.equal(model(**inputs).logits, unpruned), (name, at_call)
            # and inside the with block, the pruner still gives what a fresh one gives
            with hf.apply(model, k, where=where) as pruner:
                handle = raising(module, KeyboardInterrupt(), 1)
                with pytest.raises(KeyboardInterrupt):
                    generate(model, inputs)
                handle.remove()
                with torch.no_grad():
                    assert torch.equal(model(**inputs).logits, want), name
                assert all(torch.equal(a, b) for s, t in zip(pruner.kept, want_kept)
                           for a, b in zip(s, t, strict=True))
                got = generate(model, inputs)
                assert torch.equal(got.sequences, want_gen.sequences), name
            # a direct language-model call after a failed forward is not pruned with the
            # failed forward's placeholders
            with hf.apply(model, k, where=where):
                handle = raising(module, Boom("injected"), 1)
                with pytest.raises(Boom):
                    with torch.no_grad():
                        model(**inputs)
                handle.remove()
                with torch.no_grad():
                    direct = lm_call(model, embeds)
            assert torch.equal(direct, lm_want), name
    assert state(model) == before
