"""Feedback sites and the one buffer that holds all their feedback.

A *site* is the input of a DFA-trained module (docs/design.md section 2): of
every fastdfa layer, and of every module named in ``sites=``, except the
first one executed, whose input is the data. Each site owns a block of rows
of ONE concatenated feedback buffer ``flat`` (``[R, n_out]``), so the output
error is projected to every site by ONE GEMM (``fastdfa.ops.dfa_project``).
"""

from __future__ import annotations

import json
import math

import torch
from torch import nn

from ..feedback import feedback_matrix, seeded_generator
from ..layers import init_feedback_weight
from ..ops.dfa_project import ProjectSite

# 2**28 numbers: 1 GiB of float32 feedback. Past it the layout is almost surely a mistake (a per-sequence
# error of tokens x vocabulary columns), which would otherwise fail as an out-of-memory error or a minutes-long
# random fill; the message says which option fits.
MAX_FEEDBACK_ELEMENTS = 2 ** 28


def feature_axis(site_shape: tuple[int, ...], per_feature: bool, channels_first: bool = False) -> int | None:
    """The per-sample axis that per-feature feedback keeps (None: dense): the channel axis of a
    convolution's input (``channels_first``: [C, L], [C, H, W]) and of any [C, H, W] site, the last axis
    of any other; a [features] site is dense either way."""
    if not per_feature or len(site_shape) < 2:
        return None
    return 0 if channels_first or len(site_shape) == 3 else len(site_shape) - 1


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

    def __init__(self, fa_layers=(), perturbations=None):
        super().__init__()
        self.register_buffer("flat", None, persistent=False)
        # error_rank=k: P [k, n_out], fixed and seeded; sites get F_l (P e) (``error_projection``)
        self.register_buffer("error_projection", None, persistent=False)
        self.fa_layers: list[nn.Module] = list(fa_layers)  # plain list: not submodules, the model owns them
        self.unseeded: set[int] = set()  # FA layers whose feedback_weight was on the meta device when seeded
        self.sites: list[Site] | None = None
        self.layout: list[tuple[int, int, tuple[int, ...], bool]] = []
        self.project_sites: list[ProjectSite] = []  # the projection's sites (no g' epilogue)
        self.split_sizes: list[int] = []            # each site's rows, in order
        self.flat_sites = False                     # every site is [batch, features]: no reshape needed
        self.per_feature = False                    # some site's feedback is broadcast (its length may vary)
        self.n_out: int | None = None
        self.pending: dict[str, torch.Tensor] = {}  # loaded before the build, used by it
        self.pending_names: list[str] | None = None
        # GrAPE's PerturbationStream: owned here (saved in _extra_state); the wrapper reads it through its
        # ``perturbations`` view
        self.perturbations = perturbations
        # The index, in a larger model, of this store's first site: site i draws its feedback from
        # seeded_generator(seed, "site", seed_offset + i). 0 for a whole model; a pipeline stage
        # (fastdfa.distributed) that holds sites k, k+1, ... of the model sets k before the build, so a
        # site's feedback is the same whichever process holds it. Site indices and state_dict keys stay local.
        self.seed_offset = 0

    def compress(self, e: torch.Tensor) -> torch.Tensor:
        """What the sites' feedback multiplies: ``e`` ``[N, n_out]``, or ``e P^T`` ``[N, k]`` under
        ``error_rank=k`` (one small GEMM before the projection: the chain stays ``(e P^T) F_all^T``)."""
        p = self.error_projection
        return e if p is None else e @ (p if p.dtype == e.dtype else p.to(e.dtype)).t()

    def seed_fa_feedback(self, seed: int) -> None:
        """Seed every FA layer's ``feedback_weight`` (layer ``i`` from ``(seed, "fa", i)``) as a normal
        tensor: one made under ``torch.inference_mode()`` (a model converted there) is replaced, since FA's
        backward must save it. A layer still on the meta device is left in ``unseeded`` and seeded by the
        first forward after the model is materialised (``to_empty``): its values were never initialised."""
        self.unseeded = set()
        with torch.inference_mode(False):
            for i, layer in enumerate(self.fa_layers):
                buf = layer.feedback_weight
                if buf.is_inference():
                    layer._buffers["feedback_weight"] = torch.empty_like(buf)
                if layer.feedback_weight.is_meta:
                    self.unseeded.add(i)
                else:
                    init_feedback_weight(layer, seed, i)

    def seed_materialised(self, seed: int) -> None:
        """Seed the FA feedback of the layers that were on the meta device and no longer are (called by
        each wrapper forward while any is left)."""
        with torch.inference_mode(False):
            for i in sorted(self.unseeded):
                layer = self.fa_layers[i]
                if not layer.feedback_weight.is_meta:
                    init_feedback_weight(layer, seed, i)
                    self.unseeded.discard(i)

    @property
    def site_names(self) -> list[str] | None:
        return None if self.sites is None else [s.name for s in self.sites]

    def build(self, modules: list[nn.Module], shapes: list[tuple[int, ...]], names: dict, n_out: int, *,
              seed: int, kind: str, scale: float, per_feature: bool, dtype: torch.dtype,
              device: torch.device, rank: int | None = None) -> None:
        """Create one site per module (its per-sample input shape in ``shapes``), seeded per site index
        (``seed_offset + i`` for site ``i``). Outside inference mode whatever mode the first forward ran in
        (Lightning's sanity check runs under ``torch.inference_mode()``): an inference tensor could never
        be stepped by GrAPE, loaded into or matched afterwards."""
        with torch.inference_mode(False):
            self._build(modules, shapes, names, n_out, seed, kind, scale, per_feature, dtype, device, rank)

    def _build(self, modules, shapes, names, n_out, seed, kind, scale, per_feature, dtype, device, rank) -> None:
        width = n_out if rank is None else rank  # the feedback's columns: e's width, or P e's
        axes = [feature_axis(s, per_feature, isinstance(m, nn.modules.conv._ConvNd)) for m, s in zip(modules, shapes)]
        rows_total = sum(math.prod(s) if a is None else s[a] for s, a in zip(shapes, axes))
        if rows_total * width > MAX_FEEDBACK_ELEMENTS:
            raise ValueError(
                f"the feedback would hold {rows_total} x {width} = {rows_total * width:,} numbers (over "
                f"{MAX_FEEDBACK_ELEMENTS:,}): the error is {n_out} wide per batch row and the sites {rows_total} "
                "rows. For a [batch, tokens, ...] model pass batch_dims=2 (the error per token, not per sequence); "
                "with a large vocabulary take the error at the LM head's input (head='lm_head'); "
                "feedback_layout='per-feature' shares one row per feature over tokens and space; error_rank=k "
                "compresses the error to k columns")
        sites, offset, blocks = [], 0, []
        for i, (module, site_shape, axis) in enumerate(zip(modules, shapes, axes)):
            rows = math.prod(site_shape) if axis is None else site_shape[axis]
            site = Site(self, i, names[module], module, site_shape, axis, offset, rows)
            pending = self.pending.get(str(i))
            if pending is not None:
                if tuple(pending.shape) != (rows, width):
                    raise ValueError(f"loaded feedback {i} has shape {tuple(pending.shape)}, but site "
                                     f"{site.name!r} needs {(rows, width)}")
                blocks.append(pending.to(dtype=dtype, device=device).clone())
            else:
                gen = seeded_generator(seed, "site", self.seed_offset + i)
                # fan: the site's elements per sample at the build, per-feature sites included, so that the
                # per-sample norm of the broadcast error is about ||e|| at the build's size (channel-wise conv
                # feedback has always been scaled so)
                blocks.append(feedback_matrix((rows, width), math.prod(site_shape), kind, gen, scale,
                                              dtype=dtype, device=device))
            sites.append(site)
            offset += rows
        site_names = [s.name for s in sites]
        if self.pending_names is not None and self.pending_names != site_names:
            raise ValueError(f"the loaded checkpoint has sites {self.pending_names}, this model has {site_names}")
        self.flat = torch.cat(blocks) if blocks else torch.empty(0, width, dtype=dtype, device=device)
        self.error_projection = None if rank is None else error_projection(seed, rank, n_out, dtype, device,
                                                                           self.pending.get(PROJECTION))
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
        if self.error_projection is not None:
            destination[prefix + PROJECTION] = self.error_projection if keep_vars else self.error_projection.detach()
        if self.sites is not None:  # tensors only: safetensors (save_pretrained, Trainer) takes nothing else
            destination[prefix + SITE_NAMES] = encode_names(self.site_names)
            if self.perturbations is not None:
                state = self.perturbations.state_dict()
                destination[prefix + GRAPE_SEED] = torch.tensor(state["seed"], dtype=torch.int64)
                for device, value in state["states"].items():
                    destination[prefix + GRAPE_STATE + device] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        mine = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        names, grape = own_metadata(mine)
        if grape is not None and self.perturbations is not None:
            self.perturbations.load_state_dict(grape)
        assign = bool(local_metadata.get("assign_to_params_buffers", False))
        for i, layer in enumerate(self.fa_layers):
            value = mine.pop(f"fa.{i}", None)
            if value is not None and (assign or layer.feedback_weight.is_meta) and \
                    value.shape == layer.feedback_weight.shape:
                # load_state_dict(assign=True), or onto a meta model: take the tensor (a copy into meta is lost)
                layer._buffers["feedback_weight"] = value.detach().clone()
                self.unseeded.discard(i)
                continue
            _copy_into(layer.feedback_weight, value, f"{prefix}fa.{i}", "the FA feedback",
                       strict, missing_keys, error_msgs)
            if value is not None:
                self.unseeded.discard(i)
        projection = mine.pop(PROJECTION, None)
        if projection is not None and self.error_projection is not None:
            _copy_into(self.error_projection, projection, prefix + PROJECTION, "the error projection P", strict,
                       missing_keys, error_msgs)
        elif projection is not None and self.flat is None:
            self.pending[PROJECTION] = projection.detach().clone()  # used by the build
        site_values = {k: v for k, v in mine.items() if k.isdigit()}
        for k in mine:
            if not k.isdigit() and strict:
                unexpected_keys.append(prefix + k)
        sites = self.sites
        if names is not None and sites is not None and names != self.site_names:
            error_msgs.append(f"{prefix}: checkpoint sites {names} differ from this model's sites {self.site_names}")
            return
        if self.flat is None or not sites:
            # Not built yet: keep the values; the build uses them (shape-checked).
            self.pending = {**{k: v.detach().clone() for k, v in site_values.items()},
                            **({PROJECTION: self.pending[PROJECTION]} if PROJECTION in self.pending else {})}
            if names is not None:
                self.pending_names = names
            return
        for site in sites:
            _copy_into(site.feedback, site_values.get(str(site.index)), f"{prefix}{site.index}",
                       f"the feedback of site {site.name!r}", strict, missing_keys, error_msgs)
        for k in site_values:
            if int(k) >= len(sites) and strict:
                unexpected_keys.append(prefix + k)


SITE_NAMES = "site_names"       # the sites' names, as UTF-8 JSON bytes in a uint8 tensor
PROJECTION = "error_projection" # error_rank=k: P, [k, n_out]


def error_projection(seed: int, rank: int, n_out: int, dtype, device, loaded=None) -> torch.Tensor:
    """P ``[rank, n_out]`` with N(0, 1/rank) entries from ``(seed, "error_rank")``: E[P^T P] = I, so the rank-k
    feedback ``F (P e)`` of an F that learned ``(P J)^T`` approximates ``J^T e`` (docs/design.md); the same P
    in every process of a pipeline (it depends on the seed alone). ``loaded``: a checkpoint's P, which wins."""
    if loaded is not None:
        if tuple(loaded.shape) != (rank, n_out):
            raise ValueError(f"the loaded error projection has shape {tuple(loaded.shape)}, but error_rank={rank} "
                             f"with a {n_out}-wide error needs {(rank, n_out)}")
        return loaded.to(dtype=dtype, device=device).clone()
    gen = seeded_generator(seed, "error_rank")
    return (torch.randn((rank, n_out), generator=gen, dtype=torch.float64) / math.sqrt(rank)).to(dtype=dtype,
                                                                                                   device=device)
GRAPE_SEED = "grape.seed"       # GrAPE's perturbation stream: its seed (int64) ...
GRAPE_STATE = "grape.state."    # ... and each device's generator state (uint8), keyed by device


def encode_names(names: list[str]) -> torch.Tensor:
    return torch.tensor(list(json.dumps(names).encode()), dtype=torch.uint8)


def decode_names(value: torch.Tensor) -> list[str]:
    return json.loads(bytes(value.to(torch.uint8).tolist()).decode())


def own_metadata(mine: dict) -> tuple[list[str] | None, dict | None]:
    """Pop the store's metadata from ``mine`` (its state_dict entries without the prefix): the site names
    and GrAPE's stream state, from the tensor keys or from an older checkpoint's ``_extra_state`` dict."""
    extra = mine.pop("_extra_state", None)  # fastdfa <= 0.1's checkpoints: one dict
    names = mine.pop(SITE_NAMES, None)
    names = decode_names(names) if names is not None else (list(extra["sites"]) if extra else None)
    seed = mine.pop(GRAPE_SEED, None)
    states = {k[len(GRAPE_STATE):]: mine.pop(k) for k in [k for k in mine if k.startswith(GRAPE_STATE)]}
    grape = {"seed": int(seed), "states": states} if seed is not None else (extra or {}).get("grape")
    return names, grape


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


def _optional(key: str) -> bool:
    """Keys a checkpoint may lack or hold beyond this wrapper's: the feedback store's metadata (GrAPE's
    per-device streams differ with the devices a run used; older checkpoints carry ``_extra_state``)."""
    return key.startswith(("feedback.grape.", "feedback._extra_state")) or key == "feedback." + SITE_NAMES


def check_state_dict(expected: dict, given, strict: bool, built: bool) -> list[str]:
    """Every reason ``given`` cannot be loaded into a wrapper whose state_dict is ``expected`` (keys,
    shapes, site names); empty when it fits. Before the build the site feedback is not known yet:
    ``feedback.<i>`` keys are accepted and checked against the sites when they are built."""
    problems = []
    for key, value in expected.items():
        if key not in given:
            if strict and not _optional(key):
                problems.append(f'Missing key "{key}"')
            continue
        if _optional(key):
            continue
        other = given[key]
        if isinstance(value, torch.Tensor):
            if not isinstance(other, torch.Tensor):
                problems.append(f'"{key}" is a {type(other).__name__}, not a tensor')
            elif tuple(other.shape) != tuple(value.shape):
                problems.append(f"size mismatch for {key}: copying a tensor of shape {tuple(other.shape)} "
                                f"from the checkpoint, the shape in this model is {tuple(value.shape)}")
    if built:
        theirs, _ = own_metadata({k[len("feedback."):]: v for k, v in given.items() if k.startswith("feedback.")})
        mine, _ = own_metadata({k[len("feedback."):]: v for k, v in expected.items() if k.startswith("feedback.")})
        if theirs is not None and mine is not None and theirs != mine:
            problems.append(f"the checkpoint's sites {theirs} differ from this model's sites {mine}")
    if strict:
        for key in given:
            pending = not built and key.startswith("feedback.") and (key[9:].isdigit() or key[9:] == PROJECTION)
            if key not in expected and not pending and not _optional(key):
                problems.append(f'Unexpected key "{key}"')
    return problems
