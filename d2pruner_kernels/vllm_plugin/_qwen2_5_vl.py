"""Qwen2.5-VL images with D2Pruner in vLLM, by registration: subclasses of vLLM's own model
and processor classes, registered by `register()` (`ModelRegistry.register_model`) only when
D2PRUNER_VLLM_K is set; the processor is attached with `MULTIMODAL_REGISTRY.register_processor`.

- processor: each image gets k placeholders (D2PRUNER_VLLM_K: an int = at most k, a ratio per
  image) instead of t * h * w / 4;
- model (`embed_multimodal`): the vision tower runs as in vLLM; a forward pre-hook on the
  attention op of its last full-attention block reads that block's rotated q and k and
  computes the vision-side importance (hf/qwen_vision.py); one `prune_varlen` call keeps k
  merged tokens per image of the encoder batch; each kept row gets vLLM's 4 position
  channels appended (t, h, w of its LLM grid cell, then the image's M-RoPE extent), and the
  model runner rewrites the M-RoPE positions through `recompute_mrope_positions`
  (`SupportsMultiModalPruning`, inherited): kept tokens keep their original (t, h, w), the
  text after an image continues where it would without pruning.

This is `hf.apply(model, k, where="vision")` inside vLLM: same kept indices, same tokens
(tests/test_vllm_qwen.py).

The runner does that rewrite only when `MultiModalConfig.is_multimodal_pruning_enabled()`
(today: a video pruning rate > 0). The narrowest switch the code allows: this model's
`__init__` (in the worker, before vLLM's `__init__` reads it) gives this engine's own
MultiModalConfig *instance* an `is_multimodal_pruning_enabled` returning True; no class,
function or file of vLLM changes, and engines without the plugin are untouched.
Channel 3 is max(t, h, w) of the LLM grid (transformers' `get_rope_index` offset), not vLLM's
llm_grid_w, so tall images keep their text positions exact.
"""
from __future__ import annotations

import json
import torch
from vllm.model_executor.models import qwen2_5_vl as base
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..hf.qwen_vision import vision_importance
from ..varlen import prune_varlen
from ._request import KWARG, InfoMixin, ProcessorMixin, budgets, settings

ARCH = "Qwen2_5_VLForConditionalGeneration"


class QwenProcessorMixin(ProcessorMixin):
    """k placeholders per image: an image of grid (t, h, w) has t * h * w / merge^2 tokens."""
    _d2pruner_field = "image_grid_thw"

    def _d2pruner_token(self) -> int:
        return self.info.get_hf_config().image_token_id

    def _d2pruner_tokens(self, item) -> int:
        unit = self.info.get_hf_config().vision_config.spatial_merge_size ** 2
        return int(item["image_grid_thw"].data.prod()) // unit


class D2PrunerQwen2_5_VLProcessingInfo(InfoMixin, base.Qwen2_5_VLProcessingInfo):
    pass


class D2PrunerQwen2_5_VLProcessor(QwenProcessorMixin, base.Qwen2_5_VLMultiModalProcessor):
    """vLLM's Qwen2.5-VL processor with k placeholders per image."""


class _Tap:
    """A forward pre-hook on the attention op of the tower's last full-attention block."""

    def __init__(self, visual, block: int, windows: bool):
        self.visual, self.windows = visual, windows
        attn = visual.blocks[block].attn
        self.scale = attn.hidden_size_per_attention_head ** -0.5
        self.grids = None
        self.scores = None
        self.handle = attn.attn.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if self.grids is None:
            return None
        q = args[0] if len(args) > 0 else kwargs["query"]
        k = args[1] if len(args) > 1 else kwargs["key"]
        if q.shape[0] != 1:
            raise RuntimeError(f"d2pruner: the vision block's queries are {list(q.shape)}, "
                               f"expected one packed sequence [1, S, H, d]")
        merge = self.visual.spatial_merge_size
        if self.windows:  # Qwen2.5-VL runs its tower in window order
            orders = [self.visual.get_window_index_thw(t, h, w)[0] for t, h, w in self.grids]
        else:
            orders = [torch.arange(t * (h // merge) * (w // merge)) for t, h, w in self.grids]
        self.scores = vision_importance(q[0].detach(), k[0].detach(), self.grids, orders,
                                        merge, scale=self.scale)
        return None


def _positions(grid, merge: int) -> torch.Tensor:
    """[N, 4] float: (t, h, w) of each merged token in raster order, then the image's
    M-RoPE extent max(t, h, w) of the LLM grid (the text after it starts there)."""
    t, h, w = (int(grid[0]), int(grid[1]) // merge, int(grid[2]) // merge)
    tt = torch.arange(t).view(-1, 1, 1).expand(t, h, w).reshape(-1)
    hh = torch.arange(h).view(1, -1, 1).expand(t, h, w).reshape(-1)
    ww = torch.arange(w).view(1, 1, -1).expand(t, h, w).reshape(-1)
    ext = torch.full_like(tt, max(t, h, w))
    return torch.stack([tt, hh, ww, ext], dim=1)


def _cpu_runner_flag() -> None:
    """vLLM 0.32's CPUModelRunner.load_model (unlike GPUModelRunner.load_model) never sets
    the runner's `is_multimodal_pruning_enabled` from the config: it stays False and the
    position rewrite never runs on the CPU build (EVS included). The CPU runner that is
    loading this model is found on the call stack and its flag set; on GPU nothing is done
    (the GPU runner reads the config instance above after loading)."""
    import inspect
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except ImportError:
        return
    frame = inspect.currentframe()
    try:
        while frame is not None:
            runner = frame.f_locals.get("self")
            if isinstance(runner, CPUModelRunner):
                runner.is_multimodal_pruning_enabled = True
                return
            frame = frame.f_back
    finally:
        del frame


class ModelMixin:
    """The pruning of images, mixed into a subclass of vLLM's Qwen model (before it)."""
    _d2pruner_name = "Qwen2.5-VL"
    _d2pruner_windows = True

    def __init__(self, *, vllm_config, prefix: str = ""):
        settings()
        mm_config = vllm_config.model_config.multimodal_config
        # the runner's M-RoPE rewrite (see the module docstring): this engine's config only
        object.__setattr__(mm_config, "is_multimodal_pruning_enabled", lambda: True)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        _cpu_runner_flag()
        self._d2pruner_tap = _Tap(self.visual, self._d2pruner_block(), self._d2pruner_windows)

    def _d2pruner_block(self) -> int:
        return self.visual.fullatt_block_indexes[-1]

    def get_mrope_input_positions(self, input_tokens, mm_features):
        """M-RoPE positions of the pruned prompt (vLLM's own assume t * h * w / 4 placeholders
        per image). The text is placed exactly as without pruning (after an image at its
        extent max(t, h, w)), so a prefix-cache hit that skips an image leaves the text after
        it right; the image's own k rows get the image's base position on all three axes
        until the runner rewrites them (`recompute_mrope_positions`) from the kept rows'
        channels, before they are computed."""
        merge = self.config.vision_config.spatial_merge_size
        n = len(input_tokens)
        pos = torch.empty(3, n, dtype=torch.long)
        st, nxt = 0, 0
        for f in sorted(mm_features, key=lambda f: f.mm_position.offset):
            if f.modality != "image":
                raise ValueError("d2pruner (D2PRUNER_VLLM_K): only images are supported with "
                                 f"{self._d2pruner_name}; this request has a {f.modality}")
            offset, length = f.mm_position.offset, f.mm_position.length
            t, h, w = (int(x) for x in f.data["image_grid_thw"].data.tolist())
            pos[:, st:offset] = torch.arange(nxt, nxt + offset - st)
            nxt += offset - st
            pos[:, offset:offset + length] = nxt
            nxt += max(t, h // merge, w // merge)
            st = offset + length
        pos[:, st:] = torch.arange(nxt, nxt + n - st)
        return pos, int(pos.max()) + 1 - n if n else 0

    def embed_multimodal(self, **kwargs):
        by_modality = self._parse_and_validate_multimodal_inputs(**kwargs)
        out: tuple = ()
        for modality, item in by_modality.items():
            if modality != "image":
                raise ValueError("d2pruner (D2PRUNER_VLLM_K): only images are supported with "
                                 f"{self._d2pruner_name}; this request has a {modality}")
            out += self._d2pruner_images(item, kwargs.get(KWARG))
        return out

    def _d2pruner_images(self, image_input, codes=None):
        opts = settings()
        grid_thw = image_input["image_grid_thw"]
        grids = [tuple(int(x) for x in g) for g in grid_thw.tolist()]
        merge = self.visual.spatial_merge_size
        if image_input["type"] == "image_embeds":  # no attention to read: kept whole
            feats = super()._process_image_input(image_input)
            return tuple(torch.cat([f, _positions(g, merge).to(f)], dim=1)
                         for f, g in zip(feats, grids))
        tap = self._d2pruner_tap
        tap.grids, tap.scores = grids, None
        try:
            feats = super()._process_image_input(image_input)
            scores = tap.scores
        finally:
            tap.grids, tap.scores = None, None
        lengths = [t * (h // merge) * (w // merge) for t, h, w in grids]
        tokens = torch.cat(list(feats))
        if scores is None or scores.numel() != tokens.shape[0]:
            raise RuntimeError(f"d2pruner: the vision importance "
                               f"({None if scores is None else scores.numel()}) does not match "
                               f"the {tokens.shape[0]} image features")
        ks = budgets(codes, lengths)  # each image's, as its placeholders were counted
        cu = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)  # host: no sync
        llm_grids = [(t, h // merge, w // merge) if t > 1 else (h // merge, w // merge)
                     for t, h, w in grids]
        width = getattr(self, "visual_dim", tokens.shape[1])  # Qwen3-VL: DeepStack columns after
        keep, cu_keep = prune_varlen(tokens[:, :width].detach(), scores, cu, llm_grids, ks,
                                     options=opts.options)
        keep_host = keep.cpu()  # the positions are built on the host, as vLLM's EVS does
        ck = [0]
        for n in ks:
            ck.append(ck[-1] + n)
        kept = [keep_host[ck[b]:ck[b + 1]] - int(cu[b]) for b in range(len(grids))]
        out = []
        for b, g in enumerate(grids):
            pos = _positions(g, merge)[kept[b]].to(tokens)
            out.append(torch.cat([tokens[keep[ck[b]:ck[b + 1]]], pos], dim=1))
        if opts.record:
            kept = [x.tolist() for x in kept]
            with open(opts.record, "a") as f:
                f.write(json.dumps({"n": lengths, "k": ks, "kept": kept}) + "\n")
        return tuple(out)


@MULTIMODAL_REGISTRY.register_processor(D2PrunerQwen2_5_VLProcessor,
                                        info=D2PrunerQwen2_5_VLProcessingInfo,
                                        dummy_inputs=base.Qwen2_5_VLDummyInputsBuilder)
class D2PrunerQwen2_5_VL(ModelMixin, base.Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with D2Pruner on its images (see the module docstring)."""
