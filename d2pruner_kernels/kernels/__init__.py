"""Kernel backends of the stages: Triton (scores, graph) and the compiled MIS (_C).

The Triton modules are imported only when a Triton stage runs, so the package works
without Triton or without the compiled extension (the reference then runs instead)."""
import os


def interpreting() -> bool:
    """Triton kernels run on CPU tensors under the interpreter (TRITON_INTERPRET=1, which
    must be set before the kernel modules are imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"
