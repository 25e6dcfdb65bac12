"""Stage 1 (debiased scores): the Triton kernel against the torch reference."""
import pytest

from d2pruner_kernels import debiased_scores
from d2pruner_kernels.kernels import interpreting

from .harness import DEVICE, run_benchmark, skip_reason
from .shapes import ALL_SHAPES, input_copies


@pytest.mark.parametrize("backend", ["kernels", "reference"])
@pytest.mark.parametrize("shape", ALL_SHAPES, ids=lambda s: s.name)
def test_debiased_scores(benchmark, shape, backend):
    if reason := skip_reason(shape):
        pytest.skip(reason)
    calls = [lambda i=i: debiased_scores(i.attn, i.prior, backend=backend)
             for i in input_copies(shape, DEVICE)]
    run_benchmark(benchmark, "scores", shape, backend, calls,
                  slow=backend == "kernels" and interpreting())
