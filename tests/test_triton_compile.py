"""Every Triton kernel variant the launchers make compiles for sm_80 and sm_90, without a GPU, and
the ones the engine launches do not spill.

``fastdfa.triton_kernels.aot`` takes the launches each launcher would make (``plan_<op>``: the
kernel, grid, arguments, constexprs, warps and stages, at the shapes of DFA nets), binds them as
``JITFunction.run`` does (pointer and 16-divisible integer arguments get ``tt.divisibility``) and
compiles them ahead of time with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch,
32))``: PTX, then a cubin through Triton's bundled ptxas, whose log gives registers and spills.
It runs in a subprocess without ``TRITON_INTERPRET`` (conftest sets it for the kernel tests; under
it a ``@triton.jit`` function is an interpreter object with nothing to compile).

Fails on a compile error, on shared memory above the target's opt-in limit (sm_80: 163 KiB,
sm_90: 227 KiB), or on a spill in a kernel the engine launches (the API-only ones, jvp_linear
with more than one tangent, are reported). The table (per compiled kernel and target: registers,
spill stores / loads, stack, shared memory, and the same variant's numbers before the kernels'
alignment / tiling changes, from ``triton_compile_before.json``) is printed, and written to
``$FASTDFA_COMPILE_REPORT`` when that is set.

By default a deterministic covering sample is compiled (every pair of axis values -- dtype,
precision, activation, bias, tangent tile, batch / sizes multiples of 16 or not -- and every block
configuration at least once); ``FASTDFA_COMPILE_FULL=1`` compiles every variant. Compiled kernels
are kept in a temp dir (``FASTDFA_COMPILE_CACHE``, default ``$TMPDIR/fastdfa-aot-triton-<version>``),
so a second run only binds and looks up.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import pytest

triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEFORE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_compile_before.json")


def _has_nvidia_backend() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


@pytest.mark.skipif(not _has_nvidia_backend(), reason="this triton has no NVIDIA backend")
def test_every_variant_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    full = os.environ.get("FASTDFA_COMPILE_FULL") == "1"
    out = tmp_path / "aot.json"
    table = tmp_path / "report.txt"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "python")] + env.get("PYTHONPATH", "").split(os.pathsep))
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "fastdfa.triton_kernels.aot", "--arch", "80,90",
           "--jobs", str(min(4, os.cpu_count() or 1)), "--json", str(out), "--report", str(table),
           "--cache", os.environ.get("FASTDFA_COMPILE_CACHE") or os.path.join(
               tempfile.gettempdir(), f"fastdfa-aot-triton-{triton.__version__}")]
    if os.path.exists(BEFORE):
        cmd += ["--baseline", BEFORE]
    if full:
        cmd.append("--full")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=None if full else 900)
    elapsed = time.perf_counter() - t0
    assert out.exists(), f"the compile check did not finish (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    text = table.read_text()
    print(text)
    print(f"compile check: {elapsed:.1f} s")
    path = os.environ.get("FASTDFA_COMPILE_REPORT")
    if path:
        with open(path, "w") as f:
            f.write(text)
    found = json.loads(out.read_text())
    assert found["results"], "nothing was compiled"
    assert not found["failures"], "\n".join(found["failures"])
    assert proc.returncode == 0, proc.stderr
