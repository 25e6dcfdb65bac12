#!/usr/bin/env bash
# The compiled extension's CPU sources under AddressSanitizer: builds an instrumented _C with
# g++ -fsanitize=address into a temporary copy of the package (the in-tree _C is never
# touched), then runs .ci/asan_cases.py (the issue's reproducers for the compiled MIS, then
# valid inputs through every CPU entry point) against it. Fails on any ASAN report, a wrong
# answer or a missing error. torch is not instrumented: the ASAN runtime is preloaded (with
# libstdc++, else ASAN's __cxa_throw interceptor finds no real one: python does not link
# it), and leak detection is off (CPython and torch keep allocations until exit). ~15-25 s.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
py=${PYTHON:-$root/.venv/bin/python}
tmp=$(mktemp -d /tmp/d2pruner-asan.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
start=$(date +%s)

# A copy of the Python package without its _C, then the instrumented _C beside it.
mkdir -p "$tmp/pkg"
tar -C "$root" --exclude='_C*.so' --exclude='__pycache__' -cf - d2pruner_kernels | tar -C "$tmp/pkg" -xf -
suffix=$("$py" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
# pybind11 is a build requirement: with build isolation it is not in the venv itself
if ! includes=$("$py" -m pybind11 --includes 2>/dev/null); then
    "$py" -m pip install -q --target "$tmp/pybind11" pybind11
    includes="$("$py" -c "import sysconfig; print('-I' + sysconfig.get_paths()['include'])") -I$tmp/pybind11/pybind11/include"
fi
# shellcheck disable=SC2086  # the include flags are several words
g++ -std=c++17 -O1 -g -fno-omit-frame-pointer -fsanitize=address -fno-sanitize-recover=all \
    -shared -fPIC -Icsrc $includes csrc/*.cpp -o "$tmp/pkg/d2pruner_kernels/_C$suffix"

log=$tmp/run.log
mkdir -p "$tmp/reports"
set +e
(cd "$tmp" && PYTHONPATH="$tmp/pkg" TRITON_INTERPRET=0 \
    LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)" \
    ASAN_OPTIONS=detect_leaks=0:abort_on_error=0:halt_on_error=1:exitcode=99:log_path="$tmp/reports/asan" \
    "$py" "$root/.ci/asan_cases.py") 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
if compgen -G "$tmp/reports/asan.*" > /dev/null; then
    cat "$tmp"/reports/asan.* >&2
    echo "asan.sh: AddressSanitizer reported an error (exit $rc)" >&2
    exit 1
fi
if [ "$rc" -ne 0 ]; then
    echo "asan.sh: the cases failed (exit $rc)" >&2
    exit 1
fi
grep -q "_C from $tmp/pkg/" "$log" || { echo "asan.sh: the instrumented _C was not the one loaded" >&2; exit 1; }
echo "asan.sh: passed in $(( $(date +%s) - start )) s"
