"""Shared pieces of the Triton kernels: activation codes, their forward and
derivative as ``@triton.jit`` helpers, and the dot precision.

Activation state saved by the forward for the backward (the smallest thing
``g'`` can be recomputed from):

    ============  =========  =====================================  ==========================
    activation    code       state                                  g'(a) from the state s
    ============  =========  =====================================  ==========================
    None          0          nothing                                1
    "relu"        1          mask ``a > 0``, uint8 (1 byte/elem)    s
    "tanh"        2          the output ``h = tanh(a)``             1 - s^2
    "sigmoid"     3          the output ``h = sigmoid(a)``          s (1 - s)
    "gelu"        4          the pre-activation ``a``               Phi(a) + a phi(a)   (exact, erf)
    ============  =========  =====================================  ==========================

tanh and sigmoid reuse the layer output itself, so they cost no extra memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl

# The PyTorch definitions the kernels follow, re-exported for the op files.
from ..activations import (  # noqa: F401
    ACTIVATION_CODES,
    STATE_OF,
    derivative_from_state,  # noqa: F401
)
from ..activations import apply_activation as activation_reference  # noqa: F401

_TORCH_TO_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
KERNEL_DTYPES = tuple(_TORCH_TO_TL)


def tl_dtype(dtype: torch.dtype):
    """The Triton element type of a torch float dtype the kernels support."""
    try:
        return _TORCH_TO_TL[dtype]
    except KeyError:
        raise TypeError(f"the Triton kernels support {[str(d) for d in KERNEL_DTYPES]}, got {dtype}") from None


def dot_precision() -> str:
    """fp32 GEMM precision matching torch's setting: "ieee" unless the user allowed TF32.

    ``tl.dot`` on fp32 inputs defaults to TF32 (10-bit mantissa) on NVIDIA
    GPUs, while torch's default (``allow_tf32 = False``) is full fp32; a
    silent switch would make the triton backend 1e-3 off the torch one.
    """
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def divisibility(*values: int, cap: int = 16) -> int:
    """The largest power of two, at most ``cap``, dividing every value (0 counts as divisible).

    Offsets, row strides and addresses a kernel reads from a table, or derives
    from sizes, are opaque to Triton, which only specialises an ARGUMENT on
    being divisible by 16. A launcher passes this as a constexpr and the
    kernel claims it with ``tl.multiple_of``, which is then true by
    construction (addresses enter in elements: ``data_ptr() // element_size``).
    """
    d = cap
    for v in values:
        while v % d:
            d //= 2
    return d


def index_dtype(*extents: int):
    """``tl.int32`` when every element offset a kernel forms stays below 2^31, else ``tl.int64``.

    ``extents`` bound the offsets from above, one per tensor the kernel
    indexes: ``rows x row stride + columns`` with rows and columns rounded up
    to whole tiles (masked lanes form their offsets too). 32-bit offsets halve
    the registers the address arithmetic takes; the check is the host's.
    """
    return tl.int32 if max(extents, default=0) < 2**31 else tl.int64


def register_budget(num_warps: int) -> int:
    """Registers per thread for ptxas (``maxnreg``): as many as keep two blocks of ``num_warps``
    warps on an SM (65536 registers; 255 at most).

    Without a budget ptxas trades small spills for occupancy: a kernel that
    needs 84 registers is held to 80 (six 4-warp blocks per SM) with an
    8-byte spill in its main loop. With one, a kernel under the budget is
    never spilled, and ``tests/test_triton_compile.py`` keeps every kernel
    the engine launches under it.
    """
    return min(255, 65536 // (2 * 32 * num_warps))


def padded(n: int, multiple: int = 16) -> int:
    """``n`` rounded up to a multiple of ``multiple``: the row stride of a buffer a launcher owns,
    so that rows start 16-element aligned (vector loads and stores)."""
    return -(-n // multiple) * multiple


@dataclass
class Launch:
    """One kernel launch, bound but not yet run: what a launcher would launch, with what.

    Each op's launcher is split in two: ``plan_<op>`` checks the inputs,
    allocates the outputs, builds the tables and returns the launches;
    ``<op>`` runs them. The ahead-of-time compile check
    (``triton_kernels/aot.py``, ``tests/test_triton_compile.py``) compiles
    ``kernel`` from exactly these ``args`` / ``constexprs`` / options, so what
    it checks is what would run.
    """

    kernel: Any                      # the @triton.jit function (looked up at plan time: tests wrap it)
    grid: tuple[int, ...]
    args: tuple                      # the runtime arguments, positionally, in the kernel's order
    constexprs: dict[str, Any]       # the tl.constexpr arguments, by name
    num_warps: int = 4
    num_stages: int = 3
    maxnreg: int | None = None       # ptxas register budget per thread (register_budget); None: ptxas's choice
    keep: tuple = field(default=(), repr=False)  # tensors a table points at: alive until the launch

    def __post_init__(self):
        if self.maxnreg is None:
            self.maxnreg = register_budget(self.num_warps)

    @property
    def options(self) -> dict[str, int]:
        """The compile options of the launch (``triton.compile``'s and the JIT's keyword arguments)."""
        return {"num_warps": self.num_warps, "num_stages": self.num_stages, "maxnreg": self.maxnreg}

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, **self.options)


def run_launches(launches) -> None:
    for launch in launches:
        launch()


@triton.jit
def _tanh(a):
    x = tl.abs(a)
    t = tl.exp(-2.0 * x)
    far = (1.0 - t) / (1.0 + t)
    x2 = x * x
    near = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    mag = tl.where(x < 0.25, near, far)
    return tl.where(a < 0.0, -mag, mag)


@triton.jit
def apply_activation(a, ACT: tl.constexpr):
    """g(a) for an fp32 tile. tanh without libdevice (GPU-only; the interpreter must run it too):
    sign(a) (1 - e^{-2|a|}) / (1 + e^{-2|a|}), and below |a| = 1/4 its odd Taylor series to a^9 (the
    next term is under 1e-8 relative there, 0.15 ulp), because 1 - e^{-2|a|} cancels near 0: 2 sigmoid(2a)
    - 1, used before, gave tanh(1e-6) = 1.07e-6 (found by the property tests). The cut was 1/8; the exp form
    was 4.5 ulps off just above it (|a| = 0.132: 1 - e^{-0.26} cancels), and with the cut at 1/4 the
    worst over 200,001 points of [-3, 3] is 4.1 ulps, at |a| = 0.255 (interpreter, against float64)."""
    if ACT == 1:
        out = tl.maximum(a, 0.0)
    elif ACT == 2:
        out = _tanh(a)
    elif ACT == 3:
        out = tl.sigmoid(a)
    elif ACT == 4:
        out = 0.5 * a * (1.0 + tl.erf(a * 0.7071067811865476))
    else:
        out = a
    return out


@triton.jit
def derivative_of_pre(a, ACT: tl.constexpr):
    """g'(a) for an fp32 tile of pre-activations (used where a is at hand: jvp_linear)."""
    if ACT == 1:
        d = tl.where(a > 0.0, 1.0, 0.0)
    elif ACT == 2:
        t = _tanh(a)
        d = 1.0 - t * t
    elif ACT == 3:
        s = tl.sigmoid(a)
        d = s * (1.0 - s)
    elif ACT == 4:
        d = 0.5 * (1.0 + tl.erf(a * 0.7071067811865476)) + a * tl.exp(-0.5 * a * a) * 0.3989422804014327
    else:
        d = a * 0.0 + 1.0
    return d


@triton.jit
def load_grouped_tile(tile_table, pid):
    """(group, tile row, tile column) of program ``pid`` from a ``[tiles, 3]`` int64 tile table
    (``_tables.grouped_tiles``): how a grouped launch finds its layer / site and its output tile."""
    group = tl.load(tile_table + 3 * pid)
    tile_m = tl.load(tile_table + 3 * pid + 1)
    tile_n = tl.load(tile_table + 3 * pid + 2)
    return group, tile_m, tile_n
