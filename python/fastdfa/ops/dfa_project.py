"""``dfa_project``: all sites' projected errors from the output error, in ONE GEMM.

Math: with the output error ``e`` (``[N, n_out]``, N = batch rows) and the
feedback of all sites stacked row-wise into ``F_all`` (``[R, n_out]``,
R = sum of the sites' rows), ``P = e @ F_all^T`` (``[N, R]``); site ``s`` owns
columns ``[offset_s, offset_s + rows_s)`` of ``P``:

    dense site:        delta_s = P[:, cols].view(N, *site_shape)
    per-feature site:  delta_s = P[:, cols] broadcast over every per-sample axis but the feature axis:
                       [N, C] -> [N, C, 1, 1].expand(N, C, H, W) (a conv input, channel axis),
                       [N, H] -> [N, 1, H].expand(N, T, H) (tokens, last axis)

Equivalent per-site PyTorch code (the definition the tests check):
``(e @ F_s.T).reshape(site_tensor.shape)``. With a saved activation state for a
site (its producer's g' fused into the projection's epilogue, the kernel
backends' claimed sites): ``(e @ F_s.T) * g_s'(state_s)``.

Kernels: ``triton_kernels/dfa_project.py`` (one launch, g' in the epilogue) and
``csrc/dfa_project_epilogue.cu`` (after a cuBLAS GEMM); tests
``tests/test_dfa_project.py``; benchmark ``bench/test_triton_kernels.py``.

Layout: ``F_all`` is row-major ``[R, n_out]``, so each site's ``F_s`` is a
contiguous block of rows (``site.feedback``) and ``P``'s per-site slices are
views: no copy of the feedback and none of the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..activations import STATE_OF, derivative_from_state


@dataclass(frozen=True)
class ProjectSite:
    """One site of the projection: its column block and the producer's activation state."""

    offset: int                    # first row of F_all / first column of out
    rows: int                      # the site's features
    activation: str | None = None  # the producer's activation (None: no g' epilogue)
    state: torch.Tensor | None = None  # [N, rows] saved state (uint8 mask / h / a), see _common


def dfa_project_reference(error: torch.Tensor,          # [N, n_out]
                          feedback_all: torch.Tensor,   # [R, n_out], the sites' feedback stacked row-wise
                          sites: Sequence[ProjectSite]) -> torch.Tensor:  # -> [N, R]
    """PyTorch definition of the op: ``out[:, block_s] = (e @ F_s^T) * g_s'(state_s)``, at the feedback's
    dtype; columns of no site are zero."""
    dtype = feedback_all.dtype
    out = torch.zeros(error.shape[0], feedback_all.shape[0], dtype=dtype, device=error.device)
    e = error.to(dtype)
    for s in sites:
        block = e @ feedback_all[s.offset:s.offset + s.rows].t()
        if s.activation is not None and s.state is not None:
            state = s.state if STATE_OF[s.activation] == "mask" else s.state.to(dtype)
            block = block * derivative_from_state(state, s.activation).to(dtype)
        out[:, s.offset:s.offset + s.rows] = block
    return out


def project_to_sites(
    error: torch.Tensor,          # [N, n_out]
    feedback_all: torch.Tensor,   # [R, n_out], the sites' feedback stacked row-wise
    layout: Sequence[tuple[int, int, tuple[int, ...], int | None]],  # (offset, rows, site_shape, feature_axis)
    batch_shape: tuple[int, ...],  # leading dims of the site tensors, prod == N
) -> list[torch.Tensor]:
    """Projected error of every site, shaped like the site tensors: ONE GEMM, then views."""
    if error.dtype != feedback_all.dtype:
        error = error.to(feedback_all.dtype)
    projected = torch.mm(error, feedback_all.t())  # [N, R]: the one GEMM for all sites
    return split_projection(projected, layout, batch_shape)


def split_projection(
    projected: torch.Tensor,      # [N, R]
    layout: Sequence[tuple[int, int, tuple[int, ...], int | None]],  # (offset, rows, site_shape, feature_axis)
    batch_shape: tuple[int, ...],
    shapes: Sequence[tuple[int, ...]] | None = None,  # per site: this forward's per-sample shape
) -> list[torch.Tensor]:
    """Each site's projected error as a view of ``projected``, shaped like the site tensor: dense sites
    (``feature_axis`` None) take their block as the per-sample shape; per-feature sites broadcast it over
    every per-sample axis but ``feature_axis``, to this forward's shape (``shapes``; default the layout's)."""
    out = []
    for i, (offset, rows, site_shape, axis) in enumerate(layout):
        block = projected[:, offset:offset + rows]
        if axis is None or axis is False:
            out.append(block.reshape(*batch_shape, *site_shape))
            continue
        axis = 0 if axis is True else axis  # True: the channel-wise layout of older callers
        shape = site_shape if shapes is None else shapes[i]
        view = [1] * len(shape)
        view[axis] = rows
        out.append(block.reshape(*batch_shape, *view).expand(*batch_shape, *shape))
    return out
