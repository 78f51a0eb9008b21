"""Hostile uses (issue "Reliability"): each gets the rule's gradients (float64 formulas) or a clear
error before anything changes. Never a silent change of rule."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdfa
from fastdfa.backends.cuda_ops import CudaBackend, EmulatedC
from fastdfa.models import make_mlp

DT = torch.float64


def _wrap(model, backend, **kw):
    """A wrapper on ``backend``: "torch", "triton" (interpreter on a CPU) or "cuda-emulated" (the cuda
    backend's ops with the csrc kernels emulated in torch)."""
    if backend == "cuda-emulated":
        dfa = fastdfa.DFA(model, backend="torch", **kw)
        dfa.kernels = CudaBackend(EmulatedC)
        return dfa
    if backend == "triton":
        pytest.importorskip("triton")
        if torch.cuda.is_available():
            pytest.skip("the Triton interpreter on CPU tensors; on a GPU, compiled Triton is covered by the kernel "
                    "and engine tests (tests/test_triton_engine.py)")
    return fastdfa.DFA(model, backend=backend, **kw)


def _grads(module):
    return [None if p.grad is None else p.grad.clone() for p in module.parameters()]


# ------------------------------------------------------------------ a second backward through one graph
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda-emulated"])
@pytest.mark.parametrize("mode", ["dfa", "grape"])
def test_second_backward_through_one_graph(backend, mode):
    torch.manual_seed(0)
    dtype = DT if backend == "torch" else torch.float32
    model = make_mlp(6, (5, 5), 3, "tanh").to(dtype)
    dfa = _wrap(model, backend, mode=mode, seed=1)
    x, t = torch.randn(4, 6, dtype=dtype), torch.randint(0, 3, (4,))
    loss = F.cross_entropy(dfa(x), t)
    loss.backward(retain_graph=True)
    once = _grads(dfa)
    feedback = dfa.feedback.flat.clone()
    grads = torch.autograd.grad(loss, list(dfa.parameters()), retain_graph=True)
    for g, o in zip(grads, once):
        torch.testing.assert_close(g, o)
    loss.backward()
    for p, o in zip(dfa.parameters(), once):
        torch.testing.assert_close(p.grad, 2 * o)
    # GrAPE's alignment step belongs to the forward: the feedback moved once, in the first backward
    assert torch.equal(dfa.feedback.flat, feedback)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


# ------------------------------------------------------------------ the model changed after wrapping
@pytest.mark.parametrize("built", [False, True])
def test_a_layer_replaced_after_wrapping_is_refused(built):
    model = make_mlp(6, (5, 5), 3).to(DT)
    dfa = fastdfa.DFA(model)
    x = torch.randn(2, 6, dtype=DT)
    if built:
        dfa(x)
    model[2] = fastdfa.Linear(5, 5, dtype=DT)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="changed after wrapping"):
        dfa(x)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_a_layer_added_after_wrapping_is_refused_in_every_mode():
    model = make_mlp(6, (5,), 3).to(DT)
    dfa = fastdfa.DFA(model)
    model.append(fastdfa.Linear(3, 3, dtype=DT))
    for mode in ("dfa", "fa", "grape"):
        dfa.mode = mode
        with pytest.raises(RuntimeError, match="changed after wrapping"):
            dfa(torch.randn(2, 6, dtype=DT))


def test_two_wrappers_of_one_model_keep_their_own_rule():
    """Wrapping a model a second time does not turn the first wrapper's FA into BP."""
    torch.manual_seed(0)
    model = make_mlp(6, (5, 4), 3, "tanh").to(DT)
    reference = fastdfa.DFA(copy.deepcopy(model), mode="fa", seed=3)
    fa = fastdfa.DFA(model, mode="fa", seed=3)
    fastdfa.DFA(model, mode="bp", seed=3)  # the second wrapper
    x, t = torch.randn(4, 6, dtype=DT), torch.randint(0, 3, (4,))
    F.cross_entropy(reference(x), t).backward()
    F.cross_entropy(fa(x), t).backward()
    for a, b in zip(fa.parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    bp = copy.deepcopy(model)
    F.cross_entropy(bp(x), t).backward()
    assert not torch.allclose(model[1].weight.grad, bp[1].weight.grad)  # FA's first layer is not BP's


# ------------------------------------------------------------------ checkpoints
def test_grape_resumes_bit_for_bit():
    """The perturbations' generator is in the state_dict: a GrAPE run resumed from a checkpoint takes
    the steps the uninterrupted run takes."""
    torch.manual_seed(0)
    x, t = torch.randn(8, 6), torch.randint(0, 3, (8,))

    def setup(seed):
        torch.manual_seed(seed)
        dfa = fastdfa.DFA(make_mlp(6, (5, 5), 3), mode="grape", seed=seed)
        return dfa, torch.optim.SGD(dfa.parameters(), lr=0.1)

    def step(dfa, opt):
        opt.zero_grad()
        F.cross_entropy(dfa(x), t).backward()
        opt.step()

    dfa, opt = setup(0)
    step(dfa, opt)
    buf = io.BytesIO()
    torch.save({"dfa": dfa.state_dict(), "opt": opt.state_dict()}, buf)
    step(dfa, opt)
    step(dfa, opt)
    other, other_opt = setup(7)
    buf.seek(0)
    state = torch.load(buf, weights_only=False)
    other.load_state_dict(state["dfa"])
    other_opt.load_state_dict(state["opt"])
    step(other, other_opt)
    step(other, other_opt)
    for a, b in zip(other.parameters(), dfa.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(other.feedback.flat, dfa.feedback.flat)


@pytest.mark.parametrize("built", [False, True])
def test_a_load_that_fails_writes_nothing_and_a_corrected_load_works(built):
    source = fastdfa.DFA(make_mlp(6, (5, 5), 3), seed=1)
    source(torch.randn(2, 6))
    good = source.state_dict()
    bad = dict(good)
    bad["model.2.weight"] = torch.zeros(4, 5)  # the wrong shape, after keys that fit
    bad["feedback.0"] = torch.zeros(3, 3)
    target = fastdfa.DFA(make_mlp(6, (5, 5), 3), seed=2)
    if built:
        target(torch.randn(2, 6))
    before = {k: v.clone() for k, v in target.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(RuntimeError, match="nothing was loaded"):
        target.load_state_dict(bad)
    after = target.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    target.load_state_dict(good)  # the corrected load
    out = target(torch.randn(2, 6))
    out.sum().backward()
    for a, b in zip(target.sites, source.sites):
        assert torch.equal(a.feedback, b.feedback)


# ------------------------------------------------------------------ batch_dims against the output
class _Tokens(nn.Module):
    """[B, T, H] tokens through two fastdfa layers, then a head whose output is ``out_shape``."""

    def __init__(self, pooled: bool, classes: int):
        super().__init__()
        self.a, self.b = fastdfa.Linear(4, 4, dtype=DT), fastdfa.Linear(4, classes, dtype=DT)
        self.pooled = pooled

    def forward(self, x):
        h = self.b(self.a(x))
        return h.mean(1) if self.pooled else h


@pytest.mark.parametrize("classes", [3, 5])  # 3 == the token count: silently misread before
def test_a_per_sample_output_with_batch_dims_2_is_refused(classes):
    dfa = fastdfa.DFA(_Tokens(pooled=True, classes=classes), batch_dims=2)
    with pytest.raises(ValueError, match="batch_dims"):
        dfa(torch.randn(2, 3, 4, dtype=DT))


def test_batch_dims_2_with_a_per_token_output_trains():
    dfa = fastdfa.DFA(_Tokens(pooled=False, classes=5), batch_dims=2)
    dfa(torch.randn(2, 3, 4, dtype=DT)).sum().backward()
    assert all(p.grad is not None for p in dfa.parameters())


# ------------------------------------------------------------------ the NaN policy in every mode
@pytest.mark.parametrize("mode", ["fa", "bp", "dfa"])
def test_nonfinite_raise_holds_in_every_mode(mode):
    dfa = fastdfa.DFA(make_mlp(6, (5,), 3).to(DT), mode=mode)
    out = dfa(torch.randn(2, 6, dtype=DT))
    with pytest.raises(fastdfa.NonFiniteErrorSignal):
        (out * float("nan")).sum().backward()
    assert all(p.grad is None for p in dfa.parameters())


@pytest.mark.parametrize("mode", ["fa", "bp", "dfa"])
def test_nonfinite_skip_leaves_weights_alone_under_momentum(mode):
    """A skipped step moves no weight, even with zero_grad(set_to_none=False) and SGD momentum."""
    torch.manual_seed(0)
    dfa = fastdfa.DFA(make_mlp(6, (5,), 3).to(DT), mode=mode, nonfinite="skip")
    opt = torch.optim.SGD(dfa.parameters(), lr=0.1, momentum=0.9)
    x, t = torch.randn(4, 6, dtype=DT), torch.randint(0, 3, (4,))
    F.cross_entropy(dfa(x), t).backward()
    opt.step()  # momentum buffers now hold a velocity
    opt.zero_grad(set_to_none=False)
    before = [p.detach().clone() for p in dfa.parameters()]
    (dfa(x) * float("inf")).sum().backward()
    opt.step()
    assert dfa.skipped_steps == 1
    for a, b in zip(dfa.parameters(), before):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ refused forwards change nothing
def test_a_refused_forward_leaves_batchnorm_statistics_and_the_rng():
    """An image of the wrong size passes the conv and BatchNorm, then is refused at the head's site:
    the running statistics and the RNG (dropout) are as before the call."""
    model = nn.Sequential(fastdfa.Conv2d(1, 2, 3, padding=1, dtype=DT), nn.BatchNorm2d(2, dtype=DT),
                          nn.Dropout(0.5), nn.Flatten(), fastdfa.Linear(2 * 4 * 4, 3, dtype=DT))
    dfa = fastdfa.DFA(model)
    dfa(torch.randn(4, 1, 4, 4, dtype=DT))
    bn = model[1]
    stats = [b.clone() for b in bn.buffers()]
    wrong = torch.randn(4, 1, 5, 5, dtype=DT)
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match="per-sample shape"):
        dfa(wrong)
    assert all(torch.equal(a, b) for a, b in zip(bn.buffers(), stats))
    assert torch.equal(torch.get_rng_state(), rng)
    dfa(torch.randn(4, 1, 4, 4, dtype=DT))  # a good batch still trains and moves the statistics
    assert not torch.equal(bn.running_mean, stats[0])


# ------------------------------------------------------------------ small ones
def test_an_empty_batch_after_the_build_gives_zero_gradients():
    dfa = fastdfa.DFA(make_mlp(6, (5, 4), 3).to(DT))
    dfa(torch.randn(2, 6, dtype=DT))
    out = dfa(torch.zeros(0, 6, dtype=DT))
    F.mse_loss(out, torch.zeros(0, 3, dtype=DT), reduction="sum").backward()
    for p in dfa.parameters():
        assert p.grad is not None and not p.grad.any()


@pytest.mark.parametrize("flatten", [False, True])
def test_an_unbatched_input_is_told_to_add_a_batch_dim(flatten):
    layers = [fastdfa.Linear(6, 5, dtype=DT), nn.ReLU(), fastdfa.Linear(5, 3, dtype=DT)]
    dfa = fastdfa.DFA(nn.Sequential(*([nn.Flatten()] if flatten else []), *layers))
    dfa(torch.randn(2, 6, dtype=DT))
    with pytest.raises(ValueError, match="unsqueeze"):
        dfa(torch.randn(6, dtype=DT))


def test_the_cli_refuses_bad_devices_threads_and_single_class_tasks(capsys):
    from fastdfa.lab.cli import main

    if not torch.cuda.is_available():
        assert main(["train", "--data", "digits", "--device", "cuda", "--epochs", "1", "--no-progress"]) == 2
        assert "use --device cpu" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--data", "digits", "--threads", "0"])
    assert "at least 1" in capsys.readouterr().err
    assert main(["train", "--data", "digits:7", "--epochs", "1", "--no-progress"]) == 2
    assert "at least two" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only refusal")
def test_captured_step_without_a_gpu_says_so():
    dfa = fastdfa.DFA(make_mlp(6, (5,), 3))
    step = fastdfa.CapturedStep(dfa, torch.optim.SGD(dfa.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        step(torch.randn(2, 6), torch.randint(0, 3, (2,)))


@pytest.mark.parametrize("built", [False, True])
def test_a_site_module_replaced_after_wrapping_is_refused(built):
    """A module named in sites= swapped for a new one: the new one carries no site hook, so its input
    would not be cut and BP would silently flow into it. Refused, naming the site, nothing changed."""
    torch.manual_seed(0)
    model = nn.Sequential(fastdfa.Linear(6, 5, dtype=DT), nn.Sequential(nn.Linear(5, 5, dtype=DT), nn.Tanh()),
                          fastdfa.Linear(5, 3, dtype=DT))
    dfa = fastdfa.DFA(model, sites=[model[1]])
    x = torch.randn(2, 6, dtype=DT)
    if built:
        dfa(x)
    model[1] = nn.Sequential(nn.Linear(5, 5, dtype=DT), nn.Tanh())
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"changed after wrapping.*|'1'"):
        F.cross_entropy(dfa(x), torch.zeros(2, dtype=torch.long)).backward()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
