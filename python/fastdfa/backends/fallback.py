"""``backend="auto"``'s safety net: a kernel backend whose ops fall back, one by one, to the torch backend.

When ``"auto"`` picks a kernel backend (``AUTO_PREFERENCE`` in ``backends/__init__.py``), a kernel that
fails to compile or launch on the user's GPU (an unsupported architecture, a Triton or driver bug, a
register or shared-memory limit) must not fail their first training step: the torch backend computes
the same op (it IS the op's definition, ``fastdfa/ops/``), only slower. So each op runs on the kernel
backend until its first failure; then a warning names the op, the error and how to report it, and
that op runs on the torch backend for the rest of the process. The other ops stay on the kernels: the
backends share one contract (``base.py``), so their ops mix freely. A backend named explicitly
(``backend="triton"``) is never wrapped: its errors are raised.

Not caught: ``ValueError`` and ``TypeError``. The launchers raise them for bad input (a shape that
does not match, a wrong dtype) before launching anything, and the torch backend would refuse the
same input: that is the caller's error, not the kernel's.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from .base import KernelBackend

REPORT_HINT = ("please report it with the output of `python -m fastdfa info` and this message "
               "(the fastdfa repository's issue tracker)")


class KernelFallbackWarning(RuntimeWarning):
    """A kernel failed under ``backend="auto"``; its op now runs on the torch backend."""


class FallbackBackend(KernelBackend):
    """``kernels``' ops, each falling back to ``reference`` (the torch backend) at its first failure."""

    def __init__(self, kernels: KernelBackend, reference: KernelBackend):
        self.kernels, self.reference = kernels, reference
        self.name = kernels.name
        self.fuses_layers = kernels.fuses_layers
        self.fallen_back: dict[str, str] = {}  # op -> the error that moved it to the reference backend

    def _run(self, op: str, *args, **kwargs):
        if op in self.fallen_back:
            return getattr(self.reference, op)(*args, **kwargs)
        try:
            return getattr(self.kernels, op)(*args, **kwargs)
        except (ValueError, TypeError):
            raise  # bad input, refused before any launch: the reference would refuse it too
        except Exception as exc:  # a compile or launch failure of this backend's kernel, whatever its type
            self.fallen_back[op] = f"{type(exc).__name__}: {exc}"
            warnings.warn(
                f"fastdfa: the {self.kernels.name} kernel of {op!r} failed ({type(exc).__name__}: {exc}). "
                f"backend='auto' runs {op!r} on the torch backend from now on in this process: the same "
                f"results, slower. To see the error instead, pass backend={self.kernels.name!r}; "
                f"{REPORT_HINT}.", KernelFallbackWarning, stacklevel=3)
            return getattr(self.reference, op)(*args, **kwargs)

    def dfa_project(self, error, feedback_all, sites, out=None):
        return self._run("dfa_project", error, feedback_all, sites, out=out)

    def dfa_wgrad(self, deltas, inputs, bias, streams=None):
        return self._run("dfa_wgrad", deltas, inputs, bias, streams=streams)

    def jvp_linear(self, x, weight, bias, activation=None, tangents=None):
        return self._run("jvp_linear", x, weight, bias, activation, tangents)

    def align_step(self, feedback_all, sites: Sequence, lr: float):
        return self._run("align_step", feedback_all, sites, lr)

    def dtype_refusal(self, dtype):
        return self.kernels.dtype_refusal(dtype)

    def fused_route_refusal(self, autocast: bool):
        return self.kernels.fused_route_refusal(autocast)

    def __repr__(self) -> str:
        fallen = f", torch for {sorted(self.fallen_back)}" if self.fallen_back else ""
        return f"<fastdfa backend {self.name!r} (auto, falls back to torch per op{fallen})>"
