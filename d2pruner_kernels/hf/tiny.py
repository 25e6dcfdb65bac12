"""Tiny randomly initialised models and prompts, built from configs (nothing downloaded),
for the tests and the examples: real transformers classes at toy widths, fp32, CPU.

    model = tiny_llava()                       # CLIP 336/14 -> 576 patches, Llama 4 layers
    inputs = llava_inputs(model, [[5, 6], [7]])    # one image per prompt, left-padded
    model = tiny_qwen2_vl()                    # or tiny_qwen2_vl(v2_5=True)
    inputs = qwen_inputs(model, [[(16, 16)], [(12, 20), (8, 8)]])   # images per sample, in patches
    model = tiny_llava_next()                  # CLIP 112/14: 8x8 base, tiles of 112 px
    inputs = anyres_inputs(model, [[(100, 180)], [(150, 60)]])      # (height, width) per image
    model = tiny_llava_onevision()             # SigLIP 112/14, anyres_max_9
    model = tiny_internvl()                    # 112-px tiles of 4x4 tokens
    inputs = internvl_inputs(model, [[(100, 300)], [(80, 80)]])     # image_sizes included
"""
from __future__ import annotations

import torch

# token ids of the tiny vocabularies (all below VOCAB)
VOCAB = 160
PAD = 3          # a padding token with a random (non-zero) embedding
IMAGE = 150
VISION_START, VISION_END, VIDEO = 151, 152, 153


def _llama_text(layers: int, **extra) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=4096, pad_token_id=None, bos_token_id=1,
                eos_token_id=None, **extra)


def tiny_llava(layers: int = 4, seed: int = 0, attn_implementation: str = "sdpa"):
    """LlavaForConditionalGeneration: CLIP 336/14 (576 patch tokens, 2 layers, width 32) and
    Llama (`layers` decoder layers, width 64, 4 query heads on 2 key heads)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers import LlavaForConditionalGeneration
    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=32,
                              intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    text = LlamaConfig(**_llama_text(layers))
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE,
                      image_seq_length=576)
    cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(cfg).eval()


def tiny_qwen2_vl(layers: int = 4, seed: int = 0, attn_implementation: str = "sdpa",
                  v2_5: bool = False):
    """Qwen2VLForConditionalGeneration (or Qwen2_5_VLForConditionalGeneration): a one-block
    vision tower (patch 14, 2x2 merge) and a Qwen2 decoder of `layers` layers (width 64)."""
    import transformers
    text = _llama_text(layers, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                "mrope_section": [2, 3, 3]})
    if v2_5:
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                      out_hidden_size=64, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
        cls, ccls = (transformers.Qwen2_5_VLForConditionalGeneration,
                     transformers.Qwen2_5_VLConfig)
    else:
        vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        cls, ccls = transformers.Qwen2VLForConditionalGeneration, transformers.Qwen2VLConfig
    cfg = ccls(text_config=text, vision_config=vision, image_token_id=IMAGE,
               video_token_id=VIDEO, vision_start_token_id=VISION_START,
               vision_end_token_id=VISION_END)
    cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return cls(cfg).eval()


def _left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[b, width - len(r):] = 1
    return ids, mask


def llava_inputs(model, texts: list, images_per_sample=None, seed: int = 0) -> dict:
    """Left-padded LLaVA prompts: sample b is [1] + (images_per_sample[b] x 576 image
    tokens, each followed by token 9) + texts[b]; random pixel_values, one per image."""
    n = model.config.vision_config.image_size // model.config.vision_config.patch_size
    n = n * n
    images_per_sample = images_per_sample or [1] * len(texts)
    rows = []
    for text, count in zip(texts, images_per_sample):
        row = [1]
        for _ in range(count):
            row += [IMAGE] * n + [9]
        rows.append(row + list(text))
    ids, mask = _left_pad(rows)
    g = torch.Generator().manual_seed(seed)
    size = model.config.vision_config.image_size
    total = sum(images_per_sample)
    out = {"input_ids": ids, "attention_mask": mask}
    if total:
        out["pixel_values"] = torch.randn(total, 3, size, size, generator=g)
    return out


def _qwen_batch(rows: list, grids: list, vgrids: list, patch_dim: int, seed: int) -> dict:
    """The processor's outputs for left-padded Qwen rows: input_ids, attention_mask,
    mm_token_type_ids, and random flattened patches with their (t, h, w) grids."""
    ids, mask = _left_pad(rows)
    out = {"input_ids": ids, "attention_mask": mask,
           "mm_token_type_ids": (ids == IMAGE).long() + 2 * (ids == VIDEO).long()}
    g = torch.Generator().manual_seed(seed)
    if grids:
        patches = sum(h * w for _, h, w in grids)
        out["pixel_values"] = torch.randn(patches, patch_dim, generator=g)
        out["image_grid_thw"] = torch.tensor(grids, dtype=torch.long)
    if vgrids:
        patches = sum(t * h * w for t, h, w in vgrids)
        out["pixel_values_videos"] = torch.randn(patches, patch_dim, generator=g)
        out["video_grid_thw"] = torch.tensor(vgrids, dtype=torch.long)
    return out


def qwen_inputs(model, images: list, texts=None, seed: int = 0, videos=None) -> dict:
    """Left-padded Qwen2-VL prompts: sample b holds images[b], a list of (h, w) patch grids
    (even numbers: the 2x2 merge), each as vision_start + (h/2 * w/2) image tokens +
    vision_end, then videos[b] (a list of (t, h, w) grids, t temporal patches) the same way
    with video tokens, then texts[b]; random pixel_values / pixel_values_videos (flattened
    patches, as the processor makes them), image_grid_thw / video_grid_thw and
    mm_token_type_ids."""
    vc = model.config.vision_config
    merge, p, tp = vc.spatial_merge_size, vc.patch_size, vc.temporal_patch_size
    texts = texts or [[5, 6, 7]] * len(images)
    videos = videos or [[] for _ in images]
    rows, grids, vgrids = [], [], []
    for sample, clips, text in zip(images, videos, texts):
        row = [1, 4]
        for h, w in sample:
            grids.append([1, h, w])
            row += [VISION_START] + [IMAGE] * (h * w // merge ** 2) + [VISION_END]
        for t, h, w in clips:
            vgrids.append([t, h, w])
            row += [VISION_START] + [VIDEO] * (t * h * w // merge ** 2) + [VISION_END]
        rows.append(row + list(text))
    return _qwen_batch(rows, grids, vgrids, 3 * tp * p * p, seed)


# -- LLaVA-NeXT / LLaVA-OneVision (anyres) --------------------------------------------------------

ANYRES_PINPOINTS = [[112, 224], [224, 112], [224, 224], [112, 336], [336, 112], [448, 448]]


def tiny_llava_next(layers: int = 4, seed: int = 0, attn_implementation: str = "sdpa"):
    """LlavaNextForConditionalGeneration: CLIP 112/14 (an 8 x 8 base image, tiles of 112 px
    on ANYRES_PINPOINTS, 2 layers, width 32) and a Llama decoder of `layers` layers."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig,
                              LlavaNextForConditionalGeneration)
    vision = CLIPVisionConfig(image_size=112, patch_size=14, hidden_size=32,
                              intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    cfg = LlavaNextConfig(vision_config=vision, text_config=LlamaConfig(**_llama_text(layers)),
                          image_token_id=IMAGE, image_grid_pinpoints=ANYRES_PINPOINTS,
                          image_seq_length=64)
    cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return LlavaNextForConditionalGeneration(cfg).eval()


def tiny_llava_onevision(layers: int = 4, seed: int = 0, attn_implementation: str = "sdpa"):
    """LlavaOnevisionForConditionalGeneration: SigLIP 112/14 (8 x 8 base, no CLS, 'full'
    features), ANYRES_PINPOINTS, anyres_max_9 (a 448 x 448 canvas, 32 x 32 patches, is
    downscaled to 24 x 24), a Qwen2 decoder of `layers` layers."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              Qwen2Config, SiglipVisionConfig)
    vision = SiglipVisionConfig(image_size=112, patch_size=14, hidden_size=32,
                                intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                vision_use_head=False)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=Qwen2Config(**_llama_text(layers)),
                               image_token_id=IMAGE, video_token_id=VIDEO,
                               image_grid_pinpoints=ANYRES_PINPOINTS, vision_feature_layer=-1,
                               vision_feature_select_strategy="full")
    cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return LlavaOnevisionForConditionalGeneration(cfg).eval()


def anyres_map(model, size, patched: bool = True) -> tuple[int, int]:
    """(H, W) of the high-resolution map the LLM gets for an image of size (height, width),
    by the processors' arithmetic (LlavaNextProcessor / LlavaOnevisionProcessor
    _get_unpadded_features), not the model's: (0, 0) when the image is not patched (a
    OneVision image in a multi-image sample)."""
    import math
    from transformers.image_processing_utils import select_best_resolution
    if not patched:
        return 0, 0
    cfg = model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    height, width = size
    best_h, best_w = select_best_resolution([height, width], cfg.image_grid_pinpoints)
    cur_h = side * (best_h // cfg.vision_config.image_size)
    cur_w = side * (best_w // cfg.vision_config.image_size)
    if width / height > cur_w / cur_h:
        cur_h -= 2 * ((cur_h - int(round(height * (cur_w / width), 7))) // 2)
    else:
        cur_w -= 2 * ((cur_w - int(round(width * (cur_h / height), 7))) // 2)
    aspect = getattr(cfg, "vision_aspect_ratio", None)
    if aspect is not None:
        ratio = math.sqrt(cur_h * cur_w / (int(aspect.strip("anyres_max_")) * side ** 2))
        if ratio > 1.1:
            cur_h, cur_w = int(cur_h // ratio), int(cur_w // ratio)
    return cur_h, cur_w


def anyres_inputs(model, sizes: list, texts=None, seed: int = 0) -> dict:
    """Left-padded LLaVA-NeXT / OneVision prompts: sample b is [1, 4] + for each image of
    sizes[b] ((height, width) in pixels) its placeholders (base side^2 + H * (W + 1), or
    side^2 + 1 for a OneVision image in a multi-image sample) and token 9, then texts[b];
    random pixel_values [images, max patches, 3, S, S] (zero-padded as the processor pads),
    image_sizes, and batch_num_images for OneVision."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
    cfg = model.config
    onevision = hasattr(cfg, "vision_aspect_ratio")
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    texts = texts or [[5, 6, 7]] * len(sizes)
    rows, flat, patches = [], [], []
    for sample, text in zip(sizes, texts):
        row = [1, 4]
        patched = not onevision or len(sample) == 1
        for size in sample:
            h, w = anyres_map(model, size, patched)
            row += [IMAGE] * (side * side + h * (w + 1) + (0 if patched else 1)) + [9]
            flat.append(list(size))
            patches.append(image_size_to_num_patches(size, cfg.image_grid_pinpoints,
                                                     cfg.vision_config.image_size)
                           if patched else 1)
        rows.append(row + list(text))
    ids, mask = _left_pad(rows)
    out = {"input_ids": ids, "attention_mask": mask}
    if flat:
        g = torch.Generator().manual_seed(seed)
        s = cfg.vision_config.image_size
        pix = torch.zeros(len(flat), max(patches), 3, s, s)
        for i, n in enumerate(patches):
            pix[i, :n] = torch.randn(n, 3, s, s, generator=g)
        out["pixel_values"] = pix
        out["image_sizes"] = torch.tensor(flat, dtype=torch.long)
        if onevision:
            out["batch_num_images"] = torch.tensor([len(x) for x in sizes], dtype=torch.long)
    return out


# -- InternVL (tiles + thumbnail) ------------------------------------------------------------------

def tiny_internvl(layers: int = 4, seed: int = 0, attn_implementation: str = "sdpa"):
    """InternVLForConditionalGeneration: 112-px tiles, patch 14, pixel shuffle 0.5 (4 x 4
    tokens per tile; a real InternVL has 448 px and 16 x 16), a Qwen2 decoder of `layers`
    layers."""
    from transformers import (InternVLConfig, InternVLForConditionalGeneration,
                              InternVLVisionConfig, Qwen2Config)
    vision = InternVLVisionConfig(image_size=112, patch_size=14, hidden_size=32,
                                  intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2)
    cfg = InternVLConfig(vision_config=vision, text_config=Qwen2Config(**_llama_text(layers)),
                         image_token_id=IMAGE, image_seq_length=16)
    cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return InternVLForConditionalGeneration(cfg).eval()


def internvl_tiles(model, size, max_patches: int = 12) -> int:
    """The tiles InternVL's image processor makes of an image of size (height, width)
    (GotOcr2ImageProcessorPil.get_number_of_image_patches: tiles + thumbnail, or 1)."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
        GotOcr2ImageProcessorPil)
    px = model.config.vision_config.image_size
    px = px[0] if isinstance(px, (list, tuple)) else px
    proc = GotOcr2ImageProcessorPil(crop_to_patches=True, size={"height": px, "width": px},
                                    max_patches=max_patches)
    return proc.get_number_of_image_patches(size[0], size[1], {})


def internvl_inputs(model, sizes: list, texts=None, seed: int = 0, max_patches: int = 12) -> dict:
    """Left-padded InternVL prompts: sample b is [1, 4] + for each image of sizes[b]
    ((height, width) in pixels) VISION_START (as <img>) + 16 placeholders per tile (the
    thumbnail included) + VISION_END, then texts[b]; random pixel_values, one 112-px tile
    per row, and image_sizes."""
    per_tile = model.config.image_seq_length
    texts = texts or [[5, 6, 7]] * len(sizes)
    rows, flat, tiles = [], [], 0
    for sample, text in zip(sizes, texts):
        row = [1, 4]
        for size in sample:
            n = internvl_tiles(model, size, max_patches)
            tiles += n
            flat.append(list(size))
            row += [VISION_START] + [IMAGE] * (per_tile * n) + [VISION_END]
        rows.append(row + list(text))
    ids, mask = _left_pad(rows)
    out = {"input_ids": ids, "attention_mask": mask}
    if flat:
        px = model.config.vision_config.image_size
        px = px[0] if isinstance(px, (list, tuple)) else px
        g = torch.Generator().manual_seed(seed)
        out["pixel_values"] = torch.randn(tiles, 3, px, px, generator=g)
        out["image_sizes"] = torch.tensor(flat, dtype=torch.long)
    return out


# -- Qwen3-VL (DeepStack, videos as frames with timestamps) ----------------------------------------

def tiny_qwen3_vl(layers: int = 5, seed: int = 0, attn_implementation: str = "sdpa",
                  moe: bool = False):
    """Qwen3VLForConditionalGeneration (or Qwen3VLMoeForConditionalGeneration, moe=True): a
    three-block vision tower (patch 16, 2x2 merge) whose blocks 0, 1, 2 feed DeepStack
    levels 0, 1, 2 (added after decoder layers 0, 1, 2), and a Qwen3 decoder of `layers`
    layers (width 64; MoE: 4 experts, top 2)."""
    import transformers
    text = _llama_text(layers, head_dim=16,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                        "mrope_section": [2, 3, 3], "mrope_interleaved": True})
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                    decoder_sparse_step=1)
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2,
                  out_hidden_size=64, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 1, 2])
    if moe:
        cls, ccls = (transformers.Qwen3VLMoeForConditionalGeneration,
                     transformers.Qwen3VLMoeConfig)
    else:
        cls, ccls = transformers.Qwen3VLForConditionalGeneration, transformers.Qwen3VLConfig
    cfg = ccls(text_config=text, vision_config=vision, image_token_id=IMAGE,
               video_token_id=VIDEO, vision_start_token_id=VISION_START,
               vision_end_token_id=VISION_END)
    cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return cls(cfg).eval()


TIMESTAMP = 40  # frame f's timestamp text is [TIMESTAMP + f, 41 + f] (stands for "<f.0 seconds>")


def qwen3_vl_inputs(model, images: list, videos=None, texts=None, seed: int = 0,
                    video_first: bool = False) -> dict:
    """Left-padded Qwen3-VL prompts, as its processor lays them out: sample b holds
    images[b] ((h, w) patch grids, each vision_start + h/2 * w/2 image tokens + vision_end)
    and videos[b] ((t, h, w) grids: t temporal patches, each frame written as its timestamp
    text + vision_start + h/2 * w/2 video tokens + vision_end), images first (videos first
    with video_first=True), then texts[b]; random pixels, image_grid_thw / video_grid_thw
    and mm_token_type_ids."""
    vc = model.config.vision_config
    merge, p, tp = vc.spatial_merge_size, vc.patch_size, vc.temporal_patch_size
    texts = texts or [[5, 6, 7]] * len(images)
    videos = videos or [[] for _ in images]
    rows, grids, vgrids = [], [], []
    for sample, clips, text in zip(images, videos, texts):
        parts_i, parts_v = [], []
        for h, w in sample:
            grids.append([1, h, w])
            parts_i += [VISION_START] + [IMAGE] * (h * w // merge ** 2) + [VISION_END]
        for t, h, w in clips:
            vgrids.append([t, h, w])
            for f in range(t):
                parts_v += [TIMESTAMP + f, TIMESTAMP + 1 + f, VISION_START]
                parts_v += [VIDEO] * (h * w // merge ** 2) + [VISION_END]
        body = parts_v + parts_i if video_first else parts_i + parts_v
        rows.append([1, 4] + body + list(text))
    return _qwen_batch(rows, grids, vgrids, 3 * tp * p * p, seed)


# -- Qwen3.5 (linear + full attention) and Gemma 3 (sliding + full, a dict of masks) ------------

QWEN3_5_LAYERS = ["linear_attention", "full_attention", "linear_attention", "full_attention",
                  "linear_attention"]


def tiny_qwen3_5(layer_types=None, seed: int = 0, attn_implementation: str = "sdpa",
                 moe: bool = False):
    """Qwen3_5ForConditionalGeneration (moe=True: Qwen3_5MoeForConditionalGeneration, 4
    experts, 2 per token): a one-block vision tower (patch 16, 2x2 merge) and a decoder of
    `layer_types` (default QWEN3_5_LAYERS: Gated DeltaNet and full attention interleaved;
    width 64, 4 query heads on 2 key heads, head_dim 16). Prompts: qwen_inputs with patch
    grids of even sides."""
    import transformers
    types = list(layer_types or QWEN3_5_LAYERS)
    extra = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                 shared_expert_intermediate_size=32) if moe else {}
    text = dict(_llama_text(len(types)), head_dim=16, layer_types=types, **extra,
                linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8,
                linear_num_key_heads=2, linear_num_value_heads=4,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [1, 1, 0], "mrope_interleaved": True,
                                 "partial_rotary_factor": 0.25})
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                  out_hidden_size=64, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, num_position_embeddings=64)
    if moe:
        text.pop("intermediate_size")
        ccls, cls = transformers.Qwen3_5MoeConfig, transformers.Qwen3_5MoeForConditionalGeneration
    else:
        ccls, cls = transformers.Qwen3_5Config, transformers.Qwen3_5ForConditionalGeneration
    cfg = ccls(text_config=text, vision_config=vision, image_token_id=IMAGE,
               video_token_id=VIDEO, vision_start_token_id=VISION_START,
               vision_end_token_id=VISION_END)
    cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return cls(cfg).eval()


GEMMA3_LAYERS = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]


def tiny_gemma3(layer_types=None, sliding_window: int = 300, seed: int = 0,
                attn_implementation: str = "sdpa"):
    """Gemma3ForConditionalGeneration: SigLIP 64/4 (16 x 16 patches, 1 layer, width 32; the
    projector's pooling keeps the 16 x 16 = 256 tokens per image of the real model) and a
    Gemma 3 decoder of `layer_types` (default GEMMA3_LAYERS: the importance layer 1 of the
    default layer=2 is a sliding one) with a window of `sliding_window` tokens (300: the
    last prompt token of a two-image prompt sees part of the first image). Prompts:
    gemma3_inputs."""
    import transformers
    types = list(layer_types or GEMMA3_LAYERS)
    text = dict(_llama_text(len(types)), head_dim=16, query_pre_attn_scalar=16,
                sliding_window=sliding_window, layer_types=types)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=64, patch_size=4)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision,
                                    mm_tokens_per_image=256, boi_token_index=VISION_START,
                                    eoi_token_index=VISION_END, image_token_index=IMAGE)
    cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return transformers.Gemma3ForConditionalGeneration(cfg).eval()


def gemma3_inputs(model, texts: list, images_per_sample=None, seed: int = 0) -> dict:
    """Left-padded Gemma 3 prompts as its processor lays them out: sample b is [1] + (
    images_per_sample[b] x (begin-of-image + 256 image tokens + end-of-image, then token 9))
    + texts[b]; token_type_ids (1 at image tokens) and random pixel_values, one per image."""
    n = model.config.mm_tokens_per_image
    images_per_sample = images_per_sample or [1] * len(texts)
    rows = []
    for text, count in zip(texts, images_per_sample):
        row = [1]
        for _ in range(count):
            row += [VISION_START] + [IMAGE] * n + [VISION_END, 9]
        rows.append(row + list(text))
    ids, mask = _left_pad(rows)
    out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": (ids == IMAGE).long()}
    total = sum(images_per_sample)
    if total:
        size = model.config.vision_config.image_size
        g = torch.Generator().manual_seed(seed)
        out["pixel_values"] = torch.randn(total, 3, size, size, generator=g)
    return out
