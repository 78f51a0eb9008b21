"""The cuda backend's Python side (fastdfa.backends.cuda_ops) with the csrc/ kernels emulated in torch: its
tables, stacking and splitting equal the references, and the engine gives torch's gradients through it.
The kernels themselves are compiled by tests/test_csrc.py and run against these references on a GPU."""

import copy

import pytest
import torch
import torch.nn.functional as F

import fastdfa
from fastdfa import backends
from fastdfa.backends.cuda_ops import CudaBackend, EmulatedC
from fastdfa.models import make_cnn, make_mlp, make_resnet
from fastdfa.ops.align_step import AlignSite, align_step_reference
from fastdfa.ops.dfa_project import ProjectSite

pytest.importorskip("triton")
from fastdfa.triton_kernels.dfa_project import dfa_project_reference  # noqa: E402
from fastdfa.triton_kernels.dfa_wgrad import dfa_wgrad_reference  # noqa: E402
from fastdfa.triton_kernels.jvp_linear import jvp_linear_reference  # noqa: E402

OPS = CudaBackend(EmulatedC)
TOL = dict(rtol=1e-5, atol=1e-6)


def test_dfa_project_plumbing():
    gen = torch.Generator().manual_seed(0)
    e, f = torch.randn(9, 5, generator=gen), torch.randn(40, 5, generator=gen)
    a1, a2 = torch.randn(9, 16, generator=gen), torch.randn(9, 24, generator=gen)
    sites = [ProjectSite(0, 16, "relu", (a1 > 0).to(torch.uint8)), ProjectSite(16, 24, "tanh", torch.tanh(a2))]
    torch.testing.assert_close(OPS.dfa_project(e, f, sites), dfa_project_reference(e, f, sites), **TOL)


@pytest.mark.parametrize("activation", [None, "relu", "tanh", "sigmoid", "gelu"])
def test_jvp_linear_plumbing(activation):
    gen = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(6, 7, generator=gen), torch.randn(5, 7, generator=gen), torch.randn(5, generator=gen)
    dx = torch.randn(3, 6, 7, generator=gen)
    h, dh, state = OPS.jvp_linear(x, w, b, activation, dx)
    rh, rdh, rstate = jvp_linear_reference(x, w, b, activation, dx)
    torch.testing.assert_close(h, rh, **TOL)
    torch.testing.assert_close(dh, rdh, **TOL)
    if rstate is None:
        assert state is None
    else:
        torch.testing.assert_close(state.float(), rstate.float(), **TOL)


def test_align_step_and_wgrad_plumbing():
    gen = torch.Generator().manual_seed(2)
    fb = torch.randn(30, 4, generator=gen)
    sites = [AlignSite(0, 12, torch.randn(8, 12, generator=gen), torch.randn(8, 4, generator=gen)),
             AlignSite(12, 18, torch.randn(8, 18, generator=gen), torch.randn(8, 4, generator=gen))]
    want, cos_want = align_step_reference(fb, sites, 0.7)
    got = fb.clone()
    cos = OPS.align_step(got, sites, 0.7)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(cos, cos_want.float(), **TOL)
    deltas = [torch.randn(8, 5, generator=gen), torch.randn(8, 3, generator=gen)]
    inputs = [torch.randn(8, 6, generator=gen), torch.randn(8, 5, generator=gen)]
    for (gw, gb), (rw, rb) in zip(OPS.dfa_wgrad(deltas, inputs, [True, False]),
                                  dfa_wgrad_reference(deltas, inputs, [True, False])):
        torch.testing.assert_close(gw, rw, **TOL)
        assert (gb is None) == (rb is None)


@pytest.fixture
def emulated_cuda_backend(monkeypatch):
    """backend="cuda" resolves to CudaBackend(EmulatedC) on the CPU."""
    status = backends.BackendStatus("cuda", True, "emulated for the test")
    real_status, real_get = backends.backend_status, backends.get_backend
    monkeypatch.setattr(backends, "backend_status", lambda name: status if name == "cuda" else real_status(name))
    monkeypatch.setattr(backends, "get_backend", lambda name: OPS if name == "cuda" else real_get(name))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # resolve_backend's non-CUDA-device escape hatch
    import fastdfa.views as views_module  # DFA.using_backend
    monkeypatch.setattr(views_module, "get_backend", backends.get_backend)


@pytest.mark.parametrize("mode", ["dfa", "grape"])
@pytest.mark.parametrize("make", ["mlp", "cnn", "resnet"])
def test_engine_through_the_cuda_ops_equals_torch(emulated_cuda_backend, mode, make):
    torch.manual_seed(0)
    if make == "mlp":
        model, x = make_mlp(10, (12, 9), 4, "tanh"), torch.randn(7, 10)
    elif make == "resnet":  # BN and shortcuts: generic route for every conv
        model, x = make_resnet((1, 6, 6), 4, channels=(2, 3, 4)), torch.randn(7, 1, 6, 6)
    else:
        model, x = make_cnn((1, 8, 8), 4, channels=(3, 4), hidden=6), torch.randn(7, 1, 8, 8)
    t = torch.randint(0, 4, (7,))
    results = {}
    for backend in ("torch", "cuda"):
        m = copy.deepcopy(model)
        dfa = fastdfa.DFA(m, mode=mode, seed=2, backend=backend)
        F.cross_entropy(dfa(x), t).backward()
        results[backend] = ([p.grad for p in m.parameters()], dfa.feedback.flat.clone(), dfa.fused_layers)
        assert dfa.backend == backend
    (g0, f0, fused0), (g1, f1, fused1) = results["torch"], results["cuda"]
    for a, b in zip(g1, g0):
        assert ((a - b).norm() / b.norm()) < 1e-4
    assert ((f1 - f0).norm() / f0.norm()) < 1e-4
    assert fused0 == [] and fused1  # the cuda route claimed layers


def test_fan_out_keeps_order_and_runs_everything_on_cpu():
    from fastdfa.backends.streams import fan_out
    calls = []
    out = fan_out([lambda i=i: calls.append(i) or i * i for i in range(5)], 3, device=torch.device("cpu"))
    assert out == [0, 1, 4, 9, 16] and calls == [0, 1, 2, 3, 4]


class _RecordingStreams:
    """Stand-ins for torch.cuda's stream API that log every call, so fan_out's synchronisation protocol
    can be checked on the CPU: which stream waits for which, when, and which tensors are recorded where."""

    def __init__(self):
        self.log = []
        self.main = self.Stream(self, "main")
        self.current = self.main

    class Stream:
        def __init__(self, owner, name=None, device=None):
            self.owner, self.name = owner, name or f"side{sum(1 for e in owner.log if e[0] == 'new')}"
            owner.log.append(("new", self.name))

        def wait_stream(self, other):
            self.owner.log.append(("wait", self.name, other.name))

    def install(self, monkeypatch):
        import contextlib

        import fastdfa.backends.streams as streams_module

        @contextlib.contextmanager
        def stream(s):
            before, self.current = self.current, s
            try:
                yield
            finally:
                self.current = before

        monkeypatch.setattr(streams_module, "_POOLS", {})
        monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: self.Stream(self, device=device))
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: self.current)
        monkeypatch.setattr(torch.cuda, "stream", stream)
        monkeypatch.setattr(torch.Tensor, "record_stream",
                            lambda t, s: self.log.append(("record", id(t), s.name)), raising=False)


def test_fan_out_protocol_orders_the_streams(monkeypatch):
    """On a GPU, fan_out must: make each side stream wait for the caller's stream before its task runs
    there; record every input on each side stream that reads it; record each result on the caller's
    stream; make the caller's stream wait for every side stream used, after the last task; return the
    results in task order, round-robin over the pool. Checked here with logging stand-ins."""
    from fastdfa.backends.streams import fan_out

    rec = _RecordingStreams()
    rec.install(monkeypatch)
    inputs = [torch.ones(2), torch.zeros(3)]
    outputs = [torch.full((1,), float(i)) for i in range(5)]

    def task(i):
        rec.log.append(("run", i, rec.current.name))
        return outputs[i]

    got = fan_out([lambda i=i: task(i) for i in range(5)], 3, device=torch.device("cuda"), inputs=inputs)
    assert got == outputs
    log = [e for e in rec.log if e[0] != "new"]
    runs = [(k, e) for k, e in enumerate(log) if e[0] == "run"]
    sides = [e[2] for _, e in runs]
    assert sides == ["side1", "side2", "side3", "side1", "side2"]  # round robin, never the caller's stream
    for k, (_, i, side) in runs:
        before = log[:k]
        last_wait = max(j for j, e in enumerate(before) if e == ("wait", side, "main"))
        # the side waited for main after any earlier task on it, and its inputs were recorded there since
        assert all(not (e[0] == "run" and e[2] == side) for e in before[last_wait:])
        assert {("record", id(t), side) for t in inputs} <= set(before[last_wait:])
        assert log[k + 1] == ("record", id(outputs[i]), "main")
    last_run = runs[-1][0]
    assert [e for e in log[last_run:] if e[0] == "wait"] == [("wait", "main", s) for s in ("side1", "side2", "side3")]
    assert rec.current is rec.main


def test_fan_out_protocol_uses_only_as_many_streams_as_tasks(monkeypatch):
    from fastdfa.backends.streams import fan_out

    rec = _RecordingStreams()
    rec.install(monkeypatch)
    fan_out([lambda: torch.ones(1), lambda: torch.zeros(1)], 8, device=torch.device("cuda"))
    assert [e for e in rec.log if e[0] == "wait" and e[1] == "main"] == [("wait", "main", "side1"),
                                                                         ("wait", "main", "side2")]


@pytest.mark.gpu
def test_fan_out_on_cuda_streams_equals_sequential():
    from fastdfa.backends.streams import fan_out
    dev = torch.device("cuda")
    deltas = [torch.randn(256, 512, device=dev) for _ in range(6)]
    inputs = [torch.randn(256, 384, device=dev) for _ in range(6)]
    tasks = [lambda i=i: deltas[i].t() @ inputs[i] for i in range(6)]
    got = fan_out(tasks, 4, device=dev, inputs=deltas + inputs)
    torch.cuda.synchronize()
    for g, d, x in zip(got, deltas, inputs):
        torch.testing.assert_close(g, d.t() @ x)


@pytest.mark.parametrize("streams,env,want", [(None, None, 4), (None, "2", 2), (8, "2", 8), (1, None, 1)])
def test_the_engine_s_stream_count_reaches_the_fan_out(emulated_cuda_backend, monkeypatch, streams, env, want):
    """DFA(streams=N) (else FASTDFA_STREAMS, else 4) is the pool size of the weight-gradient fan-out."""
    import fastdfa.backends.streams as streams_module

    if env is None:
        monkeypatch.delenv("FASTDFA_STREAMS", raising=False)
    else:
        monkeypatch.setenv("FASTDFA_STREAMS", env)
    sizes = []
    real = streams_module.fan_out
    monkeypatch.setattr(streams_module, "fan_out",
                        lambda tasks, size, **kw: sizes.append(size) or real(tasks, size, **kw))
    torch.manual_seed(0)
    dfa = fastdfa.DFA(make_mlp(10, (12, 9), 4, "relu"), seed=2, backend="cuda", streams=streams)
    F.cross_entropy(dfa(torch.randn(7, 10)), torch.randint(0, 4, (7,))).backward()
    assert sizes == [want]


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_a_bad_stream_count_is_refused(bad):
    with pytest.raises(ValueError, match="streams"):
        fastdfa.DFA(make_mlp(10, (12,), 4), streams=bad)


def test_a_bad_fastdfa_streams_is_refused(monkeypatch):
    monkeypatch.setenv("FASTDFA_STREAMS", "many")
    with pytest.raises(ValueError, match="FASTDFA_STREAMS"):
        fastdfa.DFA(make_mlp(10, (12,), 4))


def test_a_deep_copied_engine_still_fuses(emulated_cuda_backend):
    """The fusable layers are the copy's own modules after copy.deepcopy (they were looked up by id())."""
    torch.manual_seed(0)
    dfa = fastdfa.DFA(make_mlp(10, (12, 9), 4, "relu"), seed=2, backend="cuda")
    twin = copy.deepcopy(dfa)
    x, t = torch.randn(7, 10), torch.randint(0, 4, (7,))
    for engine in (dfa, twin):
        F.cross_entropy(engine(x), t).backward()
    assert twin.fused_layers == dfa.fused_layers and dfa.fused_layers
