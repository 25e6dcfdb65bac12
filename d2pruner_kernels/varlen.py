"""prune_varlen(): images of different sizes and budgets in one call, packed the way
serving engines and Qwen-VL's vision tower hold them (flash-attention's `cu_seqlens`).

    keep, cu_keep = prune_varlen(tokens, attn, cu_seqlens, grids, k, prior=None, **options)
    tokens[keep]          the pruned packed batch
    cu_keep               its cu_seqlens

Contract (docs/spec.md, section "Ragged batches"): for every image b, with
s, e = cu_seqlens[b], cu_seqlens[b + 1],

    keep[cu_keep[b]:cu_keep[b + 1]] == prune(tokens[s:e], attn[..., s:e], grids[b], k_b,
                                             prior=prior_b, **options) + s

exactly, on every backend. Every misuse raises before any work, naming the image.
"""
from __future__ import annotations


import torch

from . import dispatch
from .checks import (cells, check_tensor, grid_dims, grid_or_layout, pivot_count, resolve_k,
                     shape_str)
from .options import PruneOptions, of, takes_options
from .prior import PositionalPrior
from .token_layout import TokenLayout, layout_prior

INT_DTYPES = (torch.int32, torch.int64)


def _grid_list(grids) -> list[tuple[int, ...]]:
    """A list of B grids (H, W) / (T, H, W), or an int tensor [B, 2] / [B, 3]."""
    if isinstance(grids, torch.Tensor):
        if grids.dtype not in INT_DTYPES or grids.dim() != 2 or grids.shape[1] not in (2, 3):
            raise ValueError(f"grids as a tensor must be int32/int64 [B, 2] or [B, 3], got "
                             f"{grids.dtype} {shape_str(grids)}")
        grids = grids.tolist()  # a small host copy (a sync if it lives on a GPU)
    if not isinstance(grids, (list, tuple)):
        raise TypeError(f"grids must be a list of (H, W) / (T, H, W) grids or an int tensor "
                        f"[B, 2] / [B, 3], got {type(grids).__name__}")
    if len(grids) == 0:  # docs/spec.md §9: an empty batch is a ValueError, as in prune()
        raise ValueError("grids is empty: an empty batch (B=0)")
    return [g if isinstance(g, TokenLayout) else grid_dims(f"grids[{i}]", g)
            for i, g in enumerate(grids)]


def _budgets(k, lengths: list[int]) -> list[int]:
    """k: one int / ratio for every image, or a list / int tensor of B budgets."""
    b = len(lengths)
    if isinstance(k, torch.Tensor):
        if k.dtype not in INT_DTYPES or tuple(k.shape) != (b,):
            raise ValueError(f"k as a tensor must be int32/int64 [B] = [{b}], got "
                             f"{k.dtype} {shape_str(k)}")
        k = k.tolist()
    if isinstance(k, (list, tuple)):
        if len(k) != b:
            raise ValueError(f"k must have one budget per image ({b}), got {len(k)}")
        return [_one_budget(f"k[{i}]", kb, n, i) for i, (kb, n) in enumerate(zip(k, lengths))]
    return [_one_budget("k", k, n, i) for i, n in enumerate(lengths)]


def _one_budget(name: str, k, n: int, image: int) -> int:
    try:
        return resolve_k(k, n)
    except (TypeError, ValueError) as e:
        raise type(e)(f"image {image}: {name}: {e}") from None


def _check_offsets(cu_seqlens, total: int, grids, lengths: list[int],
                   check_values: bool) -> list[int]:
    """cu_seqlens int32/int64 [B + 1] against the grids. Returns the offsets (host ints).
    A CUDA tensor is not read (that would sync): the grids define the segments, and
    cu_seqlens must agree with them (checked with check_finite=True)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be an int32 or int64 tensor, got "
                        f"{type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in INT_DTYPES:
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    b = len(lengths)
    if tuple(cu_seqlens.shape) != (b + 1,):
        raise ValueError(f"cu_seqlens must be [B + 1] = [{b + 1}] for {b} grids, got shape "
                         f"{shape_str(cu_seqlens)}")
    want = [0]
    for n in lengths:
        want.append(want[-1] + n)
    if cu_seqlens.device.type == "cpu" or check_values:
        _compare_offsets(cu_seqlens.tolist(), want, grids)
    if want[-1] != total:
        raise ValueError(f"the grids hold {want[-1]} tokens in all but tokens has {total}")
    return want


def _compare_offsets(cu: list[int], want: list[int], grids) -> None:
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens[0] must be 0, got {cu[0]}")
    for i in range(len(grids)):
        seg = cu[i + 1] - cu[i]
        if seg < 0:
            raise ValueError(f"cu_seqlens must be non-decreasing: cu_seqlens[{i + 1}]="
                             f"{cu[i + 1]} < cu_seqlens[{i}]={cu[i]}")
        if seg == 0:
            raise ValueError(f"image {i} is empty: cu_seqlens[{i}] = cu_seqlens[{i + 1}] = {cu[i]}")
        if seg != want[i + 1] - want[i]:
            raise ValueError(f"image {i}: grid {grids[i]} has {want[i + 1] - want[i]} cells but "
                             f"its segment cu_seqlens[{i}:{i + 2}] = ({cu[i]}, {cu[i + 1]}) "
                             f"holds {seg} tokens")


def _priors(prior, grids, offsets, total: int, device) -> list:
    """The prior of each image: None, a slice of a packed [total] tensor, or a
    PositionalPrior resized to the image's grid (PositionalPrior.for_grid caches it)."""
    if prior is None:
        return [None] * len(grids)
    if isinstance(prior, PositionalPrior):
        return [layout_prior(prior, g, device) if isinstance(g, TokenLayout)  # cached
                else prior.for_grid(g)._device_tensor(device=device) for g in grids]
    check_tensor("prior", prior, (1,))
    if prior.shape[0] != total:
        raise ValueError(f"prior must be packed like tokens: [total] = [{total}], got "
                         f"{shape_str(prior)}")
    return [prior[s:e] for s, e in zip(offsets, offsets[1:])]


def _check_packed(tokens, attn, prior, offsets, check_finite: bool) -> None:
    """What prune() checks of each image, once for the packed batch: sizes and devices
    (metadata), a packed prior's positivity (CPU, or check_finite) and, with check_finite,
    finite values; a bad value is reported with the image that holds it."""
    if tokens.shape[1] == 0:
        raise ValueError(f"tokens must have D >= 1 features, got shape {shape_str(tokens)}")
    if attn.dim() == 2 and attn.shape[0] == 0:
        raise ValueError(f"attn has no heads (shape {shape_str(attn)})")
    if attn.device != tokens.device:
        raise ValueError(f"attn is on {attn.device} but tokens is on {tokens.device}")
    packed_prior = prior if isinstance(prior, torch.Tensor) else None
    if packed_prior is not None and packed_prior.device != tokens.device:
        raise ValueError(f"prior is on {packed_prior.device} but tokens is on {tokens.device}")

    def first_bad(bad: torch.Tensor) -> int | None:  # bad: bool [total] (or [H, total])
        if not bool(bad.any()):
            return None
        token = int(bad.reshape(-1, bad.shape[-1]).any(0).nonzero()[0])
        return next(i for i, e in enumerate(offsets[1:]) if token < e)

    if packed_prior is not None and (packed_prior.device.type == "cpu" or check_finite):
        if (i := first_bad(~(packed_prior > 0))) is not None:
            raise ValueError(f"image {i}: prior must be positive everywhere (it divides the "
                             f"attention)")
    if check_finite:
        for name, t in (("tokens", tokens.T), ("attn", attn), ("prior", packed_prior)):
            if t is not None and (i := first_bad(~torch.isfinite(t))) is not None:
                raise ValueError(f"image {i}: {name} holds NaN or Inf values (check_finite=True)")


@takes_options()
def prune_varlen(tokens: torch.Tensor, attn: torch.Tensor, cu_seqlens: torch.Tensor, grids, k,
                 *, options: PruneOptions | None = None, **kwargs):
    """D2Pruner on a packed ragged batch. Returns (keep, cu_keep).

    tokens: [total, D] packed features (fp16 / bf16 / fp32).
    attn:   [total] or [H, total], packed the same way.
    cu_seqlens: int32 / int64 [B + 1], 0, non-decreasing, last = total (host or device).
    grids:  a list of B grids (H, W) / (T, H, W) or TokenLayouts, each with its segment's
            length of cells, or an int tensor [B, 2] / [B, 3].
    k:      an int or a ratio for every image, or a list / int tensor of B budgets.
            (grids and k are host values: a CUDA tensor of either is read, which syncs.)
    options: a PruneOptions and/or its fields as keywords, as for prune(); here prior is
            None, a packed [total] tensor, or a PositionalPrior (resized to each grid).
    Returns keep int64 [sum k_b], positions into the packed tokens, ascending within each
    image, images in order; cu_keep [B + 1], the dtype and device of cu_seqlens.
    """
    opts = of(options, kwargs, where="prune_varlen()")
    check_tensor("tokens", tokens, (2,))
    check_tensor("attn", attn, (1, 2))
    total = tokens.shape[0]
    if attn.shape[-1] != total:
        raise ValueError(f"attn has {attn.shape[-1]} packed tokens but tokens has {total}")
    grids = _grid_list(grids)
    lengths = [cells(g) for g in grids]
    offsets = _check_offsets(cu_seqlens, total, grids, lengths, opts.check_finite)
    ks = _budgets(k, lengths)
    prior = opts.prior
    priors = _priors(prior, grids, offsets, total, tokens.device)
    _check_packed(tokens, attn, prior, offsets, opts.check_finite)
    images = list(zip(offsets, offsets[1:]))

    # all checks done: the work (dispatch.select_varlen decides how it runs)
    n_pivots = [pivot_count(opts.pivot_ratio, kb) for kb in ks]
    keep = dispatch.select_varlen(tokens, attn, images,
                                  [grid_or_layout("grids", g) for g in grids], ks, n_pivots,
                                  priors, prior if isinstance(prior, torch.Tensor) else None,
                                  opts)
    cu_keep = [0]
    for kb in ks:
        cu_keep.append(cu_keep[-1] + kb)
    return keep, _offsets_tensor(cu_keep, cu_seqlens.dtype, cu_seqlens.device)


_PINNED: dict = {}  # host copies of offsets sent to a GPU, kept (a captured copy rereads them)
_PINNED_MAX = 256


def _offsets_tensor(values: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """cu_keep on `device` without a host sync: on a GPU, an asynchronous copy from pinned
    memory (torch.tensor(..., device='cuda') copies from pageable memory, which waits for the
    stream). The pinned rows of a layout are kept, so a CUDA graph that captured the copy
    reads the same values at every replay."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    key = (tuple(values), dtype)
    host = _PINNED.get(key)
    if host is None:
        host = torch.tensor(values, dtype=dtype).pin_memory()
        if len(_PINNED) < _PINNED_MAX:
            _PINNED[key] = host
    return host.to(device, non_blocking=True)
