"""``python -m fastdfa info``: versions, devices and backend availability."""

from __future__ import annotations

import platform

import torch

from . import __version__
from .backends import BACKENDS, OPS, _module_version, backend_status


def machine_info() -> dict:
    """Facts that identify a measurement: versions, device, threads."""
    info = {
        "fastdfa": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _module_version("triton"),
        "threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    else:
        info["device"] = "cpu"
    return info


def info_text() -> str:
    m = machine_info()
    lines = [f"fastdfa {m['fastdfa']}  (python {m['python']}, {m['platform']})",
             f"torch   {m['torch']}  (CUDA build: {m['torch_cuda'] or 'none'}, threads: {m['threads']})",
             f"triton  {m['triton'] or 'not installed'}",
             f"device  {m['device']}", "", "backends:"]
    for name in BACKENDS:
        status = backend_status(name)
        lines.append(f"  {name:<7} {'available' if status.available else 'unavailable':<12} {status.reason}")
        lines.append(f"  {'':<7} ops: {', '.join(sorted(OPS[name])) or 'none'}")
    return "\n".join(lines)
