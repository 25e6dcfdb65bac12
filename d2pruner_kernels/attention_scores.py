"""Importance without attention weights: the attention row the pruners need, straight from
the queries and keys that FlashAttention / SDPA consume (they never return the matrix).

    attention_scores(q, k, key_span=(start, end)) -> float32 [B, end - start]

    out[b, n] = mean over query heads h and query rows r of
                softmax_j(scale * <q[b, h, r], k[b, h // (Hq // Hk), j]>)[start + n]

In a padded or packed batch each sample has its own span, `key_span=[(start_b, end_b)]`
(or an int tensor [B, 2] on the host), and `key_padding_mask` [B, L] (True / 1 = a real
key, HF's attention_mask) removes padding keys from every row's softmax. Equal lengths
give [B, n]; with `packed=True` the rows are back to back, float32 [sum_b n_b] (offsets:
the cumulative sum of the lengths, prune_varlen's cu_seqlens).

The softmax runs over every key the row sees (system prompt, image and text: all L keys,
or the keys j <= q_positions[r] under a causal limit, less those the padding mask
removes), so the result equals the eager attention row `attn[:, :, row, start:end]`
averaged over heads, with no L x L matrix.

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
from .options import DEFAULTS
from .checks import FLOAT_DTYPES, check_backend, check_bool, check_dense, shape_str

INT_DTYPES = (torch.int32, torch.int64)
MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _is_int(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, numbers.Integral)


def _check_span(key_span, b: int, n_keys: int):
    """(start, end) for one span shared by every sample, or a list of B (start, end) pairs
    (from a list / tuple of pairs or a host int tensor [B, 2]). Python values only."""
    if (isinstance(key_span, (tuple, list)) and len(key_span) == 2
            and all(map(_is_int, key_span))):
        start, end = int(key_span[0]), int(key_span[1])
        if not 0 <= start < end <= n_keys:
            raise ValueError(f"key_span must satisfy 0 <= start < end <= L={n_keys}, "
                             f"got ({start}, {end})")
        return start, end
    if isinstance(key_span, torch.Tensor):
        check_dense("key_span", key_span)
        if key_span.dtype not in INT_DTYPES:
            raise TypeError(f"key_span tensor must be int32 or int64, got {key_span.dtype}")
        if key_span.device.type != "cpu":  # reading it to validate would synchronise
            raise ValueError(f"key_span tensor must be on the CPU (its values set the output "
                             f"shape; reading them on {key_span.device} would synchronise), "
                             f"got {key_span.device}: pass a list of (start, end) pairs")
        if tuple(key_span.shape) != (b, 2):
            raise ValueError(f"key_span tensor must have shape [B, 2] = [{b}, 2], "
                             f"got {shape_str(key_span)}")
        pairs = key_span.tolist()
    elif (isinstance(key_span, (tuple, list)) and len(key_span) > 0
          and all(isinstance(p, (tuple, list)) for p in key_span)):
        pairs = key_span
        if len(pairs) != b:
            raise ValueError(f"key_span has {len(pairs)} (start, end) pairs but q has B={b}")
    else:
        raise TypeError(f"key_span must be a pair of ints (start, end), B such pairs or an "
                        f"int tensor [B, 2], got {key_span!r}")
    spans = []
    for i, p in enumerate(pairs):
        if len(p) != 2 or not all(map(_is_int, p)):
            raise TypeError(f"key_span[{i}] must be a pair of ints (start, end), got {p!r}")
        start, end = int(p[0]), int(p[1])
        if not 0 <= start < end <= n_keys:
            raise ValueError(f"key_span[{i}] (sample {i}) must satisfy 0 <= start < end <= "
                             f"L={n_keys}, got ({start}, {end})")
        spans.append((start, end))
    return spans


def _check_optional(name, t, q, dtypes, dtype_text, shapes, shape_text) -> None:
    """An optional tensor argument: None, or a dense tensor of one of `dtypes`, one of
    `shapes`, on q's device (metadata only)."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    check_dense(name, t)
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be {dtype_text}, got {t.dtype}")
    if tuple(t.shape) not in shapes:
        raise ValueError(f"{name} must have shape {shape_text}, got {shape_str(t)}")
    if t.device != q.device:
        raise ValueError(f"{name} is on {t.device} but q is on {q.device}")


def _check_inputs(q, k, key_span, scale, lse, q_positions, key_padding_mask=None):
    """Metadata-only validation (no device sync); returns (span, scale): span is (start,
    end), or a list of B pairs (host values only)."""
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

    span = _check_span(key_span, b, n_keys)

    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float, got {type(scale).__name__} {scale!r}")
    elif not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite float, got {scale}")

    _check_optional("lse", lse, q, (torch.float32,), "float32 (FlashAttention's log-sum-exp)",
                    [(b, hq, nq)], f"[B, Hq, Nq] = [{b}, {hq}, {nq}]")
    _check_optional("q_positions", q_positions, q, INT_DTYPES, "int32 or int64",
                    [(nq,), (b, nq)], f"[Nq] = [{nq}] or [B, Nq] = [{b}, {nq}]")
    _check_optional("key_padding_mask", key_padding_mask, q, MASK_DTYPES,
                    "bool or an integer dtype (True / 1 = a real key, HF's attention_mask)",
                    [(b, n_keys)], f"[B, L] = [{b}, {n_keys}]")
    return span, float(scale)


def attention_scores(q: torch.Tensor, k: torch.Tensor, *,
                     key_span: tuple[int, int] | list[tuple[int, int]] | torch.Tensor,
                     scale: float | None = None, lse: torch.Tensor | None = None,
                     q_positions: torch.Tensor | None = None,
                     key_padding_mask: torch.Tensor | None = None, packed: bool = False,
                     backend: str = DEFAULTS.backend) -> torch.Tensor:
    """Mean attention of the query rows `q` on the keys `key_span`, float32 [B, end - start].

    q:     [B, Hq, Nq, d] query rows of interest (the last text token, the CLS token, or
           several rows, which are averaged), RoPE already applied. fp16 / bf16 / fp32.
    k:     [B, Hk, L, d] all keys, same dtype; Hq a multiple of Hk (query head h reads
           key head h // (Hq // Hk)). Any strides; a non-unit last stride is copied.
    key_span: (start, end), the visual tokens among the L keys, shared by every sample;
           or one (start_b, end_b) per sample: a list of B pairs or an int tensor [B, 2]
           on the CPU (a CUDA tensor is refused: validating it would synchronise). Each
           0 <= start < end <= L.
    packed: with per-sample spans of equal lengths n the result is [B, n]; lengths that
           differ need packed=True: float32 [sum_b n_b], sample b's row at
           offsets[b]:offsets[b + 1], offsets = [0, cumsum(lengths)] (prune_varlen's
           cu_seqlens). packed=True always returns this packed form.
    scale: logit scale, default 1 / sqrt(d).
    lse:   optional float32 [B, Hq, Nq], natural-log log-sum-exp of the scaled logits
           (FlashAttention's `softmax_lse` for these rows): skips the normalising pass.
    q_positions: optional int [Nq] or [B, Nq]: row r sees the keys j <= q_positions[r]
           (a causal limit); a row that sees no key contributes zeros. Not read on the
           host, so values are not checked; any value is safe: >= L - 1 (INT32_MAX,
           INT64_MAX) means every key, < 0 none.
    key_padding_mask: optional [B, L], bool or int (HF's attention_mask): nonzero = a
           real key; the others are left out of every row's softmax, as if absent (and
           score 0 inside a span). Combined with q_positions when both are given. Values
           are not read on the host. Any strides.
    backend: 'auto' (Triton on CUDA), 'kernels' (Triton, or the interpreter on CPU with
           TRITON_INTERPRET=1) or 'reference' (plain torch).

    Validation reads metadata only: the call never synchronises with the device. (Spans
    that differ between samples are staged on the device by one small non-blocking copy
    from pinned memory, which a CUDA graph cannot capture: the call raises under capture.)
    """
    check_backend(backend)
    span, scale = _check_inputs(q, k, key_span, scale, lse, q_positions, key_padding_mask)
    packed = check_bool("packed", packed)
    b = q.shape[0]
    if isinstance(span, list):
        lengths = [e - s for s, e in span]
        if len(set(span)) == 1:  # one span after all: today's path
            span = span[0]
        elif len(set(lengths)) > 1 and not packed:
            other = next(i for i, n in enumerate(lengths) if n != lengths[0])
            raise ValueError(
                f"key_span lengths differ between samples (sample 0 has {lengths[0]} keys, "
                f"sample {other} has {lengths[other]}; all: {lengths}): pass packed=True for "
                f"the rows back to back, float32 [sum of lengths] = [{sum(lengths)}]")
    out = dispatch.attention(q, k, span, scale, lse, q_positions, backend,
                             key_padding_mask=key_padding_mask)
    if packed:
        return out.reshape(-1)
    return out if out.dim() == 2 else out.view(b, -1)  # per-sample spans of equal lengths
