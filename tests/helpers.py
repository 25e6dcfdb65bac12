"""Shared test helpers: the device the tests run on, and the input and parity tools of
`d2pruner_kernels.testing`. (conftest.py only switches the Triton interpreter on.)"""
import json
import os
import subprocess
import sys
import textwrap

import torch

from d2pruner_kernels.testing import (assert_edges_match, band_free, band_margin,  # noqa: F401
                                      clustered_tokens, distinct_attention, fused_similarity64,
                                      in_band)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def run_python(code: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter on this checkout (the Triton interpreter as in
    conftest.py); a crash shows up as a non-zero return code, not a dead test run."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, TESTS]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def run_json(code: str):
    """run_python, which must exit 0 and print one JSON line last."""
    out = run_python(code)
    assert out.returncode == 0, (f"the subprocess died (exit {out.returncode}):\n"
                                 f"{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])

