"""The LLaVA patches: placeholder count in the processor, pruning in the image path, and
the model check at engine creation. Installed by `register()` when pruning is on."""
from __future__ import annotations

import functools
import json

import torch

from ..attention_scores import attention_scores
from ..varlen import prune_varlen


def install(settings, wrap) -> None:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.models import llava

    from . import check_model

    def engine_config(original):
        @functools.wraps(original)
        def create_engine_config(self, *args, **kwargs):
            config = original(self, *args, **kwargs)
            check_model(config)
            return config
        return create_engine_config

    def num_tokens(original):
        @functools.wraps(original)
        def get_num_image_tokens(self, *args, **kwargs):
            return settings.budget(original(self, *args, **kwargs))
        return get_num_image_tokens

    def image_input(original):
        @functools.wraps(original)
        def _process_image_input(self, image_input):
            if _is_embeddings(image_input):
                return original(self, image_input)  # given features: placeholders unchanged
            tap = _tap(self)
            tap.rows = None
            try:
                features = original(self, image_input)
                return _prune(settings, tap, features)
            finally:
                tap.rows = None
        return _process_image_input

    wrap(EngineArgs, "create_engine_config", engine_config)
    wrap(llava.LlavaProcessingInfo, "get_num_image_tokens", num_tokens)
    wrap(llava.LlavaForConditionalGeneration, "_process_image_input", image_input)


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
