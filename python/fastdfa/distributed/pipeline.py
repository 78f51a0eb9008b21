"""``fastdfa.distributed.DFAPipeline``: layer-parallel DFA across processes and devices.

DFA's update of layer ``l`` needs only the layer's own activations and the
output error: ``delta_l = (F_l e) * g'(a_l)``, ``dW_l = delta_l^T h_{l-1}``
(docs/math.md). Split a model into stages, one per rank: the
activations go forward from stage to stage, the last stage computes ``e``
for each micro-batch and sends it to every stage, and each stage computes
its own layers' DFA gradients from it, with no gradient travelling back
through the stages as in a BP pipeline. See docs/pipeline.md.

Each stage wraps its part of the model (``split.StageModule``) in a
``fastdfa.DFA`` whose sites are the model's sites that the stage runs plus
its boundary (the next stage's input), with the feedback store's
``seed_offset`` set to the model's index of its first site: the same seed
gives every site the feedback a whole-model ``fastdfa.DFA`` gives it,
whichever rank holds it.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
from torch import nn

from ..config import MODES
from ..dfa import DFA
from ..engine.error_point import INPUT, OUTPUT, find_module
from ..layers import FASTDFA_LAYERS, init_feedback_weight
from .agreement import Fault, agree, raise_if_failed
from .grape import StageGrape
from .schedules import SCHEDULES
from .split import StageModule, modules_of, plan_stages
from .stage import ErrorTap, StageRunner
from .wire import Wire

PIPELINE_MODES = ("dfa", "grape")
DEFAULT_TIMEOUT = datetime.timedelta(minutes=5)


class DFAPipeline:
    """Stage ``rank`` of ``model`` split at ``split_points``, trained with DFA (or GrAPE) one mini-batch at a time.

    Create it on every rank of the process group (``group``, default the default group), whose size must
    be the number of stages ``len(split_points) + 1``; rank ``r`` of the group holds stage ``r``.

    Args:
        model: an ``nn.Sequential`` (split at its children's names, nested Sequentials opened) or a
            ``fastdfa.models.TransformerLM`` (split at ``"blocks.<i>"`` / ``"head"``). Every rank builds the
            same model (same init, e.g. the same ``torch.manual_seed``); each keeps a reference to its stage.
        split_points: the modules that begin stages 1, 2, ... (torch.distributed.pipelining's
            ``SplitPoint.BEGINNING``); each must be a DFA module (a fastdfa layer or a module of ``sites=``).
        micro_batches: the mini-batch is cut into this many equal micro-batches along dim 0.
        seed, mode: as ``fastdfa.DFA`` ("dfa" or "grape").
        schedule: "sync" (GPipe's order) or "overlapped" (1F1B's order); ``fastdfa.distributed.schedules``.
        data_parallel_group: the group of this stage's replicas (``process_grid``): the stage is wrapped in
            ``DistributedDataParallel`` over it and its gradients are averaged over the replicas.
        device: where the stage runs (default: where its parameters are); the stage's modules are moved there.
        timeout: the longest any wait for another rank lasts (default 5 minutes), then ``PipelineTimeout``.
        sites, batch_dims, feedback, ...: the other ``fastdfa.DFA`` options, for every stage.
        head, error_at: where the error is taken, as ``fastdfa.DFA``: a module of the last stage, whose wrapper
            alone gets it; the last stage then sends every stage ``e = dL/dz / M`` at that point ``z``
            (``stage.ErrorTap``; docs/pipeline.md "Where the error is taken").
    """

    def __init__(self, model: nn.Module, split_points, *, micro_batches: int, seed: int = 0, mode: str = "dfa",
                 schedule: str = "sync", group=None, data_parallel_group=None, device=None, timeout=None,
                 sites=None, **dfa_options):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("fastdfa.distributed.DFAPipeline needs an initialised process group: call "
                               "torch.distributed.init_process_group('gloo' or 'nccl', ...) on every rank first "
                               "(torchrun sets the rank and world size)")
        self.group = group if group is not None else dist.group.WORLD
        self.stage = dist.get_rank(self.group)
        self.micro_batches, self.seed, self.mode, self.schedule = micro_batches, seed, mode, schedule
        self.timeout = _timeout(timeout)
        self._point_names = (dfa_options.get("error_at"), dfa_options.get("head"))
        fault = Fault(self.stage, dist.get_rank())
        built = None
        try:
            built = self._build(model, split_points, sites, device, dfa_options)
        except (ValueError, TypeError, RuntimeError) as exc:
            fault.local(exc)
        self._handshake(fault, list(split_points) if not isinstance(split_points, str) else split_points)
        self.module, self.wrapper, self.plan, tap = built
        ranks = [dist.get_global_rank(self.group, s) for s in range(self.num_stages)]
        self.device = _device_of(self.module, device)
        ddp = None
        if data_parallel_group is not None:
            ddp = torch.nn.parallel.DistributedDataParallel(
                self.wrapper, process_group=data_parallel_group, broadcast_buffers=False,
                device_ids=[self.device] if self.device.type == "cuda" else None)
        self.ddp = ddp
        grape = None
        if mode == "grape":
            grape = StageGrape(self.wrapper, self.module, self.stage, micro_batches, self.first_site, seed,
                               self.group, self.device, self.plan.boundary_modules[self.stage], data_parallel_group)
        # messages back to earlier stages travel in a second group of the same ranks (Wire's docstring)
        backward = dist.new_group(ranks, use_local_synchronization=True) if self.num_stages > 1 else self.group
        wire = Wire(self.group, backward, self.stage, ranks, self.device, self.timeout)
        self.runner = StageRunner(self.module, self.wrapper, wire, self.stage, self.num_stages, micro_batches,
                                  schedule, self.wrapper.dfa_config.batch_dims, self.device, ddp, data_parallel_group,
                                  grape, tap)

    def _build(self, model, split_points, sites, device, options):
        if isinstance(self.micro_batches, bool) or not isinstance(self.micro_batches, int) or self.micro_batches < 1:
            raise ValueError(f"micro_batches must be a positive int, got {self.micro_batches!r}")
        if self.mode not in PIPELINE_MODES:
            raise ValueError(f"mode must be one of {PIPELINE_MODES} (the pipeline trains with DFA's error "
                             f"routing; {sorted(set(MODES) - set(PIPELINE_MODES))} need a backward through "
                             f"every stage), got {self.mode!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if "example_input" in options:
            raise TypeError("DFAPipeline builds each stage's feedback at its first step; example_input= does not "
                            "apply")
        plan = plan_stages(model, split_points, sites)
        world = dist.get_world_size(self.group)
        if world != plan.num_stages:
            raise ValueError(f"the pipeline has {plan.num_stages} stages (split_points={split_points}), but the "
                             f"process group has {world} ranks: start one process per stage (e.g. torchrun "
                             f"--nproc-per-node {plan.num_stages}), or pass group= a group of {plan.num_stages} ranks")
        point = _error_point(model, plan, options.get("error_at"), options.get("head"))
        r, last = self.stage, plan.num_stages - 1
        module = StageModule(plan.steps[r], plan.boundary_names[r])
        if device is not None:
            module.to(device)
        stage_sites = plan.sites[r] + ([module.boundary] if module.boundary is not None else [])
        options = {k: v for k, v in options.items() if k not in ("error_at", "head")}
        tap = None
        if point is not None and r == last:  # only the last stage takes the error inside its modules
            option, target = point
            name = next(n for n, m in module.named_modules() if m is target)  # its name in the StageModule
            options[option] = name
        # mode "dfa" in every stage: GrAPE's dual pass and alignment span the stages (fastdfa.distributed.grape)
        wrapper = DFA(module, mode="dfa", seed=self.seed, sites=stage_sites, **options)
        if point is not None and r == last:  # after the wrapper's own hook: it sees the output node's tensor
            tap = ErrorTap(point[1], INPUT if point[0] == "head" else OUTPUT, name)
        wrapper.feedback.seed_offset = plan.first_site[r]
        layer_index = {m: i for i, m in enumerate(m for m in model.modules() if isinstance(m, FASTDFA_LAYERS))}
        for layer in wrapper.feedback.fa_layers:  # FA's feedback as a whole-model wrapper seeds it
            init_feedback_weight(layer, self.seed, layer_index[layer])
        return module, wrapper, plan, tap

    def _handshake(self, fault: Fault, split_points) -> None:
        """Every rank checks that all built the same pipeline; a failure on any rank raises on every rank."""
        mine = (repr(split_points), self.micro_batches, self.seed, self.mode, self.schedule, self._point_names)
        seen = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(seen, (mine, fault.origin, fault.text), group=self.group)
        reports = sorted((o, t) for _, o, t in seen if o is not None)
        if reports:
            raise_if_failed(_fault_of(*reports[0]))
        if any(s[0] != mine for s in seen):
            raise ValueError("the ranks created DFAPipeline with different arguments "
                             "(split_points, micro_batches, seed, mode, schedule, (error_at, head)): "
                             + "; ".join(f"rank {i}: {s[0]}" for i, s in enumerate(seen)))

    # ------------------------------------------------------------------ API
    @property
    def num_stages(self) -> int:
        return self.plan.num_stages

    @property
    def sites(self):
        """This stage's sites (its boundary, the next stage's input, last); ``first_site`` is the model's index
        of the first one."""
        return self.wrapper.sites

    @property
    def first_site(self) -> int:
        return self.plan.first_site[self.stage]

    def parameters(self):
        return self.module.parameters()

    def named_parameters(self):
        """The stage's parameters under their names in the model, in model order."""
        return self.module.named_parameters()

    def step(self, x, target, loss_fn) -> torch.Tensor:
        """One mini-batch: ``x`` on stage 0's rank, ``target`` on the last stage's (None elsewhere).

        Accumulates the stage's DFA gradients into ``.grad`` (zero them between steps, as with
        ``loss.backward()``) and returns the mean of the micro-batch losses, on every rank (float64). A
        failure on any stage raises ``PipelineError`` with its message on every rank; the step's gradients
        are then incomplete.
        """
        fault, loss_sum = self.runner.step(x, target, loss_fn)
        total = agree(self.group, self.device, fault, loss_sum)
        raise_if_failed(fault)
        return torch.tensor(total / self.micro_batches, dtype=torch.float64)

    def __repr__(self) -> str:
        return (f"DFAPipeline(stage {self.stage} of {self.num_stages}, micro_batches={self.micro_batches}, "
                f"schedule={self.schedule!r}, mode={self.mode!r}, first_site={self.first_site}, "
                f"device={self.device})")


def _error_point(model: nn.Module, plan, error_at, head):
    """``(option, module)`` of ``head=`` / ``error_at=`` (None without either), after checking that the
    module lies in the last stage; raises ``ValueError`` naming the stage that holds it."""
    if error_at is not None and head is not None:
        raise ValueError(f"give error_at= or head=, not both (error_at={error_at!r}, head={head!r}): head=NAME "
                         "already takes the error at the input of NAME")
    option, name = ("head", head) if head is not None else ("error_at", error_at)
    if name is None:
        return None
    if not isinstance(name, str):
        raise TypeError(f"{option}= must be a module name (a str), got {type(name).__name__}")
    target = find_module(model, name, option)
    parts = set(target.modules())
    holders = [s for s, steps in enumerate(plan.steps) if parts & modules_of(steps)]
    last = plan.num_stages - 1
    if holders != [last]:
        where = f"stage {holders[0]}" if len(holders) == 1 else f"stages {', '.join(map(str, holders))}"
        raise ValueError(f"{option}={name!r} is in {where} of the {plan.num_stages}-stage pipeline, but the error "
                         f"is taken in its last stage (stage {last}) and sent to every stage from there: {option}= "
                         f"must name a module that runs in the last stage. Split before {name!r} (every split "
                         f"point before it), or name a later module")
    if target not in modules_of(plan.steps[last]):
        raise ValueError(f"{option}={name!r} is an nn.Sequential that the split opened into its children (the "
                         f"pipeline runs them one by one, not {name!r} itself): name one of its children, or split "
                         f"outside it")
    first = plan.boundary_modules[last - 1] if last > 0 else None
    if option == "head" and first is not None and first in parts:
        raise ValueError(f"head={name!r} begins the last stage (split point {plan.boundary_names[last - 1]!r}): its "
                         "input is the stage boundary, a DFA site of the stage before, where under head= the error "
                         "is taken and BP's gradient flows into the modules before it. Split at a DFA module before "
                         f"{name!r}")
    return option, target


def _fault_of(origin: int, text: str) -> Fault:
    fault = Fault(origin, -1)
    fault.adopt(origin, text)
    return fault


def _timeout(value) -> datetime.timedelta:
    if value is None:
        return DEFAULT_TIMEOUT
    if isinstance(value, datetime.timedelta):
        return value
    if isinstance(value, (int, float)) and value > 0:
        return datetime.timedelta(seconds=value)
    raise ValueError(f"timeout must be seconds (> 0) or a datetime.timedelta, got {value!r}")


def _device_of(module: nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    first = next(module.parameters(), None)
    return torch.device("cpu") if first is None else first.device
