"""``dfa_project``: every site's delta from the output error in ONE launch.

Math (Nøkland 2016, DESIGN.md section 1): with the output error ``e``
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
from ._common import ACTIVATION_CODES, STATE_OF, Launch, dot_precision, run_launches, tl_dtype
from ._tables import TableCache


@triton.jit
def _dfa_project_kernel(
    error_ptr,       # [N, K] output error e (K = n_out), row stride stride_en, unit column stride
    feedback_ptr,    # [R, K] all sites' feedback stacked row-wise, row stride stride_fr
    out_ptr,         # [N, R] deltas, row stride stride_on
    site_table,      # [S, 5] int64: offset, rows, activation code, state address, state row stride
    tile_table,      # [C, 2] int64: site index, first column within the site, per column tile
    N, K, stride_en, stride_fr, stride_on,
    STATE_DTYPE: tl.constexpr,    # element type of the h / a states (the mask is uint8)
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32", from torch's allow_tf32
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    site = tl.load(tile_table + 2 * pid_c)
    col0 = tl.load(tile_table + 2 * pid_c + 1)
    offset = tl.load(site_table + 5 * site)
    rows = tl.load(site_table + 5 * site + 1)
    act = tl.load(site_table + 5 * site + 2)
    state_addr = tl.load(site_table + 5 * site + 3)
    state_stride = tl.load(site_table + 5 * site + 4)

    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64: N * R may pass 2^31
    rn = col0 + tl.arange(0, BLOCK_N)                              # columns within the site
    m_mask = rm < N
    n_mask = rn < rows
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        e = tl.load(error_ptr + rm[:, None] * stride_en + rk[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        f_t = tl.load(feedback_ptr + (offset + rn)[None, :] * stride_fr + rk[:, None],
                      mask=n_mask[None, :] & k_mask[:, None], other=0.0)   # [BLOCK_K, BLOCK_N] = F_s^T tile
        acc += tl.dot(e, f_t, input_precision=DOT_PRECISION)

    mask = m_mask[:, None] & n_mask[None, :]
    if act != 0:  # the g' epilogue, from the producer's saved state
        s_off = rm[:, None] * state_stride + rn[None, :]
        if act == 1:
            s = tl.load(state_addr.to(tl.pointer_type(tl.uint8)) + s_off, mask=mask, other=0).to(tl.float32)
            acc = acc * s
        else:
            s = tl.load(state_addr.to(tl.pointer_type(STATE_DTYPE)) + s_off, mask=mask, other=0.0).to(tl.float32)
            if act == 2:    # tanh: s = h
                acc = acc * (1.0 - s * s)
            elif act == 3:  # sigmoid: s = h
                acc = acc * (s * (1.0 - s))
            else:           # gelu: s = a
                acc = acc * (0.5 * (1.0 + tl.erf(s * 0.7071067811865476))
                             + s * tl.exp(-0.5 * s * s) * 0.3989422804014327)
    tl.store(out_ptr + rm[:, None] * stride_on + (offset + rn)[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask)


def _blocks(n: int, k: int, rows_max: int, gpu: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps).

    K = n_out is small in DFA (10 to 1000), so one or a few K steps; on a GPU
    64x64 tiles keep enough programs for 132 SMs at batch 256 and width 1024
    (4 x 16 per site). The interpreter's cost grows with programs x K steps
    (DESIGN.md section 5), so on CPU the tiles are as large as the problem.
    """
    bk = max(16, min(64, triton.next_power_of_2(k)))
    if gpu:
        return 64, 64, bk, 4
    bm = max(16, min(128, triton.next_power_of_2(n)))
    bn = max(16, min(128, triton.next_power_of_2(rows_max)))
    return bm, bn, max(16, min(128, triton.next_power_of_2(k))), 4


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
        out = torch.empty(n, r, dtype=dtype, device=error.device)
    if n == 0 or not sites:
        return out, []
    gpu = error.device.type == "cuda" if gpu is None else gpu
    bm, bn, bk, warps = _blocks(n, k, max(s.rows for s in sites), gpu)
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
    launch = Launch(
        _dfa_project_kernel, grid,
        (error, feedback_all, out, site_table, tile_table, n, k, error.stride(0), feedback_all.stride(0),
         out.stride(0)),
        dict(STATE_DTYPE=tl_dtype(dtype), DOT_PRECISION=dot_precision(), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk),
        num_warps=warps, keep=tuple(states))
    return out, [launch]
