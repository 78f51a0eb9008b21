"""A failed backward leaves every ``.grad`` of the wrapped model as it was before it.

A backward can fail after it has written some gradients: a user's tensor hook raises, the allocator runs
out of memory, fastdfa refuses the error (NaN under ``nonfinite="raise"``) after autograd has already
accumulated the head's gradients (``head=``). torch leaves those partial sums in ``.grad``; the next
``optimizer.step()`` (or the next micro-batch of an accumulation) would then move the weights by a
gradient that is neither the rule's nor BP's.

``GradRollback`` closes that. The first fastdfa node a backward reaches (the output node, the NaN guard,
or the start node on a head's output: the node nearest the loss) takes one (``begin``): every trainable
parameter's ``.grad`` as it is then (``None`` costs nothing; an accumulated gradient is copied, one copy
of the gradients while the backward runs). It is queued with autograd's engine as a final callback
(``queue_callback``), which the engine calls only when the whole backward has succeeded: then the copy
is dropped. When the backward fails, the engine drops the callback without calling it, and dropping it
(``__del__``) puts every ``.grad`` back; on the CPU that happens before the exception reaches the caller
of ``backward()``. A refusal raised by fastdfa's own node restores at once (``restore``).

Not covered: gradients written before the backward reaches the first fastdfa node (parameters used
only after the wrapper's output, outside the wrapped model), and a backward under CUDA-graph capture
(``fastdfa.CapturedStep``: a captured step cannot copy on the host's say).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from ..triton_kernels._tables import stream_capturing


class GradRollback:
    """The ``.grad`` of ``params`` as they were when the backward reached the wrapper."""

    __slots__ = ("saved", "finished", "__weakref__")

    def __init__(self, params):
        self.saved = [(p, None if p.grad is None else p.grad.detach().clone()) for p in params]
        self.finished = False

    def __call__(self) -> None:
        """autograd's final callback: the backward succeeded, nothing to put back."""
        self.finished, self.saved = True, []

    def restore(self) -> None:
        saved, self.finished, self.saved = self.saved, True, []
        with torch.no_grad():
            for p, grad in saved:
                if grad is None:
                    p.grad = None
                elif p.grad is not None and p.grad.shape == grad.shape:
                    p.grad.copy_(grad)  # in place: DDP's gradient_as_bucket_view keeps its bucket views
                else:
                    p.grad = grad

    def __del__(self) -> None:
        if not self.finished:  # dropped by autograd's engine uncalled: the backward failed
            self.restore()


class BackwardRollbacks:
    """One wrapper's rollbacks: ``begin`` at each fastdfa node's backward returns the rollback of the
    backward running now (one per backward however many forwards and nodes it covers)."""

    __slots__ = ("model", "current")

    def __init__(self, model: nn.Module):
        self.model = model
        self.current = None  # weakref to the running backward's GradRollback (autograd's engine holds it)

    def __getstate__(self):  # a weakref does not pickle; a copied wrapper has no backward running
        return {"model": self.model}

    def __setstate__(self, state) -> None:
        self.model, self.current = state["model"], None

    def begin(self, like: torch.Tensor) -> GradRollback | None:
        running = self.current() if self.current is not None else None
        if running is not None and not running.finished:
            return running
        if like.is_cuda and stream_capturing(like.device):
            return None
        rollback = GradRollback([p for p in self.model.parameters() if p.requires_grad])
        torch.autograd.Variable._execution_engine.queue_callback(rollback)
        self.current = weakref.ref(rollback)
        return rollback

    def restore_now(self) -> None:
        """A fastdfa node refuses this backward: put the gradients back before the error propagates."""
        running = self.current() if self.current is not None else None
        if running is not None and not running.finished:
            running.restore()


class BackwardStart(torch.autograd.Function):
    """Identity on a head's output (``head=``): the backward reaches it before the head's gradients are
    accumulated, so the rollback is taken there."""

    @staticmethod
    def forward(ctx, rollbacks: BackwardRollbacks, tensor: torch.Tensor):
        ctx.rollbacks = rollbacks
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        ctx.rollbacks.begin(grad_output)
        return None, grad_output
