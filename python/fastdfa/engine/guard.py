"""A refused forward changes nothing.

The recording checks every site input before its module runs, but modules
before a bad site have run by then: a BatchNorm there has already moved its
running statistics, and dropout has drawn from the RNG. ``ForwardGuard``
closes that gap once per input signature (the shapes, dtypes and devices of
the tensor arguments): the first forward of a signature not seen before (and
every forward while the feedback is unbuilt) first saves what a forward
changes in place (the running statistics and batch counts of the norm layers,
the RNG states) and puts it back if the forward raises. A signature that
passed once is trusted afterwards, so a training loop pays one dictionary
lookup per step.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

MAX_SIGNATURES = 64  # e.g. one per padded sequence length; past that the oldest is forgotten


@contextlib.contextmanager
def evaluating(module: nn.Module):
    """``module`` and every submodule in eval mode inside the block, each one's own training flag put back
    after it (a model may hold a frozen part in eval mode on purpose: ``module.train()`` would not restore
    that)."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        yield module
    finally:
        for m, t in flags:
            m.training = t


def split_call(example_input) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of an example input as the wrapper's ``build`` and the initialisations take it: a
    tuple of positional arguments, a dict of keyword arguments, or one positional argument."""
    if isinstance(example_input, dict):
        return (), dict(example_input)
    return (example_input if isinstance(example_input, tuple) else (example_input,)), {}


def signature(args: tuple, kwargs: dict) -> tuple:
    """What decides whether a forward's site checks can fail: each tensor argument's shape, dtype, device."""
    key = tuple((a.shape, a.dtype, a.device) if isinstance(a, torch.Tensor) else type(a) for a in args)
    if kwargs:
        key += tuple((k, (v.shape, v.dtype, v.device) if isinstance(v, torch.Tensor) else type(v))
                     for k, v in sorted(kwargs.items()))
    return key


class Snapshot:
    """The norm layers' running statistics and the RNG states, to put back."""

    def __init__(self, model: nn.Module, devices: set):
        self.buffers = [(b, b.detach().clone()) for m in model.modules()
                        if isinstance(m, nn.modules.batchnorm._NormBase) for b in m.buffers(recurse=False)]
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = {d: torch.cuda.get_rng_state(d) for d in devices if d.type == "cuda"}

    def restore(self) -> None:
        with torch.no_grad():
            for live, saved in self.buffers:
                live.copy_(saved)
        torch.set_rng_state(self.cpu_rng)
        for d, state in self.cuda_rng.items():
            torch.cuda.set_rng_state(state, d)


class ForwardGuard:
    def __init__(self, model: nn.Module):
        self.model = model
        self.trusted: dict[tuple, None] = {}  # insertion-ordered: the oldest is forgotten first
        self.built_dims: tuple | None = None  # the tensor arguments' dims of the forward that built the sites

    def run(self, forward, args: tuple, kwargs: dict, built: bool):
        key = signature(args, kwargs)
        if built and key in self.trusted:
            return forward(args, kwargs)
        dims = tuple(a.dim() for a in args if isinstance(a, torch.Tensor))
        if built and self.built_dims is not None and len(dims) == len(self.built_dims):
            for i, (d, b) in enumerate(zip(dims, self.built_dims)):
                if d == b - 1:
                    raise ValueError(f"input {i} has {d} dims, one fewer than the inputs the feedback was built "
                                     f"with ({b}): an unbatched sample? fastdfa.DFA takes batched inputs: "
                                     f"give it a batch dim with x.unsqueeze(0)")
        devices = {a.device for a in args if isinstance(a, torch.Tensor)}
        snapshot = Snapshot(self.model, devices)
        try:
            out = forward(args, kwargs)
        except BaseException:
            snapshot.restore()
            raise
        if not built:
            self.built_dims = dims
        if len(self.trusted) >= MAX_SIGNATURES:
            self.trusted.pop(next(iter(self.trusted)))
        self.trusted[key] = None
        return out

    def forget(self) -> None:
        self.trusted.clear()
