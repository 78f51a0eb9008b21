#!/usr/bin/env bash
# The GPT-2-shaped LM table (issue "A language model with a real vocabulary"): transformers' GPT2LMHeadModel,
# 4 blocks of 256, 4 heads, context 128, on austen-bpe (16,384 BPE tokens; Persuasion held out), batch 8,
# EPOCHS passes over the 6,536 training windows (836,659 tokens), the test perplexity every EVAL_EVERY steps.
# Each run on one thread, JOBS at a time.
#
# Phase 1: BP and dense-logit DFA (the error at the logits, full, sites at the blocks) with seeds 0-2, and one
# seed of every other DFA variant kept (see docs/results.md for the pruned ones). Phase 2: seeds 1 and 2 of
# the two DFA variants with the lowest phase-1 perplexity.
#
#   JOBS=2 nice bash examples/lm_gpt2_grid.sh                       # about 2 hours on 2 cores
#   python examples/lm_gpt2_table.py bench/results/lm-gpt2 --json bench/results/lm-gpt2-ppl-cpu.json \
#       --steps bench/results/lm-gpt2-step-cpu.json --plot docs/lm-gpt2-ppl.png
set -uo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${EPOCHS:-1}
JOBS=${JOBS:-2}
EVAL_EVERY=${EVAL_EVERY:-204}
OUT=${OUT:-bench/results/lm-gpt2}
# SIZE: the model and batch flags; EXTRA: more train flags (e.g. --train-samples 64 for a smoke run)
SIZE=${SIZE:---model gpt2 --layers 4 --d-model 256 --heads 4 --context 128 --batch-size 8}
EXTRA=${EXTRA:-}
mkdir -p "$OUT"
run() {
  # a variant: bp, or dfa-<logits|head>-<full|rK>-<blocks|layers>
  read -r variant seed <<<"$1"
  name="$variant-s$seed"
  [ -f "$OUT/$name.json" ] && return 0
  # RESUME=1: also skip runs another grid has started (their log exists)
  if [ "${RESUME:-0}" = 1 ] && [ -f "$OUT/$name.log" ]; then return 0; fi
  if [ "$variant" = bp ]; then
    extra=(--method bp)
  else
    IFS=- read -r method point rank sites <<<"$variant"
    extra=(--method "$method" --error-point "$point" --sites "$sites")
    [ "$rank" != full ] && extra+=(--error-rank "${rank#r}")
  fi
  OMP_NUM_THREADS=1 python -m fastdfa train --data austen-bpe $SIZE $EXTRA "${extra[@]}" --seed "$seed" \
    --epochs "$EPOCHS" --eval-every "$EVAL_EVERY" --threads 1 --no-progress \
    --json "$OUT/$name.json" > "$OUT/$name.log" 2>&1 || echo "FAILED $name (see $OUT/$name.log)"
}
export -f run; export OUT EPOCHS EVAL_EVERY SIZE EXTRA RESUME
# Pruned by the step bench (bench/results/lm-gpt2-step-cpu.json; the reasons in docs/results.md), each slower
# than a kept variant with the same error: logits-r32-blocks and logits-r128-layers by logits-r32-layers,
# head-r128-layers (between head-full-layers and head-r32-layers), the head's ranked errors at the blocks
# (nothing left to cut there) by head-full-blocks.
SINGLES=(dfa-logits-r32-layers dfa-head-full-layers dfa-head-r32-layers dfa-head-full-blocks)
phase1=()
for seed in 0 1; do phase1+=("bp $seed" "dfa-logits-full-blocks $seed"); done
for v in "${SINGLES[@]}"; do phase1+=("$v 0"); done
phase1+=("bp 2" "dfa-logits-full-blocks 2")
printf '%s\n' "${phase1[@]}" | xargs -P "$JOBS" -I{} bash -c 'run "$@"' _ {}
# another grid (RESUME=1) may still be running a single: its seed 0 decides phase 2
for v in "${SINGLES[@]}"; do
  while pgrep -f -- "--json $OUT/$v-s0.json" > /dev/null; do sleep 30; done
done
best=$(python - "$OUT" "${SINGLES[@]}" <<'PY'
import json, os, sys
out, names = sys.argv[1], sys.argv[2:]
ppl = {n: json.load(open(os.path.join(out, f"{n}-s0.json")))["test_perplexity"] for n in names
       if os.path.exists(os.path.join(out, f"{n}-s0.json"))}
print(" ".join(sorted(ppl, key=ppl.get)[:2]))
PY
)
echo "phase 2: seeds 1 and 2 of $best"
phase2=()
for v in $best; do phase2+=("$v 1" "$v 2"); done
printf '%s\n' "${phase2[@]}" | xargs -P "$JOBS" -I{} bash -c 'run "$@"' _ {}
