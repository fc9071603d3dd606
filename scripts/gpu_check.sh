#!/usr/bin/env bash
# The checks that need a GPU, as one script: the CUDA test tier, then the benchmark on CUDA.
# Usage (on a CUDA machine, from the repository root): bash scripts/gpu_check.sh [OUT_DIR]
# Python packages missing there can come as wheels in .whl/ (installed to /tmp/site first).
set -uo pipefail
OUT=${1:-${OUT:-gpu-check}}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; python3 -c "import torch; print('torch', torch.__version__)"; } | tee "$OUT/device.txt"
# the compiled kernels (manualbp.native), built once up front (about a minute); the Python paths if that fails
export MANUALBP_NATIVE_DIR="${MANUALBP_NATIVE_DIR:-/tmp/manualbp-native}"
timeout "${BUILD_TIMEOUT:-150}" python3 -m manualbp.native 2>&1 | tail -2 | tee "$OUT/native.txt"
# every test marked cuda (slow ones included), wherever it lives: the marker selects them, not a list of files
timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider -m cuda tests \
  2>&1 | tee "$OUT/cuda_tests.log" | tail -6
# the conformance suite on manualbp's own Functions, whose cuda row runs here (CUDA against CPU, float64)
timeout "${CHECK_TIMEOUT:-120}" python3 -m manualbp.cli check --builtin --skip torch.compile 2>&1 | tee "$OUT/conformance.txt" | tail -20
timeout "${BENCH_TIMEOUT:-220}" python3 scripts/bench.py --device cuda --out "$OUT/bench" 2>&1 | tail -45
timeout "${COMPILE_TIMEOUT:-150}" python3 scripts/bench.py --device cuda --quick --compile --no-digits --out "$OUT/bench_compile" 2>&1 | tail -25
