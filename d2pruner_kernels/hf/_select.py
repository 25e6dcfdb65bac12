"""The budget, the prior and prune()'s options of one pruner, checked once at apply() and
applied to the images of each prefill."""
from __future__ import annotations

import math

import torch

from ..checks import cells, check_k, grid_str, resolve_k
from ..options import PruneOptions, of
from ..prior import PositionalPrior
from ..prune import prune
from ..varlen import prune_varlen


class Selector:
    """k (an int per image or a ratio), the prior (None, a PositionalPrior resized to each
    image's grid when it differs, or a positive tensor for the grid) and prune()'s other
    options, as one PruneOptions checked here, once (no device needed: what depends on the
    device is checked by prune() at the first prefill)."""

    def __init__(self, k, prior, options: dict, grid=None):
        if grid is not None:  # a static token count: the whole range is checked here
            resolve_k(k, math.prod(grid))
        else:  # the type and the lower bound; each image's count is known at the prefill
            check_k(k)
        options = dict(options)
        base = options.pop("options", None)  # a PruneOptions, and/or its fields as keywords
        if prior is not None or base is None:
            options["prior"] = prior
        self.options: PruneOptions = of(base, options, where="hf.apply()")
        prior = self.options.prior
        self.k, self.prior = k, prior
        self._at_most = grid is None  # token counts that depend on the input: k is "at most"
        self._device_prior = {}
        if isinstance(prior, PositionalPrior):
            prior.check()
        elif isinstance(prior, torch.Tensor):
            if prior.dim() != 1:
                raise ValueError(f"prior as a tensor must be 1-D [N] for the image grid, got "
                                 f"shape {list(prior.shape)}")
            if grid is not None:
                self._prior_for(grid, math.prod(grid), "the model's grid", prior.device)

    def budget(self, n: int, label: str) -> int:
        """An int k keeps at most k of an image's n tokens where n depends on the input (an
        image with n <= k keeps all); a fixed n (LLaVA's 576) was checked at apply()."""
        try:
            return resolve_k(self.k, n, at_most=self._at_most)
        except ValueError as e:
            raise ValueError(f"{label}: {e}") from None

    def _prior_for(self, grid, n: int, label: str, device):
        if self.prior is None:
            return None
        if isinstance(self.prior, PositionalPrior):
            return self.prior.for_grid(grid)
        if self.prior.shape[0] != n:
            raise ValueError(f"{label}: the prior tensor has {self.prior.shape[0]} entries but "
                             f"the image has {n} tokens (grid {grid_str(grid)}); pass a "
                             f"PositionalPrior to have it resized to each grid")
        if device not in self._device_prior:
            self._device_prior[device] = self.prior.to(device=device, dtype=torch.float32)
        return self._device_prior[device]

    def prune_batch(self, tokens, attn, grid, k, prior):
        return prune(tokens, attn, grid, k, options=self.options, prior=prior)

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
        lengths = [cells(g) for g in grids]  # a grid or a TokenLayout
        ks = [self.budget(n, lab) for n, lab in zip(lengths, labels)]
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        prior = self.prior
        if isinstance(prior, torch.Tensor):
            prior = torch.cat([self._prior_for(g, n, lab, tokens.device)
                               for g, n, lab in zip(grids, lengths, labels)])
        cu = torch.tensor(offsets, dtype=torch.int64, device=tokens.device)
        keep, _ = prune_varlen(tokens, attn, cu, grids, ks, options=self.options, prior=prior)
        return [part - s for part, s in zip(keep.split(ks), offsets)]
