"""``jvp_linear`` (Triton) against its PyTorch reference and ``torch.func.jvp``."""

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_matches_reference

pytest.importorskip("triton")
from fastdfa.triton_kernels import jvp_linear as op  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
ACTIVATIONS = [None, "relu", "tanh", "sigmoid", "gelu"]


def _inputs(n, k, m, t, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=gen, dtype=torch.float64)
    w = torch.randn(m, k, generator=gen, dtype=torch.float64) / k ** 0.5
    b = torch.randn(m, generator=gen, dtype=torch.float64) if bias else None
    dx = torch.randn(t, n, k, generator=gen, dtype=torch.float64) if t else None
    return x, w, b, dx


def _at(tensors, dtype, device="cpu"):
    return [None if v is None else v.to(dtype).to(device) for v in tensors]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_primal_tangents_and_state(activation, dtype):
    x, w, b, dx = _inputs(23, 37, 19, 3, bias=True)
    h, dh, state = op.jvp_linear(*_at((x, w, b), dtype, DEVICE), activation, _at((dx,), dtype, DEVICE)[0])
    # float64 truth from the inputs as stored at dtype; PyTorch's own result at dtype (fp32 math
    # rounded once for fp16 on CPU, where torch has no fp16 GEMM of its own).
    inputs64 = [None if v is None else v.to(dtype).double() for v in (x, w, b, dx)]
    h64, dh64, state64 = op.jvp_linear_reference(*inputs64[:3], activation, inputs64[3])
    compute = torch.float32 if dtype == torch.float16 and DEVICE == "cpu" else dtype
    hd, dhd, _ = op.jvp_linear_reference(*[None if v is None else v.to(compute) for v in inputs64[:3]],
                                         activation, inputs64[3].to(compute))
    assert_matches_reference(h.cpu(), h64, hd.to(dtype), f"h {activation} {dtype}")
    assert_matches_reference(dh.cpu(), dh64, dhd.to(dtype), f"dh {activation} {dtype}")
    if activation == "relu":
        a64 = F.linear(*inputs64[:3])
        # The mask may differ from float64 only where a is within rounding of 0.
        differ = state.cpu() != state64
        assert state.dtype == torch.uint8 and (a64[differ].abs() < 1e-2).all()
    elif activation == "gelu":
        assert_matches_reference(state.cpu(), F.linear(*inputs64[:3]),
                                 F.linear(*[v.to(compute) for v in inputs64[:3]]).to(dtype), "gelu state a")
    elif activation in ("tanh", "sigmoid"):
        assert state is h
    else:
        assert state is None


@pytest.mark.parametrize("n_tangents", [0, 1, 5, 11])
def test_any_number_of_tangents_and_batch_one(n_tangents):
    """0 tangents (the training forward), 1, a non-power of two, and more than one launch holds."""
    x, w, b, dx = _inputs(1, 20, 33, n_tangents, bias=False, seed=n_tangents)
    h, dh, _ = op.jvp_linear(*_at((x, w, b, dx), torch.float32, DEVICE)[:3], "tanh",
                             None if dx is None else dx.float().to(DEVICE))
    h64, dh64, _ = op.jvp_linear_reference(x, w, b, "tanh", dx)
    h32, dh32, _ = op.jvp_linear_reference(*_at((x, w, b, dx), torch.float32)[:3], "tanh",
                                           None if dx is None else dx.float())
    assert_matches_reference(h.cpu(), h64, h32, "h")
    if n_tangents:
        assert_matches_reference(dh.cpu(), dh64, dh32, "dh")
    else:
        assert dh is None


def test_equals_torch_func_jvp_of_the_plain_layer():
    x, w, b, dx = _inputs(7, 12, 9, 2, bias=True, seed=5)
    h, dh, _ = op.jvp_linear(*_at((x, w, b), torch.float32, DEVICE), "gelu", dx.float().to(DEVICE))
    for t in range(2):
        want_h, want_dh = torch.func.jvp(lambda v: F.gelu(F.linear(v, w, b)), (x,), (dx[t],))
        torch.testing.assert_close(dh[t].cpu().double(), want_dh, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(h.cpu().double(), want_h, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", [None, "relu", "tanh", "sigmoid", "gelu"])
def test_reference_equals_torch_func_jvp_in_float64(activation):
    """The reference's g'(a) from the saved state is the derivative forward AD takes, for every activation."""
    from fastdfa.activations import apply_activation
    x, w, b, dx = _inputs(7, 12, 9, 3, bias=True, seed=11)
    h, dh, _ = op.jvp_linear_reference(x, w, b, activation, dx)
    for t in range(3):
        want_h, want_dh = torch.func.jvp(lambda v: apply_activation(F.linear(v, w, b), activation), (x,), (dx[t],))
        torch.testing.assert_close(dh[t], want_dh, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(h, want_h, rtol=0, atol=0)


def test_bad_input():
    x, w = torch.randn(4, 5), torch.randn(3, 6)
    with pytest.raises(ValueError, match="linear layer"):
        op.jvp_linear(x, w, None)
    with pytest.raises(ValueError, match="activation"):
        op.jvp_linear(x, torch.randn(3, 5), None, "swish")
    with pytest.raises(ValueError, match="tangents"):
        op.jvp_linear(x, torch.randn(3, 5), None, None, torch.randn(2, 4, 4))
