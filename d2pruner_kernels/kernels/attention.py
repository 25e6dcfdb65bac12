"""Triton kernels of `attention_scores`: a few rows of softmax(q kᵀ * scale), averaged over
heads and query rows, restricted to the visual key span, with no L x L matrix.

For query row m = (g, r) of key head hk (query head h = hk * G + g, G = Hq // Hk):

    s[m, j]  = scale * log2(e) * <q[b, h, r], k[b, hk, j]>         (base-2 logits, float32)
    seen     = j <= q_positions[b, r] and key_padding_mask[b, j]   (all j when neither)
    lse2[m]  = log2 sum_{j seen} 2^s[m, j]                         (= lse * log2(e))
    out[b, n] = sum_{h, r} 2^(s[m, start + n] - lse2[m]) / (Hq * Nq)

The span is one (start, end) for every sample, or one per sample (start_b, end_b): then
pass 2 reads each sample's start, length and output offset from a small int64 [B, 3]
device tensor, and the rows are written back to back, [sum_b n_b]. Both passes are one
launch for the whole batch either way.

Two passes (timed on an H200, see the README):
  1. `_lse_partials_kernel` reads all L keys once, split into chunks for parallelism; each
     program keeps an online (running max, rescaled sum) pair per row of its GQA group
     and writes it for its chunk. Skipped when the caller passes FlashAttention's lse.
  2. `_span_probs_kernel` merges the chunk pairs into lse2 (one vector load), reads only
     the span keys (of its sample), and sums the probabilities over heads and rows in a
     fixed order. When the span is short, the key heads are split over several programs
     for parallelism and their partial sums added by one torch sum: no atomics, the same
     bits every run.
The span keys are read twice, the others once.

Memory-safe for any values: row offsets are 64-bit (key row index x row stride may pass
2^31 elements in a strided view; the padding mask's and the packed output's offsets too),
per-sample spans are validated on the host (the kernels read only the [B, 3] table the
launch wrapper builds from them), mask values are only compared with 0, q_positions are
clamped to [-1, L - 1] (INT32_MAX / INT64_MAX mean "all keys", no overflow in
`max(pos) + 1`), and each probability's base-2 exponent is capped at 0 (a probability is
<= 1; a huge scale amplifies rounding past the float32 range otherwise). With a given
lse the exponent is formed in natural units (scale * <q, k> - lse), then converted.

The dot products run in the input dtype with float32 accumulation (`dot.dot_fp32_acc`,
never tf32). Head dims that are not powers of two (80, 96) are padded to the next one with
masked loads.
"""
from __future__ import annotations

import triton
import triton.language as tl

import torch

from . import cdiv, interpreting, launch_device, next_pow2, sm_count
from .dot import dot_fp32_acc, upcast

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): base-2 logits (kernels and host)


@triton.jit
def _group_rows(m0, R, NQ, G, hk, BLOCK_M: tl.constexpr):
    """Rows m0..m0+BLOCK_M of a GQA group: (valid, query head, query row)."""
    m = m0 + tl.arange(0, BLOCK_M)
    return m < R, hk * G + m // NQ, m % NQ


@triton.jit
def _load_tile(ptr, idx, idx_ok, stride_idx, offs_d, D, EVEN_D: tl.constexpr):
    """[len(idx), BLOCK_D] rows of a head, zero-padded past D. Row offsets in 64 bits: a
    strided view (a fused QKV buffer) can put idx * stride_idx past 2^31 elements."""
    ptrs = ptr + idx.to(tl.int64)[:, None] * stride_idx + offs_d[None, :]
    if EVEN_D:
        return tl.load(ptrs, mask=idx_ok[:, None], other=0.0)
    return tl.load(ptrs, mask=idx_ok[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _positions(pos_ptr, b, r, row_ok, sp_b, sp_r, L):
    """q_positions of rows r of image b, clamped to [-1, L - 1] (any int32 / int64 value,
    INT32_MAX or INT64_MAX included, means the same clamped: all keys up to it), so `+ 1`
    never overflows; offsets in 64 bits. Rows past R read -1: they see nothing."""
    pos = tl.load(pos_ptr + b.to(tl.int64) * sp_b + r.to(tl.int64) * sp_r, mask=row_ok,
                  other=-1)
    return tl.minimum(tl.maximum(pos, -1), L - 1)


@triton.jit
def _real_keys(mask_ptr, b, keys, key_ok, sm_b, sm_l):
    """key_padding_mask[b, keys] != 0 (a bool mask is read as uint8); offsets in 64 bits.
    Keys past key_ok read 0: absent."""
    real = tl.load(mask_ptr + b.to(tl.int64) * sm_b + keys.to(tl.int64) * sm_l, mask=key_ok,
                   other=0)
    return real != 0


@triton.jit
def _logits2(q, kt, qk_scale2, UPCAST: tl.constexpr):
    return dot_fp32_acc(q, kt, None, UPCAST) * qk_scale2


@triton.jit
def _lse_partials_kernel(
        q_ptr, k_ptr, pos_ptr, mask_ptr, m_ptr, l_ptr,
        L, D, NQ, G, R, HQ, HK, chunk, n_chunks, qk_scale2,
        sq_b, sq_h, sq_r, sk_b, sk_h, sk_l, sp_b, sp_r, sm_b, sm_l,
        HAS_POS: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
        UPCAST: tl.constexpr):
    c = tl.program_id(0)
    b = tl.program_id(1) // HK
    hk = tl.program_id(1) % HK
    m0 = tl.program_id(2) * BLOCK_M
    row_ok, h, r = _group_rows(m0, R, NQ, G, hk, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_rows = b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h + r.to(tl.int64) * sq_r
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    k_head = k_ptr + b.to(tl.int64) * sk_b + hk.to(tl.int64) * sk_h

    lo = c * chunk
    hi = tl.minimum(lo + chunk, L)
    if HAS_POS:  # padding rows get -1: they see nothing and do not stretch the loop
        pos = _positions(pos_ptr, b, r, row_ok, sp_b, sp_r, L)
        hi = tl.minimum(hi, tl.max(pos) + 1)  # pos <= L - 1: no overflow

    # Online log-sum-exp in base 2: mx is the running max, acc the sum of 2^(s - mx).
    mx = tl.full([BLOCK_M], float("-inf"), tl.float32)
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_ok = keys < hi
        if HAS_MASK:  # padding keys are absent: not even loaded
            key_ok = key_ok & _real_keys(mask_ptr, b, keys, key_ok, sm_b, sm_l)
        kt = tl.trans(_load_tile(k_head, keys, key_ok, sk_l, offs_d, D, EVEN_D))
        s = _logits2(q, kt, qk_scale2, UPCAST)
        seen = key_ok[None, :]
        if HAS_POS:
            seen = seen & (keys[None, :] <= pos[:, None])
        s = tl.where(seen, s, float("-inf"))
        mx_new = tl.maximum(mx, tl.max(s, axis=1))
        base = tl.where(mx_new == float("-inf"), 0.0, mx_new)  # a row seeing nothing yet
        acc = acc * tl.exp2(mx - base) + tl.sum(tl.exp2(s - base[:, None]), axis=1)
        mx = mx_new

    out = ((b.to(tl.int64) * HQ + h) * NQ + r) * n_chunks + c
    tl.store(m_ptr + out, mx, mask=row_ok)
    tl.store(l_ptr + out, acc, mask=row_ok)


@triton.jit
def _span_probs_kernel(
        q_ptr, k_ptr, pos_ptr, mask_ptr, spans_ptr, lse_ptr, m_ptr, l_ptr, out_ptr,
        span_start, n_span, n_out, D, NQ, G, R, HQ, HK, heads_per_prog, n_chunks, scale,
        qk_scale2, inv_rows,
        sq_b, sq_h, sq_r, sk_b, sk_h, sk_l, sp_b, sp_r, sm_b, sm_l,
        HAS_POS: tl.constexpr, HAS_LSE: tl.constexpr, HAS_MASK: tl.constexpr,
        PER_SAMPLE: tl.constexpr, BLOCK_C: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        EVEN_D: tl.constexpr, UPCAST: tl.constexpr):
    # Program (span block, b, head group): key heads hk_lo .. hk_lo + heads_per_prog - 1.
    b = tl.program_id(1)
    group = tl.program_id(2)
    if PER_SAMPLE:  # spans [B, 3] int64: (start, length, output offset) of each sample
        span_start = tl.load(spans_ptr + b.to(tl.int64) * 3)
        n_span = tl.load(spans_ptr + b.to(tl.int64) * 3 + 1)
        out_off = tl.load(spans_ptr + b.to(tl.int64) * 3 + 2)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_span
    keys = span_start + cols
    seen_col = col_ok
    if HAS_MASK:  # padding keys inside the span are absent too: they score 0 (their keys
        # are still loaded: a mask in the load predicate costs ~35 registers on sm_90)
        seen_col = col_ok & _real_keys(mask_ptr, b, keys, col_ok, sm_b, sm_l)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, BLOCK_C)
    hk_lo = group * heads_per_prog
    m_blocks = tl.cdiv(R, BLOCK_M)
    n_iter = (tl.minimum(hk_lo + heads_per_prog, HK) - hk_lo) * m_blocks
    if PER_SAMPLE:  # the grid covers the longest span: a block past this one's does nothing
        n_iter = tl.where(tl.program_id(0) * BLOCK_N < n_span, n_iter, 0)
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    # One flat loop over (key head, row block), in a fixed order: the sum is deterministic.
    for it in range(0, n_iter):
        hk = hk_lo + it // m_blocks
        row_ok, h, r = _group_rows((it % m_blocks) * BLOCK_M, R, NQ, G, hk, BLOCK_M)
        k_head = k_ptr + b.to(tl.int64) * sk_b + tl.cast(hk, tl.int64) * sk_h
        kt = tl.trans(_load_tile(k_head, keys, col_ok, sk_l, offs_d, D, EVEN_D))
        q_rows = b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h + r.to(tl.int64) * sq_r
        q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :],
                    mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        row = (b.to(tl.int64) * HQ + h) * NQ + r
        if HAS_LSE:  # natural log, as given
            lse_n = tl.load(lse_ptr + row, mask=row_ok, other=0.0)
        else:
            # Merge the chunks: lse2 = M + log2(sum_c l_c 2^(m_c - M)), M = max_c m_c.
            part = row[:, None] * n_chunks + offs_c[None, :]
            part_ok = row_ok[:, None] & (offs_c[None, :] < n_chunks)
            mc = tl.load(m_ptr + part, mask=part_ok, other=float("-inf"))
            lc = tl.load(l_ptr + part, mask=part_ok, other=0.0)
            big = tl.max(mc, axis=1)
            big = tl.where(big == float("-inf"), 0.0, big)
            tot = tl.sum(lc * tl.exp2(mc - big[:, None]), axis=1)
            lse2 = big + tl.log2(tl.where(tot > 0, tot, 1.0))  # tot = 0: row sees nothing
        seen = row_ok[:, None] & seen_col[None, :]
        if HAS_POS:
            pos = _positions(pos_ptr, b, r, row_ok, sp_b, sp_r, span_start + n_span)
            seen = seen & (keys[None, :] <= pos[:, None])
        if HAS_LSE:  # the difference in natural units, then base 2: FlashAttention's lse
            # comes from scale * dot, so a large scale does not amplify rounding here
            e2 = (dot_fp32_acc(q, kt, None, UPCAST) * scale - lse_n[:, None]) * LOG2E
        else:
            e2 = _logits2(q, kt, qk_scale2, UPCAST) - lse2[:, None]
        # A probability is <= 1: e2 <= 0 up to rounding, which a huge scale (1e8) can
        # amplify past 128 (2^128 = inf in float32); the exponent is capped at 0.
        p = tl.where(seen, tl.exp2(tl.minimum(e2, 0.0)), 0.0)
        total += tl.sum(p, axis=0)
    if PER_SAMPLE:  # out is [n_groups, n_out] (n_out = sum of lengths), samples back to back
        out = out_ptr + group.to(tl.int64) * n_out + out_off + cols
    else:  # out is [B, n_groups, n_span]; with one group it is the result itself
        out = out_ptr + (b * tl.num_programs(2) + group).to(tl.int64) * n_span + cols
    tl.store(out, total * inv_rows, mask=col_ok)


def default_config(dtype: torch.dtype, d: int, rows: int, device: torch.device) -> dict:
    """Block sizes; `programs` / `span_programs`: the number of pass-1 / pass-2 programs
    to aim for (pass 2 splits the key heads over programs until it has that many)."""
    block_m = min(64, max(16, next_pow2(rows)))
    if interpreting():  # few, large programs: each interpreted loop step costs ~ms
        return dict(BLOCK_M=block_m, BLOCK_N=128, BLOCK_N_SPAN=128, programs=1,
                    span_programs=1, num_warps=4, num_stages=1)
    block_n = 64 if dtype == torch.float32 or d > 64 else 128
    sms = sm_count(device)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_N_SPAN=64, programs=4 * sms,
                span_programs=2 * sms, num_warps=4, num_stages=3)


def _device_spans(spans: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """int64 [B, 3]: (start, length, output offset) per sample, on `device`. On a GPU, one
    non-blocking copy from pinned memory (the caching host allocator keeps the buffer
    until the copy is done): no synchronisation."""
    rows, off = [], 0
    for s, e in spans:
        rows.append((s, e - s, off))
        off += e - s
    host = torch.tensor(rows, dtype=torch.int64)
    if device.type != "cuda":
        return host.to(device)
    if torch.cuda.is_current_stream_capturing():  # the replay would read a freed buffer
        raise RuntimeError("attention_scores with spans that differ between samples copies "
                           "them to the GPU on each call and cannot be captured in a CUDA "
                           "graph; capture one span shared by every sample")
    return host.pin_memory().to(device, non_blocking=True)


def attention_scores(q: torch.Tensor, k: torch.Tensor, key_span, scale: float,
                     lse: torch.Tensor | None = None,
                     q_positions: torch.Tensor | None = None,
                     config: dict | None = None,
                     key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Hq, Nq, d], k [B, Hk, L, d] (validated by the caller) -> float32 [B, end-start]
    for key_span = (start, end); float32 [sum_b n_b], the samples' rows back to back, for
    a list of B pairs (start_b, end_b). key_padding_mask [B, L] bool or int: nonzero = a
    real key.

    config may set BLOCK_M, BLOCK_N (pass 1 keys), BLOCK_N_SPAN (pass 2 keys), programs
    (pass-1 parallelism target), chunk (keys per pass-1 program, a BLOCK_N multiple),
    span_programs (pass-2 parallelism target), num_warps, num_stages."""
    b, hq, nq, d = q.shape
    hk, n_keys = k.shape[1], k.shape[2]
    g, rows = hq // hk, (hq // hk) * nq
    per_sample = isinstance(key_span, list)
    if per_sample:  # the grid covers the longest span; pass 2 reads each sample's own
        spans = _device_spans(key_span, q.device)
        lengths = [e - s for s, e in key_span]
        start, n_span, n_out = 0, max(lengths), sum(lengths)
    else:
        start, end = key_span
        n_span = n_out = end - start
        spans = q  # never read
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    cfg = dict(default_config(q.dtype, d, rows, q.device), **(config or {}))
    block_m, block_n, block_ns = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("BLOCK_N_SPAN")
    programs, chunk = cfg.pop("programs"), cfg.pop("chunk", None)
    span_programs = cfg.pop("span_programs")
    block_d = max(16, next_pow2(d))
    flags = dict(BLOCK_M=block_m, BLOCK_D=block_d, EVEN_D=block_d == d,
                 UPCAST=upcast(q.dtype), HAS_POS=q_positions is not None,
                 HAS_MASK=key_padding_mask is not None)
    qk_scale2 = float(scale) * LOG2E.value

    if q_positions is None:
        pos, sp_b, sp_r = q, 0, 0  # never read
    else:
        pos = q_positions
        sp_b, sp_r = pos.expand(b, nq).stride()  # [Nq] broadcasts: batch stride 0
    if key_padding_mask is None:
        mask, sm_b, sm_l = q, 0, 0  # never read
    else:  # a bool mask is read as bytes (no copy); int masks as they are
        mask = key_padding_mask
        mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        sm_b, sm_l = mask.stride()
    strides = dict(zip(("sq_b", "sq_h", "sq_r"), q.stride()[:3]),
                   **dict(zip(("sk_b", "sk_h", "sk_l"), k.stride()[:3])),
                   sp_b=sp_b, sp_r=sp_r, sm_b=sm_b, sm_l=sm_l)
    inputs = dict(q_ptr=q, k_ptr=k, pos_ptr=pos, mask_ptr=mask, D=d, NQ=nq, G=g, R=rows,
                  HQ=hq, HK=hk, qk_scale2=qk_scale2)
    m_blocks = cdiv(rows, block_m)

    if lse is None:
        # Pass 1: split the L keys into chunks so that B * Hk * m_blocks * chunks programs
        # fill the device; at most 128 chunks (pass 2 merges them in one vector load).
        if chunk is None:
            want = max(1, min(128, cdiv(programs, b * hk * m_blocks)))
            chunk = cdiv(cdiv(n_keys, want), block_n) * block_n
        n_chunks = cdiv(n_keys, chunk)
        part_m = torch.empty(b, hq, nq, n_chunks, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        with launch_device(q.device):
            _lse_partials_kernel[(n_chunks, b * hk, m_blocks)](
                m_ptr=part_m, l_ptr=part_l, L=n_keys, chunk=chunk, n_chunks=n_chunks,
                **inputs, **strides, BLOCK_N=block_n, **flags, **cfg)
        lse_arg, block_c = part_m, next_pow2(n_chunks)  # lse_arg never read
    else:
        lse_arg = lse.contiguous()
        part_m = part_l = lse_arg  # never read
        n_chunks, block_c = 1, 1

    # Pass 2: span blocks x images, and the key heads split into groups when that is
    # needed to reach `span_programs` programs; the groups' partial sums are then added.
    span_blocks = cdiv(n_span, block_ns)
    groups = max(1, min(hk, cdiv(span_programs, span_blocks * b)))
    heads_per_prog = cdiv(hk, groups)
    groups = cdiv(hk, heads_per_prog)
    shape = (groups, n_out) if per_sample else (b, groups, n_span)
    out = torch.empty(shape, dtype=torch.float32, device=q.device)
    with launch_device(q.device):
        _span_probs_kernel[(span_blocks, b, groups)](
            spans_ptr=spans, lse_ptr=lse_arg, m_ptr=part_m, l_ptr=part_l, out_ptr=out,
            span_start=start, n_span=n_span, n_out=n_out, heads_per_prog=heads_per_prog,
            n_chunks=n_chunks, scale=float(scale), inv_rows=1.0 / (hq * nq), **inputs,
            **strides, HAS_LSE=lse is not None, PER_SAMPLE=per_sample, BLOCK_C=block_c,
            BLOCK_N=block_ns, **flags, **cfg)
    if per_sample:
        return out[0] if groups == 1 else out.sum(dim=0)
    return out[:, 0] if groups == 1 else out.sum(dim=1)  # a fixed order: deterministic
