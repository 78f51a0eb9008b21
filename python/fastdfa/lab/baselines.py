"""The two existing styles of DFA implementation, re-created as speed baselines (not training APIs).

Both compute the same DFA weight gradients as ``fastdfa.DFA`` (tested in
tests/test_baselines.py) but keep PyTorch's full backward graph, which is why
DFA libraries built this way are no faster than BP:

* ``HookDFA`` (biotorch's style): a plain model; tensor hooks on every hidden
  activation replace the gradient arriving there by ``e @ F_l^T``, where ``e``
  was captured by a hook on the output. Every layer still computes its input
  gradient (dX), which the next hook then throws away.
* ``FeedbackPointDFA`` (TinyDFA's style): an identity autograd Function (a
  "feedback point") after every hidden activation whose backward ignores the
  incoming gradient and returns that point's projection of the error, stored
  by an identity Function at the output. The full backward still runs
  through every layer.

Both take the model as ``[Linear, activation] * k + [Linear]`` (an
``nn.Sequential`` of torch or fastdfa layers, optionally starting with
Flatten) and the per-site feedback matrices ``F_l`` (``(n_l, n_out)``).
"""

from __future__ import annotations

import torch
from torch import nn


def _activations(model: nn.Sequential) -> list[int]:
    """Indices of the modules whose outputs are the hidden activations h_l (the sites' tensors)."""
    linears = [i for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    out = []
    for a, b in zip(linears, linears[1:]):
        out.append(b - 1)  # the module just before the next Linear produces h_l
    return out


class _Baseline(nn.Module):
    """A plain Sequential and one feedback matrix per hidden activation."""

    def __init__(self, model: nn.Sequential, feedback: list[torch.Tensor]):
        super().__init__()
        self.model, self.feedback = model, feedback
        self.sites = _activations(model)
        if len(self.sites) != len(feedback):
            raise ValueError(f"{len(self.sites)} hidden activations but {len(feedback)} feedback matrices")
        self.feedback_of = {i: feedback[k] for k, i in enumerate(self.sites)}  # module index -> its feedback


class HookDFA(_Baseline):
    """biotorch-style DFA: gradients replaced in backward hooks over the full graph."""

    def forward(self, x):
        error: list[torch.Tensor] = []
        for i, module in enumerate(self.model):
            x = module(x)
            f = self.feedback_of.get(i)
            if f is not None and x.requires_grad:
                x.register_hook(lambda g, f=f: (error[0] @ f.t()).reshape(g.shape))
        if x.requires_grad:
            x.register_hook(lambda g: error.append(g.reshape(g.shape[0], -1)))
        return x


class _FeedbackPoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, f, store):
        ctx.f, ctx.store = f, store
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad):  # the incoming (BP) gradient is computed, then ignored
        return (ctx.store[0] @ ctx.f.t()).reshape(grad.shape), None, None


class _ErrorTap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, store):
        ctx.store = store
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        ctx.store.append(grad.reshape(grad.shape[0], -1))
        return grad, None


class FeedbackPointDFA(_Baseline):
    """TinyDFA-style DFA: feedback points after every hidden layer, full backward still run."""

    def forward(self, x):
        store: list[torch.Tensor] = []
        for i, module in enumerate(self.model):
            x = module(x)
            if i in self.feedback_of:
                x = _FeedbackPoint.apply(x, self.feedback_of[i], store)
        return _ErrorTap.apply(x, store)
