"""The budget, the prior and prune()'s options of one pruner, checked once at apply() and
applied to the images of each prefill."""
from __future__ import annotations

import inspect
import math
import numbers

import torch

from ..checks import resolve_k
from ..prior import PositionalPrior
from ..prune import prune
from ..varlen import prune_varlen

# prune()'s keyword options a pruner forwards (prior and the budget are its own arguments)
OPTIONS = tuple(name for name, p in inspect.signature(prune).parameters.items()
                if p.kind is p.KEYWORD_ONLY and name != "prior")


def _check_k(k) -> None:
    if isinstance(k, bool) or not isinstance(k, numbers.Real):
        raise TypeError(f"k must be an int >= 1 (tokens kept per image) or a float ratio in "
                        f"(0, 1], got {type(k).__name__} {k!r}")
    if isinstance(k, numbers.Integral):
        if k < 1:
            raise ValueError(f"k must be >= 1 (tokens kept per image), got {k}")
    elif not 0.0 < k <= 1.0:  # also NaN
        raise ValueError(f"k as a ratio must be in (0, 1], got {k}")


class Selector:
    """k (an int per image or a ratio), prior (None, a PositionalPrior resized to each
    image's grid when it differs, or a positive tensor for the grid) and prune options."""

    def __init__(self, k, prior, options: dict, grid=None, device=None):
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise TypeError(f"unknown prune option(s) {', '.join(map(repr, unknown))}; "
                            f"prune() takes {', '.join(OPTIONS)}")
        if grid is not None:  # a static token count: the whole range is checked here
            resolve_k(k, math.prod(grid))
        else:  # the type and the lower bound; the upper one per image, at each prefill
            _check_k(k)
        if prior is not None and not isinstance(prior, (PositionalPrior, torch.Tensor)):
            raise TypeError(f"prior must be a PositionalPrior, a tensor or None, got "
                            f"{type(prior).__name__}")
        if isinstance(prior, PositionalPrior):
            prior.check()
        elif isinstance(prior, torch.Tensor) and prior.dim() != 1:
            raise ValueError(f"prior as a tensor must be 1-D [N] for the image grid, got shape "
                             f"{list(prior.shape)}")
        self.k, self.prior, self.options = k, prior, dict(options)
        self._device_prior = {}
        # a dry run on the model's device and grid (or a small one) checks every option
        dry = grid if grid is not None else (2, 2)
        n = math.prod(dry)
        kd = resolve_k(k, n) if grid is not None else 1
        device = torch.device("cpu") if device is None else torch.device(device)
        self.prune_batch(torch.zeros(1, n, 1, device=device), torch.ones(1, n, device=device),
                         dry, kd, self._prior_for(dry, n, "the model's grid", device)
                         if grid is not None else None)

    def budget(self, n: int, label: str) -> int:
        try:
            return resolve_k(self.k, n)
        except ValueError as e:
            raise ValueError(f"{label}: {e}") from None

    def _prior_for(self, grid, n: int, label: str, device):
        if self.prior is None:
            return None
        if isinstance(self.prior, PositionalPrior):
            return self.prior.for_grid(grid)
        if self.prior.shape[0] != n:
            raise ValueError(f"{label}: the prior tensor has {self.prior.shape[0]} entries but "
                             f"the image has {n} tokens (grid {tuple(grid)}); pass a "
                             f"PositionalPrior to have it resized to each grid")
        if device not in self._device_prior:
            self._device_prior[device] = self.prior.to(device=device, dtype=torch.float32)
        return self._device_prior[device]

    def prune_batch(self, tokens, attn, grid, k, prior):
        return prune(tokens, attn, grid, k, prior=prior, **self.options)

    def select_batched(self, tokens: torch.Tensor, attn: torch.Tensor, grid, label: str):
        """Images of one grid, [n, N, D] and [n, N] -> kept int64 [n, k]."""
        n = tokens.shape[1]
        k = self.budget(n, label)
        return self.prune_batch(tokens, attn, grid, k,
                                self._prior_for(grid, n, label, tokens.device))

    def select_packed(self, tokens: torch.Tensor, attn: torch.Tensor, grids: list,
                      labels: list) -> list[torch.Tensor]:
        """Packed images tokens [total, D], attn [total] -> each image's kept indices
        (local, int64, ascending), one prune_varlen call."""
        lengths = [math.prod(g) for g in grids]
        ks = [self.budget(n, lab) for n, lab in zip(lengths, labels)]
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        prior = self.prior
        if isinstance(prior, torch.Tensor):
            prior = torch.cat([self._prior_for(g, n, lab, tokens.device)
                               for g, n, lab in zip(grids, lengths, labels)])
        cu = torch.tensor(offsets, dtype=torch.int64, device=tokens.device)
        keep, _ = prune_varlen(tokens, attn, cu, grids, ks, prior=prior, **self.options)
        return [part - s for part, s in zip(keep.split(ks), offsets)]
