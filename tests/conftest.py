"""Test setup: without a GPU, the Triton kernels run under the interpreter, which must be
switched on before any @triton.jit function is defined (the kernel modules are imported
lazily, so setting it here, before the tests import them, is enough). Shared helpers live
in helpers.py."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
