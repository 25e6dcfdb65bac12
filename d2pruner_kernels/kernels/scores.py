"""Triton kernel of step 1 (docs/spec.md): debiased importance scores, one fused pass.

    s[b, n] = (sum_h attn[b, h, n] / H) / (prior[b, n] + eps)      in float32
    s = -inf where s is NaN (NaN ranks last); -0.0 is written as +0.0

Attention is read through its strides, so every layout a user holds is a view, never a
copy: [B, N] (H = 1), [B, H, N], or a query row of a full attention map [B, H, L, L]
sliced over the visual key span. The prior is [N], [1, N] (batch stride 0) or [B, N].
"""
from __future__ import annotations

import triton
import triton.language as tl

import torch

from . import cdiv, launch_device, next_pow2

BLOCK_N = 256
HEADS_UNROLLED = 8  # loads in flight per thread: the sum stays in head order


@triton.jit
def _debiased_scores_kernel(attn_ptr, prior_ptr, out_ptr, N, H,
                            stride_ab, stride_ah, stride_an, stride_pb, stride_pn, eps,
                            HAS_PRIOR: tl.constexpr, BLOCK: tl.constexpr, UNROLL: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    # 64-bit offsets: a row of a [B, H, L, L] map has head stride L*L, past 2^31 soon.
    ptrs = attn_ptr + b * stride_ab + offs.to(tl.int64) * stride_an
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    # Heads in order, float32 accumulation. UNROLL independent loads per step, so their
    # latencies overlap instead of adding up; a masked head adds +0.0, which changes nothing.
    for h0 in range(0, H, UNROLL):
        for u in tl.static_range(UNROLL):
            h = h0 + u
            a = tl.load(ptrs + h.to(tl.int64) * stride_ah, mask=mask & (h < H), other=0.0)
            acc += a.to(tl.float32)
    s = tl.div_rn(acc, tl.full([BLOCK], H, tl.float32))  # the mean, IEEE division
    if HAS_PRIOR:
        p = tl.load(prior_ptr + b * stride_pb + offs.to(tl.int64) * stride_pn, mask=mask, other=1.0)
        s = tl.div_rn(s, p.to(tl.float32) + eps)  # IEEE division, as torch does
    s = tl.where(s != s, float("-inf"), s) + 0.0
    tl.store(out_ptr + b * N + offs, s, mask=mask)


def debiased_scores(attn: torch.Tensor, prior: torch.Tensor | None,
                    eps: float) -> torch.Tensor:
    """attn [B, N] or [B, H, N] (any strides), prior [N] / [1, N] / [B, N] / None
    -> float32 [B, N]."""
    a = attn.unsqueeze(1) if attn.dim() == 2 else attn
    b, h, n = a.shape
    out = torch.empty(b, n, dtype=torch.float32, device=attn.device)
    if prior is None:
        p, spb, spn = out, 0, 0  # never read
    else:
        p = prior
        spb, spn = prior.expand(b, n).stride()  # [N] and [1, N] broadcast: batch stride 0
    grid = (cdiv(n, BLOCK_N), b)
    with launch_device(attn.device):
        sab, sah, san = a.stride()
        _debiased_scores_kernel[grid](
            attn_ptr=a, prior_ptr=p, out_ptr=out, N=n, H=h, stride_ab=sab, stride_ah=sah,
            stride_an=san, stride_pb=spb, stride_pn=spn, eps=eps, HAS_PRIOR=prior is not None,
            BLOCK=BLOCK_N, UNROLL=min(HEADS_UNROLLED, next_pow2(h)))
    return out
