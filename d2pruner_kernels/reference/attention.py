"""Reference of `attention_scores`: the rows of the attention matrix that the pruners read,
computed the plain way (logits of the given query rows only, never the L x L matrix).

    logits[b, h, r, j] = scale * <q[b, h, r], k[b, h // G, j]>      G = Hq // Hk (GQA)
    seen[b, r, j]      = j <= q_positions[b, r] (all keys if None)
                         and key_padding_mask[b, j] != 0 (all keys if None)
    p[b, h, r, :]      = softmax over the keys seen[b, r, :]
                         or exp(logits - lse[b, h, r]) when the log-sum-exp is given
    out[b, n]          = mean over h, r of p[b, h, r, start + n],   n < end - start

With one span per sample, a list of B pairs (start_b, end_b), the rows of the samples are
concatenated: [sum_b (end_b - start_b)].

Float64 inputs are computed in float64 (the tests' yardstick), everything else in float32.
A query row that sees no key at all contributes zeros to the mean.
"""
from __future__ import annotations

import math

import torch

from .numerics import matmul_fp32


def attention_scores(q: torch.Tensor, k: torch.Tensor, key_span, scale: float | None = None,
                     lse: torch.Tensor | None = None, q_positions: torch.Tensor | None = None,
                     key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Hq, Nq, d], k [B, Hk, L, d] -> [B, end - start] for key_span = (start, end),
    or [sum_b (end_b - start_b)] for a list of B pairs (float64 for float64 q, else
    float32). lse [B, Hq, Nq] is the natural-log log-sum-exp of the scaled logits;
    q_positions [Nq] or [B, Nq]: query row r sees the keys j <= q_positions[..., r];
    key_padding_mask [B, L]: only the keys where it is nonzero exist."""
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, hq, nq, d = q.shape
    hk, n_keys = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    kk = k.to(work).repeat_interleave(hq // hk, dim=1)            # [B, Hq, L, d]
    x, y = q.to(work), kk.transpose(-1, -2)
    logits = (torch.matmul(x, y) if work == torch.float64 else matmul_fp32(x, y)) * scale  # [B, Hq, Nq, L]
    if q_positions is None:
        seen = torch.ones(1, 1, 1, n_keys, dtype=torch.bool, device=q.device)
    else:
        pos = q_positions.reshape(-1, nq)                          # [1 or B, Nq]
        keys = torch.arange(n_keys, device=q.device)
        seen = (keys <= pos.unsqueeze(-1)).unsqueeze(1)            # [1 or B, 1, Nq, L]
    if key_padding_mask is not None:
        seen = seen & (key_padding_mask != 0)[:, None, None, :]    # [B, 1, 1 or Nq, L]
    logits = logits.masked_fill(~seen, float("-inf"))
    if lse is None:
        p = torch.softmax(logits, dim=-1)
    else:
        p = torch.exp(logits - lse.to(work).unsqueeze(-1))
    p = torch.where(seen, p, 0.0)                                  # a blind row adds zeros
    if isinstance(key_span, list):                                 # one span per sample
        return torch.cat([p[i, ..., s:e].mean(dim=(0, 1)) for i, (s, e) in enumerate(key_span)])
    start, end = key_span
    return p[..., start:end].mean(dim=(1, 2))
