"""The parameters of the hybrid graph (docs/spec.md, step 4), with their defaults written
once. `prune()` and `similarity_graph()` build one `GraphParams` and pass it, under this
one name, through the dispatcher to whichever backend builds the graph:

    edge(i, j)  iff  (1 - spatial_weight) * cos_ij + spatial_weight * near_ij >= sim_threshold
    near_ij     iff  max(|dy|, |dx|) <= radius  and  |dt| <= temporal_radius

Any radius >= 0 is legal. One at least as wide as the grid makes every pair near along its
axes, so radii are clamped to RADIUS_MAX = 2**31 - 1 (wider than any grid the kernels take:
their token ids are 32-bit in the grid arithmetic) when the object is made: the edges are
the same, and every backend gets an int that fits its 32-bit arguments.
"""
from __future__ import annotations

import dataclasses

from .checks import check_float, check_int

RADIUS_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class GraphParams:
    sim_threshold: float = 0.8   # theta, in [-1, 1]
    spatial_weight: float = 0.0  # beta, in [0, 1] (0.5: the paper's localization preset)
    radius: int = 2              # Chebyshev radius on the grid, in tokens
    temporal_radius: int = 1     # (T, H, W) grids: frames this close are neighbours

    def __post_init__(self):  # validated once, where the object is made
        set_ = object.__setattr__
        set_(self, "sim_threshold", check_float("sim_threshold", self.sim_threshold, -1.0, 1.0))
        set_(self, "spatial_weight", check_float("spatial_weight", self.spatial_weight, 0.0, 1.0))
        set_(self, "radius", min(check_int("radius", self.radius), RADIUS_MAX))
        set_(self, "temporal_radius",
             min(check_int("temporal_radius", self.temporal_radius), RADIUS_MAX))

    @property
    def cos_weight(self) -> float:
        return 1.0 - self.spatial_weight


DEFAULTS = GraphParams()
