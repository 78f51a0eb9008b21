"""pytest-benchmark plumbing: the DFA/BP ratio of one run, and its record under bench/results/.

    python -m pytest bench --fastdfa-record bench/results/core-step-cpu.json

prints the ratio of median step times measured side by side in this run, fails
the session when it exceeds the target, and writes a JSON record (machine,
versions, commit, date, per-method stats).
"""

import datetime
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))

# DFA/BP step-time targets on the CPU, per benchmark group (prefix): issue "Core"'s MLP (FLOP floor 0.72),
# and issue "Layout"'s whole steps against plain torch.nn BP: the overhead-bound small MLP (floor 0.84)
# and the GEMM-bound big one (floor 0.72).
TARGETS = {"core-": 0.80, "mlp-step-784x256x3-": 0.95, "mlp-step-784x1024x4-": 0.78}
_MEDIANS: dict = {}      # pytest-benchmark stats per group and method (methods timed one after the other)
_INTERLEAVED: dict = {}  # interleaved_step_ms per group: the ratio the target is checked on
_FLOPS: dict = {}        # FLOPs of one step per group and method (FlopCounterMode), where a bench counts them


def pytest_addoption(parser):
    parser.addoption("--fastdfa-record", default=None, help="write the measured step times and ratio to this JSON")


@pytest.fixture
def record_step():
    """Tests call record_step(group, method, benchmark) after timing."""

    def _record(group, method, benchmark):
        stats = getattr(benchmark, "stats", None)
        if stats is None:  # --benchmark-disable: ran once, untimed
            return
        s = stats.stats
        _MEDIANS.setdefault(group, {})[method] = {"median_ms": s.median * 1e3, "iqr_ms": s.iqr * 1e3,
                                                  "mean_ms": s.mean * 1e3, "rounds": s.rounds}

    return _record


@pytest.fixture
def record_interleaved():
    def _record(group, timing):
        _INTERLEAVED[group] = timing

    return _record


@pytest.fixture
def record_flops():
    """record_flops(group, {method: flops of one step}): written with the FLOP floor (method / bp)."""
    def _record(group, flops):
        _FLOPS[group] = dict(flops)

    return _record


def _flop_floors():
    return {g: {m: f / fl["bp"] for m, f in fl.items() if m != "bp"} for g, fl in _FLOPS.items() if fl.get("bp")}


TARGET_GROUPS = tuple(TARGETS)  # the groups a target applies to


def target_of(group: str) -> float:
    return next(t for prefix, t in TARGETS.items() if group.startswith(prefix))


def _ratios(source):
    """DFA/BP per target group that has both (the target applies to these)."""
    out = {}
    for group, methods in source.items():
        if group.startswith(TARGET_GROUPS) and "bp" in methods and "dfa" in methods:
            out[group] = methods["dfa"]["median_ms"] / methods["bp"]["median_ms"]
    return out


def _baseline_ratios(source):
    """Every method over the group's baseline ("bp" for steps, "torch" for kernels), for the groups
    the target does not apply to."""
    out = {}
    for group, methods in source.items():
        base = "bp" if "bp" in methods else "torch" if "torch" in methods else None
        if base is None or group.startswith(TARGET_GROUPS):
            continue
        out[group] = {m: t["median_ms"] / methods[base]["median_ms"] for m, t in methods.items() if m != base}
        out[group]["baseline"] = base
    return out


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    def dfa_bp_line(group, m, ratio, how, medians):
        return (f"[fastdfa] {group}, {how}: BP {m['bp']['median_ms']:.2f} ms, DFA {m['dfa']['median_ms']:.2f} ms "
                f"({medians}), DFA/BP = {ratio:.3f}")

    for group, ratio in _ratios(_MEDIANS).items():
        terminalreporter.write_line(dfa_bp_line(group, _MEDIANS[group], ratio, "timed one method after the other",
                                                "medians"))
    ratios = _ratios(_INTERLEAVED)
    for group, ratio in ratios.items():
        verdict = "meets" if ratio <= target_of(group) else "MISSES"
        m = _INTERLEAVED[group]
        terminalreporter.write_line(dfa_bp_line(group, m, ratio, "interleaved", f"medians of {m['bp']['rounds']}")
                                    + f": {verdict} the target <= {target_of(group)}")
    baseline = _baseline_ratios(_INTERLEAVED)
    for group, ratios_ in baseline.items():
        base = ratios_["baseline"]
        shown = ", ".join(f"{m} {r:.3f}" for m, r in ratios_.items() if m != "baseline")
        terminalreporter.write_line(f"[fastdfa] {group}, interleaved, ratio to {base} "
                                    f"({_INTERLEAVED[group][base]['median_ms']:.3f} ms): {shown}")
    for group, floors in _flop_floors().items():
        shown = ", ".join(f"{m} {r:.3f}" for m, r in floors.items())
        terminalreporter.write_line(f"[fastdfa] {group}, FLOP floor (FLOPs over bp's): {shown}")
    path = config.getoption("--fastdfa-record")
    if path and os.environ.get("FASTDFA_BENCH_SMOKE") == "1":
        terminalreporter.write_line("[fastdfa] FASTDFA_BENCH_SMOKE=1: plumbing check, nothing recorded")
        path = None
    if path and (_MEDIANS or _INTERLEAVED):
        from fastdfa.info import machine_info

        machine = machine_info()
        record = {"machine": machine, "commit": machine["commit"],
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "command": "python -m pytest " + " ".join(config.invocation_params.args),
                  "pytest_benchmark": _MEDIANS, "sequential_ratios": _ratios(_MEDIANS),
                  "interleaved": _INTERLEAVED, "ratios": ratios, "targets": {g: target_of(g) for g in ratios},
                  "ratios_to_baseline": baseline}
        if _FLOPS:
            record.update(flops=_FLOPS, flop_floors=_flop_floors())
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
        terminalreporter.write_line(f"[fastdfa] wrote {path}")


def pytest_sessionfinish(session, exitstatus):
    if any(r > target_of(g) for g, r in _ratios(_INTERLEAVED).items()) and session.exitstatus == 0:
        session.exitstatus = 1
