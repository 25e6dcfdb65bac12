"""Qwen3.5 (Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration): what the
pruner needs to know.

Images are placed and laid out as in Qwen2-VL (the runs of `image_token_id`, a (t, h / 2,
w / 2) grid read from the M-RoPE positions the language model receives), so the Qwen2-VL
adapter's reading is reused. What differs is the decoder (transformers 5.25,
modeling_qwen3_5.py): `text_config.layer_types` mixes "linear_attention" layers (Gated
DeltaNet: a causal depthwise conv and a gated delta-rule recurrence, no attention
weights; its 2-D mask zeroes padded inputs) and "full_attention" layers (softmax
attention through AttentionInterface); by default every 4th layer is full
(`full_attention_interval=4`: layers 3, 7, ...).

- The importance row is read at layer K - 1, which must be a full-attention layer: the
  default K is the first full-attention layer's index + 1 (4 for the released models); a
  K whose K - 1 is linear raises ValueError at apply() naming the nearest valid choices.
- From layer K on every layer sees the pruned sequence: full-attention layers the pruned
  causal mask (their KV cache holds the kept tokens), linear-attention layers the kept
  tokens in order with the 2-D validity of the kept slots (filler slots of a left-padded
  batch zeroed like padding), so their conv and recurrent states are built from the kept
  tokens only, in the prefill, and decoding continues from those states (ours: a pruned
  image token is skipped by the recurrence, as it is skipped by attention).

Video tokens (`video_token_id`) are left as they are.
"""
from __future__ import annotations

from .qwen2_vl import Qwen2VLAdapter

FULL, LINEAR = "full_attention", "linear_attention"


class Qwen3_5Adapter(Qwen2VLAdapter):
    family = "qwen3_5"
    model_classes = ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration")

    @property
    def layer_types(self) -> list:
        return list(self.language_model.config.layer_types)

    def check(self, where: str) -> None:
        self._llm_only(where)
        unknown = set(self.layer_types) - {FULL, LINEAR}
        if unknown:
            raise ValueError(f"Qwen3.5 decoder layer types {sorted(unknown)} are not supported "
                             f"(only {FULL!r} and {LINEAR!r})")
        if FULL not in self.layer_types[:-1]:
            raise ValueError("this Qwen3.5 decoder has no full-attention layer before its last: "
                             "no attention row to read the importance from")

    def _valid_layers(self) -> list:
        types = self.layer_types
        return [i + 1 for i, t in enumerate(types[:-1]) if t == FULL]

    def default_layer(self) -> int:
        return self._valid_layers()[0]

    def check_layer(self, layer: int) -> None:
        if self.layer_types[layer - 1] == FULL:
            return
        valid = self._valid_layers()
        below = [v for v in valid if v < layer]
        above = [v for v in valid if v > layer]
        near = ([f"layer={below[-1]}"] if below else []) + ([f"layer={above[0]}"] if above else [])
        raise ValueError(f"layer={layer}: Qwen3.5's decoder layer {layer - 1} is a "
                         f"linear-attention (Gated DeltaNet) layer, which has no attention row "
                         f"to read the importance from; layer - 1 must be a full-attention "
                         f"layer: the nearest valid choices are {' or '.join(near)}")

    # -- the masks of the layers from K on (InLLM: layer_kind / layer_mask) ---------------

    def layer_kind(self, index: int) -> str:
        return self.layer_types[index]

    def layer_mask(self, kind: str, index: int, seq):
        if kind == FULL:
            return seq.default()
        # transformers' create_recurrent_attention_mask: the 2-D mask of this forward's
        # tokens, None for one token or when nothing is padded
        if seq.q_len == 1 or bool(seq.valid.all()):
            return None
        return seq.valid[:, -seq.q_len:].long().contiguous()
