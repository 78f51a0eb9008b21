"""Whole training steps: DFA (fastdfa layers, torch backend) against a plain ``torch.nn`` BP model.

Issue "Layout", item 6: DFA's fixed per-step cost, measured where it shows most
(an overhead-bound MLP) beside a GEMM-bound one, side by side in one run:

  small  784-256-256-256-10,       batch 128: FLOP floor 0.84
  big    784-1024-1024-1024-1024-10, batch 256: FLOP floor 0.72

ReLU, float32, 2 CPU threads, SGD; a step is zero_grad, forward,
cross-entropy, backward and optimizer step. The BP model is ``nn.Linear`` +
``nn.ReLU`` modules (what a user would otherwise run), with the same initial
weights as the DFA model. The two methods alternate round after round
(``fastdfa.lab.steptime.interleaved_step_ms``) and the ratio of medians is
checked against the targets in bench/conftest.py (small <= 0.95, big <= 0.78).

FLOP floor = (forward + weight gradients + DFA's projection) / (forward +
weight gradients + BP's input gradients), in MACs per sample:
small (2 x 334,336 + 7,680) / (2 x 334,336 + 133,632) = 0.84;
big (2 x 3,958,784 + 30,720) / (2 x 3,958,784 + 3,155,968) = 0.72.

    python -m pytest bench/test_mlp_step.py -q -p no:cacheprovider --fastdfa-record bench/results/mlp-step-cpu.json
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdfa
from fastdfa.lab.steptime import interleaved_step_ms

THREADS, IN, OUT = 2, 784, 10
SHAPES = {  # group: (hidden widths, batch, rounds)
    "mlp-step-784x256x3-b128-fp32": ((256, 256, 256), 128, 400),
    "mlp-step-784x1024x4-b256-fp32": ((1024, 1024, 1024, 1024), 256, 60),
}


def _models(widths):
    """(plain torch.nn BP model, fastdfa model) with the same initial weights."""
    torch.manual_seed(0)
    plain, fast, d = [], [], IN
    for i, w in enumerate(widths + (OUT,)):
        last = i == len(widths)
        lin = nn.Linear(d, w)
        mine = fastdfa.Linear(d, w, activation=None if last else "relu")
        mine.load_state_dict(lin.state_dict())
        plain += [lin] if last else [lin, nn.ReLU()]
        fast.append(mine)
        d = w
    return nn.Sequential(*plain), nn.Sequential(*fast)


def _step(model, x, t):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step(_round=None):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), t).backward()
        opt.step()

    return step


def _steps(widths, batch):
    plain, fast = _models(widths)
    x, t = torch.randn(batch, IN), torch.randint(0, OUT, (batch,))
    return {"bp": _step(plain, x, t), "dfa": _step(fastdfa.DFA(fast, mode="dfa", seed=0, backend="torch"), x, t)}


def test_the_two_models_start_equal():
    """The comparison is fair: both models compute the same function before the first step."""
    plain, fast = _models((8, 8))
    x = torch.randn(3, IN)
    torch.testing.assert_close(fast(x), plain(x), rtol=0, atol=0)


@pytest.mark.parametrize("group", sorted(SHAPES))
def test_mlp_step_interleaved(request, record_interleaved, group):
    widths, batch, rounds = SHAPES[group]
    disabled = request.config.getoption("benchmark_disable")
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        timing = interleaved_step_ms(_steps(widths, batch), rounds=1 if disabled else rounds,
                                     warmup=0 if disabled else 10)
    finally:
        torch.set_num_threads(threads)
    assert set(timing) == {"bp", "dfa"}
    if not disabled:
        record_interleaved(group, timing)
