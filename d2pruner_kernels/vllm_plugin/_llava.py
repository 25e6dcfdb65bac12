"""LLaVA-1.5 with D2Pruner in vLLM, by registration: a subclass of vLLM's model whose
`_process_image_input` prunes (one prune_varlen per encoder batch), carrying a subclass of
vLLM's processing info whose `get_num_image_tokens` is k (`MULTIMODAL_REGISTRY.register_processor`);
`register()` points the architecture at it (`ModelRegistry.register_model`) when
D2PRUNER_VLLM_K is set. No vLLM class is modified."""
from __future__ import annotations

import json

import torch
from transformers import LlavaConfig
from vllm.model_executor.models import llava
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..attention_scores import attention_scores
from ..varlen import prune_varlen


def _settings():
    from . import _SETTINGS
    if _SETTINGS is None:
        raise RuntimeError("d2pruner: the LLaVA pruning model is registered but "
                           "D2PRUNER_VLLM_K is not set in this process")
    return _SETTINGS


class D2PrunerLlavaProcessingInfo(llava.LlavaProcessingInfo):
    """vLLM's, with k placeholders per image instead of 576."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return _settings().budget(n)


def _info(ctx):
    cfg = ctx.get_hf_config(LlavaConfig)
    if type(cfg.vision_config).__name__ == "PixtralVisionConfig":
        raise ValueError("D2PRUNER_VLLM_K: LLaVA with a Pixtral vision tower is not supported "
                         "(CLIP only)")
    return D2PrunerLlavaProcessingInfo(ctx)


def _processor(info, dummy_inputs):
    return llava.LlavaMultiModalProcessor(info, dummy_inputs)


@MULTIMODAL_REGISTRY.register_processor(_processor, info=_info,
                                        dummy_inputs=llava.LlavaDummyInputsBuilder)
class D2PrunerLlava(llava.LlavaForConditionalGeneration):
    """vLLM's LLaVA; its image path keeps k tokens per image (CLS row of the feature layer)."""

    def _process_image_input(self, image_input):
        if _is_embeddings(image_input):
            return super()._process_image_input(image_input)  # given features: unchanged
        tap = _tap(self)
        tap.rows = None
        try:
            features = super()._process_image_input(image_input)
            return _prune(_settings(), tap, features)
        finally:
            tap.rows = None


def _is_embeddings(image_input) -> bool:
    try:
        return image_input["type"] == "image_embeds"
    except (KeyError, TypeError):
        return False


class _Tap:
    """A forward pre-hook on the attention op of the CLIP feature layer: the CLS row."""

    def __init__(self, self_attn, side: int):
        self.heads = self_attn.num_heads_per_partition
        self.head_dim = self_attn.head_dim
        self.scale = float(self_attn.scale)
        self.grid = (side, side)
        self.rows = None
        self.handle = self_attn.attn.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        query = args[0] if len(args) > 0 else kwargs["query"]
        key = args[1] if len(args) > 1 else kwargs["key"]
        b, length = query.shape[0], query.shape[1]
        q = query.detach().reshape(b, length, self.heads, self.head_dim).transpose(1, 2)
        k = key.detach().reshape(b, length, self.heads, self.head_dim).transpose(1, 2)
        # CLS is token 0; the softmax runs over every key (CLS and patches), like the layer's
        self.rows = attention_scores(q[:, :, :1], k, key_span=(1, length), scale=self.scale)
        return None


def _tap(model) -> _Tap:
    tap = getattr(model, "_d2pruner_tap", None)
    if tap is None:
        cfg = model.config
        layers = model.vision_tower.vision_model.encoder.layers
        index = cfg.vision_feature_layer % (cfg.vision_config.num_hidden_layers + 1) - 1
        if not 0 <= index < len(layers):
            raise RuntimeError(f"d2pruner: vision_feature_layer={cfg.vision_feature_layer} "
                               f"has no layer among the {len(layers)} of the vision tower")
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        tap = _Tap(layers[index].self_attn, side)
        model._d2pruner_tap = tap
    return tap


def _prune(settings, tap: _Tap, features):
    """features: the projected image features, [n, N, D] (or n tensors [N, D]) ->
    [n, k, D], one prune_varlen call for every image of the batch."""
    rows = tap.rows
    parts = list(features) if not isinstance(features, torch.Tensor) else None
    stacked = features if parts is None else torch.stack(parts)
    n_img, n, dim = stacked.shape
    if rows is None or tuple(rows.shape) != (n_img, n):
        raise RuntimeError(f"d2pruner: the CLS rows of the vision feature layer "
                           f"({None if rows is None else list(rows.shape)}) do not match the "
                           f"projected features {list(stacked.shape[:2])}")
    if tap.grid[0] * tap.grid[1] != n:
        raise RuntimeError(f"d2pruner: {n} features per image, expected the "
                           f"{tap.grid[0]}x{tap.grid[1]} patch grid")
    k = settings.budget(n)
    tokens = stacked.reshape(n_img * n, dim)
    cu = torch.arange(0, (n_img + 1) * n, n, dtype=torch.int64)  # host offsets: never a sync
    keep, _ = prune_varlen(tokens.detach(), rows.reshape(-1), cu, [tap.grid] * n_img, k,
                           options=settings.options)
    if settings.record:
        local = (keep.view(n_img, k).cpu() - cu[:-1].view(-1, 1)).tolist()
        with open(settings.record, "a") as f:
            f.write(json.dumps({"n": n, "k": k, "kept": local}) + "\n")
    pruned = tokens[keep].view(n_img, k, dim)
    return pruned if parts is None else tuple(pruned.unbind(0))
