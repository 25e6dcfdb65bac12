"""Stages 5-7 (greedy MIS, fill, output): the compiled MIS against the reference walk.

"compiled" is the CUDA Luby-rounds kernel on a GPU (what prune() runs there), its C++ twin
on CPU (prune(backend='kernels') under the Triton interpreter). The Luby rounds each image
took go into extra_info.
"""
import pytest

from d2pruner_kernels import debiased_scores, greedy_mis, rank_order, similarity_graph
from d2pruner_kernels.kernels import mis as mis_kernel

from .harness import DEVICE, run_benchmark, skip_reason
from .shapes import ALL_SHAPES, input_copies


def graphs(shape):
    """(packed adjacency, rank order) for each input copy, built by prune()'s own stages."""
    out = []
    for i in input_copies(shape, DEVICE):
        order = rank_order(debiased_scores(i.attn, i.prior))
        adj = similarity_graph(i.tokens, order, shape.n_pivots, shape.grid,
                               temporal_radius=shape.temporal_radius)
        out.append((adj, order))
    return out


@pytest.mark.parametrize("variant", ["compiled", "reference"])
@pytest.mark.parametrize("shape", ALL_SHAPES, ids=lambda s: s.name)
def test_greedy_mis(benchmark, shape, variant):
    if reason := skip_reason(shape):
        pytest.skip(reason)
    if variant != "reference" and not mis_kernel.extension_available():
        pytest.skip("d2pruner_kernels._C is not built")
    k, n_pivots = shape.k_int, shape.n_pivots
    inputs = graphs(shape)
    if variant == "reference":
        calls = [lambda a=a, o=o: greedy_mis(a, o, n_pivots, k, backend="reference")
                 for a, o in inputs]
    else:
        calls = [lambda a=a, o=o: mis_kernel.greedy_mis(a, o, n_pivots, k) for a, o in inputs]
    rounds = [mis_kernel.greedy_mis(a, o, n_pivots, k, return_rounds=True)[1]
              for a, o in inputs] if mis_kernel.extension_available() else []
    luby = [int(r) for per_copy in rounds for r in per_copy.tolist()]
    run_benchmark(benchmark, "mis", shape, variant, calls, slow=variant == "reference",
                  luby_rounds_max=max(luby, default=None),
                  luby_rounds_mean=sum(luby) / len(luby) if luby else None)
