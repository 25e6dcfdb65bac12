"""What only a GPU can show: large shapes, determinism, no host sync, CUDA graphs, the
ragged path at serving sizes (two row ranges), a batch past 2^31 elements, an odd feature
dimension. Every test but the last section needs a CUDA GPU and is skipped without one;
the last section tests .ci/gpu_check.py's own plumbing (budgets, skips, summary) on a CPU.
.ci/gpu_check.sh runs this file first on a lent GPU."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import d2pruner_kernels as d2p
from d2pruner_kernels import layout, prune, reference, timing
from d2pruner_kernels.checks import as_3d, pivot_count
from d2pruner_kernels.kernels import mis
from helpers import assert_edges_match, clustered_tokens, distinct_attention, in_band

from d2pruner_kernels.reference import walk_depths as depths

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def llava_like(b, n, d, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = clustered_tokens(b, n, d, clusters=32, noise=0.6, dtype=dtype, generator=g).cuda()
    a = distinct_attention(b, 8, n, generator=g).cuda()
    return x, a


@gpu
@pytest.mark.parametrize("n,grid,d", [(576, (24, 24), 4096), (2880, (48, 60), 1024),
                                      (3136, (16, 14, 14), 256)])
def test_large_shapes_match_reference_stage_by_stage(n, grid, d):
    x, a = llava_like(2, n, d)
    k = n // 8
    n_p = pivot_count(0.7, k)
    s = d2p.debiased_scores(a, backend="kernels")
    torch.testing.assert_close(s, reference.debiased_scores(a), rtol=1e-6, atol=0)
    order = d2p.rank_order(s)
    grid3 = as_3d(grid)
    got = d2p.similarity_graph(x, order, n_p, grid, backend="kernels")
    want = d2p.similarity_graph(x, order, n_p, grid, backend="reference")
    c = n - n_p
    assert_edges_match(got, want, c, in_band(x, order, n_p, grid3, 0.8, 0.0))
    # Same graph in, same selection out: the CUDA MIS against the reference walk.
    assert torch.equal(mis.greedy_mis(got, order, n_p, k), reference.greedy_mis(got, order, n_p, k))


@gpu
@pytest.mark.parametrize("n,grid,k", [(2880, (48, 60), 320), (8192, (32, 16, 16), 819)])
def test_lazy_prune_equals_the_full_graph_selection(n, grid, k):
    """At these sizes prune() builds a prefix of the graph first (kernels/lazy_graph.py): image 0
    settles there, image 1 (near-duplicates: the walk runs out) needs the whole graph; the
    answer must be the reference walk's on the whole graph, image by image."""
    from d2pruner_kernels.kernels import lazy_graph
    x, a = llava_like(2, n, 512, seed=5)
    x[1] = x[1, :1] + 0.01 * x[1]
    n_p = pivot_count(0.7, k)
    first = lazy_graph.prefix_rows(n - n_p, k - n_p, 64)
    depth = depths(x, a, None, grid, k)
    assert depth[0] <= first < depth[1], (first, depth)
    got = prune(x, a, grid, k)
    order = d2p.rank_order(d2p.debiased_scores(a))
    adj = d2p.similarity_graph(x, order, n_p, grid, backend="kernels")
    assert torch.equal(got, reference.greedy_mis(adj, order, n_p, k))


@gpu
@pytest.mark.parametrize("b,d", [(8, 512), (1, 4096)])  # lazy ranges / split-K
def test_identical_over_100_runs(b, d):
    x, a = llava_like(b, 576, d, seed=1)
    first = prune(x, a, (24, 24), 64)
    for _ in range(100):
        assert torch.equal(prune(x, a, (24, 24), 64), first)


@gpu
def test_split_k_graph_at_llava_size():
    """B = 1, N = 576, D = 4096: 45 tiles cannot fill the GPU, so K is split over programs;
    the edges must still be the reference's (outside the band), those of an unsplit launch,
    and bit for bit those of one program adding the same slices (what a batch runs)."""
    from d2pruner_kernels.kernels import graph
    x, a = llava_like(1, 576, 4096, seed=3)
    order = d2p.rank_order(d2p.debiased_scores(a))
    rows = graph.GraphRows(x, order, 44, (1, 24, 24))
    assert rows.splits > 1 and graph.launch_slices(rows.n_tiles, rows.splits, x.device)
    rows.rows(0, rows.c)
    cfg = graph.default_config(x.dtype, 4096)
    one = graph.similarity_graph(x, order, 44, (1, 24, 24), config=dict(cfg, SPLITS=1))
    sliced = graph.similarity_graph(x, order, 44, (1, 24, 24),
                                    config=dict(cfg, SPLITS=rows.splits, SPLIT_LAUNCH=False))
    want = d2p.similarity_graph(x, order, 44, (24, 24), backend="reference")
    band = in_band(x, order, 44, (1, 24, 24), 0.8, 0.0)
    for got in (rows.adj, one):
        assert_edges_match(got, want, rows.c, band)
    assert torch.equal(layout.unpack_lower(sliced, rows.c), layout.unpack_lower(rows.adj, rows.c))


@gpu
def test_an_image_selects_the_same_alone_or_in_a_batch():
    """Alone, one LLaVA-1.5 image's graph is split-K; in a batch of 3 (135 tiles: the GPU
    is full) each program adds the same K slices itself (chosen per image shape), so the
    selection cannot depend on the batch."""
    x, a = llava_like(3, 576, 4096, seed=4)
    batched = prune(x, a, (24, 24), 64)
    for i in range(3):
        assert torch.equal(prune(x[i:i + 1], a[i:i + 1], (24, 24), 64), batched[i:i + 1])


@gpu
@pytest.mark.parametrize("n", [576, 8192, 16384])
def test_rank_kernel_equals_stable_sort_at_size(monkeypatch, n):
    from d2pruner_kernels.kernels import rank
    monkeypatch.setattr(rank, "MAX_N", n)  # the kernel itself, past its usual cut-over too
    g = torch.Generator().manual_seed(n)
    s = (torch.randint(0, 50, (4, n), generator=g).float() / 7).cuda()  # many ties
    s[0, ::97] = float("nan")
    s[1, ::89] = -float("nan")  # CUDA's torch.sort puts -NaN last; we (and reference) first
    assert torch.equal(rank.rank_and_norms(s, None)[0], reference.rank_order(s))


# (1, 4096): the graph whole, K split over programs; (4, 4096): lazy ranges, the prefix
# split-K, the rest with the slices added in each program (the workspace made mid-call)
PATHS = [(1, 4096), (4, 4096)]


@gpu
@pytest.mark.parametrize("b,d", PATHS)
def test_no_host_sync_inside_prune(b, d):
    x, a = llava_like(b, 576, d, seed=2)
    prior = torch.rand(576, device="cuda") + 0.5
    prune(x, a, (24, 24), 64, prior=prior)  # warm up (compilation may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        prune(x, a, (24, 24), 64, prior=prior)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@gpu
@pytest.mark.parametrize("b,d", PATHS)
def test_cuda_graph_capture_and_replay(b, d):
    x, a = llava_like(b, 576, d, seed=3)
    want = prune(x, a, (24, 24), 64)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        prune(x, a, (24, 24), 64)  # warm up on the side stream
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = prune(x, a, (24, 24), 64)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)
    x2, a2 = llava_like(b, 576, d, seed=4)  # new data through the same graph
    x.copy_(x2)
    a.copy_(a2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, prune(x2, a2, (24, 24), 64))


@gpu
def test_oversize_n_is_refused_before_the_launch():
    order = torch.arange(200_000, device="cuda")[None]
    adj = torch.zeros(1, 200_000 - 10, layout.num_words(200_000 - 10), dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="supports N <="):
        mis.greedy_mis(adj, order, 10, 20)


# -- the ragged path at serving sizes (issue 22, item 7) ---------------------------------------

def _serving_batch(seed=0, d=3584):
    """benchmarks.ragged's 8 Qwen2-VL-like images (16x16 .. 46x46 merged tokens), packed."""
    from benchmarks.ragged import GRIDS, RATIO, packed_batch
    x, a, prior, cu, _, _ = packed_batch(GRIDS, d, torch.device("cuda"), torch.bfloat16, seed)
    return list(GRIDS), RATIO, x, a, prior, cu


def _loop_of_prune(x, a, prior, cu, grids, k):
    """prune_varlen's contract: each image through prune() alone, its offset added."""
    out = []
    for b, grid in enumerate(grids):
        s, e = int(cu[b]), int(cu[b + 1])
        p = None if prior is None else prior[s:e]
        out.append(prune(x[s:e], a[..., s:e], grid, k, prior=p) + s)
    return torch.cat(out)


def _row_ranges():
    """Row ranges of the ragged plans made since the cache was last cleared (one place to
    follow kernels/varlen.py if its plan cache moves)."""
    from d2pruner_kernels.kernels import varlen as kv
    return sorted({p.ranges for p in kv._cache.values()})


def _clear_plans():
    from d2pruner_kernels.kernels import varlen as kv
    kv._cache.clear()


_graph_of = timing.captured  # fn warmed up on a side stream, then captured: (graph, out)


@gpu
def test_ragged_serving_batch_takes_two_row_ranges_and_equals_prune():
    """D 3584, bf16, 25 % kept: the batch's tiles fill the SMs more than once, so each graph
    is built in two row ranges (graph kernel RAGGED + HAS_SKIP, ragged MIS with skip/done),
    the path no other GPU test reaches. Bit for bit the loop of prune(), 20 times."""
    grids, k, x, a, prior, cu = _serving_batch()
    want = _loop_of_prune(x, a, prior, cu, grids, k)
    _clear_plans()
    keep, cu_keep = d2p.prune_varlen(x, a, cu, grids, k, prior=prior)
    assert _row_ranges() == [2], f"expected the two-range ragged path, got {_row_ranges()}"
    assert torch.equal(keep, want)
    assert cu_keep.tolist()[-1] == want.numel()
    for _ in range(20):
        assert torch.equal(d2p.prune_varlen(x, a, cu, grids, k, prior=prior)[0], keep)


@gpu
def test_ragged_two_ranges_with_settled_and_unsettled_images(monkeypatch):
    """Two row ranges forced at moderate sizes (LAZY_MIN_WAVES < 0): images that settle in
    the prefix (done, then skipped by range 2) beside near-duplicate images whose walk runs
    out of the prefix (range 2 builds and reads the rest), spatial term on."""
    from d2pruner_kernels.kernels import lazy_graph
    monkeypatch.setattr(lazy_graph, "LAZY_MIN_WAVES", -1.0)
    grids = [(24, 24), (20, 30), (2, 12, 12), (16, 16), (3, 5)]
    lengths = [math.prod(g) for g in grids]
    g = torch.Generator().manual_seed(7)
    parts = [clustered_tokens(1, n, 256, clusters=16, noise=0.6, generator=g)[0] for n in lengths]
    parts[1] = parts[1][:1] + 0.01 * parts[1]  # near-duplicates: every candidate adjacent
    parts[3] = parts[3][:1] + 0.01 * parts[3]
    x = torch.cat(parts).cuda().bfloat16()
    a = torch.cat([distinct_attention(1, 4, n, generator=g)[0] for n in lengths], 1).cuda()
    cu = torch.tensor([0] + lengths).cumsum(0)
    ks = [64, 150, 40, 200, 4]
    want = torch.cat([prune(x[s:e], a[:, s:e], gr, kb, spatial_weight=0.3) + s for gr, kb, s, e
                      in zip(grids, ks, cu[:-1].tolist(), cu[1:].tolist())])
    _clear_plans()
    keep, _ = d2p.prune_varlen(x, a, cu, grids, ks, spatial_weight=0.3)
    assert _row_ranges() == [2]
    assert torch.equal(keep, want)


@gpu
def test_ragged_serving_batch_no_sync_and_cuda_graph():
    """A cached layout runs without a host sync; captured after a warm-up, the graph
    replays on new values to the loop of prune() on them."""
    grids, k, x, a, prior, cu = _serving_batch(seed=1)
    cu_d = cu.cuda()
    d2p.prune_varlen(x, a, cu_d, grids, k, prior=prior)  # compiles; caches the layout
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        d2p.prune_varlen(x, a, cu_d, grids, k, prior=prior)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph, (out, _) = _graph_of(lambda: d2p.prune_varlen(x, a, cu_d, grids, k, prior=prior))
    _, _, x2, a2, _, _ = _serving_batch(seed=2)
    x.copy_(x2)
    a.copy_(a2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, _loop_of_prune(x2, a2, prior, cu, grids, k))


# -- attention_scores under capture, at a real model's shape ----------------------------------

@gpu
def test_attention_scores_capture_and_replay_at_qwen2vl_shape():
    """Hq 28 / Hk 4, d 128, bf16, a left-padded batch of 4 with 1500 keys: one span shared by
    every sample, with the padding mask and q_positions, with and without a given lse,
    against the reference; captured after a warm-up, replayed on new q / k equal to eager;
    per-sample spans under capture raise the documented error and leave the stream usable."""
    b, hq, hk, d, n_keys, span = 4, 28, 4, 128, 1500, (350, 350 + 576)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, hq, 1, d, device="cuda", generator=g).bfloat16()
    k = torch.randn(b, hk, n_keys, d, device="cuda", generator=g).bfloat16()
    pads = torch.tensor([0, 100, 7, 300], device="cuda")
    mask = torch.arange(n_keys, device="cuda")[None] >= pads[:, None]
    kw = dict(key_padding_mask=mask, q_positions=torch.full((b, 1), n_keys - 1, device="cuda"))
    logits = (q.double() @ k.double().repeat_interleave(hq // hk, 1).transpose(-1, -2)) * d ** -0.5
    lse = torch.logsumexp(logits.masked_fill(~mask[:, None, None], float("-inf")), -1).float()

    def both():
        return (d2p.attention_scores(q, k, key_span=span, **kw),
                d2p.attention_scores(q, k, key_span=span, lse=lse, **kw))

    want = d2p.attention_scores(q, k, key_span=span, backend="reference", **kw)
    for got in both():
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    graph, out = _graph_of(both)
    q.copy_(torch.randn(b, hq, 1, d, device="cuda", generator=g).bfloat16())
    k.copy_(torch.randn(b, hk, n_keys, d, device="cuda", generator=g).bfloat16())
    graph.replay()
    torch.cuda.synchronize()
    eager = d2p.attention_scores(q, k, key_span=span, **kw)
    assert torch.equal(out[0], eager)
    spans = [(300, 876), (400, 976), (310, 886), (650, 1226)]
    with pytest.raises(RuntimeError, match="cannot be captured"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            d2p.attention_scores(q, k, key_span=spans, packed=True, **kw)
    torch.cuda.synchronize()
    assert torch.equal(d2p.attention_scores(q, k, key_span=span, **kw), eager)


# -- sizes past int32 and an odd feature dimension ---------------------------------------------

@gpu
def test_dense_batch_past_2_31_elements():
    """B 72 x N 8192 x D 4096 bf16 = 2.4e9 elements (4.8 GB): batch offsets past int32 in
    the norms, graph and MIS launches. The batch's selection equals each image's alone
    (first, middle, last; the last near-duplicates, so its walk needs the second range), the
    norms torch's, the rank order torch's stable sort."""
    from d2pruner_kernels.kernels import rank
    b, n, d, grid, k = 72, 8192, 4096, (64, 128), 819
    assert b * n * d > 2 ** 31
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(b, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    x[-1] = x[-1, :1] + 0.05 * x[-1]
    a = torch.rand(b, 4, n, device="cuda", generator=g)
    got = prune(x, a, grid, k)
    for i in (0, 37, b - 1):
        assert torch.equal(prune(x[i:i + 1], a[i:i + 1], grid, k), got[i:i + 1]), i
    s = d2p.debiased_scores(a)
    order, norms = rank.rank_and_norms(s, x)
    assert torch.equal(order, reference.rank_order(s))
    for i in (0, b - 1):
        torch.testing.assert_close(norms[i], torch.linalg.vector_norm(x[i].float(), dim=-1),
                                   rtol=1e-5, atol=0)


@gpu
def test_feature_dim_not_a_multiple_of_16():
    """D = 1176 (no divisibility hint: no cp.async, 255 registers and spills on sm_90) is
    accepted as it is: the graph matches the reference outside the band, the ragged path
    matches the dense one, and zero-padding D to 1184 selects the same indices (the
    alternative benchmarks.varlen_ab times against it)."""
    import torch.nn.functional as F
    x, a = llava_like(8, 576, 1176, seed=6)
    order = d2p.rank_order(d2p.debiased_scores(a))
    got = d2p.similarity_graph(x, order, 44, (24, 24), backend="kernels")
    want = d2p.similarity_graph(x, order, 44, (24, 24), backend="reference")
    assert_edges_match(got, want, 576 - 44, in_band(x, order, 44, (1, 24, 24), 0.8, 0.0))
    dense = prune(x, a, (24, 24), 64)
    assert torch.equal(prune(F.pad(x, (0, 8)), a, (24, 24), 64), dense)
    cu = torch.arange(0, 9 * 576, 576, dtype=torch.int32)
    keep, _ = d2p.prune_varlen(x.reshape(-1, 1176), a.transpose(0, 1).reshape(a.shape[1], -1), cu,
                               [(24, 24)] * 8, 64)
    assert torch.equal(keep.view(8, 64), dense + torch.arange(0, 8 * 576, 576, device="cuda")[:, None])


# -- .ci/gpu_check.py's own plumbing (runs everywhere, no GPU needed) --------------------------

def _driver():
    ci = str(Path(__file__).resolve().parents[1] / ".ci")
    if ci not in sys.path:
        sys.path.insert(0, ci)
    import gpu_check
    return gpu_check


def test_gpu_check_steps_pass_fail_time_out_and_skip_into_the_summary(tmp_path):
    gc = _driver()
    check = gc.Check(tmp_path, budget=8, dry=False, commit="abc1234")
    py = sys.executable
    plan = [gc.Step("ok", 0, 5, cmd=[py, "-c", "print('all answers right')"]),
            gc.Step("fails", 0, 5, cmd=[py, "-c", "raise SystemExit(3)"]),
            gc.Step("hangs", 0, 1.5, cmd=[py, "-c", "import time; time.sleep(60)"]),
            gc.Step("too_big", 100, 200, cmd=[py, "-c", "print(1)"])]
    statuses = [check.run(s).status for s in plan]
    assert statuses == ["PASS", "FAIL", "TIMEOUT", "SKIPPED"]
    assert check.results[2].seconds < 5  # killed at its limit, not after the sleep
    md = (tmp_path / "summary.md").read_text()
    assert "| too_big | SKIPPED |" in md and "needs 100" in md
    assert "all answers right" in md and "rc=3" in md and "commit: abc1234" in md
    data = json.loads((tmp_path / "summary.json").read_text())
    assert [s["status"] for s in data["steps"]] == statuses
    import tarfile
    with tarfile.open(tmp_path / "logs.tgz") as tar:
        assert {"logs/ok.log", "logs/hangs.log"} <= set(tar.getnames())
    check.close()


def test_gpu_check_reads_junit_and_fills_the_commit_of_history_rows(tmp_path):
    gc = _driver()
    (tmp_path / "j.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.test_gpu" name="a" time="3.5"/>'
        '<testcase classname="tests.test_gpu" name="b" time="0.1"><failure message="boom&#10;more"/>'
        '</testcase><testcase classname="tests.test_gpu" name="c" time="0">'
        '<skipped message="needs a CUDA GPU"/></testcase></testsuite></testsuites>')
    lines = gc.junit_detail(tmp_path / "j.xml", dry=False)
    assert lines[0] == "3 tests: 1 passed, 1 failed, 1 skipped"
    assert "FAILURE test_gpu::b: boom" in lines and "skipped x1: needs a CUDA GPU" in lines
    assert "slowest: 3.5 s a" in lines
    assert gc.junit_detail(tmp_path / "none.xml", dry=False)[0].startswith("no junit file")
    row = dict(date="d", commit="unknown", device="NVIDIA H100 80GB HBM3", torch="2.11", triton="3.6.0",
               cuda="13.0", command="c", table="varlen", row="r", shape="s", column="ours eager",
               value=1e-4, unit="s", note="")
    check = gc.Check(tmp_path, budget=5, dry=False, commit="abc1234")
    (tmp_path / "history.jsonl").write_text(json.dumps(row) + "\n")
    check.write()
    check.close()
    assert json.loads((tmp_path / "history.jsonl").read_text())["commit"] == "abc1234"
    assert "| NVIDIA H100 80GB HBM3 | varlen | r | s | ours eager | 100.0 µs |" in \
        (tmp_path / "summary.md").read_text()


def test_gpu_check_interrupts_pytest_at_its_limit_and_keeps_its_report(tmp_path):
    """A test step past its limit gets SIGINT first: pytest stops, writes its junit file
    and summary (what ran, what failed), then the step reports TIMEOUT with those counts."""
    gc = _driver()
    (tmp_path / "test_s.py").write_text("import time\ndef test_a():\n    assert False\n"
                                        "def test_b():\n    time.sleep(60)\n")
    check = gc.Check(tmp_path, budget=60, dry=False, commit=None)
    step = gc.Step("tests", 0, 8, cmd=[sys.executable, "-m", "pytest", str(tmp_path / "test_s.py"),
                                       "-p", "no:cacheprovider", "--junitxml",
                                       str(tmp_path / "junit_tests.xml")],
                   junit="junit_tests.xml", grace=5)
    r = check.run(step)
    check.close()
    assert r.status == "TIMEOUT" and r.seconds < 20
    assert r.detail[1] == ("2 tests: 0 passed, 1 failed, 0 skipped, 1 interrupted (the tests "
                           "after it did not run)"), r.detail
    assert any("FAILURE test_s::test_a" in d for d in r.detail)


def test_gpu_check_fallback_per_test_timeout(tmp_path):
    """Without pytest-timeout the driver loads itself as a plugin: a test past its limit
    fails (and says so) while the others run."""
    gc = _driver()
    (tmp_path / "test_t.py").write_text("import time\ndef test_slow():\n    time.sleep(30)\n"
                                        "def test_fast():\n    pass\n")
    r = subprocess.run([sys.executable, "-m", "pytest", str(tmp_path / "test_t.py"), "-q",
                        "-p", "gpu_check", "--d2p-timeout", "1", "-p", "no:cacheprovider"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=60,
                       env=dict(gc.os.environ, PYTHONPATH=str(Path(gc.__file__).parent)))
    assert "1 failed, 1 passed" in r.stdout, r.stdout[-2000:]
    assert "per-test timeout" in r.stdout
