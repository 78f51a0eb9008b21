#!/usr/bin/env bash
# The Jane Austen character LM table (issue "Transformers"): BP, DFA, GrAPE, DFA + calibration and
# GrAPE + calibration, sites at blocks and at sub-layers, on the default LM (d_model 128, 2 blocks,
# 4 heads, context 64), EPOCHS epochs over SAMPLES training windows (SAMPLES=all: every one of the
# 55k non-overlapping training windows), each run on one thread, JOBS at a time.
#
#   SAMPLES=16384 JOBS=2 bash examples/lm_austen_grid.sh            # about 30 min on 2 cores
#   SAMPLES=all EPOCHS=2 JOBS=2 OUT=bench/results/lm-austen-full bash examples/lm_austen_grid.sh
#   python examples/lm_austen_table.py bench/results/lm-austen      # the table and the summary record
set -uo pipefail
cd "$(dirname "$0")/.."
SAMPLES=${SAMPLES:-16384}
EPOCHS=${EPOCHS:-1}
JOBS=${JOBS:-2}
OUT=${OUT:-bench/results/lm-austen}
mkdir -p "$OUT"
runs=()
# the cheap rows first, so a grid cut short still has every method (grape layers is about 3x a bp run)
for seed in 0 1 2; do runs+=("bp blocks $seed -" "dfa blocks $seed -" "dfa layers $seed -"); done
runs+=("dfa blocks 0 10" "grape blocks 0 10")
for seed in 0 1 2; do runs+=("grape blocks $seed -" "grape layers $seed -"); done
run() {
  read -r method sites seed calib <<<"$1"
  name="$method-$sites-s$seed"; extra=()
  if [ "$calib" != "-" ]; then name="$name-bp$calib"; extra=(--calibrate-every-steps "$calib"); fi
  [ -f "$OUT/$name.json" ] && return 0
  # SKIP: a regex of run names to leave out; RESUME=1: also skip runs another grid already started
  if [ -n "${SKIP:-}" ] && [[ "$name" =~ $SKIP ]]; then return 0; fi
  if [ "${RESUME:-0}" = 1 ] && [ -f "$OUT/$name.log" ]; then return 0; fi
  if [ "$SAMPLES" != all ]; then extra+=(--train-samples "$SAMPLES"); fi
  OMP_NUM_THREADS=1 python -m fastdfa train --data austen --model transformer --method "$method" --sites "$sites" \
    --seed "$seed" --epochs "$EPOCHS" --threads 1 --no-progress "${extra[@]}" \
    --json "$OUT/$name.json" > "$OUT/$name.log" 2>&1 || echo "FAILED $name (see $OUT/$name.log)"
}
export -f run; export OUT SAMPLES EPOCHS SKIP RESUME
printf '%s\n' "${runs[@]}" | xargs -P "$JOBS" -I{} bash -c 'run "$@"' _ {}
