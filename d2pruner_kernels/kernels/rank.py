"""Triton kernel of step 2 (docs/spec.md) (the rank order), with the feature norms the graph of
step 4 needs in the same launch.

Rank by counting, exact and deterministic, no sort network:

    rank[i] = #{j : s_j > s_i} + #{j < i : s_j == s_i} = #{j : key_j > key_i}
    order[rank[i]] = i

with one int64 key per token: the float made monotone as int32 in the high half (-0.0
taken as +0.0, every NaN of either sign above +inf, as torch.sort orders on CPU) and N-1-i
in the low half, so ties go to the smaller index and one compare decides each pair.
`order` equals `reference.rank_order` (a stable descending torch.sort) exactly. The count
is O(N^2) compares spread over (N / BLOCK_I) x B programs: 3.3e5 at LLaVA size, one
launch, where torch's sort spends several; above MAX_N the dispatcher ranks with torch.sort.

The norms |x_n| (float32, used by the graph kernel) ride along as extra programs of the
same grid (a horizontal fusion: one launch less, no dependency between the two jobs).
A ragged batch (prune_varlen, `rank_and_norms_ragged`) is one launch too: each image
ranked among its own tokens, its sizes from the ragged table (kernels/ragged.py).
"""
from __future__ import annotations

import triton
import triton.language as tl

import torch

from . import cdiv, interpreting, launch_device, next_pow2, ragged_jit

MAX_N = 8192  # O(N^2) compares: about where they stop beating a sort (NOTES.md)
BLOCK_I = 32
BLOCK_J = 128
NORM_ROWS = 2

@triton.jit
def _sort_key(s, idx, ok, N):
    """float32 score and its index -> one int64, larger = earlier in the order: the float
    made monotone as int32 (-0.0 == +0.0, NaN above +inf) in the high half, N-1-idx in the
    low half (ties to the smaller index). Lanes not ok get the smallest int64."""
    s = s + 0.0  # -0.0 -> +0.0
    bits = s.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: reverse their magnitude order
    key = tl.where(s != s, 0x7FFFFFFF, key).to(tl.int64)
    return tl.where(ok, (key << 32) | (N - 1 - idx).to(tl.int64), -(2 ** 63))


@triton.jit
def _rank_norms_kernel(s_ptr, order_ptr, x_ptr, norm_ptr, table_ptr, N, D, rank_programs,
                       n_images, stride_sb, stride_ob, stride_xb, stride_xn, stride_nb,
                       BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                       NORM_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, RAGGED: tl.constexpr):
    # RAGGED: a packed batch (prune_varlen), grid (programs, 1). Scores, order, tokens and
    # norms are packed [total]; rank program pid ranks a block of the image image_of(pid)
    # among its own N_b tokens (local ids, written at its token offset); the norms are
    # those of the packed rows, N = total (the same code as a dense batch of one).
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if pid < rank_programs:
        if RAGGED:
            img = ragged_jit.image_of(table_ptr, ragged_jit.RANK_START, pid, n_images)
            row = ragged_jit.row_of(table_ptr, img)
            first = pid - ragged_jit.field32(row, ragged_jit.RANK_START)
            N = ragged_jit.field32(row, ragged_jit.TOKENS)
            s_row = s_ptr + tl.load(row + ragged_jit.TOKEN_OFFSET)  # int64 offsets
            o_row = order_ptr + tl.load(row + ragged_jit.TOKEN_OFFSET)
            i = first * BLOCK_I + tl.arange(0, BLOCK_I)
        else:
            i = pid * BLOCK_I + tl.arange(0, BLOCK_I)
        i_ok = i < N
        if RAGGED:
            ki = _sort_key(tl.load(s_row + i, mask=i_ok, other=0.0), i, i_ok, N)
        else:
            ki = _sort_key(tl.load(s_ptr + b * stride_sb + i, mask=i_ok, other=0.0), i, i_ok, N)
        # Keys are distinct: one compare per pair, counted in place; one reduction at the end.
        ahead = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.int32)
        for j0 in range(0, N, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            j_ok = j < N
            if RAGGED:
                sj = tl.load(s_row + j, mask=j_ok, other=0.0)
            else:
                sj = tl.load(s_ptr + b * stride_sb + j, mask=j_ok, other=0.0)
            kj = _sort_key(sj, j, j_ok, N)
            ahead += (kj[None, :] > ki[:, None]).to(tl.int32)
        count = tl.sum(ahead, axis=1)
        if RAGGED:
            tl.store(o_row + count, i.to(tl.int64), mask=i_ok)
        else:
            tl.store(order_ptr + b * stride_ob + count, i.to(tl.int64), mask=i_ok)
    else:  # norms of NORM_ROWS feature rows, float32 sum of squares in D order of chunks
        n = (pid - rank_programs) * NORM_ROWS + tl.arange(0, NORM_ROWS)
        n_ok = n < N
        offs_d = tl.arange(0, BLOCK_D)
        rows = x_ptr + b * stride_xb + n.to(tl.int64)[:, None] * stride_xn
        acc = tl.zeros([NORM_ROWS, BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d_ok = (d0 + offs_d) < D
            v = tl.load(rows + d0 + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            v = v.to(tl.float32)
            acc += v * v
        tl.store(norm_ptr + b * stride_nb + n, tl.sqrt_rn(tl.sum(acc, axis=1)), mask=n_ok)


def rank_and_norms(scores: torch.Tensor | None, tokens: torch.Tensor | None):
    """scores float32 [B, N] -> order int64 [B, N] (best first, ties to the smaller index);
    tokens [B, N, D] -> float32 norms [B, N]. Either may be None; one launch for both.
    Scores of at most MAX_N tokens: the dispatcher sorts longer rows with torch.sort
    (past MAX_N the count is still right and in bounds, only slower than a sort)."""
    # the interpreter pays per program: few, large ones there
    block_i, norm_rows = rank_block(), norm_block()
    ref = scores if scores is not None else tokens
    b, n, dev = ref.shape[0], ref.shape[1], ref.device
    if tokens is not None and tokens.stride(-1) != 1:
        tokens = tokens.contiguous()
    if scores is not None and scores.stride(-1) != 1:
        scores = scores.contiguous()
    order = None if scores is None else torch.empty(b, n, dtype=torch.int64, device=dev)
    norms = None if tokens is None else torch.empty(b, n, dtype=torch.float32, device=dev)
    rank_programs = 0 if scores is None else cdiv(n, block_i)
    norm_programs = 0 if tokens is None else cdiv(n, norm_rows)
    d = 1 if tokens is None else tokens.shape[2]

    def arg(t):  # the job not asked gets a placeholder it never touches
        return ref if t is None else t

    def stride(t, dim):
        return 0 if t is None else t.stride(dim)

    with launch_device(dev):
        _rank_norms_kernel[(rank_programs + norm_programs, b)](
            s_ptr=arg(scores), order_ptr=arg(order), x_ptr=arg(tokens), norm_ptr=arg(norms),
            table_ptr=ref, N=n, D=d, rank_programs=rank_programs, n_images=1,
            stride_sb=stride(scores, 0), stride_ob=stride(order, 0),
            stride_xb=stride(tokens, 0), stride_xn=stride(tokens, 1),
            stride_nb=stride(norms, 0), BLOCK_I=block_i, BLOCK_J=BLOCK_J,
            NORM_ROWS=norm_rows, BLOCK_D=min(2048, next_pow2(d)), RAGGED=False, num_warps=4)
    return order, norms


def rank_block() -> int:
    """Tokens a rank program ranks (the interpreter pays per program: few, large ones)."""
    return 256 if interpreting() else BLOCK_I


def norm_block() -> int:
    """Feature rows a norm program sums (the same trade-off)."""
    return 64 if interpreting() else NORM_ROWS


def rank_and_norms_ragged(scores: torch.Tensor, tokens: torch.Tensor | None,
                          table: torch.Tensor, rank_programs: int):
    """A packed batch (prune_varlen), one launch: scores float32 [total] (contiguous) ->
    order int64 [total], each image's rank order among its own tokens (local ids) at its
    token offset; tokens [total, D] (unit last stride; None: no norms) -> float32 norms
    [total]. table: the ragged table [B, FIELDS] on the device (RANK_START in programs of
    rank_block() tokens; rank_programs in all; every N_b <= MAX_N)."""
    norm_rows = norm_block()
    total = scores.shape[0]
    dev = scores.device
    order = torch.empty(total, dtype=torch.int64, device=dev)
    norms = None if tokens is None else torch.empty(total, dtype=torch.float32, device=dev)
    norm_programs = 0 if tokens is None else cdiv(total, norm_rows)
    d = 1 if tokens is None else tokens.shape[1]
    with launch_device(dev):
        _rank_norms_kernel[(rank_programs + norm_programs, 1)](
            s_ptr=scores, order_ptr=order, x_ptr=scores if tokens is None else tokens,
            norm_ptr=scores if norms is None else norms, table_ptr=table, N=total, D=d,
            rank_programs=rank_programs, n_images=table.shape[0], stride_sb=0, stride_ob=0,
            stride_xb=0, stride_xn=0 if tokens is None else tokens.stride(0), stride_nb=0,
            BLOCK_I=rank_block(), BLOCK_J=BLOCK_J, NORM_ROWS=norm_rows,
            BLOCK_D=min(2048, next_pow2(d)), RAGGED=True, num_warps=4)
    return order, norms
