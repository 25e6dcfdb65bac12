"""Pure-torch reference of every stage of SPEC.md: plain, obviously right, the yardstick
for every kernel. Batched tensors ([B, ...]) throughout; any device."""
from .graph import grid_coords, similarity_edges, similarity_graph
from .mis import greedy_members, greedy_mis, greedy_walk
from .scores import debiased_scores, rank_order

__all__ = [
    "debiased_scores", "rank_order", "grid_coords", "similarity_edges", "similarity_graph",
    "greedy_members", "greedy_walk", "greedy_mis",
]
