"""LLaVA-OneVision (LlavaOnevisionForConditionalGeneration): LLaVA-NeXT's token order
(llava_next.py), read the same way from the prompt:

    one image in its sample   base (side x side) + the unpadded map of H rows, each row
                              followed by image_newline: TokenLayout.grid(side, side) +
                              TokenLayout.grid(H, W + 1). With vision_aspect_ratio
                              'anyres_max_n' a map larger than ~n base images is first
                              downscaled bilinearly: (H, W) is then the downscaled map's,
                              the picture the LLM sees, and its newlines sit at its width.
    several images in a sample (batch_num_images > 1): each image is its base + one
                              trailing newline, TokenLayout.grid(side, side) +
                              TokenLayout.grid(1, 1) (the lone newline, a piece of its own).

Video tokens (`video_token_id`) are left as they are. where="llm" only.
"""
from __future__ import annotations

from .llava_next import LlavaNextAdapter


class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration",)

    def _check_config(self, cfg) -> None:
        strategy = cfg.vision_feature_select_strategy
        has_cls = getattr(cfg.vision_config, "model_type", "") == "clip_vision_model"
        if strategy != "default" and has_cls:
            raise ValueError(f"LLaVA-OneVision with a CLIP tower and "
                             f"vision_feature_select_strategy={strategy!r} keeps the CLS token: "
                             f"its base image is not the {self.side}x{self.side} patch grid")
        if not str(cfg.vision_aspect_ratio).startswith("anyres_max_"):
            raise ValueError(f"vision_aspect_ratio={cfg.vision_aspect_ratio!r}: transformers "
                             f"reads only 'anyres_max_<n>'")
