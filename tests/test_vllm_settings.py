"""The vLLM plugin's settings (d2pruner_kernels/vllm_plugin/settings.py): parsed and checked
at engine start without vLLM and without a device, every bad value a ValueError naming its
variable. Runs in the main venv (vLLM itself is tested in tests/test_vllm.py)."""
from __future__ import annotations

import warnings

import pytest
import torch

from d2pruner_kernels.options import PruneOptions
from d2pruner_kernels.prior import PositionalPrior
from d2pruner_kernels.vllm_plugin.settings import read_settings

K, OPTIONS, PRIOR = "D2PRUNER_VLLM_K", "D2PRUNER_VLLM_OPTIONS", "D2PRUNER_VLLM_PRIOR"


def test_off_unless_k_is_set():
    assert read_settings({}) is None
    assert read_settings({K: " "}) is None


def test_k_and_options_become_one_pruneoptions():
    assert read_settings({K: "64"}).k == 64
    assert read_settings({K: "0.25"}).k == 0.25
    s = read_settings({K: "32", OPTIONS: '{"pivot_ratio": 1, "radius": 3}'})
    assert s.options == PruneOptions(pivot_ratio=1.0, radius=3)
    assert s.budget(576) == 32 and s.prior is None


def test_an_option_valid_on_the_serving_machine_passes_engine_start_on_any_machine():
    # backend="kernels" needs Triton and a GPU where the kernels run, not where the engine
    # starts: it used to fail here with a RuntimeError naming neither the variable nor why
    s = read_settings({K: "64", OPTIONS: '{"backend": "kernels", "check_finite": true}'})
    assert s.options.backend == "kernels" and s.options.check_finite is True


@pytest.mark.parametrize("value, match", [
    ("0", r"D2PRUNER_VLLM_K must be an int >= 1"),
    ("1.5", r"D2PRUNER_VLLM_K as a ratio must be in \(0, 1\]"),
    ("-0.1", r"D2PRUNER_VLLM_K as a ratio must be in \(0, 1\]"),
    ("nan", r"D2PRUNER_VLLM_K as a ratio"),
    ("many", r"D2PRUNER_VLLM_K must be an int >= 1"),
    ("1" * 5000, r"D2PRUNER_VLLM_K"),
])
def test_bad_k_raises_naming_the_variable(value, match):
    with pytest.raises(ValueError, match=match):
        read_settings({K: value})


@pytest.mark.parametrize("value, match", [
    ('{"pivots": 1}', r"D2PRUNER_VLLM_OPTIONS.*unknown prune option\(s\) 'pivots'"),
    ('{"prior": "x.safetensors"}', r"D2PRUNER_VLLM_OPTIONS.*unknown prune option\(s\) 'prior'"),
    ('{"pivot_ratio": 2}', r"D2PRUNER_VLLM_OPTIONS: pivot_ratio must be in \[0.0, 1.0\]"),
    ('{"radius": 1.5}', r"D2PRUNER_VLLM_OPTIONS: radius must be an int"),
    ('{"check_finite": 1}', r"D2PRUNER_VLLM_OPTIONS: check_finite must be a bool"),
    ('{"backend": "gpu"}', r"D2PRUNER_VLLM_OPTIONS: backend must be one of"),
    ("pivot_ratio=1", r"D2PRUNER_VLLM_OPTIONS must be a JSON object of prune\(\) options"),
    ("[1, 2]", r"D2PRUNER_VLLM_OPTIONS must be a JSON object, got list"),
    ("[" * 3000 + "]" * 3000, r"D2PRUNER_VLLM_OPTIONS"),                    # deep nesting
    ('{"radius": ' + "9" * 5000 + "}", r"D2PRUNER_VLLM_OPTIONS"),           # a huge number
    ('{"a": ' * 1500 + "1" + "}" * 1500, r"D2PRUNER_VLLM_OPTIONS"),
])
def test_bad_options_raise_valueerror_naming_the_variable(value, match):
    with pytest.raises(ValueError, match=match):  # never RecursionError / a nameless message
        read_settings({K: "8", OPTIONS: value})


def test_prior_file(tmp_path):
    prior = PositionalPrior((24, 24), model="tiny-llava", layer=0, query="cls")
    prior.update(torch.rand(2, 576) + 0.5)
    prior.save(tmp_path / "prior.safetensors")
    s = read_settings({K: "64", PRIOR: str(tmp_path / "prior.safetensors")})
    assert isinstance(s.prior, PositionalPrior) and s.prior.grid == (24, 24)
    assert s.options.prior is s.prior
    for bad in (tmp_path / "missing.safetensors", tmp_path):
        with pytest.raises(ValueError, match=r"D2PRUNER_VLLM_PRIOR: "):
            read_settings({K: "64", PRIOR: str(bad)})


def test_a_budget_above_a_fixed_image_names_the_variable():
    with pytest.raises(ValueError, match=r"D2PRUNER_VLLM_K must be in \[1, N=576\], got 600"):
        read_settings({K: "600"}).budget(576)


def test_settings_without_k_warn_that_pruning_is_off():
    for env in ({OPTIONS: '{"pivot_ratio": 0.5}'}, {PRIOR: "/p.safetensors"},
                {"D2PRUNER_VLLM_KK": "64"}):  # a typo in K's name
        with pytest.warns(UserWarning, match=r"D2PRUNER_VLLM_K is not: D2Pruner pruning is off"):
            assert read_settings(env) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_settings({"OTHER": "1"}) is None


def _vllm_config(**compilation):
    from types import SimpleNamespace as NS
    vision = NS(model_type="clip_vision_model", num_hidden_layers=2, image_size=336,
                patch_size=14)
    hf_config = NS(vision_feature_select_strategy="default", vision_config=vision,
                   vision_feature_layer=-2)
    model = NS(architectures=["LlavaForConditionalGeneration"], model="m", hf_config=hf_config)
    return NS(model_config=model, compilation_config=NS(**compilation),
              parallel_config=NS(tensor_parallel_size=1, pipeline_parallel_size=1))


def test_an_encoder_replayed_as_a_cuda_graph_is_refused(monkeypatch):
    # vLLM's cudagraph_mm_encoder would replay the vision tower without the hook that reads
    # its attention: refused at engine start (check_model runs in create_engine_config)
    import d2pruner_kernels.vllm_plugin as plugin
    monkeypatch.setattr(plugin, "_SETTINGS", read_settings({"D2PRUNER_VLLM_K": "64"}))
    plugin.check_model(_vllm_config(cudagraph_mm_encoder=False))
    with pytest.raises(ValueError, match="D2PRUNER_VLLM_K: cudagraph_mm_encoder=True"):
        plugin.check_model(_vllm_config(cudagraph_mm_encoder=True))
