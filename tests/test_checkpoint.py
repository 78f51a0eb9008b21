"""Activation checkpointing under DFA, FA and GrAPE: ``fastdfa.checkpoint`` and torch's own
non-reentrant ``torch.utils.checkpoint`` give the rule's gradients (those of the same model without
checkpointing, float64), and torch's reentrant checkpoint, which would recompute with BP's rule, is
refused."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

import fastdfa
from fastdfa.backends.cuda_ops import CudaBackend, EmulatedC

DT = torch.float64


class Net(nn.Module):
    """data -> a -> [b, block] (checkpointed segment) -> head; ``block`` is a user site (BP inside)."""

    def __init__(self, how=None, dtype=DT):
        super().__init__()
        self.a = fastdfa.Linear(4, 6, activation="tanh", dtype=dtype)
        self.b = fastdfa.Linear(6, 6, activation="relu", dtype=dtype)
        self.block = nn.Sequential(nn.Linear(6, 6, dtype=dtype), nn.Tanh(), fastdfa.Linear(6, 5, dtype=dtype))
        self.head = fastdfa.Linear(5, 3, dtype=dtype)
        self.how = how

    def segment(self, h):
        return self.block(self.b(h))

    def forward(self, x):
        h = self.a(x)
        if self.how == "fastdfa":
            h = fastdfa.checkpoint(self.segment, h)
        elif self.how == "torch":
            h = torch_checkpoint(self.segment, h, use_reentrant=False)
        elif self.how == "reentrant":
            h = torch_checkpoint(self.segment, h, use_reentrant=True)
        else:
            h = self.segment(h)
        return self.head(h)


def _grads(model, mode, backend, x, t):
    if backend == "cuda-emulated":
        dfa = fastdfa.DFA(model, mode=mode, seed=4, sites=[model.block], backend="torch")
        dfa.kernels = CudaBackend(EmulatedC)
    else:
        dfa = fastdfa.DFA(model, mode=mode, seed=4, sites=[model.block], backend=backend)
    F.cross_entropy(dfa(x), t).backward()
    return [p.grad for p in model.parameters()], dfa


@pytest.mark.parametrize("how", ["fastdfa", "torch"])
@pytest.mark.parametrize("mode", ["dfa", "fa", "grape"])
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda-emulated"])
def test_checkpoint_gives_the_rule_s_gradients(mode, backend, how):
    if backend == "triton":
        pytest.importorskip("triton")
        if torch.cuda.is_available():
            pytest.skip("the Triton interpreter on CPU tensors; on a GPU, compiled Triton is covered by the kernel "
                    "and engine tests (tests/test_triton_engine.py)")
    dtype = DT if backend == "torch" else torch.float32
    torch.manual_seed(0)
    plain = Net(dtype=dtype)
    checkpointed = copy.deepcopy(plain)
    checkpointed.how = how
    x, t = torch.randn(5, 4, dtype=dtype), torch.randint(0, 3, (5,))
    want, ref = _grads(plain, mode, backend, x, t)
    got, dfa = _grads(checkpointed, mode, backend, x, t)
    tol = {} if dtype == DT else dict(rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **({"rtol": 1e-12, "atol": 1e-12} if dtype == DT else tol))
    assert dfa.fused_layers == ref.fused_layers


@pytest.mark.parametrize("mode", ["dfa", "fa", "grape"])
def test_reentrant_torch_checkpoint_is_refused(mode):
    model = Net("reentrant")
    dfa = fastdfa.DFA(model, mode=mode, sites=[model.block])
    with pytest.raises(RuntimeError, match="fastdfa.checkpoint"):
        dfa(torch.randn(5, 4, dtype=DT))
    assert all(p.grad is None for p in model.parameters())


def test_fastdfa_checkpoint_outside_a_wrapper_is_torch_s():
    torch.manual_seed(0)
    model = Net("fastdfa")
    x = torch.randn(5, 4, dtype=DT, requires_grad=True)
    model(x).sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.how = None
    model(x).sum().backward()
    for p, w in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, w)


@pytest.mark.parametrize("how", ["bp mode through the wrapper", "the model without its wrapper"])
def test_a_checkpointed_bp_step_after_a_dfa_step_is_bp(how):
    """A DFA step leaves its checkpointed sites registered for recomputation; the next checkpointed forward,
    in mode "bp" through the same wrapper or the raw model called without it, must recompute as IT ran:
    BP's gradients exactly, for the fastdfa layers and the sites= block alike."""
    torch.manual_seed(0)
    model = Net("torch")
    reference = copy.deepcopy(model)
    reference.how = None
    dfa = fastdfa.DFA(model, seed=4, sites=[model.block])
    x, t = torch.randn(5, 4, dtype=DT), torch.randint(0, 3, (5,))
    F.cross_entropy(dfa(x), t).backward()
    model.zero_grad()
    if how == "bp mode through the wrapper":
        with fastdfa.backprop(dfa):
            F.cross_entropy(dfa(x), t).backward()
    else:
        F.cross_entropy(model(x), t).backward()
    F.cross_entropy(reference(x), t).backward()
    for p, w in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, w.grad, rtol=1e-12, atol=1e-12)


def test_torch_checkpoint_twice_in_one_step_and_accumulation():
    """Two checkpointed forwards before one backward (gradient accumulation through a summed loss), and a
    second backward through the same graph (retain_graph): the DFA gradients of the plain model."""
    torch.manual_seed(0)
    plain = Net()
    checkpointed = copy.deepcopy(plain)
    checkpointed.how = "torch"
    x1, x2, t = torch.randn(5, 4, dtype=DT), torch.randn(5, 4, dtype=DT), torch.randint(0, 3, (5,))
    grads = []
    for model in (plain, checkpointed):
        dfa = fastdfa.DFA(model, seed=4, sites=[model.block])
        loss = F.cross_entropy(dfa(x1), t) + F.cross_entropy(dfa(x2), t)
        loss.backward(retain_graph=True)
        loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for g, w in zip(*grads[::-1]):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
