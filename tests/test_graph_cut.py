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


def test_site_inputs_are_cut_from_autograd():
    """Every site module receives a tensor with no autograd history."""
    model = make_mlp(6, (5, 5), 3)
    seen = []
    for m in model:
        if isinstance(m, fastdfa.Linear):
            m.register_forward_hook(lambda mod, args, out: seen.append(args[0].grad_fn))
    dfa = fastdfa.DFA(model)
    x = torch.randn(2, 6, requires_grad=True) * 2  # an input with history: the first layer keeps it
    dfa(x)
    # Forward hooks see the inputs the layers computed on (after the wrapper's pre-hooks).
    assert seen[0] is x.grad_fn  # the first module executed is not a site: its input is not cut
    assert seen[1:] == [None, None]
