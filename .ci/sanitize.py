"""Bodies for `compute-sanitizer`: every launch of the package on small inputs, each answer
checked (a wrong one exits non-zero, as does an error the tool reports with --error-exitcode).

    python .ci/sanitize.py mis  [--tiny]   the CUDA MIS kernel alone (graphs built on the CPU,
                                           no Triton launch): dense whole graphs, the lazy
                                           protocol (rows_ready, then skip = done aliased),
                                           windows past 1024 candidates, and the ragged MIS
                                           (2 row ranges, per-image row ends, an empty and a
                                           one-token image). For racecheck / synccheck.
    python .ci/sanitize.py full [--tiny]   end to end through every Triton launch and the MIS:
                                           prune() (split-K, lazy ranges), prune_varlen() with
                                           one and two row ranges (graph RAGGED + HAS_SKIP,
                                           ragged MIS skip/done) and with an image above the
                                           rank kernel's limit (the padded sort), TokenLayouts
                                           and fusion='binarized' (COORDS / FUSION: dense and
                                           ragged, layouts among grids), the scores
                                           kernel on a strided view, attention_scores with a
                                           shared span, per-sample packed spans + padding mask
                                           + q_positions, with and without lse. For memcheck
                                           (run with PYTORCH_NO_CUDA_MEMORY_CACHING=1: every
                                           tensor its own allocation, so a read past its end
                                           is seen) and initcheck.

.ci/gpu_check.py runs racecheck on `mis` and memcheck on `full` by default. --tiny: the
smallest shapes (the dry run on a CPU under TRITON_INTERPRET=1, where the same bodies run
through the interpreter and the C++ twin). Public entry points wherever one reaches the
launch; the lazy and ragged MIS protocols are driven through kernels.mis directly.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time

import torch

if not torch.cuda.is_available():  # a CPU dry run: the interpreter, before any kernel import
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import d2pruner_kernels as d2p  # noqa: E402
from d2pruner_kernels import prune, prune_varlen, reference  # noqa: E402
from d2pruner_kernels.testing import clustered_tokens, distinct_attention, random_graph  # noqa: E402

GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if GPU else "cpu")


def sync():
    if GPU:
        torch.cuda.synchronize()


@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def rounds(fn):
    """fn's keywords for the rounds MIS (the `method` keyword is gone where it is the only one)."""
    import inspect
    return {"method": "rounds"} if "method" in inspect.signature(fn).parameters else {}


def say(what, t0):
    print(f"  {what}: right ({time.time() - t0:.1f} s)", flush=True)


# --- the MIS kernel alone ---------------------------------------------------------------------

def mis_dense(tiny):
    from d2pruner_kernels.kernels import mis
    g = torch.Generator().manual_seed(0)
    cases = [(37, 0.2, 3, 20), (600, 0.5, 2, 12)]
    if not tiny:  # windows past 1024 candidates; a graph with no pivots, k = N
        cases += [(1100, 0.01, 5, 400), (2100, 0.002, 0, 2100)]
    for c, p, n_p, k in cases:
        t0 = time.time()
        adj, order = random_graph(2, c, p, n_p, g)
        want = reference.greedy_mis(adj, order, n_p, k)
        adj_d, order_d = adj.to(DEV), order.to(DEV)
        got = d2p.greedy_mis(adj_d, order_d, n_p, k, backend="kernels")
        assert torch.equal(got.cpu(), want), ("dense", c)
        # the lazy protocol: rows [0, c/2) first, then the rest with skip aliasing done
        done = torch.empty(2, dtype=torch.int32, device=DEV)
        kw = rounds(mis.greedy_mis)
        kept = mis.greedy_mis(adj_d, order_d, n_p, k, rows_ready=c // 2, done=done, **kw)
        mis.greedy_mis(adj_d, order_d, n_p, k, skip=done, done=done, kept=kept, **kw)
        assert torch.equal(kept.cpu(), want), ("lazy", c)
        sync()
        say(f"MIS dense + lazy, C={c}", t0)


def mis_ragged(tiny):
    """The ragged MIS on a device table of 2 row ranges: range 0 gives each image a third of
    its rows, range 1 all of them (skip = done of range 0)."""
    from d2pruner_kernels.kernels import mis, ragged
    t0 = time.time()
    g = torch.Generator().manual_seed(1)
    sizes = [(40, 2, 3), (1, 1, 1), (90, 4, 30), (0, 5, 0)]  # (C, pivots, members)
    if not tiny:
        sizes.insert(1, (1300, 0, 200))
    adjs, orders, wants, lengths, pivots, keeps = [], [], [], [], [], []
    tok = 0
    for c, n_p, m in sizes:
        a, o = random_graph(1, c, 0.01, n_p, g)
        wants.append(reference.greedy_mis(a, o, n_p, n_p + m)[0] + tok)
        adjs.append(a.flatten())
        orders.append(o[0])
        lengths.append(c + n_p)
        pivots.append(n_p)
        keeps.append(n_p + m)
        tok += c + n_p
    spans = [[(0, c // 3) for c, _, _ in sizes], [(c // 3, c) for c, _, _ in sizes]]
    built = ragged.build_table(lengths, pivots, keeps, ranges=spans)
    table = torch.tensor(built.rows, dtype=torch.int64).to(DEV)  # [2, B, FIELDS]
    adj = torch.cat(adjs + [torch.zeros(1, dtype=torch.int32)]).to(DEV)
    order = torch.cat(orders).to(DEV)
    kept = torch.full((built.kept_len,), -7, dtype=torch.int64, device=DEV)
    done = torch.empty(len(sizes), dtype=torch.int32, device=DEV)
    max_n = max(lengths)
    kw = rounds(mis.greedy_mis_ragged)
    mis.greedy_mis_ragged(adj, order, table[0].contiguous(), kept, max_n, done=done, **kw)
    mis.greedy_mis_ragged(adj, order, table[1].contiguous(), kept, max_n, skip=done, done=done,
                          **kw)
    sync()
    assert torch.equal(kept.cpu(), torch.cat(wants)), "ragged MIS, 2 ranges"
    say(f"ragged MIS, {len(sizes)} images, 2 ranges", t0)


# --- end to end through every launch ----------------------------------------------------------

def packed(grids, d, heads, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = [math.prod(gr) for gr in grids]
    x = torch.cat([clustered_tokens(1, n, d, clusters=12, noise=0.6, generator=g)[0]
                   for n in lengths])
    a = torch.cat([distinct_attention(1, heads, n, generator=g)[0] for n in lengths], dim=1)
    prior = 0.5 + torch.rand(sum(lengths), generator=g)
    cu = torch.tensor([0] + lengths).cumsum(0)
    return x.to(DEV, dtype), a.to(DEV), prior.to(DEV), cu


def per_image(x, a, cu, grids, ks, prior=None):
    out = []
    for b, grid in enumerate(grids):
        s, e = int(cu[b]), int(cu[b + 1])
        p = None if prior is None else prior[s:e]
        out.append(prune(x[s:e], a[..., s:e], grid, ks[b], prior=p, backend="kernels") + s)
    return torch.cat(out)


def full_prune(tiny):
    dtype = torch.bfloat16 if GPU else torch.float32
    n, grid, d = (64, (8, 8), 32) if tiny else (576, (24, 24), 256)
    for b, k in ([(2, 16)] if tiny else [(2, 64), (4, 128)]):  # split-K; lazy ranges
        t0 = time.time()
        x = clustered_tokens(b, n, d, generator=torch.Generator().manual_seed(b)).to(DEV, dtype)
        a = distinct_attention(b, 4, n, generator=torch.Generator().manual_seed(b)).to(DEV)
        got = prune(x, a, grid, k, backend="kernels")
        want = prune(x, a, grid, k, backend="reference")
        sync()
        assert got.shape == want.shape == (b, k)
        say(f"prune B={b} N={n} D={d} k={k}", t0)


def full_varlen(tiny):
    from d2pruner_kernels.kernels import lazy_graph, rank
    dtype = torch.bfloat16 if GPU else torch.float32
    grids = [(6, 6), (3, 5), (2, 4, 4)] if tiny else [(24, 24), (16, 20), (2, 8, 8), (10, 10), (3, 5)]
    ks = [9, 4, 8] if tiny else [64, 80, 32, 10, 15]
    x, a, prior, cu = packed(grids, 32 if tiny else 64, 4, dtype, seed=11)
    want = per_image(x, a, cu, grids, ks, prior)
    from d2pruner_kernels.kernels import varlen as kv
    for waves, ranges in ((lazy_graph.LAZY_MIN_WAVES, 1), (-1.0, 2)):
        t0 = time.time()
        cache = getattr(kv, "_cache", None)  # the plans, to see which path ran
        if cache is not None:
            cache.clear()
        with patched(lazy_graph, "LAZY_MIN_WAVES", waves):
            keep, cu_keep = prune_varlen(x, a, cu.to(DEV), grids, ks, prior=prior,
                                         backend="kernels")
        sync()
        assert torch.equal(keep, want), f"prune_varlen, {ranges} row range(s)"
        assert cu_keep.tolist() == [0] + torch.tensor(ks).cumsum(0).tolist()
        ran = sorted({p.ranges for p in cache.values()}) if cache is not None else "?"
        if GPU and not tiny:  # (a CPU plan always takes the prefix; tiny images fit in it)
            assert ran in ([ranges], "?"), f"expected {ranges} row range(s), the plan has {ran}"
        say(f"prune_varlen {len(grids)} images, row ranges {ran}", t0)
    t0 = time.time()
    with patched(rank, "MAX_N", 20 if tiny else 300):  # images above it: one padded sort
        keep, _ = prune_varlen(x, a, cu.to(DEV), grids, ks, prior=prior, backend="kernels")
    sync()
    assert torch.equal(keep, want), "prune_varlen, sort rank"
    say("prune_varlen, an image above the rank kernel", t0)


def full_layouts(tiny):
    """TokenLayouts (the graph kernels' coordinate table, COORDS) and fusion='binarized'
    (FUSION): prune() on a tiles + thumbnail layout (dense: split-K / lazy ranges as sized),
    prune_varlen() on layouts among grids, one and two row ranges, each image's answer its
    own prune()'s."""
    from d2pruner_kernels import TokenLayout
    from d2pruner_kernels.kernels import lazy_graph
    dtype = torch.bfloat16 if GPU else torch.float32
    side = 4 if tiny else 16
    tiles = TokenLayout.tiles(2, 3, (side, side)) + TokenLayout.grid(side, side)
    anyres = TokenLayout.grid(side, side) + TokenLayout.grid(side, 2 * side + 1)
    d = 32 if tiny else 256
    for fusion, beta in (("weighted", 0.5), ("binarized", 0.5), ("binarized", 0.7)):
        t0 = time.time()
        n, k = tiles.cells, tiles.cells // 8
        x = clustered_tokens(2, n, d, generator=torch.Generator().manual_seed(5)).to(DEV, dtype)
        a = distinct_attention(2, 4, n, generator=torch.Generator().manual_seed(5)).to(DEV)
        got = prune(x, a, tiles, k, spatial_weight=beta, fusion=fusion, backend="kernels")
        sync()
        assert got.shape == (2, k), f"prune on a layout, {fusion}"
        say(f"prune B=2 on {tiles!r}, {fusion} beta={beta}", t0)
    grids = [tiles, (6, 7), anyres, (2, 3, 4)]
    lengths = [g.cells if isinstance(g, TokenLayout) else math.prod(g) for g in grids]
    ks = [max(1, n // 6) for n in lengths]
    x, a, prior, cu = packed([(n,) for n in lengths], d, 4, dtype, seed=12)
    for fusion in ("weighted", "binarized"):
        want = torch.cat([prune(x[s:e], a[..., s:e], g, k_b, spatial_weight=0.5, fusion=fusion,
                                backend="kernels") + s
                          for g, k_b, s, e in zip(grids, ks, cu[:-1].tolist(), cu[1:].tolist())])
        for waves in (lazy_graph.LAZY_MIN_WAVES, -1.0):
            t0 = time.time()
            with patched(lazy_graph, "LAZY_MIN_WAVES", waves):
                keep, _ = prune_varlen(x, a, cu.to(DEV), grids, ks, spatial_weight=0.5,
                                       fusion=fusion, backend="kernels")
            sync()
            assert torch.equal(keep, want), f"prune_varlen on layouts, {fusion}"
            say(f"prune_varlen {len(grids)} images (layouts among grids), {fusion}", t0)


def full_scores(tiny):
    heads, start, n = 4, 3, 40
    stride_h = 64 if tiny else 2 ** 12
    t0 = time.time()
    buf = torch.zeros((heads - 1) * stride_h + start + n, dtype=torch.float16, device=DEV)
    view = buf.as_strided((1, heads, n), (0, stride_h, 1), start)
    vals = torch.rand(1, heads, n).half().to(DEV)
    view.copy_(vals)
    prior = torch.rand(n, device=DEV) + 0.5
    got = d2p.debiased_scores(view, prior, backend="kernels")
    torch.testing.assert_close(got, reference.debiased_scores(vals, prior), rtol=2e-6, atol=0)
    say("debiased_scores on a strided view", t0)


def full_attention(tiny):
    dtype = torch.float16 if GPU else torch.float32
    b, hq, hk, d = (2, 4, 2, 32) if tiny else (3, 8, 2, 64)
    lengths = [40, 25] if tiny else [200, 90, 150]
    g = torch.Generator().manual_seed(3)
    n_keys = max(lengths)
    pads = [n_keys - n for n in lengths]
    q = torch.randn(b, hq, 1, d, generator=g).to(DEV, dtype)
    k = torch.randn(b, hk, n_keys, d, generator=g).to(DEV, dtype)
    mask = (torch.arange(n_keys)[None, :] >= torch.tensor(pads)[:, None]).to(DEV)
    pos = torch.full((b, 1), n_keys - 1, device=DEV)
    spans = [(p + 2, p + 2 + n // 2) for p, n in zip(pads, lengths)]
    scale = d ** -0.5
    logits = (q.double() @ k.double().repeat_interleave(hq // hk, 1).transpose(-1, -2)) * scale
    lse = torch.logsumexp(logits.masked_fill(~mask[:, None, None, :], float("-inf")), -1).float()
    shared = (spans[0][0], spans[0][0] + min(n // 2 for n in lengths))
    calls = [("shared span", dict(key_span=shared)),
             ("shared span + lse", dict(key_span=(0, n_keys), lse=torch.logsumexp(logits, -1).float())),
             ("per-sample packed + mask + positions",
              dict(key_span=spans, packed=True, key_padding_mask=mask, q_positions=pos)),
             ("per-sample packed + mask + positions + lse",
              dict(key_span=spans, packed=True, key_padding_mask=mask, q_positions=pos, lse=lse))]
    for what, kw in calls:
        t0 = time.time()
        got = d2p.attention_scores(q, k, backend="kernels", **kw)
        want = d2p.attention_scores(q, k, backend="reference", **kw)
        sync()
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-3, atol=1e-5)
        say(f"attention_scores, {what}", t0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("body", choices=["mis", "full"])
    ap.add_argument("--tiny", action="store_true", help="smallest shapes (CPU dry run)")
    args = ap.parse_args(argv)
    t0 = time.time()
    print(f"sanitize.py {args.body} on {torch.cuda.get_device_name() if GPU else 'CPU'}"
          f" (caching allocator {'off' if os.environ.get('PYTORCH_NO_CUDA_MEMORY_CACHING') == '1' else 'on'})",
          flush=True)
    if args.body == "mis":
        mis_dense(args.tiny)
        mis_ragged(args.tiny)
    else:
        full_prune(args.tiny)
        full_varlen(args.tiny)
        full_layouts(args.tiny)
        full_scores(args.tiny)
        full_attention(args.tiny)
    sync()
    print(f"sanitize.py {args.body}: all answers right ({time.time() - t0:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
