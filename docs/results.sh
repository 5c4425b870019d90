#!/usr/bin/env bash
# The runs behind docs/RESULTS.md: per benchmark and scenario, tune every method on a
# validation split (seed 1000), evaluate the picked settings on seeds 0-4, and ablate CLASSP
# (task-incremental: threshold, power, scaling, and MAS's penalty in explicit and proximal form
# beside it). Two benchmark groups run side by side; everything under `nice -n 10`.
# Usage: bash docs/results.sh [OUT [GROUP]]   (default runs/results, both groups a and b)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/results}
CLI=".venv/bin/classp-fused"
METHODS=sgd,adagrad,classp,ewc,mas
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
group_c() {  # needs the tuned configs of groups a and b
  penalty split-digits; penalty permuted-digits; penalty split-fashion
}
group_d() {
  penalty permuted-fashion
}
case ${2:-ab} in
  a) group_a > "$OUT.a.log" 2>&1 ;;
  b) group_b > "$OUT.b.log" 2>&1 ;;
  cd) group_c > "$OUT.c.log" 2>&1 & group_d > "$OUT.d.log" 2>&1 & wait ;;
  *) group_a > "$OUT.a.log" 2>&1 & group_b > "$OUT.b.log" 2>&1 & wait
     group_c > "$OUT.c.log" 2>&1 & group_d > "$OUT.d.log" 2>&1 & wait ;;
esac
