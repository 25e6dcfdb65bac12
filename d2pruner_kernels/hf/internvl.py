"""InternVL (InternVLForConditionalGeneration, InternVL 3 / 3.5 "-hf" checkpoints): what the
pruner needs to know.

An image is one run of `config.image_token_id` placeholders (the processor wraps each in
its start / end image tokens) of m tiles of side x side tokens each (side = image_size /
patch_size * downsample_ratio: 16 for 448-px tiles), in the order of pixel_values: the
tiles cut row-major from a rows x cols canvas, each tile row-major inside (the pixel
shuffle keeps rows first), then a thumbnail when there is more than one tile. Its layout:

    one tile                     TokenLayout.grid(side, side)
    rows x cols tiles + thumbnail TokenLayout.tiles(rows, cols, (side, side))
                                 + TokenLayout.grid(side, side)

The model never sees the canvas (6 tiles could be 2 x 3, 3 x 2, 1 x 6 or 6 x 1): pass
`image_sizes` (each image's original (height, width), one row per image of the batch in
order, as LLaVA-NeXT's processor returns them) to the forward or to generate(), which
hands it to every forward; InternVLForConditionalGeneration's forward passes it on to the
language model, where the pruner reads it. rows x cols is derived as the processor derives
it: transformers' get_optimal_tiled_canvas(image_size, tile, 1, max_patches), with the
processor's default max_patches = 12 first, then any other max_patches that gives the
number of tiles the prompt holds; a size no setting reproduces, or two settings that
disagree, raise. More than one tile without image_sizes raises. where="llm" only.
"""
from __future__ import annotations

import torch

from ..token_layout import TokenLayout
from ._common import Adapter, runs

MAX_PATCHES = 12  # GotOcr2ImageProcessor's default, InternVL's processors keep it


def optimal_canvas(size: tuple, tile: int, max_patches: int) -> tuple[int, int]:
    """(cols, rows) as the processor picks them (get_optimal_tiled_canvas, min_patches=1)."""
    try:  # the PIL image processor's copy imports without torchvision
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
            get_optimal_tiled_canvas)
    except ImportError:  # pragma: no cover - an older or newer layout of transformers
        from transformers.models.got_ocr2.image_processing_got_ocr2 import (
            get_optimal_tiled_canvas)
    return get_optimal_tiled_canvas(tuple(int(v) for v in size), (tile, tile), 1, max_patches)


def tile_grid(size: tuple, tiles: int, tile: int) -> tuple[int, int]:
    """(rows, cols) of `tiles` tiles for an image of size (height, width), as the processor
    cut it (see the module docstring); ValueError if no max_patches setting gives `tiles`."""
    cols, rows = optimal_canvas(size, tile, MAX_PATCHES)
    if cols * rows == tiles:
        return rows, cols
    found = {(r, c) for c, r in (optimal_canvas(size, tile, m) for m in range(tiles, 4 * tiles + 1))
             if c * r == tiles}
    if len(found) == 1:
        return found.pop()
    why = (f"the processor's canvases for max_patches {tiles}..{4 * tiles} give "
           f"{sorted(found)}" if found else "no max_patches setting of the processor gives "
           "that many")
    raise ValueError(f"an image of size {tuple(int(v) for v in size)} with {tiles} tiles of "
                     f"{tile} px: {why}; is image_sizes the images' original (height, width), "
                     f"in the order of the images?")


class InternVLAdapter(Adapter):
    family = "internvl"
    model_classes = ("InternVLForConditionalGeneration",)

    def __init__(self, model):
        super().__init__(model)
        self._transformers_parts()
        cfg = model.config
        vc = cfg.vision_config
        size = vc.image_size[0] if isinstance(vc.image_size, (list, tuple)) else vc.image_size
        patch = vc.patch_size[0] if isinstance(vc.patch_size, (list, tuple)) else vc.patch_size
        self.tile_px = int(size)
        self.side = int(size // patch * cfg.downsample_ratio)
        self.per_tile = self.side * self.side

    def check(self, where: str) -> None:
        self._llm_only(where, "tiles its images")
        cfg = self.model.config
        vc = cfg.vision_config
        sizes = [vc.image_size, vc.patch_size]
        if any(isinstance(v, (list, tuple)) and v[0] != v[1] for v in sizes):
            raise ValueError(f"InternVL with non-square tiles or patches ({sizes}) is not "
                             f"supported")

    def images(self, sample: int, sample_runs: list, lm_kwargs: dict, outer: dict) -> list:
        if not sample_runs:
            return []
        sizes = lm_kwargs.get("image_sizes")
        out = []
        for j, (s, e) in enumerate(sample_runs):
            label = f"sample {sample}, image {j} (tokens {s}..{e - 1})"
            if (e - s) % self.per_tile:
                raise ValueError(f"{label}: {e - s} image tokens are not a whole number of "
                                 f"tiles of {self.side}x{self.side} tokens")
            m = (e - s) // self.per_tile
            if m == 1:
                out.append((s, e, TokenLayout.grid(self.side, self.side)))
                continue
            if m == 2:
                raise ValueError(f"{label}: 2 tiles of tokens, but a thumbnail follows only "
                                 f"two tiles or more (2 + 1): not an image as InternVL's "
                                 f"processor cuts it")
            if sizes is None:
                raise ValueError(f"{label}: {m - 1} tiles and a thumbnail; the pruner needs "
                                 f"each image's original size to know their rows x cols: pass "
                                 f"image_sizes=[[height, width], ...] (one row per image of the "
                                 f"batch, in order) to the forward or to generate()")
            if "sizes" not in outer:  # once per forward
                outer["sizes"] = self._sizes(sizes, outer["image"])
            size = outer["sizes"][sample][j]
            rows, cols = tile_grid(size, m - 1, self.tile_px)
            layout = (TokenLayout.tiles(rows, cols, (self.side, self.side))
                      + TokenLayout.grid(self.side, self.side))
            out.append((s, e, layout))
        return out

    def _sizes(self, sizes, image: torch.Tensor) -> list:
        """Each sample's images' (height, width). image_sizes is either one row per image of
        the batch, in order ([total, 2]: what the processor returns), or per sample, a list
        of lists [[(h, w), ...], ...] (generate passes lists unchanged, so under num_beams /
        num_return_sequences = n each sample's list serves its n rows).

        generate() repeats every row of a [total, 2] tensor n times in place (it expands
        tensors along dim 0 as if they were per sample): when the batch's rows and
        image_sizes' rows both come in identical groups of n, the rows may be that
        expansion, or a batch of look-alike samples; when the two readings differ, this
        raises, asking for the per-sample form."""
        per_sample = [runs(row) for row in image]
        counts = [len(r) for r in per_sample]
        if isinstance(sizes, (list, tuple)) and sizes and all(
                isinstance(s, (list, tuple)) and all(isinstance(hw, (list, tuple, torch.Tensor))
                                                     for hw in s) for s in sizes):
            return _per_sample(sizes, counts)
        t = torch.as_tensor(sizes).detach().cpu()
        total = sum(counts)
        if t.dim() != 2 or t.shape[1] != 2 or t.shape[0] != total:
            raise ValueError(f"image_sizes must be [{total}, 2] (one (height, width) per image "
                             f"of the batch, in order) or per sample, a list of lists, got "
                             f"shape {list(t.shape)}")
        rows = [tuple(r) for r in t.tolist()]
        it = iter(rows)
        plain = [[next(it) for _ in range(c)] for c in counts]
        n = _expanded(image, counts, rows) if max(counts) > 1 else 1
        if n == 1:
            return plain
        rows = rows[::n]
        firsts = [sum(counts[0:b:n]) for b in range(0, len(counts), n)]
        expanded = [rows[firsts[b // n]:firsts[b // n] + counts[b]] for b in range(len(counts))]
        if expanded != plain:
            raise ValueError(f"image_sizes is ambiguous for this batch: its rows come in groups "
                             f"of {n} like the samples, as generate() expands them under "
                             f"num_beams / num_return_sequences, or as {n} look-alike samples "
                             f"would; pass it per sample, a list of lists "
                             f"[[(height, width), ...], ...] (generate passes lists unchanged)")
        return plain


def _per_sample(sizes, counts: list) -> list:
    """image_sizes as a list per sample (of len(counts) // n samples, n rows each)."""
    batch = len(counts)
    if batch % len(sizes):
        raise ValueError(f"image_sizes has {len(sizes)} samples but the batch has {batch} rows "
                         f"(not a multiple: generate's expansion repeats each sample n times)")
    n = batch // len(sizes)
    value = []
    for b in range(batch):
        mine = [tuple(int(v) for v in hw) for hw in sizes[b // n]]
        if len(mine) != counts[b] or any(len(hw) != 2 for hw in mine):
            raise ValueError(f"image_sizes[{b // n}] must hold one (height, width) per image of "
                             f"sample {b // n} ({counts[b]}), got {sizes[b // n]!r}")
        value.append(mine)
    return value


def _expanded(image: torch.Tensor, counts: list, rows: list) -> int:
    """The largest n > 1 such that the batch's rows and image_sizes' rows both come in
    identical consecutive groups of n (generate's expansion), else 1."""
    batch = image.shape[0]
    for n in range(batch, 1, -1):
        if batch % n or len(rows) % n:
            continue
        same_rows = all(torch.equal(image[b], image[b - b % n]) for b in range(batch))
        same_sizes = all(rows[i] == rows[i - i % n] for i in range(len(rows)))
        if same_rows and same_sizes:
            return n
    return 1
