"""GrAPE: feedback learned online from forward-mode JVPs (ICLR 2026, "Scaling Direct Feedback
Learning with Jacobian Alignment Guarantees"; DESIGN.md section 1).

In mode "grape" every training forward of ``fastdfa.DFA`` also runs one
dual-number pass (forward-mode AD, no autograd graph, eval mode so BatchNorm
statistics and dropout are left alone) that gives, for every site l, a
perturbation ``P_l`` (``[N, n_l]``) and an output tangent ``T_l``
(``[N, n_out]``) with ``E[T_l^T P_l / N] = J_l = d y_hat / d h_l``. The
backward first projects the error with the feedback as it was (the DFA update
of this step), then takes ONE alignment step on every site's feedback
(``align_step``: a gradient step on ``1 - mean_j cos(F_l[:, j], J_hat_l^T[:, j])``,
then unit columns). The user's optimizer sees only the weights.

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
import contextvars
import math
from dataclasses import dataclass, field

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

PERTURB = ("activation", "weight", "auto")
JVP = ("per-site", "shared")

# During a dual pass: layer id -> callable(x primal [N, in]) -> pre-activation tangent to add [N, out].
PREACTIVATION_TANGENT: contextvars.ContextVar = contextvars.ContextVar("fastdfa_preactivation_tangent", default=None)
# During a dual pass on a kernel backend: its ops (fastdfa.Linear then runs jvp_linear).
DUAL_KERNELS: contextvars.ContextVar = contextvars.ContextVar("fastdfa_dual_kernels", default=None)


def dual_linear_forward(layer, x: torch.Tensor):
    """A fastdfa.Linear in a dual pass on a kernel backend: primal and tangent of ``g(x W^T + b)``
    through ONE ``jvp_linear`` launch (the weight read once for both). None when the layer is
    perturbed in weight space or its input carries no tangent (the torch ops handle those)."""
    table = PREACTIVATION_TANGENT.get()
    if table is not None and id(layer) in table:
        return None
    primal, tangent = fwAD.unpack_dual(x)
    if tangent is None:
        return None
    kernels = DUAL_KERNELS.get()
    x2 = primal.reshape(-1, primal.shape[-1])
    h, dh, _ = kernels.jvp_linear(x2, layer.weight.detach(), None if layer.bias is None else layer.bias.detach(),
                                  layer.activation, tangent.reshape(1, *x2.shape))
    shape = (*primal.shape[:-1], layer.out_features)
    return fwAD.make_dual(h.view(shape), dh[0].view(shape))


@dataclass
class GrapeEstimate:
    """What one dual pass measured, per site: the operands of align_step."""

    perturbations: list[torch.Tensor] = field(default_factory=list)  # [N, rows_l]
    tangents: list[torch.Tensor] = field(default_factory=list)       # [N, n_out]


def add_preactivation_tangent(layer, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Inside a dual pass, add the weight-perturbation tangent registered for ``layer`` to ``a``."""
    table = PREACTIVATION_TANGENT.get()
    if table is None or id(layer) not in table:
        return a
    primal, tangent = fwAD.unpack_dual(a)
    extra = table[id(layer)](fwAD.unpack_dual(x).primal)
    return fwAD.make_dual(primal, extra if tangent is None else tangent + extra)


class _Injection:
    """The dual pass's per-site plan: which site gets which tangent, in which rows."""

    def __init__(self, engine, n: int, replicas: int):
        self.engine, self.n, self.replicas = engine, n, replicas
        self.position = 0
        self.perturbations: list[torch.Tensor | None] = []
        self.inputs: list[torch.Tensor | None] = []  # each site's primal input, its replica's rows
        self.weight_sites: dict[int, tuple] = {}  # site index -> (layer, V)

    def rows(self, k: int) -> slice:
        """Replica k's rows of a tensor flattened to [replicas * N, ...] (N = batch rows)."""
        return slice(k * self.n, (k + 1) * self.n) if self.replicas > 1 else slice(0, self.n)

    def leading(self, k: int, size0: int) -> slice:
        """Replica k's slice of dim 0 of a model tensor (dim 0 holds replicas x the first batch dim)."""
        block = size0 // self.replicas
        return slice(k * block, (k + 1) * block) if self.replicas > 1 else slice(0, size0)

    def scatter(self, k: int, values: torch.Tensor, shape) -> torch.Tensor:
        """``values`` in replica k's rows of an otherwise zero tangent of ``shape``; with one replica
        (shared tangents) the rows are the whole tensor, so ``values`` itself."""
        if self.replicas == 1:
            return values
        out = values.new_zeros(shape)
        out[self.leading(k, shape[0])] = values
        return out


def _site_feeds_linear(site):
    from .layers import Linear
    return isinstance(site.module, Linear) and not site.channelwise and site.rows == site.module.in_features


def _uses_weight_space(engine, site, n: int) -> bool:
    if engine.perturb == "activation" or not _site_feeds_linear(site):
        return False
    if engine.perturb == "weight":
        return True
    return site.module.out_features < n  # "auto": fewer random numbers in weight space


def pre_hook(engine, module, args):
    """Forward pre-hook body during a dual pass: inject site k's activation perturbation."""
    inj: _Injection = engine._jvp
    position = inj.position
    inj.position += 1
    if position == 0:
        return None  # the data input
    k = position - 1
    site = engine._sites[k]
    x = args[0]
    primal, tangent = fwAD.unpack_dual(x)
    mine = inj.leading(k, primal.shape[0])
    inj.inputs[k] = primal[mine]
    if k in inj.weight_sites:
        return None  # perturbed in weight space, inside the layer
    p = torch.randn(primal[mine].shape, generator=engine._grape_generator(primal.device),
                    device=primal.device, dtype=torch.float32).to(primal.dtype)
    inj.perturbations[k] = p.reshape(inj.n, *site.shape)
    inject = inj.scatter(k, p, primal.shape)
    new_tangent = inject if tangent is None else tangent + inject
    return (fwAD.make_dual(primal, new_tangent),) + tuple(args[1:])


def dual_pass(engine, args, kwargs, n: int) -> GrapeEstimate:
    """Run the model once with dual numbers; every site's (P_l, T_l)."""
    sites = engine._sites
    replicas = len(sites) if engine.jvp == "per-site" else 1
    inj = _Injection(engine, n, replicas)
    inj.perturbations = [None] * len(sites)
    inj.inputs = [None] * len(sites)
    weight_table = {}
    for k, site in enumerate(sites):
        if _uses_weight_space(engine, site, n):
            layer = site.module
            v = torch.randn(layer.weight.shape, generator=engine._grape_generator(layer.weight.device),
                            device=layer.weight.device, dtype=torch.float32).to(layer.weight.dtype)
            inj.weight_sites[k] = (layer, v)

            def tangent_fn(x_primal, v=v, k=k):
                mine = inj.leading(k, x_primal.shape[0])
                return inj.scatter(k, F.linear(x_primal[mine], v), (*x_primal.shape[:-1], v.shape[0]))
            weight_table[id(layer)] = tangent_fn
    if replicas > 1:  # every tensor argument carries the batch in dim 0 (as the sites do): stack the replicas
        def rep(a):
            return a.repeat(replicas, *([1] * (a.dim() - 1))) if isinstance(a, torch.Tensor) and a.dim() else a
        args = tuple(rep(a) for a in args)
        kwargs = {key: rep(v) for key, v in kwargs.items()}
    training = [(m, m.training) for m in engine.model.modules()]
    token = PREACTIVATION_TANGENT.set(weight_table)
    dual_token = DUAL_KERNELS.set(engine._kernels)
    engine._jvp = inj
    try:
        engine.model.eval()
        # The math SDPA backend: flash / memory-efficient attention have no forward AD.
        with torch.no_grad(), fwAD.dual_level(), _math_attention():
            out = engine.model(*args, **kwargs)
            primal, tangent = fwAD.unpack_dual(out)
            if tangent is None:  # no site reaches the output (cannot happen with sites in use)
                tangent = torch.zeros_like(primal)
    finally:
        engine._jvp = None
        PREACTIVATION_TANGENT.reset(token)
        DUAL_KERNELS.reset(dual_token)
        for m, t in training:
            m.training = t
    with torch.no_grad():
        return _estimate(inj, sites, tangent.reshape(replicas * n, -1), n)


def _estimate(inj: _Injection, sites, t_all: torch.Tensor, n: int) -> GrapeEstimate:
    """Every site's (P_l, T_l) from the dual pass's output tangents (see the module docstring)."""
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
            if site.channelwise:
                p = p.reshape(n, site.shape[0], -1).sum(-1)
            est.perturbations.append(p.reshape(n, -1))
            est.tangents.append(t_k)
    return est


def _math_attention():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch without the attention API: nothing to select
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def align_feedback(engine, est: GrapeEstimate) -> torch.Tensor:
    """ONE alignment step on every site's feedback (kernel backend: ``align_step``; else its
    torch reference); returns each site's mean column cosine before the step."""
    flat = engine.feedback.flat
    kernels = engine._kernels
    if kernels is not None:
        sites = [kernels.AlignSite(s.offset, s.rows, p.to(flat.dtype), t.to(flat.dtype))
                 for s, p, t in zip(engine._sites, est.perturbations, est.tangents)]
        return kernels.align_step(flat, sites, engine.feedback_lr)
    from .align import AlignSite, align_step_reference
    sites = [AlignSite(s.offset, s.rows, p, t) for s, p, t in zip(engine._sites, est.perturbations, est.tangents)]
    new, cos = align_step_reference(flat, sites, engine.feedback_lr)
    flat.copy_(new)
    return cos.float()


def expected_cosine_lower_bound(jacobian: torch.Tensor) -> float:
    """GrAPE's bound on E[cos(J_hat, J)] for one rank-1 draw: sqrt(2 / (pi n_l)) ||J||_2 / ||J||_F,
    with J of shape (n_out, n_l)."""
    n_l = jacobian.shape[1]
    return math.sqrt(2 / (math.pi * n_l)) * float(torch.linalg.matrix_norm(jacobian, 2)
                                                   / torch.linalg.matrix_norm(jacobian))


CALIBRATE_SCALES = ("raw", "rule")


def calibrate(dfa, optimizer, x, target, loss_fn=F.cross_entropy, scale: str = "raw") -> float:
    """One exact-BP step on (x, target) — GrAPE's calibration — whatever the wrapper's mode; returns the loss.

        if epoch % T == 0:
            fastdfa.grape.calibrate(dfa, opt, x_batch, y_batch)

    ``scale="raw"`` hands the BP gradient to the optimizer as it is. ``scale="rule"`` first runs the
    wrapper's own rule on the same batch (weights untouched; GrAPE's feedback does not move) and rescales
    each parameter's BP gradient g to that rule gradient's norm: g * |g_rule| / |g|. The step then
    takes BP's direction at the size of a rule step. Why: Adam divides by moments that the rule's
    gradients built. On an 8x256 ReLU MLP (Fashion-MNIST), the BP gradients of the hidden layers
    were 0.11-0.56x the rule's (DFA) and 0.18-0.57x (GrAPE) after 3 epochs, so a raw BP step moved those layers
    only that fraction of a rule step (``examples/calibration_gradient_scale.py``). A parameter
    without a rule gradient, or with a zero BP gradient, keeps its raw BP gradient.
    """
    return float(calibration_step(dfa, optimizer, x, target, loss_fn, scale).detach())


def calibration_step(dfa, optimizer, x, target, loss_fn=F.cross_entropy, scale: str = "raw") -> torch.Tensor:
    """``calibrate`` without reading the loss on the host (the training loop's sparse-BP steps): the loss
    tensor."""
    from .dfa import backprop, using_mode

    if scale not in CALIBRATE_SCALES:
        raise ValueError(f"scale must be one of {CALIBRATE_SCALES}, got {scale!r}")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    rule_norms = None
    if scale == "rule" and dfa.mode != "bp":
        optimizer.zero_grad(set_to_none=True)
        # GrAPE's weight update is DFA's with the current feedback (tested): as "dfa" there is no dual
        # pass, no generator draw and no alignment step
        with using_mode(dfa, rule_mode(dfa.mode)):
            loss_fn(dfa(x), target).backward()
        rule_norms = [None if p.grad is None else p.grad.norm() for p in params]
    with backprop(dfa):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(dfa(x), target)
        loss.backward()
        if rule_norms is not None:
            with torch.no_grad():
                for p, norm in zip(params, rule_norms):
                    if p.grad is not None and norm is not None:
                        bp_norm = p.grad.norm()
                        p.grad.mul_(torch.where(bp_norm > 0, norm / bp_norm, 1.0))
        optimizer.step()
    return loss


def rule_mode(mode: str) -> str:
    """The mode whose weight gradients are ``mode``'s: GrAPE updates the weights as DFA does."""
    return "dfa" if mode == "grape" else mode
