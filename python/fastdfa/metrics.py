"""Alignment metrics: weight alignment (WA) and gradient alignment (GA).

Refinetti et al., "Align, then memorise": DFA learns because the forward
weights turn towards the feedback. With layers ``W_1 .. W_L`` executed in
order and the site feedback ``F_l`` at the input of layer ``l + 1`` (holding
``h_l``, shape ``(n_l, n_out)``, ``fastdfa.DFA.sites[l - 1]``):

    WA_l = cos(W_l, F_l F_{l-1}^T)      1 < l < L
    WA_L = cos(W_L, F_{L-1}^T)
    GA_l = mean over samples of cos(delta_l^rule, delta_l^BP)

with ``cos`` the Frobenius cosine and ``delta_l`` the error signal at layer
l's pre-activation (the gradient of the loss with respect to ``a_l``; the
rule's one for DFA / FA, autograd's for BP).

WA is defined for the fastdfa.Linear layers whose input and output sites are
dense and match the weight's shape (a convolution's weight is not a product
of site feedbacks); layers where it is not defined are left out of the result.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .activations import CAPTURE
from .dfa import DFA, Site
from .grape import rule_mode
from .layers import FASTDFA_LAYERS, Linear
from .plots import plot_alignment_records


@dataclass
class ChainLink:
    """One layer of the executed chain, with the site feedback at its input and at its output."""

    name: str
    layer: nn.Module
    f_in: Site | None    # site at the layer's input (None for the first layer: its input is the data)
    f_out: Site | None   # site at the layer's output (None for the last layer)


def chain(dfa: DFA) -> list[ChainLink]:
    """The modules in execution order with their sites; needs the feedback built."""
    if not dfa.built:
        raise RuntimeError("the feedback is not built yet: run one forward of the wrapper first, or pass "
                           "example_input= to fastdfa.DFA")
    order = dfa.execution_order
    sites = dfa.sites
    return [ChainLink(dfa.name_of(m), m, sites[i - 1] if i > 0 else None, sites[i] if i < len(sites) else None)
            for i, m in enumerate(order)]


def _dense_matches(site: Site | None, features: int) -> bool:
    return site is not None and not site.channelwise and site.rows == features


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    denom = a.norm() * b.norm()
    return float((a @ b) / denom) if denom > 0 else 0.0


@torch.no_grad()
def weight_alignment(dfa: DFA) -> dict[str, float]:
    """WA per fastdfa.Linear layer where it is defined (see the module docstring)."""
    out = {}
    links = chain(dfa)
    for i, link in enumerate(links):
        lay = link.layer
        if i == 0 or not isinstance(lay, Linear) or not _dense_matches(link.f_in, lay.in_features):
            continue
        if link.f_out is None:  # the output layer
            out[link.name] = _cos(lay.weight, link.f_in.feedback.t())
        elif _dense_matches(link.f_out, lay.out_features):
            out[link.name] = _cos(lay.weight, link.f_out.feedback @ link.f_in.feedback.t())
    return out


@contextlib.contextmanager
def _capture_preactivations():
    captured: list[tuple[nn.Module, torch.Tensor]] = []
    token = CAPTURE.set(captured)
    try:
        yield captured
    finally:
        CAPTURE.reset(token)


def _deltas(dfa: DFA, mode: str, x, target, loss_fn) -> dict[int, torch.Tensor]:
    """dLoss/da_l for every fastdfa layer under ``mode``, by autograd.grad (no .grad is touched)."""
    dfa.mode = mode
    with _capture_preactivations() as captured:
        output = dfa(*x) if isinstance(x, tuple) else dfa(x)
    loss = loss_fn(output, target)
    tensors = [a for _, a in captured]
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    return {id(m): g for (m, _), g in zip(captured, grads)}


def gradient_alignment(dfa: DFA, x, target, loss_fn: Callable = F.cross_entropy) -> dict[str, float]:
    """GA per fastdfa layer: the batch mean of per-sample cosines between the error signal the
    current rule (``dfa.mode``: "dfa", "grape" or "fa") gives the layer's pre-activation and BP's.

    Computed on ``x`` / ``target`` in eval mode (BatchNorm statistics, dropout and the RNG are left
    alone) with ``torch.autograd.grad``: parameters, their ``.grad``, the mode and the training
    flags are as they were afterwards. The kernel backends' fused route is bypassed (the torch
    route computes the same deltas and exposes the pre-activations).
    """
    if not isinstance(dfa, DFA):
        raise TypeError(f"gradient_alignment needs a fastdfa.DFA, got {type(dfa).__name__}")
    mode = dfa.mode
    if mode == "bp":
        raise ValueError("dfa.mode is 'bp': its gradient alignment with BP is 1 by definition; set the mode "
                         "whose alignment you want ('dfa' or 'fa')")
    training = [(m, m.training) for m in dfa.modules()]
    try:
        dfa.eval()
        with dfa.using_backend("torch"):  # the torch route for this measurement
            # GrAPE's update rule is DFA's (its feedback step happens apart from the deltas).
            rule = _deltas(dfa, rule_mode(mode), x, target, loss_fn)
            exact = _deltas(dfa, "bp", x, target, loss_fn)
    finally:
        dfa.mode = mode
        for m, t in training:
            m.training = t
    out = {}
    for m in dfa.model.modules():
        if not isinstance(m, FASTDFA_LAYERS) or id(m) not in rule or id(m) not in exact:
            continue
        r, b = rule[id(m)], exact[id(m)]
        if r is None or b is None:
            continue
        n = r.shape[0]
        per_sample = F.cosine_similarity(r.reshape(n, -1).double(), b.reshape(n, -1).double(), dim=1, eps=1e-30)
        out[dfa.name_of(m)] = float(per_sample.mean())
    return out


def alignment_summary(values: dict[str, float]) -> float:
    """The mean over layers, for one-number logs (NaN for an empty dict)."""
    return sum(values.values()) / len(values) if values else math.nan


class AlignmentLog:
    """A callback for your own training loop: each call records WA and GA on a fixed batch.

        log = fastdfa.metrics.AlignmentLog(dfa, x_fixed, y_fixed)
        for epoch in range(epochs):
            ...train...
            log(epoch)                 # {"step": epoch, "weight": {...}, "gradient": {...}}
        log.plot("alignment.png")      # WA and GA per layer over the calls

    Each call leaves the model, its gradients and its mode as they were (see
    ``gradient_alignment``).
    """

    def __init__(self, dfa: DFA, x, target, loss_fn: Callable = F.cross_entropy):
        if not isinstance(dfa, DFA):
            raise TypeError(f"AlignmentLog needs a fastdfa.DFA, got {type(dfa).__name__}")
        self.dfa, self.x, self.target, self.loss_fn = dfa, x, target, loss_fn
        self.records: list[dict] = []

    def __call__(self, step=None) -> dict:
        record = {"step": len(self.records) if step is None else step,
                  "weight": weight_alignment(self.dfa) if self.dfa.built else {},
                  "gradient": gradient_alignment(self.dfa, self.x, self.target, self.loss_fn)}
        self.records.append(record)
        return record

    def plot(self, path, label: str | None = None):
        return plot_alignment_records({label or self.dfa.mode: [(r["step"], r) for r in self.records]}, path,
                                      xlabel="step")
