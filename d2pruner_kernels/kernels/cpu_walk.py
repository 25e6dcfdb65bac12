"""Steps 4-7 (docs/spec.md) on a CPU without building the candidate graph.

    greedy_mis_without_graph(tokens, order, n_pivots, k, grid, params) -> int64 [B, k]

(ascending) computes exactly what the reference's `greedy_mis(similarity_graph(...))`
computes, hence the name: pivots = order[:, :n_pivots]; the greedy walk over the candidates
order[:, n_pivots:] in rank order, taking a candidate unless an edge

    f_ij = (1 - beta) * cos_ij + beta * near_ij >= theta      (float32, NaN: no edge)

joins it to a member already taken, stopping at m = k - n_pivots members; the fill (first
untaken candidates in rank order); the union, sorted. fusion="binarized" reads the edge as
(1 - beta) [cos > theta] + beta [near] > 0.5 (reference/graph.py, binarized_edges). near is
the (T, H, W) test on the grid's coordinates, or on a TokenLayout's table
(TokenLayout.coords: pieces apart along t, so "same piece and near" is the same test).

The walk only ever asks "does candidate v touch a member?", and there are at most m members,
so it needs each visited candidate's cosines to the members, never the C x C graph. They are
computed a window of candidates at a time, all images of the batch in lockstep:

1. gather the window's rows (rank order), upcast to float32, normalise them;
2. cosines to the members so far: one batched GEMM [A, W, D] x [A, D, M]; a candidate with an
   edge to a member is blocked for good (members only ever come from earlier windows here);
3. compact the survivors, cosines among them: a second, smaller GEMM [A, S, D] x [A, D, S];
4. C++ (`_C.walk_window_cpu`) walks the survivors in rank order against the members taken
   in this window, and appends the new members (unit rows, coordinates, rank position);
5. images with m members leave; the next window starts where this one ended.

Window policy (tuned on clustered inputs, where the walk visits ~1.1-1.3 m candidates): the
first window holds ceil(1.125 m) + 16 candidates, so a walk that takes most candidates ends
in it; each later one is sized from the image's acceptance so far, 1.125 * (members still
needed) * (visited / members) + 16, the largest over the active images. A near-clique
(everything blocked by the first member) thus jumps to large windows with few survivors,
costing about D multiply-adds per candidate. Memory: a window holds at most 2^24 floats of rows +
member cosines (at least 256 candidates) and 2m + 64 survivors (capped near 4096 / sqrt(B);
the window then ends at that survivor), so the extra memory is O(B N D + B N m), never O(N^2).
"""
from __future__ import annotations

import math

import torch

from ..checks import as_3d
from ..token_layout import TokenLayout, coords_table

try:
    from .. import _C
except ImportError:  # extension not built
    _C = None

# Memory caps (floats over the batch) and their floors; tests shrink them to force windows.
_WINDOW_FLOATS = 1 << 24    # rows + cosines to members of one window
_MIN_WINDOW = 256
_SURVIVOR_FLOATS = 1 << 24  # the survivors' cosine matrix
_MIN_SURVIVORS = 1024
# Window sizes: slack x (expected candidates to visit) + pad (see the module docstring).
_SLACK, _PAD = 1.125, 16
_SPLIT = 96  # survivors from which their cosines are computed as a block triangle


def available() -> bool:
    return _C is not None and hasattr(_C, "walk_window_cpu")


def _row_source(tokens):
    """tokens as [B*N, D] rows when that is a view (index_select then gathers), else None."""
    b, n, d = tokens.shape
    if b == 1 or tokens.stride(0) == n * tokens.stride(1):
        return tokens.as_strided((b * n, d), (tokens.stride(1), tokens.stride(2)))
    return None


def _unit_rows(tokens, flat, image, ids):
    """Float32 rows tokens[image[a], ids[a, w]] / max(norm, 1e-12): [A, W, D], a fresh tensor
    (the reference's x_hat, row for row)."""
    if flat is not None:
        x = flat.index_select(0, (ids + image.unsqueeze(1) * tokens.shape[1]).view(-1))
        x = x.view(*ids.shape, tokens.shape[2])
    else:
        x = tokens[image.unsqueeze(1), ids]
    x = x.float()  # a copy already (or its upcast): normalised in place
    return x.div_(torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(1e-12))


def _coords(ids, grid):
    """(t, y, x) of token ids, int64 [..., 3]: on the row-major (T, H, W) grid, or rows of
    a TokenLayout's coordinate table (int64 [N, 3]) when `grid` is that table."""
    if isinstance(grid, torch.Tensor):
        return grid[ids]
    _, h, w = grid
    return torch.stack((ids // (h * w), ids // w % h, ids % w), dim=-1)


def fusion_rule(params) -> str:
    """The resolver's edge rule (a key of _C.walk_fusions, csrc/walk_cpu.h): "weighted", or
    the binarized reading by beta: cos > theta (beta < 0.5), and near (beta == 0.5), near
    alone (beta > 0.5), as reference/graph.py's binarized_edges decides it."""
    if params.fusion == "weighted":
        return "weighted"
    beta = params.spatial_weight
    return "near" if beta > 0.5 else "similar_and_near" if beta == 0.5 else "similar"


def _blocked(x, ids, members, mcoords, count, m_max, grid, params, limits, rule):
    """bool [A, W]: window candidates with an edge to a member of an earlier window.
    Member rows past an image's count are NaN (no edge by the cosine); the rule "near" reads
    no cosine and masks them by `count`."""
    if rule == "weighted" or rule == "similar":
        f = torch.bmm(x, members[:, :m_max].transpose(1, 2))  # [A, W, M] cosines
        if rule == "similar":
            return (f > params.sim_threshold).any(-1)
        if params.spatial_weight:  # f = (1 - beta) cos + beta near, as the reference writes it
            f.mul_(params.cos_weight)
            gap = (_coords(ids, grid).unsqueeze(2) - mcoords[:, None, :m_max]).abs_()
            f += params.spatial_weight * (gap <= limits).all(-1).float()
        return (f >= params.sim_threshold).any(-1)
    gap = (_coords(ids, grid).unsqueeze(2) - mcoords[:, None, :m_max]).abs_()
    edge = (gap <= limits).all(-1)                         # [A, W, M] near
    if rule == "near":
        edge &= (torch.arange(m_max) < count.unsqueeze(1)).unsqueeze(1)  # real members only
    else:  # "similar_and_near"
        edge &= torch.bmm(x, members[:, :m_max].transpose(1, 2)) > params.sim_threshold
    return edge.any(-1)


def _lower_cosines(xs):
    """[A, S, S] cosines among the survivors, valid at least below the diagonal (all the walk
    reads): the row blocks of a lower block-triangle, skipping ~1/4 of the full product."""
    a, s, _ = xs.shape
    if s < _SPLIT:
        return torch.bmm(xs, xs.transpose(1, 2))
    cos = torch.empty(a, s, s)
    h = s // 2
    torch.bmm(xs[:, :h], xs[:, :h].transpose(1, 2), out=cos[:, :h, :h])
    torch.bmm(xs[:, h:], xs.transpose(1, 2), out=cos[:, h:])
    return cos


def _next_window(counts, visited, m):
    """Candidates to visit next: slack x (members needed / acceptance so far) + pad, the
    largest over the active images."""
    need = max((m - c) * visited / max(c, 1) for c in counts)
    return math.ceil(_SLACK * need) + _PAD


def greedy_mis_without_graph(tokens: torch.Tensor, order: torch.Tensor, n_pivots: int, k: int,
                             grid: tuple[int, int, int], params, *,
                             stats: dict | None = None) -> torch.Tensor:
    """Kept token ids, int64 [B, k] ascending: pivots, greedy-walk members, fill (module doc).

    tokens: CPU [B, N, D] fp16/bf16/fp32, any strides; order: int64 [B, N], a permutation of
    the tokens per image, best first; grid: (T, H, W) (or (H, W)) with T*H*W = N, or a
    TokenLayout of N tokens; params: a PruneOptions (fusion "weighted" or "binarized").
    stats: a dict to receive "visited" (candidates read, summed over the images), "windows",
    "gemm_macs" (multiply-adds of both GEMMs), per image "members" and "depth" (candidates
    the exact walk visits: 1 + position of the m-th member, or C).
    """
    b, n, d = tokens.shape
    # What the C++ resolver reads through raw pointers must be host memory of the right type
    # and shape (its sizes and every index it reads it checks itself); the rest was checked
    # at the public boundary (prune's checks) and is not checked again here.
    if tokens.device.type != "cpu" or order.device.type != "cpu":
        raise ValueError(f"the CPU walk takes CPU tensors, got {tokens.device} and {order.device}")
    if order.dtype != torch.int64 or order.shape != (b, n):
        raise ValueError(f"order must be int64 [{b}, {n}], got {order.dtype} {list(order.shape)}")
    c, m = n - n_pivots, k - n_pivots
    if m == 0 or m == c:  # no supplements, or every candidate kept
        return torch.sort(order[:, :k], dim=1).values
    if not available():
        raise RuntimeError("d2pruner_kernels._C is not built (or lacks walk_window_cpu)")
    order = order.contiguous()
    cand = order[:, n_pivots:]
    flat = _row_source(tokens)
    rule = fusion_rule(params)
    if isinstance(grid, TokenLayout):  # coordinates from its table (the C++ reads it raw)
        table, temporal_radius = coords_table(grid, params.temporal_radius)
        if table.dtype != torch.int32 or table.shape != (n, 3) or not table.is_contiguous():
            raise ValueError(f"{grid!r}: coordinate table {table.dtype} {list(table.shape)}, "
                             f"expected contiguous int32 [{n}, 3]")
        where = dict(coord_table=table.data_ptr(), grid_t=0, grid_h=0, grid_w=0)
        grid = table.long()  # _coords reads its rows
    else:
        grid, temporal_radius = as_3d(grid), params.temporal_radius
        where = dict(grid_t=grid[0], grid_h=grid[1], grid_w=grid[2])
    limits = torch.tensor([temporal_radius, params.radius, params.radius])
    taken = torch.zeros(b, c, dtype=torch.uint8)  # 1 at the members' candidate positions
    fixed = dict(order=order.data_ptr(), taken=taken.data_ptr(), batch=b, n_tokens=n,
                 n_pivots=n_pivots, m=m, radius=params.radius, temporal_radius=temporal_radius,
                 cos_weight=params.cos_weight, spatial_weight=params.spatial_weight,
                 threshold=params.sim_threshold, **where)  # the same for every window
    if rule != "weighted":  # (the resolver's default)
        fixed["fusion"] = _C.walk_fusions[rule]
    image = torch.arange(b)                        # active slot -> image
    members = torch.empty(b, m, d)                 # unit rows; NaN past each count (C++)
    mcoords = torch.empty(b, m, 3, dtype=torch.int64)
    count = torch.zeros(b, dtype=torch.int64)
    s_cap = min(2 * m + 64, max(_MIN_SURVIVORS, math.isqrt(_SURVIVOR_FLOATS // b)))
    lo, width, m_max = 0, min(math.ceil(_SLACK * m) + _PAD, s_cap), 0
    visited = windows = macs = 0
    while True:
        act = image.numel()
        width = min(width, max(_MIN_WINDOW, _WINDOW_FLOATS // (act * (d + m))))
        hi = min(c, lo + width)
        ids = cand[:, lo:hi] if act == b else cand[image, lo:hi]  # [A, W] rank order
        x = _unit_rows(tokens, flat, image, ids)                     # [A, W, D]
        if m_max:  # step 2; then step 3: the survivors, in rank order, padded to S
            blocked = _blocked(x, ids, members, mcoords, count, m_max, grid, params, limits,
                               rule)
            if int(blocked.sum(1).min()) < blocked.shape[1] - s_cap:  # cap: end the window
                cut = int((torch.cumsum(~blocked, 1) <= s_cap).sum(1).min())  # at survivor s_cap
                hi, x, blocked = lo + cut, x[:, :cut], blocked[:, :cut]
            s = hi - lo - int(blocked.sum(1).min())
            idx = torch.sort(blocked.to(torch.uint8), dim=1, stable=True).indices[:, :s]
            rows = (idx + (hi - lo) * torch.arange(act).unsqueeze(1)).view(-1)
            xs = x.reshape(act * (hi - lo), d).index_select(0, rows).view(act, s, d)
            pos = torch.where(torch.gather(blocked, 1, idx), -1, idx + lo)
        else:  # no members yet: every candidate survives
            s, xs = hi - lo, x
            pos = torch.arange(lo, hi).expand(act, -1).contiguous()
        if s:
            cos = _lower_cosines(xs)
            _C.walk_window_cpu(cos=cos.data_ptr(), rows=xs.data_ptr(), pos=pos.data_ptr(),
                               image=image.data_ptr(), members=members.data_ptr(),
                               coords=mcoords.data_ptr(), count=count.data_ptr(), active=act,
                               survivors=s, dim=d, **fixed)
        windows += 1
        visited += act * (hi - lo)
        macs += act * ((hi - lo) * m_max + s * s) * d
        lo = hi
        counts = count.tolist()
        m_max = max(counts)
        if lo >= c or min(counts) == m:
            break
        if m_max == m:  # finished images leave the batch
            left = count < m
            image, members, mcoords, count = image[left], members[left], mcoords[left], count[left]
            counts = [q for q in counts if q < m]
            m_max = max(counts)
        width = _next_window(counts, lo, m)

    if stats is not None:
        last = c - torch.argmax(taken.flip(1), dim=1)  # 1 + position of the last member
        members_ = taken.sum(1)
        stats.update(visited=visited, windows=windows, gemm_macs=macs, members=members_.tolist(),
                     depth=torch.where(members_ == m, last, c).tolist())
    # Step 6, the fill: the first (m - members) untaken candidates, rank order.
    chosen = taken.bool()
    free = ~chosen
    chosen |= free & (free.cumsum(1) <= m - chosen.sum(1, keepdim=True))
    picks = chosen.nonzero()[:, 1].view(b, m)             # m positions per image, ascending
    kept = torch.cat((order[:, :n_pivots], torch.gather(cand, 1, picks)), dim=1)
    return torch.sort(kept, dim=1).values
