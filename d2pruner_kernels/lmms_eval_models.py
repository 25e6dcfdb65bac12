"""D2Pruner in lmms-eval (0.7.x): model entries registered through its `lmms_eval.models`
entry-point group (a ModelManifest each; pyproject.toml names `manifests` below), so that

    python -m lmms_eval --model d2pruner_qwen2_5_vl \\
        --model_args pretrained=Qwen/Qwen2.5-VL-7B-Instruct,k=0.25,layer=2 \\
        --tasks refcoco_bbox_rec_val,ocrbench --batch_size 8 --log_samples --output_path logs

evaluates the pruned model (RefCOCO referring-expression localization, where the paper makes
its claim, and OCRBench, the most fragile under pruning). Each entry subclasses lmms-eval's
own HF model class (its chat implementation, the one lmms-eval resolves by default) and,
once that class has loaded the model, calls `hf.apply(model, k, where=..., layer=...,
prior=..., options=...)`: d2pruner_llava_hf, d2pruner_qwen2_5_vl, d2pruner_qwen3_vl,
d2pruner_internvl_hf.

--model_args read here (the rest go to lmms-eval's class unchanged):
  k        visual tokens kept per image: an int, a ratio in (0, 1] (1.0 keeps every token,
           the pruner still installed), or `none` (no pruner: the base model, same logging)
  where    "llm" (default) or "vision" (LLaVA, Qwen2.5-VL, Qwen3-VL);  layer: int (default:
           the family's)
  prior    a PositionalPrior file (d2pruner-calibrate)
  and every field of PruneOptions but prior (pivot_ratio, sim_threshold, spatial_weight,
  radius, temporal_radius, eps, check_finite, backend, fusion), parsed to the field's type.

Logged per sample (`--log_samples`: the `token_counts` entry of each sample, lmms-eval's
per-sample channel, a GenerationResult's TokenCounts; this module returns a subclass with
more fields): input_tokens (the prompt before pruning), output_tokens, visual_tokens and
visual_tokens_kept (one number per image, in prompt order), prefill_s (seconds from the
vision encoder's start to the end of the first forward of generate: the prefill of the batch
the sample was in, vision included) and prefill_rows (that batch's rows).

Batching: the entry groups the requests by generation settings, orders them by the key
lmms-eval's class orders a batch by (so that the class keeps each batch's order and row b
of the prefill is request b), and hands lmms-eval's generate_until one batch at a time.
lmms-eval's llava_hf takes batch size 1 only; d2pruner_llava_hf generates a batch itself
(the same prompt building, left padding). lmms-eval's internvl_hf takes batch size 1 only
and does not pass image_sizes, which hf.apply needs for images of several tiles:
d2pruner_internvl_hf generates its one request itself, image_sizes added.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time

import torch

from lmms_eval.api.instance import GenerationResult, TokenCounts, unwrap_generation_output
from lmms_eval.models.registry_v2 import ModelManifest

from .options import DEFAULTS, OPTION_NAMES, PruneOptions

# lmms-eval model id -> its chat class (lmms_eval.models.chat.<id>), which an entry subclasses
BASES = {"llava_hf": "LlavaHf", "qwen2_5_vl": "Qwen2_5_VL", "qwen3_vl": "Qwen3_VL",
         "internvl_hf": "InternVLHf"}
OWN_ARGS = ("k", "where", "layer", "prior") + tuple(n for n in OPTION_NAMES if n != "prior")


def manifests() -> list[ModelManifest]:
    """The entries of the `lmms_eval.models` entry point: d2pruner_<base> for each base."""
    return [ModelManifest(model_id=f"d2pruner_{base}",
                          chat_class_path=f"{__name__}.{_class_name(base)}")
            for base in BASES]


def _class_name(base: str) -> str:
    return "D2Pruner" + "".join(part.capitalize() for part in base.split("_"))


# -- --model_args ------------------------------------------------------------------------------

def _bad(name: str, value, want: str) -> ValueError:
    return ValueError(f"--model_args {name}={value!r}: {want}")


def parse_k(value):
    """k from --model_args: an int >= 1, a ratio in (0, 1], or None for `none`."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text) if text.lstrip("+").isdigit() else float(text)
        except ValueError:
            raise _bad("k", value, "expected an int (tokens per image), a ratio in (0, 1] "
                                   "or none") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad("k", value, "expected an int (tokens per image), a ratio in (0, 1] or none")
    if isinstance(value, int):
        if value < 1:
            raise _bad("k", value, "an int k keeps k tokens per image: it must be >= 1")
        return value
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise _bad("k", value, "a float k is a ratio: it must be in (0, 1]")
    return float(value)


def _as_int(name, value) -> int:
    if isinstance(value, bool):
        raise _bad(name, value, "expected an int")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value)
    if isinstance(value, int):
        return value
    raise _bad(name, value, "expected an int")


def _as_float(name, value) -> float:
    if isinstance(value, bool):
        raise _bad(name, value, "expected a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise _bad(name, value, "expected a number") from None


def _as_bool(name, value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise _bad(name, value, "expected true or false")


_PARSE = {bool: _as_bool, int: _as_int, float: _as_float, str: lambda name, v: str(v)}


def parse_prune_args(args: dict) -> dict:
    """Takes this package's names out of `args` (lmms-eval's parsed --model_args; what is
    left is the base class's) and returns apply()'s arguments: k, where, layer, prior,
    options (a PruneOptions). Bad values raise ValueError naming the argument."""
    ours = {name: args.pop(name) for name in OWN_ARGS if name in args}
    if "k" not in ours:
        raise ValueError("--model_args needs k: visual tokens kept per image (an int), a "
                         "ratio in (0, 1] (1.0 keeps all) or none (no pruning)")
    out = {"k": parse_k(ours.pop("k")), "where": str(ours.pop("where", "llm")),
           "layer": None, "prior": None}
    if out["where"] not in ("llm", "vision"):
        raise _bad("where", out["where"], "expected llm or vision")
    if "layer" in ours:
        layer = ours.pop("layer")
        out["layer"] = None if str(layer).lower() == "none" else _as_int("layer", layer)
    if "prior" in ours:
        path = ours.pop("prior")
        if path not in (None, "", "none"):
            from .prior import PositionalPrior
            try:
                out["prior"] = PositionalPrior.load(str(path))
            except (OSError, ValueError) as e:
                raise _bad("prior", path, f"not a positional prior file ({e})") from e
    fields = {}
    for name, value in ours.items():
        kind = type(getattr(DEFAULTS, name))
        fields[name] = _PARSE[kind](name, value)
    try:
        out["options"] = PruneOptions(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"--model_args: {e}") from e
    return out


# -- what is logged ----------------------------------------------------------------------------

@dataclasses.dataclass
class PrunedTokenCounts(TokenCounts):
    """lmms-eval's per-sample TokenCounts, with what the pruner kept and the prefill time."""
    visual_tokens: list | None = None        # per image, before pruning
    visual_tokens_kept: list | None = None   # per image, after
    prefill_s: float | None = None           # the prefill of the batch the sample was in
    prefill_rows: int | None = None          # that batch's rows

    def to_dict(self) -> dict:
        out = super().to_dict()
        for f in ("visual_tokens", "visual_tokens_kept", "prefill_s", "prefill_rows"):
            if getattr(self, f) is not None:
                out[f] = getattr(self, f)
        return out


class _PrefillProbe:
    """Forward hooks that time the first forward of each generate (the prefill; from the
    vision encoder's first call, which transformers runs before it) and read, right after
    it, the prompt lengths and the pruner's selections."""

    def __init__(self, model, pruner):
        self.model, self.pruner = model, pruner
        inner = getattr(model, "model", model)
        vision = next((getattr(inner, n) for n in ("visual", "vision_tower", "vision_model")
                       if isinstance(getattr(inner, n, None), torch.nn.Module)), None)
        self.handles = [model.register_forward_pre_hook(self._start, with_kwargs=True),
                        model.register_forward_hook(self._end)]
        if vision is not None:
            self.handles.append(vision.register_forward_pre_hook(self._start_vision))
        self.reset()

    def reset(self):
        self.t0, self.prefill_s, self.prompt_tokens, self.kept, self.grids = (None,) * 5

    def _sync(self):
        device = next(self.model.parameters()).device
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def _start_vision(self, module, args):
        if self.t0 is None and self.prefill_s is None:
            self._sync()
            self.t0 = time.perf_counter()

    def _start(self, module, args, kwargs):
        if self.prefill_s is not None:
            return
        if self.t0 is None:
            self._sync()
            self.t0 = time.perf_counter()
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids")
        if mask is not None:
            self.prompt_tokens = [int(n) for n in mask.sum(dim=1).tolist()]
        elif ids is not None:
            self.prompt_tokens = [ids.shape[1]] * ids.shape[0]

    def _end(self, module, args, output):
        if self.prefill_s is not None:
            return
        self._sync()
        self.prefill_s = time.perf_counter() - self.t0
        if self.pruner is not None and self.pruner.kept is not None:
            self.kept = [[int(t.numel()) for t in row] for row in self.pruner.kept]
            self.grids = [[int(math.prod(_cells(g))) for g in row] for row in self.pruner.grids]


def _cells(grid):
    """A grid's dimensions ((H, W), (t, h, w), or a TokenLayout's cells)."""
    cells = getattr(grid, "cells", None)
    return (cells,) if cells is not None else tuple(grid)


class _RowRecorder:
    """Stands in for the model's cache hook during one batch: forwards every call, and keeps
    the answers in the order the batch's rows produced them (a check of the row order)."""

    def __init__(self, inner):
        self.inner, self.answers = inner, []

    def add_partial(self, attr, req, res):
        self.answers.append(res)
        self.inner.add_partial(attr, req, res)


def _batch_key(gen_kwargs) -> str:
    return json.dumps(gen_kwargs, sort_keys=True, default=repr)


class D2PrunerMixin:
    """Before an lmms-eval HF model class: prunes its model, logs per sample (see the module).

    `row_key`: the key lmms-eval's chat classes sort a batch by (their generate_until's
    _collate: the context); a batch handed over already in that order keeps it, so row b of
    the prefill is request b (checked on the answers, through the cache hook)."""

    @staticmethod
    def row_key(args):
        return args[0]

    def __init__(self, *args, **kwargs):
        settings = parse_prune_args(kwargs)
        super().__init__(*args, **kwargs)
        from . import hf
        self.prune_settings = settings
        self.pruner = None
        if settings["k"] is not None:
            self.pruner = hf.apply(self.model, settings["k"], where=settings["where"],
                                   layer=settings["layer"], prior=settings["prior"],
                                   options=settings["options"])
        self._probe = _PrefillProbe(self.model, self.pruner)

    def generate_until(self, requests):
        order = sorted(range(len(requests)), key=lambda i: self.row_key(requests[i].args))
        groups: dict = {}
        for i in order:
            groups.setdefault(_batch_key(requests[i].args[2]), []).append(i)
        results = [None] * len(requests)
        for indices in groups.values():
            for s in range(0, len(indices), self.batch_size):
                batch = indices[s:s + self.batch_size]
                for i, out in zip(batch, self._generate_logged([requests[i] for i in batch])):
                    results[i] = out
        return results

    def _generate_batch(self, requests):
        """One batch through the base class's generate_until (one generate call)."""
        return super().generate_until(requests)

    def _generate_logged(self, requests):
        probe, hook = self._probe, self.cache_hook
        probe.reset()
        recorder = _RowRecorder(hook)
        self.set_cache_hook(recorder)
        try:
            outs = self._generate_batch(requests)
        finally:
            self.set_cache_hook(hook)
        texts_counts = [unwrap_generation_output(o) for o in outs]
        if [t for t, _ in texts_counts] != recorder.answers:
            raise RuntimeError("d2pruner: the base class reordered the batch; per-sample kept "
                               "counts cannot be matched to requests (lmms-eval changed?)")
        rows = len(requests)
        if probe.prompt_tokens is not None and len(probe.prompt_tokens) != rows:
            raise RuntimeError(f"d2pruner: the prefill had {len(probe.prompt_tokens)} rows "
                               f"for a batch of {rows} requests")
        logged = []
        for b, (text, counts) in enumerate(texts_counts):
            counts = counts or TokenCounts()
            logged.append(GenerationResult(text=text, token_counts=PrunedTokenCounts(
                input_tokens=(probe.prompt_tokens[b] if probe.prompt_tokens else
                              counts.input_tokens),
                output_tokens=counts.output_tokens, reasoning_tokens=counts.reasoning_tokens,
                visual_tokens=probe.grids[b] if probe.grids else None,
                visual_tokens_kept=probe.kept[b] if probe.kept else None,
                prefill_s=probe.prefill_s, prefill_rows=rows)))
        return logged


def _own_batch(self, requests, processor, pad_token_id, image_sizes=False, decode=None,
               **processor_kwargs):
    """One batch generated here, for the classes of lmms-eval that take batch size 1 only
    (llava_hf) or do not pass image_sizes (internvl_hf): their prompt building (the chat
    template of each request's messages, then the processor), left padding, their generate
    arguments; image_sizes=True adds each picture's (height, width), as hf.apply needs for
    InternVL's tiles."""
    from lmms_eval.protocol import ChatMessages
    _, to_messages, all_gen_kwargs, doc_ids, tasks, splits = zip(*(r.args for r in requests))
    texts, images = [], []
    for fn, doc_id, task, split in zip(to_messages, doc_ids, tasks, splits):
        chat = ChatMessages(messages=fn(self.task_dict[task][split][doc_id]))
        visual, video, _ = chat.extract_media()
        if video:
            raise NotImplementedError(f"{type(self).__name__}: images only (no videos)")
        images += visual
        texts.append(processor.apply_chat_template(
            chat.model_dump()["messages"], tokenize=False, add_generation_prompt=True))
    inputs = processor(images=images or None, text=texts, padding=True, return_tensors="pt",
                       **processor_kwargs).to(self._device, self.model.dtype)
    if image_sizes and images:
        inputs["image_sizes"] = torch.tensor([(im.height, im.width) for im in images],
                                             device=self._device)
    gen = {"max_new_tokens": 1024, "temperature": 0, "top_p": None, "num_beams": 1,
           **all_gen_kwargs[0]}
    sample = gen["temperature"] > 0
    out = self.model.generate(
        **inputs, do_sample=sample, temperature=gen["temperature"] if sample else None,
        top_p=gen["top_p"], num_beams=gen["num_beams"], max_new_tokens=gen["max_new_tokens"],
        use_cache=self.use_cache, pad_token_id=pad_token_id, eos_token_id=self.eot_token_id)
    new = out[:, inputs["input_ids"].shape[1]:]
    answers = processor.batch_decode(new, skip_special_tokens=True, **(decode or {}))
    results = []
    for text, answer, row in zip(texts, answers, new.tolist()):
        n = row.index(self.eot_token_id) + 1 if self.eot_token_id in row else len(row)
        self.cache_hook.add_partial("generate_until", (text, all_gen_kwargs[0]), answer)
        results.append(GenerationResult(text=answer, token_counts=TokenCounts(output_tokens=n)))
    return results


def _llava_batch(self, requests):
    """d2pruner_llava_hf: batches of --batch_size (lmms-eval's llava_hf takes 1)."""
    return _own_batch(self, requests, self._image_processor, self.eot_token_id)


def _internvl_batch(self, requests):
    """d2pruner_internvl_hf: lmms-eval's internvl_hf with image_sizes (batch size 1, as its)."""
    return _own_batch(self, requests, self.processor, self.pad_token_id, image_sizes=True,
                      decode={"clean_up_tokenization_spaces": False},
                      min_patches=self.min_patches, max_patches=self.max_patches)


# what each entry adds to D2PrunerMixin
_EXTRA = {"llava_hf": {"_generate_batch": _llava_batch},
          "internvl_hf": {"_generate_batch": _internvl_batch}}


def __getattr__(name: str):
    """The entry classes, made on first use (lmms-eval imports a class path when the model is
    requested), so that loading the entry point imports none of lmms-eval's model modules."""
    import importlib
    for base, cls_name in BASES.items():
        if name == _class_name(base):
            parent = getattr(importlib.import_module(f"lmms_eval.models.chat.{base}"), cls_name)
            cls = type(name, (D2PrunerMixin, parent), {
                "__module__": __name__, "__qualname__": name,
                "__doc__": f"lmms-eval's {base} (chat), pruned by D2Pruner: see the module.",
                **_EXTRA.get(base, {})})
            globals()[name] = cls
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
