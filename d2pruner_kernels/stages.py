"""The public stages of the selection (docs/spec.md), each with a `backend` switch, so
users can compose them (and the tests can hold each kernel against its reference twin).
Each validates, then calls `dispatch`, which decides what runs.

All stages take batched tensors; `prune()` also accepts unbatched ones.

    debiased_scores  attn -> float32 [B, N]                      (step 1)
    rank_order       scores -> int64 [B, N], best first           (step 2)
    similarity_graph tokens, order -> packed int32 [B, C, words]  (step 4, see `layout`)
    greedy_mis       adjacency, order -> kept int64 [B, k]        (steps 5-7)
"""
from __future__ import annotations

import torch

from . import dispatch
from .checks import (check_backend, check_graph_inputs, check_mis_inputs, check_permutation)
from .options import DEFAULTS, PruneOptions, of, takes_options

GRAPH_OPTIONS = ("sim_threshold", "spatial_weight", "radius", "temporal_radius", "backend",
                 "fusion")


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


def debiased_scores(attn: torch.Tensor, prior: torch.Tensor | None = None,
                    eps: float = DEFAULTS.eps, *, query_row: int | None = None,
                    key_span: tuple[int, int] | None = None,
                    backend: str = DEFAULTS.backend) -> torch.Tensor:
    """Step 1: mean over heads / (prior + eps) in float32, NaN -> -inf. [B, N].
    prior: [N], [1, N] or [B, N]."""
    check_backend(backend)
    a = _attn_view(attn, query_row, key_span)
    if prior is not None:
        b, n = a.shape[0], a.shape[-1]
        if prior.shape not in ((n,), (1, n), (b, n)):
            raise ValueError(f"prior must be [N], [1, N] or [B, N] with B={b}, N={n}, "
                             f"got {list(prior.shape)}")
    return dispatch.scores(a, prior, eps, backend)


def rank_order(scores: torch.Tensor, *, backend: str = DEFAULTS.backend) -> torch.Tensor:
    """Step 2: token ids by descending score, ties to the smaller index (NaN first, as
    torch.sort). int64 [B, N]. The Triton rank kernel takes float32 [B, N] with N <= 8192;
    other dtypes, shapes and sizes go to torch.sort (same order)."""
    check_backend(backend)
    return dispatch.rank(scores, backend)


@takes_options(*GRAPH_OPTIONS)
def similarity_graph(tokens: torch.Tensor, order: torch.Tensor, n_pivots: int,
                     grid: tuple[int, ...], *, options: PruneOptions | None = None,
                     **kwargs) -> torch.Tensor:
    """Step 4: packed int32 [B, C, words] adjacency of the candidates (see `layout`).

    tokens [B, N, D] float16/bfloat16/float32; order int64 [B, N], a permutation of the
    tokens per image (as rank_order returns); 0 <= n_pivots <= N; grid of N cells.
    A CPU order that is not a permutation raises ValueError (naming `order`) before any
    work. A CUDA order is not read on the host (that would sync): the Triton kernel clamps
    each token id into [0, N) (no access outside the buffers; the edges are then those of
    the clamped ids), the reference's gather raises a device-side error.
    Options: the graph's fields of PruneOptions (GRAPH_OPTIONS), as keywords or `options`."""
    opts = of(options, kwargs, GRAPH_OPTIONS, "similarity_graph()")
    grid3 = check_graph_inputs(tokens, order, n_pivots, grid)
    if order.device.type == "cpu":
        check_permutation(order)
    return dispatch.graph(tokens, order, n_pivots, grid3, opts)


def greedy_mis(adjacency: torch.Tensor, order: torch.Tensor, n_pivots: int, k: int, *,
               backend: str = DEFAULTS.backend) -> torch.Tensor:
    """Steps 5-7: pivots + greedy MIS picks + fill, ascending int64 [B, k].

    adjacency: packed int32 [B, C, words], C = N - n_pivots; order int64 [B, N], a
    permutation of the tokens per image (as rank_order returns); ints 0 <= n_pivots <= k
    <= N (every backend raises ValueError otherwise). An order that is not a permutation
    raises ValueError (naming `order`) before any work wherever its values can be read
    without a device sync: CPU tensors, and the reference backend (which reads the graph on
    the host anyway). On a GPU the CUDA kernel does not read it on the host: a token id
    outside [0, N) is skipped, duplicates collapse, and the entries of kept[b] left over are
    -1 (no access outside the buffers)."""
    check_backend(backend)
    check_mis_inputs(adjacency, order, n_pivots, k)
    if not dispatch.use_compiled_mis(backend, order.device, order.shape[1]):
        check_permutation(order)  # (the compiled MIS checks a CPU order itself, in C++)
    return dispatch.mis(adjacency, order, n_pivots, k, backend)
