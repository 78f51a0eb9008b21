#!/usr/bin/env bash
# Does fastdfa._C build with the README's one pip command against a CUDA build of torch, and import?
# No GPU needed: a throwaway venv gets PyPI's torch (the CUDA 13.0 build, about 3 GB with its nvidia-*
# wheels; TORCH=2.11.0 picks the GPU machine's version, default 2.13.0), the machine's nvcc compiles
# csrc/ for the default architectures (8.0;9.0), and the extension is imported and asked what it was
# built for. Not part of .ci/run (the download would double CI's time); run it after touching csrc/ or
# setup.py:
#
#   [TORCH=2.11.0] bash bench/cuda_build_check.sh [bench/results/cuda-build-check.json]
set -euo pipefail
cd "$(dirname "$0")/.."
record=${1:+$(realpath -m "$1")}  # absolute: the check imports from another directory
repo=$PWD
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q . "$work/src"
python3 -m venv "$work/venv"
# --isolated: ignore the machine's pip config, whose local wheel folder holds the CPU build of torch
"$work/venv/bin/pip" install -q --isolated --cert /etc/ssl/certs/ca-certificates.crt \
    --index-url https://pypi.org/simple "torch==${TORCH:-2.13.0}" numpy ninja setuptools wheel
start=$(date +%s)
(cd "$work/src" && CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} "$work/venv/bin/pip" install --isolated \
    --no-build-isolation --no-deps -e . 2>&1 | grep -v "^\[notice\]\|^$" | tail -n 5)
seconds=$(( $(date +%s) - start ))
cd "$work"  # import the built tree, not this checkout
"$work/venv/bin/python" - "$seconds" "$record" "$(git -C "$repo" rev-parse HEAD)" <<'EOF'
import json, subprocess, sys

import torch
import fastdfa._C as C

seconds, record, commit = int(sys.argv[1]), sys.argv[2], sys.argv[3]
nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
result = {"commit": commit, "torch": torch.__version__, "torch_cuda": torch.version.cuda, "nvcc": nvcc,
          "built_archs": C.built_archs(), "ops": sorted(n for n in dir(C) if not n.startswith("_")),
          "build_seconds": seconds, "module": C.__file__.rsplit("/", 1)[-1]}
print(json.dumps(result, indent=1))
if record:
    with open(record, "w") as f:
        json.dump(result, f, indent=1)
EOF
