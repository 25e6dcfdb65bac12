"""The one place that decides what runs where. Everything else validates (checks.py) and
then calls a function here; the kernel modules never import the reference.

    backend      device   scores, rank     graph (step 4)            MIS (steps 5-7)
    "reference"  any      torch            dense torch               Python walk
    "kernels"    CUDA     Triton           Triton, lazy row ranges   CUDA Luby kernel
    "kernels"    CPU*     Triton*          Triton*, lazy row ranges  C++ twin of the CUDA kernel
    "auto"       CUDA     as "kernels" (a stage falls back to the reference where its
                          kernel cannot run: no Triton, no CUDA build, N > MAX_CUDA_TOKENS)
    "auto"       CPU      torch            never built: the windowed members-only walk
                                           (kernels/cpu_walk.py + C++ resolver), steps 4-7

    * under the Triton interpreter (TRITON_INTERPRET=1 set before import): how CI runs the
      GPU path without a GPU. "kernels" raises where its kernels cannot run.

Above `kernels/rank.py`'s MAX_N tokens the rank order comes from torch.sort (the same
order) on every backend. prune_varlen's ragged batches take the same path per stage, as one
ragged batch on the kernels (`kernels/varlen.py`, one launch per stage), image by image
elsewhere. Triton modules are imported on first use only.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util

import torch

from . import reference
from .checks import check_backend
from .kernels import cpu_walk, interpreting
from .kernels import mis as mis_kernel
from .options import PruneOptions
from .reference import attention as reference_attention

_HAS_TRITON = importlib.util.find_spec("triton") is not None


@functools.cache  # imported on first use (Triton only when a Triton stage runs)
def _triton(name: str):
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
    """Whether the compiled MIS runs: the CUDA kernel on a GPU (N <= MAX_CUDA_TOKENS), its
    C++ twin on CPU. 'kernels' raises where it cannot; 'auto' falls back to the reference."""
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


def use_cpu_walk(backend: str, device: torch.device) -> bool:
    """Whether steps 4-7 run as the windowed members-only walk: 'auto' on a CPU with the
    compiled extension (no candidate graph is built)."""
    return backend == "auto" and device.type == "cpu" and cpu_walk.available()


def describe(device: torch.device, n_tokens: int) -> str:
    """Which implementation each stage of prune(backend='auto') runs, in words."""
    if use_cpu_walk("auto", device):
        return ("scores and rank: torch reference, graph + MIS: the windowed members-only "
                "walk (no graph built; C++ resolver)")
    tri = use_triton("auto", device)
    mis = use_compiled_mis("auto", device, n_tokens)
    compiled = "CUDA kernel" if device.type == "cuda" else "C++ twin of the CUDA kernel"
    return (f"scores and graph: {'Triton kernels' if tri else 'torch reference'}, "
            f"MIS: {compiled if mis else 'torch reference'}")


# -- the stages (inputs already validated) --------------------------------------------------

def scores(attn, prior, eps: float, backend: str) -> torch.Tensor:
    """Step 1: float32 [B, N] from [B, N] / [B, H, N] attention (any strides)."""
    if use_triton(backend, attn.device):
        return _triton("scores").debiased_scores(attn, prior, eps)
    return reference.debiased_scores(attn, prior, eps)


def _rank_kernel(scores_: torch.Tensor):
    """The Triton rank kernel's module where it takes these scores, else None."""
    rank = _triton("rank")
    ok = scores_.dtype == torch.float32 and scores_.dim() == 2 and scores_.shape[1] <= rank.MAX_N
    return rank if ok else None


def rank(scores_: torch.Tensor, backend: str) -> torch.Tensor:
    """Step 2: int64 [B, N], best first, ties to the smaller index."""
    if use_triton(backend, scores_.device) and (kernel := _rank_kernel(scores_)) is not None:
        return kernel.rank_and_norms(scores_, None)[0]
    return reference.rank_order(scores_)


def graph(tokens, order, n_pivots: int, grid, opts: PruneOptions) -> torch.Tensor:
    """Step 4: packed int32 [B, C, words] (see `layout`)."""
    if use_triton(opts.backend, tokens.device):
        return _triton("graph").similarity_graph(tokens, order, n_pivots, grid, opts)
    return reference.similarity_graph(tokens, order, n_pivots, grid, opts)


def mis(adj, order, n_pivots: int, k: int, backend: str) -> torch.Tensor:
    """Steps 5-7: kept int64 [B, k], ascending."""
    if use_compiled_mis(backend, order.device, order.shape[1]):
        return mis_kernel.greedy_mis(adj, order, n_pivots, k)
    return reference.greedy_mis(adj, order, n_pivots, k)


def select(tokens, attn, prior, grid, k: int, n_pivots: int, opts: PruneOptions) -> torch.Tensor:
    """Steps 1-7, what prune() runs: kept int64 [B, k], ascending. `prior` is the tensor
    (opts.prior may be the PositionalPrior it came from)."""
    device, backend = tokens.device, opts.backend
    # Decide the path before any kernel runs ('kernels' raises here if it cannot run).
    kernels_usable = (use_triton(backend, device)
                      and use_compiled_mis(backend, device, tokens.shape[1]))
    s = scores(attn, prior, opts.eps, backend)
    if n_pivots == k:  # no supplements: plain top-k, no graph needed
        return torch.sort(rank(s, backend)[:, :k], dim=1).values
    if kernels_usable:  # rank + norms in one launch, then the graph in row ranges + MIS
        tokens = tokens if tokens.stride(-1) == 1 else tokens.contiguous()  # one copy at most
        kernel = _rank_kernel(s)
        if kernel is not None:
            order, norms = kernel.rank_and_norms(s, tokens)
        else:
            order, norms = reference.rank_order(s), _triton("rank").rank_and_norms(None, tokens)[1]
        return _triton("lazy_graph").kept_ids(tokens, order, norms, n_pivots, k, grid, opts)
    order = rank(s, backend)
    if use_cpu_walk(backend, device):  # steps 4-7 without the graph (any grid or layout)
        return cpu_walk.greedy_mis_without_graph(tokens, order, n_pivots, k, grid, opts)
    return mis(graph(tokens, order, n_pivots, grid, opts), order, n_pivots, k, backend)


def select_varlen(tokens, attn, images, grids, ks, n_pivots, priors, packed_prior,
                  opts: PruneOptions) -> torch.Tensor:
    """Steps 1-7 for each image of a packed batch (prune_varlen): int64 [sum k_b], positions
    into the packed tokens. images: (start, end) per image; grids (T, H, W); ks, n_pivots,
    priors ([N_b] or None) per image. Equal images run as one [B, N, D] batch (`select`);
    others, where the kernels and the compiled MIS run (as in `select`), as one ragged batch
    (`kernels/varlen.py`: one launch per stage, sizes from a device table); otherwise (the
    reference, the CPU 'auto' path, fallbacks) one image at a time. packed_prior: the
    caller's packed [total] prior tensor, or None (priors are then None or a
    PositionalPrior's tensor per grid)."""
    b = len(images)
    device, backend = tokens.device, opts.backend
    uniform = len(set(grids)) == 1 and len(set(ks)) == 1
    # Decide the path before any kernel runs ('kernels' raises here if it cannot run).
    one_ragged_batch = (not uniform and use_triton(backend, device)
                        and use_compiled_mis(backend, device, max(e - s for s, e in images)))
    if one_ragged_batch:
        prior = packed_prior
        if prior is None and priors[0] is not None:
            prior = torch.cat(priors)  # a PositionalPrior per grid, packed: one small copy
        return _triton("varlen").prune_ragged(tokens, attn, prior, images, grids, ks,
                                              n_pivots, opts)
    if uniform:
        n = images[0][1] - images[0][0]
        x = tokens.reshape(b, n, tokens.shape[-1])              # a view: segments are back to back
        a = attn.reshape(b, n) if attn.dim() == 1 else attn.reshape(-1, b, n).transpose(0, 1)
        # a packed prior as [B, N] (a view); a PositionalPrior's [N] is the same for all
        p = priors[0] if packed_prior is None else packed_prior.reshape(b, n)
        kept = select(x, a, p, grids[0], ks[0], n_pivots[0], opts)
        starts = torch.arange(0, b * n, n, device=kept.device)
        return (kept + starts[:, None]).flatten()
    out = []
    for (s, e), grid, k_b, np_b, p in zip(images, grids, ks, n_pivots, priors):
        a = attn[..., s:e].unsqueeze(0)
        out.append(select(tokens[s:e].unsqueeze(0), a, None if p is None else p.unsqueeze(0),
                          grid, k_b, np_b, opts)[0] + s)
    return torch.cat(out)


def attention(q, k, key_span, scale: float, lse, q_positions, backend: str,
              key_padding_mask=None) -> torch.Tensor:
    """attention_scores: float32 [B, end - start] for one span (start, end); float32
    [sum_b n_b], the rows back to back, for a list of B (start, end) pairs."""
    if use_triton(backend, q.device):
        return _triton("attention").attention_scores(q, k, key_span, scale, lse=lse,
                                                      q_positions=q_positions,
                                                      key_padding_mask=key_padding_mask)
    return reference_attention.attention_scores(q, k, key_span, scale, lse, q_positions,
                                                key_padding_mask)
