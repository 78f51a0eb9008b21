"""``python -m fastdfa info``: versions, devices and backend availability."""

from __future__ import annotations

import os
import platform
import subprocess

import torch

from . import __version__
from .backends import BACKENDS, KERNEL_OPS, backend_status, module_version


def source_commit() -> str | None:
    """The git commit of the source tree fastdfa runs from (``+dirty`` with uncommitted changes), if any."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


# The commit of the code this process loaded: a long run that writes its record after a later commit
# must name the code it ran, not the code checked out when it finished.
LOADED_COMMIT = source_commit()


def machine_info() -> dict:
    """Facts that identify a measurement: versions, device, threads, and the source commit the
    process loaded (plus ``commit_at_write`` when the checkout has moved on since)."""
    info = {
        "commit": LOADED_COMMIT,
        "fastdfa": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": module_version("triton"),
        "threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    else:
        info["device"] = "cpu"
    now = source_commit()
    if now != LOADED_COMMIT:
        info["commit_at_write"] = now
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
        lines.append(f"  {'':<7} ops: {', '.join(KERNEL_OPS)}")
    return "\n".join(lines)
