"""``dfa_wgrad``: the weight and bias gradients of all layers as ONE grouped GEMM launch.

Math: for each layer l with delta ``delta_l`` (``[N, M_l]``) and input
``h_{l-1}`` (``[N, K_l]``),

    dW_l = delta_l^T h_{l-1}      [M_l, K_l]
    db_l = sum_n delta_l[n, :]    [M_l]

Equivalent PyTorch code: ``dfa_wgrad_reference`` below.

In DFA these are independent once the deltas exist (no layer waits for the
one above), so they need not be L launches: every layer's output tiles go in
one grid. A tile table (group, tile row, tile column; built from the shapes
only) maps each program to its layer, and a group table (addresses, strides,
sizes) says where that layer's tensors are. Both are cached between steps
(``_tables``). Edges are masked, so layers need not be block multiples. The
bias sum rides along in the programs of tile column 0, which already read the
delta tile. This is the alternative to per-layer cuBLAS launches on separate
CUDA streams; which wins is a GPU measurement (bench/test_triton_kernels.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ..ops.dfa_wgrad import dfa_wgrad_reference  # noqa: F401  (the PyTorch definition)
from ._common import Launch, divisibility, dot_precision, index_dtype, load_grouped_tile, run_launches, tl_dtype
from ._tables import TableCache, grouped_tiles

_GROUP_FIELDS = 8  # delta addr, delta row stride, x addr, x row stride, dW addr, db addr (0: none), M, K
_GROUP_FIELDS_C = tl.constexpr(_GROUP_FIELDS)  # the same, as a compile-time constant for the kernel


@triton.jit
def _dfa_wgrad_kernel(
    group_table,   # [G, 8] int64: delta, its row stride, x, its row stride, dW, db (0: no bias), M_l, K_l
    tile_table,    # [tiles, 3] int64: group, tile row (over M_l), tile column (over K_l)
    N,             # batch rows, shared by all groups (the reduction dimension)
    DTYPE: tl.constexpr,          # element type of every delta, x, dW and db
    ELEM_BYTES: tl.constexpr,     # its size
    DOT_PRECISION: tl.constexpr,
    # What the launcher found to divide, in every group (elements; _common.divisibility): the delta
    # addresses, row strides and M_l; the input addresses and row strides; the dW / db addresses and K_l.
    ALIGN_D: tl.constexpr, ALIGN_X: tl.constexpr, ALIGN_W: tl.constexpr,
    INDEX: tl.constexpr,          # tl.int32 when every offset fits (host-checked), else tl.int64
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    g, tile_m, tile_n = load_grouped_tile(tile_table, tl.program_id(0))
    base = group_table + _GROUP_FIELDS_C * g
    # delta [N, M_l] and x [N, K_l] with unit column strides, dW [M_l, K_l] contiguous
    delta = tl.multiple_of(tl.load(base).to(tl.pointer_type(DTYPE)), ALIGN_D * ELEM_BYTES)
    stride_d = tl.multiple_of(tl.load(base + 1).to(INDEX), ALIGN_D)
    x = tl.multiple_of(tl.load(base + 2).to(tl.pointer_type(DTYPE)), ALIGN_X * ELEM_BYTES)
    stride_x = tl.multiple_of(tl.load(base + 3).to(INDEX), ALIGN_X)
    dw = tl.multiple_of(tl.load(base + 4).to(tl.pointer_type(DTYPE)), ALIGN_W * ELEM_BYTES)
    db_addr = tl.load(base + 5)
    M = tl.multiple_of(tl.load(base + 6).to(INDEX), ALIGN_D)
    K = tl.multiple_of(tl.load(base + 7).to(INDEX), ALIGN_W)

    rm = (tile_m * BLOCK_M).to(INDEX) + tl.arange(0, BLOCK_M)
    rn = (tile_n * BLOCK_N).to(INDEX) + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < K
    with_bias = (db_addr != 0) & (tile_n == 0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for r0 in range(0, N, BLOCK_R):
        rr = (r0 + tl.arange(0, BLOCK_R)).to(INDEX)
        r_mask = rr < N
        d_t = tl.load(delta + rr[None, :] * stride_d + rm[:, None],
                      mask=m_mask[:, None] & r_mask[None, :], other=0.0)      # [BLOCK_M, BLOCK_R] = delta^T tile
        xs = tl.load(x + rr[:, None] * stride_x + rn[None, :], mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        acc += tl.dot(d_t, xs, input_precision=DOT_PRECISION)
        if with_bias:
            bias_acc += tl.sum(d_t.to(tl.float32), axis=1)
    tl.store(dw + rm[:, None] * K + rn[None, :], acc.to(DTYPE), mask=m_mask[:, None] & n_mask[None, :])
    if with_bias:
        db = tl.multiple_of(db_addr.to(tl.pointer_type(DTYPE)), ALIGN_W * ELEM_BYTES)
        tl.store(db + rm, bias_acc.to(DTYPE), mask=m_mask)


def _blocks(n: int, m_max: int, k_max: int, dtype: torch.dtype, gpu: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_R, num_warps, num_stages). GPU: 64x64 output tiles (1024x1024 layers
    give 256 tiles a layer, ~2 waves on 132 SMs for 4 layers), 32 batch rows a step at 16 bits, 16
    at fp32 with 8 warps (an "ieee" fp32 dot keeps its operands in registers; spill-free on sm_80 and
    sm_90, ``tests/test_triton_compile.py``); interpreter: as large as the problem (cost ~ programs x
    loop steps)."""
    if gpu:
        if dtype == torch.float32:
            return 64, 64, 16, 8, 3
        return 64, 64, 32, 4, 3
    cap = lambda v, hi: max(16, min(hi, triton.next_power_of_2(v)))  # noqa: E731
    return cap(m_max, 128), cap(k_max, 128), cap(n, 128), 4, 1


_TABLES = TableCache()


def dfa_wgrad(
    deltas: Sequence[torch.Tensor],   # each [N, M_l], unit column stride (column slices of dfa_project's out)
    inputs: Sequence[torch.Tensor],   # each [N, K_l], the layer's input h_{l-1}
    bias: Sequence[bool],             # whether layer l has a bias
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """``[(dW_l, db_l or None)]`` for all layers, in one launch (see the module docstring)."""
    outs, launches = plan_dfa_wgrad(deltas, inputs, bias)
    run_launches(launches)
    return outs


def plan_dfa_wgrad(
    deltas: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    bias: Sequence[bool],
    gpu: bool | None = None,          # GPU tile sizes (default: whether the tensors are on a GPU)
) -> tuple[list[tuple[torch.Tensor, torch.Tensor | None]], list[Launch]]:
    """``dfa_wgrad``'s checks, outputs and tables, and the launch it makes (not run)."""
    if not (len(deltas) == len(inputs) == len(bias)):
        raise ValueError("dfa_wgrad needs one delta, one input and one bias flag per layer")
    if not deltas:
        return [], []
    n = deltas[0].shape[0]
    dtype, device = deltas[0].dtype, deltas[0].device
    outs, rows, prepared = [], [], []
    for i, (d, x, has_bias) in enumerate(zip(deltas, inputs, bias)):
        if d.dim() != 2 or x.dim() != 2 or d.shape[0] != n or x.shape[0] != n:
            raise ValueError(f"layer {i}: delta {tuple(d.shape)} and input {tuple(x.shape)} must be [N, *] "
                             f"with the same N = {n}")
        if d.dtype != dtype or x.dtype != dtype:
            raise TypeError(f"layer {i}: every delta and input must have dtype {dtype}, got {d.dtype} / {x.dtype}")
        d = d if d.stride(1) == 1 else d.contiguous()
        x = x if x.stride(1) == 1 else x.contiguous()
        prepared.append((d, x))  # keep the tensors alive until the launch
        dw = torch.empty(d.shape[1], x.shape[1], dtype=dtype, device=device)
        db = torch.empty(d.shape[1], dtype=dtype, device=device) if has_bias else None
        outs.append((dw, db))
        rows.append((d.data_ptr(), d.stride(0), x.data_ptr(), x.stride(0), dw.data_ptr(),
                     db.data_ptr() if db is not None else 0, d.shape[1], x.shape[1]))
    if n == 0:
        for dw, db in outs:
            dw.zero_()
            if db is not None:
                db.zero_()
        return outs, []
    gpu = device.type == "cuda" if gpu is None else gpu
    bm, bn, br, warps, stages = _blocks(n, max(r[6] for r in rows), max(r[7] for r in rows), dtype, gpu)
    shapes = tuple((r[6], r[7]) for r in rows)
    tiles = _TABLES.get(("tiles", bm, bn) + shapes, lambda: grouped_tiles(shapes, bm, bn), torch.int64, device)
    groups = _TABLES.get(("groups",) + tuple(rows), lambda: rows, torch.int64, device)
    size = dtype.itemsize
    # Alignment the kernel may claim of the table's addresses and strides (in elements), per role.
    align_d = divisibility(*(r[0] // size for r in rows), *(r[1] for r in rows), *(r[6] for r in rows))
    align_x = divisibility(*(r[2] // size for r in rows), *(r[3] for r in rows))
    align_w = divisibility(*(r[4] // size for r in rows), *(r[5] // size for r in rows), *(r[7] for r in rows))
    # Largest element offsets (rows rounded up to whole tiles) against 2^31.
    n_up, m_up, k_up = -(-n // br) * br, max(r[6] for r in rows) + bm, max(r[7] for r in rows) + bn
    index = index_dtype(*(n_up * r[1] + m_up for r in rows), *(n_up * r[3] + k_up for r in rows), m_up * k_up + k_up)
    launch = Launch(_dfa_wgrad_kernel, (tiles.shape[0],), (groups, tiles, n),
                    dict(DTYPE=tl_dtype(dtype), ELEM_BYTES=size, DOT_PRECISION=dot_precision(), ALIGN_D=align_d,
                         ALIGN_X=align_x, ALIGN_W=align_w, INDEX=index, BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br),
                    num_warps=warps, num_stages=stages, keep=tuple(prepared))
    return outs, [launch]
