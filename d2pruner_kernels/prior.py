"""The positional prior of D2Pruner: a model's mean importance map over a calibration set,
which `prune(prior=...)` divides the raw scores by (docs/spec.md, step 1).

    prior = PositionalPrior((24, 24), model="llava-1.5-7b", layer=1, query="last")
    for maps in loader:            # [N], [B, N] or [B, H, W] score maps
        prior.update(maps)         # running mean in float64, and a count
    prior.save("llava.safetensors")
    prior = PositionalPrior.load("llava.safetensors", expected_grid=(24, 24))
    keep = prune(tokens, attn, (24, 24), k, prior=prior)

Files are safetensors: one float64 tensor `mean` [N] and string metadata (format, grid,
count, model, layer, query, transforms). Loading reads a JSON header and raw numbers
only (safetensors); it never unpickles and never runs code.

Transforms (the paper calibrates one map per model on its native grid; these are ours):
  resized(grid)   bilinear resampling of each 2-D frame (see `resized` for the formula)
  tiled(n, thumbnail=True)  the same map for each of n tiles, then one thumbnail tile
  per_frame(t)    the same map for each of t frames, grid (t, H, W)
"""
from __future__ import annotations

import math
import numbers
import os

import torch

from .checks import check_int, grid_dims

FORMAT = "d2pruner-positional-prior"
VERSION = "1"


def _grid_str(grid: tuple[int, ...]) -> str:
    return ",".join(str(g) for g in grid)


class PositionalPrior:
    """Mean score map over a calibration set, on a patch grid (H, W) or (T, H, W).

    grid:  the patch grid, row-major; N = prod(grid) tokens.
    model, layer, query: provenance, saved with the file (query: 'last' text token or 'cls').
    """

    def __init__(self, grid, *, model: str = "", layer: int | None = None, query: str = ""):
        self.grid = grid_dims("grid", grid)
        self.model = str(model)
        if layer is not None and (isinstance(layer, bool)
                                  or not isinstance(layer, numbers.Integral)):
            raise TypeError(f"layer must be an int or None, got {type(layer).__name__} {layer!r}")
        self.layer = None if layer is None else int(layer)
        self.query = str(query)
        self.transforms = ""  # what was derived from the calibrated map, for the file
        self.count = 0
        self._mean = torch.zeros(self.n, dtype=torch.float64)
        self._device_copies: dict = {}  # as_tensor() results, dropped by update()

    @property
    def n(self) -> int:
        return math.prod(self.grid)

    def __repr__(self) -> str:
        return (f"PositionalPrior(grid={self.grid}, count={self.count}, model={self.model!r}, "
                f"layer={self.layer}, query={self.query!r}"
                + (f", transforms={self.transforms!r})" if self.transforms else ")"))

    # -- building ------------------------------------------------------------------------

    def _as_maps(self, score_maps) -> torch.Tensor:
        """[N], [B, N], a grid-shaped map or a batch of them -> float64 CPU [B, N]."""
        if not isinstance(score_maps, torch.Tensor):
            raise TypeError(f"score_maps must be a torch.Tensor, got {type(score_maps).__name__}")
        if not (score_maps.is_floating_point()):
            raise TypeError(f"score_maps must be a floating-point tensor, got {score_maps.dtype}")
        shape, g = tuple(score_maps.shape), len(self.grid)
        if shape[-g:] == self.grid and len(shape) in (g, g + 1):
            maps = score_maps.reshape(-1, self.n)
        elif len(shape) in (1, 2) and shape[-1] == self.n:
            maps = score_maps.reshape(-1, self.n)
        else:
            dims = ", ".join(map(str, self.grid))
            raise ValueError(f"score_maps must be [N], [B, N], [{dims}] or [B, {dims}] for grid "
                             f"{self.grid} (N={self.n}), got shape {list(shape)}")
        maps = maps.detach().to(device="cpu", dtype=torch.float64)
        if not bool(torch.isfinite(maps).all()):
            bad = (~torch.isfinite(maps)).any(dim=1).nonzero().flatten().tolist()
            raise ValueError(f"score_maps holds NaN or Inf values (maps {bad[:10]} of this batch)")
        return maps

    def update(self, score_maps: torch.Tensor) -> "PositionalPrior":
        """Adds a batch of score maps to the running mean (float64); returns self.

        mean <- mean + (sum(batch) - B * mean) / (count + B), count <- count + B.
        """
        maps = self._as_maps(score_maps)
        nb = maps.shape[0]
        if nb == 0:
            return self
        total = self.count + nb
        self._mean += (maps.sum(dim=0) - nb * self._mean) / total
        self._device_copies.clear()
        self.count = total
        return self

    # -- reading -------------------------------------------------------------------------

    def check(self) -> None:
        """Raises ValueError unless the prior has data and is finite and positive."""
        if self.count == 0:
            raise ValueError(f"{self!r} has no data: call update() with score maps first")
        if not bool(torch.isfinite(self._mean).all()):
            raise ValueError(f"{self!r} holds NaN or Inf values")
        low = self._mean.min().item()
        if low <= 0:
            cell = int(self._mean.argmin())
            raise ValueError(f"{self!r} must be positive everywhere (it divides the "
                             f"attention), got {low:.3g} at token {cell}")

    @property
    def mean(self) -> torch.Tensor:
        """The mean map, float64 [N] (a copy), after `check()`."""
        self.check()
        return self._mean.clone()

    def as_map(self) -> torch.Tensor:
        """The mean map shaped as the grid, float64 (H, W) or (T, H, W)."""
        return self.mean.reshape(self.grid)

    def as_tensor(self, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The prior as prune() takes it: [N] on `device` in `dtype`, after `check()`."""
        key = (str(torch.device(device)) if device is not None else "cpu", dtype)
        if key not in self._device_copies:  # one host-to-device copy per device, not per call
            self._device_copies[key] = self.mean.to(device=device, dtype=dtype)
        return self._device_copies[key]

    # -- files ---------------------------------------------------------------------------

    def metadata(self) -> dict[str, str]:
        return {"format": FORMAT, "version": VERSION, "grid": _grid_str(self.grid),
                "count": str(self.count), "model": self.model,
                "layer": "" if self.layer is None else str(self.layer), "query": self.query,
                "transforms": self.transforms}

    def save(self, path) -> None:
        """Writes a safetensors file (tensor `mean`, float64 [N], and string metadata)."""
        from safetensors.torch import save_file
        self.check()
        save_file({"mean": self._mean.contiguous()}, os.fspath(path), metadata=self.metadata())

    @classmethod
    def load(cls, path, expected_grid=None) -> "PositionalPrior":
        """Reads a file written by `save`; refuses anything else, and a grid other than
        `expected_grid` when given. Never executes code from the file."""
        from safetensors import safe_open
        path = os.fspath(path)
        want = None if expected_grid is None else grid_dims("expected_grid", expected_grid)
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                names = set(f.keys())
                mean = f.get_tensor("mean") if "mean" in names else None
        except Exception as e:  # a pickle, a truncated file, anything that is not safetensors
            raise ValueError(f"{path} is not a safetensors positional prior: {e}") from e
        if meta.get("format") != FORMAT or mean is None:
            raise ValueError(f"{path} is a safetensors file but not a positional prior "
                             f"(metadata format={meta.get('format')!r}, tensors {sorted(names)})")
        try:
            grid = tuple(int(g) for g in meta["grid"].split(","))
            count = int(meta["count"])
            layer = int(meta["layer"]) if meta.get("layer") else None
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path} has malformed prior metadata {meta!r}") from e
        if want is not None and grid != want:
            raise ValueError(f"{path} holds a prior for grid {grid}, expected grid {want}")
        prior = cls(grid, model=meta.get("model", ""), layer=layer, query=meta.get("query", ""))
        if tuple(mean.shape) != (prior.n,) or mean.dtype != torch.float64:
            raise ValueError(f"{path}: tensor mean must be float64 [{prior.n}] for grid {grid}, "
                             f"got {mean.dtype} {list(mean.shape)}")
        prior._mean, prior.count = mean.clone(), count
        prior.transforms = meta.get("transforms", "")
        prior.check()
        return prior

    # -- transforms (our extension; the paper calibrates on the model's own grid) ---------

    def _derived(self, grid, mean: torch.Tensor, note: str) -> "PositionalPrior":
        out = PositionalPrior(grid, model=self.model, layer=self.layer, query=self.query)
        out._mean, out.count = mean.reshape(-1).contiguous(), self.count
        out.transforms = f"{self.transforms}; {note}" if self.transforms else note
        return out

    def _frame_grid(self, what: str) -> tuple[int, int]:
        if len(self.grid) != 2:
            raise ValueError(f"{what} needs a 2-D (H, W) prior, this one has grid {self.grid}")
        return self.grid

    def resized(self, grid) -> "PositionalPrior":
        """The prior on another grid, by bilinear resampling of each 2-D frame.

        `torch.nn.functional.interpolate(map, size=(H', W'), mode="bilinear",
        align_corners=False)` in float64, no antialiasing: output cell (i, j) reads the input
        at y = (i + 0.5) * H / H' - 0.5, x = (j + 0.5) * W / W' - 0.5, each clamped to
        [0, H - 1] / [0, W - 1], and mixes the four surrounding cells linearly. Cell centres
        stay aligned, constants stay constant, a ramp stays a ramp (clamped at the border),
        and a positive prior stays positive. A (T, H, W) prior takes a (T, H', W') grid with
        the same T; frames are resampled independently. The count is kept.
        """
        new = grid_dims("grid", grid)
        if len(new) != len(self.grid) or (len(new) == 3 and new[0] != self.grid[0]):
            want = f"(T, H', W') with T={self.grid[0]}" if len(self.grid) == 3 else "(H', W')"
            raise ValueError(f"resized() keeps the number of frames: a prior on grid "
                             f"{self.grid} can go to {want}, got {new}")
        self.check()
        frames = self._mean.reshape(-1, 1, *self.grid[-2:])        # [T, 1, H, W]
        out = torch.nn.functional.interpolate(frames, size=new[-2:], mode="bilinear",
                                              align_corners=False)
        return self._derived(new, out, f"resized {_grid_str(self.grid)}->{_grid_str(new)}")

    def tiled(self, n_tiles: int, thumbnail: bool = True) -> "PositionalPrior":
        """InternVL-style dynamic tiling: the same per-tile map for each of `n_tiles` tiles,
        then (thumbnail=True) once more for the thumbnail tile, in that token order.
        Grid (n_tiles + thumbnail, H, W). InternVL adds the thumbnail only when there is more
        than one tile: pass thumbnail=False for a single tile."""
        h, w = self._frame_grid("tiled()")
        n_tiles = check_int("n_tiles", n_tiles, lo=1)
        if not isinstance(thumbnail, bool):
            raise TypeError(f"thumbnail must be a bool, got {type(thumbnail).__name__}")
        self.check()
        t = n_tiles + int(thumbnail)
        note = f"tiled {n_tiles}" + ("+thumbnail" if thumbnail else "")
        return self._derived((t, h, w), self._mean.repeat(t), note)

    def per_frame(self, t: int) -> "PositionalPrior":
        """The same map for each of `t` video frames: grid (t, H, W)."""
        h, w = self._frame_grid("per_frame()")
        t = check_int("t", t, lo=1)
        self.check()
        return self._derived((t, h, w), self._mean.repeat(t), f"per_frame {t}")
