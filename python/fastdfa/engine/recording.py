"""The forward recording of a DFA training step, and every check on it.

While the wrapper runs the model in mode "dfa" or "grape", one *interceptor*
sees each site module's input before the module runs, in execution order:

  * fastdfa layers call the handler they read from ``fastdfa.layers.LAYER_FORWARD``
    (set here for the duration of the forward): no module hook, so a layer
    call stays on torch's fast ``Module.__call__`` path;
  * modules named in ``sites=`` get a forward pre-hook, registered once.

``Recording`` is the interceptor of a training forward: it hands each site
module ``x.detach()`` (the graph cut) and keeps the original ``x`` for the
output node. On the first forward it learns the execution order and the site
shapes (the feedback is built from them); after that it checks every input
against them before the module runs (order, per-sample shape, device, dtype),
so a refused forward has run nothing past the bad site. GrAPE's dual pass is
the other interceptor (``grape_pass.DualPass``).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..layers import LAYER_FORWARD, RECOMPUTE_FORWARD, in_checkpoint_forward, in_checkpoint_recompute
from . import fused
from .error_point import INPUT

if TYPE_CHECKING:
    from .intercept import Interceptor


NO_GRAD_INSIDE = (
    "module {!r} runs under torch.no_grad() inside a training forward: the rule cannot train it, and "
    "torch.utils.checkpoint(..., use_reentrant=True) would recompute it in the backward with BP's rule. Use "
    "fastdfa.checkpoint(fn, *args) (torch's non-reentrant checkpoint, recomputed with the same graph cut)")


class Recorder:
    """Which modules are sites, the order they run in once built, and the interception plumbing.

    ``candidates``: the first module executed plus every site module (fastdfa
    layers not inside a user site, and the user sites); ``fusable``: the
    fastdfa layers among them whose input arrives detached (a kernel backend
    fuses those).
    """

    def __init__(self, model: nn.Module, names: dict, candidates: list[nn.Module], user_sites: list[nn.Module],
                 layers: list[nn.Module], fusable: set, batch_dims: int):
        self.model = model
        self.names = names
        self.known = set(layers)  # every fastdfa layer the model had when it was wrapped
        self.candidates = set(candidates)
        self.fusable = fusable
        self.user_sites = set(user_sites)
        self.site_modules = list(user_sites)  # the modules named in sites=, in the order given
        self.batch_dims = batch_dims
        self.expected: tuple[nn.Module, ...] | None = None  # once built: the order every forward follows
        self.site_checks: list[tuple[tuple[int, ...], int | None]] = []  # per site: (shape, feature axis)
        self.active = None  # the interceptor of the forward now running
        self.hooks = [m.register_forward_pre_hook(self._site_hook) for m in user_sites]
        # Site modules the last training forward ran inside a torch.utils.checkpoint segment, with the
        # interceptor that recomputes them as that forward ran them (cleared by every wrapper forward).
        self.pending: dict[nn.Module, object] = {}
        self.head_layers: set = set()  # fastdfa layers inside head=: BP in every mode
        self.guard_error = None  # tensor -> tensor: the NaN policy at the error point in mode "fa" (the wrapper's)
        self.rollbacks = None  # the wrapper's engine.rollback.BackwardRollbacks (the head's output takes one)

    def attach(self, point, layer_types: tuple) -> None:
        """Route ``point``'s hook (``engine.error_point``) to this recorder; under ``head=`` the head's
        fastdfa layers train by BP in every mode."""
        point.attach(self)
        if point.kind == INPUT:
            self.head_layers = {m for m in point.module.modules() if isinstance(m, layer_types)}

    def checkpointed(self, module: nn.Module, replay) -> None:
        """``module`` ran inside a (non-reentrant) torch.utils.checkpoint segment of a training forward:
        torch will recompute it in the backward with no interceptor set, and the recomputation must save
        the tensors the forward saved (the input detached at the graph cut), so it runs ``replay``."""
        self.pending[module] = replay
        # A weak reference made here, not kept on self: the recorder pickles and deep-copies (a copied
        # wrapper registers its own recorder for its own modules when it runs).
        RECOMPUTE_FORWARD[module] = weakref.ref(self)

    def forget(self, module: nn.Module) -> None:
        """``module`` ran plainly inside a checkpointed segment (no wrapper forward): recompute it plainly."""
        self.pending.pop(module, None)

    def recompute_forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A fastdfa layer's forward during torch's recomputation of a checkpointed segment."""
        replay = self.pending.get(layer)
        return layer.plain_forward(x) if replay is None else replay.layer_forward(layer, x)

    def freeze(self, order: list[nn.Module], sites) -> None:
        """After the build: every later forward must run ``order``, each site with an input its feedback
        fits (dense: the same per-sample shape; per-feature: the same number of dims and of features)."""
        self.expected = tuple(order)
        self.site_checks = [(s.shape, s.feature_axis) for s in sites]

    @contextlib.contextmanager
    def intercepting(self, interceptor):
        """Route every site module's input through ``interceptor`` for the block."""
        token = self.begin(interceptor)
        try:
            yield interceptor
        finally:
            self.end(token)

    def begin(self, interceptor: "Interceptor"):
        """Start routing site inputs through ``interceptor`` (the contract: ``engine.intercept``); pass the
        result to ``end``. (``intercepting`` without a generator context, for the training forward's hot
        path.)"""
        if self.active is not None:
            raise RuntimeError("fastdfa.DFA.forward re-entered: a DFA model cannot call itself")
        self.active = interceptor
        return LAYER_FORWARD.set(interceptor.layer_forward)

    def end(self, token) -> None:
        LAYER_FORWARD.reset(token)
        self.active = None

    def _site_hook(self, module: nn.Module, args):
        active = self.active
        if active is None:
            active = self.pending.get(module) if self.pending else None
            if active is None:
                return None
            if not in_checkpoint_recompute():
                if in_checkpoint_forward():  # a plain forward in a new checkpointed segment: recomputed plainly
                    self.forget(module)
                return None
        if not args or not isinstance(args[0], torch.Tensor):
            raise TypeError(f"site module {self.names[module]!r} must take a tensor as its first "
                            "positional argument")
        return (active.site_input(module, args[0]),) + tuple(args[1:])

    def refuse_if_gone(self, modules) -> None:
        """Raise, naming them, if any of the site ``modules`` is no longer in the model (replaced or removed
        after wrapping: a module put in its place would train by BP, silently)."""
        present = {id(m) for m in self.model.modules()}
        gone = [self.names[m] for m in modules if id(m) not in present]
        if gone:
            raise RuntimeError(f"site module(s) {gone} are no longer in the model: it changed after wrapping (a "
                               "module replaced or removed), and a module put in their place would silently "
                               "train by BP. Create a new fastdfa.DFA(model) after editing the model.")

    def unknown_layer(self, layer: nn.Module):
        """Raise for a fastdfa layer the model did not have when it was wrapped (the rule would be BP's)."""
        name = next((n for n, m in self.model.named_modules() if m is layer), None)
        where = f"{name!r}" if name is not None else "outside the wrapped model"
        raise RuntimeError(f"fastdfa layer {where} ({type(layer).__name__}) was not in the model when this "
                           "fastdfa.DFA was created: the model changed after wrapping (a layer replaced or "
                           "added). Its rule would silently be BP; create a new fastdfa.DFA(model) after "
                           "editing the model.")


class FAForward:
    """The interceptor of a training forward in mode "fa": every fastdfa layer (inside user sites too)
    computes FA's input gradient with its ``feedback_weight``; site modules run unchanged. A flag on the
    layers would be shared by every wrapper of the model; this belongs to the forward."""

    __slots__ = ("recorder",)

    def __init__(self, recorder: Recorder):
        self.recorder = recorder

    def layer_forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if layer not in self.recorder.known:
            self.recorder.unknown_layer(layer)
        if layer in self.recorder.head_layers:  # head=: BP in every mode
            return layer.plain_forward(x)
        if not torch.is_grad_enabled():  # this interceptor only runs training forwards
            raise RuntimeError(NO_GRAD_INSIDE.format(self.recorder.names[layer]))
        if in_checkpoint_forward():
            self.recorder.checkpointed(layer, self)
        return layer.fa_forward(x)

    def replay(self) -> "FAForward":
        return self  # records nothing: the recomputation of a checkpointed segment runs it as it is

    def at_error_point(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.recorder.guard_error(tensor)

    @staticmethod
    def site_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x


class Recording:
    """The interceptor of one training forward: what it saw, and the graph cut."""

    __slots__ = ("recorder", "store", "flat", "kernels", "plan", "count", "order", "shapes", "inputs", "unfused",
                 "grad", "finish", "done", "first_input", "step")

    def __init__(self, recorder: Recorder, store, step: StepState, finish=None):
        self.recorder = recorder
        self.store = store
        self.flat = store.flat                 # read once per forward (a buffer: nn.Module's slow lookup)
        self.kernels = step.kernels
        self.plan = step.plan
        self.count = 0                         # modules seen so far
        self.order: list[nn.Module] = []       # before the build only: the execution order
        self.shapes: list[tuple[int, ...]] = []  # before the build only: per-sample site shapes
        self.inputs: list[torch.Tensor] = []   # every site's original input, in order
        self.unfused: dict = {}                # layer -> why it ran outside the fused route
        self.grad = torch.is_grad_enabled()    # a training forward (False: the build's no-grad forward)
        self.finish = finish                   # (recording, tensor) -> tensor: the wrapper's output node
        self.done = False                      # the error point has run: what follows trains by BP
        self.first_input = None                # before the build: the first module's input (the data)
        self.step = step                       # what the output node's backward reads of this forward

    def layer_forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The LAYER_FORWARD handler: a fastdfa layer's forward inside the recorded model."""
        recorder = self.recorder
        if layer not in recorder.candidates or self.done:
            if layer not in recorder.known:
                recorder.unknown_layer(layer)
            if self.done and self.grad and layer not in recorder.head_layers and \
                    any(p.requires_grad for p in layer.parameters()):
                raise RuntimeError(f"fastdfa layer {recorder.names[layer]!r} runs after the error point (error_at=): "
                                   "it would train by exact BP, silently. Take the error after it (error_at= a later "
                                   "module), or name the BP-trained part as head='module' (its input is then the "
                                   "error point)")
            if self.plan is not None:
                self.unfused[layer] = ("runs after the error point (head=, error_at=): trained by BP" if self.done
                                       else "inside a module named in sites=: BP runs inside it")
            return layer.plain_forward(x)
        x = self.site_input(layer, x)
        plan = self.plan
        if plan is not None:
            if layer in recorder.fusable and not x.requires_grad:
                return fused.fused_layer_forward(plan, self.kernels, layer, x)
            self.unfused[layer] = ("named in sites=: BP runs inside it" if layer in recorder.user_sites else
                                   fused.NOT_FUSABLE if not isinstance(layer, fused.FUSABLE) else
                                   "its input requires a gradient (a data input that needs its own "
                                   "gradient keeps the autograd route)")
        return layer.plain_forward(x)

    def site_input(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Check and record a site module's input; what the module computes on (``x.detach()``)."""
        if self.done:  # after the error point (a module named in sites= inside head=): BP, as the head
            return x
        recorder = self.recorder
        position = self.count
        self.count = position + 1
        if self.grad:
            if not torch.is_grad_enabled():
                raise RuntimeError(NO_GRAD_INSIDE.format(recorder.names[module]))
            if in_checkpoint_forward():
                # the first module's input is not detached: the recomputation must know it is the first,
                # on the very first forward too (before the order is learned: CheckpointError otherwise)
                recorder.checkpointed(module, self.replay(module if position == 0 else None))
        expected = recorder.expected
        if expected is None:
            return self._learn(module, x, position)
        if position >= len(expected) or expected[position] is not module:
            want = recorder.names[expected[position]] if position < len(expected) else "nothing"
            raise RuntimeError(f"DFA sites ran in a different order than when the feedback was built: "
                               f"position {position} is {recorder.names[module]!r}, expected {want!r}")
        if position == 0:  # the first module executed: its input is the data, not a site
            self.first_input = x
            return x
        shape, axis = recorder.site_checks[position - 1]
        flat = self.flat
        got = x.shape[recorder.batch_dims:]
        fits = got == shape if axis is None else len(got) == len(shape) and got[axis] == shape[axis]
        if not fits or x.device != flat.device or x.dtype != flat.dtype:
            self._refuse(position, x, shape, axis, flat)
        self.inputs.append(x)
        return x.detach()

    def _learn(self, module: nn.Module, x: torch.Tensor, position: int) -> torch.Tensor:
        """First forward: the execution order and the site shapes the feedback is built for."""
        names = self.recorder.names
        if any(m is module for m in self.order):
            raise RuntimeError(f"module {names[module]!r} ran twice in one forward; a DFA site "
                               "must run once per forward (weight sharing is not supported in mode 'dfa')")
        self.order.append(module)
        if position == 0:
            self.first_input = x
            return x
        batch_dims = self.recorder.batch_dims
        if x.dim() < batch_dims:
            raise ValueError(f"site input of {names[module]!r} has shape {tuple(x.shape)}: "
                             f"fewer than batch_dims={batch_dims} dims")
        shape = tuple(x.shape[batch_dims:])
        if 0 in shape:
            raise ValueError(f"site input of {names[module]!r} has per-sample shape {shape} on the forward that "
                             "builds the feedback: an empty sequence or image. The feedback is sized from this "
                             "forward's shapes: build it from a non-empty input (example_input= or a first batch "
                             "with at least one token); with feedback_layout='per-feature' later forwards may be "
                             "empty")
        self.inputs.append(x)
        self.shapes.append(shape)
        return x.detach()

    def _refuse(self, position: int, x: torch.Tensor, shape: tuple[int, ...], axis: int | None,
                flat: torch.Tensor) -> None:
        """Raise the error for a site input that does not match the built feedback (autocast excepted)."""
        name = self.store.sites[position - 1].name
        batch_dims = self.recorder.batch_dims
        got = tuple(x.shape[batch_dims:])
        if x.dim() != batch_dims + len(shape):
            raise ValueError(f"site {name!r}: input of shape {tuple(x.shape)} has {x.dim()} dims, but the "
                             f"feedback was built for {batch_dims} batch dim(s) + per-sample shape {shape}. "
                             f"fastdfa.DFA takes batched inputs: give an unbatched sample a batch dim "
                             f"(x.unsqueeze(0)); a model whose inputs gained or lost dims needs a new "
                             f"fastdfa.DFA")
        if axis is not None and got[axis] != shape[axis]:
            raise ValueError(f"site {name!r}: input of per-sample shape {got}, but its per-feature feedback "
                             f"has {shape[axis]} features on axis {axis} (any size on the other axes); build a "
                             f"new fastdfa.DFA for the new shapes")
        if axis is None and got != shape:
            raise ValueError(f"site {name!r}: input of per-sample shape {got}, but its feedback was "
                             f"built for {shape}; build a new fastdfa.DFA for the new shapes, or use "
                             f"feedback_layout='per-feature' for sites whose length varies")
        if x.device != flat.device:
            raise RuntimeError(f"site {name!r}: input is on {x.device} but the feedback is on "
                               f"{flat.device}; move the wrapper, not only the model: dfa.to({x.device!s})")
        if x.dtype != flat.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"site {name!r}: input dtype {x.dtype} differs from the feedback dtype "
                            f"{flat.dtype}; convert the wrapper, not only the model: dfa.to({x.dtype})")

    def at_error_point(self, tensor: torch.Tensor) -> torch.Tensor:
        """The error point ran (``engine.error_point``): the output node goes on ``tensor``; every module
        that runs after it in this forward trains by BP."""
        if self.done:
            raise RuntimeError("the error point ran twice in one forward (its module is called twice): take the "
                               "error at a module that runs once per forward")
        self.done = True
        return self.finish(self, tensor)

    def replay(self, first: nn.Module | None = None) -> "Replay":
        """The interceptor that recomputes a checkpointed segment of this forward (``fastdfa.checkpoint``);
        ``first``: the first module executed, when it is the one being checkpointed now."""
        if first is None and self.recorder.expected:
            first = self.recorder.expected[0]
        # Before the build the first module may not have run yet (fastdfa.checkpoint is entered before the
        # modules in it): the replay reads it from this forward's order (modules only) when it recomputes.
        return Replay(self.recorder, first, self.kernels if self.plan is not None else None, self.order)

    def check_output(self, output, batch_dims: int) -> int:
        """The output's features per batch element, after checking it is one tensor with the batch dims
        (and, before the build, that every module named in sites= ran)."""
        if self.recorder.expected is None and self.order:
            self.check_sites_ran()
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"the model returned a {type(output).__name__}, but it returned one tensor when this "
                            "wrapper found where to take the error (its output); a model whose return type "
                            "changes needs the error point named: fastdfa.DFA(model, error_at='module name')")
        if output.dim() < batch_dims:
            raise ValueError(f"the model output of shape {tuple(output.shape)} has fewer than batch_dims="
                             f"{batch_dims} dims")
        if output.dim() == batch_dims and batch_dims > 1:
            raise ValueError(f"the model output of shape {tuple(output.shape)} has no feature dim after "
                             f"batch_dims={batch_dims}: it would be read as {batch_dims} batch dims of one "
                             f"output each. Pass batch_dims=1 for a per-sample output, or shape a per-token "
                             f"scalar output as [..., 1]")
        batch = output.shape[:batch_dims]
        if batch_dims > 1 and len(set(batch)) < batch_dims:
            self._refuse_permuted_batch_axes(batch, batch_dims)
        for x in self.inputs:
            if x.shape[:batch_dims] != batch:
                raise ValueError(f"the model output of shape {tuple(output.shape)} and a site input of shape "
                                 f"{tuple(x.shape)} differ in their first batch_dims={batch_dims} dims: "
                                 f"the error of each output row must belong to one row of every site. Set "
                                 f"batch_dims to the dims they share (1 for [batch, classes] outputs)")
        n_out = 1
        for size in output.shape[batch_dims:]:
            n_out *= size
        return n_out

    def _refuse_permuted_batch_axes(self, batch, batch_dims: int) -> None:
        """The batch dims have equal sizes ([8, 8, ...]), so the shape check cannot tell a site's [batch,
        tokens] from [tokens, batch]. A site that is a permuted view of its leading dims (strides out of
        order: ``h.transpose(0, 1)``) would be read with its axes swapped: refuse it."""
        for x in self.inputs:
            lead = [(st, size) for st, size in zip(x.stride()[:batch_dims], x.shape[:batch_dims]) if size > 1]
            if any(a[0] < b[0] for a, b in zip(lead, lead[1:])):
                raise ValueError(
                    f"a site input of shape {tuple(x.shape)} is a permuted view of its first batch_dims="
                    f"{batch_dims} dims (strides {tuple(x.stride()[:batch_dims])}), and the error tensor's batch "
                    f"dims {tuple(batch)} have equal sizes, so whether its axes are (batch, tokens) or (tokens, "
                    "batch) cannot be checked: fastdfa would read them in the error's order. Give every site "
                    "the error's leading-axis order (transpose back before the site module), or use "
                    "batch_dims=1")

    def check_sites_ran(self) -> None:
        """Before the build: every module named in ``sites=`` ran in this forward (a site module swapped
        for a new one after wrapping would train the new one by BP, silently)."""
        recorder = self.recorder
        ran = {id(m) for m in self.order}
        missing = [m for m in recorder.user_sites if id(m) not in ran]
        if not missing:
            return
        recorder.refuse_if_gone(missing)
        raise RuntimeError(f"site module(s) {[recorder.names[m] for m in missing]} named in sites= did not run in "
                           "the forward: every site must run in every training forward")

    def check_complete(self, output: torch.Tensor, n_out: int) -> None:
        """After a forward of a built wrapper: every site ran, the output still fits the feedback."""
        store = self.store
        expected = len(store.sites) + 1
        if self.count != expected:
            self.recorder.refuse_if_gone(self.recorder.expected)
            raise RuntimeError(f"{self.count} of the {expected} DFA modules ran in this "
                               "forward; every site must run in every training forward")
        if n_out != store.n_out:
            raise ValueError(f"the model output changed to per-sample shape "
                             f"{tuple(output.shape[self.recorder.batch_dims:])} ({n_out} features), but the "
                             f"feedback was built for {store.n_out} output features; build a new fastdfa.DFA")
        if output.device != self.flat.device:
            raise RuntimeError(f"the output is on {output.device} but the feedback is on "
                               f"{self.flat.device}; use dfa.to(...)")



class StepState:
    """One training forward's step context: everything the output node's backward needs of it besides
    the saved tensors, so that the backward reads nothing of the wrapper (docs/design.md, "The step
    context"). Fixed at the forward, from the wrapper as it was then: ``kernels`` (the resolved kernel
    backend), ``nonfinite`` (the NaN policy), ``names`` (module -> its name, for messages), ``wgrad`` and
    ``streams`` (the fused route's options); a mode, backend or NaN policy set after the forward takes
    effect from the next forward on. Filled during the forward: ``plan`` (the fused plan), ``rows`` (the
    batch rows of the error tensor), ``refusal`` (why the kernel backend's fused route was not taken),
    ``estimate`` (GrAPE's, set after the dual pass; cleared once its alignment step is queued); by the output
    node's forward: ``batch_shape`` (the error's leading ``batch_dims`` sizes), ``site_dtypes`` and
    ``site_shapes`` (per-feature sites: each site's per-sample shape, to broadcast the error to; else None)."""

    __slots__ = ("kernels", "nonfinite", "names", "wgrad", "streams", "plan", "estimate", "rows", "refusal",
                 "batch_shape", "site_dtypes", "site_shapes")

    def __init__(self, kernels=None, nonfinite: str = "raise", names=None, wgrad: str | None = None,
                 streams: int | None = None, plan=None):
        self.kernels, self.nonfinite, self.names, self.wgrad, self.streams = kernels, nonfinite, names, wgrad, streams
        self.plan, self.estimate, self.rows, self.refusal = plan, None, 0, None
        self.batch_shape, self.site_dtypes, self.site_shapes = None, [], None

    @classmethod
    def of(cls, config, kernels, names, plan=None, refusal: str | None = None) -> "StepState":
        """The context of a forward of a wrapper with options ``config`` (a ``DFAConfig``) as they are now."""
        step = cls(kernels, config.nonfinite, names, config.wgrad, config.streams, plan)
        step.refusal = refusal
        return step


class GuardOnly:
    """The interceptor of a mode "bp" training forward of a model whose error point is inside it: nothing
    is intercepted but the error point, where the NaN policy goes (``Recorder.guard_error``)."""

    __slots__ = ("recorder",)

    def __init__(self, recorder: Recorder):
        self.recorder = recorder

    @staticmethod
    def site_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x

    def at_error_point(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.recorder.guard_error(tensor)


class SiteCapture:
    """The interceptor of a plain BP forward (no rule, no NaN guard) that keeps every site's input and the
    tensor at the error point, so that BP's Jacobian from each site to the error point can be read by
    ``torch.autograd.grad`` (``fastdfa.jacobian_init``). A site input that does not require a gradient
    (nothing below it trains) is made a leaf that does: nothing flows below it anyway."""

    __slots__ = ("recorder", "sites", "inputs", "error")

    def __init__(self, recorder: Recorder, site_modules):
        self.recorder = recorder
        self.sites = {id(m) for m in site_modules}
        self.inputs: dict[int, torch.Tensor] = {}  # id(site module) -> its input in this forward
        self.error: torch.Tensor | None = None     # the error-point tensor (None: the model's return value)

    def _keep(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if id(module) in self.sites:
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
            self.inputs[id(module)] = x
        return x

    def layer_forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if layer not in self.recorder.known:
            self.recorder.unknown_layer(layer)
        return layer.plain_forward(self._keep(layer, x))

    def site_input(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self._keep(module, x)

    def at_error_point(self, tensor: torch.Tensor) -> torch.Tensor:
        self.error = tensor
        return tensor


class Replay:
    """Recomputes a checkpointed segment in the backward exactly as the training forward ran it: the
    same inputs detached (every site module's but the first module's), the same fused forward on a
    kernel backend, and nothing recorded (the output node already holds what it needs)."""

    __slots__ = ("recorder", "_first", "kernels", "order")

    def __init__(self, recorder: Recorder, first: nn.Module | None, kernels, order: list | None = None):
        self.recorder, self._first, self.kernels, self.order = recorder, first, kernels, order

    @property
    def first(self) -> nn.Module | None:
        """The first module executed (its input is the data: not detached)."""
        if self._first is None and self.order:
            self._first = self.order[0]
        return self._first

    def site_input(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x if module is self.first else x.detach()

    def layer_forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        recorder = self.recorder
        if layer not in recorder.candidates:
            return layer.plain_forward(x)
        x = self.site_input(layer, x)
        if self.kernels is not None and layer in recorder.fusable and not x.requires_grad:
            return fused.fused_layer_forward(fused.FusedPlan(), self.kernels, layer, x)
        return layer.plain_forward(x)


def discover(model: nn.Module, sites: list[nn.Module] | None, layer_types: tuple) -> tuple[dict, list, list, list]:
    """``(names, candidates, user_sites, layers)`` of ``model``: every module's name, the modules whose
    input may be a site (fastdfa layers outside the user sites, and the user sites), the user sites
    checked, and every fastdfa layer (FA's layers). Raises before anything is changed."""
    # Keyed by the modules themselves, not id(): copy.deepcopy maps the keys to the copied modules.
    names = {m: n for n, m in model.named_modules()}
    user_sites = list(sites or [])
    for m in user_sites:
        if m not in names:
            raise ValueError(f"site module {type(m).__name__} is not a submodule of the model")
        if m is model:
            raise ValueError("the model itself cannot be a site: its input is the data")
    user_ids = {id(m) for m in user_sites}
    if len(user_ids) != len(user_sites):
        raise ValueError("sites= names the same module twice")
    inside_user = set()
    for m in user_sites:
        for sub in m.modules():
            if sub is not m:
                if id(sub) in user_ids:
                    raise ValueError(f"site {names[sub]!r} is inside site {names[m]!r}; "
                                     "name only the outer one (BP runs inside a site module)")
                inside_user.add(id(sub))
    layers = [m for m in model.modules() if isinstance(m, layer_types)]
    if not layers and not user_sites:
        raise ValueError("the model has no fastdfa layer (fastdfa.Linear / fastdfa.Conv2d) and no "
                         "sites= were given: nothing for DFA to train. fastdfa.convert(model) swaps every "
                         "torch.nn.Linear/Conv2d for fastdfa's in one call; or name blocks with sites=[...].")
    candidates = [m for m in model.modules()
                  if (isinstance(m, layer_types) and id(m) not in inside_user) or id(m) in user_ids]
    return names, candidates, user_sites, layers
