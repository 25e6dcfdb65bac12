"""Step 2 (docs/spec.md): the rank order."""
from __future__ import annotations

import torch


def rank_order(scores: torch.Tensor) -> torch.Tensor:
    """Token indices sorted by score, best first; ties to the smaller index; NaN of either
    sign first (CUDA's radix sort would order -NaN by its bits, last). int64 [B, N]."""
    if scores.is_floating_point():
        scores = torch.where(torch.isnan(scores), float("nan"), scores)  # one NaN: +NaN
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices
