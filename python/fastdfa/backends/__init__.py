"""Backend availability and the dispatch rule.

Backends: ``torch`` (the reference; always available, runs on CPU),
``triton`` and ``cuda``, each a ``KernelBackend`` (``base.py``: the contract;
``torch_ops.py``, ``triton_ops.py``, ``cuda_ops.py``: the implementations).
Availability is checked once and cached (xformers' rule): importing fastdfa
never imports triton or the compiled extension.

Dispatch rule (docs/design.md section 2):
  * ``"auto"`` picks the first available backend of ``AUTO_PREFERENCE`` for the
    device: torch on every device today, since on the first GPU run the kernel
    backends were slower than torch's own cuBLAS GEMMs in eager steps (the
    numbers are at ``AUTO_PREFERENCE``). A kernel backend chosen by "auto" runs
    behind ``FallbackBackend`` (``fallback.py``): an op whose kernel fails to
    compile or launch moves to the torch backend with one warning;
  * an explicitly requested backend (argument or ``FASTDFA_BACKEND``) that is
    not available raises ``BackendUnavailableError`` saying why and how to
    get it.
"""

from __future__ import annotations

import functools
import importlib
import os
import shutil
from dataclasses import dataclass

import torch

# The backend names live with every other option's choices in config.py; BACKENDS is re-exported here.
from ..config import BACKEND_CHOICES
from ..config import BACKENDS as BACKENDS
from .base import KernelBackend
from .torch_ops import TorchBackend

ENV_VAR = "FASTDFA_BACKEND"

# The ops of the KernelBackend contract (base.py), which every backend implements in full (an
# abstract method left out makes the backend impossible to instantiate). Each triton op is the
# module of the same name in triton_kernels/ (fastdfa.triton_kernels).
KERNEL_OPS = ("dfa_project", "dfa_wgrad", "jvp_linear", "align_step")


# What "auto" picks, per device type: the first available backend in the list. Torch everywhere, GPUs
# included: on the first GPU run (H200, torch 2.11, triton 3.6; bench/results/gpu-check-targets.json)
# it was the fastest eager DFA on all three target models: 0.87x BP eager on the GEMM-bound MLP
# against 1.09x (cuda) and 1.89x (triton), 1.05x against 1.82x / 1.57x on the latency-bound MLP, 1.20x
# against 1.56x / 1.99x on the CNN. The kernel backends stay one argument away (backend="cuda" /
# "triton") until they win in eager steps; then they go first here, behind FallbackBackend.
AUTO_PREFERENCE: dict[str, tuple[str, ...]] = {"cuda": ("torch",), "cpu": ("torch",)}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here."""


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # why it is unavailable, or what it runs on


@functools.lru_cache(maxsize=None)
def module_version(name: str) -> str | None:
    try:
        module = importlib.import_module(name)
    except Exception:  # any import failure means "not usable", reported with its reason
        return None
    return getattr(module, "__version__", "unknown")


def _triton_status() -> BackendStatus:
    version = module_version("triton")
    if version is None:
        return BackendStatus("triton", False, "the triton package is not installed (pip install triton)")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not torch.cuda.is_available() and not interpret:
        return BackendStatus("triton", False, f"triton {version} is installed but no CUDA GPU is visible "
                                              "(set TRITON_INTERPRET=1 to run its kernels on the CPU interpreter)")
    try:
        for op in KERNEL_OPS:
            importlib.import_module(f"fastdfa.triton_kernels.{op}")
    except Exception as exc:  # a kernel module that does not import makes the backend unusable, with the reason
        return BackendStatus("triton", False, f"triton {version} is installed but fastdfa.triton_kernels does not "
                                              f"import: {type(exc).__name__}: {exc}")
    return BackendStatus("triton", True, f"triton {version}" + (" (interpreter)" if interpret else ""))


def _cuda_status() -> BackendStatus:
    if os.environ.get("FASTDFA_SKIP_CUDA_BUILD") == "1":
        skipped = " (FASTDFA_SKIP_CUDA_BUILD=1 was set)"
    else:
        skipped = ""
    try:
        importlib.import_module("fastdfa._C")
    except ImportError:
        if torch.version.cuda is None:
            why = "torch is a CPU build (torch.version.cuda is None), so the extension fastdfa._C was not built"
        elif shutil.which("nvcc") is None:
            why = "the extension fastdfa._C is not built and nvcc is not on PATH"
        else:
            why = ("the extension fastdfa._C is not built; rebuild with "
                   "`FASTDFA_FORCE_CUDA=1 pip install --no-build-isolation -e .`")
        return BackendStatus("cuda", False, why + skipped)
    if not torch.cuda.is_available():
        return BackendStatus("cuda", False, "fastdfa._C is built but no CUDA GPU is visible")
    archs = getattr(importlib.import_module("fastdfa._C"), "built_archs", lambda: "unknown")()
    return BackendStatus("cuda", True, f"CUDA {torch.version.cuda}, fastdfa._C built for {archs}")


@functools.lru_cache(maxsize=None)
def get_backend(name: str) -> KernelBackend:
    """The ``KernelBackend`` named ``name`` (one instance per process). The triton and cuda
    implementations are imported here, on first use: they import triton / the compiled extension."""
    if name == "torch":
        return TorchBackend()
    if name == "triton":
        triton_ops = importlib.import_module("fastdfa.backends.triton_ops")
        return triton_ops.TritonBackend()
    if name == "cuda":
        kernels = importlib.import_module("fastdfa._C")
        cuda_ops = importlib.import_module("fastdfa.backends.cuda_ops")
        return cuda_ops.CudaBackend(kernels)
    raise BackendUnavailableError(f"backend {name!r} has no kernels in this version")


@functools.lru_cache(maxsize=None)
def backend_status(name: str) -> BackendStatus:
    """Availability of one backend, checked once per process."""
    if name == "torch":
        return BackendStatus("torch", True, f"torch {torch.__version__} (reference, CPU and GPU)")
    if name == "triton":
        return _triton_status()
    if name == "cuda":
        return _cuda_status()
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKEND_CHOICES}")


def _reaches(device: torch.device) -> bool:
    """Whether a kernel backend can run on ``device``'s tensors: CUDA ones, or any under the Triton
    interpreter (``TRITON_INTERPRET=1``, the CPU tests)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(requested: str | None, device: torch.device) -> str:
    """The backend to run on ``device`` for a request of ``"auto"``, a name, or None.

    None means: ``FASTDFA_BACKEND`` if set, else "auto".
    """
    explicit_source = "argument"
    if requested is None:
        requested = os.environ.get(ENV_VAR, "auto")
        explicit_source = ENV_VAR
    if requested == "auto":
        for name in AUTO_PREFERENCE.get(device.type, ("torch",)):
            if name == "torch" or (backend_status(name).available and _reaches(device)):
                return name
        return "torch"
    status = backend_status(requested)  # raises on unknown names
    if not status.available:
        raise BackendUnavailableError(
            f"backend {requested!r} was requested ({explicit_source}) but is unavailable: {status.reason}. "
            f"Use backend='auto' or 'torch', or see `python -m fastdfa info`.")
    if requested != "torch" and not _reaches(device):
        raise BackendUnavailableError(f"backend {requested!r} needs CUDA tensors, but the model is on {device}")
    return requested


def backend_for(requested: str | None, device: torch.device) -> KernelBackend:
    """The ``KernelBackend`` that runs a model on ``device`` for a request (as ``resolve_backend``).
    A kernel backend that "auto" chose comes behind ``FallbackBackend``: its ops fall back to torch
    one by one at their first failure, with a warning. A named backend is returned as it is: its
    errors are raised."""
    name = resolve_backend(requested, device)
    chose_auto = (requested if requested is not None else os.environ.get(ENV_VAR, "auto")) == "auto"
    if name == "torch" or not chose_auto:
        return get_backend(name)
    return _auto_backend(name)


@functools.lru_cache(maxsize=None)
def _auto_backend(name: str) -> KernelBackend:
    from .fallback import FallbackBackend  # one per process, as get_backend's: an op that fell back stays there
    return FallbackBackend(get_backend(name), get_backend("torch"))
