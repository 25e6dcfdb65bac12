"""LLaVA-1.5 with D2Pruner in vLLM, by registration: a subclass of vLLM's model whose
`_process_image_input` prunes (one prune_varlen per encoder batch), carrying subclasses of
vLLM's processing info (unchanged counts: vLLM profiles with 576) and processor (each
image's placeholders follow its request's k, `mm_processor_kwargs={"d2pruner_k": ...}`, or
the engine's, _request.py), attached with `MULTIMODAL_REGISTRY.register_processor`; `register()` points
the architecture at it (`ModelRegistry.register_model`) when D2PRUNER_VLLM_K is set. No
vLLM class is modified."""
from __future__ import annotations

import json

import torch
from transformers import LlavaConfig
from vllm.model_executor.models import llava
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..attention_scores import attention_scores
from ..varlen import prune_varlen
from ._request import KWARG, InfoMixin, ProcessorMixin, budgets, settings


class D2PrunerLlavaProcessingInfo(InfoMixin, llava.LlavaProcessingInfo):
    """vLLM's (576 tokens per image at most: what it profiles with), less the d2pruner_k
    request option."""


class D2PrunerLlavaProcessor(ProcessorMixin, llava.LlavaMultiModalProcessor):
    """vLLM's LLaVA processor; each image's placeholders follow its request's k."""

    def _d2pruner_token(self) -> int:
        return self.info.get_hf_config().image_token_index

    def _d2pruner_tokens(self, item) -> int:
        vc = self.info.get_hf_config().vision_config
        return (vc.image_size // vc.patch_size) ** 2


def _info(ctx):
    cfg = ctx.get_hf_config(LlavaConfig)
    if type(cfg.vision_config).__name__ == "PixtralVisionConfig":
        raise ValueError("D2PRUNER_VLLM_K: LLaVA with a Pixtral vision tower is not supported "
                         "(CLIP only)")
    return D2PrunerLlavaProcessingInfo(ctx)


@MULTIMODAL_REGISTRY.register_processor(D2PrunerLlavaProcessor, info=_info,
                                        dummy_inputs=llava.LlavaDummyInputsBuilder)
class D2PrunerLlava(llava.LlavaForConditionalGeneration):
    """vLLM's LLaVA; its image path keeps k tokens per image (CLS row of the feature layer),
    k the engine's or each image's request's (the batched d2pruner_k field)."""

    def embed_multimodal(self, **kwargs):
        self._d2pruner_codes = kwargs.pop(KWARG, None)
        try:
            return super().embed_multimodal(**kwargs)
        finally:
            self._d2pruner_codes = None

    def _process_image_input(self, image_input):
        if _is_embeddings(image_input):
            return super()._process_image_input(image_input)  # given features: unchanged
        tap = _tap(self)
        tap.rows = None
        try:
            features = super()._process_image_input(image_input)
            return _prune(settings(), tap, features, getattr(self, "_d2pruner_codes", None))
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


def _prune(opts, tap: _Tap, features, codes=None):
    """features: the projected image features, [n, N, D] (or n tensors [N, D]) ->
    [n, k, D] (n tensors [k_i, D] where the requests' budgets differ), one prune_varlen
    call for every image of the batch."""
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
    ks = budgets(codes, [n] * n_img)
    tokens = stacked.reshape(n_img * n, dim)
    cu = torch.arange(0, (n_img + 1) * n, n, dtype=torch.int64)  # host offsets: never a sync
    keep, _ = prune_varlen(tokens.detach(), rows.reshape(-1), cu, [tap.grid] * n_img, ks,
                           options=opts.options)
    if opts.record:
        local = [(part.cpu() - int(cu[b])).tolist()
                 for b, part in enumerate(keep.split(ks))]
        with open(opts.record, "a") as f:
            f.write(json.dumps({"n": n, "k": ks, "kept": local}) + "\n")
    if len(set(ks)) == 1:
        pruned = tokens[keep].view(n_img, ks[0], dim)
        return pruned if parts is None else tuple(pruned.unbind(0))
    return tuple(tokens[keep].split(ks))
