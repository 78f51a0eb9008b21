"""The triton backend: the fused kernels of ``triton_kernels/`` (``fastdfa.triton_kernels``).

Importing this module imports triton; ``fastdfa.backends`` does so only when
the backend is used. On a CPU the kernels run under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from ..triton_kernels import align_step, dfa_project, dfa_wgrad, jvp_linear
from .base import KernelBackend


class TritonBackend(KernelBackend):
    name = "triton"
    fuses_layers = True

    def dfa_project(self, error, feedback_all, sites, out=None):
        return dfa_project.dfa_project(error, feedback_all, sites, out=out)

    def dfa_wgrad(self, deltas, inputs, bias, streams=None):
        return dfa_wgrad.dfa_wgrad(deltas, inputs, bias)

    def jvp_linear(self, x, weight, bias, activation=None, tangents=None):
        return jvp_linear.jvp_linear(x, weight, bias, activation, tangents)

    def align_step(self, feedback_all, sites, lr):
        return align_step.align_step(feedback_all, sites, lr)
