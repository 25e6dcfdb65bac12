"""d2pruner_kernels.hf: casting a pruned model (issue 21, the integration's contract, I6).
A model cast to bfloat16 after apply() prunes exactly as one cast before apply() (the hooks
and the tap travel with the modules); a model cast to float64, a dtype pruning does not
read, is refused at the call with a TypeError naming the dtype, and runs again once cast
back."""
import pytest

pytest.importorskip("transformers", reason="the hf extra is not installed: "
                    "pip install 'transformers>=5.16.1,<6' -c <(echo torch==2.13.0)")

import torch  # noqa: E402

from d2pruner_kernels import hf  # noqa: E402
from d2pruner_kernels.hf import tiny  # noqa: E402

CASES = [("llava", "llm"), ("llava", "vision"), ("qwen2_vl", "llm")]


def build(family):
    return tiny.tiny_llava() if family == "llava" else tiny.tiny_qwen2_vl()


def inputs_for(family, model, dtype):
    if family == "llava":
        inputs = tiny.llava_inputs(model, [[5, 6, 7], [8]], images_per_sample=[1, 2])
    else:
        inputs = tiny.qwen_inputs(model, [[(16, 16)], [(12, 20), (8, 8)]],
                                  texts=[[5, 6, 7], [8]])
    return dict(inputs, pixel_values=inputs["pixel_values"].to(dtype))


def forward(model, inputs, pruner):
    with torch.no_grad():
        logits = model(**inputs).logits
    return logits, pruner.kept


@pytest.mark.parametrize("family, where", CASES)
def test_cast_after_apply_is_cast_before_apply(family, where):
    k = 48 if family == "llava" else 0.25
    after, before = build(family), build(family)
    inputs = inputs_for(family, after, torch.bfloat16)
    with hf.apply(after, k, where=where) as pruner:
        after.to(torch.bfloat16)
        got, got_kept = forward(after, inputs, pruner)
    before.to(torch.bfloat16)
    with hf.apply(before, k, where=where) as pruner:
        want, want_kept = forward(before, inputs, pruner)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert all(torch.equal(a, b) for s, t in zip(got_kept, want_kept, strict=True)
               for a, b in zip(s, t, strict=True))

    model = build(family)
    with hf.apply(model, k, where=where) as pruner:
        model.to(torch.float64)
        part = "vision tower" if where == "vision" else "language model"
        with pytest.raises(TypeError, match=rf"the {part} runs in torch.float64; pruning "
                                            r"reads float16, bfloat16 or float32"):
            forward(model, inputs_for(family, model, torch.float64), pruner)
        model.to(torch.float32)
        forward(model, inputs_for(family, model, torch.float32), pruner)
        assert pruner.kept is not None
