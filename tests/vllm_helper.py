"""Helpers of tests/test_vllm.py, also a script (vLLM spawns its engine: everything that
starts one runs in a subprocess under a `__main__` guard).

    python tests/vllm_helper.py build DIR        a tiny random LLaVA (+ a tiny Llama) in DIR
    python tests/vllm_helper.py run DIR OUT      starts one engine (pruning as the
                                                 environment says), runs PROMPTS, writes OUT
    python tests/vllm_helper.py start DIR        only starts an engine (misuse tests)

The tiny LLaVA: CLIP 336/14 (576 patches, 2 layers, width 64, head size 32; the feature
layer -2 is layer 0) and a 2-layer Llama of width 128 (head size 32: vLLM's CPU attention
refuses 16), vocabulary 160, image token 150, a word-level tokenizer ("t5" is token 5).
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

VOCAB, BOS, PAD, IMAGE = 160, 1, 3, 150
N = 576
# (prompt tokens with one IMAGE token per image, image seeds); images differ everywhere
PROMPTS = {
    "single": ([BOS, IMAGE, 9, 5, 6, 7], [11]),
    "batch_a": ([BOS, IMAGE, 9, 8, 10], [12]),
    "batch_b": ([BOS, IMAGE, 9, 13, 14, 15, 16], [13]),
    "two_images": ([BOS, IMAGE, 9, IMAGE, 9, 17, 18], [14, 15]),
}
BATCHES = [["single"], ["batch_a", "batch_b"], ["two_images"]]
MAX_TOKENS = 8


def tiny_llava(seed: int = 0):
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration)
    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=64,
                              intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              projection_dim=64)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=4096, bos_token_id=BOS, pad_token_id=PAD,
                       eos_token_id=2)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE,
                      image_seq_length=N, vision_feature_layer=-2,
                      vision_feature_select_strategy="default")
    return visible(LlavaForConditionalGeneration, cfg, seed)


def visible(model_class, cfg, seed: int = 0):
    """A random model of `cfg` (sdpa) whose matrices are drawn at a visible scale (0.08):
    distinct, stable greedy tokens on tiny models; model_class None: `cfg` is a model."""
    import torch
    if model_class is None:
        model = cfg
    else:
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(seed)
        model = model_class(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    return model


def image(seed: int):
    """A 336 x 336 RGB picture: smooth random colour blobs (stable under resampling)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(7, 7, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((336, 336), Image.BICUBIC)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"t{i}": i for i in range(VOCAB)}
    vocab.update({"<unk>": 0, "<s>": BOS, "</s>": 2, "<pad>": PAD, "<image>": IMAGE})
    vocab = {w: i for w, i in vocab.items() if not (w.startswith("t") and w[1:].isdigit()
                                                    and int(w[1:]) in (0, 1, 2, 3, IMAGE))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>",
                                   extra_special_tokens={"image_token": "<image>"})


def build(root: str) -> None:
    """DIR/llava (the tiny LLaVA, its tokenizer and processor) and DIR/llama (a tiny text
    model, for the unsupported-model test)."""
    import torch
    from safetensors.torch import save_file
    from transformers import (CLIPImageProcessor, LlamaConfig, LlamaForCausalLM,
                              LlavaProcessor)
    llava_dir = os.path.join(root, "llava")
    model = tiny_llava()
    model.save_pretrained(llava_dir)
    # vLLM's LLaVA loader expects vision_tower.vision_model.*: rename the saved keys
    state = {}
    for name, t in model.state_dict().items():
        if ".vision_tower." in name or name.startswith("vision_tower."):
            prefix, rest = name.split("vision_tower.", 1)
            if not rest.startswith("vision_model."):
                name = f"{prefix}vision_tower.vision_model.{rest}"
        state[name] = t.contiguous()
    for f in os.listdir(llava_dir):
        if f.endswith(".safetensors") or f.endswith(".safetensors.index.json"):
            os.remove(os.path.join(llava_dir, f))
    save_file(state, os.path.join(llava_dir, "model.safetensors"), metadata={"format": "pt"})
    tok = _tokenizer()
    proc = CLIPImageProcessor(size={"shortest_edge": 336},
                              crop_size={"height": 336, "width": 336})
    LlavaProcessor(image_processor=proc, tokenizer=tok, patch_size=14,
                   vision_feature_select_strategy="default", image_token="<image>",
                   num_additional_image_tokens=1).save_pretrained(llava_dir)
    llama_dir = os.path.join(root, "llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256,
                                 num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2, bos_token_id=BOS, eos_token_id=2)
                     ).save_pretrained(llama_dir)
    tok.save_pretrained(llama_dir)


def engine(model_dir: str):
    from vllm import LLM
    return LLM(model=model_dir, dtype="float32", max_model_len=2048, max_num_seqs=4,
               limit_mm_per_prompt={"image": 2}, enforce_eager=True, seed=0,
               enable_prefix_caching=False)


def run(model_dir: str, out: str) -> None:
    """One engine, every batch of PROMPTS: the generated tokens, the placeholder count of
    each prompt and the kept indices the plugin recorded (D2PRUNER_VLLM_RECORD) per batch."""
    import time

    from vllm import SamplingParams
    record = os.environ.get("D2PRUNER_VLLM_RECORD")
    t0 = time.perf_counter()
    llm = engine(model_dir)
    started = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    result = {"start_s": started, "prompts": {}, "kept": []}
    generate_batches(llm, params, record, result, PROMPTS, image, IMAGE)
    if os.environ.get("D2PRUNER_VLLM_K"):
        request_budgets(llm, params, record, result, PROMPTS, image, IMAGE)
    with open(out, "w") as f:
        json.dump(result, f)


def generate_batches(llm, params, record, result, prompts, make_image, image_token) -> None:
    """Every batch of BATCHES through one engine, into result: each prompt's tokens,
    placeholder count and length, and per batch the kept indices the plugin recorded
    (D2PRUNER_VLLM_RECORD, read from where the batch began)."""
    for batch in BATCHES:
        offset = os.path.getsize(record) if record and os.path.exists(record) else 0
        requests = [{"prompt_token_ids": prompts[name][0],
                     "multi_modal_data": {"image": [make_image(s) for s in prompts[name][1]]}}
                    for name in batch]
        outs = llm.generate(requests, params, use_tqdm=False)
        for name, o in zip(batch, outs):
            result["prompts"][name] = {
                "tokens": list(o.outputs[0].token_ids),
                "placeholders": sum(1 for t in o.prompt_token_ids if t == image_token),
                "prompt_len": len(o.prompt_token_ids)}
        kept = []
        if record and os.path.exists(record):
            with open(record) as f:
                f.seek(offset)
                for line in f:
                    kept.extend(json.loads(line)["kept"])
        result["kept"].append(kept)


def start(model_dir: str) -> None:
    engine(model_dir)
    print("ENGINE STARTED")


# -- Qwen2.5-VL ------------------------------------------------------------------------------
# A tiny random Qwen2.5-VL: a 2-block vision tower (width 64, 2 heads of 32, window 112 px =
# 4 merged tokens, block 1 full attention), a 2-layer Qwen2 decoder of width 128 (head size
# 32, mrope_section [4, 6, 6]), vocabulary 160; images of 224 x 224 (8 x 8 merged tokens) and
# 168 x 280 (w x h: a tall 10 x 6).
Q_IMAGE, Q_VIDEO, Q_START, Q_END = 151, 152, 153, 154
Q_SIZES = {11: (224, 224), 12: (168, 280), 13: (224, 224), 14: (168, 280), 15: (224, 224)}
Q_PROMPTS = {
    "single": ([Q_START, Q_IMAGE, Q_END, 9, 5, 6, 7], [11]),
    "batch_a": ([Q_START, Q_IMAGE, Q_END, 9, 8, 10], [12]),
    "batch_b": ([Q_START, Q_IMAGE, Q_END, 9, 13, 14, 15, 16], [13]),
    "two_images": ([Q_START, Q_IMAGE, Q_END, 9, Q_START, Q_IMAGE, Q_END, 17, 18], [14, 15]),
}
Q_MERGED = {s: (w // 28) * (h // 28) for s, (w, h) in Q_SIZES.items()}


def tiny_qwen25(seed: int = 0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    text = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [4, 6, 6]},
                bos_token_id=BOS, eos_token_id=2, pad_token_id=PAD)
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
                  out_hidden_size=128, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1])
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=Q_IMAGE,
                           video_token_id=Q_VIDEO, vision_start_token_id=Q_START,
                           vision_end_token_id=Q_END)
    return visible(Qwen2_5_VLForConditionalGeneration, cfg, seed)


def q_image(seed: int, family: str = "qwen25"):
    """Image `seed` at Q_SIZES (Qwen2.5-VL, patch 14) or scaled to patch 16 (Qwen3-VL): the
    same merged grids either way."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(7, 7, 3), dtype=np.uint8)
    w, h = Q_SIZES[seed]
    if family == "qwen3":
        w, h = w // 28 * 32, h // 28 * 32
    return Image.fromarray(small).resize((w, h), Image.BICUBIC)


def tiny_qwen3(seed: int = 0):
    """A tiny random Qwen3-VL: a 2-block tower (patch 16, width 64, 2 heads, block 0 feeds
    DeepStack level 0), a 2-layer Qwen3 decoder of width 128 (head size 32, interleaved
    mrope_section [4, 6, 6])."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    text = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [4, 6, 6], "mrope_interleaved": True},
                bos_token_id=BOS, eos_token_id=2, pad_token_id=PAD)
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
                  out_hidden_size=128, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[0])
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=Q_IMAGE,
                        video_token_id=Q_VIDEO, vision_start_token_id=Q_START,
                        vision_end_token_id=Q_END)
    return visible(Qwen3VLForConditionalGeneration, cfg, seed)


def _q_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    special = {"<unk>": 0, "<s>": BOS, "</s>": 2, "<pad>": PAD, "<|image_pad|>": Q_IMAGE,
               "<|video_pad|>": Q_VIDEO, "<|vision_start|>": Q_START, "<|vision_end|>": Q_END}
    vocab = {f"t{i}": i for i in range(VOCAB) if i not in special.values()}
    vocab.update(special)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>",
                                   extra_special_tokens={"image_token": "<|image_pad|>",
                                                         "video_token": "<|video_pad|>",
                                                         "vision_start_token": "<|vision_start|>",
                                                         "vision_end_token": "<|vision_end|>"})


def q_image_processor(family: str = "qwen25"):
    from transformers import Qwen2VLImageProcessor
    patch = 16 if family == "qwen3" else 14
    return Qwen2VLImageProcessor(min_pixels=4 * (2 * patch) ** 2, max_pixels=512 * 512,
                                 patch_size=patch, merge_size=2, temporal_patch_size=2)


def build_qwen3(root: str) -> None:
    from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor
    d = os.path.join(root, "qwen3")
    tiny_qwen3().save_pretrained(d)
    tok = _q_tokenizer()
    tok.chat_template = Q_CHAT_TEMPLATE
    Qwen3VLProcessor(image_processor=q_image_processor("qwen3"), tokenizer=tok,
                     video_processor=Qwen3VLVideoProcessor(patch_size=16),
                     chat_template=Q_CHAT_TEMPLATE).save_pretrained(d)


def _family(model_dir: str) -> str:
    with open(os.path.join(model_dir, "config.json")) as f:
        return "qwen3" if json.load(f)["model_type"] == "qwen3_vl" else "qwen25"


def build_qwen(root: str) -> None:
    from transformers import Qwen2_5_VLProcessor, Qwen2VLVideoProcessor
    d = os.path.join(root, "qwen25")
    tiny_qwen25().save_pretrained(d)
    tok = _q_tokenizer()
    tok.chat_template = Q_CHAT_TEMPLATE
    Qwen2_5_VLProcessor(image_processor=q_image_processor(), tokenizer=tok,
                        video_processor=Qwen2VLVideoProcessor(),
                        chat_template=Q_CHAT_TEMPLATE).save_pretrained(d)


# the server's chat template: an image part becomes vision_start, image_pad, vision_end
Q_CHAT_TEMPLATE = ("{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}"
                   "{% else %}{% for c in m['content'] %}"
                   "{% if c['type'] in ['image', 'image_url'] %}"
                   "<|vision_start|><|image_pad|><|vision_end|>"
                   "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{% endfor %}")


def serve_qwen(model_dir: str, out: str, port: int) -> None:
    """The OpenAI-compatible server (module form) with the environment's settings: one chat
    request with image 11 and the text of Q_PROMPTS["single"]; writes its usage."""
    import base64
    import io
    import subprocess
    import time
    import urllib.request
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
           "--port", str(port), "--dtype", "float32", "--max-model-len", "2048",
           "--max-num-seqs", "4", "--enforce-eager", "--no-enable-prefix-caching",
           "--limit-mm-per-prompt", json.dumps({"image": 2, "video": 0})]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 300
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server exited ({server.returncode}):\n"
                                 f"{server.stderr.read()[-6000:]}")
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise SystemExit("the server did not start in 300 s") from None
                time.sleep(1)
        buf = io.BytesIO()
        q_image(11).save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        text = " ".join(f"t{t}" for t in Q_PROMPTS["single"][0][3:])
        body = {"model": model_dir, "max_tokens": 2, "temperature": 0.0,
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": text}]}]}
        req = urllib.request.Request(base + "/v1/chat/completions",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            reply = json.loads(r.read())
        with open(out, "w") as f:
            json.dump({"usage": reply["usage"]}, f)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def q_engine(model_dir: str):
    from vllm import LLM
    return LLM(model=model_dir, dtype="float32", max_model_len=2048, max_num_seqs=4,
               limit_mm_per_prompt={"image": 2, "video": 0}, enforce_eager=True, seed=0,
               enable_prefix_caching=False)


def run_qwen(model_dir: str, out: str) -> None:
    from vllm import SamplingParams
    record = os.environ.get("D2PRUNER_VLLM_RECORD")
    llm = q_engine(model_dir)
    family = _family(model_dir)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    result = {"prompts": {}, "kept": []}
    generate_batches(llm, params, record, result, Q_PROMPTS,
                     lambda seed: q_image(seed, family), Q_IMAGE)
    if os.environ.get("D2PRUNER_VLLM_K"):
        request_budgets(llm, params, record, result, Q_PROMPTS,
                        lambda seed: q_image(seed, family), Q_IMAGE)
    with open(out, "w") as f:
        json.dump(result, f)


BUDGETS = {"single": 8, "batch_a": 0.25}  # per-request k (mm_processor_kwargs), one batch


def request_budgets(llm, params, record, result, prompts, make_image, image_token) -> None:
    """Two requests with their own budgets (BUDGETS) in one batch, then one with a bad one."""
    offset = os.path.getsize(record) if record and os.path.exists(record) else 0
    requests = [{"prompt_token_ids": prompts[name][0],
                 "multi_modal_data": {"image": [make_image(s) for s in prompts[name][1]]},
                 "mm_processor_kwargs": {"d2pruner_k": k}} for name, k in BUDGETS.items()]
    outs = llm.generate(requests, params, use_tqdm=False)
    result["budgets"] = {name: {"tokens": list(o.outputs[0].token_ids),
                                "placeholders": sum(1 for t in o.prompt_token_ids
                                                    if t == image_token)}
                         for name, o in zip(BUDGETS, outs)}
    kept = []
    if record and os.path.exists(record):
        with open(record) as f:
            f.seek(offset)
            for line in f:
                kept.extend(json.loads(line)["kept"])
    result["budgets_kept"] = kept
    bad = dict(requests[0], mm_processor_kwargs={"d2pruner_k": 0})
    try:
        llm.generate([bad], params, use_tqdm=False)
        result["bad_request"] = None
    except Exception as e:  # noqa: BLE001 -- the test reads the type and the message
        result["bad_request"] = f"{type(e).__name__}: {e}"


def qwen_inputs(names, family: str = "qwen25") -> dict:
    """Q_PROMPTS `names` as the processor gives them, one batch: each image's placeholder
    repeated t * h * w / 4 times, left padding, mm_token_type_ids 1 on image tokens."""
    import torch
    images = [q_image(s, family) for n in names for s in Q_PROMPTS[n][1]]
    enc = q_image_processor(family)(images, return_tensors="pt")
    counts = iter((enc["image_grid_thw"].prod(-1) // 4).tolist())
    rows = []
    for n in names:
        row = []
        for t in Q_PROMPTS[n][0]:
            row.extend([t] * next(counts) if t == Q_IMAGE else [t])
        rows.append(row)
    width = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": enc["pixel_values"],
            "image_grid_thw": enc["image_grid_thw"],
            "mm_token_type_ids": (ids == Q_IMAGE).long()}


def qwen_hf_apply(k, family: str = "qwen25", batches=None) -> dict:
    """Q_PROMPTS through transformers with `hf.apply(model, k, where="vision")` (k=None:
    unpruned), the prompts of each batch in one generate: greedy tokens and kept indices
    per prompt."""
    import torch

    from d2pruner_kernels import hf
    model = tiny_qwen3() if family == "qwen3" else tiny_qwen25()
    out = {}
    for names in batches or [[n] for n in Q_PROMPTS]:
        inputs = qwen_inputs(names, family)
        pruner = hf.apply(model, k, where="vision") if k is not None else None
        try:
            with torch.no_grad():
                gen = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False,
                                     min_new_tokens=MAX_TOKENS)
        finally:
            if pruner is not None:
                pruner.remove()
        length = inputs["input_ids"].shape[1]
        for b, name in enumerate(names):
            out[name] = {"tokens": gen[b, length:].tolist(),
                         "kept": [x.tolist() for x in pruner.kept[b]] if pruner else None}
    return out


def qwen_hf_reference(k, prompts=None, family: str = "qwen25") -> dict:
    """Q_PROMPTS through transformers on the same weights and images, one prompt at a time,
    with the rule of hf/qwen_vision.py (k=None: no pruning): each image's kept merged
    tokens keep their (t, h, w) M-RoPE positions, the text after an image starts at its
    extent max(t, h, w), as transformers' get_rope_index places it; greedy tokens decoded
    by hand through the language model (explicit 3-D positions, a DynamicCache)."""
    import torch
    from transformers import DynamicCache

    from d2pruner_kernels import prune
    from d2pruner_kernels.checks import resolve_k
    from d2pruner_kernels.hf.qwen_vision import qwen3_hf_importance, qwen25_hf_importance
    model = tiny_qwen3() if family == "qwen3" else tiny_qwen25()
    proc = q_image_processor(family)
    lm, embed = model.model.language_model, model.model.language_model.embed_tokens
    out = {}
    for name in prompts or Q_PROMPTS:
        ids, seeds = Q_PROMPTS[name]
        rows, pos, nxt, kept_all, images = [], [], 0, [], iter(seeds)
        is_image, deep = [], []   # Qwen3-VL: DeepStack rows of the kept tokens, per level
        for t in ids:
            if t != Q_IMAGE:
                rows.append(embed(torch.tensor([t]))[0])
                is_image.append(False)
                pos.append([nxt] * 3)
                nxt += 1
                continue
            enc = proc([q_image(next(images), family)], return_tensors="pt")
            if family == "qwen3":
                scores, feats, levels = qwen3_hf_importance(model, enc["pixel_values"],
                                                            enc["image_grid_thw"])
            else:
                scores, feats = qwen25_hf_importance(model, enc["pixel_values"],
                                                     enc["image_grid_thw"])
                levels = []
            _, h, w = (int(x) // 2 for x in enc["image_grid_thw"][0].tolist())
            n = h * w
            keep = (torch.arange(n) if k is None else
                    prune(feats.float(), scores, (h, w), resolve_k(k, n)))
            kept_all.append(keep.tolist())
            for i in keep.tolist():
                rows.append(feats[i])
                is_image.append(True)
                pos.append([nxt, nxt + i // w, nxt + i % w])
            deep.append([lv[keep] for lv in levels])
            nxt += max(h, w)
        x = torch.stack(rows).unsqueeze(0)
        p = torch.tensor(pos).T.unsqueeze(1)            # [3, 1, L]
        cache, tokens = DynamicCache(config=lm.config), []
        extra = {}
        if family == "qwen3":
            extra = {"visual_pos_masks": torch.tensor([is_image]),
                     "deepstack_visual_embeds": [torch.cat([d[j] for d in deep])
                                                 for j in range(len(deep[0]))]}
        with torch.no_grad():
            for _ in range(MAX_TOKENS):
                hidden = lm(inputs_embeds=x, position_ids=p, past_key_values=cache,
                            use_cache=True, **extra).last_hidden_state
                extra = {}
                tok = int(model.lm_head(hidden[:, -1]).argmax(-1))
                tokens.append(tok)
                x = embed(torch.tensor([[tok]]))
                p = torch.full((3, 1, 1), nxt)
                nxt += 1
        out[name] = {"tokens": tokens, "kept": kept_all}
    return out


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "build":
        build(sys.argv[2])
    elif cmd == "build_qwen":
        build_qwen(sys.argv[2])
    elif cmd == "run_qwen":
        run_qwen(sys.argv[2], sys.argv[3])
    elif cmd == "build_qwen3":
        build_qwen3(sys.argv[2])
    elif cmd == "serve_qwen":
        serve_qwen(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif cmd == "start_qwen":
        q_engine(sys.argv[2])
        print("ENGINE STARTED")
    elif cmd == "run":
        run(sys.argv[2], sys.argv[3])
    elif cmd == "start":
        start(sys.argv[2])
    else:
        raise SystemExit(f"unknown command {cmd!r}")


def hf_reference(model_dir: str, k, names=None) -> dict:
    """The same PROMPTS (or `names` of them) through transformers (`hf.apply(model, k,
    where="vision")`, or no pruning for k=None), one prompt at a time: tokens and kept
    indices per prompt."""
    import torch
    from transformers import AutoProcessor

    from d2pruner_kernels import hf
    model = tiny_llava()
    processor = AutoProcessor.from_pretrained(model_dir)
    out = {}
    for name in names or PROMPTS:
        ids, seeds = PROMPTS[name]
        full = []
        for t in ids:
            full.extend([IMAGE] * N if t == IMAGE else [t])
        pixels = processor.image_processor([image(s) for s in seeds],
                                           return_tensors="pt")["pixel_values"]
        inputs = {"input_ids": torch.tensor([full]), "attention_mask": torch.ones(1, len(full),
                                                                                  dtype=torch.long),
                  "pixel_values": pixels}
        pruner = hf.apply(model, k, where="vision") if k is not None else None
        try:
            with torch.no_grad():
                gen = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False,
                                     min_new_tokens=MAX_TOKENS)
            kept = [kb.tolist() for kb in pruner.kept[0]] if pruner is not None else None
        finally:
            if pruner is not None:
                pruner.remove()
        out[name] = {"tokens": gen[0, len(full):].tolist(), "kept": kept}
    return out
