"""``fastdfa.DFA``: the learning-rule engine with a true graph cut.

A *site* is the input of a DFA-trained module: the fastdfa layers and the
modules the user names in ``sites=`` (fastdfa layers inside those are not
sites: BP runs inside them), except the first of them executed, whose input is
the data. In mode "dfa":

  * a forward pre-hook hands each site module ``x.detach()``, so autograd
    never computes an input gradient (dX) for it: the matmul BP spends on dX
    is not done at all;
  * the original ``x`` of every site goes to one output node
    (``_DFAOutputFn``), identity in forward. Its backward receives the output
    error ``e = dLoss/dy_hat`` and returns ``e`` for the output and
    ``(e @ F_s^T)`` reshaped to the site for every site, all sites in ONE GEMM
    over the concatenated feedback (``project.dfa_project_reference``);
  * autograd then runs each block's local backward (activation derivative,
    pooling, weight gradient) from its site's projected error and stops at the
    block's detached input.

So for ``h_l = g(W_l h_{l-1} + b_l)``, the site at the input of layer l+1
(holding ``h_l``, feedback ``F_l``) gives ``delta_l = (F_l e) * g'(a_l)`` and
``dW_l = delta_l h_{l-1}^T`` (Nøkland 2016); the output layer gets ``e``.
Plain ``loss.backward()``, any loss, any ``torch.optim`` optimizer and DDP work
because gradients arrive through autograd's accumulation.

Modes "bp" (plain autograd) and "fa" (fastdfa layers use ``feedback_weight``
for dX) run the model unchanged; ``fastdfa.backprop(dfa)`` switches to "bp"
for a block of code.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from . import fused, grape
from .backends import BackendUnavailableError, kernels_for, resolve_backend
from .feedback import FEEDBACK_KINDS, feedback_matrix, seeded_generator
from .triton_kernels._tables import stream_capturing
from .layers import FASTDFA_LAYERS, _init_feedback_weight
from .project import dfa_project_reference

MODES = ("bp", "fa", "dfa", "grape")
CONV_FEEDBACK = ("dense", "channel")
# What a NaN/inf output error does. "raise" and "skip" read the error on the host: one device sync per
# backward, which stalls the CPU's launch queue on a GPU; "ignore" checks nothing (BP's behaviour).
NONFINITE = ("raise", "skip", "ignore")
WGRAD = ("grouped", "per-layer")


class NonFiniteErrorSignal(FloatingPointError):
    """The output error e holds NaN or inf; nothing was projected or accumulated."""


class Site:
    """One feedback site: the input of ``module``.

    ``feedback`` is a view of rows ``[offset, offset + rows)`` of the wrapper's
    concatenated feedback buffer, shape ``(rows, out_features)``: ``rows`` is
    the site's features (dense) or its channels (channel-wise, broadcast over
    space). Writing into it changes the feedback used by the next backward.
    """

    def __init__(self, owner: "DFA", index: int, name: str, module: nn.Module,
                 shape: tuple[int, ...], channelwise: bool, offset: int, rows: int):
        self._owner = owner
        self.index = index
        self.name = name
        self.module = module
        self.shape = shape          # per-sample shape of the site tensor
        self.channelwise = channelwise
        self.offset = offset
        self.rows = rows

    @property
    def feedback(self) -> torch.Tensor:
        return self._owner.feedback.flat[self.offset:self.offset + self.rows]

    @property
    def features(self) -> int:
        return math.prod(self.shape)

    def __repr__(self) -> str:
        kind = "channel-wise" if self.channelwise else "dense"
        return f"Site({self.index}: {self.name!r}, shape={self.shape}, {kind} feedback {tuple(self.feedback.shape)})"


class _FeedbackStore(nn.Module):
    """Holds all sites' feedback as ONE buffer ``flat`` of shape ``(R, n_out)``.

    ``flat`` is a non-persistent buffer (so ``.to()`` moves it); the state_dict
    gets one readable key per site (``feedback.0``, ``feedback.1``, ...) and one
    per FA layer (``feedback.fa.<i>``), written and read by the two overrides
    below. A state_dict loaded before the first forward (feedback not built
    yet) is kept and used, shape-checked, when the sites are built.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("flat", None, persistent=False)
        self.fa_layers: list[nn.Module] = []  # plain list: not submodules, the model owns them
        self.sites: list[Site] | None = None  # set by DFA when the sites are built
        self.pending: dict[str, torch.Tensor] = {}  # loaded before the build, used by it
        self.pending_names: list[str] | None = None

    @property
    def site_names(self) -> list[str] | None:
        return None if self.sites is None else [s.name for s in self.sites]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for site in self.sites or ():
            destination[prefix + str(site.index)] = site.feedback if keep_vars else site.feedback.detach()
        for i, layer in enumerate(self.fa_layers):
            value = layer.feedback_weight
            destination[prefix + f"fa.{i}"] = value if keep_vars else value.detach()
        if self.sites is not None:
            destination[prefix + "_extra_state"] = {"sites": self.site_names}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        mine = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        extra = mine.pop("_extra_state", None)
        for i, layer in enumerate(self.fa_layers):
            value = mine.pop(f"fa.{i}", None)
            if value is None:
                if strict:
                    missing_keys.append(prefix + f"fa.{i}")
                continue
            if value.shape != layer.feedback_weight.shape:
                error_msgs.append(f"{prefix}fa.{i}: shape {tuple(value.shape)} does not match the FA feedback "
                                  f"of shape {tuple(layer.feedback_weight.shape)}")
                continue
            with torch.no_grad():
                layer.feedback_weight.copy_(value)
        site_values = {k: v for k, v in mine.items() if k.isdigit()}
        for k in mine:
            if not k.isdigit() and strict:
                unexpected_keys.append(prefix + k)
        sites = self.sites
        if extra is not None and sites is not None and list(extra["sites"]) != self.site_names:
            error_msgs.append(f"{prefix}: checkpoint sites {extra['sites']} differ from this model's "
                              f"sites {self.site_names}")
            return
        if self.flat is None or not sites:
            # Not built yet: keep the values; the build uses them (shape-checked).
            self.pending = {k: v.detach().clone() for k, v in site_values.items()}
            if extra is not None:
                self.pending_names = list(extra["sites"])
            return
        for site in sites:
            value = site_values.get(str(site.index))
            if value is None:
                if strict:
                    missing_keys.append(prefix + str(site.index))
                continue
            if value.shape != site.feedback.shape:
                error_msgs.append(f"{prefix}{site.index} (site {site.name!r}): shape {tuple(value.shape)} does "
                                  f"not match the feedback of shape {tuple(site.feedback.shape)}")
                continue
            with torch.no_grad():
                site.feedback.copy_(value)
        for k in site_values:
            if int(k) >= len(sites) and strict:
                unexpected_keys.append(prefix + k)


@dataclass
class _Recording:
    """What one forward in DFA mode saw: modules in execution order, site inputs."""

    order: list[nn.Module] = field(default_factory=list)
    inputs: list[torch.Tensor] = field(default_factory=list)
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    plan: "fused.FusedPlan | None" = None  # the fused layers' records, with a kernel backend


class _DFAOutputFn(torch.autograd.Function):
    """Identity on the model output; its backward is the whole DFA error routing.

    Inputs after the output: every site's original input, then the parameters
    of the layers whose delta and weight gradient the backward computes itself
    (the claimed fused layers of a kernel backend, ``fastdfa.fused``).
    """

    @staticmethod
    def forward(ctx, engine: "DFA", plan, estimate, output: torch.Tensor, *tensors: torch.Tensor):
        n_sites = len(tensors) - (0 if plan is None else plan.n_params)
        ctx.engine, ctx.plan, ctx.estimate, ctx.n_tensors = engine, plan, estimate, len(tensors)
        ctx.batch_shape = tuple(output.shape[:engine.batch_dims])
        ctx.site_dtypes = [x.dtype for x in tensors[:n_sites]]
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        result = ctx.engine._backward(grad_output, ctx.batch_shape, ctx.site_dtypes, ctx.plan, ctx.estimate)
        ctx.plan = ctx.estimate = None  # the saved activations of the fused layers go with them
        if result is None:  # non-finite error, skipped at the user's request
            return (None, None, None, None) + (None,) * ctx.n_tensors
        output_grad, site_grads, param_grads = result
        return (None, None, None, output_grad) + tuple(site_grads) + tuple(param_grads)


class DFA(nn.Module):
    """Train ``model`` with DFA, FA or BP.

    Args:
        model: any ``nn.Module`` holding fastdfa layers (or ``sites``).
        seed: seeds every feedback matrix (site feedback and FA
            ``feedback_weight``), independently of the global RNG and device.
        mode: "dfa", "fa", "bp" or "grape" (DFA whose feedback learns from a JVP each step,
            ``fastdfa.grape``); settable at any time via ``dfa.mode``.
        feedback: "uniform" or "gaussian"; variance ``feedback_scale**2 / n``
            with ``n`` the site's elements per sample (see ``fastdfa.feedback``).
        sites: extra modules whose inputs become sites (DFA between them, BP
            inside them); fastdfa layers inside them are not sites.
        conv_feedback: "dense" (``(C*H*W, n_out)`` per conv site) or "channel"
            (``(C, n_out)``, the projection broadcast over space).
        feedback_scale: multiplies the default feedback scale.
        batch_dims: leading dims shared by site tensors and the output and
            treated as the batch (2 for ``[batch, tokens, ...]`` models).
        nonfinite: what a NaN/inf output error does: "raise"
            (``NonFiniteErrorSignal``, no gradient accumulated), "skip"
            (no gradient accumulated for the step, ``dfa.skipped_steps`` += 1)
            or "ignore" (no check: NaN/inf flow into the gradients, as in BP).
            "raise" and "skip" read the error on the host, one device sync
            per backward on a GPU; "ignore" keeps the step free of syncs.
        example_input: build the feedback now with one no-grad forward in eval
            mode instead of on the first training forward.
        backend: "auto", "torch", "triton" or "cuda" (None: ``FASTDFA_BACKEND``
            or "auto"); see ``fastdfa.backends``. A kernel backend fuses the
            fastdfa.Linear layers (``fastdfa.fused``).
        wgrad: with a kernel backend, the claimed layers' weight gradients as
            one "grouped" GEMM launch (``dfa_wgrad``) or one GEMM per layer
            ("per-layer"). On the cuda backend "grouped" fans the per-layer
            GEMMs out over ``streams`` CUDA side streams (None:
            ``FASTDFA_STREAMS``, else 4; 1 runs them in order on the current
            stream); see ``fastdfa.streams``.
        feedback_lr, perturb, jvp: mode "grape" only: the alignment step size,
            where the JVP perturbs ("activation", "weight", "auto") and how the
            tangents are run ("per-site", "shared"); see ``fastdfa.grape``.
    """

    def __init__(self, model: nn.Module, mode: str = "dfa", seed: int = 0, feedback: str = "uniform",
                 sites: list[nn.Module] | None = None, *, conv_feedback: str = "dense",
                 feedback_scale: float = 1.0, batch_dims: int = 1, nonfinite: str = "raise",
                 example_input=None, backend: str | None = None, wgrad: str = "grouped",
                 feedback_lr: float = 0.5, perturb: str = "activation", jvp: str = "per-site",
                 streams: int | None = None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if feedback not in FEEDBACK_KINDS:
            raise ValueError(f"feedback must be one of {FEEDBACK_KINDS}, got {feedback!r}")
        if conv_feedback not in CONV_FEEDBACK:
            raise ValueError(f"conv_feedback must be one of {CONV_FEEDBACK}, got {conv_feedback!r}")
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        if wgrad not in WGRAD:
            raise ValueError(f"wgrad must be one of {WGRAD}, got {wgrad!r}")
        if streams is None:
            streams = _env_streams()
        if not isinstance(streams, int) or isinstance(streams, bool) or streams < 1:
            raise ValueError(f"streams must be an int >= 1 (1: no side streams), got {streams!r}")
        if perturb not in grape.PERTURB:
            raise ValueError(f"perturb must be one of {grape.PERTURB}, got {perturb!r}")
        if jvp not in grape.JVP:
            raise ValueError(f"jvp must be one of {grape.JVP}, got {jvp!r}")
        if not (isinstance(feedback_lr, (int, float)) and math.isfinite(feedback_lr) and feedback_lr > 0):
            raise ValueError(f"feedback_lr must be a positive finite number, got {feedback_lr!r}")
        if not (isinstance(batch_dims, int) and batch_dims >= 1):
            raise ValueError(f"batch_dims must be an int >= 1, got {batch_dims!r}")
        if not math.isfinite(feedback_scale) or feedback_scale <= 0:
            raise ValueError(f"feedback_scale must be a positive finite number, got {feedback_scale!r}")

        # Keyed by the modules themselves, not id(): copy.deepcopy maps the keys to the copied modules.
        names = {m: n for n, m in model.named_modules()}
        user_sites = list(sites or [])
        for m in user_sites:
            if m not in names:
                raise ValueError(f"site module {type(m).__name__} is not a submodule of the model")
            if m is model:
                raise ValueError("the model itself cannot be a site: its input is the data")
        user_ids = {id(m) for m in user_sites}
        if len(user_ids) != len(user_sites):
            raise ValueError("sites= names the same module twice")
        inside_user = set()
        for m in user_sites:
            for sub in m.modules():
                if sub is not m:
                    if id(sub) in user_ids:
                        raise ValueError(f"site {names[sub]!r} is inside site {names[m]!r}; "
                                         "name only the outer one (BP runs inside a site module)")
                    inside_user.add(id(sub))
        layers = [m for m in model.modules() if isinstance(m, FASTDFA_LAYERS)]
        if not layers and not user_sites:
            raise ValueError("the model has no fastdfa layer (fastdfa.Linear / fastdfa.Conv2d) and no "
                             "sites= were given: nothing for DFA to train. Replace torch.nn.Linear/Conv2d "
                             "with fastdfa.Linear/Conv2d, or name blocks with sites=[...].")
        if backend not in (None, "auto"):  # an explicit request fails now, before the model is touched
            params = list(model.parameters())
            _check_backend_dtype(resolve_backend(backend, params[0].device if params else torch.device("cpu")),
                                 params[0].dtype if params else torch.float32)

        self.model = model
        self.seed = int(seed)
        self.feedback_kind = feedback
        self.conv_feedback = conv_feedback
        self.feedback_scale = float(feedback_scale)
        self.batch_dims = batch_dims
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self._requested_backend = backend
        self.wgrad = wgrad
        self.streams = streams
        self.feedback_lr = float(feedback_lr)
        self.perturb = perturb
        self.jvp = jvp
        self._jvp = None                    # the dual pass in progress (grape.dual_pass)
        self._grape_generators: dict = {}   # device -> seeded generator of the perturbations
        self.last_alignment: torch.Tensor | None = None  # per site: mean column cos(F, J_hat^T) before the last step
        self._names = names
        self._candidates = [m for m in model.modules()
                            if (isinstance(m, FASTDFA_LAYERS) and id(m) not in inside_user) or id(m) in user_ids]
        self.feedback = _FeedbackStore()
        self.feedback.fa_layers = layers
        self._n_out: int | None = None
        self._recording: _Recording | None = None
        self._backend: str | None = None
        self._kernels = None  # the kernel backend's ops, once resolved
        self._fused_names: list[str] = []
        # fastdfa layers whose input is detached (or data): a kernel backend fuses them.
        self._fusable = {m for m in self._candidates if isinstance(m, FASTDFA_LAYERS) and id(m) not in user_ids}
        for i, layer in enumerate(layers):
            _init_feedback_weight(layer, self.seed, i)
        self._hooks = [m.register_forward_pre_hook(self._pre_hook) for m in self._candidates]
        self._mode = "bp"
        self.mode = mode
        if example_input is not None:
            self.build(example_input)

    # ------------------------------------------------------------------ mode
    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {value!r}")
        self._mode = value
        for layer in self.feedback.fa_layers:
            layer._fa_active = value == "fa"

    # ----------------------------------------------------------------- sites
    @property
    def _sites(self) -> list[Site] | None:
        return self.feedback.sites

    @property
    def sites(self) -> list[Site]:
        """The sites from input to output (empty until the feedback is built)."""
        return list(self._sites or [])

    @property
    def built(self) -> bool:
        return self._sites is not None

    @property
    def out_features(self) -> int | None:
        return self._n_out

    @property
    def backend(self) -> str | None:
        """The backend resolved when the feedback was built (None before)."""
        return self._backend

    @property
    def fused_layers(self) -> list[str]:
        """Names of the layers whose delta and weight gradient the last training forward left to the
        fused backward (kernel backends; ``fastdfa.fused``). Empty with the torch backend."""
        return list(self._fused_names)

    def build(self, example_input) -> None:
        """Build the feedback now from one no-grad forward of ``example_input`` in eval mode.

        Eval mode so BatchNorm statistics and dropout RNG are left alone.
        """
        was_training = [(m, m.training) for m in self.modules()]
        args = example_input if isinstance(example_input, tuple) else (example_input,)
        try:
            self.eval()
            with torch.no_grad():
                self._forward_dfa(*args)
        finally:
            for m, t in was_training:
                m.training = t

    # --------------------------------------------------------------- forward
    def forward(self, *args, **kwargs):
        if self._mode in ("dfa", "grape") and (torch.is_grad_enabled() or not self.built):
            return self._forward_dfa(*args, **kwargs)
        return self.model(*args, **kwargs)

    def _grape_generator(self, device: torch.device) -> torch.Generator:
        gen = self._grape_generators.get(device)
        if gen is None:
            seed = seeded_generator(self.seed, "grape").initial_seed()
            gen = self._grape_generators[device] = torch.Generator(device=device)
            gen.manual_seed(seed)
        return gen

    def _forward_dfa(self, *args, **kwargs):
        if self._recording is not None:
            raise RuntimeError("fastdfa.DFA.forward re-entered: a DFA model cannot call itself")
        rec = _Recording()
        self._recording = rec
        if self._backend is None:
            self._resolve_backend(args)
        fusing = (self._kernels is not None and torch.is_grad_enabled() and self._fusable
                  and not any(torch.is_autocast_enabled(t) for t in ("cuda", "cpu")))
        if fusing:
            rec.plan = fused.FusedPlan()
            token = fused._ACTIVE_ENGINE.set(self)
        try:
            output = self.model(*args, **kwargs)
        finally:
            self._recording = None
            if fusing:
                fused._ACTIVE_ENGINE.reset(token)
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"fastdfa.DFA needs the model to return one tensor, got {type(output).__name__}; "
                            "wrap the model so its forward returns the tensor the loss is computed on")
        if output.dim() < self.batch_dims:
            raise ValueError(f"the model output of shape {tuple(output.shape)} has fewer than batch_dims="
                             f"{self.batch_dims} dims")
        n_out = math.prod(output.shape[self.batch_dims:])
        if not self.built:
            self._build_sites(rec, output, n_out)
        else:
            self._check_forward(rec, output, n_out)
        if not torch.is_grad_enabled():
            return output
        plan = rec.plan
        params = []
        if plan is not None:
            n = math.prod(output.shape[:self.batch_dims])
            plan.site_producers = [plan.claim(x, site.rows, n, site.channelwise)
                                   for x, site in zip(rec.inputs, self._sites)]
            plan.output_producer = plan.claim(output, n_out, n)
            for r in plan.claimed:
                params += [r.layer.weight] + ([r.layer.bias] if r.layer.bias is not None else [])
            plan.n_params = len(params)
            plan.records = {}  # only the claimed ones are needed from here on
            self._fused_names = [self._names[r.layer] for r in plan.claimed]
        estimate = None
        if self._mode == "grape" and self._sites:
            estimate = grape.dual_pass(self, args, kwargs, math.prod(output.shape[:self.batch_dims]))
        return _DFAOutputFn.apply(self, plan, estimate, output, *rec.inputs, *params)

    def _pre_hook(self, module: nn.Module, args):
        if self._jvp is not None:
            return grape.pre_hook(self, module, args)
        rec = self._recording
        if rec is None:
            return None
        # Once built, the order check below also catches a module running twice.
        if not self.built and any(m is module for m in rec.order):
            raise RuntimeError(f"module {self._names[module]!r} ran twice in one forward; a DFA site "
                               "must run once per forward (weight sharing is not supported in mode 'dfa')")
        position = len(rec.order)
        rec.order.append(module)
        if not args or not isinstance(args[0], torch.Tensor):
            raise TypeError(f"site module {self._names[module]!r} must take a tensor as its first "
                            "positional argument")
        x = args[0]
        if self.built:
            self._check_site_input(position, module, x)
        if position == 0:  # the first module executed: its input is the data, not a site
            return None
        if not self.built and x.dim() < self.batch_dims:
            raise ValueError(f"site input of {self._names[module]!r} has shape {tuple(x.shape)}: "
                             f"fewer than batch_dims={self.batch_dims} dims")
        rec.inputs.append(x)
        rec.shapes.append(tuple(x.shape))
        return (x.detach(),) + tuple(args[1:])

    # ---------------------------------------------------------------- checks
    def _check_site_input(self, position: int, module: nn.Module, x: torch.Tensor) -> None:
        """Validate a site input against the built feedback before the module runs."""
        expected = self._expected_order
        if position >= len(expected) or expected[position] is not module:
            want = self._names[expected[position]] if position < len(expected) else "nothing"
            raise RuntimeError(f"DFA sites ran in a different order than when the feedback was built: "
                               f"position {position} is {self._names[module]!r}, expected {want!r}")
        if position == 0:
            return
        site = self._sites[position - 1]
        shape = tuple(x.shape[self.batch_dims:])
        if shape != site.shape:
            raise ValueError(f"site {site.name!r}: input of per-sample shape {shape}, but its feedback was "
                             f"built for {site.shape}; build a new fastdfa.DFA for the new shapes")
        flat = self.feedback.flat
        if x.device != flat.device:
            raise RuntimeError(f"site {site.name!r}: input is on {x.device} but the feedback is on "
                               f"{flat.device}; move the wrapper, not only the model: dfa.to({x.device!s})")
        if x.dtype != flat.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"site {site.name!r}: input dtype {x.dtype} differs from the feedback dtype "
                            f"{flat.dtype}; convert the wrapper, not only the model: dfa.to({x.dtype})")

    def _check_forward(self, rec: _Recording, output: torch.Tensor, n_out: int) -> None:
        if len(rec.order) != len(self._sites) + 1:
            raise RuntimeError(f"{len(rec.order)} of the {len(self._sites) + 1} DFA modules ran in this "
                               "forward; every site must run in every training forward")
        if n_out != self._n_out:
            raise ValueError(f"the model output changed to per-sample shape "
                             f"{tuple(output.shape[self.batch_dims:])} ({n_out} features), but the feedback "
                             f"was built for {self._n_out} output features; build a new fastdfa.DFA")
        if output.device != self.feedback.flat.device:
            raise RuntimeError(f"the output is on {output.device} but the feedback is on "
                               f"{self.feedback.flat.device}; use dfa.to(...)")

    # ----------------------------------------------------------------- build
    def _build_sites(self, rec: _Recording, output: torch.Tensor, n_out: int) -> None:
        if not rec.order:
            raise RuntimeError("no fastdfa layer or site module ran in the forward pass")
        params = [p for p in self.model.parameters() if p.is_floating_point()]
        dtype = params[0].dtype if params else output.dtype
        device = output.device
        store = self.feedback
        pending_names = store.pending_names
        sites, offset, blocks = [], 0, []
        for i, (module, shape) in enumerate(zip(rec.order[1:], rec.shapes)):
            site_shape = shape[self.batch_dims:]
            channelwise = self.conv_feedback == "channel" and len(site_shape) == 3
            rows = site_shape[0] if channelwise else math.prod(site_shape)
            site = Site(self, i, self._names[module], module, site_shape, channelwise, offset, rows)
            pending = store.pending.get(str(i))
            if pending is not None:
                if tuple(pending.shape) != (rows, n_out):
                    raise ValueError(f"loaded feedback {i} has shape {tuple(pending.shape)}, but site "
                                     f"{site.name!r} needs {(rows, n_out)}")
                blocks.append(pending.to(dtype=dtype, device=device))
            else:
                gen = seeded_generator(self.seed, "site", i)
                blocks.append(feedback_matrix((rows, n_out), math.prod(site_shape), self.feedback_kind, gen,
                                              self.feedback_scale, dtype=dtype, device=device))
            sites.append(site)
            offset += rows
        names = [s.name for s in sites]
        if pending_names is not None and pending_names != names:
            raise ValueError(f"the loaded checkpoint has sites {pending_names}, this model has {names}")
        store.flat = torch.cat(blocks) if blocks else torch.empty(0, n_out, dtype=dtype, device=device)
        store.pending, store.pending_names = {}, None
        store.sites = sites
        # Built once: the module order every forward must follow (the first one
        # executed, not a site, then the sites), and the projection layout.
        self._expected_order = tuple(rec.order)
        self._layout = [(s.offset, s.rows, s.shape, s.channelwise) for s in sites]
        self._n_out = n_out

    # ------------------------------------------------------------- backend
    def _resolve_backend(self, args) -> None:
        """Pick the backend on the first DFA forward, from where the model lives (before any state)."""
        params = [p for p in self.model.parameters() if p.is_floating_point()]
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        device = params[0].device if params else (tensors[0].device if tensors else torch.device("cpu"))
        backend = resolve_backend(self._requested_backend, device)
        _check_backend_dtype(backend, params[0].dtype if params else torch.float32)
        self._kernels = kernels_for(backend)
        self._backend = backend

    # ------------------------------------------------------------- backward
    def _backward(self, error: torch.Tensor, batch_shape: tuple[int, ...], site_dtypes: list[torch.dtype], plan,
                  estimate=None):
        """(output gradient, site input gradients, claimed parameter gradients) from the output error;
        in mode "grape", then ONE alignment step on the feedback (after the projection used it)."""
        result = self._route(error, batch_shape, site_dtypes, plan)
        if result is not None and estimate is not None:
            self.last_alignment = grape.align_feedback(self, estimate)
        return result

    def _route(self, error: torch.Tensor, batch_shape: tuple[int, ...], site_dtypes: list[torch.dtype], plan):
        e = error.reshape(math.prod(batch_shape), -1)
        # The check reads the error on the host: a captured CUDA graph (fastdfa.CapturedStep) cannot, and
        # leaves NaN/inf to flow into the gradients as BP does.
        if self.nonfinite != "ignore" and not stream_capturing(e.device) and not bool(torch.isfinite(e).all()):
            if self.nonfinite == "raise":
                raise NonFiniteErrorSignal(
                    "the output error dLoss/dy_hat holds NaN or inf; no gradient was accumulated. Check the "
                    "loss and learning rate, or pass nonfinite='skip' to fastdfa.DFA to skip such steps")
            self.skipped_steps += 1
            return None
        if self._kernels is not None:
            return fused.fused_backward(self, error, batch_shape, plan or fused.FusedPlan(), site_dtypes)
        if not self._sites:
            return error, [], []
        projected = dfa_project_reference(e, self.feedback.flat, self._layout, batch_shape)
        return error, [p if p.dtype == dt else p.to(dt) for p, dt in zip(projected, site_dtypes)], []

    def extra_repr(self) -> str:
        return (f"mode={self._mode!r}, seed={self.seed}, feedback={self.feedback_kind!r}, "
                f"sites={len(self._sites) if self._sites is not None else 'unbuilt'}, backend={self._backend!r}")


def _env_streams() -> int:
    value = os.environ.get("FASTDFA_STREAMS", "4")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"FASTDFA_STREAMS must be an int >= 1, got {value!r}") from None


def _check_backend_dtype(backend: str, dtype: torch.dtype) -> None:
    if backend != "torch" and dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise BackendUnavailableError(f"backend {backend!r} runs float32, float16 and bfloat16 models; this "
                                      f"model is {dtype}. Use backend='torch' for it.")


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
