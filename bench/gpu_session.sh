#!/usr/bin/env bash
# Every GPU run the README lists as owed, in stages that each fit one 10-minute device command
# (the device tool's limit). Run from the repository root on a CUDA machine:
#
#   bash bench/gpu_session.sh build-test   # build fastdfa._C (one pip command), then the whole test suite
#   bash bench/gpu_session.sh kernels      # Triton kernels vs references, GrAPE step cost (pytest-benchmark)
#   bash bench/gpu_session.sh targets      # the CUDA issue's three models, every GPU method
#   bash bench/gpu_session.sh grid         # the full GPU grid with its plot
#
# Records go to bench/results/ and, when $OUT is set (the device tool), are copied there too.
# Each stage re-installs the extension if it is missing (a fresh machine starts bare).
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: bash bench/gpu_session.sh build-test|kernels|targets|grid}
results=bench/results
PY=${PYTHON:-python3}

ensure_extension() {
    if ! $PY -c "import fastdfa._C" 2>/dev/null; then
        # --no-build-isolation: build against the torch already installed (the machine has no registry)
        $PY -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -n 15
    fi
    $PY -m fastdfa info
}

keep() {  # copy the records a stage wrote to $OUT (at most 8 files come back from the device tool)
    if [ -n "${OUT:-}" ]; then
        for f in "$@"; do [ -f "$f" ] && cp "$f" "$OUT/"; done
    fi
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
case "$stage" in
    build-test)
        start=$(date +%s)
        ensure_extension
        echo "extension ready after $(( $(date +%s) - start )) s"
        $PY -m pytest tests -q -p no:cacheprovider -x --durations=5 2>&1 | tail -n 40
        ;;
    kernels)
        ensure_extension
        $PY -m pytest bench/test_triton_kernels.py -q -p no:cacheprovider \
            --fastdfa-record $results/triton-gpu.json 2>&1 | tail -n 60
        $PY -m pytest bench/test_grape_step.py -q -p no:cacheprovider \
            --fastdfa-record $results/grape-step-gpu.json 2>&1 | tail -n 30
        keep $results/triton-gpu.json $results/grape-step-gpu.json
        ;;
    targets)
        ensure_extension
        $PY -m fastdfa bench --targets --json $results/bench-targets-gpu.json 2>&1 | tail -n 40
        keep $results/bench-targets-gpu.json
        ;;
    grid)
        ensure_extension
        $PY -m fastdfa bench --gpu --json $results/bench-gpu.json --plot docs/bench-gpu.png 2>&1 | tail -n 60
        keep $results/bench-gpu.json docs/bench-gpu.png
        ;;
    *)
        echo "unknown stage $stage: build-test, kernels, targets or grid" >&2
        exit 2
        ;;
esac
