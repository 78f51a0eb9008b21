"""The kernel-backend path of ``fastdfa.DFA``: fused layers, one projection, grouped weight gradients.

With a kernel backend ("triton"), a ``fastdfa.Linear`` in DFA mode runs its
training forward through ``jvp_linear`` (GEMM, bias, activation and the
activation state in one pass) and records itself. When the tensor it returned
is exactly the input of the next site (or the model output), and untouched
since, the engine *claims* it: the backward then computes that layer's delta
in the projection's epilogue and its weight gradient in the grouped launch:

    P       = dfa_project(e, F_all, sites)          ONE launch, all sites;
              claimed site s: P[:, block_s] = (e F_s^T) * g'(state of its producer) = delta
    delta_L = e * g_L'(state_L)                      if the output layer is claimed
    dW, db  = dfa_wgrad(deltas, inputs)              ONE launch, all claimed layers
              (or per-layer GEMMs: ``DFA(wgrad="per-layer")``)

and hands dW, db to autograd as the gradients of the claimed layers'
parameters (so ``loss.backward()``, any optimizer and DDP's gradient hooks
work unchanged), while the claimed site inputs get no gradient at all.

Anything else takes the generic route, still correct: an unclaimed site gets
``P[:, block_s]`` as the gradient of its input and autograd runs the local
backward (pooling, dropout, torch activations) into the producing layer's
``_FusedLinearFn``, whose backward computes ``delta = dh * g'`` and the weight
gradient itself. That is also how a fused layer output used twice (a residual
branch) gets both contributions.

The math is the same as the torch backend's (tests/test_triton_engine.py
compares the gradients of both).
"""

from __future__ import annotations

import math
import contextvars
from dataclasses import dataclass, field

import torch

from .activations import derivative_from_state
from .project import split_projection


# The engine whose training forward is running with a kernel backend, if any. A
# context variable, not an attribute on the layers: layers stay picklable and
# free of references to the wrapper.
_ACTIVE_ENGINE: contextvars.ContextVar = contextvars.ContextVar("fastdfa_fusing_engine", default=None)


def fusing_engine_for(layer) -> object | None:
    """The engine that fuses ``layer`` in the forward now running, or None."""
    engine = _ACTIVE_ENGINE.get()
    if engine is None or id(layer) not in engine._fusable:
        return None
    return engine


@dataclass
class FusedRecord:
    """One fused layer's forward in one training step."""

    layer: torch.nn.Module
    x: torch.Tensor                # [N, in] the layer input (detached site input or data)
    state: torch.Tensor | None     # activation state [N, out] (see triton_kernels/_common.py)
    out: torch.Tensor              # what the layer returned ([*batch, out])
    out_version: int               # out._version when returned: an in-place change un-claims it
    claimed: bool = False


@dataclass
class FusedPlan:
    """What the output node's backward needs from one training forward."""

    records: dict[int, FusedRecord] = field(default_factory=dict)   # id(out) -> record
    site_producers: list[FusedRecord | None] = field(default_factory=list)  # per site: claimed producer
    output_producer: FusedRecord | None = None

    def claim(self, x: torch.Tensor, rows: int, n: int, channelwise: bool = False) -> FusedRecord | None:
        """The fused record whose output is exactly ``x`` (``n`` batch rows of ``rows`` features) and
        unchanged since, claimed at most once; None if there is none."""
        rec = self.records.get(id(x))
        if (rec is None or rec.claimed or rec.out is not x or x._version != rec.out_version or channelwise
                or rec.layer.out_features != rows or rec.x.shape[0] != n):
            return None
        rec.claimed = True
        return rec

    @property
    def claimed(self) -> list[FusedRecord]:
        out = [r for r in self.site_producers if r is not None]
        if self.output_producer is not None:
            out.append(self.output_producer)
        return out


class _FusedLinearFn(torch.autograd.Function):
    """``h = g(x W^T + b)`` computed by ``jvp_linear``; backward only for a gradient that reaches
    ``h`` by the generic route (the claimed route bypasses it, and then it receives None)."""

    @staticmethod
    def forward(ctx, x2, weight, bias, activation, kernels, holder):
        ctx.set_materialize_grads(False)
        h, _, state = kernels.jvp_linear(x2, weight, bias, activation)
        holder.append(state)
        # tanh / sigmoid: the state is h itself, saved as an output (autograd checks its version).
        ctx.save_for_backward(x2, state)
        ctx.activation = activation
        ctx.has_bias = bias is not None
        return h

    @staticmethod
    def backward(ctx, grad_h):
        if grad_h is None:  # the claimed route: dW and db were computed by the output node
            return None, None, None, None, None, None
        x2, state = ctx.saved_tensors
        delta = grad_h * derivative_from_state(state, ctx.activation, grad_h.dtype)
        grad_w = delta.t() @ x2
        grad_b = delta.sum(0) if ctx.has_bias else None
        return None, grad_w, grad_b, None, None, None


def fused_linear_forward(engine, layer, x: torch.Tensor) -> torch.Tensor:
    """The training forward of a ``fastdfa.Linear`` on a kernel backend; records it for claiming."""
    plan: FusedPlan = engine._recording.plan
    x2 = x.reshape(-1, x.shape[-1])
    holder: list = []
    h = _FusedLinearFn.apply(x2, layer.weight, layer.bias, layer.activation, engine._kernels, holder)
    state = holder[0]
    if state is not None and state.data_ptr() == h.data_ptr():
        state = h.detach()  # tanh / sigmoid: the output is the state (an alias, no copy)
    if x.dim() != 2:
        h = h.view(*x.shape[:-1], layer.out_features)
    plan.records[id(h)] = FusedRecord(layer, x2, state, h, h._version)
    return h


def fused_backward(engine, error: torch.Tensor, batch_shape, plan: FusedPlan, site_dtypes):
    """(gradient for the model output, gradients of the site inputs, gradients of the claimed params)."""
    kernels = engine._kernels
    e = error.reshape(math.prod(batch_shape), -1)
    feedback = engine.feedback.flat
    sites = engine._sites
    psites = []
    for site, rec in zip(sites, plan.site_producers):
        if rec is None:
            psites.append(kernels.ProjectSite(site.offset, site.rows))
        else:
            psites.append(kernels.ProjectSite(site.offset, site.rows, rec.layer.activation, rec.state))
    projected = kernels.dfa_project(e, feedback, psites) if sites else None
    site_grads = split_projection(projected, engine._layout, batch_shape) if sites else []
    site_grads = [None if rec is not None else (g if g.dtype == dt else g.to(dt))
                  for g, rec, dt in zip(site_grads, plan.site_producers, site_dtypes)]

    deltas, inputs, layers = [], [], []
    for site, rec in zip(sites, plan.site_producers):
        if rec is not None:
            deltas.append(projected[:, site.offset:site.offset + site.rows])
            inputs.append(rec.x)
            layers.append(rec.layer)
    out_rec = plan.output_producer
    if out_rec is not None:
        d = e.to(feedback.dtype) if sites else e
        if out_rec.layer.activation is not None:
            d = d * derivative_from_state(out_rec.state, out_rec.layer.activation, d.dtype)
        deltas.append(d)
        inputs.append(out_rec.x)
        layers.append(out_rec.layer)
    for rec in plan.claimed:
        if rec.out._version != rec.out_version:
            raise RuntimeError(f"the output of fused layer {engine._names[id(rec.layer)]!r} was modified in "
                               "place after the forward; its saved activation state is stale")
    if engine.wgrad == "grouped" and deltas:
        dtypes = {d.dtype for d in deltas} | {x.dtype for x in inputs}
        if len(dtypes) == 1:
            grads = kernels.dfa_wgrad(deltas, inputs, [lay.bias is not None for lay in layers])
        else:
            grads = [(d.t() @ x, d.sum(0) if lay.bias is not None else None)
                     for d, x, lay in zip(deltas, inputs, layers)]
    else:
        grads = [(d.t() @ x.to(d.dtype), d.sum(0) if lay.bias is not None else None)
                 for d, x, lay in zip(deltas, inputs, layers)]
    param_grads = []
    for lay, (gw, gb) in zip(layers, grads):
        param_grads.append(gw.to(lay.weight.dtype))
        if lay.bias is not None:
            param_grads.append(gb.to(lay.bias.dtype))
    output_grad = None if out_rec is not None else error
    return output_grad, site_grads, param_grads
