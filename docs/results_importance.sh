#!/usr/bin/env bash
# MAS, EWC and CLASSP+MAS at their tuned settings (docs/RESULTS.md "Picked settings") with the
# importance kept in the param's dtype (fp32), bf16 and 8-bit, 5 seeds.
mkdir -p runs/results/importance
set -u
PY=${PYTHON:-.venv/bin/python}
run() {  # name benchmark scenario method hparams...
  local name=$1 bench=$2 scen=$3 method=$4; shift 4
  for fmt in param bf16 8bit; do
    $PY -m classp_fused run --benchmark $bench --scenario $scen --methods $method --seeds 5 --threads 1 \
      "$@" --hparam $method.importance_dtype=$fmt --out runs/results/importance/$name-$fmt --overwrite \
      > runs/results/importance/$name-$fmt.log 2>&1
    echo "$name $fmt rc=$?"
  done
}
run split-task-mas split-digits task mas --hparam mas.lr=0.1 --hparam mas.lam=1.0
run split-task-ewc split-digits task ewc --hparam ewc.lr=0.1 --hparam ewc.lam=1.0
run split-task-classp-mas split-digits task classp+mas --hparam classp+mas.lr=0.03 \
  --hparam classp+mas.threshold=0.0 --hparam classp+mas.power=2.0 --hparam classp+mas.lam=1.0
run permuted-task-mas permuted-digits task mas --hparam mas.lr=0.1 --hparam mas.lam=0.1
run permuted-task-ewc permuted-digits task ewc --hparam ewc.lr=0.1 --hparam ewc.lam=1.0
run split-class-ewc split-digits class ewc --hparam ewc.lr=0.01 --hparam ewc.lam=100.0
run split-task-online-ewc split-digits task online-ewc --hparam online-ewc.lr=0.1 --hparam online-ewc.lam=100.0
run split-class-mas split-digits class mas --hparam mas.lr=0.01 --hparam mas.lam=1.0
run permuted-task-online-ewc permuted-digits task online-ewc --hparam online-ewc.lr=0.1 --hparam online-ewc.lam=1.0
