"""End to end: a DFA step with backend="triton" gives backend="torch"'s gradients and really runs the kernels."""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdfa
from fastdfa.models import make_cnn, make_resnet

pytest.importorskip("triton")
from fastdfa.triton_kernels import align_step, dfa_project, dfa_wgrad, jvp_linear  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = {"dfa_project": (dfa_project, "_dfa_project_kernel"), "dfa_wgrad": (dfa_wgrad, "_dfa_wgrad_kernel"),
           "jvp_linear": (jvp_linear, "_jvp_linear_kernel"), "align_step": (align_step, "_align_step_kernel")}


class _Counting:
    """Wraps a @triton.jit kernel: counts ``kernel[grid](...)`` launches, then launches it."""

    def __init__(self, kernel, counts, name):
        self.kernel, self.counts, self.name = kernel, counts, name

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.counts[self.name] = self.counts.get(self.name, 0) + 1
            return launch(*args, **kwargs)
        return run


@contextlib.contextmanager
def count_launches():
    counts: dict[str, int] = {}
    saved = {}
    for name, (module, attr) in KERNELS.items():
        saved[name] = getattr(module, attr)
        setattr(module, attr, _Counting(saved[name], counts, name))
    try:
        yield counts
    finally:
        for name, (module, attr) in KERNELS.items():
            setattr(module, attr, saved[name])


def _rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _grads_both_backends(make_model, x, target, loss_fn=F.cross_entropy, steps=1, fused=None, **dfa_kwargs):
    """Compares the parameter gradients after ``steps`` SGD steps with each backend; returns the
    triton launch counts. ``fused``: the layer names the triton run must have claimed."""
    torch.manual_seed(0)
    model = make_model().to(DEVICE)
    results = {}
    counts = None
    for backend in ("torch", "triton"):
        m = copy.deepcopy(model)
        dfa = fastdfa.DFA(m, seed=2, backend=backend, **dfa_kwargs)
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        ctx = count_launches() if backend == "triton" else contextlib.nullcontext({})
        with ctx as c:
            for _ in range(steps):
                opt.zero_grad()
                loss_fn(dfa(x), target).backward()
                if _ < steps - 1:
                    opt.step()
        if backend == "triton":
            counts = c
            if fused is not None:
                assert dfa.fused_layers == fused
        else:
            assert dfa.fused_layers == []
        results[backend] = [p.grad.detach().clone() for p in m.parameters()]
        assert dfa.backend == backend
    for i, (g_torch, g_triton) in enumerate(zip(results["torch"], results["triton"])):
        assert _rel_err(g_triton, g_torch) < 1e-4, f"parameter {i}: relative error {_rel_err(g_triton, g_torch):.2e}"
    return counts


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", "gelu"])
@pytest.mark.parametrize("wgrad", ["grouped", "per-layer"])
def test_fused_mlp_step_equals_torch_and_launches_the_kernels(activation, wgrad):
    def make():
        return nn.Sequential(fastdfa.Linear(13, 24, activation=activation),
                             fastdfa.Linear(24, 17, activation=activation),
                             fastdfa.Linear(17, 30, activation=activation), fastdfa.Linear(30, 5))
    x, t = torch.randn(21, 13, device=DEVICE), torch.randint(0, 5, (21,), device=DEVICE)
    counts = _grads_both_backends(make, x, t, wgrad=wgrad, fused=["0", "1", "2", "3"])
    # One forward kernel per layer, ONE projection for all sites, ONE grouped weight-gradient launch.
    assert counts.get("jvp_linear") == 4 and counts.get("dfa_project") == 1
    assert counts.get("dfa_wgrad", 0) == (1 if wgrad == "grouped" else 0)


def test_output_activation_and_mse():
    def make():
        return nn.Sequential(fastdfa.Linear(6, 11, activation="tanh"), fastdfa.Linear(11, 3, activation="sigmoid"))
    x, t = torch.randn(9, 6, device=DEVICE), torch.rand(9, 3, device=DEVICE)
    counts = _grads_both_backends(make, x, t, loss_fn=F.mse_loss)
    assert counts == {"jvp_linear": 2, "dfa_project": 1, "dfa_wgrad": 1}


def test_three_training_steps_stay_equal():
    def make():
        return nn.Sequential(nn.Flatten(), fastdfa.Linear(16, 20, activation="relu"), fastdfa.Linear(20, 4))
    x, t = torch.randn(12, 4, 4, device=DEVICE), torch.randint(0, 4, (12,), device=DEVICE)
    _grads_both_backends(make, x, t, steps=3)


class _Residual(nn.Module):
    """h2 = g(W2 h1) + h1: h1 feeds a site (claimed) AND the residual sum, whose gradient reaches l1
    by the generic route and adds to the claimed one."""

    def __init__(self):
        super().__init__()
        self.l1 = fastdfa.Linear(8, 10, activation="tanh")
        self.l2 = fastdfa.Linear(10, 10, activation="relu")
        self.out = fastdfa.Linear(10, 3)

    def forward(self, x):
        h1 = self.l1(x)
        return self.out(self.l2(h1) + h1)


class _Unfused(nn.Module):
    """Torch activations and dropout between layers, an in-place change: nothing to claim, all generic."""

    def __init__(self):
        super().__init__()
        self.l1 = fastdfa.Linear(8, 12)
        self.l2 = fastdfa.Linear(12, 9)  # no activation: torch's own route saves nothing the mul_ would spoil
        self.l3 = fastdfa.Linear(9, 3)

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        h2 = self.l2(h)
        h2.mul_(1.5)  # in place on a fused output: its claim is withdrawn, autograd takes the mul into account
        return self.l3(h2)


@pytest.mark.parametrize("make", [_Residual, _Unfused])
def test_generic_route_for_outputs_that_cannot_be_claimed(make):
    x, t = torch.randn(7, 8, device=DEVICE), torch.randint(0, 3, (7,), device=DEVICE)
    counts = _grads_both_backends(make, x, t, fused=["l1", "out"] if make is _Residual else ["l3"])
    assert counts.get("dfa_project") == 1


class _ConvChain(nn.Module):
    """conv -> conv directly (the second conv's site is the first's output: claimable with dense
    feedback), odd paddings and a stride, then flatten (a view: not claimable) and a linear head."""

    def __init__(self):
        super().__init__()
        self.c1 = fastdfa.Conv2d(2, 3, 3, padding="same", padding_mode="reflect", activation="gelu")
        self.c2 = fastdfa.Conv2d(3, 4, 2, stride=2, padding=1, activation="tanh")
        self.c3 = fastdfa.Conv2d(4, 2, 3, padding="same", bias=False, activation="relu")
        self.head = fastdfa.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        return self.head(self.c3(self.c2(self.c1(x))).flatten(1))


@pytest.mark.parametrize("conv_feedback", ["dense", "channel"])
def test_conv_outputs_claimed_by_the_next_conv(conv_feedback):
    x, t = torch.randn(5, 2, 7, 7, device=DEVICE), torch.randint(0, 3, (5,), device=DEVICE)
    fused = ["c1", "c2", "head"] if conv_feedback == "dense" else ["head"]
    counts = _grads_both_backends(_ConvChain, x, t, conv_feedback=conv_feedback, fused=fused)
    assert counts.get("dfa_project") == 1 and counts.get("jvp_linear") == 1


@pytest.mark.parametrize("conv_feedback", ["dense", "channel"])
def test_cnn_pooled_convolutions_take_the_generic_route(conv_feedback):
    def make():
        return make_cnn((1, 8, 8), 4, channels=(3, 4), hidden=6)
    x, t = torch.randn(5, 1, 8, 8, device=DEVICE), torch.randint(0, 4, (5,), device=DEVICE)
    counts = _grads_both_backends(make, x, t, conv_feedback=conv_feedback)
    assert counts.get("dfa_project") == 1 and counts.get("jvp_linear") == 2


@pytest.mark.parametrize("mode", ["dfa", "grape"])
def test_resnet_with_batchnorm_and_shortcuts(mode):
    """BN between each conv and its activation, identity and 1x1 shortcuts: no conv output is claimable,
    so every layer takes the generic route; two steps, so GrAPE's aligned feedback is compared too."""
    def make():
        return make_resnet((1, 6, 6), 3, channels=(2, 3, 4))
    x, t = torch.randn(5, 1, 6, 6, device=DEVICE), torch.randint(0, 3, (5,), device=DEVICE)
    counts = _grads_both_backends(make, x, t, steps=2, mode=mode, jvp="shared")
    assert counts.get("dfa_project") == 2
    assert counts.get("align_step") == (2 * 2 if mode == "grape" else None)  # two passes per alignment step


def test_tokens_as_batch_dims():
    def make():
        return nn.Sequential(fastdfa.Linear(6, 10, activation="gelu"), fastdfa.Linear(10, 4))
    x = torch.randn(3, 5, 6, device=DEVICE)
    counts = _grads_both_backends(make, x, torch.randn(3, 5, 4, device=DEVICE), loss_fn=F.mse_loss, batch_dims=2)
    assert counts["dfa_wgrad"] == 1


def test_data_input_that_needs_its_gradient_is_not_fused():
    model = nn.Sequential(fastdfa.Linear(5, 7, activation="relu"), fastdfa.Linear(7, 2)).to(DEVICE)
    dfa = fastdfa.DFA(model, backend="triton")
    x = torch.randn(4, 5, device=DEVICE, requires_grad=True)
    with count_launches() as counts:
        dfa(x).sum().backward()
    assert x.grad is not None and counts["jvp_linear"] == 1  # only the second layer is fused


def test_float64_model_with_triton_is_refused_before_touching_it():
    model = nn.Sequential(fastdfa.Linear(5, 7, activation="relu"), fastdfa.Linear(7, 2)).double().to(DEVICE)
    with pytest.raises(fastdfa.BackendUnavailableError, match="float64"):
        fastdfa.DFA(model, backend="triton")
    assert not model[1]._forward_pre_hooks


def test_eval_and_bp_modes_run_plain_torch():
    model = nn.Sequential(fastdfa.Linear(5, 7, activation="relu"), fastdfa.Linear(7, 2)).to(DEVICE)
    dfa = fastdfa.DFA(model, backend="triton")
    x = torch.randn(4, 5, device=DEVICE)
    with count_launches() as counts:
        with torch.no_grad():
            dfa(x)
        with fastdfa.backprop(dfa):
            dfa(x).sum().backward()
    assert counts == {}


def _step(dfa, x, classes=3):
    F.cross_entropy(dfa(x), torch.randint(0, classes, (x.shape[0],), device=x.device)).backward()


def test_fusion_report_says_why_each_layer_is_not_fused():
    """Every fastdfa layer is "fused" or has the reason it is not (issue "Layout", item 3)."""
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = fastdfa.Linear(6, 5, activation="relu")
            self.b = fastdfa.Linear(5, 5, activation="tanh")     # its output is used twice
            self.c = fastdfa.Linear(5, 5)
            self.head = fastdfa.Linear(5, 3)

        def forward(self, x):
            h = self.a(x)
            g = self.b(h)
            return self.head(self.c(g) + g)  # a residual add: c's and b's outputs reach head through ops

    dfa = fastdfa.DFA(Branchy().to(DEVICE), backend="triton")
    _step(dfa, torch.randn(4, 6, device=DEVICE))
    report = dfa.fusion_report()
    assert set(report) == {"a", "b", "c", "head"}
    assert report["a"] == "fused" and report["b"] == "fused" and report["head"] == "fused"
    assert "through other ops" in report["c"]
    assert dfa.fused_layers == ["a", "b", "head"]


def test_fusion_report_for_whole_forwards_outside_the_fused_route():
    model = nn.Sequential(fastdfa.Linear(6, 5, activation="relu"), fastdfa.Linear(5, 3)).to(DEVICE)
    x = torch.randn(4, 6, device=DEVICE)
    torch_dfa = fastdfa.DFA(copy.deepcopy(model), backend="torch")
    _step(torch_dfa, x)
    assert all("torch backend" in why for why in torch_dfa.fusion_report().values())
    dfa = fastdfa.DFA(copy.deepcopy(model), backend="triton")
    assert all("no training forward" in why for why in dfa.fusion_report().values())
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        _step(dfa, x)
    assert all("autocast" in why for why in dfa.fusion_report().values())
    _step(dfa, x)
    assert set(dfa.fusion_report().values()) == {"fused"}


def test_fusion_report_names_the_claim_that_failed():
    """An output changed in place, a channel-wise site, a layer inside a site module."""
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = fastdfa.Linear(6, 5)
            self.b = fastdfa.Linear(5, 3)

        def forward(self, x):
            h = self.a(x)
            h.mul_(2)  # after the layer returned it: its saved state would be stale
            return self.b(h)

    dfa = fastdfa.DFA(InPlace().to(DEVICE), backend="triton")
    _step(dfa, torch.randn(4, 6, device=DEVICE))
    assert "in place" in dfa.fusion_report()["a"]

    cnn = nn.Sequential(fastdfa.Conv2d(1, 2, 3, padding=1, activation="relu"),
                        fastdfa.Conv2d(2, 2, 3, padding=1), nn.Flatten(), fastdfa.Linear(2 * 5 * 5, 3)).to(DEVICE)
    dfa = fastdfa.DFA(cnn, backend="triton", conv_feedback="channel")
    _step(dfa, torch.randn(4, 1, 5, 5, device=DEVICE))
    assert "channel-wise" in dfa.fusion_report()["0"]

    block = nn.Sequential(fastdfa.Linear(5, 5, activation="relu"), fastdfa.Linear(5, 5))
    model = nn.Sequential(fastdfa.Linear(6, 5), block, fastdfa.Linear(5, 3)).to(DEVICE)
    dfa = fastdfa.DFA(model, backend="triton", sites=[block])
    _step(dfa, torch.randn(4, 6, device=DEVICE))
    report = dfa.fusion_report()
    assert "inside a module named in sites=" in report["1.0"] and "inside" in report["1.1"]


@pytest.mark.parametrize("point", [dict(head="3"), dict(error_at="3")])
def test_error_point_inside_the_model_on_the_triton_backend_equals_torch(point):
    """head= / error_at= on the fused route: the same gradients as the torch backend; the layers before the
    error point fuse, a head runs by BP (fusion_report says so)."""
    def make():
        return nn.Sequential(fastdfa.Linear(13, 24, activation="relu"), fastdfa.Linear(24, 17, activation="tanh"),
                             fastdfa.Linear(17, 9, activation="relu"), fastdfa.Linear(9, 5))
    x, t = torch.randn(21, 13, device=DEVICE), torch.randint(0, 5, (21,), device=DEVICE)
    counts = _grads_both_backends(make, x, t, **point)
    assert counts.get("dfa_project") == 1
    dfa = fastdfa.DFA(make().to(DEVICE), backend="triton", **point)
    F.cross_entropy(dfa(x), t).backward()
    report = dfa.fusion_report()
    assert report["1"] == report["2"] == "fused"
    if "head" in point:  # the head by BP, the error 9 wide (its input)
        assert "after the error point" in report["3"] and dfa.out_features == 9
    else:  # the error at the output layer's output, through its forward hook: the output layer is claimed
        assert report["3"] == "fused" and dfa.out_features == 5
