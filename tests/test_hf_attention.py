"""d2pruner_kernels.hf under a change of attention implementation after apply()
(`model.set_attn_implementation(...)`, which people do to read output_attentions from a
pruned model): the pruned model follows the implementation the model uses at call time, in
both directions, held to a pruner applied to a model built with that implementation from the
start (same weights; that one is held to the independent references of test_hf_llm.py and
test_hf_vision.py). An implementation the pruner cannot serve is refused at call time."""
import pytest

pytest.importorskip("transformers", reason="the hf extra is not installed: "
                    "pip install 'transformers>=5.16.1,<6' -c <(echo torch==2.13.0)")

import torch  # noqa: E402

from d2pruner_kernels import hf  # noqa: E402
from d2pruner_kernels.hf import tiny  # noqa: E402

STEPS = 3
CASES = [("llava", "llm"), ("qwen2_vl", "llm"), ("llava", "vision")]


def build(family, impl):
    if family == "llava":
        return tiny.tiny_llava(attn_implementation=impl)
    return tiny.tiny_qwen2_vl(attn_implementation=impl)


def inputs_for(family, model):
    if family == "llava":
        return tiny.llava_inputs(model, [[5, 6, 7], [8]], images_per_sample=[1, 2])
    return tiny.qwen_inputs(model, [[(16, 16)], [(12, 20), (8, 8)]], texts=[[5, 6, 7], [8]])


def budget(family, where):
    return 48 if family == "llava" else 0.25


def run(model, inputs, pruner, attentions=False):
    with torch.no_grad():
        out = model(**inputs, output_attentions=attentions)
        kept = pruner.kept
        gen = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    return out, kept, gen


@pytest.mark.parametrize("family, where", CASES)
@pytest.mark.parametrize("start, switch", [("sdpa", "eager"), ("eager", "sdpa")])
def test_switching_the_implementation_after_apply(family, where, start, switch):
    model = build(family, start)
    want_model = build(family, switch)  # same seed: same weights
    inputs = inputs_for(family, model)
    k = budget(family, where)
    with hf.apply(want_model, k, where=where) as ref:
        want, want_kept, want_gen = run(want_model, inputs, ref, attentions=switch == "eager")
    with hf.apply(model, k, where=where) as pruner:
        before, before_kept, _ = run(model, inputs, pruner)
        model.set_attn_implementation(switch)
        got, kept, gen = run(model, inputs, pruner, attentions=switch == "eager")
        assert want.logits.shape[1] < inputs["input_ids"].shape[1]  # it did prune
        for b in range(len(kept)):
            for mine, theirs in zip(kept[b], want_kept[b], strict=True):
                assert torch.equal(mine, theirs)
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(gen.sequences, want_gen.sequences)
        for a, b in zip(gen.logits, want_gen.logits, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        if switch == "eager":  # every layer's weights, the tapped one's included
            assert all(a is not None for a in got.attentions)
            for a, b in zip(got.attentions, want.attentions, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            if where == "vision":  # the tapped CLIP layer runs eager too
                with torch.no_grad():
                    clip = model.model.vision_tower(inputs["pixel_values"],
                                                    output_attentions=True).attentions
                assert len(clip) == 2 and all(a is not None for a in clip)
        model.set_attn_implementation(start)  # and back again: as before the first switch
        again, again_kept, _ = run(model, inputs, pruner)
        assert torch.equal(again.logits, before.logits)
        assert all(torch.equal(x, y) for b in range(len(kept))
                   for x, y in zip(again_kept[b], before_kept[b], strict=True))


def test_an_implementation_the_pruner_cannot_serve_is_refused_at_call_time():
    model = build("llava", "sdpa")
    inputs = inputs_for("llava", model)
    with hf.apply(model, 48) as pruner:
        model.set_attn_implementation("flex_attention")
        with pytest.raises(ValueError, match=r"attn_implementation='flex_attention'.*supports "
                                             r"sdpa, eager"):
            with torch.no_grad():
                model(**inputs)
        model.set_attn_implementation("sdpa")
        with torch.no_grad():
            model(**inputs)  # and it runs again once switched back
        assert pruner.kept is not None
