"""End to end: what pruning buys a model, not the kernel. For random-weight models of real
shapes (built from transformers configs, nothing downloaded), each batch size and each
pruning variant, one `generate` gives:

    TTFT            time to the first new token: the whole prefill, vision encoder included
                    (and generate's own setup), from the call to the streamer's first token
    decode / token  the mean interval between the next new tokens (greedy, a fixed count)
    pruner          the share of the pruned prefill spent in the pruner's own work: its two
                    steps (hf/_llm.py) timed where they run, by wrapping the installed
                    pruner's methods on this instance (a benchmark-only instrument):
                    the importance rows read at layer K - 1 and the selection at layer K
                    (prune_varlen, the kept positions, RoPE and mask for the pruned layers)
    KV / request    bytes of the returned DynamicCache's key and value tensors for the
                    prompt (the generated tokens' slots taken off), divided by the batch

Variants: unpruned; D2Pruner `hf.apply(model, k, where="llm", layer=2)` (defaults: prior
None, pivot_ratio 0.7, sim_threshold 0.8); and the simplest pruning a user could write, the
top-k of raw attention at the same layer (FastV-style): the same hooks with
`PruneOptions(pivot_ratio=1.0)` and no prior, which docs/spec.md §5 defines as exactly the
raw-attention top-k of the last prompt token's row (no graph, no walk: n_p = k). Unlike
FastV, that row is the last prompt token's (the one D2Pruner reads), not the mean over all
queries. The difference between the two pruned rows is the cost of D2Pruner's structure.

    python -m benchmarks.e2e [--quick] [--device cpu|cuda] [--dtype float32|bfloat16]
                             [--models NAME ...] [--batch 1 8] [--k 64 128 192 0.25]
                             [--new-tokens N] [--reps N] [--threads N] [--out F] [--record]

--quick        tiny models (hf/tiny.py), batch 1 and 2, k 16 and 0.25: a CI smoke of seconds
--device/--dtype  cuda + bfloat16 selects the GPU shapes (LLaVA-1.5-7B, Qwen2.5-VL-7B)
--threads      torch.set_num_threads in this script (default: as OMP_NUM_THREADS left it)
--clock cpu    time by this process's CPU time (one thread only): on a shared machine, what
               a quiet core would take; the wall-clock TTFT is recorded beside it
--record       append to benchmarks/results/history.jsonl; `python -m benchmarks.tables`
               writes results/<device>_e2e.md from it

Shapes (MODELS): the CPU ones are a LLaVA-1.5 (CLIP ViT-L/14-336, 576 image tokens) on a
Qwen2-0.5B-shaped language model (batch 1 and 8, k 64, 128, 192), and a Qwen2.5-VL (its
32-block vision tower) on a Qwen2.5-0.5B-shaped one at a fixed 448 x 448 image (batch 1,
k = 0.25 only: its vision tower alone takes 30-60 s per image on 2 cores); parameter counts
are printed and recorded. Runs per row: the median of 2 at batch 1 (1 for the CPU Qwen),
one run at batch 8; every run generates --new-tokens greedy tokens after a warm-up.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from typing import Callable

import torch

from . import history, tables

TEXT = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26]  # the question's ids


# --- the models -----------------------------------------------------------------------------

CLIP_L_336 = dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                  num_hidden_layers=24, num_attention_heads=16, projection_dim=768)
QWEN2_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                 num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 max_position_embeddings=32768, tie_word_embeddings=True)
LLAMA2_7B = dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 max_position_embeddings=4096)
QWEN25VL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                       window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
QWEN25_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                 num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                 max_position_embeddings=32768)


@dataclasses.dataclass
class ModelShape:
    name: str
    family: str            # "llava" or "qwen"
    describe: str          # what it is, for the notes
    build: Callable        # (dtype, device) -> model
    image: tuple = ()      # qwen: the image's (h, w) in patches (before the 2x2 merge)
    batch: tuple = (1, 8)  # the batch sizes and budgets run when --batch / --k are not given
    ks: tuple = (64, 128, 192)
    reps: int | None = None  # runs per row at batch 1 when --reps is not given (default 2)


def _text_common(cfg: dict) -> dict:
    # tiny.py's token ids (IMAGE = 150, ...): all below any vocabulary here; no EOS, so
    # every generate makes exactly the tokens asked for
    return dict(cfg, pad_token_id=None, bos_token_id=1, eos_token_id=None)


def _finish(cls, cfg, dtype, device, seed=0):
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls._from_config(cfg, dtype=dtype)
    return model.eval()


def llava(vision: dict, text: dict, text_cls: str):
    def build(dtype, device):
        import transformers
        from d2pruner_kernels.hf.tiny import IMAGE
        cfg = transformers.LlavaConfig(
            vision_config=transformers.CLIPVisionConfig(**vision),
            text_config=getattr(transformers, text_cls)(**_text_common(text)),
            image_token_id=IMAGE,
            image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2)
        return _finish(transformers.LlavaForConditionalGeneration, cfg, dtype, device)
    return build


def qwen25vl(vision: dict, text: dict):
    def build(dtype, device):
        import transformers
        from d2pruner_kernels.hf.tiny import IMAGE, VIDEO, VISION_END, VISION_START
        head = text["hidden_size"] // text["num_attention_heads"]
        section = [head // 8, head * 3 // 16, head * 3 // 16]   # 7B: [16, 24, 24] of 128
        t = _text_common(text)
        t["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6,
                                "mrope_section": section}
        cfg = transformers.Qwen2_5_VLConfig(
            text_config=t, vision_config=dict(vision, out_hidden_size=text["hidden_size"]),
            image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
            vision_end_token_id=VISION_END, tie_word_embeddings=text.get("tie_word_embeddings",
                                                                         False))
        return _finish(transformers.Qwen2_5_VLForConditionalGeneration, cfg, dtype, device)
    return build


def _tiny(kind):
    def build(dtype, device):
        from d2pruner_kernels.hf import tiny
        model = tiny.tiny_llava() if kind == "llava" else tiny.tiny_qwen2_vl(v2_5=True)
        return model.to(device=device, dtype=dtype)
    return build


MODELS = {
    # this CPU (float32)
    "llava15-clipL-qwen2-0.5b": ModelShape(
        "llava15-clipL-qwen2-0.5b", "llava",
        "LLaVA-1.5: CLIP ViT-L/14-336 (24 layers, width 1024; 576 image tokens), 2-layer GELU "
        "projector, Qwen2-0.5B-shaped LM (24 layers, width 896, 14 heads on 2 KV heads, "
        "vocab 151936, tied embeddings)", llava(CLIP_L_336, QWEN2_05B, "Qwen2Config")),
    "qwen25vl-0.5b-448": ModelShape(
        "qwen25vl-0.5b-448", "qwen",
        "Qwen2.5-VL: its vision tower (32 blocks, width 1280, window 112, full attention at "
        "7/15/23/31), a 448 x 448 image (32 x 32 patches -> 256 tokens), Qwen2.5-0.5B-shaped "
        "LM (as above)", qwen25vl(QWEN25VL_VISION, QWEN2_05B), image=(32, 32),
        # its vision tower alone takes ~30-60 s per image on the 2-core CPU: batch 1, a ratio
        batch=(1,), ks=(0.25,), reps=1),
    # GPU (bf16)
    "llava15-7b": ModelShape(
        "llava15-7b", "llava", "LLaVA-1.5-7B: CLIP ViT-L/14-336 + Vicuna-7B (Llama-2-7B) shape",
        llava(CLIP_L_336, LLAMA2_7B, "LlamaConfig")),
    "qwen25vl-7b-672": ModelShape(
        "qwen25vl-7b-672", "qwen",
        "Qwen2.5-VL-7B shape, a 672 x 672 image (48 x 48 patches -> 576 tokens)",
        qwen25vl(QWEN25VL_VISION, QWEN25_7B), image=(48, 48), ks=(64, 128, 192, 0.25)),
    # --quick (hf/tiny.py)
    "tiny-llava": ModelShape("tiny-llava", "llava", "hf.tiny.tiny_llava() (576 image tokens)",
                             _tiny("llava")),
    "tiny-qwen25vl": ModelShape("tiny-qwen25vl", "qwen",
                                "hf.tiny.tiny_qwen2_vl(v2_5=True), a 16 x 16-patch image "
                                "(64 tokens)", _tiny("qwen"), image=(16, 16)),
    # (--quick sets its own batch sizes and budgets)
}
CPU_MODELS = ["llava15-clipL-qwen2-0.5b", "qwen25vl-0.5b-448"]
GPU_MODELS = ["llava15-7b", "qwen25vl-7b-672"]
QUICK_MODELS = ["tiny-llava", "tiny-qwen25vl"]


def make_inputs(shape: ModelShape, model, batch: int, device) -> dict:
    """`batch` copies of one prompt: one image and the question TEXT (no padding)."""
    from d2pruner_kernels.hf import tiny
    if shape.family == "llava":
        inputs = tiny.llava_inputs(model, [TEXT] * batch)
    else:
        inputs = tiny.qwen_inputs(model, [[shape.image]] * batch, texts=[TEXT] * batch)
    dtype = next(model.parameters()).dtype
    return {name: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
            for name, v in inputs.items()}


def image_tokens(shape: ModelShape, model) -> int:
    if shape.family == "llava":
        return model.config.image_seq_length
    return shape.image[0] * shape.image[1] // 4


# --- one measurement --------------------------------------------------------------------------

# "wall": time.perf_counter. "cpu": this process's CPU time (time.process_time), for a
# one-thread run on a shared machine: what a quiet core would take, whatever else runs (with
# more threads it sums their work: refused).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class Clock:
    """A generate streamer that notes when each put arrives (the prompt first, then each new
    token: generate hands them over as CPU tensors, so a GPU has finished the step), by
    `now` and by the wall clock."""

    def __init__(self, now=time.perf_counter):
        self.now = now
        self.times: list[float] = []
        self.wall: list[float] = []

    def put(self, value):
        self.times.append(self.now())
        self.wall.append(time.perf_counter())

    def end(self):
        pass


class PrunerTimer:
    """Seconds spent in the pruner's own steps during a prefill: wraps, on this pruner
    instance only, the importance capture (layer K - 1) and the selection (layer K) of
    hf/_llm.InLLM; synchronizes a GPU around each so the time is the pruner's work."""

    STEPS = ("_capture", "_select")

    def __init__(self, pruner, device, now=time.perf_counter):
        self.seconds, self.now = 0.0, now
        impl = pruner._impl
        for name in self.STEPS:
            setattr(impl, name, self._timed(getattr(impl, name), torch.device(device)))

    def _timed(self, fn, device):
        def timed(*args, **kwargs):
            _sync(device)
            start = self.now()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync(device)
                self.seconds += self.now() - start
        return timed


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prompt_kv_bytes(cache, generated: int) -> int:
    """Bytes of the cache's keys and values for the prompt: each layer's tensors less the
    slots of the `generated` tokens fed back after the first."""
    total = 0
    for layer in cache.layers:
        held = layer.keys.shape[-2]
        per_slot = (layer.keys.nbytes + layer.values.nbytes) / held
        total += per_slot * (held - generated)
    return int(total)


@dataclasses.dataclass
class Result:
    ttft: float
    decode: float
    ttft_wall: float
    kv_bytes: int
    pruner: float | None       # seconds in the pruner per prefill
    kept: list | None          # tokens kept per image (pruned runs)
    prompt_len: int
    cache_len_at_k: int        # prompt slots layer K holds


def run_once(model, inputs, new_tokens: int, pruner=None, device="cpu",
             now=time.perf_counter) -> Result:
    clock = Clock(now)
    timer = PrunerTimer(pruner, device, now) if pruner is not None else None
    _sync(torch.device(device))
    start, start_wall = now(), time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, streamer=clock, return_dict_in_generate=True)
    times = clock.times
    assert len(times) == new_tokens + 1, (len(times), new_tokens)
    ttft = times[1] - start
    # the median step: robust to a step that another process on the machine slowed
    decode = (statistics.median(b - a for a, b in zip(times[1:], times[2:]))
              if new_tokens > 1 else float("nan"))
    cache = out.past_key_values
    batch = inputs["input_ids"].shape[0]
    kv = prompt_kv_bytes(cache, new_tokens - 1) // batch
    layer_k = pruner.layer if pruner is not None else 2
    kept = ([len(x) for row in pruner.kept for x in row] if pruner is not None else None)
    return Result(ttft, decode, clock.wall[1] - start_wall, kv,
                  timer.seconds if timer else None, kept, inputs["input_ids"].shape[1],
                  cache.layers[layer_k].keys.shape[-2] - (new_tokens - 1))


# --- the table --------------------------------------------------------------------------------

def variants(ks) -> list:
    """(label, apply kwargs or None): unpruned, then D2Pruner and top-k of raw attention at
    each k."""
    from d2pruner_kernels import PruneOptions
    out = [("unpruned", None)]
    for k in ks:
        out.append((f"D2Pruner k={k}", dict(k=k)))
        out.append((f"top-k attn k={k}", dict(k=k, options=PruneOptions(pivot_ratio=1.0))))
    return out


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def parse_k(text: str):
    value = float(text)
    return int(value) if value >= 1 else value


def measure(args, rec: history.Recorder, log=print) -> list[dict]:
    from d2pruner_kernels import hf
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = []
    for name in args.models:
        shape = MODELS[name]
        t0 = time.perf_counter()
        model = shape.build(dtype, device)
        params = sum(p.numel() for p in model.parameters())
        vision = sum(p.numel() for n, p in model.named_parameters() if "visual" in n
                     or "vision_tower" in n)
        n_img = image_tokens(shape, model)
        rec.add(name, "", "parameters", params, "", note="model")
        rec.add(name, "", "vision parameters", vision, "", note="model")
        log(f"# {name}: {params / 1e6:.1f}M parameters ({vision / 1e6:.1f}M vision), "
            f"{n_img} image tokens, built in {time.perf_counter() - t0:.1f} s; "
            f"{shape.describe}")
        ks = [k for k in (args.k or shape.ks) if shape.family == "qwen" or isinstance(k, int)]
        run_once(model, make_inputs(shape, model, 1, device), 2, device=device)  # warm-up
        now = CLOCKS[args.clock]
        for batch in args.batch or shape.batch:
            inputs = make_inputs(shape, model, batch, device)
            reps = (args.reps or shape.reps or 2) if batch == 1 else args.reps_batched
            base = None
            for label, kw in variants(ks):
                results = []
                for _ in range(reps):
                    if kw is None:
                        results.append(run_once(model, inputs, args.new_tokens, device=device,
                                                now=now))
                        continue
                    options = {key: v for key, v in kw.items() if key != "k"}
                    with hf.apply(model, kw["k"], where="llm", layer=args.layer,
                                  **options) as pruner:
                        results.append(run_once(model, inputs, args.new_tokens, pruner,
                                                device=device, now=now))
                r = summarize(results)
                if base is None:
                    base = r
                row = dict(model=name, batch=batch, variant=label, **r,
                           prompt=results[0].prompt_len, image_tokens=n_img,
                           load=load_average())
                rows.append(row)
                note = label
                where = f"B={batch}"
                rec.add(name, where, "TTFT", r["ttft"], "s", note)
                rec.add(name, where, "decode / token", r["decode"], "s", note)
                if args.clock != "wall":
                    rec.add(name, where, "TTFT wall", r["ttft_wall"], "s", note)
                rec.add(name, where, "KV / request", r["kv"], "B", note)
                rec.add(name, where, "prompt tokens at layer K", r["at_k"], "", note)
                if r["pruner"] is not None:
                    rec.add(name, where, "pruner share", r["pruner"] / r["ttft"], "", note)
                    rec.add(name, where, "kept per image", r["kept"], "", note)
                log(f"{name} B={batch} {label:>20}: TTFT {tables.fmt_time(r['ttft'])} "
                    f"({base['ttft'] / r['ttft']:.2f}x)  decode {tables.fmt_time(r['decode'])}"
                    f"/token ({base['decode'] / r['decode']:.2f}x)  KV {r['kv'] / 2**20:.2f} "
                    f"MiB/request  at layer K {r['at_k']} of {results[0].prompt_len} tokens"
                    + (f"  pruner {100 * r['pruner'] / r['ttft']:.2f}% of TTFT, kept "
                       f"{r['kept']}/image" if r["pruner"] is not None else "")
                    + f"  [reps {reps}, load {load_average()}]")
        del model
    return rows


def summarize(results: list[Result]) -> dict:
    pruner = [r.pruner for r in results if r.pruner is not None]
    kept = {k for r in results if r.kept for k in r.kept}
    return dict(ttft=statistics.median(r.ttft for r in results),
                ttft_wall=statistics.median(r.ttft_wall for r in results),
                decode=statistics.median(r.decode for r in results),
                kv=results[0].kv_bytes, at_k=results[0].cache_len_at_k,
                pruner=statistics.median(pruner) if pruner else None,
                # one count when every image of every run kept the same, else "min-max"
                kept=(None if not kept else min(kept) if len(kept) == 1
                      else f"{min(kept)}-{max(kept)}"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models: a CI smoke")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS),
                        help="default: the device's shapes (CPU_MODELS / GPU_MODELS)")
    parser.add_argument("--batch", nargs="+", type=int, default=None,
                        help="default: each model's (MODELS: 1 8; the CPU Qwen 1)")
    parser.add_argument("--k", nargs="+", type=parse_k, default=None,
                        help="budgets per image (a float < 1: a ratio, Qwen only); default: "
                        "each model's (MODELS: 64 128 192, GPU Qwen + 0.25, CPU Qwen 0.25)")
    parser.add_argument("--layer", type=int, default=2, help="the pruning layer K (default 2)")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="tokens generated per run (default 8; 3 with --quick)")
    parser.add_argument("--reps", type=int, default=None,
                        help="runs per row at batch 1, median (default: 2, the CPU Qwen 1; "
                        "1 with --quick)")
    parser.add_argument("--reps-batched", type=int, default=None,
                        help="runs per row at batch > 1 (default 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for this run (default: left as "
                        "OMP_NUM_THREADS set it)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall (default), or cpu: this process's CPU time, for a "
                        "one-thread CPU run on a shared machine (TTFT wall recorded beside)")
    tables.add_output_arguments(parser)
    args = parser.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    if args.quick:
        args.models = args.models or QUICK_MODELS
        args.batch = args.batch or [1, 2]
        args.k = args.k or [16, 0.25]
    args.models = args.models or (GPU_MODELS if on_gpu else CPU_MODELS)
    args.new_tokens = args.new_tokens or (3 if args.quick else 8)
    args.reps = args.reps or (1 if args.quick else None)
    args.reps_batched = args.reps_batched or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and (on_gpu or torch.get_num_threads() != 1):
        parser.error("--clock cpu measures one CPU thread's work: run on the CPU with "
                     "OMP_NUM_THREADS=1 or --threads 1")

    from .harness import device_name
    rec = history.Recorder("e2e", history.command("benchmarks.e2e", argv))
    rec.fields["device"] = device_name(torch.device(args.device))
    rec.fact("dtype", args.dtype)
    rec.fact("torch threads", torch.get_num_threads(),
             note=f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    rec.fact("load average at start", load_average(), note="1, 5, 15 min")
    rec.fact("new tokens per run", args.new_tokens)
    rec.fact("runs per row", f"{args.reps or 'per model (2; CPU Qwen 1)'} at B=1, "
             f"{args.reps_batched} at B>1 (median)")
    rec.fact("pruning layer K", args.layer)
    rec.fact("clock", {"wall": "wall (time.perf_counter)",
                       "cpu": "this process's CPU time (time.process_time), one thread: "
                              "the machine is shared"}[args.clock])
    print(f"# {rec.fields['device']}, {args.dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {load_average()}", flush=True)
    start = time.perf_counter()
    measure(args, rec, log=lambda s: print(s, flush=True))
    rec.fact("load average at end", load_average(), note="1, 5, 15 min")
    rec.fact("wall time", round(time.perf_counter() - start, 1), "s")
    tables.finish(rec, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
