"""Bad input gets a clear error and leaves the model and its weights untouched."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdfa
from fastdfa.models import make_mlp


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


def _assert_untouched(module, snap):
    now = module.state_dict()
    for k, v in snap.items():
        assert torch.equal(now[k], v), k
    assert all(p.grad is None for p in module.parameters())


def test_model_without_fastdfa_layer():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="no fastdfa layer"):
        fastdfa.DFA(model)
    _assert_untouched(model, snap)
    assert not model[0]._forward_pre_hooks  # no hook left behind


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="backprop"), "mode must be one of"),
    (dict(feedback="normal"), "feedback must be one of"),
    (dict(conv_feedback="sparse"), "conv_feedback must be one of"),
    (dict(nonfinite="warn"), "nonfinite must be one of"),
    (dict(batch_dims=0), "batch_dims"),
    (dict(feedback_scale=float("nan")), "feedback_scale"),
    (dict(sites=[nn.Linear(2, 2)]), "not a submodule"),
])
def test_bad_arguments(kwargs, match):
    model = make_mlp(5, (4,), 3)
    snap = _snapshot(model)
    with pytest.raises((ValueError, TypeError), match=match):
        fastdfa.DFA(model, **kwargs)
    _assert_untouched(model, snap)


def test_nested_user_sites_are_rejected():
    inner = nn.Linear(4, 4)
    outer = nn.Sequential(inner, nn.ReLU())
    model = nn.Sequential(fastdfa.Linear(3, 4), outer, fastdfa.Linear(4, 2))
    with pytest.raises(ValueError, match="inside site"):
        fastdfa.DFA(model, sites=[outer, inner])


def test_output_shape_change_after_build():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = make_mlp(5, (4,), 6)
            self.n = 6

        def forward(self, x):
            return self.body(x)[:, :self.n]

    model = Head()
    dfa = fastdfa.DFA(model, example_input=torch.randn(2, 5))
    snap = _snapshot(dfa)
    model.n = 3
    with pytest.raises(ValueError, match="output changed"):
        dfa(torch.randn(2, 5))
    _assert_untouched(dfa, snap)


def test_site_shape_change_after_build():
    model = nn.Sequential(fastdfa.Conv2d(1, 2, 3, padding=1), fastdfa.Conv2d(2, 2, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), fastdfa.Linear(2, 3))
    dfa = fastdfa.DFA(model, example_input=torch.randn(1, 1, 6, 6))
    snap = _snapshot(dfa)
    with pytest.raises(ValueError, match="per-sample shape"):
        dfa(torch.randn(1, 1, 7, 7))
    _assert_untouched(dfa, snap)


def test_site_dtype_mismatch():
    model = make_mlp(5, (4, 4), 3)
    dfa = fastdfa.DFA(model, example_input=torch.randn(2, 5))
    model.double()  # the inner model only: the feedback stays float32
    snap = _snapshot(dfa)
    with pytest.raises(TypeError, match="dtype"):
        dfa(torch.randn(2, 5, dtype=torch.float64))
    _assert_untouched(dfa, snap)
    dfa.double()  # the fix the message names
    dfa(torch.randn(2, 5, dtype=torch.float64)).sum().backward()


def test_site_device_mismatch():
    model = make_mlp(5, (4, 4), 3)
    dfa = fastdfa.DFA(model, example_input=torch.randn(2, 5))
    dfa.feedback.to("meta")  # the feedback elsewhere than the activations
    snap = _snapshot(dfa.model)
    with pytest.raises(RuntimeError, match="dfa.to"):
        dfa(torch.randn(2, 5))
    _assert_untouched(dfa.model, snap)


def test_site_order_change_is_detected():
    class Switch(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = fastdfa.Linear(3, 3), fastdfa.Linear(3, 3), fastdfa.Linear(3, 2)
            self.swap = False

        def forward(self, x):
            x = self.b(self.a(x)) if not self.swap else self.a(self.b(x))
            return self.c(x)

    model = Switch()
    dfa = fastdfa.DFA(model, example_input=torch.randn(1, 3))
    model.swap = True
    with pytest.raises(RuntimeError, match="different order"):
        dfa(torch.randn(1, 3))


def test_module_running_twice_is_rejected():
    lin = fastdfa.Linear(3, 3)
    model = nn.Sequential(fastdfa.Linear(3, 3), lin, lin, fastdfa.Linear(3, 2))
    with pytest.raises(RuntimeError, match="ran twice"):
        fastdfa.DFA(model)(torch.randn(1, 3))


def test_structured_output_takes_the_error_at_the_module_that_made_its_tensor():
    """A tuple output: the error is taken at the module that returned its first tensor (the wrapper returns
    the tuple unchanged); outputs whose tensor no module returned, or that hold none, are refused."""
    class TupleOut(nn.Module):
        def __init__(self, scale=None):
            super().__init__()
            self.a, self.b = fastdfa.Linear(3, 3), fastdfa.Linear(3, 2)
            self.scale = scale

        def forward(self, x):
            y = self.b(self.a(x))
            return (y if self.scale is None else y * self.scale), 0

    dfa = fastdfa.DFA(TupleOut())
    out = dfa(torch.randn(2, 3))
    assert isinstance(out, tuple) and out[1] == 0 and dfa.error_point == "the output of 'b'"
    with pytest.raises(ValueError, match="no module returned that tensor"):
        fastdfa.DFA(TupleOut(scale=2.0))(torch.randn(2, 3))

    class NoTensor(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = fastdfa.Linear(3, 3)

        def forward(self, x):
            self.a(x)
            return {"note": "nothing"}

    with pytest.raises(TypeError, match="holding no tensor"):
        fastdfa.DFA(NoTensor())(torch.randn(2, 3))


def _nan_setup(**kw):
    torch.manual_seed(0)
    model = make_mlp(5, (4, 4), 3)
    dfa = fastdfa.DFA(model, **kw)
    opt = torch.optim.Adam(dfa.parameters(), lr=0.1)
    x, t = torch.randn(4, 5), torch.randn(4, 3)
    return dfa, opt, x, t


def _nan_loss(dfa, x, t):
    y = dfa(x)
    return ((y - t) ** 2 * torch.tensor([1.0, float("nan"), 1.0])).mean()


def test_nonfinite_error_raises_by_default():
    dfa, opt, x, t = _nan_setup()
    snap = _snapshot(dfa)
    with pytest.raises(fastdfa.NonFiniteErrorSignal, match="NaN or inf"):
        _nan_loss(dfa, x, t).backward()
    _assert_untouched(dfa, snap)  # no gradient reached any layer, the output layer's neither


def test_nonfinite_error_skipped_on_request():
    dfa, opt, x, t = _nan_setup(nonfinite="skip")
    snap = _snapshot(dfa)
    opt.zero_grad()
    _nan_loss(dfa, x, t).backward()
    opt.step()  # parameters with no gradient are skipped by torch.optim
    _assert_untouched(dfa, snap)
    assert dfa.skipped_steps == 1
    opt.zero_grad()
    F.mse_loss(dfa(x), t).backward()  # the next finite step trains as usual
    opt.step()
    assert not torch.equal(dfa.model[1].weight, snap["model.1.weight"])
    assert dfa.skipped_steps == 1


def test_nonfinite_error_ignored_on_request_flows_into_the_gradients():
    dfa, opt, x, t = _nan_setup(nonfinite="ignore")
    _nan_loss(dfa, x, t).backward()  # no check, no host read of the error
    assert dfa.skipped_steps == 0
    for p in dfa.parameters():  # every layer got a gradient, NaN where the error's NaN reached it
        assert p.grad is not None
    assert torch.isnan(dfa.model[1].weight.grad).any() and torch.isnan(dfa.model[-1].weight.grad).any()


def test_nonfinite_ignore_reads_nothing_on_the_host(monkeypatch):
    """"ignore" never asks whether the error is finite (the check is what syncs a GPU)."""
    import fastdfa.engine.output as output

    calls = []
    real = output.all_finite
    monkeypatch.setattr(output, "all_finite", lambda t, *more: calls.append(t.shape) or real(t, *more))
    for mode, expected in (("ignore", 0), ("raise", 1)):
        calls.clear()
        dfa, opt, x, t = _nan_setup(nonfinite=mode)
        F.mse_loss(dfa(x), t).backward()
        assert len(calls) == expected, mode


def test_explicit_unavailable_backend_raises_before_touching_the_model():
    model = make_mlp(5, (4,), 3)
    snap = _snapshot(model)
    with pytest.raises(fastdfa.BackendUnavailableError, match="unavailable"):
        fastdfa.DFA(model, backend="cuda")
    _assert_untouched(model, snap)
    assert not model[1]._forward_pre_hooks
    assert torch.equal(model[2].feedback_weight, fastdfa.Linear(4, 3).feedback_weight)  # not re-seeded


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_the_finiteness_check_is_exact(dtype):
    """The one-reduction check says "finite" exactly when every element is, also for values near the
    dtype's largest, whose plain sum would overflow."""
    from fastdfa.engine.output import all_finite

    big = torch.finfo(dtype).max
    e = torch.full((64, 10), big, dtype=dtype)
    assert all_finite(e) and bool(torch.isfinite(e).all())
    assert all_finite(-e) and all_finite(torch.zeros(0, 10, dtype=dtype))
    for bad in (float("nan"), float("inf"), -float("inf")):
        f = torch.randn(64, 10).to(dtype)
        f[17, 3] = bad
        assert not all_finite(f)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), "overflow"])
def test_the_check_under_error_rank_reads_the_compressed_error(bad):
    """error_rank: a non-finite e makes e P^T non-finite, so the check reads e P^T (k columns, not n_e);
    a NaN/inf anywhere in e is still caught and the step refused, and finite values whose compressed sums
    overflow are still finite (the check falls back to e itself)."""
    torch.manual_seed(0)
    model = nn.Sequential(fastdfa.Linear(6, 8), nn.Tanh(), fastdfa.Linear(8, 40))
    dfa = fastdfa.DFA(model, error_rank=4)
    x = torch.randn(5, 6)
    store = dfa.feedback
    out = dfa(x)
    seed = torch.zeros_like(out)
    if bad == "overflow":  # finite, but e P^T overflows float32
        seed.fill_(torch.finfo(torch.float32).max / 2)
        e = seed.reshape(5, 40)
        assert not bool(torch.isfinite(store.compress(e)).all())
        out.backward(seed)  # not refused
        assert dfa.model[0].weight.grad is not None
        return
    seed[3, 29] = bad
    assert not bool(torch.isfinite(store.compress(seed)).all())
    with pytest.raises(fastdfa.NonFiniteErrorSignal):
        out.backward(seed)
    assert all(p.grad is None for p in model.parameters())
