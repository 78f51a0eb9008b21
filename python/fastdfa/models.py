"""Reference networks built from fastdfa layers (used by the CLI, tests and benchmarks)."""

from __future__ import annotations

import math

from torch import nn

from .layers import Conv2d, Linear

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")


def make_mlp(in_features: int, hidden: tuple[int, ...], n_out: int, activation: str = "relu") -> nn.Sequential:
    """Flatten -> fastdfa.Linear(activation=...) * len(hidden) -> fastdfa.Linear.

    The activation lives in the layers (``activation=``) so a kernel backend
    fuses it (``fastdfa.fused``); the math is that of separate modules.
    """
    _check_activation(activation)
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
    _check_activation(activation)
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


class ResidualBlock(nn.Module):
    """He et al.'s basic block: ``g(BN(conv3x3(g(BN(conv3x3_s(x))))) + shortcut(x))``.

    The shortcut is the identity, or a strided 1x1 fastdfa.Conv2d + BN where the shape changes. The
    convolutions have no bias (BN follows) and no fused activation (BN sits between them and g). Under
    DFA each convolution's input is a site; the identity shortcut is not a layer, so the error reaching
    a block's output also flows, exactly, down the shortcut into the block below.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, activation: str = "relu"):
        _check_activation(activation)
        super().__init__()
        self.conv1 = Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act = ACTIVATIONS[activation]()
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(y)) + self.shortcut(x))


def make_resnet(input_shape: tuple[int, int, int], n_out: int, blocks: int = 1,
                channels: tuple[int, int, int] = (16, 32, 64), activation: str = "relu") -> nn.Sequential:
    """The CIFAR ResNet of He et al. (2016) with ``blocks`` basic blocks per stage (3 gives ResNet-20,
    the net of GrAPE's calibration result; 1 gives ResNet-8): a 3x3 conv + BN + g stem, three stages of
    ``channels`` (the 2nd and 3rd halve the resolution), global average pooling, a fastdfa.Linear head.

    For 28x28 inputs: 16x28x28 -> 32x14x14 -> 64x7x7 -> 64 -> n_out.
    """
    _check_activation(activation)
    if blocks < 1:
        raise ValueError(f"blocks must be >= 1, got {blocks}")
    if len(input_shape) != 3:
        raise ValueError(f"a ResNet needs image inputs [C, H, W], got {input_shape}")
    c_in = input_shape[0]
    layers: list[nn.Module] = [Conv2d(c_in, channels[0], 3, padding=1, bias=False), nn.BatchNorm2d(channels[0]),
                               ACTIVATIONS[activation]()]
    width = channels[0]
    for stage, c in enumerate(channels):
        for b in range(blocks):
            layers.append(ResidualBlock(width, c, stride=2 if stage > 0 and b == 0 else 1, activation=activation))
            width = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), Linear(width, n_out)]
    return nn.Sequential(*layers)


# --model: name -> ResNet blocks per stage
RESNETS = {"resnet8": 1, "resnet20": 3}
MODELS = ("mlp", "cnn", *RESNETS)


def make_model(kind: str, input_shape: tuple[int, ...], n_out: int, hidden: tuple[int, ...] = (256, 256, 256),
               activation: str = "relu") -> nn.Sequential:
    if kind == "mlp":
        return make_mlp(math.prod(input_shape), hidden, n_out, activation)
    if kind in ("cnn", *RESNETS):
        if len(input_shape) != 3:
            raise ValueError(f"--model {kind} needs image inputs [C, H, W], got {input_shape}")
        if kind == "cnn":
            return make_cnn(input_shape, n_out, activation=activation)
        return make_resnet(input_shape, n_out, RESNETS[kind], activation=activation)
    raise ValueError(f"unknown model {kind!r}: use one of {', '.join(MODELS)}")
