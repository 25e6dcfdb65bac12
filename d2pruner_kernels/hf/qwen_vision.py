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

`qwen25_hf_importance(model, pixel_values, image_grid_thw)` (and `qwen3_hf_importance`, the
tower's last block, no window order) computes it with transformers' Qwen2.5-VL tower (a forward pre-hook on that block's attention); the vLLM plugin reads the
same block in vLLM's tower. No transformers import at module level.
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


def qwen25_hf_importance(model, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor):
    """The rule on transformers' Qwen2.5-VL: runs the vision tower once, reading the last
    full-attention block's q and k. Returns (importance float32 [sum merged], features)."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as m
    visual = model.model.visual if hasattr(model, "model") else model.visual
    cfg = visual.config
    grids = [tuple(int(x) for x in g) for g in image_grid_thw.tolist()]
    merge = cfg.spatial_merge_size
    window = cfg.window_size // merge // cfg.patch_size
    orders = [window_order(t, h, w, merge, window) for t, h, w in grids]
    scores, out = _run_tower(visual, visual.blocks[cfg.fullatt_block_indexes[-1]].attn,
                             m.apply_rotary_pos_emb_vision, pixel_values, image_grid_thw,
                             grids, orders, merge)
    return scores, getattr(out, "pooler_output", out)


def qwen3_hf_importance(model, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor):
    """The rule on transformers' Qwen3-VL: its tower's last block (every block attends
    fully, patches in merge-group order: no window order). Returns (importance, main
    features [sum merged, D], DeepStack features: a list of [sum merged, D])."""
    from transformers.models.qwen3_vl import modeling_qwen3_vl as m
    visual = model.model.visual if hasattr(model, "model") else model.visual
    merge = visual.config.spatial_merge_size
    grids = [tuple(int(x) for x in g) for g in image_grid_thw.tolist()]
    orders = [torch.arange(t * (h // merge) * (w // merge)) for t, h, w in grids]
    scores, out = _run_tower(visual, visual.blocks[-1].attn, m.apply_rotary_pos_emb_vision,
                             pixel_values, image_grid_thw, grids, orders, merge)
    return scores, out.pooler_output, list(out.deepstack_features)


def _run_tower(visual, attn, rotary, pixel_values, image_grid_thw, grids, orders, merge):
    captured = {}

    def hook(module, args, kwargs):
        hs = args[0] if args else kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        n = hs.shape[0]
        q, k, _ = attn.qkv(hs).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = rotary(q, k, cos, sin)
        captured["scores"] = vision_importance(q.detach(), k.detach(), grids, orders, merge,
                                               scale=attn.scaling)

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            out = visual(pixel_values.to(visual.dtype), grid_thw=image_grid_thw)
    finally:
        handle.remove()
    return captured["scores"], out
