"""``dfa_project``: every site's delta from the output error in ONE launch.

Math (Nøkland 2016, docs/math.md): with the output error ``e``
(``[N, n_out]``) and the feedback of all sites stacked row-wise into ``F_all``
(``[R, n_out]``; site ``s`` owns rows ``[offset_s, offset_s + rows_s)``),

    out[:, offset_s : offset_s + rows_s] = (e @ F_s^T) * g_s'(a_s)

where ``g_s'`` comes from the activation state saved by the layer that
produced the site's input (``_common`` lists the states), or is 1 for a site
whose producer is not fused (autograd then applies the rest of its local
backward). Equivalent PyTorch code: ``dfa_project_reference`` below.

One launch: the grid is (row tiles of N) x (column tiles of all sites); a
column tile never straddles two sites, so each program reads one site's
metadata (offset, rows, activation, state address) from the site table. The
GEMM accumulates in fp32; the epilogue multiplies by g' and stores in the
output dtype (fp32 / fp16 / bf16), each site's delta landing directly in its
column block of ``out`` (``out[:, block]`` is that layer's ``delta``, a view).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ..ops.dfa_project import ProjectSite, dfa_project_reference  # noqa: F401  (the site description and the PyTorch definition)
from ._common import (
    ACTIVATION_CODES,
    STATE_OF,
    Launch,
    divisibility,
    dot_precision,
    index_dtype,
    padded,
    run_launches,
    tl_dtype,
)
from ._tables import TableCache


@triton.jit
def _dfa_project_kernel(
    error_ptr,       # [N, K] output error e (K = n_out), row stride stride_en, unit column stride
    feedback_ptr,    # [R, K] all sites' feedback stacked row-wise, row stride stride_fr
    out_ptr,         # [N, R] deltas, row stride stride_on
    site_table,      # [S, 5] int64: offset, rows, activation code, state address, state row stride
    tile_table,      # [C, 2] int64: site index, first column within the site, per column tile
    N, k_units, stride_en, stride_fr, stride_on,   # K = k_units * ALIGN_K
    STATE_DTYPE: tl.constexpr,    # element type of the h / a states (the mask is uint8)
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32", from torch's allow_tf32
    # What the launcher found to divide (elements; _common.divisibility): every site's offset and rows,
    # state row stride and state address (ALIGN; STATE_ALIGN_BYTES: the same in bytes of an h / a
    # state); K and e's and F's row strides and addresses (ALIGN_K; K arrives as a multiple of it,
    # so the masks rk < K are known constant over ALIGN_K elements too).
    ALIGN: tl.constexpr, STATE_ALIGN_BYTES: tl.constexpr, ALIGN_K: tl.constexpr,
    INDEX: tl.constexpr,          # tl.int32 when every offset fits (host-checked), else tl.int64
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    K = k_units * ALIGN_K
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    site = tl.load(tile_table + 2 * pid_c)
    col0 = tl.multiple_of(tl.load(tile_table + 2 * pid_c + 1).to(INDEX), BLOCK_N)  # a multiple of BLOCK_N
    offset = tl.multiple_of(tl.load(site_table + 5 * site).to(INDEX), ALIGN)
    rows = tl.multiple_of(tl.load(site_table + 5 * site + 1).to(INDEX), ALIGN)
    act = tl.load(site_table + 5 * site + 2)
    state_addr = tl.load(site_table + 5 * site + 3)
    state_stride = tl.multiple_of(tl.load(site_table + 5 * site + 4).to(INDEX), ALIGN)

    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(INDEX)
    rn = col0 + tl.arange(0, BLOCK_N)                              # columns within the site
    m_mask = rm < N
    n_mask = rn < rows
    e_row = rm * stride_en
    f_row = (offset + rn) * stride_fr
    if ALIGN_K > 1:
        e_row = tl.multiple_of(e_row, ALIGN_K)
        f_row = tl.multiple_of(f_row, ALIGN_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        e = tl.load(error_ptr + e_row[:, None] + rk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        f_t = tl.load(feedback_ptr + f_row[None, :] + rk[:, None],
                      mask=n_mask[None, :] & k_mask[:, None], other=0.0)   # [BLOCK_K, BLOCK_N] = F_s^T tile
        acc += tl.dot(e, f_t, input_precision=DOT_PRECISION)

    mask = m_mask[:, None] & n_mask[None, :]
    if act != 0:  # the g' epilogue, from the producer's saved state
        s_off = rm[:, None] * state_stride + rn[None, :]
        if act == 1:
            mask_ptr = tl.multiple_of(state_addr.to(tl.pointer_type(tl.uint8)), ALIGN)
            s = tl.load(mask_ptr + s_off, mask=mask, other=0).to(tl.float32)
            acc = acc * s
        else:
            state_ptr = tl.multiple_of(state_addr.to(tl.pointer_type(STATE_DTYPE)), STATE_ALIGN_BYTES)
            s = tl.load(state_ptr + s_off, mask=mask, other=0.0).to(tl.float32)
            if act == 2:    # tanh: s = h
                acc = acc * (1.0 - s * s)
            elif act == 3:  # sigmoid: s = h
                acc = acc * (s * (1.0 - s))
            else:           # gelu: s = a
                acc = acc * (0.5 * (1.0 + tl.erf(s * 0.7071067811865476))
                             + s * tl.exp(-0.5 * s * s) * 0.3989422804014327)
    tl.store(out_ptr + rm[:, None] * stride_on + (offset + rn)[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask)


def _blocks(n: int, k: int, rows_max: int, dtype: torch.dtype, gpu: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages).

    K = n_out is small in DFA (10 to 1000), so one or a few K steps; on a GPU
    64x64 tiles keep enough programs for 132 SMs at batch 256 and width 1024
    (4 x 16 per site). BLOCK_K and the warps are per dtype: an fp32 tile is
    twice the bytes, and an "ieee" fp32 dot runs on FMAs with its operands in
    registers, so fp32 takes BLOCK_K 16 and 8 warps (spill-free on sm_80 and
    sm_90, ``tests/test_triton_compile.py``). The interpreter's cost grows
    with programs x K steps (docs/design.md section 5), so on CPU the tiles are as
    large as the problem.
    """
    if gpu:
        if dtype == torch.float32:
            return 64, 64, 16, 8, 3
        return 64, 64, max(16, min(32, triton.next_power_of_2(k))), 4, 3
    bm = max(16, min(128, triton.next_power_of_2(n)))
    bn = max(16, min(128, triton.next_power_of_2(rows_max)))
    return bm, bn, max(16, min(128, triton.next_power_of_2(k))), 4, 1


_TABLES = TableCache()


def dfa_project(
    error: torch.Tensor,          # [N, n_out]
    feedback_all: torch.Tensor,   # [R, n_out]
    sites: Sequence[ProjectSite],
    out: torch.Tensor | None = None,  # [N, R], written in place when given
) -> torch.Tensor:
    """All sites' deltas ``[N, R]`` (see the module docstring); site s is ``out[:, s.offset:s.offset+s.rows]``."""
    out, launches = plan_dfa_project(error, feedback_all, sites, out)
    run_launches(launches)
    return out


def plan_dfa_project(
    error: torch.Tensor,
    feedback_all: torch.Tensor,
    sites: Sequence[ProjectSite],
    out: torch.Tensor | None = None,
    gpu: bool | None = None,      # GPU tile sizes (default: whether the tensors are on a GPU)
) -> tuple[torch.Tensor, list[Launch]]:
    """``dfa_project``'s checks, output and tables, and the launch it makes (not run): ``(out, [launch])``."""
    n, k = error.shape
    r, k2 = feedback_all.shape
    if k2 != k:
        raise ValueError(f"error has {k} columns but the feedback has {k2}")
    dtype = feedback_all.dtype
    if error.dtype != dtype:
        error = error.to(dtype)
    if error.stride(1) != 1:
        error = error.contiguous()
    if feedback_all.stride(1) != 1:
        feedback_all = feedback_all.contiguous()
    if out is None:
        # Rows of a padded buffer: every row starts 16-element aligned, so the delta stores can be
        # vector stores (the caller sees [N, R] with row stride padded(R); the sites' column blocks
        # and the engine's views are the same).
        out = torch.empty(n, padded(r), dtype=dtype, device=error.device)[:, :r]
    if n == 0 or not sites:
        return out, []
    gpu = error.device.type == "cuda" if gpu is None else gpu
    bm, bn, bk, warps, stages = _blocks(n, k, max(s.rows for s in sites), dtype, gpu)
    site_rows, key, states = [], [bn], []
    for s in sites:
        code = ACTIVATION_CODES[s.activation]
        if code and s.state is None:
            raise ValueError(f"site at offset {s.offset} has activation {s.activation!r} but no saved state")
        state = s.state if code else None
        if state is not None:
            want = torch.uint8 if STATE_OF[s.activation] == "mask" else dtype
            if state.dtype != want or state.shape != (n, s.rows) or state.stride(1) != 1:
                raise ValueError(f"state of the site at offset {s.offset}: expected a [{n}, {s.rows}] {want} "
                                 f"tensor with unit column stride, got {tuple(state.shape)} {state.dtype}")
            states.append(state)
        row = (s.offset, s.rows, code, state.data_ptr() if state is not None else 0,
               state.stride(0) if state is not None else 0)
        site_rows.append(row)
        key.append(row)
    key = tuple(key)
    site_table = _TABLES.get(("sites",) + key, lambda: site_rows, torch.int64, error.device)
    tile_table = _TABLES.get(("tiles", bn) + tuple((s.rows,) for s in sites),
                             lambda: [(i, c) for i, s in enumerate(sites) for c in range(0, s.rows, bn)],
                             torch.int64, error.device)
    grid = (triton.cdiv(n, bm), tile_table.shape[0])
    # What the kernel may claim of the table's offsets, strides and addresses, and whether every
    # element offset it forms (rows rounded up to whole tiles) fits in 32 bits.
    align = divisibility(*(row[0] for row in site_rows), *(row[1] for row in site_rows),
                         *(row[4] for row in site_rows), *(st.data_ptr() // st.element_size() for st in states))
    align_k = divisibility(k, error.stride(0), feedback_all.stride(0), error.data_ptr() // dtype.itemsize,
                           feedback_all.data_ptr() // dtype.itemsize)
    n_up, k_up = grid[0] * bm, triton.cdiv(k, bk) * bk
    index = index_dtype(n_up * error.stride(0) + k_up, (r + bn) * feedback_all.stride(0) + k_up,
                        n_up * out.stride(0) + r + bn, *(n_up * row[4] + row[1] + bn for row in site_rows))
    launch = Launch(
        _dfa_project_kernel, grid,
        (error, feedback_all, out, site_table, tile_table, n, k // align_k, error.stride(0), feedback_all.stride(0),
         out.stride(0)),
        dict(STATE_DTYPE=tl_dtype(dtype), DOT_PRECISION=dot_precision(), ALIGN=align,
             STATE_ALIGN_BYTES=min(16, align * dtype.itemsize), ALIGN_K=align_k, INDEX=index,
             BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk),
        num_warps=warps, num_stages=stages, keep=tuple(states))
    return out, [launch]
