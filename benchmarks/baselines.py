"""Peer-style baselines, written from the published algorithms (no code copied).

Each is a plain function of one image, the way the peers run:

    f(tokens [N, D], attn [N] or [H, N], k, ...) -> int64 [k] kept token indices, ascending

and loops in Python over its budget or candidates, as the published methods do. They run on
the device of their inputs. `naive_d2pruner` is D2Pruner written the way its authors' style
suggests (dense N x N similarity, a Python greedy loop) and must select exactly what
`prune(backend="reference")` selects; the other three are different methods, timed for
scale only.
"""
from __future__ import annotations

import math

import torch


def _importance(attn: torch.Tensor) -> torch.Tensor:
    """Mean over heads in float32, [N]."""
    a = attn.float()
    return a.mean(dim=0) if a.dim() == 2 else a


def _unit_rows(tokens: torch.Tensor) -> torch.Tensor:
    x = tokens.float()
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)


def _ascending(indices, device) -> torch.Tensor:
    return torch.sort(torch.as_tensor(list(indices), dtype=torch.int64, device=device)).values


def naive_d2pruner(tokens, attn, grid, k, *, prior=None, pivot_ratio=0.7, sim_threshold=0.8,
                   spatial_weight=0.0, radius=2, temporal_radius=1, eps=1e-7):
    """D2Pruner (Zhang et al., AAAI 2026) step by step (docs/spec.md): debias, take pivots, build
    the dense N x N hybrid graph, walk the candidates greedily in Python."""
    n = tokens.shape[0]
    device = tokens.device
    # Steps 1-3: debiased score, rank order (stable: ties to the smaller index), pivots.
    score = _importance(attn)
    if prior is not None:
        score = score / (prior.float() + eps)
    score = torch.where(torch.isnan(score), float("-inf"), score)
    order = torch.sort(score, descending=True, stable=True).indices
    n_pivots = min(k, max(0, math.floor(pivot_ratio * k + 1e-6)))
    pivots, candidates = order[:n_pivots].tolist(), order[n_pivots:].tolist()
    # Step 4: dense hybrid similarity between all tokens (pivot rows are simply never read).
    x = _unit_rows(tokens)
    cos = x @ x.T
    width, height = grid[-1], grid[-2]
    i = torch.arange(n, device=device)
    t, y, xx = i // (height * width), (i // width) % height, i % width
    near = lambda c, r: (c[:, None] - c[None, :]).abs() <= r  # noqa: E731
    spatial = (near(y, radius) & near(xx, radius) & near(t, temporal_radius)).float()
    adjacent = (1 - spatial_weight) * cos + spatial_weight * spatial >= sim_threshold
    # Step 5: greedy walk in rank order; a pick removes its neighbours.
    m = k - n_pivots
    removed = torch.zeros(n, dtype=torch.bool, device=device)
    selected = []
    for idx in candidates:
        if len(selected) == m:
            break
        if removed[idx]:
            continue
        selected.append(idx)
        removed |= adjacent[idx]
    # Step 6: fill with unselected candidates in rank order.
    taken = set(selected)
    fill = [c for c in candidates if c not in taken][: m - len(selected)]
    return _ascending(pivots + selected + fill, device)


def divprune(tokens, attn, k):
    """DivPrune (Alvar et al., CVPR 2025): greedy max-min diversity on the cosine distance
    1 - cos. First the token farthest from its nearest neighbour, then repeatedly the token
    whose distance to the chosen set (its nearest chosen token) is largest. Ignores attn."""
    x = _unit_rows(tokens)
    dist = 1.0 - x @ x.T
    n = dist.shape[0]
    self_mask = torch.eye(n, dtype=torch.bool, device=dist.device)
    first = int(dist.masked_fill(self_mask, float("inf")).min(dim=1).values.argmax())
    chosen = [first]
    to_set = dist[first].clone()             # distance of each token to its nearest choice
    to_set[first] = float("-inf")
    for _ in range(k - 1):
        j = int(to_set.argmax())
        chosen.append(j)
        to_set = torch.minimum(to_set, dist[j])
        to_set[chosen] = float("-inf")       # never pick a token twice (duplicates have d=0)
    return _ascending(chosen, tokens.device)


def cdpruner(tokens, attn, k, *, eps=1e-10):
    """CDPruner (Zhang et al., 2025): MAP of a conditional DPP with kernel
    L = diag(q) S diag(q), S the cosine similarity, q the relevance (here the attention mean,
    scaled to max 1; a scale does not change the greedy picks). Greedy MAP by the incremental
    Cholesky update of Chen, Zhang & Zhou (NeurIPS 2018): keep c_i and d_i^2, the marginal
    gain of each item; pick argmax d_i^2, update with e = (L_j - c_j . c) / d_j.
    When the kernel's rank runs out (d^2 <= eps) the rest is filled by relevance."""
    x = _unit_rows(tokens)
    q = _importance(attn)
    q = q / q.max().clamp_min(1e-30)
    kernel = q[:, None] * (x @ x.T) * q[None, :]
    n = kernel.shape[0]
    c = torch.zeros(k, n, device=kernel.device)
    d2 = kernel.diagonal().clone()
    chosen = []
    for i in range(k):
        j = int(d2.argmax())
        if d2[j] <= eps:  # no gain left: the DPP cannot grow, fill by relevance below
            break
        chosen.append(j)
        e = (kernel[j] - c[:i, j] @ c[:i]) / d2[j].sqrt()
        c[i] = e
        d2 = d2 - e * e
        d2[chosen] = float("-inf")
    if len(chosen) < k:
        taken = set(chosen)
        by_relevance = torch.sort(q, descending=True, stable=True).indices.tolist()
        chosen += [t for t in by_relevance if t not in taken][: k - len(chosen)]
    return _ascending(chosen, tokens.device)


def dart(tokens, attn, k, *, n_pivots=8):
    """DART (Wen et al., 2025), duplication-aware pruning: a few pivots (the top tokens by
    attention), then for each pivot the tokens least similar to it (its share of the budget),
    skipping tokens already kept."""
    n_pivots = min(n_pivots, k)
    score = _importance(attn)
    pivots = torch.sort(score, descending=True, stable=True).indices[:n_pivots].tolist()
    kept = list(pivots)
    taken = set(kept)
    x = _unit_rows(tokens)
    share = math.ceil((k - n_pivots) / max(n_pivots, 1))
    for p in pivots:
        least_similar = torch.argsort(x @ x[p], stable=True).tolist()
        added = 0
        for t in least_similar:
            if added == share or len(kept) == k:
                break
            if t not in taken:
                kept.append(t)
                taken.add(t)
                added += 1
    return _ascending(kept, tokens.device)


def run_batched(fn, tokens, attn, *args, **kwargs) -> torch.Tensor:
    """The peers take one image: loop over the batch. tokens [B, N, D], attn [B, ...]."""
    return torch.stack([fn(tokens[b], attn[b], *args, **kwargs) for b in range(tokens.shape[0])])
