"""The lmms-eval entries (d2pruner_kernels.lmms_eval_models) end to end through lmms-eval's
own command line (`python -m lmms_eval`, a subprocess, offline), on tiny random models saved
to a temporary folder and the tiny local task of tests/lmms_task (four questions, a picture
drawn from each row's seed, exact match).

Needs lmms-eval (the `lmms` extra, its own venv: .ci/lmms_eval.sh). Skipped where it is not
installed, unless D2PRUNER_REQUIRE_LMMS=1 (as .ci/lmms_eval.sh sets), which turns the skip
into a failure.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if importlib.util.find_spec("lmms_eval") is None:
    if os.environ.get("D2PRUNER_REQUIRE_LMMS") == "1":
        raise ImportError("D2PRUNER_REQUIRE_LMMS=1 but lmms_eval is not importable")
    pytest.skip("lmms-eval not installed (the `lmms` extra: .ci/lmms_eval.sh)",
                allow_module_level=True)

sys.path.insert(0, HERE)
import vllm_helper as tiny  # noqa: E402  the tiny LLaVA / Qwen2.5-VL / Qwen3-VL and tokenizers

# (seed, width, height): Qwen2.5-VL sees 8 x 8 = 64 merged tokens (224 x 224) or 10 x 6 = 60
# (280 x 168); LLaVA's processor makes every picture 336 x 336, 576 tokens
PICTURES = [(11, 224, 224), (12, 280, 168), (13, 224, 224), (14, 280, 168)]
QUESTIONS = ["t5 t6 t7", "t8 t10", "t13 t14 t15 t16", "t17 t18"]
LLAVA_TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}"
                  "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}{% endif %}"
                  "{% endfor %}{% endfor %}")
QWEN_PIXELS = f"min_pixels={28 * 28 * 4},max_pixels={280 * 280}"  # pictures kept at their size


def build_llava(root: str) -> str:
    from transformers import CLIPImageProcessor, LlavaProcessor
    d = os.path.join(root, "llava")
    tiny.tiny_llava().save_pretrained(d)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 336},
                                         crop_size={"height": 336, "width": 336})
    LlavaProcessor(image_processor=image_processor, tokenizer=tiny._tokenizer(), patch_size=14,
                   vision_feature_select_strategy="default", image_token="<image>",
                   num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE
                   ).save_pretrained(d)
    return d


INTERNVL_TEMPLATE = LLAVA_TEMPLATE.replace("<image>", "<IMG_CONTEXT>")


def build_internvl(root: str) -> str:
    """hf/tiny.py's InternVL (112-px tiles of 4 x 4 tokens, a thumbnail), weights of a
    visible scale (distinct greedy tokens), a word-level tokenizer and InternVL's processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor,
                              PreTrainedTokenizerFast)
    from d2pruner_kernels.hf import tiny as hft
    d = os.path.join(root, "internvl")
    model = tiny.visible(None, hft.tiny_internvl())
    model.save_pretrained(d)
    special = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": hft.PAD, "<IMG_CONTEXT>": hft.IMAGE,
               "<img>": hft.VISION_START, "</img>": hft.VISION_END, "<video>": hft.VIDEO}
    vocab = {f"t{i}": i for i in range(hft.VOCAB) if i not in special.values()}
    words = Tokenizer(models.WordLevel({**vocab, **special}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=words, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", extra_special_tokens={
            "start_image_token": "<img>", "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    InternVLProcessor(image_processor=GotOcr2ImageProcessor(crop_to_patches=True,
                                                            size={"height": 112, "width": 112}),
                      tokenizer=tok, video_processor=InternVLVideoProcessor(),
                      image_seq_length=16, chat_template=INTERNVL_TEMPLATE).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The models and the task's data file (the runs' working directory)."""
    root = str(tmp_path_factory.mktemp("lmms"))
    build_llava(root)
    build_internvl(root)
    tiny.build_qwen(root)    # root/qwen25
    tiny.build_qwen3(root)   # root/qwen3
    with open(os.path.join(root, "data.jsonl"), "w") as f:
        for i, ((seed, w, h), q) in enumerate(zip(PICTURES, QUESTIONS)):
            f.write(json.dumps({"id": i, "seed": seed, "width": w, "height": h,
                                "question": q, "answer": "t9"}) + "\n")
    return root


def run(work: str, runs: dict) -> dict:
    """`python -m lmms_eval` on the tiny task for each run {name: (model, model_args,
    batch_size)}, the runs side by side (each is mostly Python start-up on one core): per
    run, the results and the logged samples by doc id."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=os.path.join(work, "hf"), TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    procs = {}
    for name, (model, model_args, batch_size) in runs.items():
        cmd = [sys.executable, "-m", "lmms_eval", "--model", model, "--model_args", model_args,
               "--tasks", "d2p_tiny", "--include_path", os.path.join(HERE, "lmms_task"),
               "--batch_size", str(batch_size), "--log_samples", "--output_path",
               os.path.join(work, "out", name), "--verbosity", "WARNING"]
        procs[name] = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)
    logs = {name: p.communicate(timeout=300)[0] for name, p in procs.items()}
    out = {}
    for name, log in logs.items():
        # lmms-eval logs an error and exits 0: the files it writes are the evidence
        assert procs[name].returncode == 0, log[-6000:]
        found = {kind: glob.glob(os.path.join(work, "out", name, "**", pattern), recursive=True)
                 for kind, pattern in (("results", "*_results.json"),
                                       ("samples", "*_samples_d2p_tiny.jsonl"))}
        assert all(len(f) == 1 for f in found.values()), (name, found, log[-6000:])
        with open(found["results"][0]) as f:
            res = json.load(f)
        with open(found["samples"][0]) as f:
            rows = [json.loads(line) for line in f]
        out[name] = {"results": res, "samples": {r["doc_id"]: r for r in rows}}
    return out


def check_scored(r: dict) -> None:
    score = r["results"]["results"]["d2p_tiny"]["exact_match,none"]
    assert 0.0 <= score <= 1.0
    assert sorted(r["samples"]) == [0, 1, 2, 3]
    for s in r["samples"].values():
        assert s["exact_match"] in (0.0, 1.0)


def logged(r: dict, doc_id: int) -> dict:
    (counts,) = r["samples"][doc_id]["token_counts"]
    return counts


def answers(r: dict) -> dict:
    return {i: s["filtered_resps"] for i, s in r["samples"].items()}


def check_pruned(r: dict, k, visual: list, rows: int) -> None:
    """Each sample logged its picture's tokens before and after (k, or all for k=None), the
    prefill time of its batch and that batch's rows."""
    check_scored(r)
    for i, n in enumerate(visual):
        c = logged(r, i)
        assert c["visual_tokens"] == [n], (i, c)
        assert c["visual_tokens_kept"] == [n if k is None else k], (i, c)
        assert c["prefill_s"] > 0 and c["prefill_rows"] == rows, (i, c)
        assert c["input_tokens"] > n and c["output_tokens"] >= 0, (i, c)


def test_llava_pruned_batched_and_keep_all_equals_base(work):
    d = os.path.join(work, "llava")
    base = f"pretrained={d},device=cpu,device_map=cpu,dtype=float32"
    r = run(work, {"llava_pruned": ("d2pruner_llava_hf", f"{base},k=64,layer=1", 2),
                   "llava_keep_all": ("d2pruner_llava_hf", f"{base},k=1.0,layer=1", 1),
                   "llava_base": ("llava_hf", base, 1)})   # lmms-eval's llava_hf: batch size 1 only
    check_pruned(r["llava_pruned"], 64, [576] * 4, rows=2)
    check_pruned(r["llava_keep_all"], None, [576] * 4, rows=1)
    check_scored(r["llava_base"])
    assert any(answers(r["llava_base"]).values()), answers(r["llava_base"])  # not all empty
    assert answers(r["llava_keep_all"]) == answers(r["llava_base"])


def test_internvl_pruned_and_keep_all_equals_base(work):
    """lmms-eval's internvl_hf takes batch size 1, and does not pass image_sizes:
    d2pruner_internvl_hf adds them (hf.apply needs them for tiles). 224 x 224 makes 2 x 2
    tiles + a thumbnail (80 tokens), 280 x 168 3 x 2 + 1 (112); k per image."""
    base = f"pretrained={os.path.join(work, 'internvl')},device=cpu,device_map=cpu"
    r = run(work, {"internvl_pruned": ("d2pruner_internvl_hf", f"{base},k=8", 1),
                   "internvl_keep_all": ("d2pruner_internvl_hf", f"{base},k=1.0", 1),
                   "internvl_base": ("internvl_hf", base, 1)})
    check_pruned(r["internvl_pruned"], 8, [80, 112, 80, 112], rows=1)
    check_pruned(r["internvl_keep_all"], None, [80, 112, 80, 112], rows=1)
    check_scored(r["internvl_base"])
    assert any(answers(r["internvl_base"]).values()), answers(r["internvl_base"])
    assert answers(r["internvl_keep_all"]) == answers(r["internvl_base"])


def test_qwen_vl_pruned_batched_and_keep_all_equals_base(work):
    """Qwen2.5-VL pruned, kept whole and unpruned (lmms-eval's qwen2_5_vl), batch 2; Qwen3-VL
    pruned, batch 2."""
    d = os.path.join(work, "qwen25")
    base = f"pretrained={d},device=cpu,device_map=cpu,{QWEN_PIXELS}"
    qwen3 = f"pretrained={os.path.join(work, 'qwen3')},device=cpu,device_map=cpu,{QWEN_PIXELS}"
    r = run(work, {"pruned": ("d2pruner_qwen2_5_vl", f"{base},k=16,layer=1,spatial_weight=0.5",
                              2),
                   "keep_all": ("d2pruner_qwen2_5_vl", f"{base},k=1.0,layer=1", 2),
                   "base": ("qwen2_5_vl", base, 2),
                   "qwen3": ("d2pruner_qwen3_vl", f"{qwen3},k=12,layer=1", 2)})
    check_pruned(r["pruned"], 16, [64, 60, 64, 60], rows=2)
    check_pruned(r["keep_all"], None, [64, 60, 64, 60], rows=2)
    check_scored(r["base"])
    assert any(answers(r["base"]).values()), answers(r["base"])
    assert answers(r["keep_all"]) == answers(r["base"])
    # Qwen3-VL, patch 16: qwen_vl_utils and the processor round 224 x 224 to 7 x 7 merged
    # tokens, 280 x 168 to 288 x 160, 9 x 5
    check_pruned(r["qwen3"], 12, [49, 45, 49, 45], rows=2)


def test_model_args_parsed_and_bad_ones_named():
    """--model_args as lmms-eval parses them (its simple_parse_args_string: numbers and
    booleans converted, the rest strings): apply()'s arguments, or a ValueError naming the
    argument."""
    from lmms_eval.utils import simple_parse_args_string
    from d2pruner_kernels.lmms_eval_models import parse_prune_args
    from d2pruner_kernels.options import PruneOptions
    args = simple_parse_args_string("pretrained=x,k=64,layer=3,where=llm,sim_threshold=0.7,"
                                    "radius=3,check_finite=true,fusion=binarized,device=cpu")
    got = parse_prune_args(args)
    assert args == {"pretrained": "x", "device": "cpu"}  # the rest, for lmms-eval's class
    assert (got["k"], got["where"], got["layer"], got["prior"]) == (64, "llm", 3, None)
    assert got["options"] == PruneOptions(sim_threshold=0.7, radius=3, check_finite=True,
                                          fusion="binarized")
    assert parse_prune_args(simple_parse_args_string("k=0.25"))["k"] == 0.25
    assert parse_prune_args(simple_parse_args_string("k=1.0"))["k"] == 1.0  # keep all
    assert parse_prune_args(simple_parse_args_string("k=none"))["k"] is None
    for bad, name in (("k=0", "k"), ("k=1.5", "k"), ("k=many", "k"), ("layer=two", "layer"),
                      ("sim_threshold=high", "sim_threshold"), ("sim_threshold=2", "sim_threshold"),
                      ("radius=1.5", "radius"), ("check_finite=maybe", "check_finite"),
                      ("where=middle", "where"), ("fusion=sum", "fusion"),
                      ("prior=/nonexistent.safetensors", "prior")):
        with pytest.raises(ValueError, match=name):
            parse_prune_args(simple_parse_args_string(f"k=8,{bad}" if "k=" not in bad else bad))
    with pytest.raises(ValueError, match="needs k"):
        parse_prune_args({"pretrained": "x"})
