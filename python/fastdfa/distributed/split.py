"""How a model is cut into pipeline stages, and what each stage runs.

A model is read as a chain of *steps* run one after the other, each taking
the previous step's output: the children of an ``nn.Sequential`` (a nested
``nn.Sequential`` that holds a split point is opened into its children), or
for ``fastdfa.models.TransformerLM`` the embeddings, then every block, then
the head. ``split_points`` name the steps that begin a stage, as
``torch.distributed.pipelining``'s ``split_spec`` with ``SplitPoint.BEGINNING``
does: stage ``r`` runs the steps from split point ``r - 1`` (or the first
step) up to split point ``r`` (exclusive).

DFA needs no gradient to cross a stage boundary only if the tensor that
crosses it is a *site* (docs/design.md section 2): then its gradient is the
projected error ``F_s e``, which the stage that produced it computes from
``e`` alone. So every split point must be a DFA module (a fastdfa layer, or a
module named in ``sites=``) other than the first one to run, whose input is
the data. Stage ``r < S - 1`` holds that boundary site as its last site
(``Boundary``): the feedback of a site lives on the stage whose layers need
its gradient.

Site numbering: with the model's DFA modules ``c_0, c_1, ...`` in execution
order, site ``j`` is the input of ``c_{j+1}``. If stage ``r`` begins at
``c_k`` (``k = 0`` for stage 0), its sites are ``j = k, k+1, ...`` up to and
including its boundary, a contiguous range; ``first_site`` holds ``k``, the
``seed_offset`` of the stage's feedback store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..layers import FASTDFA_LAYERS
from ..models import TransformerLM


@dataclass
class Step:
    """One link of the chain: ``run(x)`` is its output; ``members`` the modules it owns, by their names
    in the model (registered under the same names in a stage, so parameter names do not change)."""

    name: str
    run: Callable[[torch.Tensor], torch.Tensor]
    members: list[tuple[str, nn.Module]]


def model_steps(model: nn.Module, split_points: list[str]) -> list[Step]:
    """The chain of steps of ``model``, opened far enough that every split point that names a step
    of a nested ``nn.Sequential`` is one."""
    if isinstance(model, TransformerLM):
        return _transformer_steps(model)
    if isinstance(model, nn.Sequential):
        return list(_sequential_steps(model, "", split_points))
    raise TypeError(f"fastdfa.distributed.DFAPipeline splits an nn.Sequential (at its children's names) or a "
                    f"fastdfa.models.TransformerLM (at 'blocks.<i>' or 'head'); got {type(model).__name__}. "
                    "Write the model as an nn.Sequential of the modules its forward runs in turn")


def _sequential_steps(seq: nn.Sequential, prefix: str, split_points: list[str]):
    for name, child in seq.named_children():
        qualified = prefix + name
        if isinstance(child, nn.Sequential) and any(p.startswith(qualified + ".") for p in split_points):
            yield from _sequential_steps(child, qualified + ".", split_points)
        else:
            yield Step(qualified, child, [(qualified, child)])


def _transformer_steps(model: TransformerLM) -> list[Step]:
    def embed(idx: torch.Tensor) -> torch.Tensor:  # TransformerLM.forward up to the first block
        if idx.dim() != 2:
            raise ValueError(f"TransformerLM takes token ids [B, T], got shape {tuple(idx.shape)}")
        t = idx.shape[1]
        if t > model.context:
            raise ValueError(f"sequence length {t} exceeds the context {model.context}")
        return model.tok(idx) + model.pos(torch.arange(t, device=idx.device))

    steps = [Step("", embed, [("tok", model.tok), ("pos", model.pos)])]
    steps += [Step(f"blocks.{i}", block, [(f"blocks.{i}", block)]) for i, block in enumerate(model.blocks)]
    return steps + [Step("head", model.head, [("head", model.head)])]


@dataclass
class StagePlan:
    """Which steps each stage runs, and where its sites begin in the model's site numbering."""

    steps: list[list[Step]]          # per stage
    first_site: list[int]            # per stage: the model's index of the stage's first site
    sites: list[list[nn.Module]]     # per stage: the modules of sites= that it runs
    boundary_names: list[str | None]  # per stage: the next stage's first step (None for the last stage)
    boundary_modules: list[nn.Module | None]  # ... and its module

    @property
    def num_stages(self) -> int:
        return len(self.steps)


def plan_stages(model: nn.Module, split_points, sites) -> StagePlan:
    """Check ``split_points`` against ``model`` and cut it; raises ``ValueError`` naming the fix."""
    if isinstance(split_points, str) or not all(isinstance(p, str) for p in split_points):
        raise TypeError(f"split_points must be a list of module names (e.g. ['4'] for an nn.Sequential, "
                        f"['blocks.2'] for a TransformerLM), got {split_points!r}")
    points = list(split_points)
    steps = model_steps(model, points)
    position = {s.name: i for i, s in enumerate(steps)}
    named = dict(model.named_modules())
    for p in points:
        if p in position:
            continue
        if p not in named:
            raise ValueError(f"split point {p!r} is not a module of the model; the steps it can be split at "
                             f"are {[s.name for s in steps[1:] if s.name]}")
        raise ValueError(f"split point {p!r} is inside a step that the pipeline runs as one piece; split at "
                         f"one of {[s.name for s in steps[1:] if s.name]}")
    if len(set(points)) != len(points):
        raise ValueError(f"split_points names a module twice: {points}")
    cuts = sorted(position[p] for p in points)
    if cuts and cuts[0] == 0:
        raise ValueError(f"split point {steps[0].name!r} is the first step: stage 0 would be empty")
    candidates = _dfa_modules(model, sites)
    order = {m: i for i, m in enumerate(candidates)}
    for c in cuts:
        module = named[steps[c].name]
        if module not in order:
            raise ValueError(
                f"split point {steps[c].name!r} ({type(module).__name__}) is not a DFA module: a stage must "
                "begin at a fastdfa layer or a module named in sites=, so that the tensor crossing the "
                "boundary is a site and its gradient F e is computed where it is produced. Here the gradient "
                f"would flow back through {type(module).__name__} into the stage before. Split at one of "
                f"{[n for n, m in named.items() if m in order][1:]}")
        if order[module] == 0:
            raise ValueError(f"split point {steps[c].name!r} is the first DFA module to run: its input is the "
                             "data, not a site, so the stage before it would need the BP gradient of that "
                             "input. Split at a later DFA module")
    bounds = [0, *cuts, len(steps)]
    stage_steps = [steps[a:b] for a, b in zip(bounds, bounds[1:])]
    user_sites = list(sites or [])
    first_site, stage_sites, count = [], [], 0
    for chunk in stage_steps:
        inside = modules_of(chunk)
        first_site.append(count)
        count += sum(1 for m in candidates if m in inside)
        stage_sites.append([m for m in user_sites if m in inside])
    boundary = [steps[c].name for c in cuts] + [None]
    return StagePlan(stage_steps, first_site, stage_sites, boundary, [named[n] if n else None for n in boundary])


def modules_of(steps: list[Step]) -> set:
    return {m for s in steps for _, member in s.members for m in member.modules()}


def _dfa_modules(model: nn.Module, sites) -> list[nn.Module]:
    """The modules whose inputs the wrapper records, in model order (``fastdfa.engine.recording.discover``'s
    candidates): every fastdfa layer not inside a module of ``sites``, and those modules."""
    user = list(sites or [])
    inside = {sub for m in user for sub in m.modules() if sub is not m}
    return [m for m in model.modules() if (isinstance(m, FASTDFA_LAYERS) and m not in inside) or m in user]


class Boundary(nn.Module):
    """The next stage's input, held by this stage as its last DFA site.

    The stage's ``fastdfa.DFA`` records its input ``h`` as a site (the stage
    computes its feedback) and hands it ``h.detach()``, which is what the
    stage sends on (``sent``). It returns a placeholder of the model output's
    shape, ``[*h.shape[:batch_dims], *out_shape]``, all zeros and without a
    graph, so the stage's DFA output node sees the model's ``n_out``: the
    backward of that placeholder with the output error ``e`` projects ``e``
    onto every site of the stage, this one included (``F_s e``), in the one
    GEMM of a whole-model DFA step.
    """

    def __init__(self):
        super().__init__()
        self.out_shape: tuple[int, ...] | None = None  # the model output's per-sample shape (set at setup)
        self.out_dtype: torch.dtype | None = None
        self.batch_dims = 1
        self.sent: torch.Tensor | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.out_shape is None:
            raise RuntimeError("the pipeline boundary has no output shape yet: DFAPipeline.step sets it up")
        self.sent = h
        return h.new_zeros((), dtype=self.out_dtype).expand(*h.shape[:self.batch_dims], *self.out_shape)


class StageModule(nn.Module):
    """One stage: its steps' modules registered under their names in the model (so ``named_parameters``
    gives the model's names, in model order), run in turn by ``forward``; a ``Boundary`` at the end of
    every stage but the last, registered under the name of the module it stands for."""

    def __init__(self, steps: list[Step], boundary_name: str | None):
        super().__init__()
        self._runs = [s.run for s in steps]
        for name, member in (pair for s in steps for pair in s.members):
            _register(self, name, member)
        # not an attribute of nn.Module's: registered once, under the name of the module it stands for
        object.__setattr__(self, "boundary", None if boundary_name is None else Boundary())
        if self.boundary is not None:
            _register(self, boundary_name, self.boundary)

    def run_steps(self, x):
        """The stage's computation without the boundary: the tensor it sends on (or the model output)."""
        for run in self._runs:
            x = run(x)
        return x

    def forward(self, x):
        x = self.run_steps(x)
        return x if self.boundary is None else self.boundary(x)


def _register(root: nn.Module, qualified: str, module: nn.Module) -> None:
    """``root.<a>.<b>.<c> = module`` for ``qualified = "a.b.c"``, creating plain containers on the way."""
    *path, last = qualified.split(".")
    node = root
    for part in path:
        child = node._modules.get(part)
        if child is None:
            child = nn.Module()
            node.add_module(part, child)
        node = child
    node.add_module(last, module)
