#!/usr/bin/env bash
# What we run on a lent GPU machine (H100/H200): build against the machine's own torch, the
# GPU-relevant tests natively, per-stage timings and A/B rows, compute-sanitizer on the
# CUDA kernel, the benchmark report. Logs and tables go to $OUT, the measurements to
# $OUT/history.jsonl (append it to benchmarks/results/history.jsonl, then
# `python -m benchmarks.tables` remakes the tables there). One call must fit in 600 s, so
# the steps are chosen by STEPS (default: build tests stages sanitize, ~6 min; then a second
# call on the warm machine: STEPS="report"). FULL=1 runs the whole test suite.
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
step() { echo; echo "== $* ($(date +%T))"; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'triton', triton.__version__)"

STEPS=${STEPS:-build tests stages sanitize}
has() { case " $STEPS " in *" $1 "*) return 0;; esac; return 1; }

if has build; then
step build
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
fi
python3 -c "from d2pruner_kernels.kernels import mis; print('CUDA MIS available:', mis.cuda_available())"

if has tests; then
step tests
TESTS="tests/test_gpu.py tests/test_mis_kernel.py tests/test_prune.py tests/test_compile.py tests/test_scores_kernel.py tests/test_rank_kernel.py tests/test_graph_kernel.py tests/test_attention_kernel.py tests/test_varlen.py tests/test_memory_safety.py tests/test_cpu_walk.py"
[ "${FULL:-0}" = 1 ] && TESTS=tests
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 16")  # parallel Triton compiles
timeout "${TEST_TIMEOUT:-80}" python3 -m pytest $TESTS -q -p no:cacheprovider $XDIST -rs \
  >"$OUT/tests.log" 2>&1
echo "tests rc=$?"; grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20
fi

if has stages; then
step stages
timeout "${STAGES_TIMEOUT:-200}" python3 -m benchmarks.stage_times --out "$OUT/stages.md" \
  --record "$OUT/history.jsonl" >"$OUT/stages.log" 2>&1
echo "stages rc=$?"; tail -4 "$OUT/stages.log"
fi

if has sanitize; then
step compute-sanitizer
for tool in memcheck ${SANITIZERS:-}; do
  timeout 45 compute-sanitizer --tool "$tool" --error-exitcode 9 python3 .ci/sanitize.py \
    >"$OUT/sanitize_$tool.log" 2>&1
  echo "$tool rc=$?"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|all answers right" "$OUT/sanitize_$tool.log" | head -3
done
fi

if has report; then
step report
timeout 240 python3 -m benchmarks.report --out "$OUT/report.md" --record "$OUT/history.jsonl" \
  >"$OUT/report.log" 2>&1
echo "report rc=$?"; tail -3 "$OUT/report.log"
fi
step end
for f in stages report; do cat "$OUT/$f.md" 2>/dev/null || cat "$OUT/$f.log" 2>/dev/null; done
