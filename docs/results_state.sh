#!/usr/bin/env bash
# CLASSP at its tuned settings (docs/RESULTS.md "Picked settings") with fp32, bf16 and 8-bit state, 5 seeds.
mkdir -p runs/results/state
set -u
PY=${PYTHON:-.venv/bin/python}
run() {  # name benchmark scenario hparams...
  local name=$1 bench=$2 scen=$3; shift 3
  for fmt in fp32 bf16 8bit; do
    $PY -m classp_fused run --benchmark $bench --scenario $scen --methods classp --seeds 5 --threads 1 \
      "$@" --hparam classp.state_dtype=$fmt --out runs/results/state/$name-$fmt --overwrite > runs/results/state/$name-$fmt.log 2>&1
    echo "$name $fmt rc=$?"
  done
}
run split-task split-digits task --hparam classp.lr=0.03 --hparam classp.threshold=1e-4 --hparam classp.power=1.0
run split-class split-digits class --hparam classp.lr=0.03 --hparam classp.threshold=0.0 --hparam classp.power=1.0
run permuted-task permuted-digits task --hparam classp.lr=0.1 --hparam classp.threshold=0.0 --hparam classp.power=1.0
run split-task-rel split-digits task --hparam classp.lr=0.03 --hparam classp.threshold=0.0 --hparam classp.relative_threshold=0.5
