"""``jvp_linear``: primal and tangents of ``g(x W^T + b)``, and g''s saved state, the PyTorch definition.

Math: ``a = x W^T + b``, ``h = g(a)``; for tangent rows ``dx_t`` (``[T, N, k]``):
``dh_t = g'(a) * (dx_t W^T)``. The state is what g' is later recomputed from
(``fastdfa.activations.STATE_OF``): the uint8 mask ``a > 0`` for ReLU, ``h``
for tanh and sigmoid, ``a`` for GELU, nothing for None.

Kernels: ``triton_kernels/jvp_linear.py`` (one GEMM over the stacked primal and
tangent rows, W read once, activation in the epilogue) and the cuda backend
(cuBLAS + ``csrc/dual_activation.cu``); tests ``tests/test_jvp_linear.py``.
"""

from __future__ import annotations

import torch

from ..activations import STATE_OF, apply_activation, derivative_from_state


def jvp_linear_reference(x: torch.Tensor,                  # [N, k]
                         weight: torch.Tensor,             # [m, k]
                         bias: torch.Tensor | None,        # [m]
                         activation: str | None = None,
                         tangents: torch.Tensor | None = None):  # [T, N, k]
    """PyTorch definition: ``(g(a), g'(a) * (dx_t W^T), state)`` with ``a = x W^T + b``."""
    a = torch.nn.functional.linear(x, weight, bias)
    h = apply_activation(a, activation)
    kind = STATE_OF[activation]
    state = {"mask": (a > 0).to(torch.uint8), "pre": a, "output": h, None: None}[kind]
    dh = None
    if tangents is not None:
        # g'(a) from the state, as the kernels do (not torch.func.jvp: it would open a forward-AD level,
        # and GrAPE's dual pass, which calls this op when a kernel falls back, already runs inside one)
        dh = derivative_from_state(state, activation, dtype=a.dtype) * (tangents @ weight.t())
    return h, dh, state
