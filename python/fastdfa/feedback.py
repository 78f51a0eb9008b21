"""Seeded random feedback matrices.

Every random matrix fastdfa creates (a DFA site's feedback ``F`` or an FA
layer's ``feedback_weight``) is drawn from its own CPU ``torch.Generator``
whose seed is derived from ``(seed, kind, index)`` by a stable hash. So the
same seed gives the same matrices whatever the global RNG state, whatever the
device the model lives on, and whatever other sites exist before it.

Values are drawn in float64 on the CPU and then cast and moved, so a float32
model and a float64 model with the same seed differ only by the cast.

Scale (documented contract, see ``feedback_matrix``):
    uniform:  F_ij ~ U(-sqrt(3 / n), sqrt(3 / n)) * scale
    gaussian: F_ij ~ N(0, 1 / n) * scale
with ``n`` the number of elements of one sample of the site tensor (C*H*W for a
conv site, dense or channel-wise). Both have variance ``scale**2 / n``, so
``||F e||`` per sample is about ``scale * ||e||``: the projected error has the
magnitude of the output error, spread over the site's elements, as the BP
error ``W^T e`` of a default-initialised layer roughly is.
"""

from __future__ import annotations

import hashlib
import math

import torch

FEEDBACK_KINDS = ("uniform", "gaussian")


def seeded_generator(seed: int, *keys: object) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and ``keys`` by SHA-256 (stable across runs)."""
    text = "/".join([str(int(seed))] + [str(k) for k in keys]).encode()
    derived = int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & ((1 << 63) - 1)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(derived)
    return gen


def feedback_matrix(
    shape: tuple[int, ...],
    fan: int,
    kind: str,
    generator: torch.Generator,
    scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Random matrix of ``shape`` with variance ``scale**2 / fan``.

    ``kind="uniform"`` draws ``U(-sqrt(3/fan), sqrt(3/fan)) * scale``;
    ``kind="gaussian"`` draws ``N(0, 1/fan) * scale``.
    """
    if kind not in FEEDBACK_KINDS:
        raise ValueError(f"feedback must be one of {FEEDBACK_KINDS}, got {kind!r}")
    if fan <= 0:
        raise ValueError(f"fan must be positive, got {fan}")
    if kind == "uniform":
        bound = math.sqrt(3.0 / fan)
        values = (torch.rand(shape, generator=generator, dtype=torch.float64) * 2.0 - 1.0) * bound
    else:
        values = torch.randn(shape, generator=generator, dtype=torch.float64) / math.sqrt(fan)
    return (values * scale).to(dtype=dtype, device=device)
