"""Drop-in ``fastdfa.Linear`` and ``fastdfa.Conv2d``.

They are ``torch.nn.Linear`` / ``torch.nn.Conv2d`` with the same constructor,
forward result and state_dict keys (a torch checkpoint loads into them and a
fastdfa one loads back into torch), plus one non-persistent buffer,
``feedback_weight``, with the shape of ``weight``: the fixed random matrix that
Feedback Alignment (FA, Lillicrap et al. 2016) uses in place of the weight for
the input gradient. ``fastdfa.DFA`` seeds it and saves it in its own
state_dict; the layer alone never does, so its keys stay torch's.

Two forwards, chosen by the engine that runs the layer:
    ``plain_forward``: ``F.linear`` / ``F.conv2d`` and the activation (BP; in DFA
              the graph cut is done by the engine: the input arrives detached).
    ``fa_forward``: the same result; its backward computes
              ``dX = dY @ B`` (Linear) or ``conv2d_input(dY, B)`` (Conv2d) with
              ``B = feedback_weight``, and the usual ``dW``, ``db``.
Called on its own (no engine), a layer is its torch counterpart: ``plain_forward``.

The layers know nothing of the engine that trains them (imports go one way,
docs/design.md section 3). An engine that needs to run a layer's forward its
own way (record the site, detach the input, fuse the activation, push dual
numbers) sets ``LAYER_FORWARD`` to a handler ``handler(layer, input) -> output``
for the duration of its forward; a layer with a handler set calls it instead
of its own forward, and the handler computes the plain result with
``layer.plain_forward(input)`` where it wants it.

``torch.utils.checkpoint`` (non-reentrant) recomputes a segment in the
backward, long after the engine's forward (and its ``LAYER_FORWARD``) ended;
the recomputation must save the same tensors as the forward did, so it must
run the same handler. An engine that ran a layer inside a checkpointed
segment registers itself in ``RECOMPUTE_FORWARD`` (layer -> weak reference to
an object with ``recompute_forward(layer, input)``); a layer with no handler
set uses it only while torch is recomputing a checkpointed segment.
"""

from __future__ import annotations

import contextvars
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .activations import activate, check_activation
from .feedback import feedback_matrix, seeded_generator

# The forward handler of the engine running the model now, if any (see the module docstring). A context
# variable, not an attribute on the layers: layers stay picklable and free of references to a wrapper,
# and one layer can be trained by two wrappers in turn.
LAYER_FORWARD: contextvars.ContextVar = contextvars.ContextVar("fastdfa_layer_forward", default=None)
# module -> weakref to the engine that recomputes it inside a checkpointed segment (module docstring).
RECOMPUTE_FORWARD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _saved_tensors_pack_hook_name() -> str:
    """The qualified name of the innermost saved-tensors pack hook ('' when none, or when this torch
    has no way to tell): torch.utils.checkpoint's non-reentrant form runs its forward under
    ``_checkpoint_hook`` and its recomputation under ``_recomputation_hook``."""
    try:
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    except (AttributeError, TypeError, RuntimeError):  # a torch without it: no checkpoint support
        return ""
    return getattr(hooks[0], "__qualname__", "") if hooks else ""


def in_checkpoint_forward() -> bool:
    """Whether this runs inside the forward of a ``torch.utils.checkpoint`` segment (non-reentrant)."""
    return _saved_tensors_pack_hook_name().startswith("_checkpoint_hook.")


def in_checkpoint_recompute() -> bool:
    """Whether this runs inside autograd's recomputation of a checkpointed segment (non-reentrant)."""
    return _saved_tensors_pack_hook_name().startswith("_recomputation_hook.")


def recompute_handler(module: nn.Module):
    """The forward handler to recompute ``module`` with, when torch is recomputing a checkpointed
    segment that an engine ran it in; else None. A plain forward of ``module`` inside a new checkpointed
    segment (the model called without its engine) makes the engine forget it: that segment is
    recomputed plainly, as it ran."""
    ref = RECOMPUTE_FORWARD.get(module)
    owner = None if ref is None else ref()
    if owner is None:
        return None
    hook = _saved_tensors_pack_hook_name()
    if hook.startswith("_recomputation_hook."):
        return owner.recompute_forward
    if hook.startswith("_checkpoint_hook."):
        owner.forget(module)
    return None


def _handler(module: nn.Module):
    handler = LAYER_FORWARD.get()
    if handler is None and RECOMPUTE_FORWARD:  # an empty dict in every run without checkpointing
        return recompute_handler(module)
    return handler


def init_feedback_weight(layer: nn.Module, seed: int, index: int) -> None:
    """Seed ``layer.feedback_weight`` with U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    That is the bound of torch's default weight init (kaiming_uniform with
    a=sqrt(5)), so B and W have the same scale and FA's dX has BP's magnitude.
    """
    buf = layer.feedback_weight
    if buf.device.type == "meta":
        return
    fan_in = buf[0].numel()
    gen = seeded_generator(seed, "fa", index)
    # feedback_matrix has variance 1/fan; U(-1/sqrt(fan_in), ..) has 1/(3 fan_in).
    values = feedback_matrix(tuple(buf.shape), 3 * fan_in, "uniform", gen, dtype=buf.dtype, device=buf.device)
    with torch.no_grad():
        buf.copy_(values)


class _FALinearFn(torch.autograd.Function):
    """y = x W^T + b; backward uses B (feedback_weight) for dX, exact dW, db."""

    # forward / setup_context split: torch.func transforms (jvp, vmap) need it.
    @staticmethod
    def forward(x, weight, bias, feedback_weight):
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, feedback_weight = inputs
        ctx.set_materialize_grads(False)  # no gradient arrives (a skipped step): none leaves, not zeros
        ctx.save_for_backward(x, feedback_weight)
        ctx.fwd = (x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t, _feedback_t):
        """Forward-mode AD (torch.func.jvp, GrAPE's dual pass): the forward is plain linear, so
        dy = dx W^T + x dW^T + db; B plays no part in it."""
        x, weight = ctx.fwd
        out = torch.zeros((*x.shape[:-1], weight.shape[0]), dtype=x.dtype, device=x.device)
        if x_t is not None:
            out = out + F.linear(x_t, weight)
        if weight_t is not None:
            out = out + F.linear(x, weight_t)
        if bias_t is not None:
            out = out + bias_t
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if grad_out is None:
            return None, None, None, None
        x, feedback_weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ feedback_weight  # [..., out] @ [out, in] -> [..., in]
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = g2.t() @ x.reshape(-1, x.shape[-1])  # [out, N] @ [N, in]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b, None


class _FAConv2dFn(torch.autograd.Function):
    """Conv2d whose input gradient is computed with B (feedback_weight) in place of W.

    ``aten.convolution_backward`` gives dX from the weight it is handed and dW
    from the input and dY alone, so one call with B yields FA's dX and the true
    dW and db.
    """

    @staticmethod
    def forward(x, weight, bias, feedback_weight, stride, padding, dilation, groups):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, feedback_weight, stride, padding, dilation, groups = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, feedback_weight)
        ctx.fwd = (x, weight)
        ctx.conf = (stride, padding, dilation, groups, bias is not None)

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t, _feedback_t, *_conf_t):
        """Forward-mode AD: the convolution is bilinear, dy = conv(dx, W) + conv(x, dW) + db."""
        x, weight = ctx.fwd
        stride, padding, dilation, groups, _ = ctx.conf
        out = None
        if x_t is not None:
            out = F.conv2d(x_t, weight, None, stride, padding, dilation, groups)
        if weight_t is not None:
            term = F.conv2d(x, weight_t, None, stride, padding, dilation, groups)
            out = term if out is None else out + term
        if out is None:
            out = torch.zeros_like(F.conv2d(x, weight, None, stride, padding, dilation, groups))
        if bias_t is not None:
            out = out + bias_t.view(1, -1, 1, 1)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if grad_out is None:
            return (None,) * 8
        x, feedback_weight = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.conf
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]]
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out, x, feedback_weight,
            [feedback_weight.shape[0]] if has_bias else None,
            list(stride), list(padding), list(dilation), False, [0, 0], groups, mask,
        )
        return (grad_x if mask[0] else None, grad_w if mask[1] else None,
                grad_b if mask[2] else None, None, None, None, None, None)


class Linear(nn.Linear):
    """``torch.nn.Linear`` that can train with FA and DFA, optionally with its activation fused.

    Same signature, forward and state_dict keys as ``torch.nn.Linear``, plus
    ``activation`` (one of ``fastdfa.activations.ACTIVATIONS``: None, "relu",
    "tanh", "sigmoid", "gelu"): the layer computes ``g(x W^T + b)``. With a
    kernel backend in DFA mode that is one fused pass that also saves g''s
    state, and the backward computes this layer's delta inside the projection
    (``fastdfa.engine.fused``). Adds the buffer ``feedback_weight`` (shape of
    ``weight``, not in the layer's own state_dict) used for dX in FA mode.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 activation: str | None = None):
        check_activation(activation)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation
        self.register_buffer("feedback_weight", torch.empty_like(self.weight), persistent=False)
        init_feedback_weight(self, seed=0, index=0)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        handler = _handler(self)
        if handler is not None:
            return handler(self, input)
        return self.plain_forward(input)

    def plain_forward(self, input: torch.Tensor) -> torch.Tensor:
        """``g(x W^T + b)``, autograd's backward (no engine involved)."""
        return activate(self, F.linear(input, self.weight, self.bias), self.activation)

    def fa_forward(self, input: torch.Tensor) -> torch.Tensor:
        """``g(x W^T + b)`` whose backward uses ``feedback_weight`` for dX (Feedback Alignment)."""
        return activate(self, _FALinearFn.apply(input, self.weight, self.bias, self.feedback_weight),
                        self.activation)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", activation={self.activation!r}" if self.activation else "")


def explicit_padding(conv: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad ``x`` the way ``conv`` would and return it with the remaining symmetric padding.

    ``aten.convolution_backward`` only takes symmetric integer padding, so
    non-zero padding modes and the string paddings ("same" may be asymmetric
    when dilation*(k-1) is odd) are applied to ``x`` here first.
    """
    if conv.padding_mode != "zeros":
        return F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), (0, 0)
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return x, (0, 0)
        left, extra = [], [0, 0, 0, 0]
        for dim, (k, d) in enumerate(zip(conv.kernel_size, conv.dilation)):
            total = d * (k - 1)
            left.append(total // 2)
            extra[2 * (1 - dim) + 1] = total - 2 * (total // 2)  # F.pad order: W then H, (left, right)
        if any(extra):
            x = F.pad(x, extra)
        return x, (left[0], left[1])
    return x, tuple(conv.padding)


class Conv2d(nn.Conv2d):
    """``torch.nn.Conv2d`` that can train with FA and DFA.

    Same signature, forward and state_dict keys as ``torch.nn.Conv2d``, plus
    ``activation`` (as for ``fastdfa.Linear``; applied after the convolution
    with torch ops: the convolution itself stays cuDNN's). Adds the buffer
    ``feedback_weight`` (shape of ``weight``, not in the layer's own
    state_dict) used for dX in FA mode.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", device=None, dtype=None, activation: str | None = None):
        check_activation(activation)
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                         device=device, dtype=dtype)
        self.activation = activation
        self.register_buffer("feedback_weight", torch.empty_like(self.weight), persistent=False)
        init_feedback_weight(self, seed=0, index=0)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        handler = _handler(self)
        if handler is not None:
            return handler(self, input)
        return self.plain_forward(input)

    def plain_forward(self, input: torch.Tensor) -> torch.Tensor:
        """The convolution and ``g``, autograd's backward (no engine involved)."""
        return activate(self, super().forward(input), self.activation)

    def fa_forward(self, input: torch.Tensor) -> torch.Tensor:
        """The convolution and ``g``, whose backward uses ``feedback_weight`` for dX (Feedback Alignment)."""
        x, padding = explicit_padding(self, input)
        y = _FAConv2dFn.apply(x, self.weight, self.bias, self.feedback_weight,
                              self.stride, padding, self.dilation, self.groups)
        return activate(self, y, self.activation)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", activation={self.activation!r}" if self.activation else "")


FASTDFA_LAYERS = (Linear, Conv2d)
