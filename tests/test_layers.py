"""fastdfa.Linear / Conv2d: drop-in for torch's layers, and their FA backward."""

import pytest
import torch
from torch import nn

import fastdfa

DT = torch.float64


def _pair(kind, **kw):
    torch.manual_seed(0)
    if kind == "linear":
        ref = nn.Linear(6, 5, dtype=DT, **kw)
        ours = fastdfa.Linear(6, 5, dtype=DT, **kw)
    else:
        ref = nn.Conv2d(3, 4, 3, dtype=DT, **kw)
        ours = fastdfa.Conv2d(3, 4, 3, dtype=DT, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("bias", [True, False])
def test_same_forward_and_state_dict_keys(kind, bias):
    ref, ours = _pair(kind, bias=bias)
    assert isinstance(ours, type(ref))
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 6, dtype=DT) if kind == "linear" else torch.randn(2, 3, 7, 7, dtype=DT)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
    back = type(ref)(*((6, 5) if kind == "linear" else (3, 4, 3)), bias=bias, dtype=DT)
    back.load_state_dict(ours.state_dict(), strict=True)  # a fastdfa checkpoint loads back into torch
    torch.testing.assert_close(back(x), ref(x), rtol=0, atol=0)


def test_feedback_weight_buffer_has_weight_shape_and_moves():
    lin = fastdfa.Linear(6, 5)
    assert lin.feedback_weight.shape == lin.weight.shape
    assert "feedback_weight" in dict(lin.named_buffers())
    lin.double()
    assert lin.feedback_weight.dtype == torch.float64


def _fa_grads(layer, x, grad_out, fa):
    x = x.clone().requires_grad_()
    y = layer.fa_forward(x) if fa else layer(x)
    y.backward(grad_out)
    return x.grad, layer.weight.grad.clone(), None if layer.bias is None else layer.bias.grad.clone()


def test_fa_linear_uses_feedback_weight_for_dx():
    layer = fastdfa.Linear(6, 5, dtype=DT)
    x = torch.randn(3, 4, 6, dtype=DT)  # extra leading dim: dW sums over both
    g = torch.randn(3, 4, 5, dtype=DT)
    dx, dw, db = _fa_grads(layer, x, g, fa=True)
    torch.testing.assert_close(dx, g @ layer.feedback_weight, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dw, g.reshape(-1, 5).T @ x.reshape(-1, 6), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(db, g.reshape(-1, 5).sum(0), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(dx, g @ layer.weight)


CONV_CASES = [
    dict(padding=1),
    dict(padding="same", kernel_size=4),          # asymmetric "same" padding
    dict(padding="valid", stride=2),
    dict(padding=2, dilation=2, groups=2),
    dict(padding=1, padding_mode="reflect"),
    dict(padding=(1, 2), padding_mode="circular", kernel_size=(3, 5)),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_fa_conv_with_b_equal_w_is_bp(case):
    kw = dict(case)
    k = kw.pop("kernel_size", 3)
    torch.manual_seed(0)
    ref = nn.Conv2d(4, 6, k, dtype=DT, **kw)
    ours = fastdfa.Conv2d(4, 6, k, dtype=DT, **kw)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 9, 8, dtype=DT)
    g = torch.randn_like(ref(x))
    with torch.no_grad():
        ours.feedback_weight.copy_(ours.weight)
    dx, dw, db = _fa_grads(ours, x, g, fa=True)
    rdx, rdw, rdb = _fa_grads(ref, x, g, fa=False)
    torch.testing.assert_close(dx, rdx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dw, rdw, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(db, rdb, rtol=1e-12, atol=1e-12)


def test_fa_conv_dx_is_transposed_conv_with_b():
    layer = fastdfa.Conv2d(3, 5, 3, padding=1, dtype=DT)
    x = torch.randn(2, 3, 6, 6, dtype=DT)
    g = torch.randn(2, 5, 6, 6, dtype=DT)
    dx, _, _ = _fa_grads(layer, x, g, fa=True)
    expected = torch.nn.grad.conv2d_input(x.shape, layer.feedback_weight, g, padding=1)
    torch.testing.assert_close(dx, expected, rtol=1e-12, atol=1e-12)
