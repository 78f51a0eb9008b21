"""The cost of a GrAPE step against a DFA step and a BP step (CPU here; the same code on a GPU).

    python -m pytest bench/test_grape_step.py -p no:cacheprovider --fastdfa-record bench/results/grape-step-cpu.json

Whole training steps (zero_grad, forward, cross-entropy, backward, Adam step),
all methods interleaved round after round on the same batch. A GrAPE step is
a DFA step plus one dual-number pass (per-site: the batch once per site,
stacked; shared: the batch once) and one alignment step.
"""

import pytest
import torch
import torch.nn.functional as F

import fastdfa
from fastdfa.lab.steptime import interleaved_step_ms
from fastdfa.models import make_cnn, make_mlp

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
THREADS = 2
SHAPES = {
    "mlp-784x256x3-10": (lambda: make_mlp(784, (256, 256, 256), 10), (1, 28, 28)),
    "cnn-fashion": (lambda: make_cnn((1, 28, 28), 10), (1, 28, 28)),
}
METHODS = {"bp": dict(mode="bp"), "dfa": dict(mode="dfa"), "grape-per-site": dict(mode="grape", jvp="per-site"),
           "grape-shared": dict(mode="grape", jvp="shared")}


def _step(make, input_shape, kwargs, batch=128):
    torch.manual_seed(0)
    model = make().to(DEVICE)
    dfa = fastdfa.DFA(model, seed=0, **kwargs)
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    x = torch.randn(batch, *input_shape, device=DEVICE)
    t = torch.randint(0, 10, (batch,), device=DEVICE)

    def step(_round=None):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(dfa(x), t).backward()
        opt.step()
    return step


@pytest.mark.parametrize("name", list(SHAPES))
def test_grape_step_cost(request, record_interleaved, name):
    disabled = request.config.getoption("benchmark_disable")
    make, input_shape = SHAPES[name]
    threads = torch.get_num_threads()
    if DEVICE.type == "cpu":
        torch.set_num_threads(THREADS)
    try:
        steps = {m: _step(make, input_shape, kw) for m, kw in METHODS.items()}
        timing = interleaved_step_ms(steps, rounds=1 if disabled else 30, warmup=0 if disabled else 3,
                                     device=DEVICE)
    finally:
        torch.set_num_threads(threads)
    assert set(timing) == set(METHODS)
    if not disabled:
        record_interleaved(f"grape-step-{name}-b128-{DEVICE.type}", timing)
