"""The re-created biotorch- and TinyDFA-style baselines compute fastdfa's DFA gradients (a fair race)."""


import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdfa
from fastdfa.lab.baselines import FeedbackPointDFA, HookDFA

DT = torch.float64


@pytest.mark.parametrize("baseline", [HookDFA, FeedbackPointDFA])
def test_baseline_gradients_equal_fastdfa(baseline):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(9, 8), nn.ReLU(), nn.Linear(8, 7), nn.Tanh(),
                          nn.Linear(7, 4)).to(DT)
    ours = nn.Sequential(nn.Flatten(), fastdfa.Linear(9, 8, activation="relu"),
                         fastdfa.Linear(8, 7, activation="tanh"), fastdfa.Linear(7, 4)).to(DT)
    ours.load_state_dict({k: v for k, v in zip(ours.state_dict(), plain.state_dict().values())})
    x, t = torch.randn(5, 3, 3, dtype=DT), torch.randint(0, 4, (5,))
    dfa = fastdfa.DFA(ours, seed=1)
    F.cross_entropy(dfa(x), t).backward()
    other = baseline(plain, [s.feedback.clone() for s in dfa.sites])
    F.cross_entropy(other(x), t).backward()
    for a, b in zip(ours.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14)


def test_baseline_checks_the_feedback_count():
    with pytest.raises(ValueError, match="feedback"):
        HookDFA(nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2)), [])
