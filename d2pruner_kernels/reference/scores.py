"""Step 1 (docs/spec.md): the debiased importance scores."""
from __future__ import annotations

import torch

from ..options import DEFAULTS


def debiased_scores(attn: torch.Tensor, prior: torch.Tensor | None = None,
                    eps: float = DEFAULTS.eps) -> torch.Tensor:
    """s = mean_heads(attn) / (prior + eps) in float32; NaN -> -inf.

    attn: [B, N] or [B, H, N]; prior: [N], [B, N] or None. Returns float32 [B, N].
    -0.0 is written as +0.0 so that every backend sorts equal scores identically.
    """
    a = attn.float()
    if a.dim() == 3:
        a = a.mean(dim=1)
    if prior is not None:
        a = a / (prior.float() + eps)
    return torch.where(torch.isnan(a), float("-inf"), a) + 0.0
