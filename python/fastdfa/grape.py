"""GrAPE for users: calibration steps, the rule's weight-update mode, the estimator's bound.

GrAPE (ICLR 2026, "Scaling Direct Feedback Learning with Jacobian Alignment
Guarantees"; docs/math.md) is ``fastdfa.DFA(model, mode="grape")``:
DFA whose feedback learns online from forward-mode JVPs. The per-step work (the
dual-number pass and the alignment step) lives in
``fastdfa.engine.grape_pass``, whose docstring has the math and the options
(``perturb``, ``jvp``); this module holds what a training loop calls around it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import JVP, PERTURB  # noqa: F401  (the GrAPE options, validated by fastdfa.DFAConfig)
from .dfa import DFA, backprop, using_mode
from .engine.grape_pass import GrapeEstimate


def dual_pass(dfa: DFA, args: tuple, kwargs: dict, n: int) -> GrapeEstimate:
    """Run ``dfa``'s model once with dual numbers (its mode's ``perturb`` and ``jvp``); every site's
    perturbation ``P_l`` and output tangent ``T_l``, draws from the wrapper's perturbation stream."""
    return dfa.jacobian_estimate(args, kwargs, n)


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
