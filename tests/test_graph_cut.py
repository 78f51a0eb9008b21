"""The graph cut: in mode "dfa" no layer computes an input gradient.

Counted on the aten ops of one backward pass (TorchDispatchMode): for an
L-layer MLP BP does 2L-1 matmuls (L weight gradients, L-1 input gradients; the
data needs none), DFA at most L+1 (L weight gradients and ONE projection).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastdfa
from fastdfa.models import make_cnn, make_mlp

MATMULS = {"aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten.matmul.default",
           "aten.baddbmm.default"}


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.matmuls = 0
        self.conv_backward_masks = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in MATMULS:
            self.matmuls += 1
        if name == "aten.convolution_backward.default":
            self.conv_backward_masks.append(tuple(args[10]))
        return func(*args, **(kwargs or {}))


def _backward_counts(model, mode, x, target):
    dfa = fastdfa.DFA(model, mode=mode)
    loss = F.cross_entropy(dfa(x), target)
    with CountOps() as counter:
        loss.backward()
    return counter


@pytest.mark.parametrize("depth", [2, 3, 5, 8])
def test_mlp_matmul_count(depth):
    x, t = torch.randn(16, 12), torch.randint(0, 4, (16,))
    torch.manual_seed(0)
    model = make_mlp(12, (10,) * (depth - 1), 4)
    bp = _backward_counts(model, "bp", x, t)
    dfa = _backward_counts(model, "dfa", x, t)
    assert bp.matmuls == 2 * depth - 1
    assert dfa.matmuls <= depth + 1
    assert dfa.matmuls == depth + 1  # L weight gradients + the one projection for all sites


def test_conv_backward_computes_no_input_gradient_in_dfa():
    model = make_cnn((1, 8, 8), 5, channels=(3, 4), hidden=6)
    x, t = torch.randn(4, 1, 8, 8), torch.randint(0, 5, (4,))
    bp = _backward_counts(model, "bp", x, t)
    dfa = _backward_counts(model, "dfa", x, t)
    # BP: the second conv needs dX (the first has data as input); DFA: no conv computes dX.
    assert [m[0] for m in bp.conv_backward_masks] == [True, False]
    assert [m[0] for m in dfa.conv_backward_masks] == [False, False]
    assert all(m[1] for m in dfa.conv_backward_masks)  # the weight gradients are computed
    # Linear head: BP 2 dW + 2 dX (the first linear's dX feeds the convs); DFA 2 dW + 1 projection.
    assert bp.matmuls == 4 and dfa.matmuls == 3


def test_site_inputs_are_cut_from_autograd(monkeypatch):
    """Every site module computes on a tensor with no autograd history."""
    model = make_mlp(6, (5, 5), 3)
    seen = []
    real = fastdfa.Linear.plain_forward
    monkeypatch.setattr(fastdfa.Linear, "plain_forward",
                        lambda self, input: seen.append(input.grad_fn) or real(self, input))
    dfa = fastdfa.DFA(model)
    x = torch.randn(2, 6, requires_grad=True) * 2  # an input with history: the first layer keeps it
    dfa(x)
    # plain_forward receives what the layer computes on (after the wrapper's graph cut).
    assert seen[0] is x.grad_fn  # the first module executed is not a site: its input is not cut
    assert seen[1:] == [None, None]


def test_triton_backend_leaves_no_matmul_to_torch():
    """backend="triton", all layers claimed: the projection and every weight gradient are kernel
    launches (tests/test_triton_engine.py counts them), so the backward runs no torch matmul at all."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton needs a GPU or TRITON_INTERPRET=1")
    model = make_mlp(12, (10, 10, 10), 4)
    dfa = fastdfa.DFA(model, backend="triton")
    loss = F.cross_entropy(dfa(torch.randn(6, 12)), torch.randint(0, 4, (6,)))
    assert dfa.fused_layers == ["1", "2", "3", "4"]
    with CountOps() as counter:
        loss.backward()
    assert counter.matmuls == 0 and all(p.grad is not None for p in model.parameters())


def test_triton_backend_conv_weight_gradient_only():
    """A claimed conv layer asks convolution_backward for dW and db only: no dX."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton needs a GPU or TRITON_INTERPRET=1")
    model = nn.Sequential(fastdfa.Conv2d(1, 3, 3, padding=1, activation="relu"),
                          fastdfa.Conv2d(3, 2, 3, padding=1, activation="relu"), nn.Flatten(),
                          fastdfa.Linear(2 * 6 * 6, 4))
    dfa = fastdfa.DFA(model, backend="triton")
    loss = F.cross_entropy(dfa(torch.randn(3, 1, 6, 6)), torch.randint(0, 4, (3,)))
    assert dfa.fused_layers == ["0", "3"]  # conv "1" is flattened (a view) first: generic route
    with CountOps() as counter:
        loss.backward()
    assert counter.conv_backward_masks and all(not m[0] for m in counter.conv_backward_masks)
