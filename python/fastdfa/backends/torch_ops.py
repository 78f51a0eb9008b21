"""The torch backend: the PyTorch definitions of ``fastdfa.ops`` (always available, CPU and GPU).

It takes no fused route (``fuses_layers = False``): every layer's local
backward runs through autograd, and the engine only asks it for the one
projection GEMM and, in mode "grape", the alignment step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..ops.align_step import AlignSite, align_step_reference
from ..ops.dfa_project import ProjectSite, dfa_project_reference
from ..ops.dfa_wgrad import dfa_wgrad_reference
from ..ops.jvp_linear import jvp_linear_reference
from .base import KernelBackend


class TorchBackend(KernelBackend):
    name = "torch"
    fuses_layers = False

    def dfa_project(self, error: torch.Tensor, feedback_all: torch.Tensor, sites: Sequence[ProjectSite],
                    out: torch.Tensor | None = None) -> torch.Tensor:
        if not any(s.state is not None for s in sites):  # no g' to apply: the one GEMM over every site's feedback
            result = torch.mm(error.to(feedback_all.dtype), feedback_all.t())
        else:
            result = dfa_project_reference(error, feedback_all, sites)
        if out is not None:
            out.copy_(result)
            return out
        return result

    def dfa_wgrad(self, deltas, inputs, bias, streams: int | None = None):
        return dfa_wgrad_reference(deltas, inputs, bias)

    def jvp_linear(self, x, weight, bias, activation=None, tangents=None):
        return jvp_linear_reference(x, weight, bias, activation, tangents)

    def align_step(self, feedback_all: torch.Tensor, sites: Sequence[AlignSite], lr: float) -> torch.Tensor:
        if not sites:
            return torch.empty(0, dtype=torch.float32, device=feedback_all.device)
        new, cos = align_step_reference(feedback_all, sites, lr)
        feedback_all.copy_(new)
        return cos.float()

    def dtype_refusal(self, dtype: torch.dtype) -> str | None:
        return None  # any floating dtype, float64 included (the tests' oracle)
