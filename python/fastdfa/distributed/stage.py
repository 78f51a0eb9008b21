"""One stage's side of a pipeline step: its forwards, its DFA backwards, the messages between them.

Per micro-batch ``m`` (``M`` of them, equal slices of the mini-batch along
dim 0) stage ``r`` of ``S``:

* forward: takes ``x_m`` (stage 0) or the activation stage ``r-1`` sent,
  runs its modules through its ``fastdfa.DFA`` (the graph cut at every site,
  its boundary included) and sends the boundary's input to stage ``r+1``;
* the last stage computes ``e_m = dL_m/dy_m / M`` (``L_m`` the loss of the
  micro-batch, so that the step's loss is the mean over micro-batches, as
  torch's schedules with ``scale_grads``), sends it to every other stage, and
  runs its own backward;
* under ``head=`` / ``error_at=`` the last stage runs its backward first, from
  ``dL_m/dy_m / M`` (BP through the head), and sends the error its output node
  received at the error point ``z``, ``e_m = dL_m/dz_m / M`` (``ErrorTap``);
* backward: ``autograd.backward(output_m, e_m)`` through the stage's DFA
  output node: ONE GEMM projects ``e_m`` onto every site of the stage
  (``delta_l = (F_l e_m) * g'(a_l)``, ``dW_l += delta_l^T h_{l-1}``, summed over
  micro-batches by autograd's accumulation into ``.grad``).

Since DFA is linear in ``e`` and the loss is a mean, the accumulated
gradients are those of one whole-model ``fastdfa.DFA`` step on the
mini-batch. Nothing but activations (forward) and ``e`` (from the last
stage) travels between stages; in mode "grape" also the dual pass's primal
and tangent (forward) and the output tangents (from the last stage,
``fastdfa.distributed.grape``).

The first step first runs a *setup* pass: one no-grad, eval-mode forward of
micro-batch 0 through every stage, which fixes the shapes and dtypes of the
activations and of ``e`` (the model output, or ``z``); every later message is checked
against them. Receives are posted in the order their messages are sent
(NCCL matches point-to-point messages by order alone).
"""

from __future__ import annotations

import torch
from torch.nn.parallel.distributed import _find_tensors

from ..engine.error_point import INPUT
from .agreement import Fault, agree
from .schedules import stage_order
from .wire import Wire


class StageRunner:
    """Runs stage ``stage`` of ``num_stages``: ``module`` (a ``StageModule``) through ``wrapper`` (its
    ``fastdfa.DFA``, or ``ddp`` wrapping it), messages through ``wire``; ``grape`` (a ``StageGrape``) in
    mode "grape"."""

    def __init__(self, module, wrapper, wire: Wire, stage: int, num_stages: int, micro_batches: int,
                 schedule: str, batch_dims: int, device: torch.device, ddp=None, data_group=None, grape=None,
                 tap=None):
        self.module, self.wrapper, self.wire = module, wrapper, wire
        self.tap = tap  # the last stage's ErrorTap under head= / error_at= (None: e is taken at the output)
        self.stage, self.num_stages, self.micro_batches = stage, num_stages, micro_batches
        self.schedule, self.batch_dims, self.device = schedule, batch_dims, device
        self.ddp, self.data_group, self.grape = ddp, data_group, grape
        self.last = num_stages - 1
        self.rank = wire.ranks[stage]
        self.spec: dict[str, tuple] = {}  # (shape, dtype) of each message kind, fixed by the setup pass
        self.ready = False

    # ------------------------------------------------------------------ step
    def step(self, x, target, loss_fn) -> tuple[Fault, float]:
        """One mini-batch; returns the step's fault (false if none) and the summed micro-batch losses."""
        fault = Fault(self.stage, self.rank)
        xs, targets = micro_batches(self, x, target, loss_fn, fault)
        if not self.ready:
            self._setup(xs[0] if xs else None, fault)
            if fault:
                return fault, 0.0
        M, r, last = self.micro_batches, self.stage, self.last
        from_last = [self._post_from_last(m) for m in range(M)] if r < last else []
        inputs: dict = {}
        outputs: dict = {}
        loss_sum = 0.0
        skipped = self.wrapper.skipped_steps
        if self.grape is not None:
            self.grape.begin_step()
        for op, m in stage_order(self.schedule, r, self.num_stages, M):
            if op == "B":
                if r < last:
                    e, tangents = (self._take(p, fault) for p in from_last[m])
                    self._backward(m, outputs.pop(m, None), e, tangents, fault)
                continue
            for ahead in (m, m + 1):  # the next micro-batch's messages arrive while this one computes
                if 0 < r and ahead < M and ahead not in inputs:
                    inputs[ahead] = self._post_input(ahead)
            act, dual = inputs.pop(m) if r > 0 else (None, None)
            inp = xs[m] if r == 0 and xs else self._take(act, fault)
            out = self._forward(inp, fault)
            if r == last:
                e, loss = self._output_error(out, targets[m] if targets else None, loss_fn, fault)
                if self.tap is not None:  # the error point is inside: backward first, then send what it projected
                    e = self.tap.error_of(self, m, out, e, fault)
                for s in range(last):
                    self.wire.send(s, e, fault.origin, *self.spec["e"])
                loss_sum += loss
            if self.grape is not None:
                self._dual_pass(m, inp if r == 0 else self._take(dual, fault), fault)
            if r < last:
                outputs[m] = out
            elif self.tap is None:
                self._backward(m, out, e, None, fault)
        if self.grape is not None:
            self.grape.end_step(fault, self.wrapper.skipped_steps != skipped)
        if self.wrapper.skipped_steps != skipped:  # a non-finite e, skipped ("skip"): the whole step is
            for p in self.module.parameters():     # skipped, as a whole-model step would be
                p.grad = None
            self.wrapper.skipped_steps = skipped + 1
        self.wire.flush()
        return fault, loss_sum

    # --------------------------------------------------------------- messages
    def _post_input(self, m: int) -> tuple:
        wire, src = self.wire, self.stage - 1
        act = wire.post(src, *self.spec["in"], f"the activation of micro-batch {m}")
        dual = wire.post(src, *self.spec["dual_in"], f"the dual pass of micro-batch {m}") \
            if self.grape is not None else None
        return act, dual

    def _post_from_last(self, m: int) -> tuple:
        wire = self.wire
        e = wire.post(self.last, *self.spec["e"], f"e of micro-batch {m}")
        t = wire.post(self.last, *self.spec["tangents"], f"the output tangents of micro-batch {m}") \
            if self.grape is not None else None
        return e, t

    def _take(self, pending, fault: Fault):
        """Wait for a posted message; its payload (a FAILED header makes the fault this rank's too)."""
        if pending is None:
            return None
        msg = self.wire.wait(pending)
        if msg.failed:
            fault.adopt(msg.origin)
        return msg.payload

    # ------------------------------------------------------------------ setup
    def _setup(self, x0, fault: Fault) -> None:
        """The setup pass (see the module docstring); every rank knows after it whether it failed."""
        r, last, wire = self.stage, self.last, self.wire
        inp = x0
        if r > 0:
            msg = wire.recv_announced(r - 1, "the setup activation")
            if msg.failed:
                fault.adopt(msg.origin)
            self.spec["in"], inp = (msg.shape, msg.dtype), msg.payload
        out = None
        if not fault:
            try:
                out = self._probe(inp)
            except Exception as exc:  # noqa: BLE001 - every failure must reach every rank
                fault.local(exc)
        spec = ((1,), torch.float32) if out is None else (tuple(out.shape), out.dtype)
        e_spec = spec  # e: the model output's shape, or under head= / error_at= the error point's
        if r == last and self.tap is not None and out is not None:
            e_spec = self.tap.spec
        if r < last:
            wire.send_announced(r + 1, out, fault.origin, *spec)
            self.spec["out"] = spec
            head = wire.recv_header(last, "the model output's shape (setup)")
            if head.failed:
                fault.adopt(head.origin)
            self.spec["e"] = (head.shape, head.dtype)
        else:
            for s in range(last):
                wire.send_header(s, fault.origin, *e_spec)
            self.spec["e"], self.spec["y"] = e_spec, spec
        wire.flush()
        boundary = self.module.boundary
        if boundary is not None and not fault:
            boundary.out_shape, boundary.out_dtype = self.spec["e"][0][self.batch_dims:], self.spec["e"][1]
            boundary.batch_dims = self.batch_dims
        if self.grape is not None:  # one collective: every rank knows after it whether this failed
            self.grape.setup(inp, self.spec["e"][0], self.batch_dims, fault)
            if not fault:
                for kind, of in (("dual_in", "in"), ("dual_out", "out")):
                    if of in self.spec:
                        self.spec[kind] = self.grape.dual_spec(self.spec[of])
                self.spec["tangents"] = self.grape.tangent_spec(r, self.spec["e"][1])
        self.ready = not fault

    def _probe(self, x: torch.Tensor) -> torch.Tensor:
        """The stage's modules on ``x`` without a graph, in eval mode (no running statistics move)."""
        training = [(m, m.training) for m in self.module.modules()]
        tap = self.tap
        try:
            self.module.eval()
            if tap is not None:
                tap.spec, tap.probing = None, True
            with torch.no_grad():
                out = self.module.run_steps(x)
        finally:
            if tap is not None:
                tap.probing = False
            for m, t in training:
                m.training = t
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            raise TypeError(f"stage {self.stage} returned "
                            f"{out.dtype if isinstance(out, torch.Tensor) else type(out).__name__}; a pipeline "
                            "stage must return one floating-point tensor")
        if out.dim() < self.batch_dims:
            raise ValueError(f"stage {self.stage} returned shape {tuple(out.shape)}, with fewer dims than "
                             f"batch_dims={self.batch_dims}")
        if tap is not None:
            tap.check_probed(self.batch_dims)
        return out

    # ----------------------------------------------------------------- compute
    def _forward(self, inp, fault: Fault):
        """One micro-batch through the stage; sends the boundary activation on (stages but the last)."""
        out = act = None
        if not fault:
            try:
                if self.ddp is not None:
                    with self.ddp.no_sync():
                        out = self.ddp(inp)
                else:
                    out = self.wrapper(inp)
                if self.module.boundary is not None:
                    act, self.module.boundary.sent = self.module.boundary.sent, None
                    check_spec(act, self.spec["out"], f"stage {self.stage}'s output")
            except Exception as exc:  # noqa: BLE001
                fault.local(exc)
                out = act = None
        if self.stage < self.last:
            self.wire.send(self.stage + 1, act, fault.origin, *self.spec["out"])
        return out

    def _dual_pass(self, m: int, inp, fault: Fault) -> None:
        """GrAPE's dual pass of micro-batch ``m``; sends it on, or (last stage) the output tangents back."""
        result = None
        if not fault:
            try:
                result = self.grape.forward(m, inp)
            except Exception as exc:  # noqa: BLE001
                fault.local(exc)
        if self.stage < self.last:
            self.wire.send(self.stage + 1, result, fault.origin, *self.spec["dual_out"])
            return
        for s in range(self.last):
            rows = None if result is None else self.grape.rows_for(s, result)
            self.wire.send(s, rows, fault.origin, *self.grape.tangent_spec(s, self.spec["e"][1]))
        if result is not None:
            self.grape.collect(m, self.grape.rows_for(self.stage, result))

    def _output_error(self, y, target, loss_fn, fault: Fault) -> tuple:
        """``e = dL/dy / M`` of one micro-batch (None after a failure) and its loss ``L``."""
        if fault:
            return None, 0.0
        try:
            check_spec(y, self.spec["y"], "the model output")
            leaf = y.detach().requires_grad_(True)
            loss = loss_fn(leaf, target)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError("loss_fn must return a scalar tensor, got " + (
                    type(loss).__name__ if not isinstance(loss, torch.Tensor) else f"shape {tuple(loss.shape)}"))
            (grad,) = torch.autograd.grad(loss, leaf)
            return grad / self.micro_batches, float(loss.detach())
        except Exception as exc:  # noqa: BLE001
            fault.local(exc)
            return None, 0.0

    def _backward(self, m: int, out, e, tangents, fault: Fault) -> None:
        """The DFA backward of micro-batch ``m``; under DDP the last one all-reduces the gradients."""
        final = m == self.micro_batches - 1
        if self.ddp is not None and final:
            agree(self.data_group, self.device, fault)  # every replica skips the reducing backward, or none
        if fault or out is None:
            return
        try:
            if self.ddp is not None and final:
                self.ddp.reducer.prepare_for_backward(list(_find_tensors(out)))  # as torch's pipelining does
            torch.autograd.backward(out, e)
            if tangents is not None:
                self.grape.collect(m, tangents)
        except Exception as exc:  # noqa: BLE001
            fault.local(exc)


class ErrorTap:
    """The last stage's view of the error point under ``head=`` / ``error_at=``: a hook on that module,
    registered after its ``fastdfa.DFA``'s own, so it sees the tensor the wrapper's output node returned.
    In the setup pass (``probing``) it notes that tensor's shape and dtype, the shape of the ``e`` every
    stage receives; in a training forward it puts a gradient hook on it, which keeps (while ``armed``: the
    stage's backward) the error the output node's backward receives and projects, ``dL/dz``."""

    def __init__(self, module, kind: str, name: str):
        self.kind, self.name = kind, name
        self.spec: tuple | None = None
        self.grad: torch.Tensor | None = None
        self.probing = self.armed = False
        if kind == INPUT:
            self.handle = module.register_forward_pre_hook(self._input, with_kwargs=True)
        else:
            self.handle = module.register_forward_hook(self._output)

    def error_of(self, runner: StageRunner, m: int, out, e, fault: Fault):
        """The last stage's backward of micro-batch ``m`` from ``e = dL/dy / M``, which trains what runs after
        the error point by BP and projects the error there onto the stage's sites; returns that error,
        ``dL/dz / M`` at the error point ``z``, for the other stages (None after a failure)."""
        self.grad, self.armed = None, True
        try:
            runner._backward(m, out, e, None, fault)
        finally:
            self.armed = False
        grad, self.grad = self.grad, None
        if fault:
            return None
        try:
            if grad is None:
                raise RuntimeError(f"the backward of the last stage gave no gradient at {self.describe()}: the "
                                   "model output does not depend on the tensor there")
            check_spec(grad, runner.spec["e"], f"the error at {self.describe()}")
        except Exception as exc:  # noqa: BLE001
            fault.local(exc)
            return None
        return grad

    def describe(self) -> str:
        return f"the input of head={self.name!r}" if self.kind == INPUT else f"the output of error_at={self.name!r}"

    def _see(self, t) -> None:
        if not isinstance(t, torch.Tensor):
            return
        if self.probing:
            self.spec = (tuple(t.shape), t.dtype)
        elif torch.is_grad_enabled() and t.requires_grad:
            t.register_hook(self._keep)

    def _keep(self, grad: torch.Tensor) -> None:
        if self.armed:
            self.grad = grad

    def _input(self, module, args, kwargs):
        self._see(args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None))

    def _output(self, module, args, output):
        self._see(output)

    def check_probed(self, batch_dims: int) -> None:
        if self.spec is None:
            raise RuntimeError(f"{self.describe()} did not run in the last stage's forward (or is not a tensor): "
                               "every forward must run it")
        shape, dtype = self.spec
        if len(shape) < batch_dims or not dtype.is_floating_point:
            raise ValueError(f"{self.describe()} is a tensor of shape {shape} ({dtype}): the error point must be "
                             f"a floating-point tensor with the batch_dims={batch_dims} batch dims")


def micro_batches(runner: StageRunner, x, target, loss_fn, fault: Fault):
    """The micro-batches of ``x`` (stage 0) and ``target`` (last stage) on the stage's device, after checking
    who gave what; ``(None, None)`` and the fault set if something is wrong."""
    r, last, M = runner.stage, runner.last, runner.micro_batches
    ranks = runner.wire.ranks
    where = f"rank {runner.rank} (stage {r})"
    try:
        if r == 0 and not isinstance(x, torch.Tensor):
            raise ValueError(f"{where} holds stage 0 and needs the input: pass the mini-batch x to pipe.step on "
                             f"this rank, got {type(x).__name__}")
        if r > 0 and x is not None:
            raise ValueError(f"x was given on {where}: only stage 0 (rank {ranks[0]}) takes the input; pass "
                             "x=None on the other ranks")
        if r == last and not isinstance(target, torch.Tensor):
            raise ValueError(f"{where} holds the last stage and needs the target: pass it to pipe.step on this "
                             f"rank, got {type(target).__name__}")
        if r < last and target is not None:
            raise ValueError(f"target was given on {where}: only the last stage (rank {ranks[last]}) takes it; "
                             "pass target=None on the other ranks")
        if r == last and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(output, target), got {loss_fn!r}")
        xs = _split(x.to(runner.device), M, "x") if r == 0 else None
        targets = _split(target.to(runner.device), M, "target") if r == last else None
        return xs, targets
    except (ValueError, TypeError) as exc:
        fault.local(exc)
        return None, None


def _split(t: torch.Tensor, count: int, name: str) -> list[torch.Tensor]:
    if t.dim() == 0 or t.shape[0] % count:
        raise ValueError(f"{name} of shape {tuple(t.shape)} does not split into micro_batches={count} equal "
                         f"micro-batches along dim 0: use a batch size divisible by {count}")
    return list(t.tensor_split(count))


def check_spec(t, spec, what: str) -> None:
    """Raise unless ``t`` is a tensor of the (shape, dtype) the setup pass fixed."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be one tensor, got {type(t).__name__}")
    shape, dtype = spec
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        raise ValueError(f"{what} has shape {tuple(t.shape)} ({t.dtype}), but the pipeline was set up at its "
                         f"first step for {tuple(shape)} ({dtype}): every step must give the stages the same "
                         "shapes (the same batch size; drop a smaller last batch, e.g. DataLoader(drop_last="
                         "True)), or build a new DFAPipeline")
