"""prune()'s options, written once (docs/spec.md): every keyword option of `prune()`,
`prune_varlen()`, the stages, `hf.apply()` and the vLLM plugin, its default and its check.

    opts = PruneOptions(sim_threshold=0.7, spatial_weight=0.5)   # validated here, once
    prune(tokens, attn, grid, k, options=opts)                   # or the same as keywords
    prune(tokens, attn, grid, k, sim_threshold=0.7, spatial_weight=0.5)

The keyword signatures of the entry points are made from this class (`takes_options`), so
there is no second list to keep in step. The object is frozen and travels unchanged from the
entry point to the kernels, which read the graph fields under the same names:

    edge(i, j)  iff  (1 - spatial_weight) * cos_ij + spatial_weight * near_ij >= sim_threshold
    near_ij     iff  max(|dy|, |dx|) <= radius  and  |dt| <= temporal_radius

(fusion="weighted", the default; fusion="binarized" is the other reading of the paper's
rule, docs/spec.md §12.)

Validation here needs no device. What depends on the device (backend="kernels" needs Triton
and a CUDA device) is checked where the tensors are known, at the call.

Any radius >= 0 is legal. One at least as wide as the grid makes every pair near along its
axes, so radii are clamped to RADIUS_MAX = 2**31 - 1 (wider than any grid the kernels take:
their token ids are 32-bit in the grid arithmetic): the edges are the same, and every backend
gets an int that fits its 32-bit arguments.
"""
from __future__ import annotations

import dataclasses
import inspect

import torch

from .checks import check_backend, check_bool, check_float, check_int
from .prior import PositionalPrior

RADIUS_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class PruneOptions:
    prior: object = dataclasses.field(default=None, compare=False)
    """None, a positive [N] / [B, N] tensor (packed [total] for prune_varlen) or a
    PositionalPrior: attention is divided by it (docs/spec.md, step 1)."""
    pivot_ratio: float = 0.7      # rho: share of k taken as pivots (step 3)
    sim_threshold: float = 0.8    # theta, in [-1, 1] (step 4)
    spatial_weight: float = 0.0   # beta, in [0, 1] (0.5: the paper's localization preset)
    radius: int = 2               # Chebyshev radius on the grid, in tokens
    temporal_radius: int = 1      # (T, H, W) grids: frames this close are neighbours
    eps: float = 1e-7             # added to the prior before dividing
    check_finite: bool = False    # read the values for NaN / Inf (a sync on a GPU)
    backend: str = "auto"         # "auto", "reference" or "kernels" (dispatch.py)
    fusion: str = "weighted"      # how the two terms make an edge (docs/spec.md §12):
    #   "weighted"   (1 - spatial_weight) * cos + spatial_weight * near >= sim_threshold
    #   "binarized"  (1 - spatial_weight) * [cos > sim_threshold] + spatial_weight * [near] > 0.5

    def __post_init__(self):  # validated once, where the object is made
        for name, check in _CHECKS.items():
            object.__setattr__(self, name, check(getattr(self, name)))

    @property
    def cos_weight(self) -> float:
        return 1.0 - self.spatial_weight

    def replace(self, **changes) -> "PruneOptions":
        """A copy with `changes` (validated); unknown names raise TypeError."""
        return self if not changes else of(self, changes)


def _check_prior(prior):
    if prior is not None and not isinstance(prior, (torch.Tensor, PositionalPrior)):
        raise TypeError(f"prior must be None, a tensor or a PositionalPrior, got "
                        f"{type(prior).__name__}")
    return prior


def _check_backend(backend):
    check_backend(backend)
    return backend


FUSIONS = ("weighted", "binarized")


def _check_fusion(fusion):
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    return fusion


# Each field's check (and normalisation: ints to floats, radii clamped), applied when an
# object is made and to the fields a replace() changes.
_CHECKS = {
    "prior": _check_prior,
    "pivot_ratio": lambda v: check_float("pivot_ratio", v, 0.0, 1.0),
    "sim_threshold": lambda v: check_float("sim_threshold", v, -1.0, 1.0),
    "spatial_weight": lambda v: check_float("spatial_weight", v, 0.0, 1.0),
    "radius": lambda v: min(check_int("radius", v), RADIUS_MAX),
    "temporal_radius": lambda v: min(check_int("temporal_radius", v), RADIUS_MAX),
    "eps": lambda v: check_float("eps", v, 0.0, float("inf")),
    "check_finite": lambda v: check_bool("check_finite", v),
    "backend": _check_backend,
    "fusion": _check_fusion,
}
OPTION_NAMES = tuple(f.name for f in dataclasses.fields(PruneOptions))
DEFAULTS = PruneOptions()


def of(options: PruneOptions | None, changes: dict, allowed=OPTION_NAMES,
       where: str = "prune()") -> PruneOptions:
    """`options` (default DEFAULTS) with the keyword `changes` applied. A name outside
    `allowed` raises TypeError naming it and the accepted ones."""
    if options is not None and not isinstance(options, PruneOptions):
        raise TypeError(f"options must be a PruneOptions, got {type(options).__name__}")
    base = DEFAULTS if options is None else options
    if not changes:
        return base
    unknown = [name for name in changes if name not in allowed]
    if unknown:
        raise TypeError(f"unknown prune option(s) {', '.join(map(repr, unknown))}; {where} takes "
                        f"{', '.join(allowed)}")
    new = object.__new__(PruneOptions)  # a copy; only the changed fields are checked again
    new.__dict__.update(base.__dict__)
    for name, value in changes.items():
        object.__setattr__(new, name, _CHECKS[name](value))
    return new


def takes_options(*names: str):
    """Gives a function `def f(..., *, options=None, **kwargs)` the keyword signature of
    PruneOptions' fields `names` (all when empty), for help() and IDEs: the names and
    defaults come from the class, not a second list."""
    names = names or OPTION_NAMES
    defaults = {f.name: f.default for f in dataclasses.fields(PruneOptions)}

    def wrap(fn):
        sig = inspect.signature(fn)
        params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=defaults[n])
                   for n in names]
        fn.__signature__ = sig.replace(parameters=params)
        fn.option_names = names
        return fn
    return wrap
