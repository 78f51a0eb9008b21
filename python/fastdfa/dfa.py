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

from .backends import BackendUnavailableError, KernelBackend, backend_for, get_backend
from .config import DFAConfig, WrapperOptions
from .engine import fused, grape_pass
from .engine.guard import ForwardGuard
from .engine.output import ErrorGuard, ErrorRouter, NonFiniteErrorSignal, OutputNode
from .engine.recording import FAForward, Recorder, Recording, discover
from .engine.sites import FeedbackStore, Site, check_state_dict
from .layers import FASTDFA_LAYERS, init_feedback_weight

__all__ = ["DFA", "Site", "NonFiniteErrorSignal", "backprop", "using_mode"]


class DFA(WrapperOptions, nn.Module):
    """Train ``model`` with DFA, FA, GrAPE or BP.

    Args (every option is checked by ``fastdfa.DFAConfig``, which documents it):
        model: any ``nn.Module`` holding fastdfa layers (or ``sites``).
        mode: "dfa", "fa", "bp" or "grape"; settable at any time via ``dfa.mode``.
        seed: seeds every feedback matrix, independently of the global RNG and device.
        feedback, feedback_scale: "uniform" or "gaussian", variance ``feedback_scale**2 / n``.
        sites: extra modules whose inputs become sites (DFA between them, BP inside them).
        feedback_layout: "dense" (one row per element of a site) or "per-feature" (one row per feature,
            broadcast over tokens / space: the site then takes any length); ``conv_feedback="channel"``
            is the older conv spelling of "per-feature".
        batch_dims: leading dims treated as the batch (2 for ``[batch, tokens, ...]`` models).
        nonfinite: a NaN/inf output error "raise"s ``NonFiniteErrorSignal``, is "skip"ped
            (``dfa.skipped_steps``), or is "ignore"d (no host sync, NaN flows on as in BP).
        example_input: build the feedback now with one no-grad forward in eval mode.
        backend: "auto", "torch", "triton" or "cuda" (None: ``FASTDFA_BACKEND`` or "auto").
        wgrad, streams: the kernel backends' weight gradients (one grouped launch or per layer;
            the cuda backend's stream pool, None: ``FASTDFA_STREAMS`` or 4).
        feedback_lr, perturb, jvp: mode "grape": the alignment step size, where the JVP perturbs,
            how the tangents are run (``fastdfa.engine.grape_pass``).
    """

    def __init__(self, model: nn.Module, mode: str = "dfa", seed: int = 0, feedback: str = "uniform",
                 sites: list[nn.Module] | None = None, *, conv_feedback: str = "dense", feedback_layout: str = "dense",
                 feedback_scale: float = 1.0, batch_dims: int = 1, nonfinite: str = "raise",
                 example_input=None, backend: str | None = None, wgrad: str = "grouped",
                 feedback_lr: float = 0.5, perturb: str = "activation", jvp: str = "per-site",
                 streams: int | None = None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        config = DFAConfig(mode=mode, seed=seed, feedback=feedback, conv_feedback=conv_feedback,
                           feedback_layout=feedback_layout, feedback_scale=feedback_scale, batch_dims=batch_dims, nonfinite=nonfinite,
                           backend=backend, wgrad=wgrad, streams=streams, feedback_lr=feedback_lr,
                           perturb=perturb, jvp=jvp)
        config = dataclasses.replace(config, streams=config.stream_count)  # FASTDFA_STREAMS read once, here
        names, candidates, user_sites, layers = discover(model, sites, FASTDFA_LAYERS)
        if backend not in (None, "auto"):  # an explicit request fails now, before the model is touched
            _check_dtype(backend_for(backend, _device_of(model)), model)
        self.model = model
        self._config = config
        self.module_names = names
        self.feedback = FeedbackStore()
        self.feedback.fa_layers = layers
        fusable = {m for m in candidates if isinstance(m, FASTDFA_LAYERS) and m not in set(user_sites)}
        self._recorder = Recorder(model, names, candidates, user_sites, layers, fusable, config.batch_dims)
        self._fa_forward = FAForward(self._recorder)
        self._guard = ForwardGuard(model)
        self._router = ErrorRouter(self, self._align)
        self.perturbations = self.feedback.perturbations = grape_pass.PerturbationStream(config.seed)
        self.kernels: KernelBackend | None = None  # resolved on the first DFA forward
        self.last_alignment: torch.Tensor | None = None  # per site: mean column cos(F, J_hat^T) before the last step
        self._fusion: tuple[str | None, dict] = ("no training forward has run yet", {})
        for i, layer in enumerate(layers):
            init_feedback_weight(layer, config.seed, i)
        self.mode = mode
        if example_input is not None:
            self.build(example_input)

    @classmethod
    def from_config(cls, model: nn.Module, config: DFAConfig, *, sites=None, example_input=None) -> "DFA":
        return cls(model, sites=sites, example_input=example_input, **dataclasses.asdict(config))

    @property
    def skipped_steps(self) -> int:
        return self._router.skipped_steps

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._router.skipped_steps = value

    # ------------------------------------------------------------- sites
    @property
    def sites(self) -> list[Site]:
        """The sites from input to output (empty until the feedback is built)."""
        return list(self.feedback.sites or [])

    @property
    def built(self) -> bool:
        return self.feedback.sites is not None

    @property
    def out_features(self) -> int | None:
        return self.feedback.n_out

    @property
    def execution_order(self) -> tuple[nn.Module, ...]:
        """The first module executed, then every site module, in the order they run (once built)."""
        return self._recorder.expected or ()

    def name_of(self, module: nn.Module) -> str:
        return self.module_names[module]

    @property
    def backend(self) -> str | None:
        """The backend resolved on the first DFA forward (None before)."""
        return None if self.kernels is None else self.kernels.name

    @property
    def fused_layers(self) -> list[str]:
        """Names of the layers whose delta and weight gradient the last training forward left to the
        fused backward (kernel backends; ``fastdfa.engine.fused``). Empty with the torch backend."""
        return [n for n, why in self.fusion_report().items() if why == fused.FUSED]

    def fusion_report(self) -> dict[str, str]:
        """For every fastdfa layer: "fused", or why the last training forward did not fuse it."""
        refusal, reasons = self._fusion
        if self.kernels is not None and not self.kernels.fuses_layers:
            refusal = self.kernels.fused_route_refusal(False)
        return {self.module_names[m]: refusal or reasons.get(m, "did not run in the last training forward")
                for m in self.feedback.fa_layers}

    @contextlib.contextmanager
    def using_backend(self, name: str):
        """Run the block on backend ``name`` (e.g. "torch" for a measurement), then restore."""
        self._resolve_backend(())
        previous, self.kernels = self.kernels, get_backend(name)
        try:
            yield self
        finally:
            self.kernels = previous

    def build(self, example_input) -> None:
        """Build the feedback now from one no-grad forward of ``example_input`` in eval mode
        (eval, so BatchNorm statistics and dropout RNG are left alone)."""
        was_training = [(m, m.training) for m in self.modules()]
        args = example_input if isinstance(example_input, tuple) else (example_input,)
        try:
            self.eval()
            with torch.no_grad():
                self._forward_rule(args, {})
        finally:
            for m, t in was_training:
                m.training = t

    # ----------------------------------------------------------- forward
    def forward(self, *args, **kwargs):
        mode, built = self._config.mode, self.feedback.sites is not None
        grad = torch.is_grad_enabled()
        self._recorder.pending.clear()  # the last forward's checkpointed sites (recomputed as IT ran them)
        if mode in ("dfa", "grape") and (grad or not built):
            return self._guard.run(self._forward_rule, args, kwargs, built)
        if not grad:
            return self.model(*args, **kwargs)
        if mode == "fa":
            token = self._recorder.begin(self._fa_forward)
            try:
                output = self.model(*args, **kwargs)
            finally:
                self._recorder.end(token)
        else:
            output = self.model(*args, **kwargs)
        if self._config.nonfinite == "ignore" or not isinstance(output, torch.Tensor):
            return output
        return ErrorGuard.apply(self._router, output)  # the NaN policy holds in every mode

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, but every key and shape is checked first: a checkpoint that does
        not fit raises before anything is written (torch's own load copies what fits, then raises)."""
        problems = check_state_dict(self.state_dict(keep_vars=True), state_dict, strict, self.built)
        if problems:
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__} (nothing was "
                               "loaded):\n\t" + "\n\t".join(problems))
        self._guard.forget()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _forward_rule(self, args, kwargs):
        kernels = self.kernels or self._resolve_backend(args)
        grad = torch.is_grad_enabled()
        recorder = self._recorder
        plan = refusal = None
        if grad and kernels.fuses_layers:
            refusal = kernels.fused_route_refusal(any(torch.is_autocast_enabled(t) for t in ("cuda", "cpu")))
            plan = fused.FusedPlan() if refusal is None and recorder.fusable else None
        store = self.feedback
        rec = Recording(recorder, store, kernels, plan)
        token = recorder.begin(rec)
        try:
            output = self.model(*args, **kwargs)
        finally:
            recorder.end(token)
        batch_dims = self._config.batch_dims
        n_out = rec.check_output(output, batch_dims)
        if store.sites is None:
            self._build_sites(rec, output, n_out)
        else:
            rec.check_complete(output, n_out)
        if not grad:
            return output
        params = ()
        n = output.shape[:batch_dims].numel()
        if plan is not None:
            params = plan.finish(rec.inputs, store.sites, output, n_out, n)
            plan.reasons.update(rec.unfused)
            self._fusion = (None, plan.reasons)
        elif kernels.fuses_layers:
            self._fusion = (refusal or "no fastdfa layer outside the sites= modules", {})
        estimate = None
        if self._config.mode == "grape" and store.sites:
            estimate = self.jacobian_estimate(args, kwargs, n)
        return OutputNode.apply(self._router, plan, estimate, output, *rec.inputs, *params)

    def jacobian_estimate(self, args: tuple, kwargs: dict, n: int) -> grape_pass.GrapeEstimate:
        """GrAPE's dual pass on the built wrapper: every site's perturbation and output tangent, drawn
        from ``self.perturbations`` (``n``: the batch rows of ``args``)."""
        if not self.built:
            raise RuntimeError("the feedback is not built yet: run one forward of the wrapper first, or pass "
                               "example_input= to fastdfa.DFA")
        config = self._config
        return grape_pass.dual_pass(self.model, self._recorder, self.feedback.sites, self._resolve_backend(args),
                                    self.perturbations, config.perturb, config.jvp, args, kwargs, n)

    def dual_forward(self, inj: grape_pass.DualPass):
        """Context manager: a forward of ``self.model`` in it is a GrAPE dual pass through ``inj``
        (``grape_pass.dual_forward``); a pipeline stage (``fastdfa.distributed``) runs its part so."""
        return grape_pass.dual_forward(self.model, self._recorder, inj)

    def _align(self, estimate) -> None:
        self.last_alignment = grape_pass.align_feedback(self.kernels, self.feedback, estimate, self.feedback_lr)

    def _build_sites(self, rec: Recording, output: torch.Tensor, n_out: int) -> None:
        if not rec.order:
            raise RuntimeError("no fastdfa layer or site module ran in the forward pass")
        params = [p for p in self.model.parameters() if p.is_floating_point()]
        config = self._config
        self.feedback.build(rec.order[1:], rec.shapes, self.module_names, n_out, seed=config.seed,
                            kind=config.feedback, scale=config.feedback_scale,
                            per_feature=config.feedback_layout == "per-feature",
                            dtype=params[0].dtype if params else output.dtype, device=output.device)
        self._recorder.freeze(rec.order, self.feedback.sites)

    def _resolve_backend(self, args) -> KernelBackend:
        """Pick the backend on the first DFA forward, from where the model lives (before any state)."""
        if self.kernels is None:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            device = _device_of(self.model, tensors[0].device if tensors else torch.device("cpu"))
            kernels = backend_for(self._config.backend, device)
            _check_dtype(kernels, self.model)
            self.kernels = kernels
        return self.kernels

    def extra_repr(self) -> str:
        sites = len(self.feedback.sites) if self.built else "unbuilt"
        return (f"mode={self.mode!r}, seed={self.seed}, feedback={self.feedback_kind!r}, sites={sites}, "
                f"backend={self.backend!r}")


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
