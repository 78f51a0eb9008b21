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


def _has_nvidia_compiler() -> bool:
    """Triton's NVIDIA backend and its ptxas (bundled with the wheel, or TRITON_PTXAS_PATH)."""
    try:
        from triton import knobs
        from triton.backends import backends
        return "nvidia" in backends and os.path.exists(knobs.nvidia.ptxas.path)
    except Exception:  # noqa: BLE001 -- an older or stripped triton: nothing to compile with
        return False


@pytest.mark.skipif(not _has_nvidia_compiler(), reason="this triton has no NVIDIA backend / ptxas")
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


# ---------------------------------------------------------------- the launchers' host-side choices (no compile)
def test_alignment_index_and_register_helpers():
    from fastdfa.triton_kernels._common import divisibility, index_dtype, padded, register_budget

    assert divisibility(784, 1024) == 16 and divisibility(1000) == 8 and divisibility(100, 784) == 4
    assert divisibility(10) == 2 and divisibility(7, 16) == 1 and divisibility(0) == 16
    assert str(index_dtype(2**31 - 1)) == "int32" and str(index_dtype(2**31 - 1, 2**31)) == "int64"
    assert padded(10) == 16 and padded(2000) == 2000
    assert register_budget(4) == 255 and register_budget(8) == 128


def _plans(device, batch, hidden, n_out, n_in):
    import torch

    from fastdfa.triton_kernels import align_step, dfa_project, dfa_wgrad, jvp_linear

    rows, offsets = list(hidden), [sum(hidden[:i]) for i in range(len(hidden))]
    feedback = torch.empty(sum(rows), n_out, device=device)
    error = torch.empty(batch, n_out, device=device)
    sites = [dfa_project.ProjectSite(o, r, "relu", torch.empty(batch, r, dtype=torch.uint8, device=device))
             for o, r in zip(offsets, rows)]
    out, launches = dfa_project.plan_dfa_project(error, feedback, sites, gpu=True)
    deltas = [out[:, o:o + r] for o, r in zip(offsets, rows)]
    inputs = [torch.empty(batch, w, device=device) for w in (n_in, *rows[:-1])]
    launches += dfa_wgrad.plan_dfa_wgrad(deltas, inputs, [True] * len(rows), gpu=True)[1]
    x, w = torch.empty(batch, n_in, device=device), torch.empty(rows[0], n_in, device=device)
    launches += jvp_linear.plan_jvp_linear(x, w, None, "gelu", torch.empty(1, batch, n_in, device=device), gpu=True)[1]
    asites = [align_step.AlignSite(o, r, torch.empty(batch, r, device=device), torch.empty(batch, n_out, device=device))
              for o, r in zip(offsets, rows)]
    launches += align_step.plan_align_step(feedback, asites, 0.1, gpu=True)[1]
    return out, launches


def test_launches_bind_every_parameter_once_with_32_bit_offsets_when_they_fit():
    out, launches = _plans("cpu", 100, (1000, 100), 10, 784)
    assert out.shape == (100, 1100) and out.stride(0) % 16 == 0  # the launcher's own output: padded rows
    assert len(launches) == 5
    for launch in launches:
        names = launch.kernel.arg_names
        bound = names[:len(launch.args)] + list(launch.constexprs)
        assert sorted(bound) == sorted(names), launch.kernel
        assert str(launch.constexprs["INDEX"]) == "int32"
        assert launch.maxnreg is not None and launch.maxnreg * 32 * launch.num_warps * 2 <= 65536
    project, wgrad, jvp, _, _ = launches
    # Site offsets 0 and 1000, rows 1000 and 100: 4 divides them all; n_out 10: 2.
    assert project.constexprs["ALIGN"] == 4 and project.constexprs["ALIGN_K"] == 2
    assert jvp.constexprs["ALIGN_IN"] == 16 and jvp.constexprs["ALIGN_OUT"] == 8  # 784 in, 1000 out
    assert jvp.args[9] * 16 == 784 and jvp.args[8] * 8 == 1000  # K and M arrive as multiples of the alignment


def test_offsets_past_2_31_switch_the_kernels_to_64_bit():
    _, launches = _plans("meta", 1 << 20, (4096, 4096), 1000, 4096)  # 2^20 rows x 8192 columns
    for launch in launches:
        assert str(launch.constexprs["INDEX"]) == "int64", launch.kernel
