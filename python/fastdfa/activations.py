"""The activations a fastdfa layer can fuse (``activation=``), in PyTorch: forward and g'.

The fused kernels save the smallest state g' can be recomputed from
(``triton_kernels/_common.py``): a uint8 mask for ReLU, the output ``h`` for
tanh and sigmoid, the pre-activation ``a`` for GELU, nothing for None. These
functions are the PyTorch definitions the kernels are tested against and the
torch path of the engine uses.
"""

from __future__ import annotations

import contextvars

import torch
import torch.nn.functional as F

ACTIVATIONS = (None, "relu", "tanh", "sigmoid", "gelu")
# The kernels' activation codes (triton_kernels/_common.py, csrc/kernels.h use the same numbers).
ACTIVATION_CODES = {None: 0, "relu": 1, "tanh": 2, "sigmoid": 3, "gelu": 4}
# Which tensor holds the state: "mask" (uint8 a > 0), "output" (h), "pre" (a), or None.
STATE_OF = {None: None, "relu": "mask", "tanh": "output", "sigmoid": "output", "gelu": "pre"}
_INV_SQRT_2PI = 0.3989422804014327


def check_activation(activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


_FUNCTIONS = {"relu": F.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "gelu": F.gelu}


def apply_activation(a: torch.Tensor, activation: str | None) -> torch.Tensor:
    """g(a); GELU is the exact (erf) one, as ``torch.nn.GELU()``."""
    if activation is None:
        return a
    return _FUNCTIONS[activation](a)


def derivative_from_state(state: torch.Tensor | None, activation: str | None,
                          dtype: torch.dtype | None = None) -> torch.Tensor | float:
    """g'(a) from the saved state (see ``STATE_OF``), as ``dtype`` (default: the state's float dtype)."""
    if activation is None:
        return 1.0
    if activation == "relu":
        return state.to(dtype or torch.float32) if state.dtype == torch.uint8 else (state > 0).to(dtype or state.dtype)
    s = state if dtype is None else state.to(dtype)
    if activation == "tanh":
        return 1 - s * s
    if activation == "sigmoid":
        return s * (1 - s)
    if activation == "gelu":
        return torch.special.ndtr(s) + s * torch.exp(-0.5 * s * s) * _INV_SQRT_2PI
    raise ValueError(f"unknown activation {activation!r}")


# While fastdfa.metrics.gradient_alignment runs, the layers append (module, pre-activation) here.
CAPTURE: contextvars.ContextVar = contextvars.ContextVar("fastdfa_capture_preactivations", default=None)


def activate(module, a: torch.Tensor, activation: str | None) -> torch.Tensor:
    """g(a) for a layer's pre-activation ``a``, handing ``a`` to an active capture first."""
    captured = CAPTURE.get()
    if captured is not None:
        captured.append((module, a))
    return a if activation is None else _FUNCTIONS[activation](a)
