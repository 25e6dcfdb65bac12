"""The public stages of the selection, each with a `backend` switch, so users can compose
them (and the tests can hold each kernel against its reference twin).

All stages take batched tensors; `prune()` also accepts unbatched ones.

    debiased_scores  attn -> float32 [B, N]                      (SPEC step 1)
    rank_order       scores -> int64 [B, N], best first           (step 2)
    similarity_graph tokens, order -> packed int32 [B, C, words]  (step 4, see `layout`)
    greedy_mis       adjacency, order -> kept int64 [B, k]        (steps 5-7)
"""
from __future__ import annotations

import functools
import importlib.util

import torch

from . import reference
from .checks import as_3d, check_backend
from .kernels import interpreting
from .kernels import mis as mis_kernel

_HAS_TRITON = importlib.util.find_spec("triton") is not None


@functools.cache  # imported on first use (Triton only when a Triton stage runs)
def _triton_module(name: str):
    return importlib.import_module(f"d2pruner_kernels.kernels.{name}")


def _triton_usable(device: torch.device) -> bool:
    return _HAS_TRITON and (device.type == "cuda" or (device.type == "cpu" and interpreting()))


def use_triton(backend: str, device: torch.device) -> bool:
    """Whether a Triton stage runs: 'kernels' demands it, 'auto' takes it on CUDA."""
    check_backend(backend)
    if backend == "reference":
        return False
    if backend == "kernels":
        if not _triton_usable(device):
            raise RuntimeError(
                f"backend='kernels' needs Triton and a CUDA device (or TRITON_INTERPRET=1 set "
                f"before import for CPU tensors); tensors are on {device}")
        return True
    return device.type == "cuda" and _triton_usable(device)


def use_compiled_mis(backend: str, device: torch.device, n_tokens: int) -> bool:
    """Whether the compiled MIS runs: the CUDA kernel on a GPU (N <= MAX_CUDA_TOKENS), the
    C++ walk on CPU. 'kernels' raises where it cannot; 'auto' falls back to the reference."""
    check_backend(backend)
    if backend == "reference":
        return False
    ext, limit = mis_kernel.extension_available(), mis_kernel.MAX_CUDA_TOKENS
    if device.type == "cuda":
        ok = ext and mis_kernel.cuda_available() and n_tokens <= limit
    else:
        ok = ext and device.type == "cpu"
    if backend == "kernels" and not ok:
        why = (f"d2pruner_kernels._C and CPU tensors, got {device}" if device.type != "cuda"
               else f"N={n_tokens} tokens: the CUDA MIS kernel supports N <= {limit}"
               if n_tokens > limit else "d2pruner_kernels._C built with CUDA (nvcc at install time)")
        raise RuntimeError(f"backend='kernels' needs {why}")
    return ok


def describe(device: torch.device, n_tokens: int) -> str:
    """Which implementation each stage of prune(backend='auto') runs, in words."""
    tri = use_triton("auto", device)
    mis = use_compiled_mis("auto", device, n_tokens)
    compiled = "CUDA kernel" if device.type == "cuda" else "compiled C++ walk"
    return (f"scores and graph: {'Triton kernels' if tri else 'torch reference'}, "
            f"MIS: {compiled if mis else 'torch reference'}")


def _attn_view(attn: torch.Tensor, query_row: int | None, key_span) -> torch.Tensor:
    """[B, N] / [B, H, N], or the row `query_row` over keys `key_span` of [B, H, L, L]."""
    if attn.dim() == 4:
        if query_row is None or key_span is None:
            raise ValueError("attn [B, H, L, L] needs query_row and key_span=(start, end)")
        start, end = key_span
        if not (0 <= start < end <= attn.shape[-1]) or not -attn.shape[-2] <= query_row < attn.shape[-2]:
            raise ValueError(f"query_row={query_row} / key_span={key_span} outside attn of "
                             f"shape {list(attn.shape)}")
        return attn[:, :, query_row, start:end]  # a strided view, no copy
    if attn.dim() not in (2, 3):
        raise ValueError(f"attn must be [B, N], [B, H, N] or [B, H, L, L], got {list(attn.shape)}")
    return attn


def debiased_scores(attn: torch.Tensor, prior: torch.Tensor | None = None, eps: float = 1e-7,
                    *, query_row: int | None = None, key_span: tuple[int, int] | None = None,
                    backend: str = "auto") -> torch.Tensor:
    """SPEC step 1: mean over heads / (prior + eps) in float32, NaN -> -inf. [B, N].
    prior: [N], [1, N] or [B, N]."""
    a = _attn_view(attn, query_row, key_span)
    if prior is not None:
        b, n = a.shape[0], a.shape[-1]
        if prior.shape not in ((n,), (1, n), (b, n)):
            raise ValueError(f"prior must be [N], [1, N] or [B, N] with B={b}, N={n}, "
                             f"got {list(prior.shape)}")
    if use_triton(backend, a.device):
        return _triton_module("scores").debiased_scores(a, prior, eps)
    return reference.debiased_scores(a, prior, eps)


def rank_order(scores: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """SPEC step 2: token ids by descending score, ties to the smaller index (NaN first, as
    torch.sort). int64 [B, N]. The Triton rank kernel takes float32 [B, N] with N <= 8192;
    other dtypes, shapes and sizes go to torch.sort (same order)."""
    if use_triton(backend, scores.device) and scores.dtype == torch.float32 and scores.dim() == 2:
        return _triton_module("rank").rank_and_norms(scores, None)[0]
    return reference.rank_order(scores)


def similarity_graph(tokens: torch.Tensor, order: torch.Tensor, n_pivots: int,
                     grid: tuple[int, ...], *, sim_threshold: float = 0.8,
                     spatial_weight: float = 0.0, radius: int = 2, temporal_radius: int = 1,
                     backend: str = "auto") -> torch.Tensor:
    """SPEC step 4: packed int32 [B, C, words] adjacency of the candidates (see `layout`)."""
    args = (tokens, order, n_pivots, as_3d(grid), sim_threshold, spatial_weight, radius,
            temporal_radius)
    if use_triton(backend, tokens.device):
        return _triton_module("graph").similarity_graph(*args)
    return reference.similarity_graph(*args)


def greedy_mis(adjacency: torch.Tensor, order: torch.Tensor, n_pivots: int, k: int, *,
               backend: str = "auto") -> torch.Tensor:
    """SPEC steps 5-7: pivots + greedy MIS picks + fill, ascending int64 [B, k].
    `order` must be a permutation of the tokens per image (as rank_order returns)."""
    if use_compiled_mis(backend, order.device, order.shape[1]):
        return mis_kernel.greedy_mis(adjacency, order, n_pivots, k)
    return reference.greedy_mis(adjacency, order, n_pivots, k)
