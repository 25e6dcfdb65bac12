"""Calibrate a positional prior from a directory of saved score maps.

    python -m d2pruner_kernels.calibrate DIR --grid 24 24 --out prior.safetensors \\
        [--model NAME] [--layer L] [--query last|cls] [--png map.png]
    (installed as `d2pruner-calibrate`)

Every `.pt` and `.safetensors` file directly in DIR (sorted by name) holds one tensor of
score maps ([N], [B, N], [H, W] or [B, H, W]; see PositionalPrior.update), either as the
only tensor of the file or under the name `scores`. `.pt` files are read with
`torch.load(weights_only=True)`: plain tensors and containers only, no code.
Prints the count, min and max of the prior; writes the prior and, with --png, a grayscale
picture of the map (black = min, white = max; frames side by side).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .prior import PositionalPrior

SUFFIXES = (".pt", ".safetensors")


def read_scores(path: Path) -> torch.Tensor:
    """The score-map tensor of one file: the file's only tensor, or the one named `scores`."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        content = load_file(str(path), device="cpu")
    else:
        content = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(content, torch.Tensor):
        return content
    if isinstance(content, dict):
        if isinstance(content.get("scores"), torch.Tensor):
            return content["scores"]
        tensors = [v for v in content.values() if isinstance(v, torch.Tensor)]
        if len(tensors) == 1:
            return tensors[0]
        raise ValueError(f"{path} holds {len(tensors)} tensors ({sorted(map(str, content))}) "
                         f"and none is named 'scores'")
    raise ValueError(f"{path} holds a {type(content).__name__}, not a tensor of score maps")


def map_picture(prior: PositionalPrior, min_width: int = 256):
    """A grayscale PIL image of the prior (min black, max white), cells as squares."""
    from PIL import Image
    m = prior.as_map()
    frames = m.unsqueeze(0) if m.dim() == 2 else m
    strip = torch.cat(list(frames), dim=1)                          # frames side by side
    lo, hi = strip.min(), strip.max()
    level = (strip - lo) / (hi - lo) if hi > lo else torch.zeros_like(strip)
    pixels = (level * 255).round().to(torch.uint8)
    cell = max(1, -(-min_width // pixels.shape[1]))                 # ceil
    pixels = pixels.repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    return Image.fromarray(pixels.numpy())  # uint8 [h, w]: mode "L"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="d2pruner-calibrate",
                                description="Calibrate a D2Pruner positional prior (mean "
                                            "score map) from saved score maps.")
    p.add_argument("directory", type=Path, help="folder of .pt / .safetensors score maps")
    p.add_argument("--grid", type=int, nargs="+", required=True, metavar="G",
                   help="patch grid: H W, or T H W")
    p.add_argument("--out", type=Path, required=True, help="prior file (.safetensors)")
    p.add_argument("--model", default="", help="model name, kept in the file")
    p.add_argument("--layer", type=int, default=None, help="layer the scores come from")
    p.add_argument("--query", choices=("last", "cls"), default="",
                   help="query row: last text token or CLS")
    p.add_argument("--png", type=Path, default=None, help="also write a picture of the map")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if len(args.grid) not in (2, 3):
            raise ValueError(f"--grid takes 2 (H W) or 3 (T H W) sizes, got {args.grid}")
        if not args.directory.is_dir():
            raise ValueError(f"{args.directory} is not a directory")
        files = sorted(f for f in args.directory.iterdir()
                       if f.is_file() and f.suffix in SUFFIXES)
        if not files:
            raise ValueError(f"no .pt or .safetensors files in {args.directory}")
        prior = PositionalPrior(tuple(args.grid), model=args.model, layer=args.layer,
                                query=args.query)
        from tqdm import tqdm
        for f in tqdm(files, desc="calibrating", unit="file", disable=args.quiet):
            try:
                prior.update(read_scores(f))
            except (ValueError, TypeError, RuntimeError) as e:
                raise ValueError(f"{f.name}: {e}") from e
        mean = prior.mean  # checks: finite and positive
        prior.save(args.out)
    except (ValueError, TypeError, OSError) as e:
        print(f"d2pruner-calibrate: error: {e}", file=sys.stderr)
        return 2

    lo, hi = int(mean.argmin()), int(mean.argmax())
    def cell(i: int) -> tuple[int, ...]:
        return tuple(int(v) for v in torch.unravel_index(torch.tensor(i), prior.grid))
    print(f"prior: grid {prior.grid}, {prior.count} maps from {len(files)} files")
    print(f"min {mean[lo].item():.6g} at {cell(lo)}, max {mean[hi].item():.6g} at {cell(hi)}, "
          f"max/min {mean[hi].item() / mean[lo].item():.3g}")
    print(f"wrote {args.out}")
    if args.png is not None:
        map_picture(prior).save(args.png)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
