"""The MIS stage (docs/spec.md, steps 5-7) on the compiled extension: the Python side of
csrc/ (the CUDA kernel on CUDA tensors, its CPU twin `mis_rounds_cpu` on CPU tensors).

Python checks device, dtype, contiguity and shapes here, before the raw pointers cross into
C++ by keyword as one `_C.MisArgs` (which checks the sizes when it is made; the CPU twin checks
the values of `order` and of a ragged table before any work).
"""
from __future__ import annotations

import functools

import torch

try:
    from .. import _C
except ImportError:  # extension not built: the reference is used instead
    _C = None

# The CUDA kernel's shared-memory limit on N, as the C++ side computes it (0: no CUDA build).
MAX_CUDA_TOKENS = getattr(_C, "max_cuda_tokens", 0)


def extension_available() -> bool:
    return _C is not None


@functools.cache  # asked on every prune() call: one driver query per process
def cuda_available() -> bool:
    return _C is not None and _C.with_cuda and _C.cuda_device_count() > 0


def greedy_mis(adj: torch.Tensor, order: torch.Tensor, n_pivots: int, k: int, *,
               return_rounds: bool = False, rows_ready: int | None = None,
               skip: torch.Tensor | None = None, done: torch.Tensor | None = None,
               kept: torch.Tensor | None = None):
    """Kept token indices int64 [B, k], ascending, from the packed graph and the rank order.

    adj: int32 [B, C, words(C)], order: int64 [B, N], 0 <= n_pivots <= k <= N, one device:
    what checks.check_mis_inputs holds the public stage to (not checked again here; the
    sizes are checked by _C.MisArgs). The CUDA kernel for CUDA tensors, its CPU twin (the
    same windows, rounds and rules) for CPU tensors. With return_rounds, also returns int32
    [B] Luby rounds.

    Lazy graphs: only rows [0, rows_ready) of adj exist yet. An
    image whose m members settle within them is written to `kept` and marked done[b] = 1,
    else done[b] = 0 and its row of `kept` is left alone; images with skip[b] != 0 are not
    touched at all. skip / done: int32 [B] on the same device, possibly one tensor (an
    image's skip is read before its done is written).

    `order` must be a permutation of 0..N-1 per image. CPU tensors: the C++ side checks
    every image not skipped before any work (O(B N), small next to the rounds) and raises
    ValueError naming `order`. CUDA tensors are not read on the host (no sync): the kernel
    skips token ids outside [0, N) (duplicates collapse) and writes -1 in the entries of
    kept[b] it cannot fill, so no access leaves a buffer and the output is defined.
    """
    if _C is None:
        raise RuntimeError("d2pruner_kernels._C is not built; use backend='reference'")
    adj, order = adj.contiguous(), order.contiguous()  # the C++ side reads them densely
    b, n = order.shape
    rows_ready = n - n_pivots if rows_ready is None else rows_ready
    # The lazy protocol's buffers (no public stage takes them): written or read per image.
    for name, t in (("skip", skip), ("done", done)):
        if t is not None and (t.dtype != torch.int32 or t.shape != (b,) or t.device != order.device):
            raise ValueError(f"{name} must be int32 [{b}] on {order.device}")
    if kept is None:
        kept = torch.empty(b, k, dtype=torch.int64, device=order.device)
    elif (kept.shape != (b, k) or kept.dtype != torch.int64 or not kept.is_contiguous()
          or kept.device != order.device):
        raise ValueError(f"kept must be a contiguous int64 [{b}, {k}] tensor on {order.device}")
    rounds = torch.empty(b, dtype=torch.int32, device=order.device) if return_rounds else None
    args = _C.MisArgs.dense(adj=adj.data_ptr(), order=order.data_ptr(), kept=kept.data_ptr(),
                            batch=b, n_tokens=n, n_pivots=n_pivots, k=k, rows_ready=rows_ready,
                            rounds=_address(rounds), skip=_address(skip), done=_address(done))
    _launch(args, order.device)
    return (kept, rounds) if return_rounds else kept


def _address(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _launch(args, device: torch.device) -> None:
    """One call of the extension (args: a checked _C.MisArgs): the CUDA kernel on the
    current stream of `device`, or its CPU twin."""
    if device.type == "cuda":
        if not _C.with_cuda:
            raise RuntimeError("d2pruner_kernels._C was built without CUDA (no nvcc at build time)")
        if args.n_tokens > MAX_CUDA_TOKENS:
            raise ValueError(f"the CUDA MIS kernel supports N <= {MAX_CUDA_TOKENS}, "
                             f"got N={args.n_tokens}")
        _C.mis_rounds_cuda(args, device.index, torch.cuda.current_stream(device).cuda_stream)
    elif device.type == "cpu":
        _C.mis_rounds_cpu(args)
    else:  # the C++ twin reads host memory only
        raise ValueError(f"the compiled MIS takes CPU or CUDA tensors, got {device}")


def greedy_mis_ragged(adj: torch.Tensor, order: torch.Tensor, table: torch.Tensor,
                      kept: torch.Tensor, max_tokens: int, *,
                      skip: torch.Tensor | None = None, done: torch.Tensor | None = None,
                      rounds: torch.Tensor | None = None) -> torch.Tensor:
    """The MIS of a ragged batch (prune_varlen) in one call: image b's kept ids, ascending,
    plus its token offset, into kept[keep_offset_b : keep_offset_b + k_b].

    adj: int32 [words], each image's [C_b, words(C_b)] graph at its adj_offset; order:
    int64 [total], each image's rank order (local ids 0..N_b-1) at its token_offset;
    table: int64 [B, ragged.FIELDS] (kernels/ragged.py), max_tokens >= every N_b; kept:
    int64 [sum k_b]. Rows [0, min(row_end_b, C_b)) of each graph are ready (lazy graphs:
    done / skip as in greedy_mis). The C++ side
    checks every row of a CPU table against the buffers' lengths, and every order, before
    any work (ValueError); the CUDA kernel skips an image whose row does not fit."""
    from .ragged import FIELDS  # no Triton needed: plain ints
    if _C is None:
        raise RuntimeError("d2pruner_kernels._C is not built; use backend='reference'")
    dev = order.device
    b = table.shape[0] if table.dim() == 2 else -1
    for name, t, dtype in (("adj", adj, torch.int32), ("order", order, torch.int64),
                           ("table", table, torch.int64), ("kept", kept, torch.int64)):
        if t.dtype != dtype or t.device != dev or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {dtype} tensor on {dev}, got "
                             f"{t.dtype} on {t.device}")
    if b < 0 or table.shape[1] != FIELDS or adj.dim() != 1 or order.dim() != 1 or kept.dim() != 1:
        raise ValueError(f"table must be [B, {FIELDS}] and adj, order, kept 1-D, got "
                         f"{list(table.shape)}, {list(adj.shape)}, {list(order.shape)}, "
                         f"{list(kept.shape)}")
    if not 1 <= max_tokens < 2 ** 31:
        raise ValueError(f"max_tokens must be in [1, 2**31), got {max_tokens}")
    for name, t in (("skip", skip), ("done", done), ("rounds", rounds)):
        if t is not None and (t.dtype != torch.int32 or t.shape != (b,) or t.device != dev):
            raise ValueError(f"{name} must be int32 [{b}] on {dev}")
    args = _C.MisArgs.ragged(adj=adj.data_ptr(), order=order.data_ptr(), kept=kept.data_ptr(),
                             table=table.data_ptr(), batch=b, max_tokens=max_tokens,
                             order_len=order.numel(), kept_len=kept.numel(),
                             adj_words=adj.numel(), rounds=_address(rounds),
                             skip=_address(skip), done=_address(done))
    _launch(args, dev)
    return kept
