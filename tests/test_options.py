"""PruneOptions (d2pruner_kernels/options.py): every option of prune() written once, checked
once, and the keyword signatures of the entry points made from it."""
from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

import d2pruner_kernels as d2p
from d2pruner_kernels.checks import resolve_k
from d2pruner_kernels.options import OPTION_NAMES, PruneOptions
from d2pruner_kernels.stages import GRAPH_OPTIONS

FIELDS = {f.name: f.default for f in dataclasses.fields(PruneOptions)}


@pytest.mark.parametrize("fn, names", [(d2p.prune, OPTION_NAMES),
                                       (d2p.prune_varlen, OPTION_NAMES),
                                       (d2p.similarity_graph, GRAPH_OPTIONS)])
def test_entry_point_signatures_are_made_from_the_class(fn, names):
    params = inspect.signature(fn).parameters
    keyword = {n: p.default for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
    assert keyword.pop("options") is None
    assert keyword == {n: FIELDS[n] for n in names}


def test_options_object_and_keywords_select_the_same():
    g = torch.Generator().manual_seed(3)
    x, a = torch.randn(2, 35, 12, generator=g), torch.rand(2, 3, 35, generator=g)
    prior = torch.rand(35, generator=g) + 0.5
    kw = dict(prior=prior, pivot_ratio=0.5, sim_threshold=0.3, spatial_weight=0.5, radius=1)
    want = d2p.prune(x, a, (5, 7), 9, **kw)
    assert torch.equal(d2p.prune(x, a, (5, 7), 9, options=PruneOptions(**kw)), want)
    # keywords win over the object's fields
    other = PruneOptions(**{**kw, "sim_threshold": -1.0})
    assert torch.equal(d2p.prune(x, a, (5, 7), 9, options=other, sim_threshold=0.3), want)
    assert not torch.equal(d2p.prune(x, a, (5, 7), 9, options=other), want)


@pytest.mark.parametrize("field, value, error, match", [
    ("pivot_ratio", 1.5, ValueError, r"pivot_ratio must be in \[0.0, 1.0\], got 1.5"),
    ("sim_threshold", float("nan"), ValueError, r"sim_threshold must be in \[-1.0, 1.0\]"),
    ("spatial_weight", "0.5", TypeError, r"spatial_weight must be a float, got str"),
    ("radius", -1, ValueError, r"radius must be >= 0, got -1"),
    ("temporal_radius", 1.0, TypeError, r"temporal_radius must be an int, got float"),
    ("eps", -1e-9, ValueError, r"eps must be in \[0.0, inf\]"),
    ("check_finite", 1, TypeError, r"check_finite must be a bool, got int 1"),
    ("backend", "cuda", ValueError, r"backend must be one of \('auto', 'reference', 'kernels'\)"),
    ("fusion", "or", ValueError, r"fusion must be one of \('weighted', 'binarized'\), got 'or'"),
    ("prior", [1.0], TypeError, r"prior must be None, a tensor or a PositionalPrior, got list"),
])
def test_each_field_is_checked_where_the_object_is_made_naming_it(field, value, error, match):
    with pytest.raises(error, match=match):
        PruneOptions(**{field: value})
    with pytest.raises(error, match=match):       # and where a copy changes it
        PruneOptions().replace(**{field: value})
    x, a = torch.rand(1, 6, 4), torch.rand(1, 6)
    with pytest.raises(error, match=match):       # and at prune()'s door
        d2p.prune(x, a, (2, 3), 2, **{field: value})


def test_misuse_of_the_object_itself():
    with pytest.raises(TypeError, match=r"unknown prune option\(s\) 'pivots'; prune\(\) takes prior"):
        d2p.prune(torch.rand(6, 4), torch.rand(6), (2, 3), 2, pivots=3)
    with pytest.raises(TypeError, match=r"similarity_graph\(\) takes sim_threshold"):
        d2p.similarity_graph(torch.rand(1, 6, 4), torch.arange(6)[None], 2, (2, 3), eps=0.1)
    with pytest.raises(TypeError, match=r"options must be a PruneOptions, got dict"):
        d2p.prune(torch.rand(6, 4), torch.rand(6), (2, 3), 2, options={"radius": 1})
    with pytest.raises(TypeError):                # fields are keywords only
        PruneOptions(0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        PruneOptions().radius = 3


def test_normalised_once():
    o = PruneOptions(pivot_ratio=1, radius=2**70)
    assert o.pivot_ratio == 1.0 and type(o.pivot_ratio) is float and o.radius == 2**31 - 1
    assert o.replace(radius=2**80).radius == 2**31 - 1
    assert PruneOptions(sim_threshold=0.5) == PruneOptions().replace(sim_threshold=0.5)


@pytest.mark.parametrize("k, n, at_most, want", [
    (5, 9, False, 5), (9, 9, False, 9), (12, 9, True, 9), (0.5, 9, False, 5), (0.01, 9, True, 1),
    (1.0, 7, False, 7),
])
def test_resolve_k_is_one_rule(k, n, at_most, want):
    assert resolve_k(k, n, at_most=at_most) == want


@pytest.mark.parametrize("k, error, match", [
    (10, ValueError, r"k must be in \[1, N=9\], got 10"), (0, ValueError, r"k must be in \[1, N=9\], got 0"),
    (1.5, ValueError, r"k as a ratio must be in \(0, 1\], got 1.5"), (True, TypeError, "got bool"),
    ("3", TypeError, "got str"),
])
def test_resolve_k_misuse(k, error, match):
    with pytest.raises(error, match=match):
        resolve_k(k, 9)
    if k != 10:  # at_most only lifts the upper bound
        with pytest.raises(error, match=match):
            resolve_k(k, 9, at_most=True)


@pytest.mark.parametrize("beta, rule", [
    (0.3, lambda similar, near: similar),           # the semantic term alone decides
    (0.5, lambda similar, near: similar & near),    # "spatial neighbour AND cos > theta"
    (0.7, lambda similar, near: near),              # the spatial term alone decides
])
@pytest.mark.parametrize("backend", ["auto", "reference", "kernels"])
def test_binarized_fusion_is_the_other_reading(beta, rule, backend):
    """fusion="binarized": (1 - beta) [cos > theta] + beta [near] > 0.5 (docs/spec.md §12),
    held to the edges computed here by hand, and prune() to the greedy walk over them."""
    g = torch.Generator().manual_seed(int(beta * 10))
    x = torch.randn(1, 30, 8, generator=g) + 1.5 * torch.randn(1, 1, 8, generator=g)
    order = torch.randperm(30, generator=g)[None]
    opts = PruneOptions(spatial_weight=beta, sim_threshold=0.7, radius=1, fusion="binarized",
                        backend=backend)
    graph = d2p.similarity_graph(x, order, 0, (5, 6), options=opts)
    xn = torch.nn.functional.normalize(x[0].double(), dim=-1)
    cand = order[0]
    cos = (xn @ xn.T)[cand][:, cand]
    yx = torch.stack([cand // 6, cand % 6], 1)
    near = ((yx[:, None] - yx[None]).abs() <= 1).all(-1)
    want = rule(cos > 0.7, near) & ~torch.eye(30, dtype=torch.bool)
    assert want.any() and not want.all()
    assert torch.equal(d2p.layout.unpack_lower(graph, 30)[0], torch.tril(want, -1))
    weighted = d2p.similarity_graph(x, order, 0, (5, 6), options=opts.replace(fusion="weighted"))
    if beta == 0.5:  # at beta = 0.5 the weighted rule is "near AND cos >= 0.4": other edges
        assert not torch.equal(graph, weighted)
