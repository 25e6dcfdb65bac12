"""LLaVA (LlavaForConditionalGeneration, LLaVA-1.5 style): what the pruner needs to know.

Images are the runs of `config.image_token_id` in the prompt, cut into blocks of
(image_size / patch_size)^2 tokens (576 for LLaVA-1.5's CLIP 336/14), one per image, in
order; each image is a row-major (H, W) patch grid in the LLM. The vision side: the CLS row
of the CLIP layer that produces `config.vision_feature_layer`'s hidden states, and the
projected features (`model.model.multi_modal_projector`).

Not covered: LLaVA-NeXT / OneVision (LlavaNext*: anyres tiles plus newline tokens, whose
token layout is not one grid) and video.
"""
from __future__ import annotations

from ._common import Adapter


class LlavaAdapter(Adapter):
    family = "llava"
    model_classes = ("LlavaForConditionalGeneration",)

    def __init__(self, model):
        super().__init__(model)
        self._transformers_parts()
        vc = model.config.vision_config
        side_h = vc.image_size // vc.patch_size
        self.grid = (side_h, side_h)
        self.tokens_per_image = side_h * side_h
        self.projector = model.model.multi_modal_projector
        self.vision_tower = model.model.vision_tower

    def check(self, where: str) -> None:
        cfg = self.model.config
        strategy = cfg.vision_feature_select_strategy
        if strategy != "default":
            raise ValueError(f"LLaVA with vision_feature_select_strategy={strategy!r} feeds "
                             f"{self.tokens_per_image + 1} tokens per image (CLS included), not "
                             f"the {self.grid[0]}x{self.grid[1]} patch grid: only 'default' is "
                             f"supported")
        layer = cfg.vision_feature_layer
        if where == "vision" and not isinstance(layer, int):
            raise ValueError(f"where='vision' reads the CLS row of one CLIP layer; "
                             f"vision_feature_layer={layer!r} concatenates several")

    def images(self, sample: int, runs: list, lm_kwargs: dict, outer: dict) -> list:
        n = self.tokens_per_image
        out = []
        for s, e in runs:
            if (e - s) % n:
                raise ValueError(f"sample {sample}: {e - s} image tokens at positions "
                                 f"{s}..{e - 1} are not a whole number of images of {n} tokens "
                                 f"(grid {self.grid[0]}x{self.grid[1]})")
            out.extend((p, p + n, self.grid) for p in range(s, e, n))
        return out

    # -- where="vision" ------------------------------------------------------------------

    def vision_attention(self):
        """(the CLIP attention module whose CLS row is read, its layer index)."""
        tower = getattr(self.vision_tower, "vision_model", self.vision_tower)
        layers = tower.encoder.layers
        feature = self.model.config.vision_feature_layer
        n = len(layers)
        if not -(n + 1) <= feature <= n:
            raise ValueError(f"vision_feature_layer={feature} is out of range for a vision "
                             f"tower of {n} layers")
        index = feature % (n + 1) - 1  # hidden_states[i] is the output of layer i - 1
        if index < 0:
            raise ValueError(f"vision_feature_layer={feature} selects the embeddings, which "
                             f"no attention layer produces: no CLS row to read")
        return layers[index].self_attn, index
