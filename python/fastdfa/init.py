"""Feedback initialisations that use the forward weights: Feedback-Weight Matching and IFA.

``feedback_weight_matching`` (FWM, ICLR 2026, "Enabling Fine-Tuning of DFA
via Feedback-Weight Matching") prepares a BP-pretrained network for DFA
fine-tuning. For the executed chain of layers ``W_1 .. W_L`` with site
feedback ``F_l`` at the input of layer ``l + 1`` (``(n_l, n_out)``):

    feedback matching:  F_{L-1} = W_L^T;  then for l = L-1 .. 2:
                        F_{l-1}^T = argmin_X ||F_l X - W_l||_F     (least squares)
    weight matching:    W_l := F_l F_{l-1}^T   for 1 < l < L;  W_1 and all biases kept

``F_l F_{l-1}^T`` has rank at most ``n_out``, so for layers wider than the
output the match is approximate: the report gives the relative
reconstruction error ``||F_l F_{l-1}^T - W_l||_F / ||W_l||_F`` before weight
matching and the rank used. Convolutions are not matched: a conv weight
``(C_out, C_in, k, k)`` is not a product of two dense site feedbacks
``(C_out H W, n_out)``, ``(C_in H' W', n_out)``. The chain is matched from the
output down to the first layer that is not a fastdfa.Linear with dense
sites matching its weight (for a CNN: the linear head, whose first layer's
input site is the flattened conv output, gets matched; the convs keep their
weights and feedback).

A converted transformer encoder (BERT's layout) gets FWM's encoder form instead
(``fastdfa.matching``): the chain runs along the residual stream through each
block's FFN down, FFN up and attention output projections, whose output
feedback is the sum of the feedback of every site reading the residual stream
above them (LayerNorm taken as the identity); Q/K/V keep their weights.

``soft_align`` (IFA, Cheon, Bae, Paik) turns the feedback to a chosen angle
from the forward path at initialisation.
"""

from __future__ import annotations

import math

import torch

from .dfa import DFA
from .feedback import seeded_generator
from .layers import Linear
from .matching import (ATTENTION_FEEDBACK, FWM_METHODS, LayerMatch, encoder_blocks, encoder_layout,
                       encoder_weight_alignment, match_encoder)
from .matching import solve_feedback as _solve
from .metrics import _cos, chain, weight_alignment

__all__ = ["FWM_METHODS", "ATTENTION_FEEDBACK", "LayerMatch", "feedback_weight_matching", "soft_align",
           "encoder_blocks", "encoder_layout", "encoder_weight_alignment"]


@torch.no_grad()
def feedback_weight_matching(dfa: DFA, method: str = "lstsq", rank: int | None = None, *,
                             attention_feedback: str = "value", match_weights: bool = True) -> list[LayerMatch]:
    """FWM on the wrapped model, in place (see the module docstring); one report per layer.

    Run it on the BP-pretrained weights, then train in mode "dfa" (with
    weight decay, as the paper does). Needs the feedback built (one forward,
    or ``example_input=``). Nothing is changed when it raises.

    A model holding transformer encoder blocks in BERT's layout (``fastdfa.matching.encoder_blocks``:
    a converted Hugging Face BERT) gets the encoder form instead of the plain chain: the head and each
    block's attention output, FFN up and FFN down projections are matched along the residual stream,
    Q/K/V keep their weights, and ``attention_feedback`` ("value", the default, "keep" or "zero") sets
    the feedback at their input (``fastdfa.matching``; docs/design.md, "FWM on a transformer encoder").

    ``match_weights=False`` stops after feedback matching: the feedback is set as above and every weight
    is kept (its WA is then ``sqrt(1 - reconstruction_error**2)``, not 1).
    """
    if not isinstance(dfa, DFA):
        raise TypeError(f"feedback_weight_matching needs a fastdfa.DFA, got {type(dfa).__name__}")
    if method not in FWM_METHODS:
        raise ValueError(f"method must be one of {FWM_METHODS}, got {method!r}")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive int or None, got {rank!r}")
    if attention_feedback not in ATTENTION_FEEDBACK:
        raise ValueError(f"attention_feedback must be one of {ATTENTION_FEEDBACK}, got {attention_feedback!r}")
    links = chain(dfa)
    layout = encoder_layout(dfa)
    if layout is not None:
        return match_encoder(dfa, layout, method, rank, attention_feedback, match_weights)
    last = links[-1]
    if (len(links) < 2 or not isinstance(last.layer, Linear) or last.f_in is None or last.f_in.channelwise
            or last.f_in.rows != last.layer.in_features):
        raise ValueError("feedback-weight matching needs the output layer to be a fastdfa.Linear whose input "
                         f"site has dense feedback of its input width; the last layer here is {last.name!r} "
                         f"({type(last.layer).__name__})")
    n_out = last.layer.out_features
    wa_before = weight_alignment(dfa)

    # Feedback matching, computed first (in float64) and written only once all of it succeeded.
    new_feedback = {id(last.f_in): last.layer.weight.double().t().clone()}
    solved = []  # (link, X = F_{l-1}^T, relative error, rank)
    f_above = new_feedback[id(last.f_in)]
    for link in reversed(links[1:-1]):
        lay = link.layer
        if not (isinstance(lay, Linear) and link.f_in is not None and not link.f_in.channelwise
                and link.f_in.rows == lay.in_features and link.f_out.rows == lay.out_features):
            break
        w = lay.weight.double().cpu()
        x, r = _solve(f_above, w, method, rank)
        err = float((f_above.cpu() @ x - w).norm() / w.norm().clamp_min(1e-300))
        new_feedback[id(link.f_in)] = x.t()
        solved.append((link, x, err, r))
        f_above = x.t()

    for link in links[1:]:
        if id(link.f_in) in new_feedback:
            link.f_in.feedback.copy_(new_feedback[id(link.f_in)])
    for link, x, _, _ in solved if match_weights else ():  # weight matching: W_l := F_l F_{l-1}^T
        w_new = link.f_out.feedback.double() @ link.f_in.feedback.double().t()
        link.layer.weight.copy_(w_new)
    wa_after = weight_alignment(dfa)

    reports, done = [], {id(link.layer): (err, r) for link, _, err, r in solved}
    for link in links:
        lay = link.layer
        if link is last:
            action, err, r, limit, note = "feedback = weight^T", 0.0, None, None, ""
        elif id(lay) in done:
            err, r = done[id(lay)]
            limit = min(lay.out_features, lay.in_features, n_out)
            action = "weights matched" if match_weights else "feedback matched, weights kept"
            note = (f"rank of F_l F_(l-1)^T is at most n_out = {n_out} < min(n_l, n_(l-1)) = "
                    f"{min(lay.out_features, lay.in_features)}: the match is approximate"
                    if limit < min(lay.out_features, lay.in_features) else "")
        else:
            action, err, r, limit = "kept", None, None, None
            note = ("the first layer: its input is the data" if link.f_in is None else
                    "below the matched chain (not a fastdfa.Linear with dense matching sites)")
        reports.append(LayerMatch(link.name, action, err, r, limit, wa_before.get(link.name),
                                  wa_after.get(link.name), note))
    return reports


def _at_angle(reference: torch.Tensor, theta: float, generator: torch.Generator, norm: float) -> torch.Tensor:
    """A tensor of ``reference``'s shape with Frobenius cosine cos(theta) to it and norm ``norm``;
    its orthogonal part is random (from ``generator``)."""
    ref = reference.double().cpu().flatten()
    ref_norm = ref.norm()
    if ref_norm == 0:
        raise ValueError("cannot align to an all-zero weight")
    unit = ref / ref_norm
    noise = torch.randn(ref.shape, generator=generator, dtype=torch.float64)
    ortho = noise - (noise @ unit) * unit
    ortho = ortho / ortho.norm()
    out = norm * (math.cos(theta) * unit + math.sin(theta) * ortho)
    return out.reshape(reference.shape)


@torch.no_grad()
def soft_align(dfa: DFA, angle: float, seed: int | None = None) -> dict[str, float]:
    """IFA: set the feedback at ``angle`` degrees from the forward path; returns the cosines set.

    * mode "fa": every layer's ``feedback_weight`` B gets ``cos(B, W) = cos(angle)`` and
      ``||B|| = ||W||`` (Linear and Conv2d).
    * mode "dfa": every site's feedback F_l (site at the input of layer l+1) gets
      ``cos(F_l, P_l) = cos(angle)`` and ``||F_l|| = ||P_l||`` with
      ``P_l = (W_L ... W_{l+1})^T``, the BP path of the linearised network; angle 0 on a
      linear network gives exactly BP's gradients. Every layer above each site must be a
      fastdfa.Linear whose widths chain (a Flatten between them is fine).

    The orthogonal part is random, seeded by ``seed`` (default: the wrapper's seed).
    Nothing is changed when it raises.
    """
    if not isinstance(dfa, DFA):
        raise TypeError(f"soft_align needs a fastdfa.DFA, got {type(dfa).__name__}")
    if not (isinstance(angle, (int, float)) and math.isfinite(angle) and 0 <= angle <= 180):
        raise ValueError(f"angle must be in [0, 180] degrees, got {angle!r}")
    theta = math.radians(angle)
    seed = dfa.seed if seed is None else int(seed)
    targets = []  # (name, tensor to write, value, the reference it is aligned to)
    if dfa.mode == "fa":
        for j, layer in enumerate(dfa.feedback.fa_layers):
            w = layer.weight
            b = _at_angle(w, theta, seeded_generator(seed, "soft_align", "fa", j), float(w.double().norm()))
            targets.append((dfa.name_of(layer), layer.feedback_weight, b, w))
    elif dfa.mode == "dfa":
        links = chain(dfa)
        for i, link in enumerate(links[1:], start=1):
            site = link.f_in
            path, width = None, site.rows  # path = W_L ... W_i, [n_out, site features]
            for above in links[i:]:
                lay = above.layer
                if not isinstance(lay, Linear) or site.channelwise or lay.in_features != width:
                    raise ValueError(f"soft_align in mode 'dfa' needs fastdfa.Linear layers with chaining widths "
                                     f"from site {site.name!r} to the output; {above.name!r} "
                                     f"({type(lay).__name__}) breaks the chain")
                w = lay.weight.double().cpu()
                path = w if path is None else w @ path
                width = lay.out_features
            p = path.t()
            f = _at_angle(p, theta, seeded_generator(seed, "soft_align", "site", site.index), float(p.norm()))
            targets.append((site.name, site.feedback, f, p))
    else:
        raise ValueError("soft_align aligns the feedback of mode 'fa' or 'dfa'; dfa.mode is 'bp'")
    out = {}
    for name, tensor, value, reference in targets:
        tensor.copy_(value)
        out[name] = _cos(tensor, reference)
    return out
