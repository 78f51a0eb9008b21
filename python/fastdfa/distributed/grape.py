"""GrAPE across the stages of a pipeline: the model's dual pass, cut at the same boundaries.

A whole-model GrAPE step (``fastdfa.engine.grape_pass``) runs one dual pass
of the mini-batch: with ``K`` sites and per-site tangents the batch is
repeated ``K`` times and site ``k`` injects ``p_k ~ N(0, I)`` into replica
``k``'s tangent; the output tangent of replica ``k``, ``T_k = J_k p_k``,
gives ``J_hat_k = P_k^T T_k / N``, and after the step's projection ONE
alignment step turns every ``F_k`` towards it.

In the pipeline each micro-batch's dual pass follows its forward: stage
``r`` receives the primal and tangent of the ``K`` replicas from stage
``r - 1`` (stage 0 repeats its micro-batch), injects its own sites'
perturbations into their replicas' rows (``DualPass`` with
``first_replica``), and sends both on; the last stage sends every stage the
output-tangent rows of that stage's replicas. Each stage keeps ``(P, T)``
of every micro-batch and, after the step's last backward, takes ONE
alignment step on its sites with the micro-batches' rows together: the
estimate of the whole mini-batch.

The perturbations are the whole-model pass's numbers: every stage draws,
once per step and in the whole-model order (the weight-space ``V`` of every
such site, then every other site's ``[B, ...]`` draw), all of the model's
perturbations from a ``PerturbationStream`` of the same seed, keeps its
sites' and serves each micro-batch its rows. So the feedback after a step
equals a whole-model GrAPE step's (up to the rounding of the micro-batch
GEMMs), whichever stage holds a site.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.autograd.forward_ad as fwAD
import torch.distributed as dist

from ..engine.grape_pass import (
    DualPass,
    GrapeEstimate,
    PerturbationStream,
    align_feedback,
    estimate_from_tangents,
    replicate_batch,
    uses_weight_space,
)
from .agreement import agree


class StageDualPass(DualPass):
    """A stage's part of the model's dual pass: the model's replicas, this stage's sites, and the
    whole-model draws of its perturbations (``weights[k]``, ``activations[k]``) sliced to the micro-batch."""

    def __init__(self, sites, candidates, kernels, n: int, replicas: int, first_replica: int,
                 weights: dict, activations: dict, micro: slice):
        super().__init__(sites, candidates, kernels, None, n, replicas, first_replica)
        self.weights, self.activations, self.micro = weights, activations, micro

    def draw(self, shape, device, dtype, k: int, weight: bool = False) -> torch.Tensor:
        value = self.weights[k] if weight else self.activations[k][self.micro]
        if tuple(value.shape) != tuple(shape):
            raise RuntimeError(f"GrAPE pipeline: site {self.first_replica + k} asks for a perturbation of shape "
                               f"{tuple(shape)}, the step drew {tuple(value.shape)}")
        return value.to(device=device, dtype=dtype)


class StageGrape:
    """One stage's GrAPE: the draws, the dual pass of each micro-batch, the alignment step."""

    def __init__(self, wrapper, module, stage: int, micro_batches: int, first_site: int, seed: int, group,
                 device: torch.device, next_module=None, data_group=None):
        self.wrapper, self.module, self.stage, self.device = wrapper, module, stage, device
        self.next_module = next_module                # the module the boundary site feeds (next stage's)
        # DDP replicas of the stage: replica i holds rows [i B, (i + 1) B) of the whole batch of all replicas
        self.data_group = data_group
        self.replica = 0 if data_group is None else dist.get_rank(data_group)
        self.data_replicas = 1 if data_group is None else dist.get_world_size(data_group)
        self.micro_batches, self.first_site, self.group = micro_batches, first_site, group
        self.stream = PerturbationStream(seed)
        self.table: list[tuple[int, bool, tuple]] | None = None  # the model's draws: (site, weight?, shape)
        self.site_ranges: list[tuple[int, int]] = []  # per stage: (first site, count)
        self.replicas = 1
        self.n = 0                                    # rows of one micro-batch (its batch dims' product)
        self.b = 0                                    # its first batch dim
        self.weight_sites: set[int] = set()           # local indices perturbed in weight space
        self._draws: tuple[dict, dict] = ({}, {})
        self._pending: dict[int, StageDualPass] = {}
        self._rows: list[list[tuple[torch.Tensor, torch.Tensor]]] = []

    # ----------------------------------------------------------------- setup
    def setup(self, example: torch.Tensor, e_shape: tuple, batch_dims: int, fault) -> None:
        """Build the stage's sites from ``example`` and agree on the model's draw table (one collective)."""
        entries, text = None, None
        if not fault:
            try:
                self.wrapper.build(example)
                self.b, self.n = e_shape[0], int(torch.Size(e_shape[:batch_dims]).numel())
                lead = (self.data_replicas * self.micro_batches * self.b, *e_shape[1:batch_dims])
                full_rows = self.data_replicas * self.micro_batches * self.n
                entries, self.weight_sites = [], set()
                sites = self.wrapper.sites
                if self.next_module is not None and sites:
                    self._check_boundary(sites[-1], full_rows)
                for k, site in enumerate(sites):
                    weight = uses_weight_space(self.wrapper.perturb, site, full_rows)
                    shape = tuple(site.module.weight.shape) if weight else (*lead, *site.shape)
                    entries.append((self.first_site + k, weight, shape))
                    if weight:
                        self.weight_sites.add(k)
            except Exception as exc:  # noqa: BLE001
                fault.local(exc)
                text = fault.text
        gathered = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(gathered, (entries, fault.origin if fault else None, text), group=self.group)
        for entries_s, origin, text_s in gathered:
            if origin is not None:
                fault.adopt(origin, text_s)
        if fault:
            return
        self.site_ranges = [(e[0][0], len(e)) if e else (0, 0) for e, _, _ in gathered]
        self.table = sorted(entry for e, _, _ in gathered for entry in e)
        total = len(self.table)
        self.replicas = total if self.wrapper.jvp == "per-site" and total > 1 else 1

    def _check_boundary(self, site, rows: int) -> None:
        """A weight-space perturbation acts inside the layer a site feeds; the boundary site feeds the next
        stage's first layer, whose weight this stage does not hold."""
        as_whole_model = SimpleNamespace(module=self.next_module, channelwise=site.channelwise, rows=site.rows)
        if uses_weight_space(self.wrapper.perturb, as_whole_model, rows):
            raise ValueError(
                f"GrAPE with perturb={self.wrapper.perturb!r} perturbs site {site.name!r} (a stage boundary) in "
                f"weight space, i.e. inside the layer it feeds, which runs on the next stage: the pipeline does "
                f"not split that. Use perturb='activation', or split at a module fed in activation space (a "
                f"module of sites=, or with perturb='auto' a layer with at least {rows} outputs)")

    def dual_spec(self, spec) -> tuple:
        """The (shape, dtype) of the stacked primal and tangent for an activation of ``spec``."""
        shape, dtype = spec
        return (2, self.replicas * shape[0], *shape[1:]), dtype

    def tangent_spec(self, stage: int, e_dtype) -> tuple:
        """The (shape, dtype) of the output-tangent rows the last stage sends ``stage``."""
        count = self.site_ranges[stage][1] if self.replicas > 1 else 1
        return (count * self.n, self.wrapper.out_features), e_dtype

    # ------------------------------------------------------------------ step
    def begin_step(self) -> None:
        """Draw the whole model's perturbations of this step, in the whole-model order; keep this stage's."""
        device = self.device
        gen = self.stream.generator(device)
        weights, activations = {}, {}
        mine = range(self.first_site, self.first_site + len(self.wrapper.sites))
        for weight in (True, False):
            for k, is_weight, shape in self.table:
                if is_weight == weight:
                    value = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
                    if k in mine:
                        (weights if weight else activations)[k - self.first_site] = value
        self._draws = (weights, activations)
        self._pending = {}
        self._rows = [[] for _ in self.wrapper.sites]

    def forward(self, m: int, inp: torch.Tensor) -> torch.Tensor:
        """The dual pass of micro-batch ``m``: ``inp`` is stage 0's micro-batch, or the stacked primal and
        tangent from the stage before. Returns the stacked pair to send on, or (last stage) the output
        tangents ``[replicas * n, n_out]``."""
        wrapper, module = self.wrapper, self.module
        first = (self.replica * self.micro_batches + m) * self.b  # this micro-batch's rows of the whole batch
        inj = StageDualPass(wrapper.sites, set(wrapper.execution_order), wrapper.kernels, self.n, self.replicas,
                            self.first_site, *self._draws, slice(first, first + self.b))
        for k in self.weight_sites:
            inj.perturb_weight(k, wrapper.sites[k].module)
        with wrapper.dual_forward(inj):
            if self.stage == 0:
                args = replicate_batch((inp,), {}, self.replicas)[0] if self.replicas > 1 else (inp,)
                out = module(*args)
            else:
                out = module(fwAD.make_dual(inp[0], inp[1]))
            if module.boundary is not None:
                primal, tangent = fwAD.unpack_dual(module.boundary.sent)
                module.boundary.sent = None
            else:  # the last stage: the output tangent at the error point (head= / error_at=: inside it)
                primal, tangent = fwAD.unpack_dual(out if inj.error is None else inj.error)
            tangent = torch.zeros_like(primal) if tangent is None else tangent
        self._pending[m] = inj
        if module.boundary is not None:
            return torch.stack([primal, tangent])
        return tangent.reshape(self.replicas * self.n, -1)

    def rows_for(self, stage: int, tangents: torch.Tensor) -> torch.Tensor:
        """The last stage's output tangents of ``stage``'s replicas."""
        if self.replicas == 1:
            return tangents
        first, count = self.site_ranges[stage]
        return tangents[first * self.n:(first + count) * self.n]

    def collect(self, m: int, tangents: torch.Tensor) -> None:
        """Micro-batch ``m``'s ``(P_k, T_k)`` of every site of this stage, from its output-tangent rows."""
        inj = self._pending.pop(m)
        with torch.no_grad():
            est = estimate_from_tangents(inj, self.wrapper.sites, tangents, self.n)
        for rows, p, t in zip(self._rows, est.perturbations, est.tangents):
            rows.append((p, t))

    def end_step(self, fault, skipped: bool) -> None:
        """ONE alignment step on the stage's sites with the mini-batch's estimate (not after a failed or
        skipped step, as a whole-model step takes none); with DDP replicas, the rows of every replica's
        micro-batches, in replica order: the estimate of the whole batch."""
        rows, self._rows, self._pending = self._rows, [], {}
        if self.data_group is not None:
            agree(self.data_group, self.device, fault)  # every replica aligns, or none
        if fault or skipped or not rows:
            return
        p_all = [torch.cat([p for p, _ in r]) for r in rows]
        t_all = [torch.cat([t for _, t in r]) for r in rows]
        if self.data_group is not None:
            p_all, t_all = [self._gather(p) for p in p_all], [self._gather(t) for t in t_all]
        est = GrapeEstimate(p_all, t_all)
        self.wrapper.last_alignment = align_feedback(self.wrapper.kernels, self.wrapper.feedback, est,
                                                     self.wrapper.feedback_lr)

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(self.data_replicas)]
        dist.all_gather(parts, tensor.contiguous(), group=self.data_group)
        return torch.cat(parts)
