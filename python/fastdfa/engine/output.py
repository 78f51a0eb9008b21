"""The output node: identity in forward, the whole DFA error routing in backward.

``OutputNode.apply(router, step, output, *site_inputs, *params)`` returns
``output`` (the tensor at the error point, ``engine.error_point``) unchanged;
``step`` is the forward's step context (``engine.recording.StepState``: the resolved kernels, the NaN
policy, the fused plan, the GrAPE estimate); the backward reads nothing else of the wrapper.
Its backward receives the output error ``e = dLoss/dy_hat`` and hands it to ``router.backward``, which returns ``e``
for the output and ``(e @ F_s^T)`` reshaped to the site for every site, all
sites from ONE GEMM (docs/design.md section 2); with a kernel backend, also the
gradients of the claimed fused layers' parameters. Autograd then runs each
block's local backward from its site's projected error and stops at the
block's detached input.
"""

from __future__ import annotations

import math
import weakref

import torch

from ..ops.dfa_project import split_projection
from ..triton_kernels._tables import stream_capturing
from . import fused
from .rollback import BackwardRollbacks


class NonFiniteErrorSignal(FloatingPointError):
    """The output error e holds NaN or inf; nothing was projected or accumulated."""


def all_finite(e: torch.Tensor, compressed: torch.Tensor | None = None) -> bool:
    """Whether ``e`` holds no NaN or inf, by ONE reduction and one host read in the common case.

    A NaN or inf element makes the sum NaN or inf, so a finite sum proves every element finite; only a
    sum that is not finite needs the elementwise check (finite values whose sum overflows). The sum is
    taken in ``e``'s own dtype: a float64 sum of a float32 error first copies it to float64, measured
    here at 43 ms of a 268 ms GPT-2 step for its [1024, 16384] logits' error (copy 29.5 ms, sum 13.3 ms).

    ``compressed``: ``e P^T`` under ``error_rank`` (P dense, every entry finite and non-zero), checked
    instead of ``e``: a NaN or inf in ``e`` makes every column of ``e P^T`` it reaches NaN or inf, so a
    finite ``e P^T`` proves ``e`` finite at k / n_e of the cost; one that is not finite is confirmed on
    ``e`` itself (finite values can overflow a GEMM's sum).
    """
    if compressed is not None and math.isfinite(compressed.sum().item()):
        return True
    if math.isfinite(e.sum().item()):
        return True
    return bool(torch.isfinite(e).all())


class OutputNode(torch.autograd.Function):
    """Identity on the model output; its backward is the whole DFA error routing.

    Inputs after the output: every site's original input, then the parameters
    of the layers whose delta and weight gradient the backward computes itself
    (the claimed fused layers of a kernel backend, ``fastdfa.engine.fused``).
    """

    @staticmethod
    def forward(ctx, router: "ErrorRouter", step, output: torch.Tensor, *tensors: torch.Tensor):
        plan = step.plan
        n_sites = len(tensors) - (0 if plan is None else plan.n_params)
        ctx.router, ctx.step, ctx.n_tensors = router, step, len(tensors)
        batch_dims = router.batch_dims
        step.batch_shape = output.shape[:batch_dims]
        step.site_dtypes = [x.dtype for x in tensors[:n_sites]]
        # per-feature sites take any length: this forward's per-sample shapes, to broadcast the error to
        step.site_shapes = [x.shape[batch_dims:] for x in tensors[:n_sites]] if router.store.per_feature else None
        if plan is not None:  # the fused layers' inputs and states: freed by autograd after the backward
            ctx.save_for_backward(*plan.take_tensors())
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        step = ctx.step
        rollbacks = ctx.router.rollbacks
        rollbacks.begin(grad_output)  # every .grad as it is now, put back if this backward fails
        plan, estimate = step.plan, step.estimate
        if plan is not None:
            plan.put_tensors(ctx.saved_tensors)  # raises torch's error on a second backward without retain_graph
        if estimate is not None:
            # GrAPE steps the feedback after this backward's projection; a second backward through the
            # same graph (retain_graph=True) must project with the feedback this forward used, so keep it.
            ctx.feedback = ctx.router.store.flat.clone()
        try:
            result = ctx.router.backward(grad_output, step, getattr(ctx, "feedback", None))
        except BaseException:
            rollbacks.restore_now()  # the head's gradients of this backward too (head=: accumulated before)
            raise
        finally:
            if plan is not None:
                plan.take_tensors()  # only autograd's saved copies keep them alive
        step.estimate = None  # the alignment step belongs to the forward: once
        if result is None:  # non-finite error, skipped at the user's request
            return (None, None, None) + (None,) * ctx.n_tensors
        output_grad, site_grads, param_grads = result
        return (None, None, output_grad) + tuple(site_grads) + tuple(param_grads)


class ErrorRouter:
    """What the output node's backward does, for one wrapper: everything a backward needs of its forward
    comes in the step context (``engine.recording.StepState``: kernels, NaN policy, plan, shapes), fixed
    when that forward ran, so a mode, backend or NaN policy changed in between is seen from the next
    forward on and the router reads nothing back from the wrapper.

    ``model``: the wrapped model (its parameters' ``.grad``s: the rollback and "skip"); ``store``: the
    wrapper's ``FeedbackStore`` (kept for life); ``batch_dims``: fixed at construction;
    ``on_estimate(estimate)``: GrAPE's alignment step, the one call back into the wrapper, run after the
    whole backward so every projection used the feedback as it was.
    """

    def __init__(self, model, store, batch_dims: int, on_estimate):
        self.model = model
        self.store = store
        self.on_estimate = on_estimate
        self.batch_dims = batch_dims
        self.skipped_steps = 0
        self.rollbacks = BackwardRollbacks(model)  # a failed backward puts every .grad back

    def backward(self, error: torch.Tensor, step, feedback=None):
        """The gradients of one backward of ``step``'s forward (``engine.recording.StepState``)."""
        estimate = step.estimate
        result = self.route(error, step, feedback)
        if result is not None and estimate is not None:
            # After the whole backward, not now: one backward may cover several forwards (two losses summed),
            # and each forward's projection must use the feedback as it was, not as another's alignment left it.
            torch.autograd.Variable._execution_engine.queue_callback(lambda: self.on_estimate(estimate))
        return result

    def usable(self, error: torch.Tensor, nonfinite: str, compressed: torch.Tensor | None = None) -> bool:
        """The NaN policy ``nonfinite`` (every mode, the forward's): True to go on with ``error``; False when
        the step is skipped; raises ``NonFiniteErrorSignal`` for "raise".

        "skip" skips the whole optimizer step, accumulated micro-batches included: every parameter's
        ``.grad`` is set to None now, and every later backward until the next ``torch.optim`` step
        adds nothing (``_SkippedWindow``), so ``optimizer.step()`` leaves the weights alone, momentum
        included, however many micro-batches the step accumulates."""
        if self in _SKIPPED:
            return False  # a later micro-batch of a skipped step: it must not step the weights alone
        # The check reads the error on the host: a captured CUDA graph (fastdfa.CapturedStep) cannot, and
        # leaves NaN/inf to flow into the gradients as BP does.
        if nonfinite == "ignore" or (error.is_cuda and stream_capturing(error.device)) or all_finite(error, compressed):
            return True
        if nonfinite == "raise":
            raise NonFiniteErrorSignal(
                "the output error dLoss/dy_hat holds NaN or inf; no gradient was accumulated. Check the "
                "loss and learning rate, or pass nonfinite='skip' to fastdfa.DFA to skip such steps")
        self.skipped_steps += 1
        _SKIPPED.add(self)
        _watch_optimizer_steps()
        self.clear_grads()
        return False

    def clear_grads(self) -> None:
        for p in self.model.parameters():
            p.grad = None

    def route(self, error: torch.Tensor, step, feedback=None):
        """The gradients of one backward; ``feedback``: the [R, n_out] to project with (None: the store's)."""
        store = self.store
        flat = store.flat if feedback is None else feedback
        batch_shape, site_dtypes, site_shapes, plan = step.batch_shape, step.site_dtypes, step.site_shapes, step.plan
        # n_out from the feedback, not -1: an empty batch (N = 0) has no size to infer it from
        e = error.reshape(math.prod(batch_shape), store.n_out)
        # e P^T before the NaN check: under error_rank the check reads it instead of e (all_finite)
        compressed = store.compress(e) if store.sites and self not in _SKIPPED else e
        if not self.usable(e, step.nonfinite, compressed if compressed is not e else None):
            return None
        kernels = step.kernels
        if plan is not None:
            return fused.fused_backward(step, store, error, flat, compressed)
        sites = store.sites
        if not sites:
            return error, [], []
        projected = kernels.dfa_project(compressed, flat, store.project_sites)  # [N, R]: ONE GEMM
        if store.flat_sites and len(batch_shape) == 1:
            # [N, features] sites (an MLP's): each site's gradient is a column block of the projection, a view
            grads = projected.split(store.split_sizes, dim=1)
            dtype = projected.dtype
            if all(dt == dtype for dt in site_dtypes):
                return error, grads, []
            return error, [g if g.dtype == dt else g.to(dt) for g, dt in zip(grads, site_dtypes)], []
        grads = split_projection(projected, store.layout, batch_shape, site_shapes)
        return error, [g if g.dtype == dt else g.to(dt) for g, dt in zip(grads, site_dtypes)], []


class ErrorGuard(torch.autograd.Function):
    """Identity on the output in modes "fa" and "bp": its backward applies the NaN policy to the output
    error (``ErrorRouter.usable``) before any gradient flows into the model."""

    @staticmethod
    def forward(ctx, router: ErrorRouter, nonfinite: str, output: torch.Tensor):
        ctx.router, ctx.nonfinite = router, nonfinite  # the policy as it was at this forward
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        rollbacks = ctx.router.rollbacks
        rollbacks.begin(grad_output)
        try:
            usable = ctx.router.usable(grad_output, ctx.nonfinite)
        except BaseException:
            rollbacks.restore_now()
            raise
        return None, None, (grad_output if usable else None)


# The routers whose current optimizer step is skipped (nonfinite="skip"): from the non-finite micro-batch
# to the next torch.optim step of an optimizer holding their parameters. Weak: a dropped wrapper leaves.
_SKIPPED: "weakref.WeakSet[ErrorRouter]" = weakref.WeakSet()
_OPTIMIZER_HOOKS: list = []


def _watch_optimizer_steps() -> None:
    """Register (once per process) torch.optim's global step hooks that end a skipped step: before the
    step, the skipped routers' parameters lose any gradient a later backward outside the wrapper gave
    them; after it, the routers train again."""
    if _OPTIMIZER_HOOKS:
        return
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    def owners(optimizer):
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        return [r for r in list(_SKIPPED) if any(id(p) in held for p in r.model.parameters())]

    def before(optimizer, args, kwargs):
        for router in owners(optimizer):
            router.clear_grads()

    def after(optimizer, args, kwargs):
        for router in owners(optimizer):
            _SKIPPED.discard(router)

    _OPTIMIZER_HOOKS.extend([register_optimizer_step_pre_hook(before), register_optimizer_step_post_hook(after)])
