"""D2Pruner in a (tiny, randomly initialised) LLaVA: generate with and without pruning.

    python examples/llava_generate.py [--k 64] [--layer 2] [--where llm|vision] [--png kept.png]

Builds LlavaForConditionalGeneration from configs (CLIP 336/14 -> 576 patch tokens per
image, a 4-layer Llama; nothing downloaded), prompts it with one image, and prints the
tokens each decoder layer holds after the prefill (its KV cache length), the kept tokens and
the time of each generate. With a real checkpoint the two pruning lines are the same:

    pruner = hf.apply(model, k=64)                    # prune inside the LLM at layer 2
    out = model.generate(**inputs, max_new_tokens=8)
    pruner.remove()

Needs `pip install 'd2pruner_kernels[hf]'` (transformers 5.x; Pillow for --png).
"""
from __future__ import annotations

import argparse
import time

import torch

from d2pruner_kernels import hf
from d2pruner_kernels.hf import tiny


def cache_lengths(model, inputs) -> list[int]:
    """Tokens held by each decoder layer after a prefill (its KV cache length)."""
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    return [cache.get_seq_length(i) for i in range(len(model.model.language_model.layers))]


def timed_generate(model, inputs, new_tokens: int):
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, do_sample=False)  # warm-up
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return out, time.perf_counter() - start


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=float, default=64, help="tokens kept per image (or a ratio)")
    ap.add_argument("--layer", type=int, default=2, help="decoder layer K (where=llm)")
    ap.add_argument("--where", choices=("llm", "vision"), default="llm")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--png", help="draw the kept patches over the input image here")
    args = ap.parse_args(argv)
    k = int(args.k) if args.k >= 1 else args.k

    model = tiny.tiny_llava()
    inputs = tiny.llava_inputs(model, [[5, 6, 7, 8]])
    prompt = inputs["input_ids"].shape[1]

    plain_lengths = cache_lengths(model, inputs)
    plain, plain_s = timed_generate(model, inputs, args.new_tokens)
    options = {"layer": args.layer} if args.where == "llm" else {}
    with hf.apply(model, k, where=args.where, **options) as pruner:
        pruned_lengths = cache_lengths(model, inputs)
        pruned, pruned_s = timed_generate(model, inputs, args.new_tokens)
        kept = pruner.kept[0][0]

    print(f"prompt: {prompt} tokens, one image of 576 patch tokens (24x24); "
          f"{pruner!r}".replace(", removed)", ")"))
    print(f"tokens per decoder layer after the prefill: unpruned {plain_lengths}")
    print(f"                                            pruned   {pruned_lengths}")
    print(f"kept {kept.numel()} of 576 image tokens: {kept[:12].tolist()} ...")
    print(f"generate {args.new_tokens} tokens: unpruned {plain_s * 1e3:.0f} ms "
          f"{plain[0, prompt:].tolist()}")
    print(f"                   pruned   {pruned_s * 1e3:.0f} ms {pruned[0, prompt:].tolist()}")
    print("(a toy model: its layers cost next to nothing, so pruning cannot save time here; "
          "in a 7B model the layers from K on dominate the prefill)")
    if args.png:
        image = inputs["pixel_values"][0]
        image = (image - image.min()) / (image.max() - image.min())  # random pixels, for show
        hf.draw_kept(image, kept, (24, 24)).save(args.png)
        print(f"wrote {args.png}")
    return {"plain": plain_lengths, "pruned": pruned_lengths, "kept": kept,
            "tokens": (plain[0, prompt:], pruned[0, prompt:])}


if __name__ == "__main__":
    main()
