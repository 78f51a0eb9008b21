"""Jacobian feedback: DFA's feedback set to BP's mean path from each site to the error, the weights kept.

DFA gives site ``s`` (the input ``h_s`` of a site module) the error signal ``F_s c`` with ``c = e`` (or
``c = P e`` under ``error_rank=k``, ``P`` the wrapper's fixed ``(k, n_e)`` projection), where BP gives
``J_s^T e``, ``J_s = dz/dh_s`` the Jacobian from the site to the error point ``z`` (the logits, or the
head's input under ``head=``). For an error with ``E[e e^T] = I`` the feedback whose signal is closest to
BP's over a batch, ``min_F sum_n E_e ||F_s P e - J_{s,n}^T e||^2``, solves

    F_s P = M_s,    M_s = mean_n J_{s,n}^T                       (n_s x n_e)

so ``F_s = M_s`` without ``error_rank`` and the least-squares ``F_s = M_s P^+`` with it (``P^+`` the
pseudo-inverse: exact for ``k >= n_e``). A per-feature site (the feedback broadcast over positions, e.g.
tokens) takes the mean over the positions too: ``M_s = mean_{n,t} J_{s,n,t}^T``, the broadcast feedback
closest to BP's per-position signal, over the positions that reach the error (a padded token behind the
attention mask has ``J = 0`` and is left out, so the padding of a batch does not shrink the feedback).
A linear network's Jacobians do not depend on the input, so there ``F_s = J_s^T`` and DFA's gradients
are BP's (GA = 1); with nonlinearities it is BP's path at the batch's mean operating point.

Where FWM (``fastdfa.init.feedback_weight_matching``) rewrites the weights so that a chain of feedback
reproduces them (rank ``n_e`` per product), this keeps every pretrained weight and asks nothing of the
architecture: residual streams, attention and LayerNorm are in ``J_s`` as they are. The cost is ``n_e``
backward passes over ``example_input`` (column ``i`` of every ``M_s`` from one ``autograd.grad`` of
``sum_n z_{n,i}``): 2 at a 2-class classifier's logits, 384 on all-MiniLM-L6-v2 with
``head="classifier"`` (over 15 minutes for 32 texts on one loaded core), ``k`` under
``error_rank=k < n_e``. Errors with one row per sample only (``batch_dims=1``): with ``batch_dims=2``
each token's error reaches every other token's site, and the per-token least squares is another solve.
"""

from __future__ import annotations

import torch

from .dfa import DFA
from .engine import error_point
from .engine.error_point import error_tensor
from .engine.guard import evaluating, split_call
from .engine.recording import SiteCapture

JACOBIAN_MODES = ("dfa", "grape")  # the modes whose site feedback F_s this sets


def _bp_forward(dfa: DFA, args: tuple, kwargs: dict) -> tuple[torch.Tensor, SiteCapture]:
    """One plain BP forward of the model that keeps every site's input and the error-point tensor."""
    recorder = dfa._recorder
    capture = SiteCapture(recorder, [site.module for site in dfa.feedback.sites])
    token = recorder.begin(capture)
    try:
        output = dfa.model(*args, **kwargs)
    finally:
        recorder.end(token)
    z = error_tensor(output) if dfa._point.kind == error_point.RETURN else capture.error
    if z is None:
        raise RuntimeError(f"the error point ({dfa._point.describe()}) did not run in the forward of example_input")
    return z, capture


def mean_site_jacobians(dfa: DFA, example_input, directions: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``M_s D^T`` with ``M_s = mean J_s^T`` (float64, ``(site rows, r)``) for every site of the built wrapper,
    ``D`` the ``(r, n_e)`` error ``directions`` (None: the identity, so ``M_s`` itself), from ``r`` backward
    passes of one BP forward of ``example_input`` in eval mode (module docstring; column ``i`` from the
    gradient of ``sum_n z_n . d_i``); nothing of the model, its ``.grad``s or its training flags is
    changed."""
    store = dfa.feedback
    args, kwargs = split_call(example_input)
    with evaluating(dfa), torch.enable_grad():
        z, capture = _bp_forward(dfa, args, kwargs)
        n_e = store.n_out
        z = z.reshape(-1, n_e)
        if directions is not None:
            directions = directions.to(dtype=z.dtype, device=z.device)
        inputs = [capture.inputs.get(id(site.module)) for site in store.sites]
        missing = [site.name for site, x in zip(store.sites, inputs) if x is None]
        if missing:
            raise RuntimeError(f"site(s) {missing} did not run in the forward of example_input; every site "
                               "must run to measure its Jacobian")
        sums: list[list[torch.Tensor]] = [[] for _ in store.sites]  # per site, per error column
        reached: list[torch.Tensor | None] = [None] * len(store.sites)  # per-feature sites: positions
        r = n_e if directions is None else directions.shape[0]
        for i in range(r):
            along = z[:, i].sum() if directions is None else (z @ directions[i]).sum()
            grads = torch.autograd.grad(along, inputs, retain_graph=i < r - 1, allow_unused=True)
            for j, (site, g) in enumerate(zip(store.sites, grads)):
                total, hit = _site_sum(site, g, z.shape[0])
                sums[j].append(total)
                if hit is not None:
                    reached[j] = hit if reached[j] is None else reached[j] | hit
    out = {}
    for site, total, hit in zip(store.sites, sums, reached):
        # per feature: the mean over the positions that reach the error (at least one)
        count = z.shape[0] if not site.channelwise else max(int(hit.sum()) if hit is not None else 0, 1)
        out[site.name] = torch.stack(total, dim=1) / count
    return out


def _site_sum(site, g: torch.Tensor | None, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One site's gradient summed over the batch (and, per feature, over positions) as a column of
    ``M_s`` times its count; and, per feature, which positions it reached (a nonzero gradient). A position
    whose gradient is exactly zero for every error column does not reach the error (a padded token behind
    an attention mask) and is left out of the mean: the feedback is BP's path where there is one."""
    if g is None:  # the error does not depend on this site (allow_unused): its path is zero
        return torch.zeros(site.rows, dtype=torch.float64), None
    g = g.detach().double().cpu()
    if site.channelwise:
        rows = g.movedim(site.feature_axis + 1, -1).reshape(-1, site.rows)
        return rows.sum(0), rows.ne(0).any(1)
    flat = g.reshape(n, -1)
    if flat.shape[1] != site.rows:
        raise RuntimeError(f"site {site.name!r} has {flat.shape[1]} elements per sample in example_input, but its "
                           f"dense feedback has {site.rows} rows; use inputs of the shape the wrapper was built on")
    return flat.sum(0), None


@torch.no_grad()
def jacobian_feedback(dfa: DFA, example_input) -> dict[str, float | None]:
    """Set every site's feedback to BP's mean path to the error on ``example_input``, keeping the weights:
    ``F_s = M_s`` (module docstring), ``n_e`` backward passes. Under ``error_rank=k`` the least squares of
    ``F_s P = M_s``: for ``k < n_e`` ``F_s = (M_s P^T)(P P^T)^-1`` from ``k`` backward passes (the
    directions of ``P``'s rows), for ``k >= n_e`` the least-norm exact solution. Returns per site the
    relative residual ``||F_s P - M_s||_F / ||M_s||_F``: 0 without ``error_rank`` and for ``k >= n_e``,
    None for ``k < n_e`` (``M_s`` itself is not measured there).

    ``example_input``: a batch the model takes (a tensor, a tuple of positional arguments or a dict of
    keyword arguments, as ``dfa(...)`` would); the wrapper is built on it if it is not built yet. Mode
    "dfa" or "grape" (GrAPE then learns on from this start), ``batch_dims=1``. Nothing is changed when it
    raises."""
    if not isinstance(dfa, DFA):
        raise TypeError(f"jacobian_feedback needs a fastdfa.DFA, got {type(dfa).__name__}")
    if dfa.mode not in JACOBIAN_MODES:
        raise ValueError(f"jacobian_feedback sets the site feedback of modes {JACOBIAN_MODES}; this wrapper is in "
                         f"mode {dfa.mode!r} (mode 'fa' has per-layer feedback weights, mode 'bp' none)")
    if dfa.dfa_config.batch_dims != 1:
        raise ValueError(f"jacobian_feedback needs one error row per sample (batch_dims=1), this wrapper has "
                         f"batch_dims={dfa.dfa_config.batch_dims}: each token's error reaches every other token's "
                         "site there, which one broadcast feedback per site does not fit")
    if not dfa.built:
        dfa.build(example_input)
    store = dfa.feedback
    if not store.sites:
        raise ValueError("the wrapper has no feedback site: nothing to set")
    p = store.error_projection
    p = None if p is None else p.detach().double().cpu()
    compressed = p is not None and p.shape[0] < store.n_out  # k < n_e: k backward passes along P's rows
    targets = mean_site_jacobians(dfa, example_input, directions=p if compressed else None)
    gram = p @ p.t() if compressed else None
    fits, values = {}, []
    for site in store.sites:
        m = targets[site.name]  # M_s, or M_s P^T when compressed
        if p is None:
            f, fit = m, 0.0
        elif compressed:  # F = (M P^T)(P P^T)^-1; M itself was not measured: no residual to report
            f, fit = torch.linalg.solve(gram, m.t()).t(), None
        else:  # k >= n_e: F P = M is solvable; the least-norm solution
            f = torch.linalg.lstsq(p.t(), m.t(), driver="gelsd").solution.t()  # min ||P^T F^T - M^T||
            norm = float(m.norm())
            fit = float((f @ p - m).norm()) / norm if norm > 0 else 0.0
        if not torch.isfinite(f).all():
            raise FloatingPointError(f"site {site.name!r}: the measured Jacobian holds NaN or inf; nothing was set")
        values.append(f)
        fits[site.name] = fit
    for site, f in zip(store.sites, values):  # every site solved before any is written
        site.feedback.copy_(f.to(dtype=site.feedback.dtype, device=site.feedback.device))
    return fits
