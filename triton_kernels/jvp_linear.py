"""``jvp_linear``: the dual-number forward of ``h = g(x W^T + b)`` through ONE GEMM.

Math: for the primal ``x`` (``[N, in]``) and T input tangents ``dx_t``
(``[T, N, in]``), with ``a = x W^T + b``:

    h      = g(a)                          [N, out]
    dh_t   = g'(a) * (dx_t W^T)            [T, N, out]   (the JVP of the layer along dx_t)
    state  = what the DFA backward needs to recompute g'(a) (``_common``)

Equivalent PyTorch code: ``jvp_linear_reference`` below, and
``torch.func.jvp(lambda x: g(F.linear(x, W, b)), (x,), (dx_t,))`` for each t.

The primal rows and the tangent rows go through the same K loop: each W tile
is loaded once and multiplied with the primal tile and with the stacked
tangent tile (``[T_pad * BLOCK_M, BLOCK_K]``, tangent t of sample m at row
``t * BLOCK_M + m``), so W is read once for all T + 1 products. The epilogue
adds the bias to the primal, applies g, writes the state and scales every
tangent row by g'(a) of its sample, broadcast over the tangent axis. With
T = 0 this is the fused training forward of a fastdfa.Linear (GEMM, bias,
activation and the 1-byte ReLU mask in one pass).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.jvp_linear import jvp_linear_reference  # noqa: F401  (the PyTorch definition)
from ._common import (
    ACTIVATION_CODES,
    STATE_OF,
    Launch,
    apply_activation,
    derivative_of_pre,
    divisibility,
    dot_precision,
    index_dtype,
    run_launches,
    tl_dtype,
)

# Tangents per launch: the tangent accumulator is T_pad * BLOCK_M x BLOCK_N fp32
# registers (8 x 16 x 64 x 4 B = 32 KiB at the GPU tiles below); more tangents
# are done in chunks of 8, each chunk re-reading W once.
MAX_TANGENTS_PER_LAUNCH = 8


@triton.jit
def _jvp_linear_kernel(
    x_ptr,         # [N, K] primal input, row stride stride_xn
    dx_ptr,        # [T, N, K] input tangents (this chunk), strides stride_dt, stride_dn
    w_ptr,         # [M, K] weight (M = out features), row stride stride_wm
    b_ptr,         # [M] bias (read only when HAS_BIAS)
    h_ptr,         # [N, M] output g(a), row stride stride_hn
    state_ptr,     # [N, M] uint8 mask (relu) or a (gelu); unused otherwise; row stride stride_hn
    dh_ptr,        # [T, N, M] output tangents, strides stride_dht, stride_dhn
    N, m_units, k_units, T,    # M = m_units * ALIGN_OUT, K = k_units * ALIGN_IN (out, in features)
    stride_xn, stride_dt, stride_dn, stride_wm, stride_hn, stride_dht, stride_dhn,
    ACT: tl.constexpr, STATE: tl.constexpr,          # activation code; 0 none, 1 mask, 2 pre-activation
    HAS_BIAS: tl.constexpr, STORE_PRIMAL: tl.constexpr,
    T_PAD: tl.constexpr,                             # power of two >= T; 0: no tangents
    DOT_PRECISION: tl.constexpr,
    # Powers of two dividing K and the input-side strides (x, dx, W), and M and the output-side ones
    # (h, state, dh). Triton itself only knows "divisible by 16" of an argument; 8 (a width of 1000)
    # still allows 16-byte vectors, if the masks rk < K and rn < M are known to be constant over 8
    # elements too: hence K and M arrive as multiples of their alignment. 1: no claim.
    ALIGN_IN: tl.constexpr, ALIGN_OUT: tl.constexpr,
    INDEX: tl.constexpr,                             # tl.int32 when every offset fits (host-checked)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    M = m_units * ALIGN_OUT
    K = k_units * ALIGN_IN
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(INDEX)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(INDEX)
    m_mask = rm < N
    n_mask = rn < M
    # Row starts (elements); the alignment claim is made on them (tl.multiple_of on a scalar argument
    # is lost: there is no op to carry it).
    x_row = rm * stride_xn
    w_row = rn * stride_wm
    h_row = rm * stride_hn
    if ALIGN_IN > 1:
        x_row = tl.multiple_of(x_row, ALIGN_IN)
        w_row = tl.multiple_of(w_row, ALIGN_IN)
    if ALIGN_OUT > 1:
        h_row = tl.multiple_of(h_row, ALIGN_OUT)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if T_PAD == 1:    # one tangent (GrAPE's dual pass): its rows are the primal's, no stacking
        dx_row = rm * stride_dn
        dh_row = rm * stride_dhn
        if ALIGN_IN > 1:
            dx_row = tl.multiple_of(dx_row, ALIGN_IN)
        if ALIGN_OUT > 1:
            dh_row = tl.multiple_of(dh_row, ALIGN_OUT)
        acc_t = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    elif T_PAD > 1:   # T_PAD tangents stacked: tangent t of sample m is row t * BLOCK_M + m
        rt = tl.arange(0, T_PAD * BLOCK_M)
        t_idx = (rt // BLOCK_M).to(INDEX)
        t_row = (pid_m * BLOCK_M + rt % BLOCK_M).to(INDEX)
        t_mask = (t_idx < T) & (t_row < N)
        dx_row = t_idx * stride_dt + t_row * stride_dn
        dh_row = t_idx * stride_dht + t_row * stride_dhn
        if ALIGN_IN > 1:
            dx_row = tl.multiple_of(dx_row, ALIGN_IN)
        if ALIGN_OUT > 1:
            dh_row = tl.multiple_of(dh_row, ALIGN_OUT)
        acc_t = tl.zeros((T_PAD * BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        w_t = tl.load(w_ptr + w_row[None, :] + rk[:, None],
                      mask=n_mask[None, :] & k_mask[:, None], other=0.0)   # [BLOCK_K, BLOCK_N] = W^T tile, read once
        x = tl.load(x_ptr + x_row[:, None] + rk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        acc += tl.dot(x, w_t, input_precision=DOT_PRECISION)
        if T_PAD == 1:
            dx = tl.load(dx_ptr + dx_row[:, None] + rk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            acc_t += tl.dot(dx, w_t, input_precision=DOT_PRECISION)
        elif T_PAD > 1:
            dx = tl.load(dx_ptr + dx_row[:, None] + rk[None, :], mask=t_mask[:, None] & k_mask[None, :], other=0.0)
            acc_t += tl.dot(dx, w_t, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if STORE_PRIMAL:
        out_off = h_row[:, None] + rn[None, :]
        tl.store(h_ptr + out_off, apply_activation(acc, ACT).to(h_ptr.dtype.element_ty), mask=mask)
        if STATE == 1:
            tl.store(state_ptr + out_off, (acc > 0.0).to(tl.uint8), mask=mask)
        elif STATE == 2:
            tl.store(state_ptr + out_off, acc.to(state_ptr.dtype.element_ty), mask=mask)
    if T_PAD == 1:
        tl.store(dh_ptr + dh_row[:, None] + rn[None, :],
                 (acc_t * derivative_of_pre(acc, ACT)).to(dh_ptr.dtype.element_ty), mask=mask)
    elif T_PAD > 1:
        d = derivative_of_pre(acc, ACT)                                     # g'(a) [BLOCK_M, BLOCK_N]
        scaled = tl.reshape(acc_t, (T_PAD, BLOCK_M, BLOCK_N)) * d[None, :, :]
        scaled = tl.reshape(scaled, (T_PAD * BLOCK_M, BLOCK_N))
        tl.store(dh_ptr + dh_row[:, None] + rn[None, :],
                 scaled.to(dh_ptr.dtype.element_ty), mask=t_mask[:, None] & n_mask[None, :])


def _blocks(n: int, m: int, k: int, t_pad: int, dtype: torch.dtype, gpu: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); see MAX_TANGENTS_PER_LAUNCH for the register
    budget.

    GPU: without tangents 64x64 output tiles. The primal tile and the T_PAD
    tangent tiles share each W tile, so the accumulators are (1 + T_PAD) x
    BLOCK_M x BLOCK_N fp32: one tangent (GrAPE's dual pass) takes a 32x64
    tile, more a 16x32 one. fp32 takes BLOCK_K 16 and 8 warps (its "ieee" dot
    runs on FMAs with the operands in registers). Every kernel the engine
    launches (T_PAD 0 and 1) is spill-free on sm_80 and sm_90 under
    ``_common.register_budget`` (``tests/test_triton_compile.py``).
    """
    if gpu:
        fp32 = dtype == torch.float32
        bk = 16 if fp32 else 32
        if t_pad == 0:
            return 64, 64, bk, 8 if fp32 else 4, 3
        if t_pad == 1:
            return 32, 64, bk, 8 if fp32 else 4, 3
        return 16, 32, bk, 8, 3   # T_PAD 2 to 8 tangent tiles stacked under a 16-row primal tile
    # Interpreter: cost grows with programs x K steps, so tiles as large as the problem allows.
    bm = max(16, min(64 if t_pad <= 1 else 32, triton.next_power_of_2(n)))
    return bm, max(16, min(128, triton.next_power_of_2(m))), max(16, min(128, triton.next_power_of_2(k))), 4, 1


def jvp_linear(
    x: torch.Tensor,                  # [N, in]
    weight: torch.Tensor,             # [out, in]
    bias: torch.Tensor | None,        # [out]
    activation: str | None = None,
    tangents: torch.Tensor | None = None,  # [T, N, in]
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(h, dh, state)``: ``h = g(x W^T + b)`` ``[N, out]``, ``dh`` ``[T, N, out]`` (None without
    tangents) and the activation state (``_common``; for tanh/sigmoid it is ``h`` itself)."""
    result, launches = plan_jvp_linear(x, weight, bias, activation, tangents)
    run_launches(launches)
    return result


def plan_jvp_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None = None,
    tangents: torch.Tensor | None = None,
    gpu: bool | None = None,          # GPU tile sizes (default: whether the tensors are on a GPU)
) -> tuple[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None], list[Launch]]:
    """``jvp_linear``'s checks and outputs, and the launches it makes (not run): ``((h, dh, state), launches)``."""
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"activation must be one of {list(ACTIVATION_CODES)}, got {activation!r}")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} do not make a linear layer")
    n, k = x.shape
    m = weight.shape[0]
    dtype = weight.dtype
    tl_dtype(dtype)  # raises on unsupported dtypes
    # tl.dot needs both operands in one dtype (compiled Triton asserts it): compute in the weight's.
    x = x.to(dtype) if x.dtype != dtype else x
    x = x if x.stride(1) == 1 else x.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    h = torch.empty(n, m, dtype=dtype, device=x.device)
    kind = STATE_OF[activation]
    state_code = {"mask": 1, "pre": 2}.get(kind, 0)
    if kind == "mask":
        state = torch.empty(n, m, dtype=torch.uint8, device=x.device)
    elif kind == "pre":
        state = torch.empty(n, m, dtype=dtype, device=x.device)
    else:
        state = h if kind == "output" else None
    n_t = 0 if tangents is None else tangents.shape[0]
    if tangents is not None:
        if tangents.dim() != 3 or tangents.shape[1:] != x.shape:
            raise ValueError(f"tangents must be [T, {n}, {k}], got {tuple(tangents.shape)}")
        tangents = tangents.to(dtype) if tangents.stride(2) == 1 else tangents.to(dtype).contiguous()
        dh = torch.empty(n_t, n, m, dtype=dtype, device=x.device)
    else:
        dh = None
    if n == 0 or m == 0:
        return (h, dh, state), []
    gpu = x.device.type == "cuda" if gpu is None else gpu
    launches = []
    chunks = [(c, min(n_t, c + MAX_TANGENTS_PER_LAUNCH)) for c in range(0, n_t, MAX_TANGENTS_PER_LAUNCH)] or [(0, 0)]
    for i, (t0, t1) in enumerate(chunks):
        t_pad = triton.next_power_of_2(t1 - t0) if t1 > t0 else 0
        bm, bn, bk, warps, stages = _blocks(n, m, k, t_pad, dtype, gpu)
        dx_chunk = tangents[t0:t1] if t1 > t0 else x  # any tensor when there are no tangents
        dh_chunk = dh[t0:t1] if t1 > t0 else h
        strides_in = (x.stride(0), dx_chunk.stride(0) if t1 > t0 else 0, dx_chunk.stride(1) if t1 > t0 else 0,
                      weight.stride(0))
        strides_out = (h.stride(0), dh_chunk.stride(0) if t1 > t0 else 0, dh_chunk.stride(1) if t1 > t0 else 0)
        # Largest element offsets (rows and tangent slots rounded up to whole tiles) against 2^31.
        n_up, m_up, k_up = triton.cdiv(n, bm) * bm, triton.cdiv(m, bn) * bn, triton.cdiv(k, bk) * bk
        t_up = max(t_pad, 1)
        index = index_dtype(n_up * x.stride(0) + k_up, t_up * strides_in[1] + n_up * strides_in[2] + k_up,
                            m_up * weight.stride(0) + k_up, n_up * h.stride(0) + m_up,
                            t_up * strides_out[1] + n_up * strides_out[2] + m_up)
        grid = (triton.cdiv(n, bm), triton.cdiv(m, bn))
        align_in, align_out = divisibility(k, *strides_in), divisibility(m, *strides_out)
        launches.append(Launch(
            _jvp_linear_kernel, grid,
            (x, dx_chunk, weight, bias if bias is not None else weight, h, state if state_code else h, dh_chunk,
             n, m // align_out, k // align_in, t1 - t0, *strides_in, *strides_out),
            dict(ACT=ACTIVATION_CODES[activation], STATE=state_code, HAS_BIAS=bias is not None,
                 STORE_PRIMAL=i == 0, T_PAD=t_pad, DOT_PRECISION=dot_precision(),
                 ALIGN_IN=align_in, ALIGN_OUT=align_out, INDEX=index,
                 BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk),
            num_warps=warps, num_stages=stages))
    return (h, dh, state), launches
