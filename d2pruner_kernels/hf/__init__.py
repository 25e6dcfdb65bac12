"""D2Pruner in a Hugging Face transformers 5.x model, in two lines.

    from d2pruner_kernels import hf
    pruner = hf.apply(model, k=64)                  # where="llm", layer=2 (Qwen3.5: see below)
    out = model.generate(**inputs, max_new_tokens=64)
    pruner.remove()                                 # or: with hf.apply(model, 64) as pruner:

Supported: LlavaForConditionalGeneration (LLaVA-1.5 style: one (H, W) patch grid per image),
Qwen2VLForConditionalGeneration and Qwen2_5_VLForConditionalGeneration (one (t, h, w) grid
per image, any size), LlavaNextForConditionalGeneration and
LlavaOnevisionForConditionalGeneration (anyres: each image a TokenLayout, base image + the
high-resolution map with its newline tokens) and InternVLForConditionalGeneration (tiles
stitched + thumbnail; pass image_sizes; where="llm" only), Qwen3VLForConditionalGeneration
and Qwen3VLMoeForConditionalGeneration (DeepStack features pruned with their tokens); the
videos of Qwen2.5-VL and Qwen3-VL are pruned too, each video one item.
Qwen3_5ForConditionalGeneration and Qwen3_5MoeForConditionalGeneration (linear-attention
layers: the importance layer `layer - 1` must be a full-attention one, default `layer` = the
first full-attention layer + 1) and Gemma3ForConditionalGeneration (16 x 16 per image, its
masks per layer kind rebuilt for the kept tokens), where="llm". `where="llm"` prunes
inside the language model at decoder layer `layer` (the paper's setting); `where="vision"`
(LLaVA: the CLS row; Qwen2.5-VL and Qwen3-VL: the tower's last full-attention block, images
and videos, docs/spec.md §15.5) prunes on the vision side so that the LLM gets a shorter
prompt: the vLLM plugin's selection.
`calibrate_prior` computes a model's positional prior from the same importance rows;
`draw_kept` draws what was kept. Another family:
write an `Adapter` (or reuse `LlavaAdapter` / `Qwen2VLAdapter`) and `register_adapter` it.
What users run into (use_cache=False, beams, non-square pictures): docs/integration.md.

Uses transformers' extension points only (AttentionInterface / AttentionMaskInterface and
forward hooks with kwargs): no model code is copied or patched. Requires the `hf` extra:
    pip install 'd2pruner_kernels[hf]'   (transformers >= 5.16.1, < 6)
"""
try:
    import transformers as _transformers
except ImportError as e:
    raise ImportError("d2pruner_kernels.hf needs transformers 5.x: "
                      "pip install 'd2pruner_kernels[hf]' (install torch first)") from e
if int(_transformers.__version__.split(".")[0]) < 5:
    raise ImportError(f"d2pruner_kernels.hf needs transformers >= 5.16.1, < 6 (tested with "
                      f"5.19 and 5.25), found {_transformers.__version__}: "
                      f"pip install 'd2pruner_kernels[hf]'")

from ._common import Adapter
from ._pruner import Pruner, apply, calibrate_prior, register_adapter
from .internvl import InternVLAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen2_vl import Qwen2VLAdapter
from .qwen3_vl import Qwen3VLAdapter
from .qwen_video import QwenVideoAdapter
from .qwen3_5 import Qwen3_5Adapter
from .gemma3 import Gemma3Adapter
from ..draw import draw_kept

__all__ = ["apply", "calibrate_prior", "Pruner", "draw_kept", "register_adapter", "Adapter",
           "LlavaAdapter", "Qwen2VLAdapter", "LlavaNextAdapter", "LlavaOnevisionAdapter",
           "InternVLAdapter", "Qwen3VLAdapter", "QwenVideoAdapter", "Qwen3_5Adapter",
           "Gemma3Adapter"]
