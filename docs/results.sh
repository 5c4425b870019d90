#!/usr/bin/env bash
# The runs behind docs/RESULTS.md: per benchmark and scenario, tune every method on a
# validation split (seed 1000), evaluate the picked settings on seeds 0-4, and ablate CLASSP
# (task-incremental). Two benchmark groups run side by side; everything under `nice -n 10`.
# Usage: bash docs/results.sh [OUT [GROUP]]   (default runs/results, both groups a and b)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/results}
CLI=".venv/bin/classp-fused"
METHODS=sgd,adagrad,classp,ewc,mas
FASHION=(--epochs 2 --max-per-task 2000)

one() {  # benchmark scenario [protocol options...]
  local b=$1 s=$2; shift 2
  nice -n 10 $CLI tune --benchmark "$b" --scenario "$s" --methods $METHODS --seeds 1000, \
    "$@" --out "$OUT/tune/$b-$s"
  nice -n 10 $CLI run --config "$OUT/tune/$b-$s/tuned.json" --seeds 5 --out "$OUT/eval/$b-$s"
  if [ "$s" = task ]; then
    local c="$OUT/tune/$b-$s/tuned.json" a="$OUT/ablation/$b"
    nice -n 10 $CLI run --config "$c" --methods classp --seeds 5 \
      --hparam classp.threshold=0 --out "$a/threshold-0"
    local p; p=$(python3 -c "import json,sys; print(3.0-json.load(open(sys.argv[1]))['hparams']['classp']['power'])" "$c")
    nice -n 10 $CLI run --config "$c" --methods classp --seeds 5 \
      --hparam classp.power="$p" --out "$a/power-$p"
    nice -n 10 $CLI run --config "$c" --methods classp --seeds 5 \
      --hparam classp.apply_scaling=false --out "$a/no-scaling"
  fi
}

group_a() {
  one split-digits task; one split-digits class
  one permuted-digits task; one permuted-digits class
  one split-fashion task "${FASHION[@]}"; one split-fashion class "${FASHION[@]}"
}
group_b() {
  one permuted-fashion task "${FASHION[@]}"; one permuted-fashion class "${FASHION[@]}"
}
case ${2:-ab} in
  a) group_a > "$OUT.a.log" 2>&1 ;;
  b) group_b > "$OUT.b.log" 2>&1 ;;
  *) group_a > "$OUT.a.log" 2>&1 & group_b > "$OUT.b.log" 2>&1 & wait ;;
esac
