"""One whole training step, BP against DFA, on the MLP of issue "Core".

784-1024-1024-1024-1024-10, ReLU, batch 256, float32, 2 CPU threads, SGD:
zero_grad, forward, cross-entropy, backward, optimizer step. Both methods
start from the same weights; the ratio of their medians is printed by
bench/conftest.py. FLOP floor for the ratio: forward 3.96 M MAC/sample,
weight gradients 3.96, BP's input gradients 3.16 (the first layer needs none),
DFA's projection 0.04 -> (3.96 + 3.96 + 0.04) / (3.96 * 2 + 3.16) = 0.72.
"""

import pytest
import torch
import torch.nn.functional as F

import fastdfa
from fastdfa.lab.steptime import interleaved_step_ms
from fastdfa.models import make_mlp

WIDTHS = (1024, 1024, 1024, 1024)
BATCH, IN, OUT, THREADS = 256, 784, 10, 2


def _setup(method):
    torch.manual_seed(0)
    dfa = fastdfa.DFA(make_mlp(IN, WIDTHS, OUT), mode=method, seed=0)
    opt = torch.optim.SGD(dfa.parameters(), lr=1e-3)
    x, t = torch.randn(BATCH, IN), torch.randint(0, OUT, (BATCH,))

    def step(_round=None):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(dfa(x), t).backward()
        opt.step()

    return step

GROUP = "core-mlp-784x1024x4-b256-fp32"


@pytest.mark.parametrize("method", ["bp", "dfa"])
def test_core_mlp_step(benchmark, record_step, method):
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        step = _setup(method)
        benchmark.group = GROUP
        benchmark.extra_info.update(method=method, threads=THREADS, batch=BATCH, widths=WIDTHS)
        benchmark.pedantic(step, rounds=40, iterations=1, warmup_rounds=5)
        record_step(benchmark.group, method, benchmark)
    finally:
        torch.set_num_threads(threads)


def test_core_mlp_step_interleaved(request, record_interleaved):
    """The ratio the target is checked on: BP and DFA steps alternating, round after round.

    pytest-benchmark times one method after the other, so drift of a shared
    machine lands on one method only (seen here: a BP median of 63.8 ms with
    a minimum of 34.9 ms, ratio 0.485 -- below the FLOP floor).
    """
    disabled = request.config.getoption("benchmark_disable")
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        steps = {"bp": _setup("bp"), "dfa": _setup("dfa")}
        timing = interleaved_step_ms(steps, rounds=1 if disabled else 60, warmup=0 if disabled else 5)
    finally:
        torch.set_num_threads(threads)
    assert set(timing) == {"bp", "dfa"}
    if not disabled:
        record_interleaved(GROUP, timing)
