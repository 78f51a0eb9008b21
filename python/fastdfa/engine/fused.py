"""The kernel-backend route of ``fastdfa.DFA``: fused layers, one projection, grouped weight gradients.

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

Every layer that does not take the whole fused route is given a reason in
words (``FusedPlan.reasons``), which ``fastdfa.DFA.fusion_report()`` shows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..activations import STATE_OF, apply_activation, derivative_from_state
from ..layers import Conv2d, Linear, explicit_padding
from ..ops.dfa_project import split_projection

FUSED = "fused"
# The layer types the fused route knows (a jvp_linear forward, a cuDNN conv with its state saved); other
# fastdfa layers (Conv1D, Conv1d) take the generic route, with this reason in fusion_report.
FUSABLE = (Linear, Conv2d)
NOT_FUSABLE = "the kernel backends fuse fastdfa.Linear and fastdfa.Conv2d only: generic route"
NOT_NEXT_SITE = ("fused forward, but its output reaches the next site through other ops (pooling, a view, "
                 "dropout, a residual add): its own backward computes delta (generic route)")


@dataclass
class FusedRecord:
    """One fused layer's forward in one training step."""

    layer: torch.nn.Module
    x: torch.Tensor                # the layer input: [N, in] (Linear) or padded [N, C, H, W] (Conv2d)
    state: torch.Tensor | None     # activation state [N, features] (see triton_kernels/_common.py)
    out: torch.Tensor              # what the layer returned ([*batch, out] or [N, C, H, W])
    out_version: int               # out._version when returned: an in-place change un-claims it
    ops: object = None             # _LinearOps / _ConvOps: the layer's weight gradient
    claimed: bool = False

    @property
    def rows(self) -> int:
        """Features per batch row of ``out``."""
        n = self.x.shape[0]
        return self.out.numel() // n if n else 0


@dataclass
class FusedPlan:
    """What the output node's backward needs from one training forward."""

    records: dict[int, FusedRecord] = field(default_factory=dict)   # id(out) -> record
    site_producers: list[FusedRecord | None] = field(default_factory=list)  # per site: claimed producer
    output_producer: FusedRecord | None = None
    n_params: int = 0
    reasons: dict = field(default_factory=dict)  # layer -> "fused" or why it is not (fusion_report)

    def claim(self, x: torch.Tensor, rows: int, n: int, channelwise: bool = False) -> FusedRecord | None:
        """The fused record whose output is exactly ``x`` (``n`` batch rows of ``rows`` features) and
        unchanged since, claimed at most once; None if there is none (the reason is noted)."""
        rec = self.records.get(id(x))
        if rec is None or rec.out is not x:
            return None
        why = ("its output feeds two sites or the output (second consumer): generic route" if rec.claimed else
               "its output was modified in place after the forward: generic route"
               if x._version != rec.out_version else
               "its output feeds a per-feature (channel-wise) site (the projection epilogue writes dense blocks): "
               "generic route"
               if channelwise else
               "its output's shape does not match the site's rows: generic route"
               if rec.rows != rows or rec.x.shape[0] != n else None)
        if why is not None:
            self.reasons.setdefault(rec.layer, why)
            return None
        rec.claimed = True
        return rec

    def take_tensors(self) -> list[torch.Tensor | None]:
        """The claimed records' saved tensors (input, state per record), removed from the records: the
        output node hands them to ``ctx.save_for_backward``, so autograd frees them after the backward
        (or keeps them for a second one with ``retain_graph=True``) and checks their versions."""
        tensors = []
        for r in self.claimed:
            tensors += [r.x, r.state]
            r.x = r.state = None
        return tensors

    def put_tensors(self, tensors) -> None:
        """Give the claimed records back their tensors (from ``ctx.saved_tensors``) for one backward."""
        for i, r in enumerate(self.claimed):
            r.x, r.state = tensors[2 * i], tensors[2 * i + 1]

    def finish(self, site_inputs, sites, output: torch.Tensor, n_out: int, n: int) -> list[torch.Tensor]:
        """Claim the producers of the sites and of the output; the claimed layers' parameters, in order
        (the output node hands their gradients to autograd)."""
        self.site_producers = [self.claim(x, site.rows, n, site.feature_axis is not None)
                               for x, site in zip(site_inputs, sites)]
        self.output_producer = self.claim(output, n_out, n)
        params = []
        for r in self.claimed:
            params += [r.layer.weight] + ([r.layer.bias] if r.layer.bias is not None else [])
            self.reasons[r.layer] = FUSED
        for r in self.records.values():
            self.reasons.setdefault(r.layer, NOT_NEXT_SITE)
        self.n_params = len(params)
        self.records = {}  # only the claimed ones are needed from here on
        return params

    @property
    def claimed(self) -> list[FusedRecord]:
        out = [r for r in self.site_producers if r is not None]
        if self.output_producer is not None:
            out.append(self.output_producer)
        return out


class _LinearOps:
    """Forward and weight gradient of a fused ``fastdfa.Linear`` (input and state as ``[N, features]``)."""

    def __init__(self, layer, kernels):
        self.layer, self.kernels = layer, kernels

    def forward(self, x2):
        """``(h, state)`` from one ``jvp_linear`` launch: GEMM, bias, activation and state in one pass."""
        lay = self.layer
        h, _, state = self.kernels.jvp_linear(x2, lay.weight, lay.bias, lay.activation)
        return h, state

    def weight_grad(self, delta2, x2):
        return delta2.t() @ x2, (delta2.sum(0) if self.layer.bias is not None else None)


class _ConvOps:
    """Forward and weight gradient of a fused ``fastdfa.Conv2d``.

    The convolution stays cuDNN's (torch's): an im2col GEMM would write
    k*k*C_in*H*W values per sample, and a Triton implicit-GEMM convolution is
    not in this version. What the fused route saves for a conv layer is the
    separate activation backward pass (g' is applied in the projection's
    epilogue) and the input gradient (``convolution_backward`` is asked for dW
    and db only).
    """

    def __init__(self, layer, padding):
        self.layer, self.padding = layer, padding

    def forward(self, xp):
        lay = self.layer
        a = F.conv2d(xp, lay.weight, lay.bias, lay.stride, self.padding, lay.dilation, lay.groups)
        self.out_hw = tuple(a.shape[2:])
        kind = STATE_OF[lay.activation]
        h = apply_activation(a, lay.activation)
        state = {"mask": (a > 0).to(torch.uint8) if kind == "mask" else None, "pre": a, "output": h,
                 None: None}[kind]
        return h, state

    def weight_grad(self, delta, xp):
        """dW, db from delta as [N, C, H, W] (generic route) or [N, C*H*W] (a projection slice)."""
        lay = self.layer
        delta = delta.reshape(xp.shape[0], lay.out_channels, *self.out_hw)
        has_bias = lay.bias is not None
        _, gw, gb = torch.ops.aten.convolution_backward(
            delta, xp, lay.weight, [lay.weight.shape[0]] if has_bias else None, list(lay.stride),
            list(self.padding), list(lay.dilation), False, [0, 0], lay.groups, [False, True, has_bias])
        return gw, (gb if has_bias else None)


class _FusedLayerFn(torch.autograd.Function):
    """``h = g(layer(x))`` by the layer's fused forward; its backward runs only for a gradient that
    reaches ``h`` by the generic route (a claimed output gets None here: the output node did the work)."""

    @staticmethod
    def forward(ctx, x, weight, bias, ops, holder):
        ctx.set_materialize_grads(False)
        h, state = ops.forward(x)
        holder.append(state)
        # tanh / sigmoid: the state is h itself, saved as an output (autograd checks its version).
        ctx.save_for_backward(x, state)
        ctx.ops = ops
        return h

    @staticmethod
    def backward(ctx, grad_h):
        if grad_h is None:
            return None, None, None, None, None
        x, state = ctx.saved_tensors
        delta = grad_h * derivative_from_state(state, ctx.ops.layer.activation, grad_h.dtype)
        grad_w, grad_b = ctx.ops.weight_grad(delta, x)
        return None, grad_w, grad_b, None, None


def _record(plan: FusedPlan, layer, x_saved, ops, out_shape=None) -> torch.Tensor:
    holder: list = []
    h = _FusedLayerFn.apply(x_saved, layer.weight, layer.bias, ops, holder)
    state = holder[0]
    n = x_saved.shape[0]
    if state is not None:
        if state.data_ptr() == h.data_ptr():
            state = h.detach()  # tanh / sigmoid: the output is the state (an alias, no copy)
        state = state.reshape(n, -1)  # [N, features], as dfa_project reads it
    if out_shape is not None:
        h = h.view(out_shape)
    plan.records[id(h)] = FusedRecord(layer, x_saved, state, h, h._version, ops=ops)
    return h


def fused_layer_forward(plan: FusedPlan, kernels, layer, x: torch.Tensor) -> torch.Tensor:
    """The training forward of a fastdfa layer on a kernel backend (a Linear through ``jvp_linear``, a
    Conv2d through cuDNN with its activation state saved); recorded for claiming."""
    if isinstance(layer, Linear):
        x2 = x.reshape(-1, x.shape[-1])
        out_shape = (*x.shape[:-1], layer.out_features) if x.dim() != 2 else None
        return _record(plan, layer, x2, _LinearOps(layer, kernels), out_shape)
    xp, padding = explicit_padding(layer, x)
    return _record(plan, layer, xp, _ConvOps(layer, padding))


def fused_backward(step, store, error: torch.Tensor, feedback: torch.Tensor, compressed: torch.Tensor):
    """(gradient for the model output, gradients of the site inputs, gradients of the claimed params).

    ``step``: the forward's step context (``engine.recording.StepState``: the kernels, module names,
    ``wgrad`` and ``streams`` options as they were at the forward, the fused plan, the batch shape, the
    sites' dtypes and shapes); ``store``: the wrapper's ``FeedbackStore``; ``error``: the output error;
    ``feedback``: the [R, n_out] buffer to project with; ``compressed``: ``store.compress(e)`` (e itself
    without ``error_rank``)."""
    kernels, names, wgrad, streams = step.kernels, step.names, step.wgrad, step.streams
    plan, batch_shape, site_dtypes, site_shapes = step.plan, step.batch_shape, step.site_dtypes, step.site_shapes
    e = error.reshape(math.prod(batch_shape), store.n_out)
    sites = store.sites
    for rec in plan.claimed:
        if rec.out._version != rec.out_version:
            raise RuntimeError(f"the output of fused layer {names[rec.layer]!r} was modified in "
                               "place after the forward; its saved activation state is stale")
    site_grads, claimed = [], []  # claimed: (record, delta [N, features])
    if sites:
        psites = [kernels.ProjectSite(site.offset, site.rows) if rec is None else
                  kernels.ProjectSite(site.offset, site.rows, rec.layer.activation, rec.state)
                  for site, rec in zip(sites, plan.site_producers)]
        projected = kernels.dfa_project(compressed, feedback, psites)  # ONE launch: every site, g' fused
        for g, site, rec, dt in zip(split_projection(projected, store.layout, batch_shape, site_shapes), sites,
                                    plan.site_producers, site_dtypes):
            if rec is None:
                site_grads.append(g if g.dtype == dt else g.to(dt))
            else:
                site_grads.append(None)  # the claimed route: no gradient flows into the producer's node
                claimed.append((rec, projected[:, site.offset:site.offset + site.rows]))
    out_rec = plan.output_producer
    if out_rec is not None:
        d = e if e.dtype == out_rec.x.dtype else e.to(out_rec.x.dtype)
        if out_rec.layer.activation is not None:
            d = d * derivative_from_state(out_rec.state, out_rec.layer.activation, d.dtype)
        claimed.append((out_rec, d))

    grads = {}
    linear = [(r, d) for r, d in claimed if isinstance(r.ops, _LinearOps)]
    if (wgrad == "grouped" and linear
            and len({d.dtype for _, d in linear} | {r.x.dtype for r, _ in linear}) == 1):
        # ONE launch for every claimed Linear's dW and db (triton), or one GEMM per layer fanned out
        # over the engine's CUDA streams (cuda).
        for (r, _), g in zip(linear, kernels.dfa_wgrad([d for _, d in linear], [r.x for r, _ in linear],
                                                       [r.layer.bias is not None for r, _ in linear],
                                                       streams=streams)):
            grads[id(r)] = g
    for r, d in claimed:
        if id(r) not in grads:  # per-layer: wgrad="per-layer", convolutions, mixed dtypes
            grads[id(r)] = r.ops.weight_grad(d, r.x)
    param_grads = []
    for r in plan.claimed:
        gw, gb = grads[id(r)]
        param_grads.append(gw.to(r.layer.weight.dtype))
        if r.layer.bias is not None:
            param_grads.append(gb.to(r.layer.bias.dtype))
    return (None if out_rec is not None else error), site_grads, param_grads
