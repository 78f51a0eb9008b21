"""The kernel-backend contract: what the engine asks of a backend, and how a backend declines.

Every backend implements the four ops on the same arguments as their PyTorch
definitions in ``fastdfa.ops`` (the torch backend IS those definitions):

    dfa_project(error [N, n_out], feedback_all [R, n_out], sites) -> [N, R]
        ``out[:, block_s] = (e @ F_s^T) * g_s'(state_s)`` (g' only for a site that carries a state)
    dfa_wgrad(deltas, inputs, bias, streams=None) -> [(dW [m, k], db [m] | None), ...]
    jvp_linear(x [N, k], weight [m, k], bias, activation, tangents [T, N, k] | None) -> (h, dh | None, state)
    align_step(feedback_all [R, n_out], sites, lr) -> mean column cosine per site before the step (fp32);
        the feedback is updated in place

and says, for a layer and a training forward, whether it runs that layer on
its fused route (``fused_route_refusal``: None to accept, else the reason in
words). The engine never probes a backend with ``getattr``: what it may use
is this class.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import torch

from ..ops.align_step import AlignSite
from ..ops.dfa_project import ProjectSite

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class KernelBackend(abc.ABC):
    """One backend's ops. Subclasses set ``name`` and ``fuses_layers`` and implement the four ops."""

    name: str = ""
    # True: fastdfa.Linear / Conv2d in DFA mode run their training forward through the backend
    # (jvp_linear / the activation state) and the projection applies their g' (fastdfa.engine.fused).
    fuses_layers: bool = False
    ProjectSite = ProjectSite
    AlignSite = AlignSite

    @abc.abstractmethod
    def dfa_project(self, error: torch.Tensor, feedback_all: torch.Tensor, sites: Sequence[ProjectSite],
                    out: torch.Tensor | None = None) -> torch.Tensor: ...

    @abc.abstractmethod
    def dfa_wgrad(self, deltas: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], bias: Sequence[bool],
                  streams: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor | None]]: ...

    @abc.abstractmethod
    def jvp_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   activation: str | None = None, tangents: torch.Tensor | None = None): ...

    @abc.abstractmethod
    def align_step(self, feedback_all: torch.Tensor, sites: Sequence[AlignSite], lr: float) -> torch.Tensor: ...

    def dtype_refusal(self, dtype: torch.dtype) -> str | None:
        """Why this backend cannot run a model of ``dtype`` (None: it can)."""
        if dtype not in KERNEL_DTYPES:
            return (f"backend {self.name!r} runs float32, float16 and bfloat16 models; this model is {dtype}. "
                    "Use backend='torch' for it.")
        return None

    def fused_route_refusal(self, autocast: bool) -> str | None:
        """Why no layer of this training forward takes the fused route (None: layers may)."""
        if not self.fuses_layers:
            return f"the {self.name} backend runs every layer through autograd (no fused route)"
        if autocast:
            return "autocast is on: the fused kernels run at the parameters' dtype, so autograd runs the layers"
        return None

    def __deepcopy__(self, memo) -> "KernelBackend":
        # one instance per process (get_backend), holding no model state; the cuda backend holds the compiled
        # extension module, which cannot be copied: a deep-copied wrapper shares its backend
        return self

    def __repr__(self) -> str:
        return f"<fastdfa backend {self.name!r}>"
