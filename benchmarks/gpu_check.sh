#!/usr/bin/env bash
# Build, check, test and benchmark the GPU backends on a CUDA machine, in under 9.5 minutes.
#
#   bash benchmarks/gpu_check.sh
#
# For a machine that has torch, triton, nvcc, pytest and matplotlib installed and nothing
# pip-installable: builds the extension in place for sm_90 against that torch, runs the
# installation self-check (`classp-fused check`; Triton caches the kernels it compiles on disk,
# for the tests), the GPU-relevant tests, the host-time script and the GPU step suite. Each
# stage has a time limit (all together 9 minutes); a failed stage does not stop the later ones.
# Logs, the tests' JUnit XML, the suite's JSON and the rewritten RESULTS.md go to $OUT (default
# gpu_check/); summary.txt lists each stage's exit status and seconds. Exits non-zero if any
# stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python3}"
failed=0

stage() {  # stage NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log
  local name=$1 limit=$2 began=$SECONDS rc
  shift 2
  echo "== $name (limit $limit s)"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc, $((SECONDS - began)) s" | tee -a "$OUT/summary.txt"
  tail -n 15 "$OUT/$name.log"
  [ "$rc" -eq 0 ] || failed=1
  return "$rc"
}

: >"$OUT/summary.txt"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PYTHON" -c "import torch, triton
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

stage build 90 env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 "$PYTHON" setup.py build_ext --inplace \
  || { echo "build failed: see $OUT/build.log"; exit 1; }

stage self_check 90 "$PYTHON" -m classp_fused.check --device cuda

stage tests 170 "$PYTHON" -m pytest -q -p no:cacheprovider --junitxml="$OUT/tests.xml" \
  tests/test_cuda_compile.py tests/test_step_dispatch.py tests/test_capture.py \
  tests/test_triton_kernel.py tests/test_parity.py tests/test_amp.py tests/test_oracles.py \
  tests/test_compile.py tests/test_optim.py

stage host_time 30 "$PYTHON" benchmarks/step_overhead.py --device cuda --repeats 5

stage suite 140 "$PYTHON" -m benchmarks --device cuda --budget-s 100
# RESULTS.md from whatever the suite wrote, also if it was cut short
stage report 20 "$PYTHON" -m benchmarks.report
cp benchmarks/gpu_step_cuda.json benchmarks/RESULTS.md "$OUT"/ 2>/dev/null

echo "results in $OUT"
exit "$failed"
