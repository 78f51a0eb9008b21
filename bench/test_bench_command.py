"""`python -m fastdfa bench --quick` in the suite, and the grid as pytest-benchmark tests.

With --benchmark-disable (CI): every quick-preset configuration and method runs
(one interleaved round, no target): the plumbing. Without it: the quick preset
for real, checked against the CPU target (best DFA/BP <= 0.80) and recorded
with --fastdfa-record.
"""

import json

import pytest
import torch

from fastdfa.lab import bench
from fastdfa.lab.cli import main

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PRESET = "gpu" if DEVICE.type == "cuda" else "quick"


def test_bench_quick_command(request, tmp_path):
    disabled = request.config.getoption("benchmark_disable")
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    args = ["bench", "--quick", "--json", str(out), "--plot", str(png)]
    if disabled:
        args += ["--rounds", "1", "--no-target"]
    assert main(args) == 0  # exits 1 when the CPU target is missed
    record = json.loads(out.read_text())
    assert record["preset"] == "quick" and len(record["results"]) == len(bench.preset("quick"))
    for r in record["results"]:
        assert r["bp_ms"] > 0 and r["methods"]["bp"]["ratio_to_bp"] == pytest.approx(1.0)
        if r["config"]["model"] == "mlp":
            assert {"dfa", "fa", "dfa-hooks", "dfa-points"} <= set(r["methods"])
        else:
            assert "dfa-hooks" in r["skipped"]  # the baselines re-create MLPs only, and say so
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("method", bench.default_methods(PRESET))
@pytest.mark.parametrize("config", bench.preset(PRESET), ids=lambda c: c.label.replace(" ", "-"))
def test_grid_step(benchmark, record_step, config, method):
    """One training step of one method on one grid point (pytest-benchmark times it; on a GPU the
    step ends with torch.cuda.synchronize())."""
    dtype = getattr(torch, config.dtype)
    torch.manual_seed(0)
    plain = bench._plain_model(config).to(DEVICE, dtype)
    try:
        module, params = bench._wrapped(plain, method)
    except bench.Unavailable as exc:
        pytest.skip(str(exc))
    x = torch.randn(config.batch, 1, 28, 28, device=DEVICE, dtype=dtype)
    t = torch.randint(0, 10, (config.batch,), device=DEVICE)
    step = bench._step_fn(module, list(params), x, t)

    def timed():
        step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"grid {config.label}"
    benchmark.pedantic(timed, rounds=10, iterations=1, warmup_rounds=2)
    record_step(benchmark.group, method, benchmark)
