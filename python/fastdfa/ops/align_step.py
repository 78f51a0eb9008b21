"""The torch definition of GrAPE's alignment step (``align_step``), used by the torch backend and
as the reference of the Triton kernel (``triton_kernels/align_step.py``, which has the math).

    J    = P^T T / batch
    c_j  = <B_j, J_j> / (|B_j| |J_j|)
    B_j <- B_j + (lr / n_out) (J_j / (|B_j| |J_j|) - c_j B_j / |B_j|^2),   then B_j <- B_j / |B_j|
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AlignSite:
    offset: int                # first row of the site's feedback in the stacked buffer
    rows: int                  # n_l
    perturbation: torch.Tensor  # P [batch, n_l]
    tangent: torch.Tensor       # T [batch, n_out] (one per site, or the same tensor for all: "shared" JVP)


def column_step(b: torch.Tensor, j: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One site: ``(new B, per-column cosines before the step)`` for B and J^T of shape
    ``[n_l, n_out]``. A column with J_j = 0 gets no step, only the normalisation."""
    k = b.shape[1]
    nb, nj = b.norm(dim=0), j.norm(dim=0)
    live = (nj > 0) & (nb > 0)
    denom = torch.where(live, nb * nj, torch.ones_like(nb))
    cos = torch.where(live, (b * j).sum(0) / denom, torch.zeros_like(nb))
    grad = -(j / denom - cos * b / torch.where(live, nb * nb, torch.ones_like(nb))) / k
    stepped = torch.where(live, b - lr * grad, b)
    return stepped / stepped.norm(dim=0), cos


def align_step_reference(feedback_all: torch.Tensor, sites: Sequence[AlignSite], lr: float):
    """PyTorch definition; returns (new feedback, mean column cosines before the step)."""
    new = feedback_all.clone()
    cosines = []
    for s in sites:
        b = feedback_all[s.offset:s.offset + s.rows]
        j = s.perturbation.to(b.dtype).t() @ s.tangent.to(b.dtype) / s.perturbation.shape[0]
        new[s.offset:s.offset + s.rows], cos = column_step(b, j, lr)
        cosines.append(cos.mean())
    return new, torch.stack(cosines)
