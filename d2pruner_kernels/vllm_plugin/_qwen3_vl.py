"""Qwen3-VL images with D2Pruner in vLLM, by registration, as Qwen2.5-VL (_qwen2_5_vl.py):
subclasses of vLLM's Qwen3-VL model and processor with the same mixins. Differences: the
importance block is the tower's last block (every block attends fully; no window order),
the similarity graph reads the main features (`visual_dim` columns; the DeepStack levels
are further columns of the same rows, so selecting rows prunes them consistently), and the
kept rows carry the 4 position channels (t, h, w, extent) that `recompute_mrope_positions`
of vLLM's Qwen2.5-VL reads, which this subclass uses: images only, so the 5-channel video
layout (timestamps) is not needed, and the text after an image keeps its unpruned place."""
from __future__ import annotations

from vllm.model_executor.models import qwen2_5_vl, qwen3_vl as base
from vllm.multimodal import MULTIMODAL_REGISTRY

from ._qwen2_5_vl import ModelMixin, QwenProcessorMixin
from ._request import InfoMixin

ARCH = "Qwen3VLForConditionalGeneration"


class D2PrunerQwen3VLProcessingInfo(InfoMixin, base.Qwen3VLProcessingInfo):
    pass


class D2PrunerQwen3VLProcessor(QwenProcessorMixin, base.Qwen3VLMultiModalProcessor):
    """vLLM's Qwen3-VL processor with k placeholders per image."""


@MULTIMODAL_REGISTRY.register_processor(D2PrunerQwen3VLProcessor,
                                        info=D2PrunerQwen3VLProcessingInfo,
                                        dummy_inputs=base.Qwen3VLDummyInputsBuilder)
class D2PrunerQwen3VL(ModelMixin, base.Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL with D2Pruner on its images."""
    _d2pruner_name = "Qwen3-VL"
    _d2pruner_windows = False

    def _d2pruner_block(self) -> int:
        return len(self.visual.blocks) - 1

    # the 4-channel rewrite (t, h, w, extent): images only
    recompute_mrope_positions = \
        qwen2_5_vl.Qwen2_5_VLForConditionalGeneration.recompute_mrope_positions
