"""The torch definition of GrAPE's alignment step (``align_step``), used by the torch backend and
as the reference of the Triton kernel (``triton_kernels/align_step.py``, which has the math).

    J    = P^T T / batch
    u_j  = B_j / |B_j|,   c_j = <u_j, J_j> / |J_j|
    u'_j = u_j + (lr / n_out) (J_j / |J_j| - c_j u_j)      (gradient step on 1 - mean_j c_j, at |u_j| = 1)
    B_j <- |B_j| u'_j / |u'_j|

The step changes each column's direction only: its norm, and with it the feedback's scale
(``feedback_scale``, the per-site fan), is kept, and the step's size does not depend on it. GrAPE's
paper takes the step on B and then normalises every column to unit norm; on unit columns that is
exactly the step above, but it would silently discard ``feedback_scale`` and the smaller norms of
per-feature (channel-wise) columns.
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
    ``[n_l, n_out]``. A column with J_j = 0 is left as it is; every column keeps its norm."""
    k = b.shape[1]
    nb, nj = b.norm(dim=0), j.norm(dim=0)
    live = (nj > 0) & (nb > 0)
    one = torch.ones_like(nb)
    u = b / torch.where(live, nb, one)                     # the column's direction (where it has one)
    j_hat = j / torch.where(live, nj, one)
    cos = torch.where(live, (u * j_hat).sum(0), torch.zeros_like(nb))
    grad = -(j_hat - cos * u) / k                          # d(1 - mean_j c_j) / du at |u| = 1
    stepped = u - lr * grad
    new = stepped * (nb / torch.where(live, stepped.norm(dim=0), one))
    return torch.where(live, new, b), cos


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
