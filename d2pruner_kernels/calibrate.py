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

Every user error (a bad argument, an unreadable or foreign input file, an output that
cannot be written) prints one line on stderr and exits with status 2, and nothing is
written: both outputs are made in memory, written to temporary files beside their targets,
and only then moved into place (os.replace). The --out and --png files are never read as
inputs when they lie in DIR (a note says so), and any other prior file there is refused.
"""
from __future__ import annotations

import argparse
import io
import os
import pickle
import sys
import warnings
from pathlib import Path

import torch

from .prior import FORMAT, PositionalPrior, write_temp

SUFFIXES = (".pt", ".safetensors")


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def read_scores(path: Path) -> torch.Tensor:
    """The score-map tensor of one file: the file's only tensor, or the one named `scores`.
    Raises ValueError (one line) for a file that cannot be read as such."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(path), framework="pt", device="cpu") as f:
                if (f.metadata() or {}).get("format") == FORMAT:
                    raise _Refused(f"{path} is a positional prior (a calibration output), not "
                                   f"score maps: move it out of the input folder")
                content = {name: f.get_tensor(name) for name in f.keys()}
        else:
            with warnings.catch_warnings():  # e.g. "pickle protocol 4": noise before an error
                warnings.simplefilter("ignore")
                content = torch.load(path, map_location="cpu", weights_only=True)
    except _Refused as e:
        raise ValueError(str(e)) from None
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} holds pickled objects other than tensors and containers: "
                         f"refused (torch.load(weights_only=True) never runs code)") from e
    except Exception as e:  # a truncated or foreign file: safetensors, zip, pickle errors
        raise ValueError(f"{path} cannot be read as a {path.suffix} tensor file: "
                         f"{_first_line(e)}") from e
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


class _Refused(Exception):
    pass


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


def _picture_format(path: Path) -> str:
    """The Pillow format that writes `path` (by its extension), checked before any work."""
    try:
        from PIL import Image
    except ImportError as e:
        raise ValueError("--png needs Pillow (pip install pillow)") from e
    Image.init()
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        what = repr(path.suffix) if path.suffix else "a name without an extension"
        raise ValueError(f"--png {path}: Pillow cannot write {what} (use .png)")
    return fmt


def _check_target(flag: str, path: Path) -> None:
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory")
    if not path.parent.is_dir():
        raise ValueError(f"{flag} {path}: folder {path.parent} does not exist")


def _same_file(a: Path, b: Path | None) -> bool:
    return b is not None and a.resolve() == b.resolve()


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


def _calibrate(args) -> tuple:
    """Everything but the printing: checks, reads, averages, writes. Raises on user errors."""
    if len(args.grid) not in (2, 3):
        raise ValueError(f"--grid takes 2 (H W) or 3 (T H W) sizes, got {args.grid}")
    _check_target("--out", args.out)
    fmt = None
    if args.png is not None:  # before any work: a bad extension must not cost a run
        fmt = _picture_format(args.png)
        _check_target("--png", args.png)
        if _same_file(args.png, args.out):
            raise ValueError(f"--png and --out name the same file {args.out}")
    if not args.directory.is_dir():
        raise ValueError(f"{args.directory} is not a directory")
    files = []
    for f in sorted(args.directory.iterdir()):
        if not (f.is_file() and f.suffix in SUFFIXES):
            continue
        if _same_file(f, args.out) or _same_file(f, args.png):
            print(f"d2pruner-calibrate: note: skipping {f}: it is this run's output, not an "
                  f"input", file=sys.stderr)
            continue
        files.append(f)
    if not files:
        raise ValueError(f"no .pt or .safetensors files in {args.directory}")
    prior = PositionalPrior(tuple(args.grid), model=args.model, layer=args.layer,
                            query=args.query)
    from tqdm import tqdm
    with tqdm(files, desc="calibrating", unit="file", disable=args.quiet) as bar:
        for f in bar:
            try:
                prior.update(read_scores(f))
            except (ValueError, TypeError, RuntimeError) as e:
                msg = str(e)
                raise ValueError(msg if str(f) in msg else f"{f.name}: {msg}") from e
    mean = prior.mean  # checks: finite and positive
    outputs = [(args.out, prior.to_bytes())]
    if args.png is not None:
        buf = io.BytesIO()
        map_picture(prior).save(buf, format=fmt)
        outputs.append((args.png, buf.getvalue()))
    temps = []
    try:  # every output to a temporary file first, then all moved into place
        for path, data in outputs:
            try:
                temps.append(write_temp(path, data))
            except OSError as e:
                raise OSError(f"cannot write {path}: {e.strerror or e}") from e
        for (path, _), tmp in zip(outputs, temps):
            os.replace(tmp, path)
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return prior, mean, files


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        prior, mean, files = _calibrate(args)
    except (ValueError, TypeError, OSError, RuntimeError, MemoryError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__  # one line
        print(f"d2pruner-calibrate: error: {msg}", file=sys.stderr)
        return 2

    lo, hi = int(mean.argmin()), int(mean.argmax())
    def cell(i: int) -> tuple[int, ...]:
        return tuple(int(v) for v in torch.unravel_index(torch.tensor(i), prior.grid))
    print(f"prior: grid {prior.grid}, {prior.count} maps from {len(files)} files")
    print(f"min {mean[lo].item():.6g} at {cell(lo)}, max {mean[hi].item():.6g} at {cell(hi)}, "
          f"max/min {mean[hi].item() / mean[lo].item():.3g}")
    print(f"wrote {args.out}")
    if args.png is not None:
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
