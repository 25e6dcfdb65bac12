"""Stage 4 (hybrid similarity graph, packed bits): the Triton kernel against the reference."""
import pytest

from d2pruner_kernels import debiased_scores, rank_order, similarity_graph
from d2pruner_kernels.kernels import interpreting

from .harness import DEVICE, run_benchmark, skip_reason
from .shapes import ALL_SHAPES, input_copies


@pytest.mark.parametrize("backend", ["kernels", "reference"])
@pytest.mark.parametrize("shape", ALL_SHAPES, ids=lambda s: s.name)
def test_similarity_graph(benchmark, shape, backend):
    if reason := skip_reason(shape):
        pytest.skip(reason)
    calls = []
    for i in input_copies(shape, DEVICE):
        order = rank_order(debiased_scores(i.attn, i.prior))
        calls.append(lambda x=i.tokens, o=order: similarity_graph(
            x, o, shape.n_pivots, shape.grid, temporal_radius=shape.temporal_radius,
            backend=backend))
    run_benchmark(benchmark, "graph", shape, backend, calls,
                  slow=backend == "reference" or interpreting(), candidates=shape.candidates)
