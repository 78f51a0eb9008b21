"""The stages of ``bash bench/gpu_check.sh``: everything docs/gpu.md says is owed on a GPU, in one command
of at most 9 minutes, most important first (run it through the shell script; it sets the paths).

  a  build fastdfa._C for sm_90 (H100/H200), then the GPU tests: pytest tests -m gpu, and the kernel
     test files on compiled Triton                        -> gpu-check-tests.json
  b  python -m fastdfa bench --targets, fewer rounds      -> gpu-check-targets.json
     then GPT-2 small, bf16: bench/test_lm_gpt2_step.py -m gpu -> gpu-check-lm-gpt2.json
  c  bench/test_grape_step.py (GrAPE's step cost)         -> gpu-check-grape-step.json
  d  bench/test_triton_kernels.py, with the time left     -> gpu-check-kernels.json

Every command runs under coreutils' ``timeout`` with the stage's budget (SIGINT first, so pytest still
writes its junit XML and the bench conftest its record of what finished; SIGKILL GRACE_S later). Each
stage's record goes to the results folder, and to $OUT when set, before the next stage starts, and
gpu-check-summary.json is rewritten after every stage: a run cut off by the device tool's limit still
returns the stages that finished. A failing stage is recorded and the next one runs anyway.

``--dry-run``: the same stages in a CPU smoke mode (TRITON_INTERPRET=1, FASTDFA_BENCH_SMOKE=1,
--benchmark-disable, the quick bench preset for one round, a few kernel test files), records in a
temporary folder, never in bench/results. ``FASTDFA_GPU_CHECK_FAIL=b`` (comma-separated stage keys,
``KEY:hang`` for a command that outlives its budget) replaces a stage's first command by a failing
one: tests/test_gpu_check.py checks that the failure is recorded and the later stages still run.
Only the standard library here: the GPU machine has no registry.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
GRACE_S = 10  # SIGINT at the budget, SIGKILL this much later

# (key, what, record file, budget cap in s on the GPU, in the dry run); a 540 s deadline over all
STAGES = (("a", "build fastdfa._C and the GPU tests", "gpu-check-tests.json", 200, 90),
          ("b", "the targets: python -m fastdfa bench --targets", "gpu-check-targets.json", 200, 60),
          ("c", "GrAPE step cost: bench/test_grape_step.py", "gpu-check-grape-step.json", 60, 60),
          ("d", "kernel micro-benchmarks: bench/test_triton_kernels.py", "gpu-check-kernels.json", 180, 60))
# the dry run: b's quick bench takes 9 s alone on 2 cores and was cut off at 14 s in CI once; c and d take
# 13-16 s alone and over 35 s on a loaded machine; so 60 s each, and 270 s in all (a's 90 included)
DEADLINE_S, DRY_DEADLINE_S = 540, 270  # a+b+c's caps are 460 s: d gets 70 s or more before the deadline
BUILD_CAP_S = 120      # of stage a's budget
MIN_START_S = 30       # a stage with less than this left is skipped (dry run: 5)
TARGET_ROUNDS = 10     # interleaved rounds per method in stage b (the CLI's default is 15)
LM_RESERVE_S = 70      # of stage b's budget, kept for GPT-2 small (6 models built, 2 + 8 rounds of ~0.1-0.3 s)
DRY_LM_RESERVE_S = 15  # the dry run: the GPU test skips (no CUDA), pytest's start only
LM_RECORD = "gpu-check-lm-gpt2.json"
KERNEL_TESTS = ("tests/test_dfa_project.py", "tests/test_dfa_wgrad.py", "tests/test_jvp_linear.py",
                "tests/test_align_step.py", "tests/test_triton_engine.py", "tests/test_cuda_ops.py",
                "tests/test_graphs.py", "tests/test_csrc*.py")
DRY_KERNEL_TESTS = ("tests/test_dfa_project.py", "tests/test_graphs.py")  # run in the dry run (all are collected)

def portable(value):
    """``value`` (text, or JSON made of it) as a record keeps it: no absolute path of this machine's checkout
    (``/.../bench/results/x.json`` -> ``bench/results/x.json``, ``-I/.../csrc`` -> ``-Icsrc``) or temp dir
    (``<tmp>/...``); tests/test_records.py checks the records under bench/results."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v) for v in value]
    if isinstance(value, str):
        return value.replace(ROOT + os.sep, "").replace(tempfile.gettempdir() + os.sep, "<tmp>/")
    return value


PROBE = r"""
import json, subprocess
out = {}
try:
    import torch
    out.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        out["device"] = torch.cuda.get_device_name(0)
except Exception as exc:
    out["probe_error_torch"] = repr(exc)[:300]
try:
    from fastdfa.info import machine_info
    out.update(machine_info())
except Exception as exc:
    out["probe_error_fastdfa"] = repr(exc)[:300]
    try:
        import triton
        out["triton"] = triton.__version__
    except Exception:
        out["triton"] = None
    sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    out["commit"] = sha.stdout.strip() or None
try:
    from fastdfa.lab.bench import GPU_METHODS
    out["gpu_methods"] = list(GPU_METHODS)
except Exception as exc:
    out["probe_error_bench"] = repr(exc)[:300]
print("PROBE " + json.dumps(out))
"""


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def junit_summary(path: str) -> dict:
    """passed/failed/error/skipped counts, the failing tests (with the first line of their message) and
    the most common skip reasons, from pytest's --junitxml."""
    if not os.path.exists(path):
        return {"junit_written": False}
    root = ET.parse(path).getroot()
    counts = collections.Counter()
    failing, skips = [], collections.Counter()
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "error"
                message = (child.get("message") or child.text or "").strip().splitlines()
                failing.append({"test": name, "outcome": outcome, "message": (message[0] if message else "")[:300]})
                break
            if child.tag == "skipped":
                outcome = "skipped"
                skips[(child.get("message") or "").strip()[:200]] += 1
        counts[outcome] += 1
    return {"junit_written": True, "passed": counts["passed"], "failed": counts["failed"], "errors": counts["error"],
            "skipped": counts["skipped"], "failing": failing,
            "skip_reasons": [{"reason": r, "count": n} for r, n in skips.most_common(8)]}


def read_record(path: str, since: float) -> dict | None:
    """The JSON record at path if this run wrote it (not a stale one from an earlier run)."""
    if not os.path.exists(path) or os.path.getmtime(path) < since - 1:
        return None
    with open(path) as f:
        return json.load(f)


class Check:
    def __init__(self, args):
        self.dry = args.dry_run
        self.t0 = time.monotonic()
        self.deadline = args.deadline or (DRY_DEADLINE_S if self.dry else DEADLINE_S)
        self.results = os.path.abspath(args.results or (tempfile.mkdtemp(prefix="fastdfa-gpu-check-") if self.dry
                                                        else os.path.join(ROOT, "bench", "results")))
        os.makedirs(self.results, exist_ok=True)
        self.out = os.environ.get("OUT") or None
        if self.out:
            os.makedirs(self.out, exist_ok=True)
        self.selected = args.stages.split(",") if args.stages else [s[0] for s in STAGES]
        self.inject = {}
        for item in filter(None, os.environ.get("FASTDFA_GPU_CHECK_FAIL", "").split(",")):
            key, _, how = item.strip().partition(":")
            self.inject[key] = how or "fail"
        self.stage = None            # the key of the stage running
        self.stage_end = None        # and when its budget runs out (time.monotonic())
        self.built = None            # the build's result, once tried
        self.logs = [open(os.path.join(self.results, "gpu-check.log"), "w")]
        if self.out:
            self.logs.append(open(os.path.join(self.out, "gpu-check.log"), "w"))
        self.summary = {"command": "bash bench/gpu_check.sh " + " ".join(sys.argv[1:]), "dry_run": self.dry,
                        "started": now_iso(), "deadline_s": self.deadline,
                        "budget_caps_s": {s[0]: s[4] if self.dry else s[3] for s in STAGES},
                        "results": self.results, "stages": []}

    # -- plumbing -------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def log(self, text: str) -> None:
        line = f"[gpu-check +{self.elapsed():6.1f}s] {text}"
        print(line, flush=True)
        for f in self.logs:
            f.write(portable(line) + "\n")
            f.flush()

    def env(self, **extra) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.join(ROOT, "python"), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        if self.dry:
            env.update(TRITON_INTERPRET="1", FASTDFA_BENCH_SMOKE="1")
        else:  # compiled Triton and real numbers
            env.pop("TRITON_INTERPRET", None)
            env.pop("FASTDFA_BENCH_SMOKE", None)
        env.update(extra)
        return env

    def run(self, cmd: list, budget: float, env: dict | None = None) -> dict:
        """cmd under `timeout` (SIGINT at budget, SIGKILL GRACE_S later), its output streamed to the log."""
        how = self.inject.pop(self.stage, None)
        if how == "hang":
            cmd, budget = ["sleep", "600"], min(budget, 3)
        elif how is not None:
            cmd = ["sh", "-c", f"echo 'injected failure: FASTDFA_GPU_CHECK_FAIL={self.stage}'; exit 3"]
        if self.stage_end is not None:  # every command ends, SIGKILL included, inside its stage's budget
            budget = min(budget, self.stage_end - time.monotonic() - GRACE_S)
        budget = int(budget)
        if budget < 1:
            self.log(f"no time left in stage {self.stage} for: {shlex.join(cmd)}")
            return {"rc": 124, "seconds": 0.0, "timed_out": True, "tail": []}
        self.log(f"$ {shlex.join(cmd)}   (timeout {budget} s)")
        start = time.monotonic()
        tail = collections.deque(maxlen=30)
        proc = subprocess.Popen(["timeout", "-s", "INT", "-k", str(GRACE_S), str(budget), *cmd], cwd=ROOT,
                                env=env or self.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", bufsize=1)
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            print(line, flush=True)
            for f in self.logs:
                f.write(portable(line) + "\n")
        for f in self.logs:
            f.flush()
        rc = proc.wait()
        seconds = time.monotonic() - start
        timed_out = rc in (124, 137)
        self.log(f"exit {rc}{' (timed out)' if timed_out else ''} after {seconds:.1f} s")
        return {"rc": rc, "seconds": round(seconds, 1), "timed_out": timed_out, "tail": list(tail)}

    def keep(self, *paths) -> None:
        """Copy what a stage wrote to $OUT (the device tool brings back what is there)."""
        if self.out:
            for p in paths:
                if p and os.path.exists(p):
                    shutil.copy(p, self.out)

    def stamp(self, path: str, data: dict) -> dict:
        """A record written by a child gets its paths made portable, and the commit FASTDFA_COMMIT named, when
        set: the device tool's copy of the tree may carry no .git, or a stale one (seen: the checkout's base
        commit, "+dirty")."""
        written = json.dumps(data)
        if self.machine.get("commit_source") == "FASTDFA_COMMIT" and data.get("commit") != self.machine["commit"]:
            data["commit_read_by_git"] = data.get("commit")
            data["commit"] = self.machine["commit"]
            if isinstance(data.get("machine"), dict):
                data["machine"].update(commit=self.machine["commit"], commit_source="FASTDFA_COMMIT")
        data = portable(data)
        if json.dumps(data) != written:
            with open(path, "w") as f:
                json.dump(data, f, indent=1)
                f.write("\n")
        return data

    def write_json(self, name: str, data: dict) -> str:
        path = os.path.join(self.results, name)
        with open(path, "w") as f:
            json.dump(portable(data), f, indent=1)
            f.write("\n")
        return path

    # -- the stages -----------------------------------------------------------------------------------
    def probe(self) -> None:
        self.log(f"{'dry run (CPU smoke mode)' if self.dry else 'GPU run'}, records in {self.results}, "
                 f"deadline {self.deadline} s, stages {','.join(self.selected)}")
        if shutil.which("nvidia-smi"):
            smi = subprocess.run(["timeout", "20", "nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                  "--format=csv,noheader"], capture_output=True, text=True)
            self.summary["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
            self.log(f"nvidia-smi: {self.summary['nvidia_smi']}")
        proc = subprocess.run(["timeout", "120", PY, "-c", PROBE], cwd=ROOT, env=self.env(), capture_output=True,
                              text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
        self.machine = json.loads(lines[-1][6:]) if lines else {"probe_error": (proc.stderr or "")[-500:]}
        if os.environ.get("FASTDFA_COMMIT"):
            # the device tool's copy of the tree has no .git or a stale one: the commit named by whoever ran it
            self.machine.update(commit_read_by_git=self.machine.get("commit"), commit=os.environ["FASTDFA_COMMIT"],
                                commit_source="FASTDFA_COMMIT")
        self.gpu_methods = self.machine.pop("gpu_methods", None)
        self.summary["machine"] = self.machine
        self.summary["commit"] = self.machine.get("commit")
        m = self.machine
        self.log(f"device {m.get('device')}, torch {m.get('torch')} (CUDA {m.get('torch_cuda')}), "
                 f"triton {m.get('triton')}, commit {m.get('commit')}")

    def build(self, budget: float) -> dict:
        """fastdfa._C in place for sm_90 (setup.py build_ext --inplace: no pip, no wheel), then import it."""
        if self.built is not None:
            return self.built
        env = self.env(TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"),
                       MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 1)))
        if self.dry:  # the same command, which setup.py answers with its skip notice: nothing is compiled
            env["FASTDFA_SKIP_CUDA_BUILD"] = "1"
        if os.environ.get("FASTDFA_GPU_CHECK_BUILD") == "pip":  # the README's command
            cmd = [PY, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."]
        else:
            cmd = [PY, "setup.py", "-q", "build_ext", "--inplace"]
        r = self.run(cmd, min(budget, BUILD_CAP_S), env)
        imp = self.run([PY, "-c", "import fastdfa._C as C; print('fastdfa._C built for', C.built_archs())"], 60)
        result = {"command": " ".join(cmd), "arch_list": env["TORCH_CUDA_ARCH_LIST"], "max_jobs": env["MAX_JOBS"],
                  "seconds": r["seconds"], "rc": r["rc"], "timed_out": r["timed_out"], "imports": imp["rc"] == 0}
        if imp["rc"] == 0:
            result["built_archs"] = imp["tail"][-1].rsplit(" ", 1)[-1]
        if r["rc"] == 0 and (self.dry or not self.machine.get("torch_cuda")):
            # setup.py skips the extension on a CPU build of torch (and in the dry run)
            result["status"] = "skipped: no CUDA torch" if not self.machine.get("torch_cuda") else "skipped: dry run"
        elif r["rc"] == 0 and imp["rc"] == 0:
            result["status"] = "ok"
        else:
            result["status"] = "timeout" if r["timed_out"] else "failed"
            result["log_tail"] = r["tail"][-15:]
        self.built = result
        self.log(f"build: {result['status']} ({result['seconds']} s)")
        return result

    def pytest_run(self, args: list, junit: str, budget: float, env=None) -> dict:
        r = self.run([PY, "-m", "pytest", *args, "-q", "-rfE", "-p", "no:cacheprovider", f"--junitxml={junit}"],
                     budget, env)
        return {"args": " ".join(args), "rc": r["rc"], "seconds": r["seconds"], "timed_out": r["timed_out"],
                **junit_summary(junit)}

    def stage_a(self, end: float, record: str) -> dict:
        build = self.build(end - time.monotonic() - 45)  # leave the tests 45 s at least
        self.run([PY, "-m", "fastdfa", "info"], 60)
        tmp = tempfile.mkdtemp(prefix="gpu-check-junit-")
        runs = {"gpu-marked": self.pytest_run(["tests", "-m", "gpu"], os.path.join(tmp, "gpu.xml"),
                                              min(120, end - time.monotonic() - GRACE_S))}
        files = sorted({f for pattern in KERNEL_TESTS for f in glob.glob(os.path.join(ROOT, pattern))})
        files = [os.path.relpath(f, ROOT) for f in files]
        collected = None
        if self.dry:  # all kernel test files must collect; a few of them run
            c = self.run([PY, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files,
                          "-m", "not gpu"], 60)
            collected = {"files": files, "rc": c["rc"], "line": c["tail"][-1] if c["tail"] else ""}
            files = list(DRY_KERNEL_TESTS)
        workers = os.environ.get("FASTDFA_GPU_CHECK_WORKERS")
        if workers is None:  # pytest-xdist compiles the Triton kernels on several cores, when it is there
            workers = "0" if self.dry or importlib.util.find_spec("xdist") is None else "6"
        xdist = ["-n", workers] if workers != "0" else []
        runs["kernels"] = self.pytest_run([*files, "-m", "not gpu", *xdist], os.path.join(tmp, "kernels.xml"),
                                          end - time.monotonic() - GRACE_S)
        shutil.rmtree(tmp, ignore_errors=True)
        totals = {k: sum(r.get(k) or 0 for r in runs.values()) for k in ("passed", "failed", "errors", "skipped")}
        failing = [f for r in runs.values() for f in r.get("failing") or []]
        data = {"machine": self.machine, "commit": self.machine.get("commit"), "date": now_iso(),
                "dry_run": self.dry, "build": build, "totals": totals, "failing": failing, "runs": runs}
        if collected is not None:
            data["dry_run_collected"] = collected
        path = self.write_json(record, data)
        ran_clean = all(r["rc"] == 0 and r["junit_written"] for r in runs.values())
        ok = (build["status"] == "ok" or build["status"].startswith("skipped")) and ran_clean and not failing
        ok = ok and (collected is None or collected["rc"] == 0)
        timed_out = any(r["timed_out"] for r in runs.values()) or build["timed_out"]
        note = (f"build {build['status']}; {totals['passed']} passed, {totals['failed']} failed, "
                f"{totals['errors']} errors, {totals['skipped']} skipped")
        if failing:
            note += "; failing: " + ", ".join(f["test"] for f in failing[:10])
        return {"status": "ok" if ok else "timeout" if timed_out else "failed", "record": path, "note": note,
                "failing": failing[:30]}

    def stage_b(self, end: float, record: str) -> dict:
        path = os.path.join(self.results, record)
        start = time.time()
        if self.dry:  # no CUDA: the quick preset for one round, the GPU methods (they skip, saying why)
            methods = [m for m in (self.gpu_methods or ["bp", "dfa"]) if m != "bp-compile"]  # no inductor on 2 cores
            cmd = [PY, "-m", "fastdfa", "bench", "--quick", "--rounds", "1", "--no-target", "--methods",
                   ",".join(methods), "--json", path]
        else:  # the preset's methods: every GPU method (backends, 1/2/4/8 streams, graphs, nocheck, compile)
            self.build(end - time.monotonic() - 60)
            cmd = [PY, "-m", "fastdfa", "bench", "--targets", "--rounds", str(TARGET_ROUNDS), "--json", path]
        r = self.run(cmd, end - time.monotonic() - GRACE_S - (DRY_LM_RESERVE_S if self.dry else LM_RESERVE_S))
        data = read_record(path, start)
        if data is not None:
            data = self.stamp(path, data)
        # then GPT-2 small with its real vocabulary (issue "A language model with a real vocabulary")
        lm = self.pytest_run_record(end, LM_RECORD, "bench/test_lm_gpt2_step.py", ["-m", "gpu"])
        self.keep(lm.get("record"))
        if data is None:
            return {"status": "timeout" if r["timed_out"] else "failed", "record": None, "lm": lm,
                    "note": f"exit {r['rc']}, no record; " + " | ".join(r["tail"][-5:])}
        configs = []
        for res in data.get("results", []):
            ratios = {m: v["ratio_to_bp"] for m, v in res["methods"].items()
                      if m != "bp" and v.get("ratio_to_bp") is not None}
            best = min(ratios, key=ratios.get) if ratios else None
            configs.append({"config": res["config"], "bp_ms": res["bp_ms"], "best": best,
                            "best_ratio": ratios.get(best), "ran": len(res["methods"]),
                            "skipped": len(res.get("skipped", {}))})
        verdicts = [t["text"] for t in data.get("targets", [])]
        ok = r["rc"] == 0 and "machine" in data
        return {"status": "ok" if ok else "failed", "record": path,
                "note": "; ".join(verdicts) or f"{len(configs)} configurations, no target verdicts (CPU)",
                "verdicts": data.get("targets", []), "configs": configs, "lm": lm}

    def pytest_stage(self, end: float, record: str, test_file: str) -> dict:
        if not self.dry:
            self.build(end - time.monotonic() - 30)
        return self.pytest_run_record(end, record, test_file)

    def pytest_run_record(self, end: float, record: str, test_file: str, select=()) -> dict:
        """One bench file under pytest, its record into the results folder; what it says."""
        path = os.path.join(self.results, record)
        start = time.time()
        extra = ["--benchmark-disable"] if self.dry else []
        r = self.run([PY, "-m", "pytest", test_file, "-q", "-p", "no:cacheprovider", *select, *extra,
                      "--fastdfa-record", path], end - time.monotonic() - GRACE_S)
        data = read_record(path, start)
        if data is not None:
            data = self.stamp(path, data)
        lines = [ln for ln in r["tail"] if ln.startswith("[fastdfa]") or " passed" in ln or " failed" in ln]
        if r["rc"] == 0 and (data is not None or self.dry):
            status = "ok"
        else:
            status = "timeout" if r["timed_out"] else "failed"
        note = (" | ".join(lines[-6:]) or " | ".join(r["tail"][-3:]))[:2000]
        if data is None:
            note = ("smoke mode records nothing; " if self.dry else "no record; ") + note
        elif r["timed_out"]:
            note = "cut off: the record holds the benchmarks that finished; " + note
        return {"status": status, "record": path if data is not None else None, "note": note,
                "ratios": (data or {}).get("ratios_to_baseline") or (data or {}).get("ratios")}

    def stage_c(self, end, record):
        return self.pytest_stage(end, record, "bench/test_grape_step.py")

    def stage_d(self, end, record):
        return self.pytest_stage(end, record, "bench/test_triton_kernels.py")

    # -- the driver -----------------------------------------------------------------------------------
    def main(self) -> int:
        self.probe()
        if not self.dry and not self.machine.get("cuda_available"):
            self.log("no CUDA GPU visible: run `bash bench/gpu_check.sh --dry-run` on a CPU machine")
            return 2
        summary_path = os.path.join(self.results, "gpu-check-summary.json")
        min_start = 5 if self.dry else MIN_START_S
        for key, what, record, cap, dry_cap in STAGES:
            entry = {"stage": key, "what": what, "budget_s": 0, "seconds": 0.0}
            left = self.deadline - self.elapsed()
            budget = min(dry_cap if self.dry else cap, left)
            if key not in self.selected:
                entry["status"] = "not selected"
            elif budget < min_start:
                entry["status"] = f"skipped: {left:.0f} s left of the {self.deadline} s deadline"
                self.log(f"stage {key} ({what}) {entry['status']}")
            else:
                self.stage, self.stage_end = key, time.monotonic() + budget
                entry["budget_s"] = int(budget)
                self.log(f"=== stage {key} start: {what} (budget {int(budget)} s)")
                start = time.monotonic()
                try:
                    entry.update(getattr(self, f"stage_{key}")(start + budget, record))
                except Exception as exc:  # the helper's own bug: recorded, and the next stage runs
                    entry.update(status="failed", note=f"gpu_check.py: {type(exc).__name__}: {exc}"[:500])
                entry["seconds"] = round(time.monotonic() - start, 1)
                self.stage = self.stage_end = None
                note = entry.get("note", "")[:3000]
                self.log(f"=== stage {key} end: {entry['status']} in {entry['seconds']} s: {note}")
                self.keep(entry.get("record"))
            self.summary["stages"].append(entry)
            self.summary["wall_s"] = round(self.elapsed(), 1)
            self.summary["ok"] = all(s["status"] == "ok" for s in self.summary["stages"]
                                     if s["status"] != "not selected")
            with open(summary_path, "w") as f:
                json.dump(portable(self.summary), f, indent=1)
                f.write("\n")
            self.keep(summary_path)
        self.log(f"done in {self.elapsed():.1f} s: " + ", ".join(f"{s['stage']} {s['status']}"
                                                                for s in self.summary["stages"]))
        self.log(f"summary {summary_path}")
        return 0 if self.summary["ok"] else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bash bench/gpu_check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU smoke mode: every stage on tiny work, records in a "
                   "temporary folder (or --results)")
    p.add_argument("--stages", default=None, help="comma-separated subset of a,b,c,d (default all, in that order)")
    p.add_argument("--results", default=None, help="folder for the records (default bench/results; dry run: a "
                   "temporary folder)")
    p.add_argument("--deadline", type=int, default=None,
                   help=f"seconds for all stages (default {DEADLINE_S}; dry run {DRY_DEADLINE_S})")
    args = p.parse_args(argv)
    if args.stages and not set(args.stages.split(",")) <= {s[0] for s in STAGES}:
        p.error(f"--stages takes a comma-separated subset of a,b,c,d, not {args.stages!r}")
    return Check(args).main()


if __name__ == "__main__":
    sys.exit(main())
