"""``dfa_wgrad``: every claimed layer's weight gradient from its delta, the PyTorch definition.

Math: for layer l with delta ``delta_l`` (``[N, m_l]``) and input ``h_{l-1}``
(``[N, k_l]``): ``dW_l = delta_l^T h_{l-1}`` (``[m_l, k_l]``) and
``db_l = sum_n delta_l[n]`` (``[m_l]``).

Kernels: ``triton_kernels/dfa_wgrad.py`` (all layers in ONE grouped-GEMM launch)
and the cuda backend's per-layer cuBLAS GEMMs fanned out over CUDA streams
(``fastdfa.backends.cuda_ops``); tests ``tests/test_dfa_wgrad.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def dfa_wgrad_reference(deltas: Sequence[torch.Tensor],   # per layer [N, m_l]
                        inputs: Sequence[torch.Tensor],   # per layer [N, k_l]
                        bias: Sequence[bool]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """PyTorch definition: ``dW_l = delta_l^T h_{l-1}``, ``db_l = delta_l.sum(0)``, one mm per layer."""
    return [(d.t() @ x, d.sum(0) if b else None) for d, x, b in zip(deltas, inputs, bias)]
