"""The compiled MIS (the CPU twin of the CUDA Luby rounds; the CUDA kernel too on a GPU)
against the reference greedy walk, exactly, on thousands of graphs."""
import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

from d2pruner_kernels import layout, reference
from d2pruner_kernels.kernels import mis

from helpers import ON_GPU

pytestmark = pytest.mark.skipif(not mis.extension_available(), reason="_C not built")



def graph(kind: str, c: int, g: torch.Generator, p: float = 0.1) -> torch.Tensor:
    """Symmetric bool [C, C] adjacency of a named family, in rank order."""
    e = torch.zeros(c, c, dtype=torch.bool)
    i = torch.arange(c)
    if kind == "complete":
        e[:] = True
    elif kind == "chain":  # i -- i+1 in rank order: the worst case for the round count
        e[i[:-1], i[1:]] = True
    elif kind == "star" and c:
        e[int(torch.randint(0, c, (1,), generator=g))] = True
    elif kind == "cliques":
        size = int(torch.randint(1, 8, (1,), generator=g))
        label = torch.randint(0, max(1, c // size), (c,), generator=g)
        e = label[:, None] == label[None, :]
    elif kind == "random":
        e = torch.rand(c, c, generator=g) < p
    e = e | e.T
    e.fill_diagonal_(False)
    return e


def reference_kept(edges, order, n_p, k):
    picks = reference.greedy_walk(edges, k - n_p)
    return torch.sort(order[[*range(n_p), *[n_p + p for p in picks]]]).values


def compiled(edges_batch, order, n_p, k, device="cpu"):
    adj = layout.pack_lower(edges_batch).to(device)
    return mis.greedy_mis(adj, order.to(device), n_p, k, return_rounds=True)


def check(edges_list, orders, n_p, k):
    edges = torch.stack(edges_list)
    want = torch.stack([reference_kept(e, o, n_p, k) for e, o in zip(edges_list, orders)])
    got, rounds = compiled(edges, orders, n_p, k)
    assert torch.equal(got, want)
    if ON_GPU:
        got, _ = compiled(edges, orders, n_p, k, "cuda")
        assert torch.equal(got.cpu(), want), "cuda"
    return rounds


KINDS = ["empty", "complete", "chain", "star", "cliques", "random"]


@settings(max_examples=1500, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(KINDS), c=st.integers(0, 70),
       n_p=st.integers(0, 6), m_kind=st.sampled_from(["0", "1", "all", "random"]),
       p=st.floats(0.0, 1.0), batch=st.integers(1, 3))
def test_compiled_mis_equals_the_greedy_walk(seed, kind, c, n_p, m_kind, p, batch):
    g = torch.Generator().manual_seed(seed)
    n = c + n_p
    assume(n > 0)
    m = {"0": 0, "1": min(1, c), "all": c,
         "random": int(torch.randint(0, c + 1, (1,), generator=g))}[m_kind]
    k = n_p + m
    assume(k > 0)
    edges = [graph(kind, c, g, p) for _ in range(batch)]  # different graphs per image
    orders = torch.stack([torch.randperm(n, generator=g) for _ in range(batch)])
    check(edges, orders, n_p, k)


@pytest.mark.parametrize("c", [1, 31, 32, 33, 1023, 1024, 1025, 2500, 5000])
@pytest.mark.parametrize("kind", ["chain", "random", "cliques"])
def test_large_graphs_across_windows(c, kind):
    g = torch.Generator().manual_seed(c)
    n_p = 3
    orders = torch.randperm(c + n_p, generator=g)[None]
    e = graph(kind, c, g, p=min(0.5, 8.0 / c))
    for m in sorted({1, c // 3, c}):
        rounds = check([e], orders, n_p, n_p + m)
    if kind == "chain" and c > 1:  # chain in rank order: one member settles per round
        assert int(rounds[0]) >= c // 2


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(["random", "cliques", "chain"]),
       c=st.integers(1, 1200), n_p=st.integers(0, 4), frac_r=st.floats(0.0, 1.0),
       frac_r2=st.floats(0.0, 1.0), frac_m=st.floats(0.0, 1.0))
def test_lazy_protocol_reads_only_the_rows_ready(seed, kind, c, n_p, frac_r, frac_r2, frac_m):
    """rows_ready / done / skip / kept, as kernels/lazy_graph.py chains them over row ranges
    ending at R1 <= R2 <= C: with rows >= R poisoned, an image is done exactly when its
    m-th greedy member lies before R (or R = C, or m = 0); done images get the full-graph
    answer, the others are left untouched; later calls pass skip = done = the same tensor
    (read before it is rewritten) and finish the rest, never touching the images done
    before (their rows are all poisoned then). Across the 1024-candidate window."""
    g = torch.Generator().manual_seed(seed)
    batch, n = 3, c + n_p
    r1 = round(frac_r * c)
    r2 = r1 + round(frac_r2 * (c - r1))
    m = round(frac_m * min(c, 40))
    k = n_p + m
    assume(k > 0)
    edges = [graph(kind, c, g, p=min(0.5, 6.0 / c)) for _ in range(batch)]
    orders = torch.stack([torch.randperm(n, generator=g) for _ in range(batch)])
    want = torch.stack([reference_kept(e, o, n_p, k) for e, o in zip(edges, orders)])
    depth = [ms[m - 1] + 1 if m and len(ms) >= m else (0 if m == 0 else c + 1)
             for ms in (reference.greedy_members(e, c) for e in edges)]
    devices = ["cpu", "cuda"] if ON_GPU else ["cpu"]
    for device in devices:
        kept = torch.full((batch, k), -7, dtype=torch.int64, device=device)
        done = torch.full((batch,), -1, dtype=torch.int32, device=device)
        o = orders.to(device)
        for i, r in enumerate((r1, r2, c)):
            adj = layout.pack_lower(torch.stack(edges))
            adj[:, r:] = -1  # rows not ready: garbage that would change any answer reading it
            skip = None if i == 0 else done
            if skip is not None:
                adj[skip.cpu().bool()] = -1  # skipped images: nothing may be read
            mis.greedy_mis(adj.to(device), o, n_p, k, rows_ready=r, skip=skip, done=done,
                           kept=kept)
            done_want = [int(r == c or d <= r) for d in depth]
            assert done.tolist() == done_want, (device, r)
            for b in range(batch):
                want_b = want[b] if done_want[b] else torch.full((k,), -7, dtype=torch.int64)
                assert torch.equal(kept[b].cpu(), want_b), (device, r, b)


def test_more_members_wanted_than_the_mis_has_fills_in_rank_order():
    c = 10
    e = graph("complete", c, torch.Generator())
    order = torch.arange(c)[None]
    got, _ = compiled(e[None], order, 0, 4)
    assert got.tolist() == [[0, 1, 2, 3]]  # member 0, then fill 1, 2, 3


def test_rounds_stop_early_with_a_small_budget():
    # Empty graph: everyone joins in the first round; with m=1 the walk stops after the
    # first window's first round whatever C is.
    c = 3000
    e = torch.zeros(1, c, c, dtype=torch.bool)
    order = torch.arange(c)[None]
    _, rounds = compiled(e, order, 0, 1)
    assert rounds.tolist() == [2]  # the external pass + one Luby round


@pytest.mark.parametrize("bad,error,match", [
    ("dtype", TypeError, "adjacency must be int32"), ("shape", ValueError, "adjacency must be"),
    ("order_dtype", TypeError, "order must be int64"), ("sizes", ValueError, "n_pivots <= k")])
def test_bad_arguments_raise_at_the_stage_before_the_launch(bad, error, match, monkeypatch):
    """The public stage checks the arguments (checks.check_mis_inputs) before the compiled MIS
    is called; kernels.mis does not check them again."""
    from d2pruner_kernels import stages

    def launch(*args):
        raise AssertionError("the compiled MIS was launched")
    monkeypatch.setattr(mis._C, "mis_rounds_cpu", launch)
    e = graph("random", 40, torch.Generator().manual_seed(0))
    adj, order = layout.pack_lower(e[None]), torch.arange(45)[None]
    n_p, k = 5, 12
    if bad == "dtype":
        adj = adj.to(torch.int64)
    elif bad == "shape":
        adj = adj[:, :30]
    elif bad == "order_dtype":
        order = order.to(torch.int32)
    elif bad == "sizes":
        k = 4  # fewer kept than pivots (the adjacency shape stays right)
    with pytest.raises(error, match=match):
        stages.greedy_mis(adj, order, n_p, k, backend="kernels")


def test_strided_views_are_read_as_their_values():
    """A non-contiguous adjacency or order (views with the right shapes) gives the reference's
    answer: the C++ side reads a dense copy, never the views' storage as if it were dense."""
    g = torch.Generator().manual_seed(3)
    edges = torch.stack([graph("random", 40, g, p=0.2) for _ in range(2)])
    adj = layout.pack_lower(edges)
    order = torch.stack([torch.randperm(45, generator=g) for _ in range(2)])
    adj_view = torch.stack([adj, torch.full_like(adj, -1)], dim=1)[:, 0]  # every other image
    order_view = torch.stack([order, torch.zeros_like(order)], dim=2)[..., 0]  # stride 2
    assert not adj_view.is_contiguous() and not order_view.is_contiguous()
    want = reference.greedy_mis(adj, order, 5, 12)
    assert torch.equal(mis.greedy_mis(adj_view, order_view, 5, 12), want)


def test_call_parameters_are_checked_when_made_and_passed_by_keyword():
    """_C.MisArgs (the one struct every MIS launch takes) refuses inconsistent sizes when it
    is made, before any launch can read a buffer, and takes keywords only."""
    from d2pruner_kernels import _C
    ok = dict(adj=0, order=0, kept=0, batch=2, n_tokens=8, n_pivots=2, k=5, rows_ready=6)
    a = _C.MisArgs.dense(**ok)
    assert (a.batch, a.n_tokens, a.n_pivots, a.k, a.rows_ready, a.is_ragged) == (2, 8, 2, 5, 6, False)
    for bad in (dict(k=1), dict(k=9), dict(n_pivots=-1), dict(rows_ready=7), dict(rows_ready=-1),
                dict(n_tokens=0), dict(batch=-1)):
        with pytest.raises(ValueError, match="inconsistent sizes"):
            _C.MisArgs.dense(**dict(ok, **bad))
    with pytest.raises(TypeError):
        _C.MisArgs.dense(0, 0, 0, 2, 8, 2, 5, 6)
    ragged = dict(adj=0, order=0, kept=0, table=8, batch=2, max_tokens=40, order_len=50,
                  kept_len=9, adj_words=70)
    r = _C.MisArgs.ragged(**ragged)
    assert (r.batch, r.n_tokens, r.is_ragged) == (2, 40, True)
    for bad, match in ((dict(table=0), "table"), (dict(kept_len=-1), "lengths"),
                       (dict(max_tokens=0), "sizes")):
        with pytest.raises(ValueError, match=match):
            _C.MisArgs.ragged(**dict(ragged, **bad))


# -- ragged batches (prune_varlen): per-image sizes from a table, packed buffers ------------

def ragged_case(sizes, kinds, g, p=0.2, row_ends=None):
    """Packed adjacency / order / table for images of (C_b, n_p_b, m_b), in that order:
    each image's graph in its own [C_b, words(C_b)] layout at its offset, its order (local
    ids) at its token offset, the table from ragged.build_table (rows [0, row_ends[b]) of
    image b ready; default all). Returns adj, order, table, the per-image edges and orders."""
    from d2pruner_kernels.kernels import ragged
    edges = [graph(kind, c, g, p) for (c, _, _), kind in zip(sizes, kinds)]
    orders = [torch.randperm(c + n_p, generator=g) for c, n_p, _ in sizes]
    adj = torch.cat([layout.pack_lower(e[None])[0].flatten() for e in edges])
    ends = [c for c, _, _ in sizes] if row_ends is None else row_ends
    built = ragged.build_table([c + n_p for c, n_p, _ in sizes], [n_p for _, n_p, _ in sizes],
                               [n_p + m for _, n_p, m in sizes],
                               ranges=[[(0, end) for end in ends]])
    assert built.adj_words == adj.numel() and built.total_tokens == sum(map(len, orders))
    return adj, torch.cat(orders), torch.tensor(built.rows[0], dtype=torch.int64), edges, orders


def ragged_want(sizes, edges, orders):
    out, tok = [], 0
    for (c, n_p, m), e, o in zip(sizes, edges, orders):
        out.append(reference_kept(e, o, n_p, n_p + m) + tok)
        tok += c + n_p
    return torch.cat(out)


def run_ragged(adj, order, table, sizes, device="cpu", **kw):
    kept = torch.full((sum(n_p + m for _, n_p, m in sizes),), -7, dtype=torch.int64, device=device)
    max_tokens = max(c + n_p for c, n_p, _ in sizes)
    return mis.greedy_mis_ragged(adj.to(device), order.to(device), table.to(device), kept,
                                 max_tokens, **kw)


def test_ragged_fields_are_the_same_numbers_in_cpp_and_python():
    """Every field constant of csrc/mis.h's ragged table (all of them, through _C) has the
    number of the field of that name in kernels/ragged.py, the layout the builder and the
    Triton launches use."""
    from d2pruner_kernels import _C
    from d2pruner_kernels.kernels import ragged
    cpp = _C.ragged_fields
    assert {"TOKEN_OFFSET", "TOKENS", "PIVOTS", "KEEP", "KEEP_OFFSET", "ADJ_OFFSET", "ROW_END",
            "FIELDS"} <= set(cpp)
    python = {name: getattr(ragged, name, None) for name in cpp}
    assert python == cpp
    columns = [cpp[name] for name in cpp if name != "FIELDS"]
    assert len(set(columns)) == len(columns) and max(columns) < cpp["FIELDS"]


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 6), big=st.booleans())
def test_ragged_mis_equals_the_greedy_walk_per_image(seed, batch, big):
    """Images of different C_b, n_pivots_b, k_b (m_b = 0, 1, all, random; n_pivots_b = k_b;
    one image across the 1024-candidate window when `big`), each graph its own: every
    image's kept ids, plus its token offset, at its keep offset, exactly the reference walk."""
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    sizes, kinds = [], []
    for i in range(batch):
        c = r(1100, 1300) if big and i == 0 else r(0, 70)
        n_p = r(0, 6) if c else r(1, 6)
        m = [0, min(1, c), c, r(0, c)][r(0, 3)]
        sizes.append((c, n_p, m))
        kinds.append(KINDS[r(0, len(KINDS) - 1)])
    adj, order, table, edges, orders = ragged_case(sizes, kinds, g, p=min(0.5, r(1, 30) / 100))
    want = ragged_want(sizes, edges, orders)
    assert torch.equal(run_ragged(adj, order, table, sizes), want)
    if ON_GPU:
        assert torch.equal(run_ragged(adj, order, table, sizes, "cuda").cpu(), want)


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), frac=st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4))
def test_ragged_lazy_rows_per_image(seed, frac):
    """ROW_END per image: rows at or past it are poisoned; an image is done exactly when its
    m-th member lies before its own row end (or that is all its rows, or m = 0), and only
    done images are written; a second call with every row ready and skip = done finishes
    the others without touching the first ones."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(40, 2, 3), (300, 0, 20), (1, 1, 1), (90, 4, 30)]
    kinds = ["random", "cliques", "empty", "chain"]
    ends = [round(f * c) for f, (c, _, _) in zip(frac, sizes)]
    adj, order, table, edges, orders = ragged_case(sizes, kinds, g, p=0.05, row_ends=ends)
    want = ragged_want(sizes, edges, orders)
    depth = []
    for (c, _, m), e in zip(sizes, edges):
        ms = reference.greedy_members(e, c)
        depth.append(0 if m == 0 else ms[m - 1] + 1 if len(ms) >= m else c + 1)
    from d2pruner_kernels.kernels import ragged
    poisoned, off = adj.clone(), 0
    for (c, _, _), end in zip(sizes, ends):
        w = layout.num_words(c)
        poisoned[off + end * w: off + c * w] = -1
        off += c * w
    for device in (["cpu", "cuda"] if ON_GPU else ["cpu"]):
        done = torch.full((len(sizes),), -1, dtype=torch.int32, device=device)
        kept = run_ragged(poisoned, order, table, sizes, device, done=done)
        done_want = [int(end == c or d <= end) for (c, _, _), end, d in zip(sizes, ends, depth)]
        assert done.tolist() == done_want, device
        keep_off = table[:, ragged.KEEP_OFFSET].tolist()
        for b, (_, n_p, m) in enumerate(sizes):
            got = kept[keep_off[b]:keep_off[b] + n_p + m].cpu()
            if done_want[b]:
                assert torch.equal(got, want[keep_off[b]:keep_off[b] + n_p + m]), (device, b)
            else:
                assert (got == -7).all(), (device, b)
        full = table.clone()
        full[:, ragged.ROW_END] = torch.tensor([c for c, _, _ in sizes])
        kept2 = mis.greedy_mis_ragged(adj.to(device), order.to(device), full.to(device), kept,
                                      max(c + n_p for c, n_p, _ in sizes), skip=done, done=done)
        assert torch.equal(kept2.cpu(), want) and done.tolist() == [1] * len(sizes), device


@pytest.mark.parametrize("field, value, match", [
    ("tokens", 0, "sizes"), ("keep", 99, "sizes"), ("pivots", -1, "sizes"),
    ("token_offset", 10**12, "tokens outside"), ("token_offset", -1, "tokens outside"),
    ("keep_offset", 10**12, "kept ids outside"), ("adj_offset", 10**9, "adjacency outside"),
    ("adj_offset", -3, "adjacency outside")])
def test_ragged_table_out_of_bounds_raises_before_any_work(field, value, match):
    from d2pruner_kernels.kernels import ragged
    g = torch.Generator().manual_seed(0)
    sizes = [(20, 2, 5), (33, 1, 4)]
    adj, order, table, _, _ = ragged_case(sizes, ["random", "random"], g)
    table[1, getattr(ragged, field.upper())] = value
    kept = torch.full((12,), -7, dtype=torch.int64)
    with pytest.raises(ValueError, match=f"image 1 has {match}"):
        mis.greedy_mis_ragged(adj, order, table, kept, 34)
    assert (kept == -7).all()


def test_ragged_order_must_be_a_permutation_per_image():
    g = torch.Generator().manual_seed(1)
    sizes = [(20, 2, 5), (33, 1, 4)]
    adj, order, table, _, _ = ragged_case(sizes, ["random", "random"], g)
    order[22 + 3] = 34  # image 1 holds 34 tokens: ids 0..33
    with pytest.raises(ValueError, match=r"order must be a permutation .*image 1 holds 34"):
        mis.greedy_mis_ragged(adj, order, table, torch.empty(12, dtype=torch.int64), 34)
    with pytest.raises(ValueError, match="max_tokens"):
        mis.greedy_mis_ragged(adj, order, table, torch.empty(12, dtype=torch.int64), 0)
