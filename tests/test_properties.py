"""Property-based tests (issue "Reliability"): random MLPs and CNNs built from ``fastdfa.Linear`` and
``fastdfa.Conv2d``, random losses, options and modes, against the rules written out here, independently,
with plain torch ops (docs/math.md and docs/design.md section 2):

* BP: ``torch.autograd`` through the same network written with ``F.linear`` / ``F.conv2d``.
* FA: every layer's input gradient goes through its ``feedback_weight`` B (``dx = dy @ B`` for Linear,
  ``conv2d_input(B, dy)`` for Conv2d), its own ``dW``, ``db`` are exact (explicit formulas below).
* DFA: every fastdfa layer's input but the first executed one is a site ``s``; the error at ``s`` is
  ``e @ F_s^T`` reshaped to the site (dense) or broadcast over space (channel-wise conv feedback), with
  ``e = dLoss/dy_hat``; each layer's local backward runs from its site's error down to its own detached
  input, and the model output gets ``e`` itself.

The oracle reads only ``dfa.sites[i].feedback``, ``layer.feedback_weight`` and ``dfa.execution_order``;
the library's engine computes nothing in it. Float64 models must match to 1e-9 of the gradient's
magnitude (or, for a gradient that is a cancellation, be within float64's own rounding noise). Float32 ones
must be within the tolerance derived from the reference itself, tests/tolerance.py's
rule (at most twice the float64 distance of the formula computed by PyTorch in float32, plus one ulp),
with PyTorch's float32 distance taken as the largest over 18 valid float32 computations of the formula
(``assert_float32_close`` says why one is not enough). The triton backend (float32, the interpreter on a
CPU) must be within the same rule, the torch backend's result counting as one more float32 computation.

The properties found one bug, fixed since: the triton backend's fused tanh, computed as
2 sigmoid(2a) - 1, was not relatively accurate near 0 (tanh(1e-6) = 1.07e-6); its minimal reproduction
stays as ``test_triton_fused_tanh_is_accurate_near_zero``.

Budgets: the default profile ("ci") is derandomized (fixed examples, the same on every run) and sized
to run in about two minutes on a 2-core CPU. ``FASTDFA_HYPOTHESIS=thorough`` runs many more random
examples (each run different; hypothesis prints the failing example and a ``@reproduce_failure`` blob).
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, event, example, given, settings
from hypothesis import strategies as st
from torch import nn

import fastdfa

# ------------------------------------------------------------------------------------------ budgets
# function_scoped_fixture: conftest's autouse fixture only seeds the global RNG, which these tests do not
# read (every tensor comes from a seed hypothesis draws). No "explain" phase: on the Triton interpreter it
# reruns a failing example hundreds of times (minutes) to annotate it; shrinking is kept.
_HEALTH = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large]
_PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink]
settings.register_profile("fastdfa-ci", derandomize=True, deadline=None, database=None, print_blob=True,
                          suppress_health_check=_HEALTH, phases=_PHASES)
settings.register_profile("fastdfa-thorough", derandomize=False, deadline=None, database=None,
                          print_blob=True, suppress_health_check=_HEALTH, phases=_PHASES)
PROFILE = os.environ.get("FASTDFA_HYPOTHESIS", "ci")
if PROFILE not in ("ci", "thorough"):
    raise ValueError(f"FASTDFA_HYPOTHESIS must be 'ci' or 'thorough', got {PROFILE!r}")
_SCALE = 1 if PROFILE == "ci" else 20


def _budget(ci_examples: int) -> settings:
    return settings(settings.get_profile(f"fastdfa-{PROFILE}"), max_examples=ci_examples * _SCALE)


# ------------------------------------------------------------------------------------ architectures
FUSED = (None, "relu", "tanh", "sigmoid", "gelu")
TRITON_ON_CPU_ONLY = ("the Triton interpreter on CPU tensors; compiled Triton on a GPU is covered by the kernel "
                      "and engine tests")
_SQRT2 = math.sqrt(2.0)


def _gelu(a):
    return 0.5 * a * (1 + torch.erf(a / _SQRT2))


# The activation functions written out with elementary torch ops; autograd of these is g'.
REF_ACT = {
    None: lambda a: a,
    "relu": lambda a: a * (a > 0).to(a.dtype),
    "tanh": torch.tanh,
    "sigmoid": lambda a: 1 / (1 + torch.exp(-a)),
    "gelu": _gelu,
    "leaky_relu": lambda a: torch.where(a > 0, a, 0.1 * a),
    "silu": lambda a: a / (1 + torch.exp(-a)),
}
# The same functions as PyTorch's own primitives: a second float32 computation of the formula (PyTorch's
# float32 GELU, for one, is up to 12x further from float64 than the erf formula above near a = -3.6).
TORCH_FN = {None: lambda a: a, "relu": F.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "gelu": F.gelu,
            "leaky_relu": lambda a: F.leaky_relu(a, 0.1), "silu": F.silu}
# torch activation modules placed between the layers of the fastdfa model
TORCH_ACT = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU,
             "leaky_relu": lambda: nn.LeakyReLU(0.1), "silu": nn.SiLU}
# half the layers are followed by a torch activation module, half feed the next layer directly (the
# fused route of the kernel backends claims only those)
torch_acts = st.one_of(st.none(), st.sampled_from(tuple(TORCH_ACT)))


@dataclass(frozen=True)
class Arch:
    """A sequential network: ``in_shape`` per sample, ``ops`` in order, ``n_out`` output features.

    ops: ("linear", in, out, bias, act) | ("conv", c_in, c_out, k, stride, pad, bias, act) |
         ("act", name) | ("pool", "max" | "avg") | ("flatten",)
    """
    in_shape: tuple
    ops: tuple
    n_out: int


@st.composite
def mlps(draw, linear_acts=FUSED):
    n0 = draw(st.integers(1, 8))
    depth = draw(st.integers(1, 4))
    widths = [n0] + [draw(st.integers(1, 8)) for _ in range(depth)]
    ops = []
    for i in range(depth):
        ops.append(("linear", widths[i], widths[i + 1], draw(st.booleans()), draw(st.sampled_from(linear_acts))))
        act = draw(torch_acts)
        if act is not None:
            ops.append(("act", act))
    return Arch((n0,), tuple(ops), widths[-1])


@st.composite
def cnns(draw, linear_acts=FUSED, min_linear=0):
    c, h, w = draw(st.integers(1, 3)), draw(st.integers(3, 8)), draw(st.integers(3, 8))
    in_shape = (c, h, w)
    ops = []
    for _ in range(draw(st.integers(1, 3))):
        pad = draw(st.integers(0, 1))
        k = draw(st.integers(1, min(3, h + 2 * pad, w + 2 * pad)))
        stride = draw(st.integers(1, 2))
        c_out = draw(st.integers(1, 6))
        ops.append(("conv", c, c_out, k, stride, pad, draw(st.booleans()), draw(st.sampled_from(FUSED))))
        c, h, w = c_out, (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
        act = draw(torch_acts)
        if act is not None:
            ops.append(("act", act))
        if h >= 2 and w >= 2:
            pool = draw(st.sampled_from((None, "max", "avg")))
            if pool is not None:
                ops.append(("pool", pool))
                h, w = h // 2, w // 2
    ops.append(("flatten",))
    features = c * h * w
    # the output layer may be a convolution (flattened) when its output is small
    n_linear = draw(st.integers(max(min_linear, 0 if features <= 24 else 1), 2))
    width = features
    for _ in range(n_linear):
        out = draw(st.integers(1, 8))
        ops.append(("linear", width, out, draw(st.booleans()), draw(st.sampled_from(linear_acts))))
        width = out
        act = draw(torch_acts)
        if act is not None:
            ops.append(("act", act))
    return Arch(in_shape, tuple(ops), width)


architectures = st.one_of(mlps(), cnns())


# The triton backend's fused Linear computes tanh as 2 sigmoid(2a) - 1 (triton_kernels/_common.py), whose
# error is an ulp of 1, not of tanh(a): see test_triton_fused_tanh_is_accurate_near_zero. The triton
# properties are split on it, so that the rest keeps running in CI while that bug is open.
_NOT_TANH = tuple(a for a in FUSED if a != "tanh")
architectures_without_linear_tanh = st.one_of(mlps(_NOT_TANH), cnns(_NOT_TANH))


@st.composite
def architectures_with_linear_tanh(draw):
    arch = draw(st.one_of(mlps(), cnns(min_linear=1)))
    linears = [i for i, op in enumerate(arch.ops) if op[0] == "linear"]
    i = draw(st.sampled_from(linears))
    ops = list(arch.ops)
    ops[i] = ops[i][:4] + ("tanh",)
    return Arch(arch.in_shape, tuple(ops), arch.n_out)
LOSSES = ("ce", "mse", "sumsq", "l1")
MODES = ("dfa", "fa", "bp")


@st.composite
def dfa_options(draw):
    return dict(seed=draw(st.integers(0, 2 ** 16)), feedback=draw(st.sampled_from(("uniform", "gaussian"))),
                conv_feedback=draw(st.sampled_from(("dense", "channel"))),
                feedback_scale=draw(st.sampled_from((1.0, 0.1, 0.5, 2.5)) | st.floats(0.05, 4.0)))


def build_model(arch: Arch, dtype, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    mods = []
    for op in arch.ops:
        if op[0] == "linear":
            _, fin, fout, bias, act = op
            mods.append(fastdfa.Linear(fin, fout, bias=bias, activation=act, dtype=dtype))
        elif op[0] == "conv":
            _, cin, cout, k, stride, pad, bias, act = op
            mods.append(fastdfa.Conv2d(cin, cout, k, stride=stride, padding=pad, bias=bias, activation=act,
                                       dtype=dtype))
        elif op[0] == "act":
            mods.append(TORCH_ACT[op[1]]())
        elif op[0] == "pool":
            mods.append(nn.MaxPool2d(2) if op[1] == "max" else nn.AvgPool2d(2))
        else:
            mods.append(nn.Flatten())
    return nn.Sequential(*mods)


def make_batch(arch: Arch, loss: str, batch: int, dtype, seed: int):
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, *arch.in_shape, generator=gen, dtype=torch.float64).to(dtype)
    if loss == "ce":
        target = torch.randint(0, arch.n_out, (batch,), generator=gen)
    else:
        target = torch.randn(batch, arch.n_out, generator=gen, dtype=torch.float64).to(dtype)
    return x, target


def loss_fn(kind: str, y, target):
    if kind == "ce":
        return F.cross_entropy(y, target)
    if kind == "mse":
        return F.mse_loss(y, target)
    if kind == "sumsq":
        return ((y - target) ** 2).sum()
    return F.l1_loss(y, target)


def _layers(model: nn.Module):
    return [m for m in model if isinstance(m, (fastdfa.Linear, fastdfa.Conv2d))]


# ------------------------------------------------------------------------------------------ the oracle
class _FALinear(torch.autograd.Function):
    """y = x W^T + b; dx = dy B (B stored with W's shape), dW = dy^T x, db = sum_n dy."""

    @staticmethod
    def forward(ctx, x, weight, bias, feedback_weight):
        ctx.save_for_backward(x, feedback_weight)
        ctx.has_bias = bias is not None
        y = x @ weight.T
        return y + bias if bias is not None else y

    @staticmethod
    def backward(ctx, dy):
        x, b_fa = ctx.saved_tensors
        return dy @ b_fa, dy.T @ x, dy.sum(0) if ctx.has_bias else None, None


class _FAConv2d(torch.autograd.Function):
    """y = conv2d(x, W) + b; dx = conv2d_input with B in place of W, dW = conv2d_weight, db = sum dy."""

    @staticmethod
    def forward(ctx, x, weight, bias, feedback_weight, stride, pad):
        ctx.save_for_backward(x, weight, feedback_weight)
        ctx.conf, ctx.has_bias = (stride, pad), bias is not None
        return F.conv2d(x, weight, bias, stride, pad)

    @staticmethod
    def backward(ctx, dy):
        x, weight, b_fa = ctx.saved_tensors
        stride, pad = ctx.conf
        dx = torch.nn.grad.conv2d_input(x.shape, b_fa, dy, stride, pad)
        dw = torch.nn.grad.conv2d_weight(x, weight.shape, dy, stride, pad)
        return dx, dw, dy.sum((0, 2, 3)) if ctx.has_bias else None, None, None, None


def _fa_by_autograd(op, h, weight, bias, b_fa):
    """FA's layer in PyTorch's primitives: the value of the layer plus a zero whose input gradient is
    the layer's with B in place of W. dW and db are autograd's (PyTorch's convolution backward reduces
    db with another summation than ``dy.sum``: as valid a float32 computation, up to 4x less accurate)."""
    if op[0] == "linear":
        through_b = F.linear(h, b_fa)
        return F.linear(h.detach(), weight, bias) + (through_b - through_b.detach())
    stride, pad = op[4], op[5]
    through_b = F.conv2d(h, b_fa, None, stride, pad)
    return F.conv2d(h.detach(), weight, bias, stride, pad) + (through_b - through_b.detach())


def _round_differently(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Every element moved to a neighbouring float (up or down at random): another valid rounding."""
    up = torch.rand(t.shape, generator=gen) < 0.5
    return torch.where(up, torch.nextafter(t, torch.full_like(t, math.inf)),
                       torch.nextafter(t, torch.full_like(t, -math.inf)))


def _rounded(t: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """With ``gen``: ``t``'s value, and later its gradient, each rounded differently by one ulp (the
    gradient still flows through); without: ``t`` itself."""
    if gen is None or not t.is_floating_point():
        return t
    t = t + (_round_differently(t.detach(), gen) - t.detach())  # exact: the difference is one ulp
    if t.requires_grad:
        t.register_hook(lambda g: _round_differently(g, gen))
    return t


def reference(arch: Arch, params, x, target, loss: str, mode: str, fa_weights=None, feedback=None,
              channelwise=None, jitter: torch.Generator | None = None, torch_ops: bool = False):
    """The rule's parameter gradients (and the output), in the dtype of ``params``, with plain torch ops.

    params: per fastdfa layer (weight, bias or None), leaf tensors; fa_weights: per layer B (mode "fa");
    feedback: per site F_s (mode "dfa"), sites being the inputs of layers 1.. in execution order;
    channelwise: per site, whether its feedback is (C, n_out) broadcast over space. ``jitter``: round
    every intermediate value and gradient differently by one ulp (see ``assert_float32_rule``).
    """
    h, sites, li, fn = _rounded(x, jitter), [], 0, TORCH_FN if torch_ops else REF_ACT
    for op in arch.ops:
        if op[0] in ("linear", "conv"):
            weight, bias = params[li]
            if mode == "dfa" and li > 0:
                sites.append(h)
                h = h.detach()  # the graph cut: no input gradient for any site module
            act = op[4] if op[0] == "linear" else op[7]
            if mode == "fa" and torch_ops:
                a = _fa_by_autograd(op, h, weight, bias, fa_weights[li])
            elif op[0] == "linear":
                a = _FALinear.apply(h, weight, bias, fa_weights[li]) if mode == "fa" else F.linear(h, weight, bias)
            else:
                stride, pad = op[4], op[5]
                a = (_FAConv2d.apply(h, weight, bias, fa_weights[li], stride, pad) if mode == "fa"
                     else F.conv2d(h, weight, bias, stride, pad))
            h = _rounded(fn[act](_rounded(a, jitter)), jitter)
            li += 1
        elif op[0] == "act":
            h = _rounded(fn[op[1]](h), jitter)
        elif op[0] == "pool":
            h = _rounded(F.max_pool2d(h, 2) if op[1] == "max" else F.avg_pool2d(h, 2), jitter)
        else:
            h = h.flatten(1)
    y = h
    flat = [p for wb in params for p in wb if p is not None]
    lo = loss_fn(loss, y, _rounded(target, jitter))
    if mode != "dfa":
        grads = torch.autograd.grad(lo, flat)
    else:
        (e,) = torch.autograd.grad(lo, y, retain_graph=True)
        e = _rounded(e, jitter)
        deltas = []
        for s, f_s, cw in zip(sites, feedback, channelwise):
            p = _rounded(e @ f_s.T, jitter)
            deltas.append(p[:, :, None, None].expand(s.shape) if cw else p.reshape(s.shape))
        grads = torch.autograd.grad([y] + sites, flat, [e] + deltas, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(flat, grads)]
    grads = [_rounded(g, jitter) for g in grads]
    return list(grads), y.detach(), sites


def _param_names(model):
    return [n for n, _ in model.named_parameters()]


def oracle(arch: Arch, dfa, x, target, loss: str, mode: str, dtype, conv_feedback: str,
           jitter: torch.Generator | None = None, torch_ops: bool = False):
    """The rule's gradients from the formulas at ``dtype``, reading only the feedback the wrapper drew."""
    layers = _layers(dfa.model)

    def value(t):
        return _rounded(t.detach().to(dtype), jitter)

    params = [(value(l.weight).clone().requires_grad_(),
               None if l.bias is None else value(l.bias).clone().requires_grad_()) for l in layers]
    fa_weights = [value(l.feedback_weight) for l in layers]
    feedback = [value(s.feedback) for s in dfa.sites]
    channelwise = [isinstance(s.module, fastdfa.Conv2d) and conv_feedback == "channel"
                   for s in dfa.sites] if mode == "dfa" else []
    return reference(arch, params, value(x) if x.is_floating_point() else x,
                     target.to(dtype) if target.is_floating_point() else target, loss, mode, fa_weights,
                     feedback, channelwise, jitter, torch_ops)


def check_structure(arch: Arch, dfa, opts, mode):
    """The sites are the inputs of every fastdfa layer but the first executed, with the feedback's shape
    and scale of docs/design.md section 2; FA's B has torch's default weight bound."""
    layers = _layers(dfa.model)
    for layer in layers:
        fan_in = layer.weight[0].numel()
        assert layer.feedback_weight.abs().max() <= 1 / math.sqrt(fan_in) * (1 + 1e-6)
    if mode != "dfa":
        return
    assert list(dfa.execution_order) == layers
    assert [s.module for s in dfa.sites] == layers[1:]
    for s, layer in zip(dfa.sites, layers[1:]):
        channelwise = isinstance(layer, fastdfa.Conv2d) and opts["conv_feedback"] == "channel"
        assert s.channelwise == channelwise, s
        n = math.prod(s.shape)
        assert s.feedback.shape == ((s.shape[0] if channelwise else n), arch.n_out), s
        if opts["feedback"] == "uniform":
            assert s.feedback.abs().max() <= opts["feedback_scale"] * math.sqrt(3 / n) * (1 + 1e-6), s


def run_library(arch, dtype, mode, loss, batch, opts, data_seed, backend="torch"):
    model = build_model(arch, dtype, data_seed)
    x, target = make_batch(arch, loss, batch, dtype, data_seed)
    dfa = fastdfa.DFA(model, mode=mode, backend=backend, **opts)
    y = dfa(x)
    loss_fn(loss, y, target).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads), (mode, _param_names(model))
    return dfa, x, target, y.detach(), [g.clone() for g in grads]


def assert_close_float64(got, want, what, noise=None):
    """``max|got - want| <= 1e-9 max|want|``; where that fails and ``noise`` is given (a function returning
    differently rounded float64 evaluations of ``want``), the float32 rule applied at float64 instead: a
    gradient that is a cancellation (a structurally zero sum, e.g. an output bias under cross-entropy,
    whose e sums to zero over the classes) is rounding residue whatever the library does."""
    err = (got - want).abs().max().item() if want.numel() else 0.0
    scale = want.abs().max().item() if want.numel() else 0.0
    if err <= 1e-9 * scale:
        return
    assert noise is not None, f"{what}: max error {err:.3e} > 1e-9 x max|ref| {scale:.3e}"
    base = max((s - want).abs().max().item() for s in noise())
    ulp = torch.finfo(torch.float64).eps * scale
    assert err <= 2 * base + ulp, (f"{what}: max error {err:.3e} > 1e-9 x max|ref| {scale:.3e} and "
                                   f"2 x float64's rounding noise {base:.3e} + ulp {ulp:.3e}")


# How many differently rounded float32 evaluations of the formula estimate float32's error (see below).
ROUNDINGS = 16


def float32_references(arch, dfa, x, target, loss, mode, conv_feedback):
    """The formula in float64 (the truth) and ``2 + ROUNDINGS`` float32 evaluations of it: as written
    here and in PyTorch's primitives (``torch_ops``), then ``ROUNDINGS`` more, alternating the two, in
    which every input, every intermediate value and every intermediate gradient is rounded to the other
    neighbouring float (one ulp, at random, seeded). Each is as valid a float32 computation of the formula
    as the library's."""
    want64, y64, _ = oracle(arch, dfa, x, target, loss, mode, torch.float64, conv_feedback)
    # the two writings are one formula (a check of this oracle: to 1e-9 of the model's largest gradient)
    scale = max([w.abs().max().item() for w in want64 if w.numel()] + [0.0])
    for a, b in zip(oracle(arch, dfa, x, target, loss, mode, torch.float64, conv_feedback, torch_ops=True)[0],
                    want64):
        assert (a - b).abs().max().item() <= 1e-9 * scale, "the formula in PyTorch's primitives differs"
    samples = [oracle(arch, dfa, x, target, loss, mode, torch.float32, conv_feedback, torch_ops=t)[:2]
               for t in (False, True)]
    gen = torch.Generator().manual_seed(0)
    samples += [oracle(arch, dfa, x, target, loss, mode, torch.float32, conv_feedback, gen, k % 2 == 1)[:2]
                for k in range(ROUNDINGS)]
    return want64, y64, [s[0] for s in samples], [s[1] for s in samples]


def assert_float32_close(out, ref64, samples32, what):
    """tests/tolerance.py's rule, ``max|out - ref64| <= 2 * max|torch_at_float32 - ref64| + ulp``, with
    the float32 error of PyTorch taken as the largest over several valid float32 computations
    (``samples32``, from ``float32_references``).

    With a single float32 evaluation, as tolerance.py has it, the rule is a sample of one: on these tiny
    networks (sums of 1-10 terms, outputs computed through cancellations such as softmax - onehot) two
    correct float32 computations routinely differ from float64 by factors of 3 to 60, and 4.5% of the
    gradient tensors of 3000 random examples failed it. Over 17 roundings none of 12784 did (the largest
    ratio err / (max sample error + ulp/2) was 1.55). The summation order inside an op is not rounding:
    an FA conv's bias gradient, which the library (like autograd) reduces in ``convolution_backward``,
    was 2.5x the error of 17 ``dy.sum`` samples once in 19408 examples, and PyTorch's float32 GELU is
    less accurate than the erf formula; hence half the samples in PyTorch's own primitives.
    """
    assert out.dtype == torch.float32 and out.shape == ref64.shape, (what, out.dtype, out.shape, ref64.shape)
    if ref64.numel() == 0:
        return
    err = (out.double() - ref64).abs().max().item()
    base = max((s.double() - ref64).abs().max().item() for s in samples32)
    ulp = torch.finfo(torch.float32).eps * ref64.abs().max().item()
    assert err <= 2 * base + ulp, (f"{what}: max error {err:.3e} vs float64 exceeds 2 x float32's "
                                   f"{base:.3e} + ulp {ulp:.3e}")


def assert_rule_gradients(arch, dfa, x, target, loss, mode, y, grads, dtype, conv_feedback):
    """The library's output and gradients against the formula; returns the float64 truth and, in
    float32, the samples of float32's error."""
    names = _param_names(dfa.model)
    if dtype == torch.float64:
        want64, y64, _ = oracle(arch, dfa, x, target, loss, mode, torch.float64, conv_feedback)
        rounded = []

        def noise(i):
            def samples():
                if not rounded:
                    gen = torch.Generator().manual_seed(0)
                    rounded.extend(oracle(arch, dfa, x, target, loss, mode, torch.float64, conv_feedback, gen)
                                   for _ in range(ROUNDINGS))
                return [r[1] if i is None else r[0][i] for r in rounded]
            return samples

        assert_close_float64(y, y64, f"{mode} output", noise(None))
        for i, (name, g, w) in enumerate(zip(names, grads, want64)):
            assert_close_float64(g, w, f"{mode} grad of {name}", noise(i))
        return want64, y64, None, None
    want64, y64, grads32, ys32 = float32_references(arch, dfa, x, target, loss, mode, conv_feedback)
    assert_float32_close(y, y64, ys32, f"{mode} output")
    for i, (name, g, w64) in enumerate(zip(names, grads, want64)):
        assert_float32_close(g, w64, [s[i] for s in grads32], f"{mode} grad of {name}")
    return want64, y64, grads32, ys32


# ------------------------------------------------------------------------------------------ properties
@_budget(1500)
@given(arch=architectures, mode=st.sampled_from(MODES), loss=st.sampled_from(LOSSES),
       batch=st.sampled_from((1, 2, 3, 5)), dtype=st.sampled_from((torch.float64, torch.float32)),
       opts=dfa_options(), data_seed=st.integers(0, 2 ** 16))
@example(  # found by the thorough profile: torch's float32 GELU at a = -3.63 (7e-4 relative error)
    arch=Arch(in_shape=(1,), ops=(("linear", 1, 1, True, "gelu"), ("linear", 1, 1, False, None)), n_out=1),
    mode="dfa", loss="ce", batch=2, dtype=torch.float32,
    opts={"seed": 0, "feedback": "uniform", "conv_feedback": "dense", "feedback_scale": 1.0}, data_seed=2475)
@example(  # found by the thorough profile: an output bias whose gradient is a zero sum (float64 residue)
    arch=Arch(in_shape=(1, 3, 3), ops=(("conv", 1, 1, 1, 1, 0, False, None), ("conv", 1, 1, 1, 1, 0, False, None),
                                       ("pool", "max"), ("conv", 1, 1, 1, 2, 1, True, "sigmoid"), ("flatten",)),
              n_out=4),
    mode="dfa", loss="ce", batch=1, dtype=torch.float64,
    opts={"seed": 0, "feedback": "uniform", "conv_feedback": "dense", "feedback_scale": 1.0}, data_seed=0)
@example(  # found by the thorough profile: an FA conv's bias gradient, summed by convolution_backward
    arch=Arch(in_shape=(3, 8, 8), ops=(("conv", 3, 6, 2, 1, 1, True, "tanh"), ("conv", 6, 1, 2, 1, 1, True, None),
                                       ("pool", "avg"), ("flatten",), ("linear", 25, 4, True, "tanh")), n_out=4),
    mode="fa", loss="mse", batch=2, dtype=torch.float32,
    opts={"seed": 311, "feedback": "uniform", "conv_feedback": "dense", "feedback_scale": 1.0}, data_seed=262)
def test_torch_backend_gradients_follow_the_rule(arch, mode, loss, batch, dtype, opts, data_seed):
    """Every parameter's gradient is the rule's (BP, FA, DFA), float64 to 1e-9, float32 within the
    tolerance the reference itself gives."""
    event(f"{mode} {'cnn' if len(arch.in_shape) == 3 else 'mlp'} {dtype}")
    dfa, x, target, y, grads = run_library(arch, dtype, mode, loss, batch, opts, data_seed)
    check_structure(arch, dfa, opts, mode)
    assert_rule_gradients(arch, dfa, x, target, loss, mode, y, grads, dtype, opts["conv_feedback"])


def check_triton_against_torch(arch, mode, loss, batch, opts, data_seed):
    """float32 on the Triton interpreter: the torch backend within the reference's own tolerance, and the
    triton backend within that rule with the torch backend's result as one more float32 computation."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip(TRITON_ON_CPU_ONLY)
    dtype = torch.float32
    ref_dfa, x, target, y_ref, grads_ref = run_library(arch, dtype, mode, loss, batch, opts, data_seed)
    dfa, _, _, y, grads = run_library(arch, dtype, mode, loss, batch, opts, data_seed, backend="triton")
    if mode == "dfa":  # the backend is resolved on the first DFA forward (docs/usage.md)
        assert dfa.backend == "triton"
        assert torch.equal(dfa.feedback.flat, ref_dfa.feedback.flat)
    event(f"{mode}: {len(dfa.fused_layers)} fused layer(s)")
    names = _param_names(dfa.model)
    want64, y64, grads32, ys32 = assert_rule_gradients(arch, ref_dfa, x, target, loss, mode, y_ref, grads_ref,
                                                       dtype, opts["conv_feedback"])
    assert_float32_close(y, y64, ys32 + [y_ref], f"triton {mode} output")
    for i, (name, g, w64, g_torch) in enumerate(zip(names, grads, want64, grads_ref)):
        assert_float32_close(g, w64, [s[i] for s in grads32] + [g_torch], f"triton {mode} grad of {name}")


@_budget(500)
@given(arch=architectures_without_linear_tanh, mode=st.sampled_from(("dfa", "dfa", "fa", "bp")),
       loss=st.sampled_from(LOSSES), batch=st.sampled_from((1, 2, 3, 5)), opts=dfa_options(),
       data_seed=st.integers(0, 2 ** 16))
def test_triton_backend_gradients_equal_the_torch_backend(arch, mode, loss, batch, opts, data_seed):
    """Every architecture without a tanh fastdfa.Linear (those are the next property)."""
    check_triton_against_torch(arch, mode, loss, batch, opts, data_seed)


@_budget(100)
@given(arch=architectures_with_linear_tanh(), loss=st.sampled_from(LOSSES), batch=st.sampled_from((1, 2, 3, 5)),
       opts=dfa_options(), data_seed=st.integers(0, 2 ** 16))
def test_triton_backend_gradients_equal_the_torch_backend_with_tanh_linears(arch, loss, batch, opts, data_seed):
    """The same property on architectures with a tanh fastdfa.Linear, mode "dfa" (the fused route).

    Minimal failing example (hypothesis, CI profile): the model ``fastdfa.Linear(1, 1, bias=False,
    activation="tanh")`` alone, batch 1, data_seed 0: its output, 4.95e-3, is 3.3e-8 off float64 on
    triton (56 ulps), 2.2e-9 on torch. In larger nets the gradients fail too: the next layer's
    ``dW = delta^T h`` is computed from the inexact ``h`` (e.g. 2.3e-8 off where float32 gives 3.9e-9)."""
    check_triton_against_torch(arch, "dfa", loss, batch, opts, data_seed)


def test_triton_fused_tanh_is_accurate_near_zero():
    """The smallest reproduction: y = tanh(w2 * (w1 * x)), both Linears fused on triton, weights 1."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip(TRITON_ON_CPU_ONLY)
    model = nn.Sequential(fastdfa.Linear(1, 1, bias=False), fastdfa.Linear(1, 1, bias=False, activation="tanh"))
    with torch.no_grad():
        for layer in model:
            layer.weight.fill_(1.0)
    x = torch.tensor([[1e-6], [1e-4], [3e-3], [0.5]])
    truth = torch.tanh(x.double())
    y_torch = fastdfa.DFA(copy.deepcopy(model), backend="torch")(x)
    dfa = fastdfa.DFA(model, backend="triton")
    y = dfa(x)
    assert dfa.fused_layers == ["0", "1"]
    # torch's float32 tanh is correctly rounded here: within an ulp of each value. The kernel's tanh is
    # computed from exp without libdevice: a few ulps RELATIVE at every magnitude is its contract
    # (triton_kernels/_common.py); 2 sigmoid(2a) - 1, its first form, was 7% off at 1e-6.
    eps = torch.finfo(torch.float32).eps
    assert ((y_torch.double() - truth).abs() <= eps * truth.abs()).all()
    assert ((y.double() - truth).abs() <= 4 * eps * truth.abs()).all(), (y.flatten().tolist(),
                                                                          truth.flatten().tolist())


@_budget(600)
@given(arch=architectures, mode=st.sampled_from(MODES), loss=st.sampled_from(LOSSES),
       batch=st.sampled_from((1, 2, 3, 5)), backend=st.sampled_from(("torch", "triton")),
       dtype=st.sampled_from((torch.float64, torch.float32)), opts=dfa_options(),
       data_seed=st.integers(0, 2 ** 16))
def test_forward_leaves_the_weights_and_a_second_step_doubles_the_gradients(arch, mode, loss, batch, backend,
                                                                            dtype, opts, data_seed):
    if backend == "triton":
        pytest.importorskip("triton")
        if torch.cuda.is_available():
            pytest.skip(TRITON_ON_CPU_ONLY)
        dtype = torch.float32
    model = build_model(arch, dtype, data_seed)
    x, target = make_batch(arch, loss, batch, dtype, data_seed)
    dfa = fastdfa.DFA(model, mode=mode, backend=backend, **opts)
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]

    def unchanged(when):
        for (name, p), p0 in zip(model.named_parameters(), params):
            assert torch.equal(p, p0), f"{name} changed by the {when}"
        for b, b0 in zip(model.buffers(), buffers):
            assert torch.equal(b, b0), f"a buffer changed by the {when}"

    y1 = dfa(x)
    unchanged("first forward")
    loss_fn(loss, y1, target).backward()
    unchanged("first backward")
    once = [p.grad.clone() for p in model.parameters()]
    feedback = dfa.feedback.flat.clone() if dfa.built else None
    y2 = dfa(x)
    unchanged("second forward")
    assert torch.equal(y1, y2)
    for p, g in zip(model.parameters(), once):  # the second forward does not touch .grad either
        assert torch.equal(p.grad, g)
    loss_fn(loss, y2, target).backward()
    unchanged("second backward")
    for (name, p), g in zip(model.named_parameters(), once):
        assert torch.equal(p.grad, 2 * g), f"{name}: the second step did not add exactly its gradient"
    if feedback is not None:
        assert torch.equal(dfa.feedback.flat, feedback)
