"""The benchmark baselines (benchmarks/baselines.py): the naive D2Pruner must select exactly
what our reference backend selects; the peers get sanity checks of their published rules."""
import math

import pytest
import torch

from d2pruner_kernels import prune
from d2pruner_kernels.checks import pivot_count
from d2pruner_kernels.testing import band_free, clustered_tokens, distinct_attention

from benchmarks import baselines

THETA = 0.8


def draw(seed, grid, d, k, beta, temporal_radius, heads=3, pivot_ratio=0.7):
    """Clustered tokens, distinct attention and a positive prior, outside the parity band."""
    n = math.prod(grid)

    def one(attempt):
        g = torch.Generator().manual_seed(1000 * seed + attempt)
        return (clustered_tokens(1, n, d, generator=g),
                distinct_attention(1, heads, n, generator=g), 0.5 + torch.rand(n, generator=g))
    tokens, attn, prior = band_free(one, pivot_count(pivot_ratio, k), grid, beta,
                                    temporal_radius=temporal_radius, theta=THETA)
    return tokens[0], attn[0], prior


CASES = [  # grid, D, k, temporal_radius
    ((8, 8), 32, 16, 1),
    ((8, 8), 32, 1, 1),
    ((12, 12), 64, 40, 1),
    ((7, 10), 48, 70, 1),       # k = N keeps everything
    ((3, 5, 6), 32, 24, 1),     # video grid
    ((4, 6, 6), 32, 30, 0),     # tiles: frames are not neighbours
]


@pytest.mark.parametrize("beta", [0.0, 0.5])
@pytest.mark.parametrize("grid, d, k, temporal_radius", CASES)
def test_naive_d2pruner_matches_reference(grid, d, k, temporal_radius, beta):
    for seed in range(3):
        tokens, attn, prior = draw(seed, grid, d, k, beta, temporal_radius)
        options = dict(prior=prior, spatial_weight=beta, temporal_radius=temporal_radius)
        ours = prune(tokens, attn, grid, k, backend="reference", **options)
        naive = baselines.naive_d2pruner(tokens, attn, grid, k, **options)
        assert naive.dtype == torch.int64
        assert torch.equal(naive, ours), (seed, naive.tolist(), ours.tolist())


@pytest.mark.parametrize("pivot_ratio", [0.0, 1.0])
def test_naive_d2pruner_pivot_extremes(pivot_ratio):
    tokens, attn, prior = draw(7, (8, 8), 32, 20, 0.0, 1, pivot_ratio=pivot_ratio)
    ours = prune(tokens, attn, (8, 8), 20, prior=prior, pivot_ratio=pivot_ratio,
                 backend="reference")
    naive = baselines.naive_d2pruner(tokens, attn, (8, 8), 20, prior=prior,
                                     pivot_ratio=pivot_ratio)
    assert torch.equal(naive, ours)


PEERS = {
    "divprune": lambda x, a, k: baselines.divprune(x, a, k),
    "cdpruner": lambda x, a, k: baselines.cdpruner(x, a, k),
    "dart": lambda x, a, k: baselines.dart(x, a, k),
}


@pytest.mark.parametrize("name", sorted(PEERS))
@pytest.mark.parametrize("n, d, k", [(64, 32, 1), (64, 32, 16), (64, 16, 40), (30, 8, 30)])
def test_peer_keeps_k_unique_indices(name, n, d, k):
    g = torch.Generator().manual_seed(n + k)
    tokens = clustered_tokens(1, n, d, generator=g)[0]
    attn = distinct_attention(1, 4, n, generator=g)[0]
    kept = PEERS[name](tokens, attn, k)
    assert kept.dtype == torch.int64 and kept.shape == (k,)
    assert torch.equal(kept, torch.sort(kept).values)
    assert kept.unique().numel() == k and 0 <= int(kept.min()) and int(kept.max()) < n


def _angles(*degrees):
    r = torch.tensor(degrees, dtype=torch.float64).deg2rad()
    return torch.stack([r.cos(), r.sin()], dim=1).float()


def test_divprune_first_pick_and_max_min_hand_case():
    tokens = _angles(0, 10, 20, 90)  # 90 degrees is the most isolated token
    attn = torch.ones(4)
    assert baselines.divprune(tokens, attn, 1).tolist() == [3]
    assert baselines.divprune(tokens, attn, 2).tolist() == [0, 3]       # farthest from 90
    assert baselines.divprune(tokens, attn, 3).tolist() == [0, 2, 3]    # 20 is farther than 10


def test_divprune_each_pick_maximises_the_min_distance():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(40, 8, generator=g)
    x = tokens / tokens.norm(dim=1, keepdim=True)
    dist = 1 - x @ x.T
    previous = set(baselines.divprune(tokens, torch.ones(40), 1).tolist())
    for k in range(2, 12):
        current = set(baselines.divprune(tokens, torch.ones(40), k).tolist())
        assert previous < current and len(current - previous) == 1  # greedy: nested sets
        new = (current - previous).pop()
        to_set = dist[:, sorted(previous)].min(dim=1).values
        others = [t for t in range(40) if t not in current]
        assert to_set[new] >= to_set[others].max() - 1e-6
        previous = current


def test_cdpruner_picks_by_relevance_when_similarities_are_equal():
    n = 12
    g = torch.Generator().manual_seed(5)
    relevance = torch.rand(n, generator=g)
    top = torch.sort(relevance, descending=True).indices
    orthogonal = torch.eye(n)             # all off-diagonal similarities 0
    identical = torch.ones(n, 4)          # all similarities 1
    for tokens in (orthogonal, identical):
        assert baselines.cdpruner(tokens, relevance, 1).tolist() == [int(top[0])]
    # Orthogonal features: the DPP gain of a token is its relevance squared.
    assert baselines.cdpruner(orthogonal, relevance, 5).tolist() == sorted(top[:5].tolist())


def test_cdpruner_prefers_diverse_tokens():
    tokens = _angles(0, 1, 90)            # two near-duplicates and an orthogonal token
    relevance = torch.tensor([1.0, 0.99, 0.9])
    assert baselines.cdpruner(tokens, relevance, 2).tolist() == [0, 2]


def test_dart_keeps_its_pivots():
    g = torch.Generator().manual_seed(9)
    tokens = clustered_tokens(1, 100, 16, generator=g)[0]
    attn = distinct_attention(1, 2, 100, generator=g)[0]
    pivots = torch.topk(attn.mean(0), 8).indices
    kept = baselines.dart(tokens, attn, 24)
    assert set(pivots.tolist()) <= set(kept.tolist())
