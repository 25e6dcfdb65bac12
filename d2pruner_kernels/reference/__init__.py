"""Pure-torch reference of every stage of docs/spec.md, one file per stage, each the twin
of `kernels/<stage>.py`: plain, obviously right, the yardstick for every kernel. Batched
tensors ([B, ...]) throughout; any device."""
from .graph import grid_coords, similarity_edges, similarity_graph
from .mis import greedy_members, greedy_mis, greedy_walk, walk_depths
from .rank import rank_order
from .scores import debiased_scores

__all__ = [
    "debiased_scores", "rank_order", "grid_coords", "similarity_edges", "similarity_graph",
    "greedy_members", "greedy_walk", "greedy_mis", "walk_depths",
]
