"""``backend="auto"``'s per-op fallback (``backends/fallback.py``): a kernel that fails to compile or
launch moves its op to the torch backend with one warning, and the step's gradients are the torch
backend's; a backend named explicitly raises the kernel's error; bad input is not swallowed."""

import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastdfa
from fastdfa import backends
from fastdfa.backends.base import KernelBackend
from fastdfa.backends.fallback import FallbackBackend, KernelFallbackWarning
from fastdfa.models import make_mlp

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# op -> (module of fastdfa.triton_kernels, its @triton.jit kernel's name)
KERNELS = {"dfa_project": "_dfa_project_kernel", "dfa_wgrad": "_dfa_wgrad_kernel",
           "jvp_linear": "_jvp_linear_kernel", "align_step": "_align_step_kernel"}


class _BrokenKernel:
    """Stands in for a @triton.jit kernel that fails at launch, as a compile error on a user's GPU does."""

    def __init__(self, op):
        self.op = op

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise RuntimeError(f"ptxas fatal: {self.op} needs more registers than sm_00 has (test)")
        return launch


@pytest.fixture
def auto_prefers_triton(monkeypatch):
    """"auto" picks triton on this device (as it will once the kernels win on a GPU), with a fresh
    per-process fallback backend before and after."""
    if not backends.backend_status("triton").available:
        pytest.skip(backends.backend_status("triton").reason)
    monkeypatch.setitem(backends.AUTO_PREFERENCE, DEVICE, ("triton", "torch"))
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    backends._auto_backend.cache_clear()
    yield
    backends._auto_backend.cache_clear()


def _break(monkeypatch, op):
    module = __import__(f"fastdfa.triton_kernels.{op}", fromlist=["_"])
    monkeypatch.setattr(module, KERNELS[op], _BrokenKernel(op))


def _pair(mode):
    torch.manual_seed(0)
    model = make_mlp(20, (16, 12), 5, "relu").to(DEVICE)
    auto = fastdfa.DFA(model, mode=mode, seed=3, backend="auto")
    ref = fastdfa.DFA(copy.deepcopy(model), mode=mode, seed=3, backend="torch")
    return auto, ref


def _step(dfa, x, t):
    dfa.zero_grad(set_to_none=True)
    F.cross_entropy(dfa(x), t).backward()
    return [p.grad.clone() for p in dfa.parameters()]


@pytest.mark.parametrize("op,mode", [("dfa_project", "dfa"), ("dfa_wgrad", "dfa"), ("jvp_linear", "grape"),
                                     ("align_step", "grape")])
def test_auto_falls_back_per_op_with_one_warning_and_torch_gradients(auto_prefers_triton, monkeypatch, op, mode):
    _break(monkeypatch, op)
    auto, ref = _pair(mode)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 20, generator=gen).to(DEVICE), torch.randint(0, 5, (8,), generator=gen).to(DEVICE))
               for _ in range(3)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, t in batches:
            got, want = _step(auto, x, t), _step(ref, x, t)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    fallback = [w for w in caught if issubclass(w.category, KernelFallbackWarning)]
    assert len(fallback) == 1, [str(w.message) for w in caught]
    message = str(fallback[0].message)
    assert repr(op) in message and "ptxas fatal" in message and "python -m fastdfa info" in message
    assert "backend='triton'" in message  # how to see the error instead
    assert isinstance(auto.kernels, FallbackBackend) and set(auto.kernels.fallen_back) == {op}
    if mode == "grape":  # the feedback the alignment steps moved is the torch backend's
        torch.testing.assert_close(auto.feedback.flat, ref.feedback.flat, rtol=1e-4, atol=1e-5)


def test_a_named_backend_raises_the_kernel_error(auto_prefers_triton, monkeypatch):
    if DEVICE == "cpu" and not backends.backend_status("triton").available:
        pytest.skip("triton unavailable")
    _break(monkeypatch, "dfa_project")
    torch.manual_seed(0)
    dfa = fastdfa.DFA(make_mlp(20, (16,), 5, "relu").to(DEVICE), seed=3, backend="triton")
    assert not isinstance(dfa._resolve_backend((torch.zeros(1, 20, device=DEVICE),)), FallbackBackend)
    with pytest.raises(RuntimeError, match="ptxas fatal"):
        F.cross_entropy(dfa(torch.randn(4, 20, device=DEVICE)),
                        torch.zeros(4, dtype=torch.long, device=DEVICE)).backward()


class _Refusing(KernelBackend):
    """A backend whose ops refuse their input (ValueError) or fail (RuntimeError) on demand."""
    name = "refusing"

    def __init__(self, exc):
        self.exc = exc

    def dfa_project(self, error, feedback_all, sites, out=None):
        raise self.exc

    dfa_wgrad = jvp_linear = align_step = dfa_project


@pytest.mark.parametrize("exc", [ValueError("site 0: mask [3, 4] must be [3, 5]"), TypeError("bad argument")])
def test_bad_input_is_raised_not_fallen_back(exc):
    backend = FallbackBackend(_Refusing(exc), backends.get_backend("torch"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning either
        with pytest.raises(type(exc), match=re.escape(str(exc))):
            backend.dfa_project(torch.zeros(3, 2), torch.zeros(5, 2), [])
    assert backend.fallen_back == {}


def test_auto_without_a_preference_is_torch_and_unwrapped(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    for device in ("cpu", "cuda"):
        assert backends.resolve_backend("auto", torch.device(device)) == "torch"
        assert backends.backend_for("auto", torch.device(device)) is backends.get_backend("torch")
