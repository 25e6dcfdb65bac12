"""Per-request budgets, shared by the registered processors (LLaVA, Qwen2.5-VL, Qwen3-VL): a
request may carry its own k, `mm_processor_kwargs={"d2pruner_k": 64}` (an int = at most k,
or a ratio per image), falling back to D2PRUNER_VLLM_K. The processor checks it when the
request is made, counts each image's placeholders by it and hands it to the model as one
more batched image field (one float per image), so the selection follows the same value."""
from __future__ import annotations

import torch

KWARG = "d2pruner_k"  # a request's own budget: mm_processor_kwargs={"d2pruner_k": 64}
KWARG_NAME = f"mm_processor_kwargs[{KWARG!r}]"


def settings():
    from . import _SETTINGS
    if _SETTINGS is None:
        raise RuntimeError("d2pruner: a pruning model is registered but D2PRUNER_VLLM_K is "
                           "not set in this process")
    return _SETTINGS


def request_k(raw):
    """A request's budget (mm_processor_kwargs' d2pruner_k), checked; None: the engine's."""
    if raw is None:
        return settings().k
    from ..checks import check_k
    try:
        return check_k(raw, KWARG_NAME)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{e} (got {raw!r})") from None


def budget(k, n: int, name: str) -> int:
    """Placeholders (= kept tokens) of an image of n tokens: an int k keeps at most k (all n
    of a smaller image), a ratio its share of each image."""
    from ..checks import resolve_k
    return resolve_k(k, n, name=name, at_most=True)


def encode_k(k) -> float:
    """A budget as one float per image (a batched field): an int k as k, a ratio r as -r."""
    return float(k) if isinstance(k, int) else -float(k)


def decode_k(code: float):
    return int(code) if code > 0 else -float(code)


def budgets(codes, lengths: list) -> list:
    """Each image's budget: its request's (codes: the batched field, one per image) or, with
    no codes, the engine's."""
    if codes is None:
        return [budget(settings().k, n, "D2PRUNER_VLLM_K") for n in lengths]
    codes = torch.as_tensor(codes).reshape(-1).tolist()
    if len(codes) != len(lengths):
        raise RuntimeError(f"d2pruner: {len(codes)} budgets for {len(lengths)} images")
    return [budget(decode_k(c), n, KWARG_NAME) for c, n in zip(codes, lengths)]


class InfoMixin:
    """vLLM's processing info, less the d2pruner_k request option (not the HF processor's)."""

    def get_hf_processor(self, **kwargs):
        kwargs.pop(KWARG, None)
        return super().get_hf_processor(**kwargs)


class ProcessorMixin:
    """k placeholders per image (pixels); given embeddings keep their count. Mixed into a
    subclass of vLLM's processor (before it), which says which output field counts the
    images (`_d2pruner_field`), the placeholder token (`_d2pruner_token()`) and an item's
    unpruned token count (`_d2pruner_tokens(item)`)."""

    _d2pruner_field = "pixel_values"

    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        hf_kwargs = dict(hf_kwargs)
        k = request_k(hf_kwargs.pop(KWARG, None))
        out = super()._apply_hf_processor_main(mm_items, hf_kwargs)
        if self._d2pruner_field in out:
            out[KWARG] = torch.full((len(out[self._d2pruner_field]),), encode_k(k),
                                    dtype=torch.float64)
        return out

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        from vllm.multimodal.inputs import MultiModalFieldConfig
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        if KWARG in hf_inputs:
            fields[KWARG] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        return fields

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        from vllm.multimodal.processing import PromptReplacement
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        engine_k = settings().k
        token = self._d2pruner_token()

        def image_replacement(item_idx: int):
            item = out_mm_kwargs["image"][item_idx]
            n = self._d2pruner_tokens(item)
            if "image_embeds" in item:
                return [token] * n
            if KWARG in item:
                return [token] * budget(decode_k(float(item[KWARG].data)), n, KWARG_NAME)
            return [token] * budget(engine_k, n, "D2PRUNER_VLLM_K")

        return [PromptReplacement(modality="image", target=[token],
                                  replacement=image_replacement)
                if u.modality == "image" else u for u in updates]
