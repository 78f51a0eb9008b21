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
output down to the first layer that is not a dense fastdfa layer
(``fastdfa.Linear``, or ``fastdfa.Conv1D`` with ``W`` its transposed weight)
with dense sites matching its weight (for a CNN: the linear head, whose first
layer's input site is the flattened conv output, gets matched; the convs keep
their weights and feedback).

The rule rests on the chain: ``F_l e`` is DFA's error at layer ``l``'s output
only if the site holding ``h_l`` is the one thing computed from it (through
elementwise ops, whose Jacobian the rule drops with ``g'``). The execution
order is not proof of that (q, k and v projections of equal width chain by
shape), so both FWM's plain form and ``soft_align`` in mode "dfa" check the
data flow first (``fastdfa.metrics.check_chain``) and refuse, naming the first
link that breaks, before anything is changed: a decoder LM, a residual MLP,
parallel branches, a LayerNorm between two layers.

A converted transformer encoder (BERT's layout) gets FWM's encoder form instead
(``fastdfa.matching``): the chain runs along the residual stream through each
block's FFN down, FFN up and attention output projections, whose output
feedback is the sum of the feedback of every site reading the residual stream
above them (LayerNorm taken as the identity); Q/K/V keep their weights.

``soft_align`` (IFA, Cheon, Bae, Paik) turns the feedback to a chosen angle
from the forward path at initialisation.

``jacobian_feedback`` (``fastdfa.jacobian_init``) keeps every weight and sets each site's feedback to BP's
mean Jacobian path from the site to the error, measured on a batch: the feedback closest to BP's signal
for the pretrained model as it is, on any architecture.
"""

from __future__ import annotations

import math

import torch

from .dfa import DFA
from .feedback import seeded_generator
from .jacobian_init import JACOBIAN_MODES, jacobian_feedback  # noqa: F401  (re-exported: fastdfa.init.*)
from .matching import (
    ATTENTION_FEEDBACK,
    FWM_METHODS,
    ErrorBasis,
    LayerMatch,
    encoder_blocks,
    encoder_layout,
    encoder_weight_alignment,
    match_encoder,
    solve_chain_jointly,
)
from .matching import solve_feedback as _solve
from .metrics import _cos, chain, check_chain, dense_matrix, describe, is_dense, weight_alignment

__all__ = ["FWM_METHODS", "ATTENTION_FEEDBACK", "LayerMatch", "feedback_weight_matching", "soft_align",
           "JACOBIAN_MODES", "jacobian_feedback", "encoder_blocks", "encoder_layout", "encoder_weight_alignment"]


def _unmatchable(link) -> str | None:
    """Why FWM's plain form stops below ``link``'s layer (None: it can match it): W_l := F_l F_(l-1)^T needs a
    dense layer whose input site is dense, one row per input feature."""
    lay = link.layer
    if not is_dense(lay):
        return f"{link.name!r} is a {describe(lay)}, not a dense layer (fastdfa.Linear / fastdfa.Conv1D)"
    if link.f_in.channelwise:
        return (f"the input site of {link.name!r} has per-feature feedback ({link.f_in.rows} rows broadcast over "
                "its other axes); the plain chain needs dense sites")
    if link.f_in.rows != lay.in_features:
        return (f"the input site of {link.name!r} ({describe(lay)}) has {link.f_in.rows} feedback rows for "
                f"{lay.in_features} input features")
    return None


def _check_output_layer(links) -> None:
    """The plain form's output layer: dense, its input site dense of its input width (F_(L-1) = W_L^T)."""
    last = links[-1]
    what = f"{last.name!r} ({describe(last.layer)})"
    if len(links) < 2:
        raise ValueError(f"feedback-weight matching needs at least two layers; the model runs one fastdfa layer, "
                         f"{what}")
    if not is_dense(last.layer):
        raise ValueError("feedback-weight matching needs the output layer to be a dense fastdfa layer "
                         f"(fastdfa.Linear / fastdfa.Conv1D, F_(L-1) = W_L^T); the output layer {what} is not")
    site = last.f_in
    if site.channelwise or site.rows != last.layer.in_features:
        raise ValueError(f"feedback-weight matching needs the output layer's input site to have dense feedback "
                         f"of its input width; the site at the input of the output layer {what} has "
                         f"{'per-feature' if site.channelwise else 'dense'} feedback of {site.rows} rows for "
                         f"{last.layer.in_features} input features")


@torch.no_grad()
def feedback_weight_matching(dfa: DFA, method: str = "lstsq", rank: int | None = None, *,
                             attention_feedback: str = "value", match_weights: bool = True,
                             example_input=None) -> list[LayerMatch]:
    """FWM on the wrapped model, in place (see the module docstring); one report per layer.

    Run it on the BP-pretrained weights, then train in mode "dfa" (with
    weight decay, as the paper does). Needs the feedback built (one forward,
    or ``example_input=`` to ``fastdfa.DFA``). Nothing is changed when it raises.

    **The chain it assumes.** The plain form matches the top of the execution order, from the output
    layer down to the first layer that is not a dense fastdfa layer with a dense input site of its width, and
    ``W_l := F_l F_(l-1)^T`` is right only if those layers form a chain: each one's input computed from the
    previous one's output alone, through elementwise ops (``fastdfa.metrics.check_chain``; a residual add,
    attention, parallel q/k/v or gate/up branches and LayerNorm break it). It refuses, naming the first
    link that breaks, before anything is changed. ``example_input`` (a small batch the model takes, a
    tensor or a tuple of positional arguments) lets one forward show the data flow; without it only an
    ``nn.Sequential`` proves it from its modules, and any other model raises asking for it.

    A model holding transformer encoder blocks in BERT's layout (``fastdfa.matching.encoder_blocks``:
    a converted Hugging Face BERT) gets the encoder form instead of the plain chain: the head and each
    block's attention output, FFN up and FFN down projections are matched along the residual stream,
    Q/K/V keep their weights, and ``attention_feedback`` ("value", the default, "keep" or "zero") sets
    the feedback at their input (``fastdfa.matching``; docs/math.md, "FWM on a transformer encoder").
    Its data flow is checked too (``fastdfa.matching.check_encoder_flow``): with ``example_input``
    against one forward; without it, the blocks must be transformers' own encoder classes.

    ``match_weights=False`` stops after feedback matching: the feedback is set as above and every weight
    is kept (its WA is then ``sqrt(1 - reconstruction_error**2)``, not 1).
    """
    if not isinstance(dfa, DFA):
        raise TypeError(f"feedback_weight_matching needs a fastdfa.DFA, got {type(dfa).__name__}")
    if method not in FWM_METHODS:
        raise ValueError(f"method must be one of {FWM_METHODS}, got {method!r}")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive int or None, got {rank!r}")
    if rank is not None and method != "svd":
        raise ValueError(f"rank= truncates the SVD solve; use method='svd' with it (method is {method!r})")
    if attention_feedback not in ATTENTION_FEEDBACK:
        raise ValueError(f"attention_feedback must be one of {ATTENTION_FEEDBACK}, got {attention_feedback!r}")
    links = chain(dfa)
    layout = encoder_layout(dfa)
    if layout is not None:
        return match_encoder(dfa, layout, method, rank, attention_feedback, match_weights,
                             example_input=example_input)
    _check_output_layer(links)
    last = links[-1]
    n_out = last.layer.out_features

    # The matched chain: layers lowest .. L-1 (the first layer's input is the data: it is never matched). It
    # stops at the first layer below the output that is not dense with a dense input site (a CNN's convs);
    # a width that does not chain is no reason to stop: it is a sign that the order is no chain (q -> k -> v),
    # which check_chain names.
    lowest, stop = len(links) - 1, None   # stop: (index, why) of the layer the chain stops at
    for i in range(len(links) - 2, 0, -1):
        why = _unmatchable(links[i])
        if why is not None:
            stop = (i, why)
            break
        lowest = i
    # Every matched layer's output must feed the next site alone (its output feedback is that site's F), and
    # the output must be the last layer's. A dense first layer belongs to the chain the user sees, so a
    # break between it and layer 1 is named too, though matching layer 1 does not rest on it.
    first = 0 if lowest == 1 and is_dense(links[0].layer) else lowest
    check_chain(dfa, first, example_input, who="feedback-weight matching")
    for link in links[lowest:-1]:  # a chain, and yet the widths differ: a broadcast or a reshape between
        if link.f_out.channelwise or link.f_out.rows != link.layer.out_features:
            raise ValueError(f"feedback-weight matching: the site above {link.name!r} ({describe(link.layer)}), "
                             f"{link.f_out.name!r}, has {'per-feature' if link.f_out.channelwise else 'dense'} "
                             f"feedback of {link.f_out.rows} rows for its {link.layer.out_features} output features: "
                             "W_l := F_l F_(l-1)^T needs one row per output feature. Nothing was changed.")
    wa_before = weight_alignment(dfa)

    # Feedback matching, computed first (in float64, in the error basis H: ErrorBasis) and written only once
    # all of it succeeded. The greedy top-down solve is lstsq's / svd's, and joint's start.
    basis = ErrorBasis.of(dfa)
    width = basis.width(n_out)
    w_out = dense_matrix(last.layer)
    h_top = basis.of_output(w_out)
    top_error = float((h_top @ basis.v.t() - w_out.double().cpu().t()).norm() / w_out.double().norm()) \
        if basis.v is not None else 0.0
    matched = list(reversed(links[lowest:-1]))  # from the top down
    weights = [dense_matrix(link.layer).double().cpu() for link in matched]
    h_in, ranks, h_above = [], [], h_top
    for w in weights:
        x, r = _solve(h_above, w, "lstsq" if method == "joint" else method, rank)
        h_in.append(x.t())
        ranks.append(r)
        h_above = x.t()
    if method == "joint" and h_in:
        h_in = solve_chain_jointly(h_top, weights, h_in)
        ranks = [int(torch.linalg.matrix_rank(h)) for h in [h_top] + h_in[:-1]]
    above = [h_top] + h_in[:-1]
    solved = [(link, float((g @ h.t() - w).norm() / w.norm().clamp_min(1e-300)), r)
              for link, g, h, w, r in zip(matched, above, h_in, weights, ranks)]

    new_feedback = {id(last.f_in): h_top, **{id(link.f_in): h for link, h in zip(matched, h_in)}}
    for link in links[1:]:
        if id(link.f_in) in new_feedback:
            link.f_in.feedback.copy_(basis.from_basis(new_feedback[id(link.f_in)]))
    for link, g, h in zip(matched, above, h_in) if match_weights else ():  # weight matching: W_l := G_l G_(l-1)^T
        dense_matrix(link.layer).copy_(g @ h.t())  # Conv1D: through the transposed view, into its [in, out] weight
    wa_after = weight_alignment(dfa)

    reports, done = [], {id(link.layer): (err, r) for link, err, r in solved}
    space = _space(dfa, n_out, width)
    for i, link in enumerate(links):
        lay = link.layer
        if link is last:
            action, err, r, limit = "feedback = weight^T", top_error, None, None
            note = (f"F P = W^T is approximate: P has rank {width} < n_e = {n_out}" if width < n_out else "")
        elif id(lay) in done:
            err, r = done[id(lay)]
            limit = min(lay.out_features, lay.in_features, width)
            action = "weights matched" if match_weights else "feedback matched, weights kept"
            note = (f"rank of F_l F_(l-1)^T is at most {space} < min(n_l, n_(l-1)) = "
                    f"{min(lay.out_features, lay.in_features)}: the match is approximate"
                    if limit < min(lay.out_features, lay.in_features) else "")
        else:
            action, err, r, limit = "kept", None, None, None
            if stop is not None and i == stop[0]:
                note = f"the matched chain stops here: {stop[1]}"
            elif stop is not None:
                note = f"below the matched chain, which stops at {links[stop[0]].name!r}"
            else:
                note = "the first layer: its input is the data"
        reports.append(LayerMatch(link.name, action, err, r, limit, wa_before.get(link.name),
                                  wa_after.get(link.name), note))
    return reports


def _space(dfa: DFA, n_out: int, width: int) -> str:
    """The error space's width in words, for the reports' notes."""
    what = f"the error's width n_e = {n_out}"
    if dfa.dfa_config.head is not None:
        what = f"the width of the head's input n_e = {n_out}"
    if dfa.dfa_config.error_rank is not None:
        what = f"rank(P) = {width} (error_rank={dfa.dfa_config.error_rank}, {what})"
    return what


def _refuse_error_rank(dfa: DFA, what: str) -> None:
    """IFA sets F_l at an angle from BP's path in the error's own coordinates; with error_rank=k the feedback
    lives in P e's k coordinates, where a chosen angle is not reachable for k < n_e."""
    if dfa.dfa_config.error_rank is not None:
        raise ValueError(f"{what} sets the feedback in the error's own coordinates; this wrapper has error_rank="
                         f"{dfa.dfa_config.error_rank} (feedback on P e). Wrap the model without error_rank for it")


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
def soft_align(dfa: DFA, angle: float, seed: int | None = None, *, example_input=None) -> dict[str, float]:
    """IFA: set the feedback at ``angle`` degrees from the forward path; returns the cosines set.

    * mode "fa": every layer's ``feedback_weight`` B gets ``cos(B, W) = cos(angle)`` and
      ``||B|| = ||W||`` (Linear, Conv1D and the convolutions). No chain is assumed: each layer's B stands
      for its own W.
    * mode "dfa": every site's feedback F_l (site at the input of layer l+1) gets
      ``cos(F_l, P_l) = cos(angle)`` and ``||F_l|| = ||P_l||`` with
      ``P_l = (W_L ... W_{l+1})^T``, the BP path of the linearised network; angle 0 on a
      linear network gives exactly BP's gradients. That product is BP's path only if every layer above
      the first site is a dense fastdfa layer (fastdfa.Linear / Conv1D) with chaining widths, and those
      layers form a chain: each one's input computed from the previous one's output alone, through
      elementwise ops (``fastdfa.metrics.check_chain``: a residual add, attention, parallel branches or a
      LayerNorm break it). It refuses otherwise, naming the first layer that breaks it.
      ``example_input`` (a small batch the model takes) lets one forward show the data flow; without it
      only an ``nn.Sequential`` proves it from its modules.
    * mode "grape" is aligned as mode "dfa": GrAPE trains with the same site feedback F_l, which it then
      turns towards its Jacobian estimate, so IFA gives it a start at a chosen angle from BP's path.

    The orthogonal part is random, seeded by ``seed`` (default: the wrapper's seed).
    Nothing is changed when it raises.
    """
    if not isinstance(dfa, DFA):
        raise TypeError(f"soft_align needs a fastdfa.DFA, got {type(dfa).__name__}")
    _refuse_error_rank(dfa, "soft_align")
    if not (isinstance(angle, (int, float)) and math.isfinite(angle) and 0 <= angle <= 180):
        raise ValueError(f"angle must be in [0, 180] degrees, got {angle!r}")
    theta = math.radians(angle)
    seed = dfa.seed if seed is None else int(seed)
    mode = dfa.mode
    targets = []  # (name, tensor to write, value, the reference it is aligned to)
    if mode == "fa":
        for j, layer in enumerate(dfa.feedback.fa_layers):
            w = layer.weight
            b = _at_angle(w, theta, seeded_generator(seed, "soft_align", "fa", j), float(w.double().norm()))
            targets.append((dfa.name_of(layer), layer.feedback_weight, b, w))
    elif mode in ("dfa", "grape"):
        links = chain(dfa)
        who = f"soft_align in mode {mode!r}"
        for link in links[1:]:  # the layers above the first site, bottom up
            lay, site = link.layer, link.f_in
            why = None
            if not is_dense(lay):
                why = "not a dense layer"
            elif site.channelwise or site.rows != lay.in_features:
                why = (f"its input site {site.name!r} has {'per-feature' if site.channelwise else 'dense'} "
                       f"feedback of {site.rows} rows for {lay.in_features} input features")
            if why is not None:
                raise ValueError(f"{who} needs dense fastdfa layers (fastdfa.Linear / Conv1D) with chaining widths "
                                 f"from the first site to the output; {link.name!r} ({describe(lay)}) breaks the "
                                 f"chain: {why}")
        # The chain from the first dense layer, as feedback_weight_matching checks it (the product above the
        # first site does not rest on the link into it, but the same model gets the same answer from both).
        check_chain(dfa, 0 if is_dense(links[0].layer) else 1, example_input, who=who)
        for below, link in zip(links[1:], links[2:]):  # a chain, and yet the widths differ: a broadcast between
            if below.layer.out_features != link.layer.in_features:
                raise ValueError(f"{who}: the {link.layer.in_features} input features of {link.name!r} "
                                 f"({describe(link.layer)}) do not chain with the {below.layer.out_features} outputs "
                                 f"of {below.name!r} ({describe(below.layer)}); P_l = (W_L ... W_(l+1))^T needs "
                                 "them to. Nothing was changed.")
        path = None  # W_L ... W_i, [n_out, features of the site at layer i's input]
        for link in reversed(links[1:]):
            w = dense_matrix(link.layer).double().cpu()
            path = w if path is None else path @ w
            p, site = path.t(), link.f_in
            f = _at_angle(p, theta, seeded_generator(seed, "soft_align", "site", site.index), float(p.norm()))
            targets.append((site.name, site.feedback, f, p))
        targets.reverse()  # from input to output, as dfa.sites
    else:
        raise ValueError(f"soft_align aligns the feedback of mode 'fa', 'dfa' or 'grape'; dfa.mode is {mode!r}")
    out = {}
    for name, tensor, value, reference in targets:
        tensor.copy_(value)
        out[name] = _cos(tensor, reference)
    return out
