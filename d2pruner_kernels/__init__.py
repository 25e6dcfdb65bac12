"""d2pruner_kernels: exact, batched, sync-free D2Pruner visual-token pruning (docs/spec.md).

    prune(tokens, attn, grid_hw, k, **options) -> int64 indices, ascending
    prune_varlen(tokens, attn, cu_seqlens, grids, k, **options) -> (keep, cu_keep)

The options of both are one frozen PruneOptions (`d2pruner_kernels.options`), passed as
`options=` or as its fields. The stages are public too (debiased_scores, rank_order,
similarity_graph, greedy_mis), as are attention_scores (attention rows from Q and K) and
PositionalPrior; the pure-torch twins live in `d2pruner_kernels.reference`, the packed
adjacency layout in `d2pruner_kernels.layout`. Imported on demand: `d2pruner_kernels.hf`
(transformers models), `d2pruner_kernels.vllm_plugin` (vLLM), `d2pruner_kernels.draw`
(draw_kept), `d2pruner_kernels.testing` (inputs and parity checks for any backend).
README.md and docs/guide.md show their use, docs/spec.md what is computed.
"""
from . import layout, reference
from .attention_scores import attention_scores
from .options import PruneOptions
from .prior import PositionalPrior
from .prune import prune
from .stages import debiased_scores, greedy_mis, rank_order, similarity_graph
from .token_layout import TokenLayout
from .varlen import prune_varlen

__all__ = ["prune", "prune_varlen", "debiased_scores", "rank_order", "similarity_graph",
           "greedy_mis", "attention_scores", "PositionalPrior", "PruneOptions", "TokenLayout",
           "layout",
           "reference"]
__version__ = "0.1.0"
