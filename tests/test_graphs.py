"""fastdfa.CapturedStep: whole training steps captured in a CUDA graph and replayed.

On the CPU the graph itself is replaced by a stand-in that re-runs the
recorded step at each replay, so what ``CapturedStep`` adds around the graph
is tested here: the warm-up is undone (weights, feedback, optimizer state,
RNG), the batch goes through the static inputs, one graph per input
signature, recapture when a hyperparameter a replay cannot see changes, and
the errors. The real capture is tested on a GPU (marked ``gpu``).
"""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

import fastdfa
from fastdfa.graphs import CapturedStep
from fastdfa.models import make_cnn, make_mlp
from fastdfa.triton_kernels._tables import TableCache


class EagerGraphs:
    """CPU stand-in for torch.cuda.CUDAGraph: capture records the step without running it, replay
    re-runs it with the gradients written, not accumulated (what a graph captured with None
    gradients does)."""

    def __init__(self, module):
        self.params = list(module.parameters())
        self.replays = 0

    def side_stream(self, device):
        return contextlib.nullcontext(), None

    def join(self, device, stream):
        pass

    def capture(self, step, generators):
        return {"step": step}, torch.zeros(())

    def replay(self, graph):
        for p in self.params:
            p.grad = None
        graph["loss"] = graph["step"]()
        self.replays += 1


class StandIn(CapturedStep):
    def __init__(self, module, optimizer, **kwargs):
        super().__init__(module, optimizer, **kwargs)
        self._graphs_impl = EagerGraphs(module)

    def __call__(self, x, target):
        super().__call__(x, target)
        key = (tuple(x.shape), x.dtype, tuple(target.shape), target.dtype)
        return self._graphs[key].graph.get("loss")  # the stand-in's replay writes a new loss tensor


def _net(mode, kind="mlp"):
    torch.manual_seed(0)
    model = make_mlp(64, (32, 16), 10, "tanh") if kind == "mlp" else make_cnn((1, 8, 8), 10, (4, 8), 16)
    return fastdfa.DFA(model, mode=mode, seed=3)


def _batches(n=4, batch=8):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(batch, 1, 8, 8, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(n)]


def _eager(dfa, opt, batches):
    losses = []
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(dfa(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses


@pytest.mark.parametrize("mode,kind", [("dfa", "mlp"), ("grape", "mlp"), ("dfa", "cnn"), ("grape", "cnn"),
                                       ("bp", "mlp")])
def test_replayed_steps_equal_eager_steps(mode, kind):
    """N calls give the losses, weights, feedback and optimizer state of N eager steps: the warm-up
    (3 steps on the first batch) left no trace."""
    a = _net(mode, kind)
    b = copy.deepcopy(a)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)
    batches = _batches()
    want = _eager(a, opt_a, batches)
    step = StandIn(b, opt_b, warmup=3)
    got = [step(x, y) for x, y in batches]
    assert step.captures == 1 and step._graphs_impl.replays == len(batches)
    torch.testing.assert_close(torch.stack(got), torch.stack(want), rtol=0, atol=0)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        if isinstance(pa, torch.Tensor):
            torch.testing.assert_close(pb, pa, rtol=0, atol=0, msg=name)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(opt_b.state[pb]["momentum_buffer"], opt_a.state[pa]["momentum_buffer"],
                                   rtol=0, atol=0)


def test_warmup_is_undone_before_the_first_replay():
    """Weights, feedback and GrAPE's generator are as before the first call, until the replay."""
    dfa = _net("grape")
    x, y = _batches(1)[0]
    dfa.build(x)
    gen_before = dfa.perturbations.generator(x.device).get_state()  # first: the stream is in the state_dict
    before = {k: v.clone() for k, v in dfa.state_dict().items() if isinstance(v, torch.Tensor)}
    opt = torch.optim.SGD(dfa.parameters(), lr=0.1, momentum=0.9)
    step = StandIn(dfa, opt, warmup=5)
    step._graphs_impl.replay = lambda graph: None  # capture (after the undone warm-up) but do not replay
    step(x, y)
    for k, v in dfa.state_dict().items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    assert torch.equal(dfa.perturbations.generator(x.device).get_state(), gen_before)
    assert all(not s["momentum_buffer"].any() for s in opt.state.values())  # created by the warm-up: fresh


def test_one_graph_per_input_signature_and_a_limit():
    dfa = _net("dfa")
    opt = torch.optim.SGD(dfa.parameters(), lr=0.01)
    step = StandIn(dfa, opt, max_graphs=2)
    x, y = _batches(1, batch=8)[0]
    step(x, y)
    step(x[:5], y[:5])  # the last partial batch: a second graph
    step(x, y)
    assert step.captures == 2 and len(step.signatures) == 2
    weights = [p.detach().clone() for p in dfa.parameters()]
    with pytest.raises(ValueError, match="max_graphs=2"):
        step(x[:3], y[:3])
    assert all(torch.equal(p, w) for p, w in zip(dfa.parameters(), weights))  # untouched by the refusal


def test_a_changed_hyperparameter_recaptures():
    """lr as a Python float and the DFA mode are baked into a graph: changing them captures again,
    and the replayed step uses the new value."""
    a = _net("dfa")
    b = copy.deepcopy(a)
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.05), torch.optim.SGD(b.parameters(), lr=0.05)
    batches = _batches(3)
    step = StandIn(b, opt_b)
    _eager(a, opt_a, batches[:1])
    step(*batches[0])
    for g in (opt_a.param_groups[0], opt_b.param_groups[0]):
        g["lr"] = 0.01
    _eager(a, opt_a, batches[1:2])
    step(*batches[1])
    assert step.captures == 2
    with fastdfa.backprop(a), fastdfa.backprop(b):
        _eager(a, opt_a, batches[2:])
        step(*batches[2])
    assert step.captures == 3
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=0, atol=0)


def test_bad_input_is_refused():
    dfa = _net("dfa")
    with pytest.raises(ValueError, match="capturable=True"):
        CapturedStep(dfa, torch.optim.Adam(dfa.parameters()))
    with pytest.raises(ValueError, match="warmup"):
        CapturedStep(dfa, torch.optim.SGD(dfa.parameters(), lr=0.1), warmup=0)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        CapturedStep(dfa, "adam")
    step = StandIn(dfa, torch.optim.SGD(dfa.parameters(), lr=0.1))
    x, y = _batches(1)[0]
    with pytest.raises(ValueError, match="meta"):
        step(x.to("meta"), y)
    with pytest.raises(TypeError, match="tensors"):
        step(x, [0] * 8)


def test_ddp_is_refused():
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not built")
    from torch.nn.parallel import DistributedDataParallel

    fake = DistributedDataParallel.__new__(DistributedDataParallel)  # no process group needed to refuse it
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        CapturedStep(fake, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))


def test_table_cache_pins_what_a_capture_used(monkeypatch):
    """Entries used during a capture are never evicted (the graph reads them at every replay)."""
    from fastdfa.triton_kernels import _tables

    cache = TableCache(maxsize=2)
    cpu = torch.device("cpu")
    cache.get("warm", lambda: [[1]], torch.int64, cpu)
    monkeypatch.setattr(_tables, "stream_capturing", lambda device: True)
    hit = cache.get("warm", lambda: [[9]], torch.int64, cpu)
    built = cache.get("new", lambda: [[2]], torch.int64, cpu)
    monkeypatch.setattr(_tables, "stream_capturing", lambda device: False)
    for i in range(5):  # churn well past maxsize
        cache.get(("other", i), lambda: [[3]], torch.int64, cpu)
    cache.clear()
    assert cache.get("warm", lambda: [[7]], torch.int64, cpu) is hit
    assert cache.get("new", lambda: [[7]], torch.int64, cpu) is built
    assert cache.builds == 7


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("mode", ["dfa", "grape", "bp"])
def test_cuda_graph_replay_equals_eager(backend, mode):
    """The real capture: replayed steps track eager steps (Adam, capturable) to fp32 rounding."""
    from fastdfa.backends import backend_status

    if not backend_status(backend).available:
        pytest.skip(f"{backend}: {backend_status(backend).reason}")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = make_mlp(784, (512, 512, 512), 10, "relu").to(dev)
    a = fastdfa.DFA(model, mode=mode if mode != "bp" else "dfa", seed=3, backend=backend)
    b = copy.deepcopy(a)
    opt_a = torch.optim.Adam(a.parameters(), lr=1e-3, capturable=True)
    opt_b = torch.optim.Adam(b.parameters(), lr=1e-3, capturable=True)
    g = torch.Generator(device=dev).manual_seed(1)
    batches = [(torch.randn(256, 1, 28, 28, device=dev, generator=g),
                torch.randint(0, 10, (256,), device=dev, generator=g)) for _ in range(5)]
    ctx = fastdfa.backprop if mode == "bp" else (lambda d: contextlib.nullcontext())
    # GrAPE on triton: align_step's column sums take the deterministic path (no fp32 atomics, whose
    # order changes from run to run and moved the losses by 1e-4 on the second GPU run)
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with ctx(a), ctx(b):
            want = _eager(a, opt_a, batches)
            step = CapturedStep(b, opt_b)
            got = [step(x, y) for x, y in batches]
        torch.cuda.synchronize()
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
    torch.testing.assert_close(torch.stack(got), torch.stack(want), rtol=1e-4, atol=1e-5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-3, atol=1e-5)


def test_train_cuda_graph_needs_a_cuda_device(capsys):
    from fastdfa.lab.cli import main

    assert main(["train", "--data", "digits", "--epochs", "1", "--cuda-graph", "--no-progress", "--device", "cpu"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


@pytest.mark.gpu
def test_train_with_cuda_graph_learns_like_eager():
    """The CLI's --cuda-graph: digits, DFA, 20 epochs (0.958 eager on the CPU), the same accuracy as eager
    within noise."""
    from fastdfa.lab.data import load_dataset
    from fastdfa.lab.train import TrainConfig, train

    data = load_dataset("digits")
    acc = {}
    for graph in (False, True):
        config = TrainConfig(method="dfa", epochs=20, device="cuda", seed=0, cuda_graph=graph)
        acc[graph] = train(config, data, progress=False, log=None).test_accuracy
    assert acc[True] > 0.85 and abs(acc[True] - acc[False]) < 0.03
