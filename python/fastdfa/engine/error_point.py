"""Where the output error ``e`` is taken, and the hook that puts the output node there.

Three places (docs/design.md section 2, "Where the error is taken"):

  * ``"return"``: the model's return value, when it is one tensor (the loss is computed
    outside the model on it): ``e = dLoss/dy_hat``;
  * ``"output"`` of a module (``error_at=NAME``, and the default for a model that returns a
    ``ModelOutput``, a tuple or a dict: the module whose output is its ``logits``, else its first
    tensor): ``e = dLoss/d(output of NAME)``. Whatever the model computes after that module
    (Hugging Face's own loss from ``labels=``, label smoothing, a reshape) is between ``e`` and the
    loss, so autograd's backward through it gives ``e``;
  * ``"input"`` of a module (``head=NAME``): ``e = dLoss/d(input of NAME)``; NAME and every module
    that runs after it train by exact BP (``e`` is then the head's input width, d_model for an LM
    head, instead of the vocabulary).

The hook on the module hands the tensor to the interceptor of the forward running now (the
training forward's ``Recording`` puts the output node on it; GrAPE's dual pass reads its tangent);
outside a wrapper forward it does nothing.
"""

from __future__ import annotations

import difflib

import torch
from torch import nn

from .rollback import BackwardStart

RETURN, OUTPUT, INPUT = "return", "output", "input"


class ErrorPoint:
    """Where ``e`` is taken: ``kind`` (RETURN, OUTPUT or INPUT) of module ``name``."""

    __slots__ = ("kind", "name", "module", "handles")

    def __init__(self, kind: str, name: str = "", module: nn.Module | None = None):
        self.kind, self.name, self.module, self.handles = kind, name, module, []

    def describe(self) -> str:
        if self.kind == RETURN:
            return "the model's output"
        return f"the {self.kind} of {self.name!r}"

    def attach(self, recorder) -> None:
        """Register the hook on the module (once): it routes the tensor to ``recorder.active``."""
        hook = _ErrorHook(recorder)
        if self.kind == OUTPUT:
            self.handles = [self.module.register_forward_hook(hook.output)]
        elif self.kind == INPUT:
            # the head's output too: its backward runs before the head's gradients are accumulated, the
            # first fastdfa node of the backward (engine.rollback)
            self.handles = [self.module.register_forward_pre_hook(hook.input, with_kwargs=True),
                            self.module.register_forward_hook(hook.head_output)]

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def find_module(model: nn.Module, name: str, option: str) -> nn.Module:
    """The submodule ``name`` of ``model``; raises naming close names."""
    modules = dict(model.named_modules())
    if name not in modules or modules[name] is model:
        close = difflib.get_close_matches(name, [n for n in modules if n], n=4, cutoff=0.5)
        hint = f"; close names: {', '.join(map(repr, close))}" if close else ""
        raise ValueError(f"{option}={name!r} is not a submodule of the {type(model).__name__} (a name as in "
                         f"model.named_modules(){hint})")
    return modules[name]


def from_config(model: nn.Module, error_at: str | None, head: str | None) -> ErrorPoint | None:
    """The configured point (None: the default, resolved on the first training forward)."""
    if error_at is not None:
        return ErrorPoint(OUTPUT, error_at, find_module(model, error_at, "error_at"))
    if head is not None:
        return ErrorPoint(INPUT, head, find_module(model, head, "head"))
    return None


def error_tensor(output):
    """The tensor of a model's structured output the error is taken at: ``logits`` (a ``ModelOutput``,
    a dict or an object with that field), else the first tensor (of a tuple, list or dict); None if
    there is no tensor in it."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) or hasattr(output, "keys"):
        try:
            items = dict(output.items())
        except (AttributeError, TypeError):
            items = {}
        if isinstance(items.get("logits"), torch.Tensor):
            return items["logits"]
        values = list(items.values())
    else:
        logits = getattr(output, "logits", None)
        if isinstance(logits, torch.Tensor):
            return logits
        values = list(output) if isinstance(output, (tuple, list)) else []
    return next((v for v in values if isinstance(v, torch.Tensor)), None)


class OutputTracker:
    """Forward hooks on every module for one forward: which module returned which tensor (by identity),
    to find the module that produced the structured output's error tensor."""

    def __init__(self, model: nn.Module):
        self.produced: dict[int, tuple[str, nn.Module]] = {}
        self.keep: list[torch.Tensor] = []  # the tensors themselves: ids stay unique while tracked
        self.handles = [m.register_forward_hook(self._hook(n, m)) for n, m in model.named_modules() if m is not model]

    def _hook(self, name: str, module: nn.Module):
        def hook(_module, _args, out):
            if isinstance(out, torch.Tensor):
                self.produced[id(out)] = (name, module)
                self.keep.append(out)
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def point_for(self, model: nn.Module, output) -> ErrorPoint:
        """The OUTPUT point whose module produced ``output``'s error tensor; raises if none did."""
        tensor = error_tensor(output)
        if tensor is None:
            raise TypeError(f"the model returned a {type(output).__name__} holding no tensor: fastdfa.DFA takes "
                            "the error at a tensor; pass error_at='module name' (e = dLoss/d(that module's "
                            "output)) or head='module name'")
        found = self.produced.get(id(tensor))
        if found is None:
            raise ValueError(f"the model's {type(output).__name__} holds its logits / first tensor, but no module "
                             "returned that tensor (it is computed after the last module: an indexing, a pooling "
                             "or an op in forward()). Name where the error is taken: error_at='module name' (its "
                             "output) or head='module name' (its input)")
        name, module = found
        return ErrorPoint(OUTPUT, name, module)


class _ErrorHook:
    """The hooks of an error point (a class, not closures: the wrapper pickles). Each hands the tensor to
    the interceptor of the forward running now, or does nothing outside a wrapper forward."""

    __slots__ = ("recorder",)

    def __init__(self, recorder):
        self.recorder = recorder

    def output(self, module, args, output):
        """Forward hook of an OUTPUT point: the module's return value."""
        active = self.recorder.active
        if active is None:
            return None
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"error_at={self.recorder.names[module]!r}: that module returned a "
                            f"{type(output).__name__}; the error is taken at a module that returns one tensor")
        return active.at_error_point(output)

    def head_output(self, module, args, output):
        """Forward hook of an INPUT point's module (the head): the backward's rollback is taken there."""
        if self.recorder.active is None or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return None
        return BackwardStart.apply(self.recorder.rollbacks, output)

    def input(self, module, args, kwargs):
        """Forward pre-hook of an INPUT point (``head=``): the module's first tensor argument."""
        active = self.recorder.active
        if active is None:
            return None
        if args and isinstance(args[0], torch.Tensor):
            return (active.at_error_point(args[0]),) + tuple(args[1:]), kwargs
        key = next((k for k, v in kwargs.items() if isinstance(v, torch.Tensor)), None)
        if key is None:
            raise TypeError(f"head={self.recorder.names[module]!r}: that module was called with no tensor "
                            "argument; the error is taken at its first tensor input")
        return args, {**kwargs, key: active.at_error_point(kwargs[key])}
