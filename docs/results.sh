#!/usr/bin/env bash
# The runs behind docs/RESULTS.md: per benchmark and scenario, tune every method on a
# validation split (tuning seeds 1000 and 1001), evaluate the picked settings on seeds 0-4, and
# ablate CLASSP (task-incremental: threshold, power, scaling, and MAS's penalty in explicit and
# proximal form beside it). The permuted streams have all ten classes in every task, so their
# class-incremental run is their task-incremental run and is not repeated. Group c tunes and
# evaluates online EWC and CLASSP plus MAS by the same protocol (their own tuned.json files;
# each method's pick is independent of the others'). Groups run side by side, under `nice -n 10`.
# Usage: bash docs/results.sh [OUT [GROUP]]   (default runs/results: groups a, b and c,
# then the plots; GROUP a, b, c or plots runs one part)
# Every command writes into a folder of its own under OUT. classp-fused refuses to replace an
# earlier run's results without --resume or --overwrite, so a second pass into the same OUT
# stops at its first command: give a new OUT, or remove the old one first.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/results}
mkdir -p "$(dirname "$OUT")"
CLI=".venv/bin/classp-fused"
METHODS=sgd,adagrad,classp,ewc,mas
ADDED=online-ewc,classp+mas
TUNING_SEEDS=1000,1001
FASHION=(--epochs 2 --max-per-task 2000)

hp() {  # tuned.json method key
  python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['hparams'][sys.argv[2]][sys.argv[3]])" "$@"
}

penalty() {  # benchmark: MAS's penalty, explicit vs proximal, beside tuned CLASSP and SGD
  local c="$OUT/tune/$1-task/tuned.json" a="$OUT/ablation/$1"
  local both=(--hparam "classp+mas.lam=$(hp "$c" mas lam)")
  for key in lr threshold power apply_scaling; do
    both+=(--hparam "classp+mas.$key=$(hp "$c" classp $key | tr A-Z a-z)")
  done
  nice -n 10 $CLI run --config "$c" --methods classp+mas,mas --seeds 5 "${both[@]}" \
    --out "$a/penalty-explicit"
  nice -n 10 $CLI run --config "$c" --methods classp+mas,mas --seeds 5 "${both[@]}" \
    --hparam classp+mas.penalty=proximal --hparam mas.penalty=proximal --out "$a/penalty-proximal"
  if [ "$(hp "$c" classp threshold)" = 0.0 ]; then
    nice -n 10 $CLI run --config "$c" --methods classp --seeds 5 \
      --hparam classp.threshold=1e-4 --out "$a/threshold-1e-4"
  fi
}

one() {  # benchmark scenario [protocol options...]
  local b=$1 s=$2; shift 2
  nice -n 10 $CLI tune --benchmark "$b" --scenario "$s" --methods $METHODS \
    --seeds $TUNING_SEEDS "$@" --out "$OUT/tune/$b-$s"
  nice -n 10 $CLI run --config "$OUT/tune/$b-$s/tuned.json" --seeds 5 --out "$OUT/eval/$b-$s"
  if [ "$s" = task ]; then
    local c="$OUT/tune/$b-$s/tuned.json" a="$OUT/ablation/$b"
    if [ "$(hp "$c" classp threshold)" != 0.0 ]; then
      nice -n 10 $CLI run --config "$c" --methods classp --seeds 5 \
        --hparam classp.threshold=0 --out "$a/threshold-0"
    fi
    local p; p=$(python3 -c "import json,sys; print(3.0-json.load(open(sys.argv[1]))['hparams']['classp']['power'])" "$c")
    nice -n 10 $CLI run --config "$c" --methods classp --seeds 5 \
      --hparam classp.power="$p" --out "$a/power-$p"
    if [ "$(hp "$c" classp apply_scaling)" = True ]; then
      nice -n 10 $CLI run --config "$c" --methods classp --seeds 5 \
        --hparam classp.apply_scaling=false --out "$a/no-scaling"
    fi
    penalty "$b"
  fi
}

added() {  # benchmark scenario [protocol options...]: online EWC and CLASSP plus MAS
  local b=$1 s=$2; shift 2
  nice -n 10 $CLI tune --benchmark "$b" --scenario "$s" --methods $ADDED \
    --seeds $TUNING_SEEDS "$@" --out "$OUT/tune-added/$b-$s"
  nice -n 10 $CLI run --config "$OUT/tune-added/$b-$s/tuned.json" --seeds 5 \
    --out "$OUT/eval-added/$b-$s"
}

group_a() {
  one split-digits task; one split-digits class; one permuted-digits task
  one split-fashion class "${FASHION[@]}"
}
group_b() {
  one split-fashion task "${FASHION[@]}"; one permuted-fashion task "${FASHION[@]}"
}
group_c() {
  added split-digits task; added split-digits class; added permuted-digits task
  added split-fashion task "${FASHION[@]}"; added split-fashion class "${FASHION[@]}"
  added permuted-fashion task "${FASHION[@]}"
}
plots() {  # docs/results/: the task-incremental evaluations, every method in one figure
  .venv/bin/python - "$OUT" docs/results <<'PY'
import json, sys
from pathlib import Path
from classp_fused.cl.report import plot_accuracy_matrices, plot_task_accuracy
out, docs = Path(sys.argv[1]), Path(sys.argv[2])
for b in ("split-digits", "permuted-digits", "split-fashion", "permuted-fashion"):
    entry = None
    for part in ("eval", "eval-added"):
        e = json.loads((out / part / f"{b}-task/results.json").read_text())["benchmarks"][b]
        entry = e if entry is None else {**entry, "methods": {**entry["methods"], **e["methods"]}}
    plot_accuracy_matrices(b, entry, docs / f"{b}-task-acc-matrix.png")
    if b.startswith("permuted"):
        plot_task_accuracy(b, entry, docs / f"{b}-task-accuracy.png")
PY
}
case ${2:-abc} in
  a) group_a > "$OUT.a.log" 2>&1 ;;
  b) group_b > "$OUT.b.log" 2>&1 ;;
  c) group_c > "$OUT.c.log" 2>&1 ;;
  plots) plots ;;
  *) group_a > "$OUT.a.log" 2>&1 & group_b > "$OUT.b.log" 2>&1 &
     group_c > "$OUT.c.log" 2>&1 & wait; plots ;;
esac
