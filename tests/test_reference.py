"""The reference against cases worked on paper, the special cases of docs/spec.md, and the defining
invariants of the selection on many random clustered inputs."""
import math

import torch
from hypothesis import assume, given, settings, strategies as st

from d2pruner_kernels import prune, reference
from d2pruner_kernels.options import PruneOptions
from helpers import band_margin, clustered_tokens, distinct_attention, fused_similarity64

# 3x3 grid, token t at (t // 3, t % 3). Scores rank the tokens 4, 0, 1, 2, 8, 3, 5, 6, 7.
RANKED = [4, 0, 1, 2, 8, 3, 5, 6, 7]
ATTN = torch.zeros(9)
ATTN[RANKED] = torch.linspace(0.9, 0.1, 9)


def features(rows: dict[int, tuple[float, float, float]]) -> torch.Tensor:
    x = torch.tensor([[0.3, -0.2, 0.1]] * 9)  # filler rows, overwritten below
    for t, v in rows.items():
        x[t] = torch.tensor(v)
    return x


def run(x, k, **kw):
    return prune(x, ATTN, (3, 3), k, backend="reference", **kw).tolist()


def test_pivots_then_a_blocked_candidate_then_a_pick():
    # k=4, rho=0.5 -> pivots 4, 0; m = 2. Token 1 is taken; 2 is cos~0.995 to 1 (blocked);
    # 8 is orthogonal to 1 (taken). Pivot 0 equals token 1 but pivots never block.
    x = features({4: (1, 1, 1), 0: (1, 0, 0), 1: (1, 0, 0), 2: (1, 0.1, 0), 8: (0, 1, 0)})
    assert run(x, 4, pivot_ratio=0.5) == [0, 1, 4, 8]


def test_fill_when_the_mis_is_smaller_than_m():
    # k=8, rho=0.25 -> pivots 4, 0; m = 6. Candidates 1, 2, 8, 3, 5, 6, 7: 1~2 similar,
    # 3, 5, 6, 7 a clique, 8 alone. Walk takes 1, 8, 3 (3 < m), fill takes 2, 5, 6.
    c = (0.1, 0.1, 1.0)
    x = features({1: (1, 0, 0), 2: (1, 0.1, 0), 8: (0, 1, 0), 3: c, 5: c, 6: c, 7: c})
    assert run(x, 8, pivot_ratio=0.25) == [0, 1, 2, 3, 4, 5, 6, 8]


def test_spatial_term_blocks_grid_neighbours():
    # Identical features (cos = 1) and beta = 0.5: f = 0.5 + 0.5 * sp, edge iff the tokens
    # are within Chebyshev radius. Rank = token order. r=1: walk takes 0, 2, 6, 8, fill 1.
    x = torch.ones(9, 4)
    attn = torch.linspace(1.0, 0.1, 9)
    out = prune(x, attn, (3, 3), 5, pivot_ratio=0.0, spatial_weight=0.5, radius=1,
                backend="reference")
    assert out.tolist() == [0, 1, 2, 6, 8]
    out = prune(x, attn, (3, 3), 5, pivot_ratio=0.0, spatial_weight=0.5, radius=2,
                backend="reference")
    assert out.tolist() == [0, 1, 2, 3, 4]  # everything adjacent: walk takes 0, fill 1-4


def test_temporal_radius_on_a_3d_grid():
    # Two frames of 1x3, identical features, beta=0.5, r=1.
    x, attn = torch.ones(6, 4), torch.linspace(1.0, 0.1, 6)
    kw = dict(pivot_ratio=0.0, spatial_weight=0.5, radius=1, backend="reference")
    # Frames apart (temporal_radius=0): takes 0, 2 in frame 0 and 3, 5 in frame 1.
    assert prune(x, attn, (2, 1, 3), 4, temporal_radius=0, **kw).tolist() == [0, 2, 3, 5]
    # Frames adjacent: 3, 4, 5 touch 0 or 2 -> picks 0, 2, fill 1, 3.
    assert prune(x, attn, (2, 1, 3), 4, temporal_radius=1, **kw).tolist() == [0, 1, 2, 3]


def test_k_equal_n_keeps_everything():
    g = torch.Generator().manual_seed(1)
    x, a = clustered_tokens(2, 30, 8, generator=g), distinct_attention(2, 3, 30, generator=g)
    for rho in (0.0, 0.7, 1.0):
        out = prune(x, a, (5, 6), 30, pivot_ratio=rho, backend="reference")
        assert torch.equal(out, torch.arange(30).expand(2, 30))


def test_rho_one_is_top_k_of_the_debiased_score():
    g = torch.Generator().manual_seed(2)
    x, a = clustered_tokens(3, 48, 8, generator=g), distinct_attention(3, 4, 48, generator=g)
    prior = torch.rand(48, generator=g) + 0.5
    out = prune(x, a, (6, 8), 11, prior=prior, pivot_ratio=1.0, backend="reference")
    s = a.mean(1) / (prior + 1e-7)
    assert torch.equal(out, s.topk(11, dim=1).indices.sort(dim=1).values)


def test_rho_zero_is_the_greedy_mis_from_the_best_token():
    g = torch.Generator().manual_seed(3)
    x, a = clustered_tokens(1, 40, 16, generator=g), distinct_attention(1, 1, 40, generator=g)
    out = prune(x[0], a[0, 0], (5, 8), 5, pivot_ratio=0.0, backend="reference")
    assert int(a[0, 0].argmax()) in out.tolist()  # the best token is the first pick
    check_selection(out, x[0], a[0], (1, 5, 8), 5, rho=0.0, theta=0.8, beta=0.0, radius=2)


def test_all_nan_attention_ranks_by_index():
    x = clustered_tokens(1, 16, 4, generator=torch.Generator().manual_seed(4))[0]
    attn = torch.full((2, 16), float("nan"))
    assert prune(x, attn, (4, 4), 5, pivot_ratio=1.0, backend="reference").tolist() == [0, 1, 2, 3, 4]


def test_nan_scores_rank_last_and_ties_go_to_the_smaller_index():
    attn = torch.tensor([0.5, float("nan"), 0.5, 0.9, 0.5, float("nan")])
    s = reference.debiased_scores(attn[None])
    assert reference.rank_order(s)[0].tolist() == [3, 0, 2, 4, 1, 5]


def test_negative_zero_scores_tie_with_zero():
    s = reference.debiased_scores(torch.tensor([[0.0, -0.0, 0.0]]) * torch.tensor([1.0, 1.0, -1.0]))
    assert reference.rank_order(s)[0].tolist() == [0, 1, 2]
    assert not torch.signbit(s).any()


def test_zero_and_nan_features():
    # A zero vector has cosine 0 with everyone; a NaN vector has no edges at all.
    x = torch.ones(4, 3)
    x[1] = 0.0
    x[2, 0] = float("nan")
    order = torch.arange(4)[None]
    edges = reference.similarity_edges(x[None], order, 0, (1, 2, 2), PruneOptions(sim_threshold=0.5))[0]
    assert edges.tolist() == [[False, False, False, True], [False] * 4, [False] * 4,
                              [True, False, False, False]]


# ---- invariants on random clustered inputs ---------------------------------------------

def float64_edges(x, order, n_p, grid, theta, beta, radius):
    f = fused_similarity64(x[None], order[None], n_p, grid, beta, radius)[0]
    return (f >= theta) & ~torch.eye(f.shape[0], dtype=torch.bool)


def check_selection(out, x, attn, grid, k, rho, theta, beta, radius):
    n = x.shape[0]
    kept = out.tolist()
    assert len(kept) == k and kept == sorted(set(kept)) and 0 <= kept[0] and kept[-1] < n
    order = torch.sort(attn.mean(0), descending=True, stable=True).indices
    n_p = math.floor(rho * k + 1e-6)
    assert set(order[:n_p].tolist()) <= set(kept), "pivots are the top floor(rho*k) tokens"
    edges = float64_edges(x, order, n_p, grid, theta, beta, radius)
    pos = {int(t): i for i, t in enumerate(order[n_p:].tolist())}
    picks = sorted(pos[t] for t in kept if t in pos)  # kept candidates, rank positions
    # Members: kept candidates with no edge to a better-ranked member (by induction).
    members = []
    for p in picks:
        if not any(edges[p, q] for q in members):
            members.append(p)
    fill = [p for p in picks if p not in members]
    if not fill:  # the walk found m members: greedy property up to the last pick
        for c in range(picks[-1] if picks else 0):
            if c not in members:
                assert any(edges[c, q] for q in members if q < c), f"candidate {c} skipped"
    else:  # the MIS is exhausted: maximal over all candidates, fill in rank order
        for c in range(len(pos)):
            if c not in members:
                assert any(edges[c, q] for q in members if q < c), f"candidate {c} skipped"
        non_members = [c for c in range(len(pos)) if c not in members]
        assert fill == non_members[: len(fill)]
    return bool(fill)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), h=st.integers(3, 12), w=st.integers(3, 12),
       k_frac=st.floats(0.05, 1.0), rho=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
       beta=st.sampled_from([0.0, 0.5]), radius=st.integers(0, 2))
def test_invariants_on_random_clustered_inputs(seed, h, w, k_frac, rho, beta, radius):
    g = torch.Generator().manual_seed(seed)
    n, theta = h * w, 0.8
    x = clustered_tokens(1, n, 24, clusters=8, generator=g)[0]
    attn = distinct_attention(1, 4, n, generator=g)[0]
    k = max(1, round(k_frac * n))
    order = torch.sort(attn.mean(0), descending=True, stable=True).indices
    n_p = math.floor(rho * k + 1e-6)
    # no pair inside the parity band, where float64 and float32 may disagree
    assume(band_margin(x[None], order[None], n_p, (1, h, w), theta, beta, radius) >= 1e-5)
    out = prune(x, attn, (h, w), k, pivot_ratio=rho, sim_threshold=theta,
                spatial_weight=beta, radius=radius, backend="reference")
    check_selection(out, x, attn, (1, h, w), k, rho, theta, beta, radius)


def test_invariant_checker_sees_both_walks_and_fills():
    """The inputs above exercise both branches of check_selection (so neither is dead)."""
    seen = set()
    g = torch.Generator().manual_seed(5)
    for k in (4, 40, 90):
        x = clustered_tokens(1, 100, 24, clusters=8, generator=g)[0]
        attn = distinct_attention(1, 2, 100, generator=g)[0]
        out = prune(x, attn, (10, 10), k, pivot_ratio=0.3, backend="reference")
        seen.add(check_selection(out, x, attn, (1, 10, 10), k, 0.3, 0.8, 0.0, 2))
    assert seen == {False, True}


def test_batched_equals_unbatched():
    g = torch.Generator().manual_seed(6)
    x, a = clustered_tokens(4, 35, 12, generator=g), distinct_attention(4, 3, 35, generator=g)
    prior = torch.rand(4, 35, generator=g) + 0.5
    out = prune(x, a, (5, 7), 9, prior=prior, spatial_weight=0.5, backend="reference")
    for b in range(4):
        one = prune(x[b], a[b], (5, 7), 9, prior=prior[b], spatial_weight=0.5, backend="reference")
        assert torch.equal(out[b], one)
