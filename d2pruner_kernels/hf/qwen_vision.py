"""Vision-side importance for Qwen2.5-VL (docs/spec.md, "Vision-side importance for Qwen"):
the rule the vLLM plugin prunes by, and its transformers twin.

Qwen's vision tower has no CLS token and the image encoder never sees the prompt, so the
paper's rows (the last text token, or CLS) do not exist there. The importance of a merged
token is the attention it receives in the tower's last full-attention block: the softmax
rows of that block's own rotated queries and keys, averaged over every query token of the
image and every head (`attention_scores`, which streams the keys: no L x L matrix), summed
over the 2 x 2 merge group. The tower runs its tokens in window order (merge groups
contiguous); the result is put back in raster order of the LLM grid (t, h / 2, w / 2).

    vision_importance(q, k, grids, orders, merge=2)  float32 [sum of merged tokens]

`VisionRows` computes it on transformers' towers (Qwen2.5-VL: the last full-attention block,
window order; Qwen3-VL: the last block, no window order) with forward hooks, for
`hf.apply(model, k, where="vision")`; `qwen25_hf_importance(model, pixel_values,
image_grid_thw)` and `qwen3_hf_importance` run a tower once under them. The vLLM plugin
reads the same block in vLLM's tower. No transformers import at module level.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention_scores import attention_scores


def window_order(t: int, h: int, w: int, merge: int, window: int) -> torch.Tensor:
    """The window order of one image's merged tokens (Qwen2.5-VL's window attention):
    position j of the tower's sequence holds merged token order[j] (raster index)."""
    lh, lw = h // merge, w // merge
    index = torch.arange(t * lh * lw).reshape(t, lh, lw)
    pad_h, pad_w = window - lh % window, window - lw % window
    nh, nw = (lh + pad_h) // window, (lw + pad_w) // window
    padded = F.pad(index, (0, pad_w, 0, pad_h), "constant", -100)
    padded = padded.reshape(t, nh, window, nw, window).permute(0, 1, 3, 2, 4).reshape(-1)
    return padded[padded != -100]


def vision_importance(q: torch.Tensor, k: torch.Tensor, grids, orders, merge: int = 2,
                      scale: float | None = None) -> torch.Tensor:
    """q, k: [S, H, d], the last full-attention block's rotated queries and keys, the images
    back to back in the tower's window order; grids: (t, h, w) patch grids; orders: each
    image's window order (see window_order). Returns float32 [sum_b t*h*w / merge^2],
    raster order per image. Full attention runs within each frame, as in the tower."""
    unit = merge * merge
    out, start = [], 0
    for (t, h, w), order in zip(grids, orders):
        t, h, w = int(t), int(h), int(w)
        frame = h * w
        raw = []
        for f in range(t):
            s = start + f * frame
            qs = q[s:s + frame].transpose(0, 1).unsqueeze(0)   # [1, H, n, d]
            ks = k[s:s + frame].transpose(0, 1).unsqueeze(0)
            raw.append(attention_scores(qs, ks, key_span=(0, frame), scale=scale)[0])
        merged = torch.cat(raw).view(-1, unit).sum(-1)        # window order
        raster = torch.empty_like(merged)
        raster[order.to(merged.device)] = merged
        out.append(raster)
        start += t * frame
    return torch.cat(out)


class VisionRows:
    """The rule on a transformers Qwen tower, kept installed (hf.apply(where="vision")):
    every forward of the tower computes each item's importance from `block`'s attention
    (a forward pre-hook on it: the block's own qkv projection and rotary embedding, as its
    forward computes them; the grids from the tower's own `grid_thw`) and remembers the
    items it encoded last, (features [n, D], importance [n]) each. `rows_for(features)`
    finds an item's importance by its features (by value: generate() encodes the images
    before the prefill and repeats them for beams), None if it is not among them."""

    query = "mean"  # PositionalPrior provenance: every query token of the image

    def __init__(self, visual, layer: int, rotary, windows: bool):  # layer: the block
        self.visual, self.layer, self.rotary = visual, layer, rotary
        self.attn = visual.blocks[layer].attn
        cfg = visual.config
        self.merge = cfg.spatial_merge_size
        self.window = cfg.window_size // self.merge // cfg.patch_size if windows else None
        self.grids = None
        self.scores = None
        self.encoded = []   # the items encoded last: (features, importance) each, kept
        #                     until the next encoding (use_cache=False and beams read them)
        self.last = None    # (importance, the tower's output) of the last forward
        self.keep_last = False
        self._used = False

    def install(self, handles: list) -> None:
        handles.append(self.visual.register_forward_pre_hook(self._tower_pre, with_kwargs=True))
        handles.append(self.attn.register_forward_pre_hook(self._block_pre, with_kwargs=True))
        handles.append(self.visual.register_forward_hook(self._tower_post, always_call=True))

    def forget(self) -> None:
        self.grids = self.scores = self.last = None
        self.encoded, self._used = [], False

    def orders(self, grids):
        m = self.merge
        if self.window is None:
            return [torch.arange(t * (h // m) * (w // m)) for t, h, w in grids]
        return [window_order(t, h, w, m, self.window) for t, h, w in grids]

    def _tower_pre(self, module, args, kwargs):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        self.scores = None
        self.grids = None if grid is None else [tuple(int(x) for x in g)
                                                for g in grid.tolist()]
        return None

    def _block_pre(self, module, args, kwargs):
        if self.grids is None:
            return None
        attn = self.attn
        hs = args[0] if args else kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        n = hs.shape[0]
        q, k, _ = attn.qkv(hs).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = self.rotary(q, k, cos, sin)
        self.scores = vision_importance(q.detach(), k.detach(), self.grids,
                                        self.orders(self.grids), self.merge,
                                        scale=attn.scaling)
        return None

    def _tower_post(self, module, args, output):
        grids, scores, self.grids, self.scores = self.grids, self.scores, None, None
        if grids is None or scores is None or isinstance(output, BaseException):
            return None
        feats = getattr(output, "pooler_output", output)
        lengths = [t * (h // self.merge) * (w // self.merge) for t, h, w in grids]
        if not isinstance(feats, torch.Tensor) or feats.shape[0] != sum(lengths):
            return None
        if self._used:  # a new round of encoding (generate() encodes images, then videos)
            self.encoded, self._used = [], False
        self.encoded += list(zip(feats.detach().split(lengths), scores.split(lengths)))
        if self.keep_last:  # _run_tower's single call reads it; an installed pruner does not
            self.last = (scores, output)
        return None

    def used(self) -> None:
        """A prefill read the items: the next forward of the tower starts a new set."""
        self._used = True

    def rows_for(self, feats: torch.Tensor):
        """The importance of the encoded item whose features equal `feats` [n, D] (compared
        in feats' dtype), or None."""
        for enc, row in self.encoded:
            if enc.shape == feats.shape and torch.equal(enc.to(feats.device, feats.dtype),
                                                        feats):
                return row
        return None


def qwen25_rows(visual) -> VisionRows:
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as m
    return VisionRows(visual, visual.config.fullatt_block_indexes[-1],
                      m.apply_rotary_pos_emb_vision, windows=True)


def qwen3_rows(visual) -> VisionRows:
    from transformers.models.qwen3_vl import modeling_qwen3_vl as m
    return VisionRows(visual, len(visual.blocks) - 1, m.apply_rotary_pos_emb_vision,
                      windows=False)


def _tower(model):
    return model.model.visual if hasattr(model, "model") else model.visual


def qwen25_hf_importance(model, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor):
    """The rule on transformers' Qwen2.5-VL: runs the vision tower once, reading the last
    full-attention block's q and k. Returns (importance float32 [sum merged], features)."""
    scores, out = _run_tower(qwen25_rows(_tower(model)), pixel_values, image_grid_thw)
    return scores, getattr(out, "pooler_output", out)


def qwen3_hf_importance(model, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor):
    """The rule on transformers' Qwen3-VL: its tower's last block (every block attends
    fully, patches in merge-group order: no window order). Returns (importance, main
    features [sum merged, D], DeepStack features: a list of [sum merged, D])."""
    scores, out = _run_tower(qwen3_rows(_tower(model)), pixel_values, image_grid_thw)
    return scores, out.pooler_output, list(out.deepstack_features)


def _run_tower(rows: VisionRows, pixel_values, image_grid_thw):
    handles = []
    rows.keep_last = True
    rows.install(handles)
    try:
        with torch.no_grad():
            out = rows.visual(pixel_values.to(rows.visual.dtype), grid_thw=image_grid_thw)
    finally:
        for h in handles:
            h.remove()
    return rows.last[0], out
