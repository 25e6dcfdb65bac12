"""Qwen3-VL (Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration): what the
pruner needs to know. Verified in transformers 5.25's modeling_qwen3_vl.py /
modeling_qwen3_vl_moe.py / processing_qwen3_vl.py.

- Images: 16-pixel patches merged 2 x 2 (`spatial_merge_size`): an image is a
  (t, h / 2, w / 2) grid of LLM tokens, one run of `image_token_id`, read from the M-RoPE
  positions as for Qwen2-VL (get_vision_position_ids puts it on that lattice).
- Videos: the processor writes each frame (temporal patch) as "<t seconds>" + vision
  start + h * w / 4 video tokens + vision end, and get_rope_index splits video_grid_thw
  into one (1, h, w) grid per frame: a video is several runs with timestamp text between
  them. The text is never pruned; the frames are one item (qwen_video.py groups them by
  the per-video split of the vision tower's outputs).
- DeepStack: Qwen3VLTextModel.forward adds `deepstack_visual_embeds[i]` to the hidden
  states at `visual_pos_masks` (images and videos) right after decoder layer i, for
  i < len(deepstack_visual_indexes) (3 in the released models: layers 0, 1, 2), inside its
  layer loop. Pruning at layer K: the levels i < K are added by the model as always (so
  the features, the hidden states entering layer K, are taken after level K - 1's addition:
  what layer K's forward pre-hook receives); the levels i >= K are taken out of the list
  the model iterates (our copy of it, given through the language model's forward pre-hook)
  and added by a forward hook on decoder layer i at the kept visual positions only, each
  kept token getting its own feature row, with the same operations as _deepstack_process.
"""
from __future__ import annotations

import functools

import torch

from .qwen_video import QwenVideoAdapter


class Qwen3VLAdapter(QwenVideoAdapter):
    family = "qwen3_vl"
    model_classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")

    def __init__(self, model):
        super().__init__(model)
        self.deepstack_levels = len(getattr(model.config.vision_config,
                                            "deepstack_visual_indexes", None) or ())
        self._layer = None
        self._ds = None

    def vision_source(self):
        """where='vision': the tower's last block (docs/spec.md §15.5)."""
        from .qwen_vision import qwen3_rows
        return qwen3_rows(self.model.model.visual)

    def install_llm(self, layer: int, handles: list) -> None:
        """DeepStack's levels from `layer` on follow the kept tokens (see the module doc)."""
        self._layer, self._ds = layer, None
        if self.deepstack_levels <= layer:
            return  # every level is added before the pruned layer: nothing to follow
        lm = self.language_model
        handles.append(lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
        handles.append(lm.register_forward_hook(self._lm_post, always_call=True))
        for i in range(layer, min(self.deepstack_levels, len(lm.layers))):
            handles.append(lm.layers[i].register_forward_hook(
                functools.partial(self._add, i)))

    def _lm_pre(self, module, args, kwargs):
        self._ds = None
        embeds, mask = kwargs.get("deepstack_visual_embeds"), kwargs.get("visual_pos_masks")
        if embeds is None or mask is None or len(embeds) <= self._layer:
            return None
        levels = list(embeds)  # ours: pruned() shortens it, the model's list is untouched
        self._ds = {"levels": levels, "mask": mask, "add": {}}
        return args, dict(kwargs, deepstack_visual_embeds=levels)

    def _lm_post(self, module, args, output):
        self._ds = None
        return None

    def pruned(self, idx: torch.Tensor, slot: torch.Tensor) -> None:
        """The prefill keeps positions idx [B, L'] (slot False: filler): the levels >= K go
        to the kept visual positions, with the rows of their tokens."""
        ds = self._ds
        if ds is None:
            return
        mask = ds["mask"].to(device=idx.device, dtype=torch.bool)
        rows = torch.full(mask.shape, -1, dtype=torch.long, device=idx.device)
        rows[mask] = torch.arange(int(mask.sum()), device=idx.device)
        kept = mask.gather(1, idx) & slot
        take = rows.gather(1, idx)[kept]
        levels = ds["levels"]
        for i in range(self._layer, len(levels)):
            ds["add"][i] = (kept, levels[i].index_select(0, take.to(levels[i].device)))
        del levels[self._layer:]  # the model adds no level from K on

    def _add(self, index, module, args, output):
        ds = self._ds
        if ds is None or index not in ds["add"]:
            return None
        mask, embeds = ds["add"][index]
        hidden = output[0] if isinstance(output, tuple) else output
        # transformers' _deepstack_process on the kept sequence
        mask = mask.to(hidden.device)
        embeds = embeds.to(hidden.device, hidden.dtype)
        hidden = hidden.clone()
        hidden[mask, :] = hidden[mask, :] + embeds
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden
