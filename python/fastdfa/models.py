"""Reference networks built from fastdfa layers (used by the CLI, tests and benchmarks)."""

from __future__ import annotations

import math

from torch import nn

from .layers import Conv2d, Linear

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}


def make_mlp(in_features: int, hidden: tuple[int, ...], n_out: int, activation: str = "relu") -> nn.Sequential:
    """Flatten -> fastdfa.Linear(activation=...) * len(hidden) -> fastdfa.Linear.

    The activation lives in the layers (``activation=``) so a kernel backend
    fuses it (``fastdfa.fused``); the math is that of separate modules.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers.append(Linear(width, h, activation=activation))
        width = h
    layers.append(Linear(width, n_out))
    return nn.Sequential(*layers)


def make_cnn(input_shape: tuple[int, int, int], n_out: int, channels: tuple[int, int] = (32, 64),
             hidden: int = 128, activation: str = "relu") -> nn.Sequential:
    """Two conv blocks (3x3 conv with its activation, 2x2 max-pool), then an MLP head
    (fastdfa.Linear with its activation fused, then the output layer).

    For 28x28 inputs: 32x14x14 -> 64x7x7 -> 128 -> n_out; for 8x8: 32x4x4 -> 64x2x2 -> 128 -> n_out.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    c_in, height, width = input_shape
    c1, c2 = channels
    flat = c2 * (height // 4) * (width // 4)
    if flat == 0:
        raise ValueError(f"input {input_shape} is too small for two 2x2 poolings")
    return nn.Sequential(
        Conv2d(c_in, c1, 3, padding=1, activation=activation), nn.MaxPool2d(2),
        Conv2d(c1, c2, 3, padding=1, activation=activation), nn.MaxPool2d(2),
        nn.Flatten(),
        Linear(flat, hidden, activation=activation),
        Linear(hidden, n_out),
    )


def make_model(kind: str, input_shape: tuple[int, ...], n_out: int, hidden: tuple[int, ...] = (256, 256, 256),
               activation: str = "relu") -> nn.Sequential:
    if kind == "mlp":
        return make_mlp(math.prod(input_shape), hidden, n_out, activation)
    if kind == "cnn":
        if len(input_shape) != 3:
            raise ValueError(f"--model cnn needs image inputs [C, H, W], got {input_shape}")
        return make_cnn(input_shape, n_out, activation=activation)
    raise ValueError(f"unknown model {kind!r}: use 'mlp' or 'cnn'")
