"""Whole training steps of the Jane Austen character LM: BP, DFA and GrAPE, interleaved, beside each
method's FLOP floor (issue "Transformers", item 6).

The model is the table's (``fastdfa.models.make_transformer_lm``: vocabulary 82, context 64, d_model
128, 2 pre-LayerNorm blocks, 4 heads, MLP ratio 4), batch 128 windows (8,192 tokens), Adam, float32,
sites at blocks (DFA between blocks, BP inside them) and at layers (DFA at every attention and MLP
sub-layer). A step is zero_grad, forward, cross-entropy over every token, backward and the optimizer
step. BP is the same model run plainly (no wrapper: ``fastdfa.Linear`` is ``F.linear`` then), with
the same initial weights. The methods alternate round after round (``interleaved_step_ms``).

FLOP floor: the step's floating-point operations counted by ``torch.utils.flop_counter.FlopCounterMode``
(matmuls, attention; forward, backward and, for GrAPE, the forward-mode dual pass), over BP's. It is
what the time ratio would be if every FLOP cost the same; on this model DFA at blocks saves only the
input gradient of each block's first layers, so its floor is close to 1, and the measured ratio shows
the per-step overhead beside it.

    python -m pytest bench/test_lm_step.py -q -p no:cacheprovider --fastdfa-record bench/results/lm-step-cpu.json
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import fastdfa
import fastdfa.models
from fastdfa.lab.steptime import interleaved_step_ms
from fastdfa.models import make_transformer_lm

THREADS, VOCAB, CONTEXT, BATCH, ROUNDS = 2, 82, 64, 128, 15


def _steps(kind: str, batch: int = BATCH, d_model: int = 128):
    torch.manual_seed(0)
    model = make_transformer_lm(VOCAB, CONTEXT, d_model=d_model)
    x = torch.randint(0, VOCAB, (batch, CONTEXT))
    t = torch.randint(0, VOCAB, (batch, CONTEXT))
    models = {"bp": copy.deepcopy(model)}
    for mode in ("dfa", "grape"):
        m = copy.deepcopy(model)
        models[mode] = fastdfa.DFA(m, mode=mode, seed=0, sites=m.sites(kind), batch_dims=2, backend="torch")

    def step_of(net, lr):
        opt = torch.optim.Adam(net.parameters(), lr=lr)

        def step(_round=None):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x).flatten(0, 1), t.flatten()).backward()
            opt.step()
        return step

    return {name: step_of(net, 1e-3 if name == "bp" else 3e-4) for name, net in models.items()}


def step_flops(steps) -> dict[str, int]:
    """FLOPs of one step of each method (after one untimed step: GrAPE's first forward builds)."""
    out = {}
    for name, step in steps.items():
        step()
        counter = FlopCounterMode(display=False)
        with counter:
            step()
        out[name] = counter.get_total_flops()
    return out


def test_flop_counts_are_the_rules_matmuls():
    """The floor is counted, not assumed: on an MLP the counter gives exactly the MACs the rules do
    (x2), DFA = forward + weight gradients + the projection, BP = forward + weight gradients + the
    input gradients above the first layer (bench/test_mlp_step.py's floor); GrAPE adds its dual pass."""
    torch.manual_seed(0)
    widths, batch, n_in, n_out = (16, 12), 8, 20, 5
    model = fastdfa.models.make_mlp(n_in, widths, n_out, "relu")
    x, t = torch.randn(batch, n_in), torch.randint(0, n_out, (batch,))
    nets = {"bp": copy.deepcopy(model), "dfa": fastdfa.DFA(copy.deepcopy(model), seed=0),
            "grape": fastdfa.DFA(copy.deepcopy(model), mode="grape", seed=0)}

    def step_of(net):
        def step():
            F.cross_entropy(net(x), t).backward()
        return step

    flops = step_flops({name: step_of(net) for name, net in nets.items()})
    dims = (n_in, *widths, n_out)
    forward = sum(a * b for a, b in zip(dims, dims[1:]))
    input_grads = sum(a * b for a, b in zip(dims[1:], dims[2:]))
    projection = sum(widths) * n_out
    assert flops["bp"] == 2 * batch * (2 * forward + input_grads)
    assert flops["dfa"] == 2 * batch * (2 * forward + projection)
    assert flops["grape"] > flops["dfa"]


@pytest.mark.parametrize("kind", ["blocks", "layers"])
def test_lm_step_interleaved(request, record_interleaved, record_flops, kind):
    disabled = request.config.getoption("benchmark_disable")
    group = f"lm-step-austen-d128x2-t64-b{BATCH}-{kind}"
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        steps = _steps(kind, batch=4 if disabled else BATCH)
        flops = step_flops(steps)
        timing = interleaved_step_ms(steps, rounds=1 if disabled else ROUNDS, warmup=0 if disabled else 2)
    finally:
        torch.set_num_threads(threads)
    assert set(timing) == {"bp", "dfa", "grape"} and set(flops) == set(timing)
    if not disabled:
        record_interleaved(group, timing)
        record_flops(group, flops)
