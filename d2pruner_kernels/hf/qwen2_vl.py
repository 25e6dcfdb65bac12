"""Qwen2-VL and Qwen2.5-VL (Qwen2VLForConditionalGeneration,
Qwen2_5_VLForConditionalGeneration): what the pruner needs to know.

Images are the runs of `config.image_token_id` (one run per image, between its vision
start / end tokens), in the order of `image_grid_thw`. The vision tower merges
`spatial_merge_size`^2 patches into one LLM token, so an image is a (t, h / merge,
w / merge) grid in the LLM, row-major. The grid is read from the M-RoPE positions the
language model receives (its image tokens sit on exactly that (t, h, w) lattice): they are
there in every prefill, including generate()'s, whose forward no longer gets
`image_grid_thw` (transformers >= 5.19 encodes the images before the prefill); where the
forward does get `image_grid_thw`, the two must agree. Decoding positions come from the
model's `rope_deltas`, computed on the full prompt and left alone.

Video tokens (`video_token_id`) are left as they are here (Qwen2-VL); Qwen2.5-VL and
Qwen3-VL prune each video as one item (qwen_video.py, qwen3_vl.py).
"""
from __future__ import annotations

import torch

from ._common import Adapter


class Qwen2VLAdapter(Adapter):
    family = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration",)  # Qwen2.5-VL: QwenVideoAdapter

    def __init__(self, model):
        super().__init__(model)
        self._transformers_parts()
        self.merge = model.config.vision_config.spatial_merge_size

    def check(self, where: str) -> None:
        if type(self).vision_source is Adapter.vision_source:  # Qwen2-VL: no vision side
            self._llm_only(where)
        cfg = self.language_model.config
        types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
        if getattr(cfg, "use_sliding_window", False) or types != {"full_attention"}:
            raise ValueError("sliding-window attention layers are not supported: their masks "
                             "and caches would need the window over the kept tokens")

    def images(self, sample: int, runs: list, lm_kwargs: dict, outer: dict) -> list:
        if not runs:
            return []
        pos = lm_kwargs.get("position_ids")
        if not (isinstance(pos, torch.Tensor) and pos.dim() == 3 and pos.shape[0] in (3, 4)):
            raise ValueError(f"sample {sample} has image tokens but the language model got no "
                             f"M-RoPE position ids [3, B, L]: pass image_grid_thw and "
                             f"mm_token_type_ids as the processor returns them")
        pos = pos[-3:, sample if pos.shape[1] > 1 else 0]
        out = []
        for i, (s, e) in enumerate(runs):
            p = pos[:, s:e]
            lo = p.min(dim=1).values
            t, h, w = (p.max(dim=1).values - lo + 1).tolist()
            grid = (t, h, w)
            lattice = torch.stack(torch.meshgrid(
                *(torch.arange(n, device=p.device) + o for n, o in zip(grid, lo.tolist())),
                indexing="ij")).reshape(3, -1)
            if t * h * w != e - s or not torch.equal(lattice, p):
                raise ValueError(f"sample {sample}, image {i}: its {e - s} tokens at positions "
                                 f"{s}..{e - 1} do not form a (t, h, w) grid in their M-RoPE "
                                 f"positions (extent {grid}): an image token count that does "
                                 f"not match its grid")
            out.append((s, e, grid))
        return out

    def decode_positions(self, past: int, steps: int, batch: int, device) -> torch.Tensor:
        """M-RoPE positions [3, B, steps] of tokens after `past` tokens of the unpruned
        sequence, as the model places them from a full-length mask (where="vision": its
        cache holds the shortened prompt, so its own count would be short)."""
        pos = torch.arange(past, past + steps, device=device).view(1, 1, -1).expand(3, batch, -1)
        deltas = self.model.model.rope_deltas  # the prefill's, from the unpruned prompt
        if deltas is None:
            return pos
        deltas = deltas.to(device).repeat_interleave(batch // deltas.shape[0], dim=0)
        return pos + deltas.view(1, batch, -1)

    def check_images(self, spans: list, outer: dict) -> None:
        thw = outer.get("image_grid_thw")
        if not isinstance(thw, torch.Tensor):
            return
        want = [(t, h // self.merge, w // self.merge) for t, h, w in thw.tolist()]
        got = [g for sample in spans for _, _, g in sample]
        if got != want:
            raise ValueError(f"the image grids of the prompt's M-RoPE positions {got} disagree "
                             f"with image_grid_thw / spatial_merge_size {want}")
