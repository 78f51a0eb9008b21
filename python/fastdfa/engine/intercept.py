"""The interception contract: what may run a model's forward for the engine, and in which state.

During a wrapper's forward the engine routes three kinds of call through ONE object, the interceptor
of that forward (``Recorder.active``, and ``fastdfa.layers.LAYER_FORWARD`` for the layers):

* ``layer_forward(layer, x) -> y``: a fastdfa layer's forward (``fastdfa.layers`` reads the handler
  from its context variable and calls it instead of its own forward; the handler runs
  ``layer.plain_forward(x)`` where it wants the plain result);
* ``site_input(module, x) -> x'``: the first tensor argument of a ``sites=`` module (the recorder's
  forward pre-hook on each such module);
* ``at_error_point(tensor) -> tensor'``: the tensor the error is taken at (``engine.error_point``'s
  hooks on ``error_at=`` / ``head=``, or the model's return value).

An interceptor that can be recomputed inside a ``torch.utils.checkpoint`` segment also has
``replay(...) -> interceptor``: the object that recomputes the segment in the backward exactly as this
forward ran it (the same graph cut, the same saved tensors).

| interceptor (module) | when it is active | layer | site | error point | replay |
|---|---|---|---|---|---|
| ``Recording`` (recording) | a DFA / GrAPE forward (training, or the build) | yes | yes | yes | ``Replay`` |
| ``FAForward`` (recording) | a mode "fa" training forward | yes | passes | yes | itself |
| ``GuardOnly`` (recording) | mode "bp", the error point inside the model | (none) | passes | NaN guard | no |
| ``Replay`` (recording) | torch recomputing a checkpointed segment | yes | yes | (not reached) | no |
| ``DualPass`` (grape_pass) | GrAPE's forward-mode pass after a training forward | yes | yes | yes | no |
| ``SiteCapture`` (recording) | ``fastdfa.init.jacobian_feedback``'s BP forward | plain | kept | kept | no |

States: none is active outside a wrapper forward (the layers then run their plain forward, except
inside torch's recomputation of a segment an engine ran, when ``fastdfa.layers.recompute_handler``
finds that engine's replay); exactly one is active during one (a re-entered wrapper forward raises);
``GuardOnly`` sets no layer handler (mode "bp" runs the layers plainly).

Checkpoint recomputation is detected from torch's saved-tensors hooks: the non-reentrant checkpoint
runs its forward under a pack hook named ``_checkpoint_hook...`` and its recomputation under
``_recomputation_hook...`` (``fastdfa.layers.in_checkpoint_forward`` / ``in_checkpoint_recompute``,
the one place that reads those private names). ``tests/test_intercept.py`` checks both against the
installed torch and fails, saying so, when torch renames them.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class SiteInterceptor(Protocol):
    def site_input(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``x``: the first tensor argument of site ``module``; returns what the module runs on."""


@runtime_checkable
class LayerInterceptor(Protocol):
    def layer_forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A fastdfa layer's forward on ``x`` (the handler of ``fastdfa.layers.LAYER_FORWARD``)."""


@runtime_checkable
class ErrorPointInterceptor(Protocol):
    def at_error_point(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor the error is taken at; returns the tensor the forward goes on with."""


@runtime_checkable
class Interceptor(SiteInterceptor, LayerInterceptor, ErrorPointInterceptor, Protocol):
    """The whole contract of a training forward's interceptor (``Recorder.begin`` installs one)."""


@runtime_checkable
class Replayable(Protocol):
    def replay(self, *args) -> LayerInterceptor:
        """The interceptor that recomputes a checkpointed segment of this forward as it ran."""
