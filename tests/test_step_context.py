"""The step context (engine.recording.StepState): a backward runs with what its forward fixed (the kernels, the
NaN policy, the module names) and the error router reads nothing back from the wrapper."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdfa
from fastdfa.engine.output import NonFiniteErrorSignal


def _wrapper(mode="dfa", nonfinite="raise"):
    torch.manual_seed(0)
    model = nn.Sequential(fastdfa.Linear(5, 4, activation="tanh"), fastdfa.Linear(4, 3))
    return fastdfa.DFA(model, mode=mode, nonfinite=nonfinite, seed=1)


def _nan_loss(dfa):
    out = dfa(torch.randn(6, 5))
    return out.sum() * float("nan")


@pytest.mark.parametrize("mode", ["dfa", "fa"])
def test_the_nan_policy_is_the_forwards_not_the_one_set_before_the_backward(mode):
    dfa = _wrapper(mode, nonfinite="raise")
    dfa(torch.randn(2, 5))  # built
    loss = _nan_loss(dfa)
    dfa.nonfinite = "skip"  # set between this forward and its backward: the next forward's policy
    with pytest.raises(NonFiniteErrorSignal):
        loss.backward()
    assert dfa.skipped_steps == 0

    dfa = _wrapper(mode, nonfinite="skip")
    dfa(torch.randn(2, 5))
    loss = _nan_loss(dfa)
    dfa.nonfinite = "raise"
    loss.backward()  # skipped, as this forward asked
    assert dfa.skipped_steps == 1
    assert all(p.grad is None for p in dfa.model.parameters())
    # after the (skipped) optimizer step, the next forward runs under the new policy
    torch.optim.SGD(dfa.parameters(), lr=0.1).step()
    with pytest.raises(NonFiniteErrorSignal):
        _nan_loss(dfa).backward()


def test_the_router_holds_no_reference_to_the_wrapper_but_its_alignment_callback():
    dfa = _wrapper("grape")
    x, t = torch.randn(6, 5), torch.randint(0, 3, (6,))
    F.cross_entropy(dfa(x), t).backward()
    router = dfa._router
    held = {name: v for name, v in vars(router).items() if name != "on_estimate"}
    assert not any(v is dfa for v in held.values()), held
    # the one way back, GrAPE's step after the whole backward, is the wrapper's own method
    assert router.on_estimate.__self__ is dfa


def test_the_step_carries_the_forwards_kernels_and_policy():
    dfa = _wrapper("dfa", nonfinite="skip")
    x, t = torch.randn(6, 5), torch.randint(0, 3, (6,))
    seen = {}
    route = dfa._router.route

    def spy(error, step, feedback=None):
        seen.update(kernels=step.kernels, nonfinite=step.nonfinite, names=dict(step.names))
        return route(error, step, feedback)

    dfa._router.route = spy
    F.cross_entropy(dfa(x), t).backward()
    assert seen["kernels"] is dfa.kernels and seen["nonfinite"] == "skip"
    assert set(seen["names"].values()) >= {"0", "1"}
