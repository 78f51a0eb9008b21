"""Build fastdfa: the Python package, plus the CUDA extension fastdfa._C when it can be built.

Build switches (xformers' rule, docs/design.md section 4):
  * the extension is built when torch has CUDA and nvcc exists, or when
    FASTDFA_FORCE_CUDA=1;
  * FASTDFA_SKIP_CUDA_BUILD=1 skips it;
  * on a CPU-only torch it is skipped with a one-line notice.
Sources: csrc/*.cu (free of torch headers) and csrc/*.cpp (the one binding).
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def cuda_extension_decision():
    """(build, reason, sources) for the CUDA extension."""
    # Relative to setup.py: setuptools refuses absolute source paths ("setup script specifies an absolute
    # path", seen with setuptools 84 building the editable install in bench/cuda_build_check.sh).
    sources = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*.cu"))
                     + glob.glob(os.path.join(HERE, "csrc", "*.cpp")))
    if os.environ.get("FASTDFA_SKIP_CUDA_BUILD") == "1":
        return False, "FASTDFA_SKIP_CUDA_BUILD=1", sources
    if not sources:
        return False, "csrc/ has no CUDA sources in this version", sources
    try:
        import torch
    except ImportError:
        return (False, "torch is not installed (install torch first, then pip install --no-build-isolation -e .)",
                sources)
    if os.environ.get("FASTDFA_FORCE_CUDA") == "1":
        return True, "FASTDFA_FORCE_CUDA=1", sources
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build", sources
    if shutil.which("nvcc") is None:
        return False, "nvcc is not on PATH", sources
    return True, f"torch CUDA {torch.version.cuda} and nvcc found", sources


def default_max_jobs() -> int:
    """Parallel compile jobs: the cores, but at most one per 2 GiB of free memory (nvcc on the
    binding file peaks near 1.5 GiB), never fewer than one."""
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        free_gib = int(info["MemAvailable"].split()[0]) / 2**20
    except (OSError, KeyError, ValueError):
        return cores
    return max(1, min(cores, int(free_gib // 2)))


build, reason, sources = cuda_extension_decision()
ext_modules, cmdclass = [], {}
if build:
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    ext_modules = [CUDAExtension(
        "fastdfa._C", sources,
        include_dirs=[os.path.join(HERE, "csrc")],  # absolute: ninja builds from another directory
        define_macros=[("FASTDFA_ARCHS", f'"{archs}"')],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},  # no fast-math: erf and tanh are checked against torch
    )]
    cmdclass = {"build_ext": BuildExtension}
    print(f"fastdfa: building the CUDA extension for {archs} with MAX_JOBS={os.environ['MAX_JOBS']} ({reason})",
          file=sys.stderr)
else:
    print(f"fastdfa: skipping the CUDA extension: {reason}", file=sys.stderr)

setup(
    packages=find_packages("python"),
    package_dir={"": "python"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
