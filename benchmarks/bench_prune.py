"""End to end: prune() (backend="auto", eagerly and replayed from a CUDA graph), our
reference backend, the naive D2Pruner and the peers (DivPrune, CDPruner, DART; one image at a
time, looped over the batch)."""
import pytest

from .harness import DEVICE, ON_GPU, bound_calls, prune_variants, run_benchmark, skip_reason
from .shapes import ALL_SHAPES, CPU_SHAPES, input_copies

VARIANTS = [v.name for v in prune_variants(CPU_SHAPES[0])]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", ALL_SHAPES, ids=lambda s: s.name)
def test_prune(benchmark, shape, variant):
    if reason := skip_reason(shape):
        pytest.skip(reason)
    v = next(v for v in prune_variants(shape) if v.name == variant)
    if v.cuda_graph and not ON_GPU:
        pytest.skip("CUDA graphs need a GPU")
    calls = bound_calls(v, input_copies(shape, DEVICE))
    run_benchmark(benchmark, "prune", shape, variant, calls, slow=v.slow, k=shape.k_int)
