#!/usr/bin/env bash
# The GPU check on a lent H100 / H200 (run from the repo root with the device tool), or its
# dry run on a CPU (CI). Steps, budgets and what comes back in $OUT: .ci/gpu_check.py.
#
#   call 1 (timeout_s 560):              bash .ci/gpu_check.sh --commit <hash>
#   call 2 (same warm machine, at once): bash .ci/gpu_check.sh --plan call2 --budget 170 --commit <hash>
#   CI, no GPU:                          PYTHON=.venv/bin/python bash .ci/gpu_check.sh --dry --out DIR
#
# The build is CMake + ninja straight into d2pruner_kernels/ (no pip, whatever the machine's
# setuptools), the repo on PYTHONPATH. The driver prints the summary last; if it died
# before that, this prints what it had written.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_out}
prev=""
for a in "$@"; do [ "$prev" = "--out" ] && OUT=$a; prev=$a; done
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
"$PY" .ci/gpu_check.py --out "$OUT" "$@"
rc=$?
if [ "$rc" -gt 1 ]; then
  echo "gpu_check.py died (rc $rc); its last summary:"
  cat "$OUT/summary.md" 2>/dev/null || echo "(none written)"
fi
exit $rc
