#!/usr/bin/env bash
# The runs behind docs/RESULTS.md's sections "Text stream" and "Relative against absolute
# threshold", one process at a time under `nice -n 19`, one torch thread:
#   tune-task: every method tuned on the text stream on a reduced grid
#     (docs/results_text_tune.py: 4 of the 12 configurations, tuning seed 1000 only) at half
#     size (1,000 training sequences per task, the 500 test sequences, 5 epochs; every later
#     text run takes the size from tuned.json);
#   eval-task, class-at-task-picks: the picks on the evaluation seeds, task- and
#     class-incremental (the class-incremental run at the task-incremental picks: no class tune);
#   ablation-threshold, -power, -scaling: CLASSP's threshold, power and scaling on the text
#     stream (task-incremental);
#   tau-text, tau-digits: CLASSP's relative threshold tau 0.5, 1, 2 at threshold 0 beside the
#     absolute thresholds 0 and 1e-4, each stream's tuned CLASSP settings otherwise.
# A stage runs the seeds after its colon (default 0-4) with --resume, so a second pass with more
# seeds keeps the cells the first one finished. The default passes are the ones docs/RESULTS.md
# reports (the tune, then every other stage on seeds 0-4; the evaluation reads the picks from
# OUT/tune/synthetic-sentiment-task/tuned.json, of which docs/text_picks.json is the picks part).
# tune-class and eval-class (tune and evaluate class-incremental) exist but were not run.
# Usage: bash docs/results_text.sh [OUT [STAGE[:SEEDS]...]]   (default runs/results-text and
# the passes in the order below). PYTHON names the interpreter (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/results-text}
shift || true
PY=${PYTHON:-.venv/bin/python}
CLI=(nice -n 19 "$PY" -m classp_fused)
TEXT=synthetic-sentiment
SIZE=(--max-per-task 1000)  # half the training sequences (1,000 per task); tuned.json keeps it
TAUS=(0.5 1 2)
SEEDS=0,1,2,3,4

hp() {  # tuned.json method key
  python3 -c "import json, sys; a = sys.argv
print(json.load(open(a[1]))['hparams'][a[2]][a[3]])" "$@"
}

run() {  # run options...: every run keeps the cells an earlier pass finished
  "${CLI[@]}" run --seeds $SEEDS --resume "$@"
}

tune() {  # scenario
  nice -n 19 "$PY" docs/results_text_tune.py --benchmark $TEXT --scenario "$1" --seeds 1000, \
    "${SIZE[@]}" --out "$OUT/tune/$TEXT-$1"
}

evaluate() {  # scenario
  run --config "$OUT/tune/$TEXT-$1/tuned.json" --out "$OUT/eval/$TEXT-$1"
}

class_at_task_picks() {
  run --config "$OUT/tune/$TEXT-task/tuned.json" --scenario class --out "$OUT/eval/$TEXT-class"
}

ablation() {  # variant: one setting of the tuned CLASSP changed
  local c="$OUT/tune/$TEXT-task/tuned.json" a="$OUT/ablation/$TEXT" other
  case $1 in
    threshold) other=$([ "$(hp "$c" classp threshold)" = 0.0 ] && echo 1e-4 || echo 0)
      run --config "$c" --methods classp --hparam classp.threshold="$other" \
        --out "$a/threshold-$other" ;;
    power) other=$(python3 -c "print(3.0 - $(hp "$c" classp power))")
      run --config "$c" --methods classp --hparam classp.power="$other" --out "$a/power-$other" ;;
    scaling) run --config "$c" --methods classp --hparam classp.apply_scaling=false \
      --out "$a/no-scaling" ;;
  esac
}

tau_text() {  # the absolute thresholds are the evaluation's and the ablation's threshold rows
  local c="$OUT/tune/$TEXT-task/tuned.json" tau
  for tau in "${TAUS[@]}"; do
    run --config "$c" --methods classp --hparam classp.threshold=0 \
      --hparam classp.relative_threshold="$tau" --out "$OUT/tau/$TEXT/tau-$tau"
  done
}

tau_digits() {  # each digits stream's tuned CLASSP (docs/RESULTS.md, "Picked settings")
  local b lr thr tau
  for b in split-digits permuted-digits; do
    lr=$([ $b = split-digits ] && echo 0.03 || echo 0.1)
    local set=(--benchmark $b --methods classp --hparam classp.lr=$lr --hparam classp.power=1
               --hparam classp.apply_scaling=true)
    for thr in 0 1e-4; do
      run "${set[@]}" --hparam classp.threshold=$thr --out "$OUT/tau/$b/threshold-$thr"
    done
    for tau in "${TAUS[@]}"; do
      run "${set[@]}" --hparam classp.threshold=0 --hparam classp.relative_threshold="$tau" \
        --out "$OUT/tau/$b/tau-$tau"
    done
  done
}

stage() {
  case $1 in
    tune-task) tune task ;;  eval-task) evaluate task ;;
    tune-class) tune class ;;  eval-class) evaluate class ;;
    class-at-task-picks) class_at_task_picks ;;
    ablation-threshold) ablation threshold ;;  ablation-power) ablation power ;;
    ablation-scaling) ablation scaling ;;  tau-text) tau_text ;;  tau-digits) tau_digits ;;
    *) echo "unknown stage $1" >&2; exit 2 ;;
  esac
}
PASSES=("$@")
[ ${#PASSES[@]} -gt 0 ] || PASSES=(tune-task tau-digits eval-task class-at-task-picks tau-text
  ablation-threshold ablation-power ablation-scaling)
for pass in "${PASSES[@]}"; do
  name=${pass%%:*}
  SEEDS=$([ "$name" = "$pass" ] && echo 0,1,2,3,4 || echo "${pass#*:}")
  [[ $SEEDS == *,* ]] || SEEDS+=,  # "0," is seed 0; "1" would mean one seed
  echo "== $pass $(date +%T)"
  TIMEFORMAT="== $pass: %R s wall, %U s user, %S s system"
  time stage "$name"
done
