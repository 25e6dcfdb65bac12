"""D2Pruner inside vLLM: a `vllm.general_plugins` plugin that prunes the image tokens of
LLaVA-1.5 and Qwen2.5-VL.

Off unless enabled. One setting, an environment variable read in every vLLM process (the
API server, the engine core, the workers), so it works with `LLM(...)` and `vllm serve`:

    D2PRUNER_VLLM_K=64         keep 64 image tokens per image (an int >= 1)
    D2PRUNER_VLLM_K=0.25       or a ratio in (0, 1], resolved per image by prune()'s rule
    D2PRUNER_VLLM_OPTIONS='{"pivot_ratio": 0.7, "sim_threshold": 0.8}'   optional, JSON:
                               prune()'s keyword options
    D2PRUNER_VLLM_PRIOR=/path/prior.safetensors                          optional: a
                               PositionalPrior file (resized to the grid when it differs)

What changes (LlavaForConditionalGeneration, vision_feature_select_strategy="default";
`_llava.py`, registered subclasses of vLLM's classes):

- the processor: every image gets k placeholder tokens instead of N = (336 / 14)^2 = 576
  (a LlavaMultiModalProcessor subclass, `_request.ProcessorMixin`), so the KV cache holds k
  slots per image;
- the image path (`_process_image_input` of a LlavaForConditionalGeneration subclass): importance = the
  CLS attention row of the CLIP layer behind `vision_feature_layer`, from that layer's own
  queries and keys (`attention_scores`), features = the projected image features; one
  `prune_varlen` call for all the images of the encoder batch keeps k per image.

This is `hf.apply(model, k, where="vision")` inside vLLM: same kept indices, same tokens.

Qwen2.5-VL (`_qwen2_5_vl.py`): registered, not patched: `register()` points the
architecture at a subclass of vLLM's own model (`ModelRegistry.register_model`), which
carries a subclass of vLLM's processor (`MULTIMODAL_REGISTRY.register_processor`): k
placeholders per image, importance from the vision tower's last full-attention block
(docs/spec.md §15.5), the kept rows handed to vLLM's pruning interface
(`SupportsMultiModalPruning.recompute_mrope_positions`) with their positions. Images only:
an engine that allows videos (vLLM's default) is refused; pass limit_mm_per_prompt
{"video": 0}.
A request may carry its own budget (LLaVA and Qwen): mm_processor_kwargs={"d2pruner_k": 64}
(an int = at most k, or a ratio), checked when the request is made (_request.py).
Misuse (a k out of range, bad options, another architecture, tensor / pipeline
parallelism) raises ValueError when the engine is created: the one wrapped method is
EngineArgs.create_engine_config, for these checks (`remove()` undoes it and the
registrations); no vLLM class of a model is modified, no installed file is edited.

D2PRUNER_VLLM_RECORD=/path/file.jsonl (debugging, tests) appends the kept indices of each
encoder batch, one JSON line per batch.
"""
from __future__ import annotations

import os

from .settings import ENV_K, ENV_OPTIONS, ENV_PRIOR, ENV_RECORD, Settings, read_settings

SUPPORTED = ("LlavaForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
             "Qwen3VLForConditionalGeneration")
QWEN_MODEL = "d2pruner_kernels.vllm_plugin._qwen2_5_vl:D2PrunerQwen2_5_VL"
MODELS = {"LlavaForConditionalGeneration": "d2pruner_kernels.vllm_plugin._llava:D2PrunerLlava",
          "Qwen2_5_VLForConditionalGeneration": QWEN_MODEL,
          "Qwen3VLForConditionalGeneration":
              "d2pruner_kernels.vllm_plugin._qwen3_vl:D2PrunerQwen3VL"}

_REGISTERED: dict = {}   # architecture -> vLLM's own registry entry it replaced

_PATCHES: list = []      # (owner, name, original) of every wrapped attribute
_SETTINGS: Settings | None = None  # the parsed settings of this process, or None (off)


def register() -> None:
    """The `vllm.general_plugins` entry point: runs in every vLLM process. Off unless
    D2PRUNER_VLLM_K is set; raises ValueError (engine start fails) on a bad setting."""
    global _SETTINGS
    if _PATCHES or _REGISTERED:
        return
    settings = read_settings()  # None (off) unless D2PRUNER_VLLM_K is set
    if settings is None:
        return
    _SETTINGS = settings
    from vllm import ModelRegistry
    for arch, target in MODELS.items():
        _REGISTERED.setdefault(arch, ModelRegistry.models.get(arch))
        ModelRegistry.register_model(arch, target)  # a subclass of vLLM's own class
    _wrap(_engine_args(), "create_engine_config", _checked)


def _engine_args():
    from vllm.engine.arg_utils import EngineArgs
    return EngineArgs


def _checked(original):
    """The one wrapped method: EngineArgs.create_engine_config, so that what the plugin does
    not support (another architecture, TP / PP, a k out of range) fails when the engine is
    created, in the calling process, before any worker starts."""
    import functools

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        config = original(self, *args, **kwargs)
        check_model(config)
        return config
    return create_engine_config


def remove() -> None:
    """Undoes every patch of this process."""
    global _SETTINGS
    if _REGISTERED:
        from vllm import ModelRegistry
        for arch, entry in _REGISTERED.items():
            if entry is None:
                ModelRegistry.models.pop(arch, None)
            else:
                ModelRegistry.models[arch] = entry
        _REGISTERED.clear()
    while _PATCHES:
        owner, name, original = _PATCHES.pop()
        if original is None:
            delattr(owner, name)    # it was inherited: the base class's shows again
        else:
            setattr(owner, name, original)
    _SETTINGS = None


def _wrap(owner, name: str, make) -> None:
    own = owner.__dict__.get(name)       # None: inherited from a base class
    inner = own if own is not None else getattr(owner, name)
    wrapped = make(inner)
    wrapped.__wrapped__ = inner
    wrapped.__d2pruner__ = True
    setattr(owner, name, wrapped)
    _PATCHES.append((owner, name, own))


def check_model(vllm_config) -> None:
    """Refuses, at engine start, what the plugin does not support (called only when on)."""
    mc = vllm_config.model_config
    archs = list(getattr(mc, "architectures", None) or [])
    if not any(a in SUPPORTED for a in archs):
        raise ValueError(f"{ENV_K} is set (D2Pruner image-token pruning) but the model "
                         f"{mc.model!r} is {archs or 'of an unknown architecture'}: the "
                         f"d2pruner vLLM plugin supports {', '.join(SUPPORTED)} only; unset "
                         f"{ENV_K} to serve it")
    pc = vllm_config.parallel_config
    if pc.tensor_parallel_size != 1 or pc.pipeline_parallel_size != 1:
        raise ValueError(f"{ENV_K}: tensor / pipeline parallelism is not supported yet "
                         f"(tensor_parallel_size={pc.tensor_parallel_size}, "
                         f"pipeline_parallel_size={pc.pipeline_parallel_size}): the importance "
                         f"averages every head")
    cc = getattr(vllm_config, "compilation_config", None)
    if getattr(cc, "cudagraph_mm_encoder", False):
        raise ValueError(f"{ENV_K}: cudagraph_mm_encoder=True replays the vision encoder as a "
                         f"CUDA graph, which skips the hook that reads its attention: turn it "
                         f"off (the default) to prune")
    if "Qwen2_5_VLForConditionalGeneration" in archs or "Qwen3VLForConditionalGeneration" in archs:
        _check_qwen(mc)
        return
    cfg = mc.hf_config
    strategy = getattr(cfg, "vision_feature_select_strategy", "default")
    if strategy != "default":
        raise ValueError(f"{ENV_K}: LLaVA with vision_feature_select_strategy={strategy!r} "
                         f"is not supported (only 'default': the patch grid without CLS)")
    if not isinstance(cfg.vision_config.model_type, str) or \
            cfg.vision_config.model_type != "clip_vision_model":
        raise ValueError(f"{ENV_K}: LLaVA with a {cfg.vision_config.model_type!r} vision tower "
                         f"is not supported (CLIP only)")
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"{ENV_K}: vision_feature_layer={layer!r} concatenates several CLIP "
                         f"layers; pruning reads the CLS row of one")
    n_layers = cfg.vision_config.num_hidden_layers
    if layer % (n_layers + 1) == 0:
        raise ValueError(f"{ENV_K}: vision_feature_layer={layer} selects the embeddings: no "
                         f"CLS attention row to read")
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    try:
        _SETTINGS.budget(side * side)
    except ValueError as e:
        raise ValueError(f"{ENV_K}: {e} (an image has {side}x{side} = {side * side} "
                         f"tokens)") from None


def _check_qwen(mc) -> None:
    mm = mc.multimodal_config
    videos = mm.get_limit_per_prompt("video") if mm is not None else 0
    if videos:
        raise ValueError(f"{ENV_K}: D2Pruner prunes the images of Qwen-VL only; videos are "
                         f"not supported: start the engine with "
                         f"limit_mm_per_prompt={{'video': 0}} (--limit-mm-per-prompt "
                         f"'{{\"video\": 0}}'), now {videos} per prompt")
    if mm is not None and mm.video_pruning_rate:
        raise ValueError(f"{ENV_K}: video_pruning_rate={mm.video_pruning_rate} and D2Pruner "
                         f"cannot both prune Qwen-VL")


def placeholders(n: int) -> int:
    """The placeholder count of an image of n tokens under this process's settings."""
    return n if _SETTINGS is None else _SETTINGS.budget(n)


__all__ = ["register", "remove", "read_settings", "check_model",
           "ENV_K", "ENV_OPTIONS", "ENV_PRIOR", "ENV_RECORD", "SUPPORTED"]

