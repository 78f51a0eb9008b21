"""The interception contract (fastdfa.engine.intercept): every interceptor implements the methods its row
of the table promises, with the protocol's signatures; and the one dependence on torch internals, how a
non-reentrant checkpoint's forward and recomputation are told apart, still holds for the installed torch."""

import inspect

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from fastdfa.engine import grape_pass, intercept, recording
from fastdfa.layers import in_checkpoint_forward, in_checkpoint_recompute

# (class, protocols it implements) as the table in engine/intercept.py says
ROWS = [(recording.Recording, (intercept.Interceptor, intercept.Replayable)),
        (recording.FAForward, (intercept.Interceptor, intercept.Replayable)),
        (recording.GuardOnly, (intercept.SiteInterceptor, intercept.ErrorPointInterceptor)),
        (recording.Replay, (intercept.SiteInterceptor, intercept.LayerInterceptor)),
        (grape_pass.DualPass, (intercept.Interceptor,)),
        (recording.SiteCapture, (intercept.Interceptor,))]


def protocol_methods(protocol) -> dict:
    names = {n for base in protocol.__mro__ if base not in (object,) and getattr(base, "_is_protocol", False)
             for n, v in vars(base).items() if callable(v) and not n.startswith("_")}
    return {n: getattr(protocol, n) for n in names}


@pytest.mark.parametrize("cls, protocols", ROWS, ids=[c.__name__ for c, _ in ROWS])
def test_every_interceptor_implements_its_protocols(cls, protocols):
    for protocol in protocols:
        for name, spec in protocol_methods(protocol).items():
            impl = inspect.getattr_static(cls, name, None)
            assert impl is not None, f"{cls.__name__} lacks {name} ({protocol.__name__})"
            impl = impl.__func__ if isinstance(impl, (staticmethod, classmethod)) else impl
            wanted = [p for p in inspect.signature(spec).parameters if p != "self"]
            got = [p for p in inspect.signature(impl).parameters if p != "self"]
            if wanted and wanted[0] == "args":  # replay(*args): any parameters
                continue
            assert len(got) == len(wanted), f"{cls.__name__}.{name}{tuple(got)} against the protocol's {tuple(wanted)}"


def test_the_table_names_every_interceptor():
    doc = intercept.__doc__
    for cls, _ in ROWS:
        assert f"``{cls.__name__}``" in doc, cls.__name__


def test_torch_checkpoint_forward_and_recompute_are_told_apart():
    """If this fails, torch renamed the saved-tensors hooks of torch.utils.checkpoint (use_reentrant=False):
    fastdfa.layers.in_checkpoint_forward / in_checkpoint_recompute read their names, and checkpointed DFA
    segments would recompute with BP's graph. Update those two functions for this torch."""
    seen = []

    def segment(x):
        seen.append((in_checkpoint_forward(), in_checkpoint_recompute()))
        return (x * 2).sin()

    x = torch.randn(4, requires_grad=True)
    assert not in_checkpoint_forward() and not in_checkpoint_recompute()
    y = checkpoint(segment, x, use_reentrant=False)
    assert seen == [(True, False)], f"torch {torch.__version__}: the checkpoint's forward is not recognised"
    y.sum().backward()
    assert seen[1:] == [(False, True)], f"torch {torch.__version__}: the checkpoint's recomputation is not recognised"
    assert not in_checkpoint_forward() and not in_checkpoint_recompute()
