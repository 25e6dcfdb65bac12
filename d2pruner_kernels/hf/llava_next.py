"""LLaVA-NeXT (LlavaNextForConditionalGeneration, anyres): what the pruner needs to know.

An image is one run of `config.image_token_id` placeholders holding, in this order
(transformers' `pack_image_features`, read in the installed source):

    the base image        side x side patches, row-major (side = image_size / patch_size)
    the high-res map      H rows of W patches, each row followed by one `image_newline`
                          token (the tiles stitched, then unpadded to the image's aspect)

so its layout is TokenLayout.grid(side, side) + TokenLayout.grid(H, W + 1): the newline
that ends row r sits at column W, one right of the row's last patch (its spatial
neighbours are that row's and the adjacent rows' last patches); base and map are never
spatial neighbours. Newline tokens are image tokens like the others and compete for k.

(H, W) is read from the prompt itself, not from `image_sizes`: the newline rows are
exactly the model's `image_newline` vector (the model writes that parameter into
inputs_embeds), so each run's first newline after the base gives W and the rows that
follow give H. That is where the vision tower's work is visible in every prefill,
generate()'s included (transformers >= 5.19 encodes the images before the prefill and
drops pixel_values / image_sizes from it), and it is the layout the model built, whatever
image_sizes said. An image whose map has no rows (`pack_image_features`' single-patch
branch: base + one trailing newline; LLaVA-OneVision's images of a multi-image sample)
has layout TokenLayout.grid(side, side) + TokenLayout.grid(1, 1): the lone newline is a
piece of its own, with no spatial neighbour (ours). Several images in one run are cut
the same way (a map row is never as long as a base image).

where="llm" only (no CLS row to read on the vision side of a tiled image).
"""
from __future__ import annotations

import torch

from ..token_layout import TokenLayout
from ._common import Adapter


class LlavaNextAdapter(Adapter):
    family = "llava_next"
    model_classes = ("LlavaNextForConditionalGeneration",)

    def __init__(self, model):
        super().__init__(model)
        self._transformers_parts()
        vc = model.config.vision_config
        self.side = vc.image_size // vc.patch_size
        self.base = self.side * self.side

    def check(self, where: str) -> None:
        self._llm_only(where, "tiles its images")
        self._check_config(self.model.config)

    def _check_config(self, cfg) -> None:
        strategy = cfg.vision_feature_select_strategy
        if strategy != "default":
            raise ValueError(f"LLaVA-NeXT with vision_feature_select_strategy={strategy!r} "
                             f"keeps the CLS token: its base image is not the {self.side}x"
                             f"{self.side} patch grid (and transformers cannot tile it): only "
                             f"'default' is supported")

    def newline(self, emb: torch.Tensor) -> torch.Tensor:
        """The image_newline vector as the model writes it into inputs_embeds."""
        return self.outer.image_newline.detach().to(device=emb.device, dtype=emb.dtype)

    def images(self, sample: int, runs: list, lm_kwargs: dict, outer: dict) -> list:
        if not runs:
            return []
        emb = lm_kwargs["inputs_embeds"][sample]
        is_nl = (emb == self.newline(emb)).all(-1).tolist()
        out = []
        for s, e in runs:
            out.extend(self._cut(sample, s, e, is_nl, len(out)))
        return out

    def _cut(self, sample: int, s: int, e: int, is_nl: list, first: int) -> list:
        """The images of the run s..e-1: [(start, end, layout)]."""
        base, side, out = self.base, self.side, []
        pos = s
        while pos < e:
            label = f"sample {sample}, image {first + len(out)} (tokens from {pos})"
            if e - pos < base + 1 or any(is_nl[pos:pos + base]):
                raise ValueError(f"{label}: expected a base image of {side}x{side} patch tokens "
                                 f"then the high-resolution map and its image_newline tokens; "
                                 f"the image tokens do not have that shape (were they filled by "
                                 f"this model's get_image_features?)")
            p = pos + base
            nl = next((i for i in range(p, e) if is_nl[i]), None)
            if nl is None:
                raise ValueError(f"{label}: no image_newline token after the base image")
            w = nl - p
            h = 0
            while p + w < e and is_nl[p + w] and not any(is_nl[p:p + w]):
                h += 1
                p += w + 1
                if w == 0:  # the single-patch branch: one newline, no map
                    break
            out.append((pos, p, TokenLayout.grid(side, side) + TokenLayout.grid(h, w + 1)))
            pos = p
        return out
