#!/usr/bin/env bash
# The text stream (half size) at its picks (docs/text_picks.json) with CLASSP's state and MAS's
# importance in each format, 5 seeds: docs/RESULTS.md "Compressed state on the text stream".
set -u
OUT=${1:-runs/results-text-state}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
for fmt in bf16 8bit; do
  nice -n 19 $PY -m classp_fused run --config docs/text_picks.json --methods classp --seeds 5 \
    --threads 1 --hparam classp.state_dtype=$fmt --out "$OUT/classp-$fmt" --overwrite \
    > "$OUT/classp-$fmt.log" 2>&1
  echo "classp $fmt rc=$?"
  nice -n 19 $PY -m classp_fused run --config docs/text_picks.json --methods mas --seeds 5 \
    --threads 1 --hparam mas.importance_dtype=$fmt --out "$OUT/mas-$fmt" --overwrite \
    > "$OUT/mas-$fmt.log" 2>&1
  echo "mas $fmt rc=$?"
done
