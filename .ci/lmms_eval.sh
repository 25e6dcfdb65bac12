#!/usr/bin/env bash
# CI (no GPU): the lmms-eval entries (d2pruner_kernels/lmms_eval_models.py) through lmms-eval's
# own command line, in their own venv .venv-lmms (reused while newer than pyproject.toml):
# torch first, then the package with the `lmms` extra, decord (lmms-eval's HF model modules
# import it) and pytest, torch held by constraints.txt. lmms-eval pulls PyPI's CUDA
# torchvision, which fails beside the CPU torch (`torchvision::nms`): the vLLM tests' import
# repair (tools/vllm_cpu_repair.py) makes lmms-eval's model classes import here too.
# Fresh: ~3 min install on 2 cores (wheels cached; 181 s measured); the tests ~1.2 min (13
# lmms-eval runs, each test's side by side: 72 s at load 2.5); reused: the tests. A skip fails
# the run (D2PRUNER_REQUIRE_LMMS=1 turns the no-lmms_eval skip into an error; -rs lists skips).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
VENV=.venv-lmms
STAMP=$VENV/.installed
if [ ! -x "$VENV/bin/python" ] || [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.13.0
    "$VENV/bin/pip" install -q -e '.[lmms]' decord pytest -c constraints.txt
    touch "$STAMP"
    echo "$VENV installed in $(( $(date +%s) - start )) s"
fi
"$VENV/bin/python" tools/vllm_cpu_repair.py
"$VENV/bin/python" -c "from lmms_eval.models import get_model; get_model('d2pruner_qwen2_5_vl')"
log=/tmp/d2pruner-lmms-eval-tests.log
D2PRUNER_REQUIRE_LMMS=1 OMP_NUM_THREADS=1 "$VENV/bin/python" -m pytest tests/test_lmms_eval.py \
    -q -rs -p no:cacheprovider | tee "$log"
if grep -qiE "[0-9]+ skipped" "$log"; then echo "lmms-eval tests: a skip is not a pass"; exit 1; fi
echo "lmms-eval tests passed in $(( $(date +%s) - start )) s"
