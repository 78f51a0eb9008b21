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
from fastdfa.models import make_mlp

WIDTHS = (1024, 1024, 1024, 1024)
BATCH, IN, OUT, THREADS = 256, 784, 10, 2


def _setup(method):
    torch.manual_seed(0)
    dfa = fastdfa.DFA(make_mlp(IN, WIDTHS, OUT), mode=method, seed=0)
    opt = torch.optim.SGD(dfa.parameters(), lr=1e-3)
    x, t = torch.randn(BATCH, IN), torch.randint(0, OUT, (BATCH,))

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(dfa(x), t).backward()
        opt.step()

    return step


@pytest.mark.parametrize("method", ["bp", "dfa"])
def test_core_mlp_step(benchmark, record_step, method):
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        step = _setup(method)
        benchmark.group = "core-mlp-784x1024x4-b256-fp32"
        benchmark.extra_info.update(method=method, threads=THREADS, batch=BATCH, widths=WIDTHS)
        benchmark.pedantic(step, rounds=40, iterations=1, warmup_rounds=5)
        record_step(benchmark.group, method, benchmark)
    finally:
        torch.set_num_threads(threads)
