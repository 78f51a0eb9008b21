"""Drop-in ``fastdfa.Linear``, ``Conv1d``, ``Conv2d`` and ``Conv1D``.

``Linear`` / ``Conv1d`` / ``Conv2d`` are ``torch.nn.Linear`` / ``torch.nn.Conv1d``
/ ``torch.nn.Conv2d``, and ``Conv1D`` is Hugging Face's GPT-2 style
``transformers.pytorch_utils.Conv1D`` (a linear layer with the weight stored
transposed, ``[in, out]``), each with the same constructor, forward result and
state_dict keys (a torch / Hugging Face checkpoint loads into them and a
fastdfa one loads back), plus one non-persistent buffer, ``feedback_weight``,
with the shape of ``weight``: the fixed random matrix that Feedback Alignment
(FA, Lillicrap et al. 2016) uses in place of the weight for the input
gradient. ``fastdfa.DFA`` seeds it and saves it in its own state_dict; the
layer alone never does, so its keys stay torch's.

Two forwards, chosen by the engine that runs the layer:
    ``plain_forward``: the torch (or Hugging Face) computation and the activation
              (BP; in DFA the graph cut is done by the engine: the input arrives detached).
    ``fa_forward``: the same result; its backward computes dX with
              ``B = feedback_weight`` in place of the weight: ``dY @ B`` (Linear),
              ``dY @ B^T`` (Conv1D, B being ``[in, out]``) or the transposed
              convolution of dY with B (Conv1d, Conv2d); dW and db are the usual ones.
Called on its own (no engine), a layer is its torch counterpart: ``plain_forward``.

This module does not import ``transformers``: ``Conv1D`` re-implements
Hugging Face's forward op for op (``torch.addmm``), so ``import fastdfa``
stays lean; ``fastdfa.convert`` finds Hugging Face's class only when it is
already loaded.

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
    ``fan_in`` is the number of inputs each output sees: ``weight[0].numel()``
    for a weight ``[out, in, *kernel]`` (Linear, Conv1d, Conv2d) and
    ``weight.shape[0]`` for Conv1D's ``[in, out]``.
    """
    buf = layer.feedback_weight
    if buf.device.type == "meta":
        return
    fan_in = buf.shape[0] if isinstance(layer, Conv1D) else buf[0].numel()
    gen = seeded_generator(seed, "fa", index)
    # feedback_matrix has variance 1/fan; U(-1/sqrt(fan_in), ..) has 1/(3 fan_in).
    values = feedback_matrix(tuple(buf.shape), 3 * fan_in, "uniform", gen, dtype=buf.dtype, device=buf.device)
    with torch.no_grad():
        buf.copy_(values)


def _in_dtype_of(grad_out: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The saved tensors in the dtype of the output gradient: under ``torch.autocast`` the forward ran in
    the autocast dtype (bfloat16, say) on float32 inputs and weights, so the backward's GEMMs take the
    gradient's dtype, as autocast's own ops do (autograd casts each returned gradient to its input's dtype)."""
    return tuple(t if t.dtype == grad_out.dtype else t.to(grad_out.dtype) for t in tensors)


def _bilinear_jvp(product, x, weight, x_t, weight_t, bias_t, out_shape) -> torch.Tensor:
    """The tangent of ``y = product(x, W) + b``, bilinear in (x, W): ``dy = product(dx, W) + product(x, dW)
    + db`` (absent tangents are zero), of shape ``out_shape``."""
    out = x.new_zeros(out_shape)
    if x_t is not None:
        out = out + product(x_t, weight)
    if weight_t is not None:
        out = out + product(x, weight_t)
    if bias_t is not None:
        out = out + bias_t
    return out


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
        return _bilinear_jvp(F.linear, x, weight, x_t, weight_t, bias_t, (*x.shape[:-1], weight.shape[0]))

    @staticmethod
    def backward(ctx, grad_out):
        if grad_out is None:
            return None, None, None, None
        x, feedback_weight = _in_dtype_of(grad_out, *ctx.saved_tensors)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ feedback_weight  # [..., out] @ [out, in] -> [..., in]
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = g2.t() @ x.reshape(-1, x.shape[-1])  # [out, N] @ [N, in]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b, None


class _FAConv1DFn(torch.autograd.Function):
    """Hugging Face's Conv1D on a 2-d input: y = b + x W, x [N, in], W [in, out]; backward uses
    B (feedback_weight, [in, out]) for dX = dY B^T, exact dW = x^T dY, db = sum_N dY."""

    @staticmethod
    def forward(x, weight, bias, feedback_weight):
        return torch.addmm(bias, x, weight)  # Hugging Face's op: the same bits as its module

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, feedback_weight = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, feedback_weight)
        ctx.fwd = (x, weight)

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t, _feedback_t):
        """Forward-mode AD: y is bilinear in (x, W) plus b, so dy = dx W + x dW + db; B plays no part."""
        x, weight = ctx.fwd
        return _bilinear_jvp(torch.matmul, x, weight, x_t, weight_t, bias_t, (x.shape[0], weight.shape[1]))

    @staticmethod
    def backward(ctx, grad_out):
        if grad_out is None:
            return None, None, None, None
        x, feedback_weight = _in_dtype_of(grad_out, *ctx.saved_tensors)
        grad_x = grad_out @ feedback_weight.t() if ctx.needs_input_grad[0] else None  # [N, out] @ [out, in]
        grad_w = x.t() @ grad_out if ctx.needs_input_grad[1] else None                # [in, N] @ [N, out]
        grad_b = grad_out.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


def _conv(weight: torch.Tensor):
    """``F.conv1d`` for a weight ``[out, in/groups, k]``, ``F.conv2d`` for ``[out, in/groups, kh, kw]``."""
    return F.conv1d if weight.dim() == 3 else F.conv2d


class _FAConvFn(torch.autograd.Function):
    """Conv1d / Conv2d whose input gradient is computed with B (feedback_weight) in place of W.

    ``aten.convolution_backward`` gives dX from the weight it is handed and dW
    from the input and dY alone, so one call with B yields FA's dX and the true
    dW and db. ``stride``, ``padding``, ``dilation``: one int per spatial dim
    (``padding`` symmetric: see ``explicit_padding``).
    """

    @staticmethod
    def forward(x, weight, bias, feedback_weight, stride, padding, dilation, groups):
        return _conv(weight)(x, weight, bias, stride, padding, dilation, groups)

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
        conv = _conv(weight)
        out = None
        if x_t is not None:
            out = conv(x_t, weight, None, stride, padding, dilation, groups)
        if weight_t is not None:
            term = conv(x, weight_t, None, stride, padding, dilation, groups)
            out = term if out is None else out + term
        if out is None:
            out = torch.zeros_like(conv(x, weight, None, stride, padding, dilation, groups))
        if bias_t is not None:
            out = out + bias_t.view(1, -1, *[1] * (weight.dim() - 2))  # [C] -> [1, C, 1(, 1)]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if grad_out is None:
            return (None,) * 8
        x, feedback_weight = _in_dtype_of(grad_out, *ctx.saved_tensors)
        stride, padding, dilation, groups, has_bias = ctx.conf
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]]
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out, x, feedback_weight,
            [feedback_weight.shape[0]] if has_bias else None,
            list(stride), list(padding), list(dilation), False, [0] * (x.dim() - 2), groups, mask,
        )
        return (grad_x if mask[0] else None, grad_w if mask[1] else None,
                grad_b if mask[2] else None, None, None, None, None, None)


def _activation_repr(layer) -> str:
    return f", activation={layer.activation!r}" if layer.activation else ""


class _Layer:
    """What every fastdfa layer shares (a mixin before the torch class): the ``activation`` option, the
    ``feedback_weight`` buffer, and a forward that hands over to the engine's handler when one is set."""

    def _add_feedback(self, activation: str | None) -> None:
        self.activation = activation
        self.register_buffer("feedback_weight", torch.empty_like(self.weight), persistent=False)
        init_feedback_weight(self, seed=0, index=0)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        handler = _handler(self)
        if handler is not None:
            return handler(self, input)
        return self.plain_forward(input)


class Linear(_Layer, nn.Linear):
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
        self._add_feedback(activation)

    def plain_forward(self, input: torch.Tensor) -> torch.Tensor:
        """``g(x W^T + b)``, autograd's backward (no engine involved)."""
        return activate(self, F.linear(input, self.weight, self.bias), self.activation)

    def fa_forward(self, input: torch.Tensor) -> torch.Tensor:
        """``g(x W^T + b)`` whose backward uses ``feedback_weight`` for dX (Feedback Alignment)."""
        return activate(self, _FALinearFn.apply(input, self.weight, self.bias, self.feedback_weight),
                        self.activation)

    def extra_repr(self) -> str:
        return super().extra_repr() + _activation_repr(self)


class Conv1D(_Layer, nn.Module):
    """Hugging Face's GPT-2 style ``transformers.pytorch_utils.Conv1D`` that can train with FA and DFA.

    A linear layer with the weight stored transposed: ``weight`` is ``[nx, nf]``
    (in, out), ``bias`` is ``[nf]``, and ``y = g(x W + b)`` over the last axis
    of ``x`` ``[..., nx] -> [..., nf]``, computed as Hugging Face does
    (``torch.addmm`` on ``x`` viewed as ``[N, nx]``), so the result is the same
    bits. Same constructor (``Conv1D(nf, nx)``, output features first), init
    (``W ~ N(0, 0.02^2)``, ``b = 0``), attributes (``nf``, ``nx``) and
    state_dict keys as Hugging Face's, plus ``activation`` (as for
    ``fastdfa.Linear``), ``in_features`` / ``out_features`` (``nx`` / ``nf``,
    read by code written for ``Linear``) and the buffer ``feedback_weight``
    (``[nx, nf]`` like ``weight``, not in the layer's own state_dict): FA's
    input gradient is ``dX = dY @ feedback_weight^T``.
    """

    def __init__(self, nf: int, nx: int, device=None, dtype=None, activation: str | None = None):
        check_activation(activation)
        super().__init__()
        self.nf = nf
        self.nx = nx
        self.weight = nn.Parameter(torch.empty(nx, nf, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(nf, device=device, dtype=dtype))
        nn.init.normal_(self.weight, std=0.02)
        self._add_feedback(activation)

    @property
    def in_features(self) -> int:
        return self.nx

    @property
    def out_features(self) -> int:
        return self.nf

    def plain_forward(self, input: torch.Tensor) -> torch.Tensor:
        """``g(x W + b)``, Hugging Face's forward, autograd's backward (no engine involved)."""
        y = torch.addmm(self.bias, input.view(-1, input.size(-1)), self.weight)  # [N, nx] @ [nx, nf]
        return activate(self, y.view(input.size()[:-1] + (self.nf,)), self.activation)

    def fa_forward(self, input: torch.Tensor) -> torch.Tensor:
        """``g(x W + b)`` whose backward uses ``feedback_weight`` for dX (Feedback Alignment)."""
        y = _FAConv1DFn.apply(input.view(-1, input.size(-1)), self.weight, self.bias, self.feedback_weight)
        return activate(self, y.view(input.size()[:-1] + (self.nf,)), self.activation)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}" + _activation_repr(self)


def explicit_padding(conv: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Pad ``x`` the way ``conv`` would and return it with the remaining symmetric padding (one int
    per spatial dim).

    ``aten.convolution_backward`` only takes symmetric integer padding, so
    non-zero padding modes and the string paddings ("same" may be asymmetric
    when dilation*(k-1) is odd: torch puts the extra element on the right) are
    applied to ``x`` here first.
    """
    dims = len(conv.kernel_size)
    if conv.padding_mode != "zeros":
        return F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), (0,) * dims
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return x, (0,) * dims
        left, extra = [], [0] * (2 * dims)
        for dim, (k, d) in enumerate(zip(conv.kernel_size, conv.dilation)):
            total = d * (k - 1)
            left.append(total // 2)
            # F.pad's order: the last dim first, (left, right) each.
            extra[2 * (dims - 1 - dim) + 1] = total - 2 * (total // 2)
        if any(extra):
            x = F.pad(x, extra)
        return x, tuple(left)
    return x, tuple(conv.padding)


class _Conv(_Layer):
    """The fastdfa part of ``Conv1d`` and ``Conv2d`` (before ``nn.Conv1d`` / ``nn.Conv2d`` in their MRO)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", device=None, dtype=None, activation: str | None = None):
        check_activation(activation)
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                         device=device, dtype=dtype)
        self._add_feedback(activation)

    def plain_forward(self, input: torch.Tensor) -> torch.Tensor:
        """The convolution and ``g``, autograd's backward (no engine involved)."""
        return activate(self, self._conv_forward(input, self.weight, self.bias), self.activation)  # torch's forward

    def fa_forward(self, input: torch.Tensor) -> torch.Tensor:
        """The convolution and ``g``, whose backward uses ``feedback_weight`` for dX (Feedback Alignment)."""
        x, padding = explicit_padding(self, input)
        y = _FAConvFn.apply(x, self.weight, self.bias, self.feedback_weight,
                            self.stride, padding, self.dilation, self.groups)
        return activate(self, y, self.activation)

    def extra_repr(self) -> str:
        return super().extra_repr() + _activation_repr(self)


class Conv1d(_Conv, nn.Conv1d):
    """``torch.nn.Conv1d`` that can train with FA and DFA.

    Same signature, forward and state_dict keys as ``torch.nn.Conv1d``, plus
    ``activation`` (as for ``fastdfa.Linear``; applied after the convolution
    with torch ops). Adds the buffer ``feedback_weight`` (shape of ``weight``,
    ``[out, in/groups, k]``, not in the layer's own state_dict) used for dX in
    FA mode: dX is the transposed convolution of dY with it.
    """


class Conv2d(_Conv, nn.Conv2d):
    """``torch.nn.Conv2d`` that can train with FA and DFA.

    Same signature, forward and state_dict keys as ``torch.nn.Conv2d``, plus
    ``activation`` (as for ``fastdfa.Linear``; applied after the convolution
    with torch ops: the convolution itself stays cuDNN's). Adds the buffer
    ``feedback_weight`` (shape of ``weight``, not in the layer's own
    state_dict) used for dX in FA mode.
    """


FASTDFA_LAYERS = (Linear, Conv2d, Conv1d, Conv1D)
