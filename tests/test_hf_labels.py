"""d2pruner_kernels.hf: a pruned forward given labels= (issue 21, item 13). The logits
cover the kept sequence, so the labels are gathered at the kept positions and the loss is
the model's causal-LM loss on the kept sequence; held to a loss computed here from the
independent references of test_hf_llm.py (every layer on the full sequence, pruned keys
hidden) and test_hf_vision.py (the unpruned model fed the shortened prompt)."""
import pytest

pytest.importorskip("transformers", reason="the hf extra is not installed: "
                    "pip install 'transformers>=5.16.1,<6' -c <(echo torch==2.13.0)")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from d2pruner_kernels import hf  # noqa: E402
from d2pruner_kernels.hf import tiny  # noqa: E402

import test_hf_llm as llm  # noqa: E402
import test_hf_vision as vis  # noqa: E402


def causal_loss(logit_rows, label_rows):
    """Mean next-token cross-entropy over samples' (logits [n, V], labels [n]), -100 ignored."""
    logits = torch.cat([lg[:-1] for lg in logit_rows])
    labels = torch.cat([lb[1:] for lb in label_rows])
    return F.cross_entropy(logits.float(), labels, ignore_index=-100)


def labels_of(inputs):
    """The prompt as labels, -100 at padding and at each sample's first token (so that no
    padding position's logits, whatever an implementation puts there, enter the loss)."""
    return inputs["input_ids"].masked_fill(inputs["attention_mask"].cumsum(1) <= 1, -100)


@pytest.mark.parametrize("family", llm.FAMILIES)
def test_llm_loss_is_the_kept_sequence_loss(family):
    model = llm.model_for(family)
    inputs, samples = llm.batched(family, model)
    if samples:
        inputs = llm.fix_pixels(inputs, samples)
    labels = labels_of(inputs)
    with torch.no_grad():
        base = model(**inputs, labels=labels)
    with hf.apply(model, 576 if family == "llava" else 1.0):  # keep-all: the model's loss
        with torch.no_grad():
            assert torch.equal(model(**inputs, labels=labels).loss, base.loss)
    with hf.apply(model, llm.budget(family)) as pruner:
        with torch.no_grad():
            out = model(**inputs, labels=labels)
            plain = model(**inputs)
        kept = pruner.kept
    assert torch.equal(out.logits, plain.logits)
    keep = llm.keep_mask(family, model, inputs, kept)
    assert not bool(keep.all())  # it pruned (the sample without images keeps its length)
    _, ref_logits = llm.reference(model, inputs, keep, steps=1)
    want = causal_loss([ref_logits[0][b, keep[b]] for b in range(len(keep))],
                       [labels[b, keep[b]] for b in range(len(keep))])
    torch.testing.assert_close(out.loss, want, rtol=1e-4, atol=1e-5)
    tup = None
    with hf.apply(model, llm.budget(family)):
        with torch.no_grad():
            tup = model(**inputs, labels=labels, return_dict=False)
    assert torch.equal(tup[0], out.loss)


def test_vision_loss_is_the_shortened_prompt_loss():
    model = vis.model_for()
    inputs = tiny.llava_inputs(model, [[5, 6, 7], [8]], images_per_sample=[1, 2])
    labels = labels_of(inputs)
    kept, feats, _ = vis.vision_selection(vis.model_for("eager"), inputs["pixel_values"])
    embeds, mask, pos = vis.shortened(model, inputs, kept, feats)
    with torch.no_grad():
        ref = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits
    short_ids = torch.full(mask.shape, tiny.PAD)  # the shortened prompt's tokens
    for b in range(len(mask)):
        row = [t for t in inputs["input_ids"][b].tolist() if t != tiny.PAD]
        out, i = [], 0
        while i < len(row):
            if row[i] == tiny.IMAGE:
                out += [tiny.IMAGE] * vis.K
                i += vis.N
            else:
                out.append(row[i])
                i += 1
        short_ids[b, mask.shape[1] - len(out):] = torch.tensor(out)
    short_labels = short_ids.masked_fill(mask.cumsum(1) <= 1, -100)
    want = causal_loss(list(ref), list(short_labels))
    with hf.apply(model, vis.K, where="vision"):
        with torch.no_grad():
            out = model(**inputs, labels=labels)
    torch.testing.assert_close(out.loss, want, rtol=1e-4, atol=1e-5)
