"""GrAPE's per-step work: one dual-number pass for the Jacobian estimates, one alignment step.

GrAPE (ICLR 2026, "Scaling Direct Feedback Learning with Jacobian Alignment
Guarantees"; docs/math.md) learns each site's feedback online. In
mode "grape" every training forward of ``fastdfa.DFA`` also runs one
dual-number pass (forward-mode AD, no autograd graph, eval mode so BatchNorm
statistics and dropout are left alone) that gives, for every site l, a
perturbation ``P_l`` (``[N, n_l]``) and an output tangent ``T_l``
(``[N, n_out]``) with ``E[T_l^T P_l / N] = J_l = d y_hat / d h_l``. The
backward first projects the error with the feedback as it was (the DFA update
of this step), then takes ONE alignment step on every site's feedback
(``align_step``: a gradient step on ``1 - mean_j cos(F_l[:, j], J_hat_l^T[:, j])``,
each column keeping its norm). The user's optimizer sees only the weights.

Perturbations (``perturb=``):
  * "activation": ``p ~ N(0, I)`` added to the tangent of the site input
    ``h_l``; ``J_hat_l = mean_n t_n p_n^T`` (unbiased: ``E[p p^T] = I``).
  * "weight": ``V ~ N(0, I)`` on the weight ``W`` (``[m, n_l]``) of the
    fastdfa.Linear the site feeds, i.e. the tangent ``u_n = V h_n`` on its
    pre-activation. ``E_V[u_n u_n^T] = ||h_n||^2 I`` gives
    ``J_hat_l = mean_n (t_n / ||h_n||) (W^T u_n / ||h_n||)^T`` (unbiased
    for ``J_a W = J_l``), with ``m x n_l`` random numbers for the whole batch
    instead of ``N x n_l``.
  * "auto": weight space where it has fewer random dimensions
    (``m < N``: a narrow layer, e.g. the output layer), else activation space,
    as the paper does; activation space for sites that do not feed a
    fastdfa.Linear.

Tangent passes (``jvp=``):
  * "per-site" (exact GrAPE): the batch is repeated once per site and site k
    gets its perturbation only in replica k, so ONE dual pass of K x N rows
    gives every site its own ``J_l p_l`` through the same GEMMs (stacked
    tangent rows).
  * "shared": every site gets an independent perturbation in ONE dual pass of
    N rows; the output tangent ``t = sum_k J_k p_k`` still gives
    ``E[t p_l^T] = J_l``, with more variance (the other sites' terms are noise).

Channel-wise conv sites align ``F`` (``[C, n_out]``) with the space-summed
Jacobian, the best channel-wise match: ``P`` is summed over space.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from ..activations import activate
from ..feedback import seeded_generator
from ..layers import Linear
from .guard import evaluating

try:  # torch >= 2.3: choose the math SDPA backend (flash / memory-efficient attention have no forward AD)
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # torch without the attention API: nothing to select
    SDPBackend = sdpa_kernel = None


class PerturbationStream:
    """The perturbations' random numbers: one generator per device, seeded from ``(seed, "grape")``."""

    def __init__(self, seed: int):
        self.seed = seeded_generator(seed, "grape").initial_seed()
        self.generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        gen = self.generators.get(device)
        if gen is None:
            gen = self.generators[device] = torch.Generator(device=device)
            gen.manual_seed(self.seed)
        return gen

    def snapshot(self) -> dict:
        return {d: g.get_state() for d, g in self.generators.items()}

    def restore(self, snapshot: dict) -> None:
        """Back to ``snapshot``; a generator first drawn from after it goes back to its seed."""
        for d, g in list(self.generators.items()):
            if d in snapshot:
                g.set_state(snapshot[d])
            else:
                g.manual_seed(self.seed)

    def state_dict(self) -> dict:
        """For checkpoints: the seed and each device's generator state (a GrAPE run resumes bit for bit)."""
        return {"seed": self.seed, "states": {str(d): s for d, s in self.snapshot().items()}}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        states = {torch.device(d): s for d, s in state["states"].items()}
        for d, g in list(self.generators.items()):  # drawn here but not in the checkpoint: back to the seed
            if d not in states:
                g.manual_seed(self.seed)
        for d, s in states.items():
            if d.type == "cuda" and not torch.cuda.is_available():
                continue  # a GPU run's stream loaded on a CPU machine: the CPU stream starts from the seed
            self.generator(d).set_state(s)


@dataclass
class GrapeEstimate:
    """What one dual pass measured, per site: the operands of align_step."""

    perturbations: list[torch.Tensor] = field(default_factory=list)  # [N, rows_l]
    tangents: list[torch.Tensor] = field(default_factory=list)       # [N, n_out]


def _site_feeds_linear(site) -> bool:
    return isinstance(site.module, Linear) and not site.channelwise and site.rows == site.module.in_features


def uses_weight_space(perturb: str, site, n: int) -> bool:
    """Whether ``site`` is perturbed in weight space under ``perturb`` for a batch of ``n`` rows."""
    if perturb == "activation" or not _site_feeds_linear(site):
        return False
    if perturb == "weight":
        return True
    return site.module.out_features < n  # "auto": fewer random numbers in weight space


class DualPass:
    """The interceptor of the dual pass: which site gets which tangent, in which rows."""

    def __init__(self, sites, candidates: set, kernels, stream: PerturbationStream, n: int, replicas: int,
                 first_replica: int = 0):
        self.sites, self.candidates, self.kernels, self.stream = sites, candidates, kernels, stream
        self.n, self.replicas = n, replicas
        # the replica of site 0 in a model tensor's rows: 0 for a whole model; a pipeline stage
        # (fastdfa.distributed) whose sites are sites k, k+1, ... of the model runs the model's K replicas
        # and sets k. rows() stays local: it indexes the output tangents of these sites only.
        self.first_replica = first_replica
        self.position = 0
        self.error: torch.Tensor | None = None  # the dual tensor at the error point (None: the model's output)
        self.perturbations: list[torch.Tensor | None] = [None] * len(sites)
        self.inputs: list[torch.Tensor | None] = [None] * len(sites)  # each site's primal input, its replica's rows
        self.weight_sites: dict[int, tuple] = {}   # site index -> (layer, V)
        self.weight_layers: dict = {}              # layer -> site index, for the weight-space tangent

    def rows(self, k: int) -> slice:
        """Replica k's rows of a tensor flattened to [replicas * N, ...] (N = batch rows)."""
        return slice(k * self.n, (k + 1) * self.n) if self.replicas > 1 else slice(0, self.n)

    def leading(self, k: int, size0: int) -> slice:
        """Site k's replica's slice of dim 0 of a model tensor (dim 0 holds replicas x the first batch dim)."""
        block = size0 // self.replicas
        j = self.first_replica + k
        return slice(j * block, (j + 1) * block) if self.replicas > 1 else slice(0, size0)

    def draw(self, shape, device: torch.device, dtype: torch.dtype, k: int, weight: bool = False) -> torch.Tensor:
        """Site k's N(0, 1) perturbation (its weight-space ``V`` if ``weight``): drawn from the stream in
        float32, then cast. A pipeline stage (fastdfa.distributed) overrides it to serve its slice of the
        whole mini-batch's draws."""
        return torch.randn(shape, generator=self.stream.generator(device), device=device,
                           dtype=torch.float32).to(dtype)

    def scatter(self, k: int, values: torch.Tensor, shape) -> torch.Tensor:
        """``values`` in replica k's rows of an otherwise zero tangent of ``shape``; with one replica
        (shared tangents) the rows are the whole tensor, so ``values`` itself."""
        if self.replicas == 1:
            return values
        out = values.new_zeros(shape)
        out[self.leading(k, shape[0])] = values
        return out

    def at_error_point(self, x: torch.Tensor) -> torch.Tensor:
        """The error point (``engine.error_point``): its tangent is the output tangent T_l measures."""
        self.error = x
        return x

    def perturb_weight(self, k: int, layer) -> None:
        w = layer.weight
        v = self.draw(w.shape, w.device, w.dtype, k, weight=True)
        self.weight_sites[k] = (layer, v)
        self.weight_layers[layer] = k

    def site_input(self, module, x: torch.Tensor) -> torch.Tensor:
        """Inject site k's activation perturbation into the tangent of its input."""
        if self.error is not None:  # after the error point: BP's part of the model, nothing injected
            return x
        position = self.position
        self.position += 1
        if position == 0:
            return x  # the data input
        k = position - 1
        primal, tangent = fwAD.unpack_dual(x)
        mine = self.leading(k, primal.shape[0])
        self.inputs[k] = primal[mine]
        if k in self.weight_sites:
            return x  # perturbed in weight space, inside the layer
        p = self.draw(primal[mine].shape, primal.device, primal.dtype, k)
        per_sample = len(self.sites[k].shape)  # this forward's per-sample shape (a per-feature site's varies)
        self.perturbations[k] = p.reshape(self.n, *p.shape[p.dim() - per_sample:])
        inject = self.scatter(k, p, primal.shape)
        return fwAD.make_dual(primal, inject if tangent is None else tangent + inject)

    def layer_forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        """A fastdfa layer in the dual pass: its site's injection, then primal and tangent."""
        if self.error is not None:
            return layer.plain_forward(x)
        if layer in self.candidates:
            x = self.site_input(layer, x)
        if isinstance(layer, Linear):
            k = self.weight_layers.get(layer)
            if k is not None:  # weight space: u = V h in replica k's rows, added to the pre-activation
                a = F.linear(x, layer.weight, layer.bias)
                primal, tangent = fwAD.unpack_dual(a)
                h = fwAD.unpack_dual(x).primal
                v = self.weight_sites[k][1]
                mine = self.leading(k, h.shape[0])
                extra = self.scatter(k, F.linear(h[mine], v), (*h.shape[:-1], v.shape[0]))
                return activate(layer, fwAD.make_dual(primal, extra if tangent is None else tangent + extra),
                                layer.activation)
            if self.kernels.fuses_layers:
                out = _dual_linear(self.kernels, layer, x)
                if out is not None:
                    return out
        return layer.plain_forward(x)


def _dual_linear(kernels, layer, x: torch.Tensor):
    """Primal and tangent of ``g(x W^T + b)`` through ONE ``jvp_linear`` launch (the weight read once
    for both); None when the input carries no tangent (the torch ops handle it)."""
    primal, tangent = fwAD.unpack_dual(x)
    if tangent is None:
        return None
    x2 = primal.reshape(-1, primal.shape[-1])
    h, dh, _ = kernels.jvp_linear(x2, layer.weight.detach(), None if layer.bias is None else layer.bias.detach(),
                                  layer.activation, tangent.reshape(1, *x2.shape))
    shape = (*primal.shape[:-1], layer.out_features)
    return fwAD.make_dual(h.view(shape), dh[0].view(shape))


def dual_pass(model, recorder, sites, kernels, stream: PerturbationStream, perturb: str, jvp: str,
              args, kwargs, n: int) -> GrapeEstimate:
    """Run ``model`` once with dual numbers through ``recorder``'s interception; every site's (P_l, T_l)."""
    replicas = len(sites) if jvp == "per-site" else 1
    inj = DualPass(sites, recorder.candidates, kernels, stream, n, replicas)
    for k, site in enumerate(sites):
        if uses_weight_space(perturb, site, n):
            inj.perturb_weight(k, site.module)
    if replicas > 1:
        args, kwargs = replicate_batch(args, kwargs, replicas)
    with dual_forward(model, recorder, inj):
        out = model(*args, **kwargs)
        if inj.error is not None:
            out = inj.error
        elif not isinstance(out, torch.Tensor):
            raise RuntimeError("GrAPE's dual pass: the error point did not run (the model returned a "
                               f"{type(out).__name__} and no module took the error)")
        primal, tangent = fwAD.unpack_dual(out)
        if tangent is None:  # no site reaches the output (cannot happen with sites in use)
            tangent = torch.zeros_like(primal)
    with torch.no_grad():
        return estimate_from_tangents(inj, sites, tangent.reshape(replicas * n, -1), n)


@contextlib.contextmanager
def dual_forward(model, recorder, inj: DualPass):
    """The context of a dual pass: ``model`` in eval mode (restored after), no autograd graph, one
    forward-AD level, the math SDPA backend and no MHA fast path (the others have no forward AD), and
    every site module's input through ``inj``. A forward of ``model`` inside it is the dual pass."""
    with evaluating(model), torch.no_grad(), fwAD.dual_level(), _math_attention(), no_mha_fast_path(), \
            recorder.intercepting(inj):
        yield inj


def estimate_from_tangents(inj: DualPass, sites, t_all: torch.Tensor, n: int) -> GrapeEstimate:
    """Every site's (P_l, T_l) from the dual pass's output tangents (see the module docstring):
    ``t_all`` holds ``inj.replicas`` blocks of ``n`` rows, site k's in block ``inj.rows(k)``."""
    est = GrapeEstimate()
    for k, site in enumerate(sites):
        t_k = t_all[inj.rows(k)]
        if k in inj.weight_sites:
            layer, v = inj.weight_sites[k]
            h = inj.inputs[k].reshape(n, -1)                       # the site's primal input h_l
            norm = h.norm(dim=1, keepdim=True).clamp_min(torch.finfo(h.dtype).tiny)
            u = F.linear(h, v)                                     # the pre-activation tangent V h
            est.perturbations.append((u @ layer.weight) / norm)    # W^T u / ||h||
            est.tangents.append(t_k / norm)
        else:
            p = inj.perturbations[k]
            if site.feature_axis is not None:  # the Jacobian summed over the axes the feedback is broadcast on
                p = p.movedim(1 + site.feature_axis, -1).reshape(n, -1, site.rows).sum(1)
            est.perturbations.append(p.reshape(n, -1))
            est.tangents.append(t_k)
    return est


def replicate_batch(args: tuple, kwargs: dict, replicas: int) -> tuple[tuple, dict]:
    """Stack the batch ``replicas`` times along dim 0 of every tensor argument that carries it: those
    whose dim 0 is the first tensor argument's (the data's: the first positional one, else the first
    keyword one, as ``model(input_ids=..., attention_mask=...)`` is called). Tensors without the batch
    axis (a [T, T] attention mask, a position table) are passed as they are."""
    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.dim()]
    tensors += [v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.dim()]
    first = tensors[0] if tensors else None
    n0 = None if first is None else first.shape[0]

    def rep(a):
        if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == n0:
            return a.repeat(replicas, *([1] * (a.dim() - 1)))
        return a
    return tuple(rep(a) for a in args), {key: rep(v) for key, v in kwargs.items()}


def _math_attention():
    return contextlib.nullcontext() if sdpa_kernel is None else sdpa_kernel(SDPBackend.MATH)


@contextlib.contextmanager
def no_mha_fast_path():
    """``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` take a fused "fast path" in eval mode
    under no_grad (``aten._native_multi_head_attention``), which has no forward AD; the dual pass runs in
    exactly that mode, so the fast path is switched off for it (and back on after)."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    enabled = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(enabled)


def align_feedback(kernels, store, est: GrapeEstimate, lr: float) -> torch.Tensor:
    """ONE alignment step on every site's feedback (``align_step`` of the wrapper's backend, in place);
    returns each site's mean column cosine before the step."""
    flat = store.flat
    # error_rank=k: F_l learns (P J_l)^T, the Jacobian seen through P, so the tangents T_l go through P too
    sites = [kernels.AlignSite(s.offset, s.rows, p.to(flat.dtype), store.compress(t.to(flat.dtype)))
             for s, p, t in zip(store.sites, est.perturbations, est.tangents)]
    return kernels.align_step(flat, sites, lr)
