"""The kernels, one module per stage beside its twin in `reference/`:

    scores.py      Triton: step 1, debiased importance scores
    rank.py        Triton: step 2, the rank order by counting, with the feature norms
    graph.py       Triton: step 4, the similarity graph as packed bits (dense, split-K,
                   ragged)
    lazy_graph.py  steps 4-7: the graph in row ranges, the MIS after each
    mis.py         steps 5-7: the compiled MIS (the Python side of csrc/: CUDA kernel,
                   C++ twin)
    cpu_walk.py    steps 4-7 on a CPU without a graph: the windowed members-only walk
    varlen.py      steps 1-7 of a ragged batch (prune_varlen): one launch per stage
    ragged.py      the ragged table's fields and its one row builder (plain ints)
    ragged_jit.py  the ragged table as the Triton kernels read it
    attention.py   Triton: attention_scores (the importance rows of a model's attention)
    dot.py         the Triton kernels' one matrix product

`dispatch.py` decides which of them runs; the Triton modules are imported only when a
Triton stage runs, so the package works without Triton or without the compiled extension
(the reference then runs instead). Kernel modules never import the reference."""
import contextlib
import functools
import os

import torch


@functools.cache  # asked on every launch; Triton itself reads it once, at import
def interpreting() -> bool:
    """Triton kernels run on CPU tensors under the interpreter (TRITON_INTERPRET=1, which
    must be set before the kernel modules are imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def launch_device(device: torch.device):
    """Triton launches on the current CUDA device: every launch wrapper makes it the one of
    its tensors, so no caller has to (a no-op context on CPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached: no query per call)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


# Host-side integer helpers. triton.cdiv / triton.next_power_of_2 are constexpr functions
# (a few µs a call in Triton 3.7): too slow for launch glue that runs on every prune().
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
