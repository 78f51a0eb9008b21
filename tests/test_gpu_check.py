"""bench/gpu_check.sh, the one GPU command, in its CPU dry run: every stage must run and report success
here, so that the script cannot first break on a lent GPU, whose minutes are scarce; and a failing or
hanging stage must be recorded while the later stages still run."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MACHINE_KEYS = {"device", "torch", "torch_cuda", "triton", "commit"}
pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="the CPU stand-in for the GPU check: on a GPU, run bash bench/gpu_check.sh")


def _dry_run(tmp_path, *args, fail=None):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": "1"}
    env.pop("FASTDFA_GPU_CHECK_FAIL", None)
    if fail:
        env["FASTDFA_GPU_CHECK_FAIL"] = fail
    results = tmp_path / "results"
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--results", str(results),
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    out = proc.stdout + proc.stderr
    summary = json.loads((results / "gpu-check-summary.json").read_text())
    return proc.returncode, out, results, summary


def _written_since(start):
    return [p.name for p in (ROOT / "bench" / "results").glob("gpu-check*") if p.stat().st_mtime >= start]


def test_dry_run_runs_every_stage(tmp_path):
    pytest.importorskip("pytest_benchmark")
    start = time.time()
    rc, out, results, summary = _dry_run(tmp_path)
    stages = {s["stage"]: s for s in summary["stages"]}
    assert rc == 0 and summary["ok"], out[-4000:]
    assert list(stages) == ["a", "b", "c", "d"]
    for key, s in stages.items():
        assert s["status"] == "ok" and 0 < s["seconds"] <= s["budget_s"], (key, s, out[-3000:])
    assert summary["dry_run"] and MACHINE_KEYS <= set(summary["machine"])
    # the stages ran in order, each logged with its start and end
    marks = [out.index(f"=== stage {k} {what}") for k in "abcd" for what in ("start", "end")]
    assert marks == sorted(marks)

    tests = json.loads((results / "gpu-check-tests.json").read_text())
    assert MACHINE_KEYS <= set(tests["machine"]) and tests["commit"]
    assert tests["build"]["status"] == "skipped: no CUDA torch"
    assert tests["totals"]["passed"] > 0 and tests["totals"]["failed"] == tests["totals"]["errors"] == 0
    assert tests["runs"]["gpu-marked"]["skipped"] > 0  # the GPU-marked tests were collected (and skip here)
    assert tests["dry_run_collected"]["rc"] == 0  # every kernel test file of the GPU run collects
    targets = json.loads((results / "gpu-check-targets.json").read_text())
    assert MACHINE_KEYS <= set(targets["machine"]) and targets["results"]
    assert all("dfa-cuda" in r["skipped"] for r in targets["results"])  # the GPU methods were asked for

    out_dir = tmp_path / "out"  # each stage's record and the summary also went to $OUT
    assert {"gpu-check-summary.json", "gpu-check-tests.json", "gpu-check-targets.json",
            "gpu-check.log"} <= {p.name for p in out_dir.iterdir()}
    assert _written_since(start) == []  # the dry run records nothing into bench/results


def test_failing_and_hanging_stages_are_recorded_and_later_stages_run(tmp_path):
    pytest.importorskip("pytest_benchmark")
    rc, out, _, summary = _dry_run(tmp_path, "--stages", "b,c,d", fail="b,c:hang")
    stages = {s["stage"]: s for s in summary["stages"]}
    assert rc == 1 and not summary["ok"]
    assert stages["a"]["status"] == "not selected"
    assert stages["b"]["status"] == "failed" and "injected failure" in stages["b"]["note"], stages["b"]
    assert stages["c"]["status"] == "timeout", stages["c"]
    assert stages["d"]["status"] == "ok", (stages["d"], out[-3000:])
