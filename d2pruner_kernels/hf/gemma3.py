"""Gemma 3 (Gemma3ForConditionalGeneration): what the pruner needs to know.

Read in transformers 5.25 (modeling_gemma3.py):
- an image is `mm_tokens_per_image` (256) placeholders of `image_token_id` (between the
  processor's begin / end-of-image tokens): the SigLIP patches average-pooled to a 16 x 16
  grid, row-major; a pan-and-scan crop is an image of its own (its own 256 tokens);
- the language model gets a dict of masks, one per layer kind (`text_config.layer_types`:
  "sliding_attention" and "full_attention", 5 sliding per full one in the released
  models). With `token_type_ids` (the processor's: 1 at image tokens; `generate` passes
  them to the prefill only) the full mask is causal OR bidirectional within an image
  (`get_block_sequence_ids_for_mask`: each run of image tokens one block), the sliding
  mask that AND the window (key index > query index - sliding_window); without them
  causal and causal AND window. The sliding layers' cache (DynamicSlidingWindowLayer)
  keeps the last sliding_window - 1 entries. Each kind has its own RoPE (local / global
  base): layers receive the cos/sin of their kind.

What the pruner does (ours):
- importance at layer K - 1, sliding or full: the last prompt token's row over the keys it
  sees (at a sliding layer: inside its window; image tokens outside it score 0);
- from layer K on, the masks are rebuilt for the kept tokens, per kind, with the same
  rules: causal, the block of each kept image token (its image's run), padding, and the
  window measured in ORIGINAL positions: a kept token sees the kept keys whose prompt
  position is within sliding_window of its own, so pruning removes keys but never widens
  a layer's reach. The sliding cache still holds the last sliding_window - 1 kept entries,
  a superset of those keys, so decoding equals recomputation.
"""
from __future__ import annotations

import math

import torch

from ._common import Adapter
from .llava import LlavaAdapter

FULL, SLIDING = "full_attention", "sliding_attention"


class Gemma3Adapter(LlavaAdapter):
    family = "gemma3"
    model_classes = ("Gemma3ForConditionalGeneration",)

    def __init__(self, model):
        Adapter.__init__(self, model)
        self._transformers_parts()
        n = int(model.config.mm_tokens_per_image)
        side = math.isqrt(n)
        self.grid = (side, side)
        self.tokens_per_image = n
        self.projector = model.model.multi_modal_projector

    def check(self, where: str) -> None:
        self._llm_only(where, "has none (a SigLIP tower)")
        if self.grid[0] * self.grid[1] != self.tokens_per_image:
            raise ValueError(f"Gemma 3 with mm_tokens_per_image={self.tokens_per_image}: not a "
                             f"square grid")
        cfg = self.language_model.config
        unknown = set(cfg.layer_types) - {FULL, SLIDING}
        if unknown:
            raise ValueError(f"Gemma 3 layer types {sorted(unknown)} are not supported")
        if getattr(cfg, "use_bidirectional_attention", False):
            raise ValueError("Gemma 3 with use_bidirectional_attention=True (an encoder) is "
                             "not supported: pruning reads a causal last-token row")

    def prefill_inputs(self, input_ids, inputs_embeds, kwargs: dict) -> dict:
        return {"token_type_ids": kwargs.get("token_type_ids")}

    # -- the masks of the layers from K on (InLLM: layer_kind / layer_mask) ---------------

    def layer_kind(self, index: int) -> str:
        return self.language_model.config.layer_types[index]

    def layer_mask(self, kind: str, index: int, seq):
        pos = seq.positions                       # [B, T] prompt position of each entry
        window = self.language_model.config.sliding_window
        block = None
        tt = (seq.outer or {}).get("token_type_ids")
        if seq.prefill and isinstance(tt, torch.Tensor):
            block = _blocks(tt.to(pos.device)).gather(1, seq.outer["idx"])

        def fn(b, h, q, kv):
            allowed = kv <= q
            if block is not None:
                qb = block[b, q]
                allowed = allowed | ((qb == block[b, kv]) & (qb >= 0))
            if kind == SLIDING:
                allowed = allowed & (pos[b, kv] > pos[b, q] - window)
            return allowed

        kv_len = seq.total
        if kind == SLIDING and not seq.prefill:
            # the sliding cache holds its last window - 1 entries, then this step's tokens
            kv_len = min(seq.total - seq.q_len, window - 1) + seq.q_len
        return seq.build(fn, seq.q_len, kv_len)


def _blocks(token_type_ids: torch.Tensor) -> torch.Tensor:
    """Gemma 3's block ids: each run of image tokens (token_type_ids == 1) its own id, in
    order; -1 elsewhere (transformers' get_block_sequence_ids_for_mask)."""
    image = token_type_ids == 1
    before = torch.nn.functional.pad(image, (1, 0), value=False)[:, :-1]
    ids = torch.cumsum((image & ~before).int(), dim=1) - 1
    return torch.where(image, ids, -1)
