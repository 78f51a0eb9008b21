"""csrc/ compiles: every .cu with nvcc for sm_80 and sm_90a (compile only, register and shared-memory
use printed), and the binding file against torch's headers (syntax only). Skips without the tools."""

import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))
ARCHS = ["sm_80", "sm_90a"]
NVCC = shutil.which("nvcc")


def _kernels(source: Path) -> list[str]:
    return re.findall(r"__global__\s+void\s+(\w+)", source.read_text())


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_cu_compiles(tmp_path, source, arch):
    proc = subprocess.run([NVCC, "-c", "-std=c++17", f"-arch={arch}", "--resource-usage", "-I", str(CSRC),
                           "-o", str(tmp_path / "k.o"), str(source)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    usage = [line for line in proc.stderr.splitlines() if "Function properties" in line or "Used" in line]
    print(f"\n{source.name} [{arch}]\n" + "\n".join(usage))
    kernels = _kernels(source)
    assert kernels, f"{source.name} defines no kernel"
    for kernel in kernels:  # every template instantiation reports its registers
        assert any(kernel in line for line in usage), f"{kernel}: no resource report from ptxas"
    assert sum("registers" in line for line in usage) >= len(kernels)


@pytest.mark.skipif(shutil.which("g++") is None or not Path("/usr/local/cuda/include/cuda_runtime.h").exists(),
                    reason="needs g++ and the CUDA headers")
def test_binding_compiles_against_torch_headers(tmp_path):
    """fastdfa_C.cpp, syntax only: a CPU torch has the headers but not the CUDA libraries. Its one
    CMake-generated CUDA header is stubbed (it only sets export macros)."""
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    torch_include = Path(torch.__file__).parent / "include"
    cmd = ["g++", "-std=c++20", "-fsyntax-only", "-I", str(tmp_path), "-I", str(torch_include),
           "-I", str(torch_include / "torch" / "csrc" / "api" / "include"), "-I", "/usr/local/cuda/include",
           "-I", str(CSRC), "-I", sysconfig.get_paths()["include"], "-DTORCH_EXTENSION_NAME=_C",
           str(CSRC / "fastdfa_C.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert proc.returncode == 0 and not errors, "\n".join(errors[:20])


def test_every_kernel_has_a_launcher_declared_in_kernels_h():
    header = (CSRC / "kernels.h").read_text()
    for source in CU_FILES:
        launchers = re.findall(r"cudaError_t\s+(launch_\w+)\s*\(", source.read_text())
        assert launchers, source.name
        for name in launchers:
            assert name in header, f"{name} ({source.name}) is not declared in kernels.h"
    includes = re.findall(r"#include\s+[<\"]([^>\"]+)", "".join(
        p.read_text() for p in CU_FILES + [CSRC / "kernels.h", CSRC / "activations.cuh"]))
    assert not [i for i in includes if i.startswith(("torch", "ATen", "c10"))], \
        f"the .cu files and their headers must stay free of torch (one binding file includes it): {includes}"
