"""Benchmark setup.

Without a GPU the Triton kernels run under the interpreter, which must be switched on before
any @triton.jit function is defined: here, before the benchmark modules import the kernels.
The benchmark files are named bench_*.py; they are collected here, so the project's pytest
configuration (testpaths = tests) needs no change.
"""
import fnmatch
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collect_file(file_path, parent):
    if file_path.suffix != ".py" or not fnmatch.fnmatch(file_path.name, "bench_*.py"):
        return None
    # A file given on the command line, or one matching python_files, is collected anyway.
    if parent.session.isinitpath(file_path) or any(
            fnmatch.fnmatch(file_path.name, pattern)
            for pattern in parent.config.getini("python_files")):
        return None
    return pytest.Module.from_parent(parent, path=file_path)
