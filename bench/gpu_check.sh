#!/usr/bin/env bash
# Everything docs/gpu.md says is owed on a GPU, in ONE command of at most 9 minutes, most important first:
#
#   bash bench/gpu_check.sh             # on the H100/H200, from the repository root (device tool: timeout_s 600)
#   bash bench/gpu_check.sh --dry-run   # the same stages in a CPU smoke mode (< 5 min), records in a temp folder
#   bash bench/gpu_check.sh --stages b,d  # a subset; --results DIR, --deadline S
#
#   a  build fastdfa._C (sm_90) + pytest tests -m gpu + the kernel tests  -> bench/results/gpu-check-tests.json
#   b  python -m fastdfa bench --targets --rounds 10                      -> gpu-check-targets.json
#      then GPT-2 small (12x768, vocabulary 50,257, bf16): bench/test_lm_gpt2_step.py -m gpu -> gpu-check-lm-gpt2.json
#   c  bench/test_grape_step.py                                            -> gpu-check-grape-step.json
#   d  bench/test_triton_kernels.py, with the time left                    -> gpu-check-kernels.json
#
# Each stage runs under `timeout` with its own budget; its record goes to bench/results/ (and $OUT when set)
# before the next starts; gpu-check-summary.json says what each stage did, gpu-check.log holds the output.
# A failing stage does not stop the later ones. Needs nothing beyond the machine's python3 (torch, triton,
# pytest, pytest-benchmark): no registry is reached. The stages live in bench/gpu_check.py.
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
