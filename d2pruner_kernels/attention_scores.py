"""Importance without attention weights: the attention row the pruners need, straight from
the queries and keys that FlashAttention / SDPA consume (they never return the matrix).

    attention_scores(q, k, key_span=(start, end)) -> float32 [B, end - start]

    out[b, n] = mean over query heads h and query rows r of
                softmax_j(scale * <q[b, h, r], k[b, h // (Hq // Hk), j]>)[start + n]

The softmax runs over every key the row sees (system prompt, image and text: all L keys,
or the keys j <= q_positions[r] under a causal limit), so the result equals the eager
attention row `attn[:, :, row, start:end]` averaged over heads, with no L x L matrix.

`lse` is FlashAttention's convention: the natural-log log-sum-exp of the *scaled* logits,
lse[b, h, r] = log sum_j exp(scale * <q[b, h, r], k[b, h // G, j]>) over the keys the row
sees, float32 [B, Hq, Nq] (FlashAttention returns [B, Hq, Lq]: take the rows you pass as
q). With it, the normalising pass over all L keys is skipped.
"""
from __future__ import annotations

import math
import numbers

import torch

from . import dispatch
from .checks import FLOAT_DTYPES, check_backend, check_dense, shape_str

INT_DTYPES = (torch.int32, torch.int64)


def _check_inputs(q, k, key_span, scale, lse, q_positions):
    """Metadata-only validation (no device sync); returns (start, end, scale)."""
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        check_dense(name, t)
        if t.dim() != 4:
            want = "[B, Hq, Nq, d]" if name == "q" else "[B, Hk, L, d]"
            raise ValueError(f"{name} must be 4-D {want}, got shape {shape_str(t)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if k.dtype != q.dtype:
        raise TypeError(f"k must have the dtype of q ({q.dtype}), got {k.dtype}")
    if k.device != q.device:
        raise ValueError(f"k is on {k.device} but q is on {q.device}")
    b, hq, nq, d = q.shape
    if b == 0 or hq == 0 or nq == 0 or d == 0:
        raise ValueError(f"q must have B, Hq, Nq, d >= 1, got shape {shape_str(q)}")
    if k.shape[0] != b:
        raise ValueError(f"k has batch {k.shape[0]} but q has B={b}")
    if k.shape[3] != d:
        raise ValueError(f"k has head dim d={k.shape[3]} but q has d={d}")
    hk, n_keys = k.shape[1], k.shape[2]
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"q heads Hq={hq} must be a multiple of k heads Hk={hk} "
                         f"(grouped-query attention)")
    if n_keys == 0:
        raise ValueError(f"k must have L >= 1 keys, got shape {shape_str(k)}")

    if (not isinstance(key_span, (tuple, list)) or len(key_span) != 2
            or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in key_span)):
        raise TypeError(f"key_span must be a pair of ints (start, end), got {key_span!r}")
    start, end = int(key_span[0]), int(key_span[1])
    if not 0 <= start < end <= n_keys:
        raise ValueError(f"key_span must satisfy 0 <= start < end <= L={n_keys}, "
                         f"got ({start}, {end})")

    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float, got {type(scale).__name__} {scale!r}")
    elif not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite float, got {scale}")

    if lse is not None:
        if not isinstance(lse, torch.Tensor):
            raise TypeError(f"lse must be a torch.Tensor or None, got {type(lse).__name__}")
        check_dense("lse", lse)
        if tuple(lse.shape) != (b, hq, nq):
            raise ValueError(f"lse must have shape [B, Hq, Nq] = [{b}, {hq}, {nq}], "
                             f"got {shape_str(lse)}")
        if lse.dtype != torch.float32:
            raise TypeError(f"lse must be float32 (FlashAttention's log-sum-exp), got {lse.dtype}")
        if lse.device != q.device:
            raise ValueError(f"lse is on {lse.device} but q is on {q.device}")

    if q_positions is not None:
        if not isinstance(q_positions, torch.Tensor):
            raise TypeError(f"q_positions must be a torch.Tensor or None, "
                            f"got {type(q_positions).__name__}")
        check_dense("q_positions", q_positions)
        if q_positions.dtype not in INT_DTYPES:
            raise TypeError(f"q_positions must be int32 or int64, got {q_positions.dtype}")
        if tuple(q_positions.shape) not in ((nq,), (b, nq)):
            raise ValueError(f"q_positions must have shape [Nq] = [{nq}] or [B, Nq] = "
                             f"[{b}, {nq}], got {shape_str(q_positions)}")
        if q_positions.device != q.device:
            raise ValueError(f"q_positions is on {q_positions.device} but q is on {q.device}")
    return start, end, float(scale)


def attention_scores(q: torch.Tensor, k: torch.Tensor, *, key_span: tuple[int, int],
                     scale: float | None = None, lse: torch.Tensor | None = None,
                     q_positions: torch.Tensor | None = None,
                     backend: str = "auto") -> torch.Tensor:
    """Mean attention of the query rows `q` on the keys `key_span`, float32 [B, end - start].

    q:     [B, Hq, Nq, d] query rows of interest (the last text token, the CLS token, or
           several rows, which are averaged), RoPE already applied. fp16 / bf16 / fp32.
    k:     [B, Hk, L, d] all keys, same dtype; Hq a multiple of Hk (query head h reads
           key head h // (Hq // Hk)). Any strides; a non-unit last stride is copied.
    key_span: (start, end), the visual tokens among the L keys.
    scale: logit scale, default 1 / sqrt(d).
    lse:   optional float32 [B, Hq, Nq], natural-log log-sum-exp of the scaled logits
           (FlashAttention's `softmax_lse` for these rows): skips the normalising pass.
    q_positions: optional int [Nq] or [B, Nq]: row r sees the keys j <= q_positions[r]
           (a causal limit); a row that sees no key contributes zeros. Not read on the
           host, so values are not checked; any value is safe: >= L - 1 (INT32_MAX,
           INT64_MAX) means every key, < 0 none.
    backend: 'auto' (Triton on CUDA), 'kernels' (Triton, or the interpreter on CPU with
           TRITON_INTERPRET=1) or 'reference' (plain torch).

    Validation reads metadata only: the call never synchronises with the device.
    """
    check_backend(backend)
    start, end, scale = _check_inputs(q, k, key_span, scale, lse, q_positions)
    return dispatch.attention(q, k, (start, end), scale, lse, q_positions, backend)
