"""Feedback sites and the one buffer that holds all their feedback.

A *site* is the input of a DFA-trained module (docs/design.md section 2): of
every fastdfa layer, and of every module named in ``sites=``, except the
first one executed, whose input is the data. Each site owns a block of rows
of ONE concatenated feedback buffer ``flat`` (``[R, n_out]``), so the output
error is projected to every site by ONE GEMM (``fastdfa.ops.dfa_project``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..feedback import feedback_matrix, seeded_generator
from ..ops.dfa_project import ProjectSite


def feature_axis(site_shape: tuple[int, ...], per_feature: bool) -> int | None:
    """The per-sample axis that per-feature feedback keeps (None: dense): the channel axis of a
    [C, H, W] site (a conv input), the last axis of any other; a [features] site is dense either way."""
    if not per_feature or len(site_shape) < 2:
        return None
    return 0 if len(site_shape) == 3 else len(site_shape) - 1


class Site:
    """One feedback site: the input of ``module``.

    ``feedback`` is a view of rows ``[offset, offset + rows)`` of the
    wrapper's concatenated feedback buffer, shape ``(rows, out_features)``:
    ``rows`` is the site's elements per sample (dense) or its features
    (per-feature: axis ``feature_axis`` of the per-sample shape, the error
    broadcast over the other axes). Writing into it changes the feedback used
    by the next backward.
    """

    def __init__(self, store: "FeedbackStore", index: int, name: str, module: nn.Module,
                 shape: tuple[int, ...], feature_axis: int | None, offset: int, rows: int):
        self._store = store
        self.index = index
        self.name = name
        self.module = module
        self.shape = shape          # per-sample shape of the site tensor when the feedback was built
        self.feature_axis = feature_axis
        self.offset = offset
        self.rows = rows

    @property
    def channelwise(self) -> bool:
        """Whether the feedback is per feature (broadcast over the other axes) rather than dense."""
        return self.feature_axis is not None

    @property
    def feedback(self) -> torch.Tensor:
        return self._store.flat[self.offset:self.offset + self.rows]

    @property
    def features(self) -> int:
        return math.prod(self.shape)

    def __repr__(self) -> str:
        kind = "dense" if self.feature_axis is None else f"per-feature (axis {self.feature_axis})"
        return f"Site({self.index}: {self.name!r}, shape={self.shape}, {kind} feedback {tuple(self.feedback.shape)})"


class FeedbackStore(nn.Module):
    """Holds all sites' feedback as ONE buffer ``flat`` of shape ``(R, n_out)``.

    ``flat`` is a non-persistent buffer (so ``.to()`` moves it); the state_dict
    gets one readable key per site (``feedback.0``, ``feedback.1``, ...) and one
    per FA layer (``feedback.fa.<i>``), written and read by the two overrides
    below. A state_dict loaded before the first forward (feedback not built
    yet) is kept and used, shape-checked, when the sites are built.

    After ``build``: ``sites`` (input to output), ``layout`` (per site
    ``(offset, rows, shape, feature_axis)``, what the projection is split by)
    and ``n_out``.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("flat", None, persistent=False)
        self.fa_layers: list[nn.Module] = []  # plain list: not submodules, the model owns them
        self.sites: list[Site] | None = None
        self.layout: list[tuple[int, int, tuple[int, ...], bool]] = []
        self.project_sites: list[ProjectSite] = []  # the projection's sites (no g' epilogue)
        self.split_sizes: list[int] = []            # each site's rows, in order
        self.flat_sites = False                     # every site is [batch, features]: no reshape needed
        self.per_feature = False                    # some site's feedback is broadcast (its length may vary)
        self.n_out: int | None = None
        self.pending: dict[str, torch.Tensor] = {}  # loaded before the build, used by it
        self.pending_names: list[str] | None = None
        self.perturbations = None  # GrAPE's PerturbationStream (set by the wrapper): saved in _extra_state
        # The index, in a larger model, of this store's first site: site i draws its feedback from
        # seeded_generator(seed, "site", seed_offset + i). 0 for a whole model; a pipeline stage
        # (fastdfa.distributed) that holds sites k, k+1, ... of the model sets k before the build, so a
        # site's feedback is the same whichever process holds it. Site indices and state_dict keys stay local.
        self.seed_offset = 0

    @property
    def site_names(self) -> list[str] | None:
        return None if self.sites is None else [s.name for s in self.sites]

    def build(self, modules: list[nn.Module], shapes: list[tuple[int, ...]], names: dict, n_out: int, *,
              seed: int, kind: str, scale: float, per_feature: bool, dtype: torch.dtype,
              device: torch.device) -> None:
        """Create one site per module (its per-sample input shape in ``shapes``), seeded per site index
        (``seed_offset + i`` for site ``i``)."""
        sites, offset, blocks = [], 0, []
        for i, (module, site_shape) in enumerate(zip(modules, shapes)):
            axis = feature_axis(site_shape, per_feature)
            rows = math.prod(site_shape) if axis is None else site_shape[axis]
            site = Site(self, i, names[module], module, site_shape, axis, offset, rows)
            pending = self.pending.get(str(i))
            if pending is not None:
                if tuple(pending.shape) != (rows, n_out):
                    raise ValueError(f"loaded feedback {i} has shape {tuple(pending.shape)}, but site "
                                     f"{site.name!r} needs {(rows, n_out)}")
                blocks.append(pending.to(dtype=dtype, device=device))
            else:
                gen = seeded_generator(seed, "site", self.seed_offset + i)
                # fan: the site's elements per sample at the build, per-feature sites included, so that the
                # per-sample norm of the broadcast error is about ||e|| at the build's size (channel-wise conv
                # feedback has always been scaled so)
                blocks.append(feedback_matrix((rows, n_out), math.prod(site_shape), kind, gen, scale,
                                              dtype=dtype, device=device))
            sites.append(site)
            offset += rows
        site_names = [s.name for s in sites]
        if self.pending_names is not None and self.pending_names != site_names:
            raise ValueError(f"the loaded checkpoint has sites {self.pending_names}, this model has {site_names}")
        self.flat = torch.cat(blocks) if blocks else torch.empty(0, n_out, dtype=dtype, device=device)
        self.pending, self.pending_names = {}, None
        self.sites = sites
        self.layout = [(s.offset, s.rows, s.shape, s.feature_axis) for s in sites]
        self.project_sites = [ProjectSite(s.offset, s.rows) for s in sites]
        self.split_sizes = [s.rows for s in sites]
        self.flat_sites = all(len(s.shape) == 1 and s.feature_axis is None for s in sites)
        self.per_feature = any(s.feature_axis is not None for s in sites)
        self.n_out = n_out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for site in self.sites or ():
            destination[prefix + str(site.index)] = site.feedback if keep_vars else site.feedback.detach()
        for i, layer in enumerate(self.fa_layers):
            value = layer.feedback_weight
            destination[prefix + f"fa.{i}"] = value if keep_vars else value.detach()
        if self.sites is not None:
            extra = {"sites": self.site_names}
            if self.perturbations is not None:
                extra["grape"] = self.perturbations.state_dict()
            destination[prefix + "_extra_state"] = extra

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        mine = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        extra = mine.pop("_extra_state", None)
        if extra is not None and self.perturbations is not None and "grape" in extra:
            self.perturbations.load_state_dict(extra["grape"])
        for i, layer in enumerate(self.fa_layers):
            _copy_into(layer.feedback_weight, mine.pop(f"fa.{i}", None), f"{prefix}fa.{i}", "the FA feedback",
                       strict, missing_keys, error_msgs)
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
            _copy_into(site.feedback, site_values.get(str(site.index)), f"{prefix}{site.index}",
                       f"the feedback of site {site.name!r}", strict, missing_keys, error_msgs)
        for k in site_values:
            if int(k) >= len(sites) and strict:
                unexpected_keys.append(prefix + k)


def _copy_into(target: torch.Tensor, value, key: str, what: str, strict: bool, missing_keys, error_msgs) -> None:
    """torch's loading protocol for one tensor: note it missing, note a shape mismatch, or copy it in."""
    if value is None:
        if strict:
            missing_keys.append(key)
    elif value.shape != target.shape:
        error_msgs.append(f"{key}: shape {tuple(value.shape)} does not match {what} of shape {tuple(target.shape)}")
    else:
        with torch.no_grad():
            target.copy_(value)


OPTIONAL_KEYS = ("feedback._extra_state",)


def check_state_dict(expected: dict, given, strict: bool, built: bool) -> list[str]:
    """Every reason ``given`` cannot be loaded into a wrapper whose state_dict is ``expected`` (keys,
    shapes, site names); empty when it fits. Before the build the site feedback is not known yet:
    ``feedback.<i>`` keys are accepted and checked against the sites when they are built."""
    problems = []
    for key, value in expected.items():
        if key not in given:
            if strict and key not in OPTIONAL_KEYS:
                problems.append(f'Missing key "{key}"')
            continue
        other = given[key]
        if isinstance(value, torch.Tensor):
            if not isinstance(other, torch.Tensor):
                problems.append(f'"{key}" is a {type(other).__name__}, not a tensor')
            elif tuple(other.shape) != tuple(value.shape):
                problems.append(f"size mismatch for {key}: copying a tensor of shape {tuple(other.shape)} "
                                f"from the checkpoint, the shape in this model is {tuple(value.shape)}")
    extra = given.get("feedback._extra_state")
    if built and isinstance(extra, dict) and "sites" in extra:
        mine = expected.get("feedback._extra_state", {}).get("sites")
        if mine is not None and list(extra["sites"]) != list(mine):
            problems.append(f"the checkpoint's sites {list(extra['sites'])} differ from this model's sites {mine}")
    if strict:
        for key in given:
            pending = not built and key.startswith("feedback.") and (key[9:].isdigit() or key in OPTIONAL_KEYS)
            if key not in expected and not pending and key not in OPTIONAL_KEYS:
                problems.append(f'Unexpected key "{key}"')
    return problems
