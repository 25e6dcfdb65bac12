"""Reference of `attention_scores`: the rows of the attention matrix that the pruners read,
computed the plain way (logits of the given query rows only, never the L x L matrix).

    logits[b, h, r, j] = scale * <q[b, h, r], k[b, h // G, j]>      G = Hq // Hk (GQA)
    p[b, h, r, :]      = softmax over the keys j <= q_positions[b, r] (all keys if None)
                         or exp(logits - lse[b, h, r]) when the log-sum-exp is given
    out[b, n]          = mean over h, r of p[b, h, r, start + n],   n < end - start

Float64 inputs are computed in float64 (the tests' yardstick), everything else in float32.
A query row that sees no key at all contributes zeros to the mean.
"""
from __future__ import annotations

import math

import torch

from .numerics import matmul_fp32


def attention_scores(q: torch.Tensor, k: torch.Tensor, key_span: tuple[int, int],
                     scale: float | None = None, lse: torch.Tensor | None = None,
                     q_positions: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Hq, Nq, d], k [B, Hk, L, d] -> [B, end - start] (float64 for float64 q, else
    float32). lse [B, Hq, Nq] is the natural-log log-sum-exp of the scaled logits;
    q_positions [Nq] or [B, Nq]: query row r sees the keys j <= q_positions[..., r]."""
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, hq, nq, d = q.shape
    hk, n_keys = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    kk = k.to(work).repeat_interleave(hq // hk, dim=1)            # [B, Hq, L, d]
    a, b = q.to(work), kk.transpose(-1, -2)
    logits = (torch.matmul(a, b) if work == torch.float64 else matmul_fp32(a, b)) * scale  # [B, Hq, Nq, L]
    if q_positions is None:
        seen = torch.ones(1, 1, 1, n_keys, dtype=torch.bool, device=q.device)
    else:
        pos = q_positions.reshape(-1, nq)                          # [1 or B, Nq]
        keys = torch.arange(n_keys, device=q.device)
        seen = (keys <= pos.unsqueeze(-1)).unsqueeze(1)            # [1 or B, 1, Nq, L]
    logits = logits.masked_fill(~seen, float("-inf"))
    if lse is None:
        p = torch.softmax(logits, dim=-1)
    else:
        p = torch.exp(logits - lse.to(work).unsqueeze(-1))
    p = torch.where(seen, p, 0.0)                                  # a blind row adds zeros
    start, end = key_span
    return p[..., start:end].mean(dim=(1, 2))
