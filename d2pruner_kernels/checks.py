"""Input validation for prune() and the public stages.

Every check reads metadata only (shapes, dtypes, devices, Python values), so it never
synchronises with the device. The only value checks are opt-in (`check_finite=True`) or
on CPU tensors, where reading a value costs no sync.
"""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BACKENDS = ("auto", "reference", "kernels")


def shape_str(t: torch.Tensor) -> str:
    """'[2, 576, 1024]': a tensor's shape as error messages print it."""
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_backend(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_tensor(name: str, t, ranks: tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
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
        raise TypeError(f"{name} must be a tuple (H, W) or (T, H, W), got {grid!r}")
    return tuple(check_int(f"{name} entries", g, lo=1) for g in grid)


def check_grid(grid_hw, n: int) -> tuple[int, int, int]:
    """Returns the grid as (T, H, W); a 2-D grid has T = 1."""
    dims = grid_dims("grid_hw", grid_hw)
    cells = math.prod(dims)
    if cells != n:
        raise ValueError(f"grid {dims} has {cells} cells but tokens has N={n}")
    return as_3d(dims)


def as_3d(grid) -> tuple[int, int, int]:
    """(H, W) -> (1, H, W); (T, H, W) unchanged."""
    return tuple(grid) if len(grid) == 3 else (1, *grid)


def resolve_k(k, n: int) -> int:
    """k as an int in [1, N], or a float ratio in (0, 1]: k = max(1, floor(ratio*N + 0.5))."""
    if isinstance(k, bool):
        raise TypeError(f"k must be an int in [1, {n}] or a float in (0, 1], got bool {k!r}")
    if isinstance(k, numbers.Integral):
        if not 1 <= k <= n:
            raise ValueError(f"k must be in [1, N={n}], got {k}")
        return int(k)
    if isinstance(k, numbers.Real):
        if not 0.0 < k <= 1.0:  # also rejects NaN
            raise ValueError(f"k as a ratio must be in (0, 1], got {k}")
        return max(1, math.floor(k * n + 0.5))
    raise TypeError(f"k must be an int in [1, {n}] or a float in (0, 1], got {type(k).__name__}")


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
    if prior is not None:
        check_tensor("prior", prior, (1, 2) if batched else (1,))
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
