"""``fastdfa.DFA``: train a model with DFA, FA, GrAPE or BP, through a true graph cut.

A *site* is the input of a DFA-trained module: the fastdfa layers and the
modules named in ``sites=`` (fastdfa layers inside those are not sites: BP
runs inside them), except the first of them executed, whose input is the
data. In mode "dfa" each site module computes on ``x.detach()``, so autograd
never computes an input gradient (dX) for it, and the original ``x`` of every
site goes to one output node whose backward projects the output error
``e = dLoss/dy_hat`` to every site in ONE GEMM. For
``h_l = g(W_l h_{l-1} + b_l)`` that gives ``delta_l = (F_l e) * g'(a_l)`` and
``dW_l = delta_l h_{l-1}^T`` (Nøkland 2016); the output layer gets ``e``. Plain
``loss.backward()``, any loss, any ``torch.optim`` optimizer and DDP work
because gradients arrive through autograd's accumulation (docs/design.md
section 2).

This class is the front: the parts live in ``fastdfa.engine`` (``sites``: the
feedback store; ``recording``: the forward recording and its checks;
``output``: the output node and the error routing; ``fused``: the kernel
backends' fused route; ``grape_pass``: GrAPE's dual pass), its options in
``fastdfa.config.DFAConfig``.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn

from .backends import BackendUnavailableError, KernelBackend, backend_for
from .config import DFAConfig, WrapperOptions
from .engine import error_point, fused, grape_pass
from .engine.guard import ForwardGuard, Snapshot, evaluating, split_call
from .engine.output import ErrorGuard, ErrorRouter, NonFiniteErrorSignal, OutputNode
from .engine.recording import FAForward, GuardOnly, Recorder, Recording, StepState, discover
from .engine.sites import FeedbackStore, Site, check_state_dict
from .layers import FASTDFA_LAYERS
from .pretrained import PretrainedMixin, wrapper_class
from .views import WrapperViews

__all__ = ["DFA", "Site", "NonFiniteErrorSignal", "backprop", "using_mode"]


class DFA(PretrainedMixin, WrapperViews, WrapperOptions, nn.Module):
    """Train ``model`` with DFA, FA, GrAPE or BP.

    ``DFA(model, config=None, *, sites=None, example_input=None, **options)``: the options are
    ``fastdfa.DFAConfig``'s fields (``config`` with ``options`` applied; every one is checked there and
    documented there and in docs/usage.md). The most used:

        mode: "dfa", "fa", "bp" or "grape"; settable at any time via ``dfa.mode``.
        seed: seeds every feedback matrix, independently of the global RNG and device.
        feedback_layout: "dense" (one row per element of a site) or "per-feature" (one row per feature,
            broadcast over tokens / space: the site then takes any length).
        batch_dims: leading dims treated as the batch (2 for ``[batch, tokens, ...]`` models).
        error_at, head: where the error is taken (``fastdfa.engine.error_point``): by default the
            model's output tensor, or the module whose output a returned ``ModelOutput``'s ``logits``
            is; ``error_at=NAME`` that module's output; ``head=NAME`` its input (NAME and what runs
            after it train by BP).
        nonfinite: a NaN/inf output error "raise"s ``NonFiniteErrorSignal``, is "skip"ped
            (``dfa.skipped_steps``), or is "ignore"d (no host sync, NaN flows on as in BP).
        backend: "auto", "torch", "triton" or "cuda" (None: ``FASTDFA_BACKEND`` or "auto").

    ``sites``: extra modules whose inputs become sites (DFA between them, BP inside them); ``example_input``:
    build the feedback now (one no-grad forward in eval mode); a str ``config`` is ``mode`` (the older form).
    The model's own output is returned (a ``ModelOutput`` with HF's ``labels=`` loss in it); unknown
    attributes are the model's (``fastdfa.pretrained``).
    """

    def __new__(cls, model=None, *args, **kwargs):  # forward() gets the model's signature (for Trainer)
        return super().__new__(wrapper_class(DFA, type(model)) if cls is DFA and isinstance(model, nn.Module) else cls)

    def __init__(self, model: nn.Module, config: DFAConfig | str | None = None, *, sites: list[nn.Module] | None = None,
                 example_input=None, **options):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(config, str):
            config, options = None, {"mode": config, **options}
        config = DFAConfig.from_options(config, **options)
        config = dataclasses.replace(config, streams=config.stream_count)  # FASTDFA_STREAMS read once, here
        point = error_point.from_config(model, config.error_at, config.head)  # a bad name raises here
        names, candidates, user_sites, layers = discover(model, sites, FASTDFA_LAYERS)
        if config.backend not in (None, "auto"):  # an explicit request fails now, before the model is touched
            _check_dtype(backend_for(config.backend, _device_of(model)), model)
        self.model = model
        self._config = config
        self.module_names = names
        self.conversion = None  # what fastdfa.prepare converted (saved by save_pretrained)
        self.feedback = FeedbackStore(layers, grape_pass.PerturbationStream(config.seed))
        fusable = {m for m in candidates if isinstance(m, fused.FUSABLE) and m not in set(user_sites)}
        self._recorder = Recorder(model, names, candidates, user_sites, layers, fusable, config.batch_dims)
        self._recorder.guard_error = self._guard_error
        self._point = None  # where e is taken (engine.error_point); None: found on the first training forward
        if point is not None:
            self._set_point(point)
        self._fa_forward = FAForward(self._recorder)
        self._guard = ForwardGuard(model)
        self._router = ErrorRouter(model, self.feedback, config.batch_dims, self._align)
        self._recorder.rollbacks = self._router.rollbacks
        self.kernels: KernelBackend | None = None  # resolved on the first DFA forward
        self.last_alignment: torch.Tensor | None = None  # per site: mean column cos(F, J_hat^T) before the last step
        self._fusion: tuple[str | None, dict] = ("no training forward has run yet", {})
        self.feedback.seed_fa_feedback(config.seed)
        if example_input is not None:
            self.build(example_input)

    @classmethod
    def from_config(cls, model: nn.Module, config: DFAConfig, *, sites=None, example_input=None) -> "DFA":
        return cls(model, config, sites=sites, example_input=example_input)

    def _set_point(self, point) -> None:
        self._point = point
        self._recorder.attach(point, FASTDFA_LAYERS)

    def _guard_error(self, tensor: torch.Tensor) -> torch.Tensor:
        policy = self._config.nonfinite
        return tensor if policy == "ignore" else ErrorGuard.apply(self._router, policy, tensor)

    def build(self, example_input) -> None:
        """Build the feedback now from one no-grad forward of ``example_input`` (a tuple of positional
        inputs, a dict of keyword inputs, or one input) in eval mode (eval, so BatchNorm statistics and
        dropout RNG are left alone)."""
        args, kwargs = split_call(example_input)
        with evaluating(self), torch.no_grad():
            self._forward_rule(args, kwargs)

    # ----------------------------------------------------------- forward
    def forward(self, *args, **kwargs):
        mode, built = self._config.mode, self.feedback.sites is not None
        grad = torch.is_grad_enabled()
        recorder = self._recorder
        recorder.pending.clear()  # the last forward's checkpointed sites (recomputed as IT ran them)
        if self.feedback.unseeded:  # a model built on the meta device, materialised since (to_empty)
            self.feedback.seed_materialised(self._config.seed)
        if mode in ("dfa", "grape") and (grad or not built):
            return self._guard.run(self._forward_rule, args, kwargs, built)
        if not grad:
            return self.model(*args, **kwargs)
        point = self._point
        inside = point is not None and point.kind != error_point.RETURN
        if mode == "fa":
            token = recorder.begin(self._fa_forward)
            try:
                output = self.model(*args, **kwargs)
            finally:
                recorder.end(token)
        elif inside:  # mode "bp": only the error point is intercepted (the NaN policy), not the layers
            recorder.active = GuardOnly(recorder)
            try:
                output = self.model(*args, **kwargs)
            finally:
                recorder.active = None
        else:
            output = self.model(*args, **kwargs)
        if self._config.nonfinite == "ignore" or inside or not isinstance(output, torch.Tensor):
            return output
        return ErrorGuard.apply(self._router, self._config.nonfinite, output)  # the NaN policy, every mode

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, but every key and shape is checked first: a checkpoint that does
        not fit raises before anything is written (torch's own load copies what fits, then raises). A tied
        alias the checkpoint leaves out (``fastdfa.pretrained``) is filled from the key it is tied to."""
        aliases = self._aliases()
        given = {k: v for k, v in state_dict.items() if k not in aliases}
        problems = check_state_dict(self.state_dict(keep_vars=True), given, strict, self.built)
        if problems:
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__} (nothing was "
                               "loaded):\n\t" + "\n\t".join(problems))
        self._guard.forget()
        return super().load_state_dict(self._fill_aliases(given), strict=strict, assign=assign)

    def _forward_rule(self, args, kwargs):
        kernels = self.kernels or self._resolve_backend(args, kwargs)
        if self._point is not None:
            output, rec = self._record(kernels, args, kwargs)
        else:  # the first training forward: find the error point, then run again with it in place
            devices = {a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)}
            snapshot = Snapshot(self.model, devices)
            tracker = error_point.OutputTracker(self.model)
            try:
                output, rec = self._record(kernels, args, kwargs)
            finally:
                tracker.close()
            if isinstance(output, torch.Tensor):
                self._set_point(error_point.ErrorPoint(error_point.RETURN))
            else:
                point = tracker.point_for(self.model, output)
                del output, rec, tracker  # the discarded forward's graph
                snapshot.restore()  # dropout's RNG and BatchNorm's statistics: as if it never ran
                self._set_point(point)
                output, rec = self._record(kernels, args, kwargs)
        point = self._point
        if point.kind == error_point.RETURN:
            output = rec.at_error_point(output)
        elif not rec.done:
            raise RuntimeError(f"the error is taken at {point.describe()}, but that module did not run in this "
                               "forward; every training forward must run it")
        if rec.plan is not None:  # the layers that ran after the error point (BP) say so in fusion_report
            rec.plan.reasons.update(rec.unfused)
        step = rec.step
        if rec.grad and self._config.mode == "grape" and self.feedback.sites and step.rows:  # an empty batch
            step.estimate = self.jacobian_estimate(args, kwargs, step.rows)
        return output

    def _record(self, kernels, args, kwargs):
        """Run the model once under a ``Recording``; (its output, the recording)."""
        recorder = self._recorder
        plan = refusal = None
        if torch.is_grad_enabled() and kernels.fuses_layers:
            refusal = kernels.fused_route_refusal(any(torch.is_autocast_enabled(t) for t in ("cuda", "cpu")))
            plan = fused.FusedPlan() if refusal is None and recorder.fusable else None
        step = StepState.of(self._config, kernels, self.module_names, plan, refusal)  # fixed for the backward
        rec = Recording(recorder, self.feedback, step, self._take_error)
        token = recorder.begin(rec)
        try:
            # No-grad forwards (a build) must take the path training forwards take: torch's
            # TransformerEncoder "fast path" (eval + no_grad) would skip the layers, recording none.
            with contextlib.nullcontext() if rec.grad else grape_pass.no_mha_fast_path():
                output = self.model(*args, **kwargs)
        finally:
            recorder.end(token)
        return output, rec

    def _take_error(self, rec: Recording, tensor: torch.Tensor) -> torch.Tensor:
        """At the error point: check the error tensor, build the feedback on the first forward, and put the
        output node on it (a training forward)."""
        batch_dims = self._config.batch_dims
        n_out = rec.check_output(tensor, batch_dims)
        store = self.feedback
        if store.sites is None:
            self._build_sites(rec, tensor, n_out)
        else:
            rec.check_complete(tensor, n_out)
        n = tensor.shape[:batch_dims].numel()
        rec.step.rows = n
        if not rec.grad:
            return tensor
        if not store.sites:
            _refuse_uncovered(rec, self._point, self.model)
        plan, params = rec.plan, ()
        if plan is not None:
            params = plan.finish(rec.inputs, store.sites, tensor, n_out, n)
            plan.reasons.update(rec.unfused)
            self._fusion = (None, plan.reasons)
        elif rec.kernels.fuses_layers:
            self._fusion = (rec.step.refusal or "no fastdfa layer outside the sites= modules", {})
        return OutputNode.apply(self._router, rec.step, tensor, *rec.inputs, *params)

    def jacobian_estimate(self, args: tuple, kwargs: dict, n: int) -> grape_pass.GrapeEstimate:
        """GrAPE's dual pass on the built wrapper: every site's perturbation and output tangent, drawn
        from ``self.perturbations`` (``n``: the batch rows of ``args``)."""
        if not self.built:
            raise RuntimeError("the feedback is not built yet: run one forward of the wrapper first, or pass "
                               "example_input= to fastdfa.DFA")
        config = self._config
        return grape_pass.dual_pass(self.model, self._recorder, self.feedback.sites,
                                    self._resolve_backend(args, kwargs),
                                    self.perturbations, config.perturb, config.jvp, args, kwargs, n)

    def dual_forward(self, inj: grape_pass.DualPass):
        """Context manager: a forward of ``self.model`` in it is a GrAPE dual pass through ``inj``
        (``grape_pass.dual_forward``); a pipeline stage (``fastdfa.distributed``) runs its part so."""
        return grape_pass.dual_forward(self.model, self._recorder, inj)

    def _align(self, estimate) -> None:
        self.last_alignment = grape_pass.align_feedback(self.kernels, self.feedback, estimate, self.feedback_lr)

    def _build_sites(self, rec: Recording, output: torch.Tensor, n_out: int) -> None:
        if not rec.order:
            raise RuntimeError(f"no fastdfa layer or site module ran before the error point ({self.error_point}): "
                               "nothing trains with DFA. Convert the model's linear layers (fastdfa.prepare(model) "
                               "or fastdfa.convert(model)) or name blocks with sites=[...]")
        first = next((p for p in self.model.parameters() if p.is_floating_point()), output)
        config = self._config
        self.feedback.build(rec.order[1:], rec.shapes, self.module_names, n_out, seed=config.seed,
                            kind=config.feedback, scale=config.feedback_scale,
                            per_feature=config.feedback_layout == "per-feature", dtype=first.dtype,
                            device=output.device, rank=config.error_rank)
        self._recorder.freeze(rec.order, self.feedback.sites)

    def _resolve_backend(self, args, kwargs=None) -> KernelBackend:
        """Pick the backend on the first DFA forward, from where the model lives (before any state)."""
        if self.kernels is None:
            self.kernels = _resolve(self._config.backend, self.model, (*args, *(kwargs or {}).values()))
        return self.kernels


def _resolve(backend: str | None, model: nn.Module, inputs: tuple) -> KernelBackend:
    """The backend ``backend`` names for where ``model`` lives (else its first tensor input), dtype-checked."""
    tensors = [a for a in inputs if isinstance(a, torch.Tensor)]
    kernels = backend_for(backend, _device_of(model, tensors[0].device if tensors else torch.device("cpu")))
    _check_dtype(kernels, model)
    return kernels


def _refuse_uncovered(rec: Recording, point, model: nn.Module) -> None:
    """No site: the first module that ran is the only one, so its input is taken as the data. If trainable
    parameters compute that input (an embedding, blocks the conversion left alone), the error would reach
    them by exact BP: the rule would change silently, so refuse, naming them."""
    x = rec.first_input
    if not isinstance(x, torch.Tensor) or x.grad_fn is None:
        return  # the data itself: DFA and BP coincide on a one-layer model
    reached, seen, todo = set(), set(), [x.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)
        if variable is not None:
            reached.add(id(variable))
        todo.extend(f for f, _ in fn.next_functions)
    names = [n for n, p in model.named_parameters() if id(p) in reached]
    if not names:
        return
    first = "one fastdfa layer or site module is the only one"
    if rec.order:  # a fastdfa layer, or a sites= module (not in the recorder's layer names)
        module = rec.order[0]
        name = rec.recorder.names.get(module) or next(n for n, m in model.named_modules() if m is module)
        first = f"{name!r} is the only fastdfa layer or site module"
    shown = ", ".join(map(repr, names[:4])) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    raise RuntimeError(f"fastdfa.DFA has no site: {first} that runs before the error "
                       f"point ({point.describe()}), so its input is taken as the data, yet {len(names)} trainable "
                       f"parameters compute that input ({shown}): they would train by exact BP, silently. Convert "
                       "the layers before it (fastdfa.prepare(model) converts every linear map, Hugging Face's "
                       "Conv1D included), name blocks with sites=[...], or take the error earlier (head=...)")


def _device_of(model: nn.Module, default: torch.device = torch.device("cpu")) -> torch.device:
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    return default if first is None else first.device


def _check_dtype(kernels: KernelBackend, model: nn.Module) -> None:
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    why = kernels.dtype_refusal(torch.float32 if first is None else first.dtype)
    if why is not None:
        raise BackendUnavailableError(why)


@contextlib.contextmanager
def using_mode(dfa: DFA, mode: str):
    """Run the block in ``mode``, then restore the wrapper's mode."""
    if not isinstance(dfa, DFA):
        raise TypeError(f"fastdfa needs a fastdfa.DFA here, got {type(dfa).__name__}")
    previous = dfa.mode
    dfa.mode = mode
    try:
        yield dfa
    finally:
        dfa.mode = previous


def backprop(dfa: DFA):
    """Run exact BP inside the block (e.g. a calibration step), then restore the mode."""
    if not isinstance(dfa, DFA):
        raise TypeError(f"fastdfa.backprop needs a fastdfa.DFA, got {type(dfa).__name__}")
    return using_mode(dfa, "bp")
