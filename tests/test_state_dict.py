"""Checkpoints: a save/load round trip reproduces the next training step bit for bit."""

import io

import pytest
import torch
import torch.nn.functional as F

import fastdfa
from fastdfa.models import make_cnn, make_mlp


def _setup(seed, mode="dfa", conv=False):
    torch.manual_seed(seed)
    model = make_cnn((1, 8, 8), 4, channels=(3, 4), hidden=6) if conv else make_mlp(10, (12, 8), 4)
    dfa = fastdfa.DFA(model, mode=mode, seed=seed)
    opt = torch.optim.Adam(dfa.parameters(), lr=1e-2)
    return dfa, opt


def _step(dfa, opt, x, t):
    opt.zero_grad()
    F.cross_entropy(dfa(x), t).backward()
    opt.step()


@pytest.mark.parametrize("mode", ["dfa", "fa"])
@pytest.mark.parametrize("conv", [False, True])
def test_round_trip_reproduces_next_step_bit_for_bit(mode, conv):
    x = torch.randn(6, 1, 8, 8) if conv else torch.randn(6, 10)
    t = torch.randint(0, 4, (6,))
    dfa, opt = _setup(0, mode, conv)
    _step(dfa, opt, x, t)
    buf = io.BytesIO()
    torch.save({"model": dfa.state_dict(), "opt": opt.state_dict()}, buf)
    _step(dfa, opt, x, t)
    expected = [p.detach().clone() for p in dfa.parameters()]

    other, other_opt = _setup(123, mode, conv)  # different seed and init: everything must come from the file
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other.load_state_dict(state["model"])  # before the first forward: feedback not built yet
    other_opt.load_state_dict(state["opt"])
    _step(other, other_opt, x, t)
    for a, b in zip(other.parameters(), expected):
        assert torch.equal(a, b)
    for a, b in zip(other.sites, dfa.sites):
        assert torch.equal(a.feedback, b.feedback)


def test_load_into_built_wrapper_copies_feedback():
    dfa, _ = _setup(0)
    dfa(torch.randn(2, 10))
    other, _ = _setup(5)
    other(torch.randn(2, 10))
    assert not torch.equal(other.sites[0].feedback, dfa.sites[0].feedback)
    other.load_state_dict(dfa.state_dict())
    for a, b in zip(other.sites, dfa.sites):
        assert torch.equal(a.feedback, b.feedback)


def test_inner_model_checkpoint_is_plain_torch():
    """The wrapped model's own state_dict has only torch's keys: it loads into torch layers."""
    dfa, _ = _setup(0)
    dfa(torch.randn(2, 10))
    keys = list(dfa.model.state_dict())
    assert all("feedback" not in k for k in keys)
    torch.manual_seed(0)
    # make_mlp keeps the activations inside the layers (activation=), which adds no state.
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(10, 12), torch.nn.Linear(12, 8),
                                torch.nn.Linear(8, 4))
    plain.load_state_dict(dfa.model.state_dict(), strict=True)


def test_mismatched_checkpoint_is_rejected():
    dfa, _ = _setup(0)
    dfa(torch.randn(2, 10))
    state = dfa.state_dict()
    state["feedback.0"] = torch.zeros(3, 3)
    other, _ = _setup(0)
    other(torch.randn(2, 10))
    before = other.sites[0].feedback.clone()
    with pytest.raises(RuntimeError, match="shape"):
        other.load_state_dict(state)
    assert torch.equal(other.sites[0].feedback, before)
