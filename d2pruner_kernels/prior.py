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

import copy
import math
import numbers
import os
import re
import tempfile

import torch

from .checks import as_3d, check_int, grid_dims

FORMAT = "d2pruner-positional-prior"
VERSION = "1"


def _grid_str(grid: tuple[int, ...]) -> str:
    return ",".join(str(g) for g in grid)


def write_temp(path, data: bytes) -> str:
    """Writes `data` to a new temporary file in the folder of `path` (same file system, so
    os.replace onto `path` is atomic) and returns its name; removed again on failure."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".",
                               prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)  # mkstemp makes 0600; give the file the usual mode
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


_POSITIVE = re.compile(r"[1-9][0-9]{0,17}")  # decimal, no sign or spaces, < 10^18
_INT = re.compile(r"-?(0|[1-9][0-9]{0,17})")


def _check_header(path: str, meta: dict, names: list, dtype, shape) -> tuple:
    """(grid, count, layer) from a prior file's metadata, checked against the header of its
    tensor `mean` (dtype string, shape list) before anything is allocated."""
    def bad(field: str, what: str, got) -> ValueError:
        return ValueError(f"{path}: {field} {what}, got {got!r}")
    if names != ["mean"]:
        raise bad("tensors", "must be exactly one, 'mean' (a prior file holds nothing else)",
                  names)
    if "version" in meta and meta["version"] != VERSION:
        raise bad("metadata version", f"must be {VERSION!r} (this version reads no other)",
                  meta["version"])
    raw = meta.get("grid")
    parts = raw.split(",") if isinstance(raw, str) else []
    if len(parts) not in (2, 3) or not all(_POSITIVE.fullmatch(p) for p in parts):
        raise bad("metadata grid", "must be 2 or 3 positive ints 'H,W' or 'T,H,W'", raw)
    grid = tuple(int(p) for p in parts)
    if dtype != "F64" or len(shape) != 1:
        raise bad("tensor mean", "must be float64 [N]", f"{dtype} {shape}")
    if math.prod(grid) != shape[0]:
        raise bad("metadata grid", f"must have as many cells as tensor mean has entries "
                  f"({shape[0]})", raw)
    raw = meta.get("count")
    if not (isinstance(raw, str) and _POSITIVE.fullmatch(raw)):
        raise bad("metadata count", "must be a positive int (the maps averaged; a saved "
                  "prior has data)", raw)
    count = int(raw)
    raw = meta.get("layer", "")
    if raw and not _INT.fullmatch(raw):
        raise bad("metadata layer", "must be empty or an int", raw)
    return grid, count, int(raw) if raw else None


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
        self._set_mean(torch.zeros(self.n, dtype=torch.float64), 0)

    def _set_mean(self, mean: torch.Tensor, count: int) -> None:
        """The only place the mean changes. It gets a new tensor (never edited in place) and
        new caches (never cleared in place), so an object that shares them (what `for_grid`
        returns) keeps what it had: a snapshot, never changed through the other. Whether the
        prior is usable is read here, on the host, once: `check()` and the device copies
        made under torch.compile then read no data."""
        self._mean, self.count = mean, count
        self._device_copies: dict = {}  # (device, dtype) -> the copy prune() divides by
        self._grid_copies: dict = {}  # grid -> the derived prior, for for_grid()
        self._fault = None  # why check() fails: None, or (what, value, token)
        if count == 0:
            self._fault = ("empty", None, None)
        elif not bool(torch.isfinite(mean).all()):
            self._fault = ("non-finite", None, None)
        else:
            low = mean.min().item()
            if low <= 0:
                self._fault = ("non-positive", low, int(mean.argmin()))

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
        self._set_mean(self._mean + (maps.sum(dim=0) - nb * self._mean) / total, total)
        return self

    # -- reading -------------------------------------------------------------------------

    def check(self) -> None:
        """Raises ValueError unless the prior has data and is finite and positive (decided
        when the data last changed: no value is read here)."""
        if self._fault is None:
            return
        what, low, cell = self._fault
        if what == "empty":
            raise ValueError(f"{self!r} has no data: call update() with score maps first")
        if what == "non-finite":
            raise ValueError(f"{self!r} holds NaN or Inf values")
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
        """The prior as prune() takes it: [N] on `device` in `dtype`, after `check()`. A new
        tensor each call (yours to edit); prune() itself uses a cached device copy."""
        return self._device_tensor(device, dtype).clone()

    def _device_tensor(self, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The cached copy on `device` (one host-to-device copy per device and dtype, dropped
        by update()), for prune(): never handed out, so nothing can edit it in place. Reads
        no data (check() was decided when the mean changed), so torch.compile(fullgraph=True)
        traces it on a cold cache."""
        key = (str(torch.device(device)) if device is not None else "cpu", dtype)
        if key not in self._device_copies:
            self._device_copies[key] = self.mean.to(device=device, dtype=dtype)
        return self._device_copies[key]

    # -- files ---------------------------------------------------------------------------

    def metadata(self) -> dict[str, str]:
        return {"format": FORMAT, "version": VERSION, "grid": _grid_str(self.grid),
                "count": str(self.count), "model": self.model,
                "layer": "" if self.layer is None else str(self.layer), "query": self.query,
                "transforms": self.transforms}

    def to_bytes(self) -> bytes:
        """The safetensors file `save` writes, as bytes (after `check()`)."""
        from safetensors.torch import save
        self.check()
        return save({"mean": self._mean.contiguous()}, metadata=self.metadata())

    def save(self, path) -> None:
        """Writes a safetensors file (tensor `mean`, float64 [N], and string metadata),
        atomically: a temporary file beside `path`, then os.replace (no partial file)."""
        data = self.to_bytes()
        os.replace(write_temp(path, data), os.fspath(path))

    @classmethod
    def load(cls, path, expected_grid=None) -> "PositionalPrior":
        """Reads a file written by `save`; refuses anything else, and a grid other than
        `expected_grid` when given. Never executes code from the file.

        The metadata is checked against the stored tensor's header before anything is
        allocated: grid 2 or 3 positive ints whose product is the length of `mean`
        (float64, 1-D, the file's only tensor), count a positive int, layer empty or an
        int. Every malformed file raises ValueError naming the path and the field."""
        from safetensors import safe_open
        path = os.fspath(path)
        want = None if expected_grid is None else grid_dims("expected_grid", expected_grid)
        try:  # the header only: names, metadata, the tensor's dtype and shape
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                names = sorted(f.keys())
                head = f.get_slice("mean") if "mean" in names else None
                dtype, shape = (head.get_dtype(), list(head.get_shape())) if head else (None, None)
        except Exception as e:  # a pickle, a truncated file, anything that is not safetensors
            raise ValueError(f"{path} is not a safetensors positional prior: {e}") from e
        if meta.get("format") != FORMAT or head is None:
            raise ValueError(f"{path} is a safetensors file but not a positional prior "
                             f"(metadata format={meta.get('format')!r}, tensors {names})")
        grid, count, layer = _check_header(path, meta, names, dtype, shape)
        if want is not None and grid != want:
            raise ValueError(f"{path} holds a prior for grid {grid}, expected grid {want}")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                mean = f.get_tensor("mean")
        except Exception as e:
            raise ValueError(f"{path}: tensor mean cannot be read: {e}") from e
        if mean.dtype != torch.float64 or tuple(mean.shape) != (math.prod(grid),):
            raise ValueError(f"{path}: tensor mean must be float64 [{math.prod(grid)}] for grid "
                             f"{grid}, got {mean.dtype} {list(mean.shape)}")
        prior = cls(grid, model=meta.get("model", ""), layer=layer, query=meta.get("query", ""))
        prior._set_mean(mean.clone(), count)
        prior.transforms = meta.get("transforms", "")
        try:
            prior.check()
        except ValueError as e:
            raise ValueError(f"{path}: tensor mean: {e}") from e
        return prior

    # -- transforms (our extension; the paper calibrates on the model's own grid) ---------

    def _derived(self, grid, mean: torch.Tensor, note: str) -> "PositionalPrior":
        out = PositionalPrior(grid, model=self.model, layer=self.layer, query=self.query)
        out._set_mean(mean.reshape(-1).contiguous(), self.count)
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

    def for_grid(self, grid) -> "PositionalPrior":
        """The prior for an image on `grid` (what prune_varlen uses): this prior's map if it
        was calibrated for that grid; else `resized` to it (a 2-D prior, or a one-frame
        (1, H, W) one, for a (T, H, W) grid: resized to (H, W), then `per_frame(T)`). Our extension: prefer a prior calibrated on
        the grid you prune (docs/spec.md).

        A new object each call, yours to update: it shares the (cached) map and device
        copies with this prior until either of them changes, and an update() of one never
        changes the other (the mean is replaced, never edited in place). The resized map is
        cached until this prior's next update()."""
        grid = grid_dims("grid", grid)
        if as_3d(grid) == as_3d(self.grid):
            return copy.copy(self)
        if grid not in self._grid_copies:
            if len(self.grid) == 2 and len(grid) == 3:
                frame = self if grid[1:] == self.grid else self.resized(grid[1:])
                self._grid_copies[grid] = frame.per_frame(grid[0])
            elif len(self.grid) == 3 and self.grid[0] == 1 and len(grid) == 3 and grid[0] > 1:
                # a one-frame prior (a Qwen image's, calibrate_prior's per-frame maps) for a
                # video: its frame, resized, repeated per frame
                one = self if grid[1:] == self.grid[1:] else self.resized((1,) + grid[1:])
                frame = one._derived(one.grid[1:], one._mean, "frame")
                self._grid_copies[grid] = frame.per_frame(grid[0])
            else:
                self._grid_copies[grid] = self.resized(grid)
        return copy.copy(self._grid_copies[grid])

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
