"""Input validation for prune() and the public stages.

Every check reads metadata only (shapes, dtypes, devices, Python values), so it never
synchronises with the device. The only value checks are opt-in (`check_finite=True`) or
on CPU tensors, where reading a value costs no sync (`check_permutation`).
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from .layout import num_words
from .token_layout import TokenLayout

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BACKENDS = ("auto", "reference", "kernels")


def shape_str(t: torch.Tensor) -> str:
    """'[2, 576, 1024]': a tensor's shape as error messages print it."""
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_backend(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_dense(name: str, t: torch.Tensor) -> None:
    """Sparse (COO, CSR, ...) and other non-strided layouts are refused at the check, not
    deep inside a kernel."""
    if t.layout != torch.strided:
        raise ValueError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")


def check_tensor(name: str, t, ranks: tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_dense(name, t)
    if t.dim() not in ranks:
        want = " or ".join(f"{r}-D" for r in ranks)
        raise ValueError(f"{name} must be {want}, got shape {shape_str(t)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")


def check_int(name: str, v, lo: int = 0) -> int:
    if type(v) is not int and (isinstance(v, bool) or not isinstance(v, numbers.Integral)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    return int(v)


def check_bool(name: str, v) -> bool:
    """A Python bool, or a NumPy bool (np.bool_), as a Python bool."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    kind = type(v)
    if kind.__module__ == "builtins":
        what = f"{kind.__name__} {v!r}"
    else:  # e.g. numpy.int64 1 (the bare __name__ of numpy.bool_ is 'bool')
        what = f"{kind.__module__}.{kind.__qualname__} {v}"
    raise TypeError(f"{name} must be a bool, got {what}")


def check_float(name: str, v, lo: float, hi: float) -> float:
    # plain floats skip the (slow) abstract-class checks
    if type(v) is not float and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
        raise TypeError(f"{name} must be a float, got {type(v).__name__} {v!r}")
    v = float(v)
    if not (lo <= v <= hi):  # also rejects NaN
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {v}")
    return v


def grid_dims(name: str, grid) -> tuple[int, ...]:
    """(H, W) or (T, H, W) of positive ints, as given."""
    if not isinstance(grid, (tuple, list, torch.Size)) or len(grid) not in (2, 3):
        raise TypeError(f"{name} must be a tuple (H, W) or (T, H, W) or a TokenLayout, got "
                        f"{grid!r}")
    return tuple(check_int(f"{name} entries", g, lo=1) for g in grid)


def grid_or_layout(name: str, grid):
    """A grid as the stages take it: (T, H, W), or a TokenLayout of several pieces or tiles
    (one raster piece is its (T, H, W))."""
    if isinstance(grid, TokenLayout):  # valid by construction
        return grid.raster() or grid
    return as_3d(grid_dims(name, grid))


def grid_str(grid) -> str:
    """A grid or a TokenLayout as messages print it: (6, 8), TokenLayout(3x3 + 2x5: 19 tokens)."""
    return repr(grid) if isinstance(grid, TokenLayout) else str(tuple(grid))


def cells(grid) -> int:
    """N of a (T, H, W) grid or a TokenLayout."""
    return grid.cells if isinstance(grid, TokenLayout) else math.prod(grid)


def check_grid(grid_hw, n: int, name: str = "grid_hw"):
    """Returns the grid as (T, H, W) (a 2-D grid has T = 1), or a TokenLayout."""
    grid = grid_or_layout(name, grid_hw)
    if cells(grid) != n:
        raise ValueError(f"grid {grid_str(grid_hw)} has {cells(grid)} cells but tokens has "
                         f"N={n}")
    return grid


def as_3d(grid) -> tuple[int, int, int]:
    """(H, W) -> (1, H, W); (T, H, W) unchanged."""
    return tuple(grid) if len(grid) == 3 else (1, *grid)


def check_k(k, name: str = "k"):
    """k's type and range before the token count is known: an int >= 1 or a float ratio in
    (0, 1]. Returns it as an int or a float."""
    if isinstance(k, bool) or not isinstance(k, numbers.Real):
        raise TypeError(f"{name} must be an int >= 1 (tokens kept) or a float ratio in (0, 1], "
                        f"got {type(k).__name__} {k!r}")
    if isinstance(k, numbers.Integral):
        if k < 1:
            raise ValueError(f"{name} must be an int >= 1 (tokens kept) or a float ratio in "
                             f"(0, 1], got {k}")
        return int(k)
    if not 0.0 < k <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} as a ratio must be in (0, 1], got {k}")
    return float(k)


def resolve_k(k, n: int, name: str = "k", at_most: bool = False) -> int:
    """The one rule for k at every entry point: an int in [1, N], or a ratio r in (0, 1] ->
    max(1, floor(r * N + 0.5)). at_most=True (the integrations, where N depends on the
    input): an int above N keeps all N tokens instead of raising."""
    if type(k) is int and 1 <= k <= n:  # the common case, no abstract-class checks
        return k
    if isinstance(k, numbers.Integral) and not isinstance(k, bool):
        if k < 1 or (k > n and not at_most):
            raise ValueError(f"{name} must be in [1, N={n}], got {k}")
        return min(int(k), n)
    k = check_k(k, name)  # a float ratio, or raises
    return max(1, math.floor(k * n + 0.5))


def pivot_count(pivot_ratio: float, k: int) -> int:
    """n_p = floor(rho*k + 1e-6), clipped to [0, k] (docs/spec.md, step 3)."""
    return min(k, max(0, math.floor(pivot_ratio * k + 1e-6)))


def check_prune_inputs(tokens, attn, grid_hw, prior, check_finite: bool):
    """Validates the tensors of prune(); returns (batched, N, (T, H, W))."""
    check_tensor("tokens", tokens, (2, 3))
    batched = tokens.dim() == 3
    if batched:
        b, n, d = tokens.shape
        if b == 0:
            raise ValueError("tokens has an empty batch (B=0)")
        check_tensor("attn", attn, (2, 3))
        if attn.shape[0] != b:
            raise ValueError(f"attn has batch {attn.shape[0]} but tokens has B={b}")
    else:
        b, (n, d) = 1, tokens.shape
        check_tensor("attn", attn, (1, 2))
    if n == 0 or d == 0:
        raise ValueError(f"tokens must have N >= 1 tokens of D >= 1 features, got shape {shape_str(tokens)}")
    if attn.shape[-1] != n:
        raise ValueError(f"attn has N={attn.shape[-1]} but tokens has N={n}")
    if attn.dim() == (3 if batched else 2) and attn.shape[-2] == 0:
        raise ValueError(f"attn has no heads (shape {shape_str(attn)})")
    if attn.device != tokens.device:
        raise ValueError(f"attn is on {attn.device} but tokens is on {tokens.device}")
    grid = check_grid(grid_hw, n)
    if prior is not None:  # [N], [1, N] or [B, N]; unbatched: B = 1
        check_tensor("prior", prior, (1, 2))
        if prior.shape[-1] != n:
            raise ValueError(f"prior has N={prior.shape[-1]} but tokens has N={n}")
        if prior.dim() == 2 and prior.shape[0] not in (1, b):
            raise ValueError(f"prior has batch {prior.shape[0]} but tokens has B={b}")
        if prior.device != tokens.device:
            raise ValueError(f"prior is on {prior.device} but tokens is on {tokens.device}")
        # Reading values costs a sync on a GPU: done on CPU always, on a GPU on request.
        if (prior.device.type == "cpu" or check_finite) and not torch.compiler.is_compiling():
            if not bool((prior > 0).all()):
                raise ValueError("prior must be positive everywhere (it divides the attention)")
    if check_finite:  # prune() refuses check_finite under torch.compile
        for name, t in (("tokens", tokens), ("attn", attn), ("prior", prior)):
            if t is not None and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} holds NaN or Inf values (check_finite=True)")
    return batched, n, grid


# -- the public stages (stages.similarity_graph, stages.greedy_mis) --------------------------

def check_order(order, b: int, n: int, device: torch.device, beside: str = "tokens") -> None:
    """A rank order's metadata: int64 [B, N] dense tensor on `device`."""
    if not isinstance(order, torch.Tensor):
        raise TypeError(f"order must be a torch.Tensor, got {type(order).__name__}")
    check_dense("order", order)
    if order.dtype != torch.int64:
        raise TypeError(f"order must be int64 (as rank_order returns), got {order.dtype}")
    if tuple(order.shape) != (b, n):
        raise ValueError(f"order must be [B, N] = [{b}, {n}], got {shape_str(order)}")
    if order.device != device:
        raise ValueError(f"order is on {order.device} but {beside} is on {device}")


def check_permutation(order: torch.Tensor) -> None:
    """Values: each row of `order` [B, N] must be a permutation of 0..N-1. Reads values:
    the stages call it for CPU tensors only (and where the reference reads the host anyway)."""
    b, n = order.shape
    if order.numel() == 0:
        return
    bad = (order < 0) | (order >= n)
    if bool(bad.any()):
        i, j = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"order must be a permutation of 0..N-1 (N={n}) in every image; "
                         f"image {i} holds {int(order[i, j])} at position {j}")
    seen = torch.zeros(b, n, dtype=torch.bool, device=order.device)
    seen.scatter_(1, order, True)
    missing = ~seen.all(dim=1)
    if bool(missing.any()):
        i = int(missing.nonzero()[0, 0])
        s = order[i].sort().values
        dup = int(s[1:][s[1:] == s[:-1]][0])
        raise ValueError(f"order must be a permutation of 0..N-1 (N={n}) in every image; "
                         f"image {i} repeats token {dup}")


def check_graph_inputs(tokens, order, n_pivots, grid):
    """similarity_graph's tokens [B, N, D], order int64 [B, N], n_pivots in [0, N] and
    grid (N cells): metadata only. Returns the grid as (T, H, W) or a TokenLayout."""
    check_tensor("tokens", tokens, (3,))
    b, n, _ = tokens.shape
    check_order(order, b, n, tokens.device)
    n_pivots = check_int("n_pivots", n_pivots)
    if n_pivots > n:
        raise ValueError(f"n_pivots must be in [0, N={n}], got {n_pivots}")
    return check_grid(grid, n, "grid")


def check_mis_inputs(adjacency, order, n_pivots, k) -> None:
    """greedy_mis's packed adjacency int32 [B, C, words] and order int64 [B, N], with
    ints 0 <= n_pivots <= k <= N: metadata only, for every backend."""
    if not isinstance(adjacency, torch.Tensor):
        raise TypeError(f"adjacency must be a torch.Tensor, got {type(adjacency).__name__}")
    check_dense("adjacency", adjacency)
    if adjacency.dtype != torch.int32:
        raise TypeError(f"adjacency must be int32 (packed, see layout), got {adjacency.dtype}")
    if not isinstance(order, torch.Tensor) or order.dim() != 2:
        raise ValueError(f"order must be an int64 [B, N] tensor, got "
                         f"{shape_str(order) if isinstance(order, torch.Tensor) else type(order).__name__}")
    b, n = order.shape
    check_order(order, b, n, adjacency.device, "adjacency")
    n_pivots, k = check_int("n_pivots", n_pivots), check_int("k", k)
    if not n_pivots <= k <= n:
        raise ValueError(f"need 0 <= n_pivots <= k <= N, got n_pivots={n_pivots}, k={k}, N={n}")
    c = n - n_pivots
    if tuple(adjacency.shape) != (b, c, num_words(c)):
        raise ValueError(f"adjacency must be [B, C, words] = [{b}, {c}, {num_words(c)}], "
                         f"got {shape_str(adjacency)}")
