"""``align_step``: GrAPE's feedback refinement for all sites, J_hat never written to memory.

Math (GrAPE, docs/math.md): site s has feedback ``B`` (``[n_l, n_out]``,
rows ``[offset, offset + n_l)`` of the stacked feedback), the perturbations
``P`` (``[batch, n_l]``) injected at the site and the output tangents ``T``
(``[batch, n_out]``) of the JVP pass. Per column j (one output unit):

    J    = P^T T / batch                    the batch rank-1 estimate of J_l^T, [n_l, n_out]
    c_j  = <B_j, J_j> / (|B_j| |J_j|)       column-wise cosine
    L    = 1 - mean_j c_j
    u_j  = B_j / |B_j|                      the column's direction (the step is taken on it)
    dL/du_j = -(1 / n_out) (J_j / |J_j| - c_j u_j)
    u_j <- u_j - lr dL/du_j,  then  B_j <- |B_j| u_j / |u_j|   (the direction turns; the norm is kept)

Equivalent PyTorch code: ``align_step_reference`` (``fastdfa/ops/align_step.py``, importable
without triton: the torch backend runs it).

The step is ``B_j' = alpha_j B_j + beta_j J_j`` with ``alpha_j = (1 - lr c_j /
n_out) / |B_j|`` and ``beta_j = lr / (n_out |J_j|)``, so its norm is
``alpha^2 |B|^2 + 2 alpha beta <B, J> + beta^2 |J|^2``: three column sums of
the OLD B and J give everything. Two launches for all sites:

  1. every tile computes its J tile (a GEMM over the batch) and adds its
     column partial sums <B,J>, |J|^2, |B|^2 to a ``[S, n_out, 3]`` fp32
     buffer (atomics);
  2. every tile recomputes its J tile and writes ``(alpha B + beta J) |B_j| / norm`` (the step turns
     the column; its norm, and so the feedback's scale, is kept)
     over B in place.

Deterministic path (``deterministic=True``, the default under
``torch.use_deterministic_algorithms(True)``): fp32 atomics add in whatever
order the tiles finish, so the column sums -- and GrAPE's feedback -- can
differ in the last bits from run to run on a GPU. Instead, pass 1 stores each
tile's partial sums in its own slot of a ``[S, tiles_m, n_out, 3]`` buffer (no
atomics), and every pass-2 tile adds its column's partials in tile order
(tile 0, 1, ...): the same sums, in the same order, on every run and whatever
order the programs run in. The column sums are then ``tiles_m`` x 3 loads per
column per tile instead of 3 (``tiles_m`` = n_l / BLOCK_M, 64 for n_l = 4096
at fp16), small against the tile's GEMM over the batch.

J (``n_l x n_out`` per site) exists only as tiles in registers; the extra
cost is the second GEMM over the batch, against writing and reading J.
A column whose J_j is zero (a dead output) is left as it is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ..ops.align_step import AlignSite, align_step_reference  # noqa: F401  (the PyTorch definition, kept with the engine)
from ._common import Launch, divisibility, dot_precision, index_dtype, load_grouped_tile, run_launches, tl_dtype
from ._tables import TableCache, grouped_tiles

_SITE_FIELDS = tl.constexpr(6)  # offset, rows, P address, P row stride, T address, T row stride


@triton.jit
def _j_tile(p, stride_p, t, stride_t, rm, rn, m_mask, n_mask, batch, inv_batch,
            DOT_PRECISION: tl.constexpr, INDEX: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """J[rm, rn] = P[:, rm]^T T[:, rn] / batch, an fp32 register tile."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, batch, BLOCK_R):
        rr = (r0 + tl.arange(0, BLOCK_R)).to(INDEX)
        r_mask = rr < batch
        p_t = tl.load(p + rr[None, :] * stride_p + rm[:, None], mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        tt = tl.load(t + rr[:, None] * stride_t + rn[None, :], mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        acc += tl.dot(p_t, tt, input_precision=DOT_PRECISION)
    return acc * inv_batch


@triton.jit
def _align_step_kernel(
    feedback_ptr,   # [R, K] all sites' feedback B (K = n_out), row stride stride_f; updated in place by pass 2
    stats_ptr,      # [S, K, 3] fp32 column sums <B,J>, |J|^2, |B|^2 (zeroed before pass 1)
    partials_ptr,   # [S, tiles_m, K, 3] fp32 per-tile column sums (DETERMINISTIC only; else unused)
    site_table,     # [S, 6] int64: offset, rows, P address, P row stride, T address, T row stride
    tile_table,     # [tiles, 3] int64: site, tile row (over n_l), tile column (over K)
    batch, k_units, stride_f, inv_batch, step,   # K = k_units * ALIGN_K; step = lr / n_out
    tiles_m,                         # the partials' second dimension: max over sites of cdiv(n_l, BLOCK_M)
    PASS: tl.constexpr,              # 1: column sums; 2: update and normalise
    DETERMINISTIC: tl.constexpr,     # column sums through per-tile partials in a fixed order, no atomics
    DTYPE: tl.constexpr, ELEM_BYTES: tl.constexpr, DOT_PRECISION: tl.constexpr,
    # What the launcher found to divide (elements; _common.divisibility): every site's rows, P address
    # and P row stride (ALIGN_P); K, the feedback's row stride and address, every T address and row
    # stride (ALIGN_K; K arrives as a multiple of it, so the masks rn < K are known constant too).
    ALIGN_P: tl.constexpr, ALIGN_K: tl.constexpr,
    INDEX: tl.constexpr,             # tl.int32 when every offset fits (host-checked), else tl.int64
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    K = k_units * ALIGN_K
    s, tile_m, tile_n = load_grouped_tile(tile_table, tl.program_id(0))
    base = site_table + _SITE_FIELDS * s
    offset = tl.load(base).to(INDEX)
    rows = tl.multiple_of(tl.load(base + 1).to(INDEX), ALIGN_P)
    p = tl.multiple_of(tl.load(base + 2).to(tl.pointer_type(DTYPE)), ALIGN_P * ELEM_BYTES)
    stride_p = tl.multiple_of(tl.load(base + 3).to(INDEX), ALIGN_P)
    t = tl.multiple_of(tl.load(base + 4).to(tl.pointer_type(DTYPE)), ALIGN_K * ELEM_BYTES)
    stride_t = tl.multiple_of(tl.load(base + 5).to(INDEX), ALIGN_K)

    rm = (tile_m * BLOCK_M).to(INDEX) + tl.arange(0, BLOCK_M)
    rn = (tile_n * BLOCK_N).to(INDEX) + tl.arange(0, BLOCK_N)
    m_mask = rm < rows
    n_mask = rn < K
    mask = m_mask[:, None] & n_mask[None, :]
    j = _j_tile(p, stride_p, t, stride_t, rm, rn, m_mask, n_mask, batch, inv_batch,
                DOT_PRECISION, INDEX, BLOCK_M, BLOCK_N, BLOCK_R)
    b_row = (offset + rm) * stride_f
    if ALIGN_K > 1:
        b_row = tl.multiple_of(b_row, ALIGN_K)
    b_off = b_row[:, None] + rn[None, :]
    b = tl.load(feedback_ptr + b_off, mask=mask, other=0.0).to(tl.float32)
    st = stats_ptr + (s * K + rn) * 3
    if PASS == 1:
        if DETERMINISTIC:
            part = partials_ptr + ((s * tiles_m + tile_m) * K + rn) * 3
            tl.store(part, tl.sum(b * j, axis=0), mask=n_mask)
            tl.store(part + 1, tl.sum(j * j, axis=0), mask=n_mask)
            tl.store(part + 2, tl.sum(b * b, axis=0), mask=n_mask)
        else:
            tl.atomic_add(st, tl.sum(b * j, axis=0), mask=n_mask)
            tl.atomic_add(st + 1, tl.sum(j * j, axis=0), mask=n_mask)
            tl.atomic_add(st + 2, tl.sum(b * b, axis=0), mask=n_mask)
    else:
        if DETERMINISTIC:
            # this column's partials, tile 0 first: every tile of the column gets the same sums
            bj = tl.zeros((BLOCK_N,), dtype=tl.float32)
            jj = tl.zeros((BLOCK_N,), dtype=tl.float32)
            bb = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for mt in range(0, tl.cdiv(rows, BLOCK_M)):
                part = partials_ptr + ((s * tiles_m + mt) * K + rn) * 3
                bj += tl.load(part, mask=n_mask, other=0.0)
                jj += tl.load(part + 1, mask=n_mask, other=0.0)
                bb += tl.load(part + 2, mask=n_mask, other=0.0)
            bb = tl.where(n_mask, bb, 1.0)
            if tile_m == 0:  # one tile per column hands the sums back (the step's cosines)
                tl.store(st, bj, mask=n_mask)
                tl.store(st + 1, jj, mask=n_mask)
                tl.store(st + 2, bb, mask=n_mask)
        else:
            bj = tl.load(st, mask=n_mask, other=0.0)
            jj = tl.load(st + 1, mask=n_mask, other=0.0)
            bb = tl.load(st + 2, mask=n_mask, other=1.0)
        nb = tl.sqrt(bb)
        nj = tl.sqrt(jj)
        live = (nj > 0.0) & (nb > 0.0)
        denom = tl.where(live, nb * nj, 1.0)
        cos = tl.where(live, bj / denom, 0.0)
        # the step on the unit direction B/|B| (scale-free), as alpha B + beta J; then back to |B_j|
        alpha = tl.where(live, (1.0 - step * cos) / tl.where(live, nb, 1.0), 1.0)
        beta = tl.where(live, step / tl.where(live, nj, 1.0), 0.0)
        norm2 = alpha * alpha * bb + 2.0 * alpha * beta * bj + beta * beta * jj
        scale = tl.where(norm2 > 0.0, nb / tl.sqrt(norm2), 1.0)  # the column keeps its norm |B_j|
        new_b = (alpha * scale)[None, :] * b + (beta * scale)[None, :] * j
        tl.store(feedback_ptr + b_off, new_b.to(DTYPE), mask=mask)


def _blocks(batch: int, rows_max: int, k: int, dtype: torch.dtype, gpu: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_R, num_warps, num_stages). GPU: 64x64 tiles of B, 32 batch rows a
    step at 16 bits; fp32 32x64 tiles, 16 batch rows a step, 8 warps (an "ieee" fp32 dot keeps its
    operands in registers, and pass 2's epilogue is long: spill-free on sm_80 and sm_90 with room
    to spare, ``tests/test_triton_compile.py``); interpreter: as large as the problem."""
    if gpu:
        if dtype == torch.float32:
            return 32, 64, 16, 8, 3
        return 64, 64, 32, 4, 3
    cap = lambda v, hi: max(16, min(hi, triton.next_power_of_2(v)))  # noqa: E731
    return cap(rows_max, 128), cap(k, 128), cap(batch, 128), 4, 1


_TABLES = TableCache()


def align_step(feedback_all: torch.Tensor, sites: Sequence[AlignSite], lr: float,
               deterministic: bool | None = None) -> torch.Tensor:
    """One GrAPE step on every site's feedback, in place; returns each site's mean column cosine
    between B and J_hat^T BEFORE the step (``[S]`` fp32), the alignment the step improved on.
    ``deterministic``: column sums without atomics, bitwise the same on every run (default:
    ``torch.are_deterministic_algorithms_enabled()``)."""
    stats, launches = plan_align_step(feedback_all, sites, lr, deterministic=deterministic)
    run_launches(launches)
    bj, jj, bb = stats.unbind(-1)
    live = (jj > 0) & (bb > 0)
    cos = torch.where(live, bj / (bb.sqrt() * jj.sqrt()).clamp_min(1e-30), torch.zeros_like(bj))
    return cos.mean(dim=1)


def plan_align_step(feedback_all: torch.Tensor, sites: Sequence[AlignSite], lr: float,
                    gpu: bool | None = None, deterministic: bool | None = None) -> tuple[torch.Tensor, list[Launch]]:
    """``align_step``'s checks, zeroed ``[S, n_out, 3]`` column sums and tables, and its two launches
    (not run). ``gpu``: GPU tile sizes (default: whether the tensors are on a GPU); ``deterministic``:
    as in ``align_step``."""
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    r, k = feedback_all.shape
    if not sites:
        return torch.zeros(0, k, 3, dtype=torch.float32, device=feedback_all.device), []
    dtype, device = feedback_all.dtype, feedback_all.device
    if feedback_all.stride(1) != 1:
        raise ValueError("align_step updates the feedback in place: it needs a unit column stride")
    batch = sites[0].perturbation.shape[0]
    rows, keep = [], []
    for i, s in enumerate(sites):
        p, t = s.perturbation, s.tangent
        if p.shape != (batch, s.rows) or t.shape != (batch, k):
            raise ValueError(f"site {i}: perturbation {tuple(p.shape)} and tangent {tuple(t.shape)} must be "
                             f"[{batch}, {s.rows}] and [{batch}, {k}]")
        if s.offset < 0 or s.offset + s.rows > r:
            raise ValueError(f"site {i}: rows [{s.offset}, {s.offset + s.rows}) outside the feedback's {r} rows")
        p = p.to(dtype) if p.stride(1) == 1 else p.to(dtype).contiguous()
        t = t.to(dtype) if t.stride(1) == 1 else t.to(dtype).contiguous()
        keep.append((p, t))
        rows.append((s.offset, s.rows, p.data_ptr(), p.stride(0), t.data_ptr(), t.stride(0)))
    stats = torch.zeros(len(sites), k, 3, dtype=torch.float32, device=device)
    if batch == 0:
        return stats, []
    gpu = device.type == "cuda" if gpu is None else gpu
    bm, bn, br, warps, stages = _blocks(batch, max(s.rows for s in sites), k, dtype, gpu)
    shapes = tuple((s.rows, k) for s in sites)
    tiles = _TABLES.get(("tiles", bm, bn) + shapes, lambda: grouped_tiles(shapes, bm, bn), torch.int64, device)
    table = _TABLES.get(("sites",) + tuple(rows), lambda: rows, torch.int64, device)
    size = dtype.itemsize
    align_p = divisibility(*(row[1] for row in rows), *(row[2] // size for row in rows), *(row[3] for row in rows))
    align_k = divisibility(k, feedback_all.stride(0), feedback_all.data_ptr() // size,
                           *(row[4] // size for row in rows), *(row[5] for row in rows))
    # Largest element offsets (batch rows, site rows and columns rounded up to whole tiles) against 2^31.
    b_up = -(-batch // br) * br
    tiles_m = -(-max(s.rows for s in sites) // bm) if deterministic else 1
    partials = (torch.empty(len(sites), tiles_m, k, 3, dtype=torch.float32, device=device) if deterministic
                else stats)  # every slot a pass-1 tile reads back is written first: no zeroing needed
    index = index_dtype(*(b_up * row[3] + row[1] + bm for row in rows), *(b_up * row[5] + k + bn for row in rows),
                        (r + bm) * feedback_all.stride(0) + k + bn, len(sites) * tiles_m * (k + bn) * 3)
    launches = [Launch(_align_step_kernel, (tiles.shape[0],),
                       (feedback_all, stats, partials, table, tiles, batch, k // align_k, feedback_all.stride(0),
                        1.0 / batch, lr / k, tiles_m),
                       dict(PASS=pass_, DETERMINISTIC=bool(deterministic), DTYPE=tl_dtype(dtype), ELEM_BYTES=size,
                            DOT_PRECISION=dot_precision(),
                            ALIGN_P=align_p, ALIGN_K=align_k, INDEX=index, BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br),
                       num_warps=warps, num_stages=stages, keep=tuple(keep))
                for pass_ in (1, 2)]
    return stats, launches
