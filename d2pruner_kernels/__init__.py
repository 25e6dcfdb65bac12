"""d2pruner_kernels: exact, batched, sync-free D2Pruner visual-token pruning (docs/spec.md).

    prune(tokens, attn, grid_hw, k, **options) -> int64 indices, ascending
    prune_varlen(tokens, attn, cu_seqlens, grids, k, **options) -> (keep, cu_keep)

The stages are public too (debiased_scores, rank_order, similarity_graph, greedy_mis), as
are attention_scores (attention rows from Q and K) and PositionalPrior; the pure-torch
twins live in `d2pruner_kernels.reference`, the packed adjacency layout in
`d2pruner_kernels.layout`, the options in `d2pruner_kernels.options` (PruneOptions).
"""
from . import layout, reference
from .attention_scores import attention_scores
from .options import PruneOptions
from .prior import PositionalPrior
from .prune import prune
from .stages import debiased_scores, greedy_mis, rank_order, similarity_graph
from .varlen import prune_varlen

__all__ = ["prune", "prune_varlen", "debiased_scores", "rank_order", "similarity_graph",
           "greedy_mis", "attention_scores", "PositionalPrior", "PruneOptions", "layout",
           "reference"]
__version__ = "0.1.0"
