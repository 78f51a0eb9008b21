"""The dispatch rule: auto falls back silently, an explicit request that cannot run raises."""

import pytest
import torch

import fastdfa
from fastdfa import backends
from fastdfa.models import make_mlp


def test_auto_picks_torch_on_cpu():
    assert backends.resolve_backend("auto", torch.device("cpu")) == "torch"
    dfa = fastdfa.DFA(make_mlp(4, (3,), 2))
    assert dfa.backend is None
    dfa(torch.randn(1, 4))
    assert dfa.backend == "torch"


def test_env_var_is_an_explicit_request(monkeypatch):
    monkeypatch.setenv("FASTDFA_BACKEND", "torch")
    assert backends.resolve_backend(None, torch.device("cpu")) == "torch"
    unavailable = [b for b in ("triton", "cuda") if not backends.backend_status(b).available]
    if not unavailable:
        pytest.skip("every backend is available here")
    monkeypatch.setenv("FASTDFA_BACKEND", unavailable[0])
    with pytest.raises(fastdfa.BackendUnavailableError, match="FASTDFA_BACKEND"):
        backends.resolve_backend(None, torch.device("cpu"))


def test_every_unavailable_backend_says_why():
    for name in backends.BACKENDS:
        status = backends.backend_status(name)
        assert status.reason, name
        if not status.available:
            with pytest.raises(fastdfa.BackendUnavailableError, match=name):
                fastdfa.DFA(make_mlp(4, (3,), 2), backend=name)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        fastdfa.DFA(make_mlp(4, (3,), 2), backend="opencl")


def test_auto_picks_torch_on_a_gpu_too():
    """"auto" is the fastest measured eager DFA on a GPU: the torch backend (bench/results/gpu-check-targets.json)."""
    assert backends.resolve_backend("auto", torch.device("cuda")) == "torch"


def test_the_backend_names_and_ops_have_one_source():
    """The names come from config.py (the CLI's and DFAConfig's choices); the ops are the contract's."""
    from fastdfa import config
    from fastdfa.backends.base import KernelBackend

    assert backends.BACKENDS is config.BACKENDS
    assert config.BACKEND_CHOICES == ("auto",) + config.BACKENDS
    assert set(backends.KERNEL_OPS) == KernelBackend.__abstractmethods__
