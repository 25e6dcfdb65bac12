"""Run by .ci/asan.sh against an AddressSanitizer build of d2pruner_kernels._C (CPU sources
only): the reproducers of the "memory-safe on any input" issue for the compiled MIS (orders
that are not permutations: zeros, ids >= N, negative ids, 10**12), each of which must raise
a ValueError naming `order`, then valid graphs through every CPU entry point (the twin of
the CUDA rounds, with lazy row ranges, skip and done, dense and ragged; the graph-free
window walk on grids and on TokenLayouts' coordinate tables, under every fusion rule), so
ASAN also watches the paths that do work. ASAN aborts the process on the first bad access;
a wrong answer or a missing error exits 1."""
import sys

import torch

from d2pruner_kernels import _C, TokenLayout, reference
from d2pruner_kernels.kernels import cpu_walk, mis
from d2pruner_kernels.options import PruneOptions
from d2pruner_kernels.testing import random_graph

failures = []


def expect_order_error(adj, order, n_p, k, **kw):
    try:
        mis.greedy_mis(adj, order, n_p, k, **kw)
    except ValueError as e:
        if "order" not in str(e):
            failures.append(f"{order.tolist()} {kw}: ValueError without 'order': {e}")
        return
    failures.append(f"{order.tolist()} {kw}: no error for an order that is not a permutation")


# Item 1's reproducers: adj [1, 6, 1] (N = 8 tokens, 2 pivots), k = 5.
adj = torch.zeros(1, 6, 1, dtype=torch.int32)
bad_orders = [torch.zeros(1, 8, dtype=torch.int64),
              torch.tensor([[8, 9, 10, 11, 12, 13, 14, 15]]),
              torch.tensor([[-1, -100000, 2, 3, 4, 5, 6, 7]]),
              torch.tensor([[10**12, 1, 2, 3, 4, 5, 6, 7]]),
              torch.tensor([[0, 1, 2, 3, 4, 5, 6, 2**62]]),
              torch.tensor([[0, 1, 2, 3, 4, 5, 7, 7]])]
for order in bad_orders:
    expect_order_error(adj, order, 2, 5)
    done = torch.zeros(1, dtype=torch.int32)
    expect_order_error(adj, order, 2, 5, rows_ready=3, done=done)
# A bad order in an image that is skipped is never read; a bad one beside a good one raises.
good = torch.arange(8)[None]
two = torch.cat([good, bad_orders[2]])
expect_order_error(torch.zeros(2, 6, 1, dtype=torch.int32), two, 2, 5)
skip = torch.tensor([0, 1], dtype=torch.int32)
mis.greedy_mis(torch.zeros(2, 6, 1, dtype=torch.int32), two, 2, 5, skip=skip)

# Valid inputs through every CPU entry point, odd sizes across the 1024-candidate window.
g = torch.Generator().manual_seed(0)
for c, p, n_p, k in [(37, 0.2, 3, 20), (1100, 0.01, 5, 400), (70, 0.5, 0, 70), (33, 0.0, 1, 1)]:
    a, order = random_graph(2, c, p, n_p, g)
    want = reference.greedy_mis(a, order, n_p, k)
    if not torch.equal(mis.greedy_mis(a, order, n_p, k), want):
        failures.append(f"rounds C={c}: wrong answer")
    done = torch.empty(2, dtype=torch.int32)
    kept = mis.greedy_mis(a, order, n_p, k, rows_ready=c // 2, done=done)
    mis.greedy_mis(a, order, n_p, k, skip=done, done=done, kept=kept)
    if not torch.equal(kept, want):
        failures.append(f"lazy rounds C={c}: wrong answer")

# Ragged batches (prune_varlen): a table row outside the packed buffers raises before any
# work; valid ragged graphs through the twin of the CUDA rounds.
from d2pruner_kernels import layout  # noqa: E402
from d2pruner_kernels.kernels import ragged  # noqa: E402

sizes = [(37, 3, 10), (0, 2, 0), (1100, 5, 60)]  # (C, n_pivots, m): C = 0 too
adjs, orders, wants = [], [], []
tok = 0
for c, n_p, m in sizes:
    e = torch.rand(c, c, generator=g) < 0.02
    e = (e | e.T) & ~torch.eye(c, dtype=torch.bool)
    o = torch.randperm(c + n_p, generator=g)
    a = layout.pack_lower(e[None])
    want = reference.greedy_mis(a, o[None], n_p, n_p + m)[0] if c else torch.sort(o).values
    wants.append(want + tok)
    adjs.append(a.flatten())
    orders.append(o)
    tok += c + n_p
built = ragged.build_table([c + n_p for c, n_p, _ in sizes], [n_p for _, n_p, _ in sizes],
                           [n_p + m for _, n_p, m in sizes])
adj_r, order_r, table_r = torch.cat(adjs), torch.cat(orders), torch.tensor(built.rows[0])
keep, words = built.kept_len, built.adj_words
kept = mis.greedy_mis_ragged(adj_r, order_r, table_r, torch.empty(keep, dtype=torch.int64), 1105)
if not torch.equal(kept, torch.cat(wants)):
    failures.append("ragged: wrong answer")
for field, value in [(ragged.ADJ_OFFSET, words), (ragged.KEEP_OFFSET, keep),
                     (ragged.TOKEN_OFFSET, tok), (ragged.TOKENS, 2000)]:
    bad = table_r.clone()
    bad[2, field] = value
    try:
        mis.greedy_mis_ragged(adj_r, order_r, bad, torch.empty(keep, dtype=torch.int64), 1105)
        failures.append(f"ragged: no error for field {field} = {value}")
    except ValueError:
        pass

if cpu_walk.available():  # the graph-free walk's C++ window resolver
    x = torch.randn(2, 96, 16, generator=g)
    order = torch.stack([torch.randperm(96, generator=g) for _ in range(2)])
    params = PruneOptions(sim_threshold=0.3, spatial_weight=0.5, radius=2**70)
    got = cpu_walk.greedy_mis_without_graph(x, order, 10, 40, (1, 8, 12), params)
    graph = reference.similarity_graph(x, order, 10, (1, 8, 12), params)
    if not torch.equal(got, reference.greedy_mis(graph, order, 10, 40)):
        failures.append("cpu_walk.greedy_mis_without_graph: wrong answer")

    # TokenLayouts (the resolver reads their int32 [N, 3] coordinate table) under every
    # fusion rule, in one window and in one-candidate windows (members from earlier windows).
    layouts = [TokenLayout.tiles(2, 3, (4, 4)) + TokenLayout.grid(4, 4),
               TokenLayout.grid(5, 5) + TokenLayout.grid(4, 7) + TokenLayout.grid(1, 1),
               TokenLayout.grid(2, 3, 4) + TokenLayout.tiles(1, 2, (3, 2))]
    rules = [("weighted", 0.5), ("binarized", 0.3), ("binarized", 0.5), ("binarized", 0.7)]
    for lay in layouts:
        n = lay.cells
        x = torch.randn(3, n, 8, generator=g)
        x[0, 3] = float("nan")
        x[1, 5] = 0.0
        order = torch.stack([torch.randperm(n, generator=g) for _ in range(3)])
        for fusion, beta in rules:
            for tr in (0, 1, 2**31 - 1):
                params = PruneOptions(sim_threshold=0.3, spatial_weight=beta, fusion=fusion,
                                      radius=1, temporal_radius=tr)
                want = reference.greedy_mis(reference.similarity_graph(x, order, 4, lay, params),
                                            order, 4, n // 2)
                for caps in ({}, {"_WINDOW_FLOATS": 1, "_MIN_WINDOW": 1}):
                    saved = {name: getattr(cpu_walk, name) for name in caps}
                    for name, v in caps.items():
                        setattr(cpu_walk, name, v)
                    try:
                        got = cpu_walk.greedy_mis_without_graph(x, order, 4, n // 2, lay, params)
                    finally:
                        for name, v in saved.items():
                            setattr(cpu_walk, name, v)
                    if not torch.equal(got, want):
                        failures.append(f"cpu_walk on {lay!r} {fusion} beta={beta} tr={tr} "
                                        f"{caps}: wrong answer")

    # The resolver called directly with a coordinate table: extreme int32 coordinates (the
    # differences are taken in int64), and token ids outside the table's N rows refused.
    n, d, s_ = 6, 2, 3
    table = torch.tensor([[-2**31, 2**31 - 1, 0], [2**31 - 1, -2**31, 0], [0, 0, 0],
                          [1, 1, 1], [2**31 - 1, 2**31 - 1, 2**31 - 1], [-2**31] * 3],
                         dtype=torch.int32)
    for bad_order, ok in [(torch.arange(n)[None], True),
                          (torch.tensor([[0, 1, 6, 3, 4, 5]]), False),
                          (torch.tensor([[0, 1, -1, 3, 4, 5]]), False),
                          (torch.tensor([[0, 1, 2**40, 3, 4, 5]]), False)]:
        for rule in _C.walk_fusions.values():
            cos, rows = torch.zeros(1, s_, s_), torch.ones(1, s_, d)
            members, coords = torch.zeros(1, 4, d), torch.zeros(1, 4, 3, dtype=torch.int64)
            count, taken = torch.zeros(1, dtype=torch.int64), torch.zeros(1, n, dtype=torch.uint8)
            pos, image = torch.tensor([[0, 1, 2]]), torch.zeros(1, dtype=torch.int64)
            try:
                _C.walk_window_cpu(cos=cos.data_ptr(), rows=rows.data_ptr(), pos=pos.data_ptr(),
                                   order=bad_order.data_ptr(), image=image.data_ptr(),
                                   members=members.data_ptr(), coords=coords.data_ptr(),
                                   count=count.data_ptr(), taken=taken.data_ptr(), batch=1,
                                   active=1, survivors=s_, dim=d, n_tokens=n, n_pivots=0, m=4,
                                   grid_t=0, grid_h=0, grid_w=0, radius=2**31 - 1,
                                   temporal_radius=2**31 - 1, cos_weight=0.5,
                                   spatial_weight=0.5, threshold=0.3,
                                   coord_table=table.data_ptr(), fusion=rule)
                if not ok:
                    failures.append(f"walk_window_cpu: no error for order {bad_order.tolist()}")
            except ValueError:
                if ok:
                    failures.append(f"walk_window_cpu: error on a valid table call, rule {rule}")

print(f"asan_cases.py: _C from {_C.__file__}")
if failures:
    print("\n".join(failures))
    sys.exit(1)
print("asan_cases.py: every case raised or answered right, no ASAN report")
