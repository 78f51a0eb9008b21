"""``python -m fastdfa bench --pipeline``: samples per second of single-process BP and DFA, the BP
pipelines of ``torch.distributed.pipelining`` (GPipe, 1F1B) and ``fastdfa.distributed.DFAPipeline``, all
on the same stages, measured in one run.

The command spawns one process per stage with ``torch.multiprocessing`` (gloo on the CPU, NCCL with
``--device cuda``: one GPU per stage, ``cuda:<rank>``), or runs under ``torchrun --nproc-per-node S``.
Every method's step is a mini-batch's forward, loss and gradients (no optimizer step, the same for
all). The methods take turns round after round (fastdfa's rule for ratios on a shared machine,
``fastdfa.lab.steptime``); each round of a method starts and ends with a barrier, so a pipeline's time
is its slowest rank's; the single-process methods run on rank 0 while the other ranks wait. The
report is the median over the rounds.

Models (``models``): the MLP 784-1024x8-10 at batch 256, the character transformer LM
(``fastdfa.models.make_transformer_lm``, blocks as DFA sites and as stages), and the same LM at GPT-2's
shape with a real vocabulary (4 x 256, context 128, vocabulary 16,384, batch 8; the error at the LM
head's input, ``head="head"``). The split points
balance the stages' parameter counts (``balanced_split_points``).
"""

from __future__ import annotations

import copy
import datetime
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..dfa import DFA
from ..distributed import DFAPipeline
from ..distributed.split import StageModule, plan_stages
from ..info import machine_info
from ..models import make_mlp, make_transformer_lm
from ..plots import save_figure

METHODS = ("bp", "dfa", "bp-gpipe", "bp-1f1b", "dfa-pipeline")
TARGET = 1.5  # issue 19: the DFA pipeline >= 1.5x the better BP pipeline (2 cores, 2 stages, 1 thread each)


@dataclass
class BenchModel:
    """One model of the bench: how to build it, its data, its loss and its fastdfa.DFA options."""

    label: str
    build: Callable[[], torch.nn.Module]
    batch: int
    data: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    loss_fn: Callable
    dfa_options: Callable[[torch.nn.Module], dict] = field(default=lambda model: {})


def lm_loss(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy of logits ``[B, T, V]`` against ids ``[B, T]``."""
    return F.cross_entropy(y.reshape(-1, y.shape[-1]), t.reshape(-1))


def models(tiny: bool) -> list[BenchModel]:
    """The MLP and the transformer LM; ``tiny``: the same kinds at a size for a smoke test."""
    width, depth, batch, inputs = (64, 3, 16, 32) if tiny else (1024, 8, 256, 784)
    vocab, context, d_model, layers, lm_batch = (11, 8, 16, 2, 8) if tiny else (80, 64, 128, 4, 32)

    def mlp_data(gen):
        return torch.randn(batch, inputs, generator=gen), torch.randint(0, 10, (batch,), generator=gen)

    def token_data(vocab, context, batch):
        def data(gen):  # random ids [batch, context + 1]: inputs and next-token targets
            ids = torch.randint(0, vocab, (batch, context + 1), generator=gen)
            return ids[:, :-1], ids[:, 1:]
        return data

    lm = BenchModel(f"transformer LM d{d_model} x{layers} blocks, T{context}, V{vocab}",
                    lambda: make_transformer_lm(vocab, context, d_model=d_model, heads=4 if not tiny else 2,
                                                layers=layers),
                    lm_batch, token_data(vocab, context, lm_batch), lm_loss,
                    lambda model: dict(sites=model.sites("blocks"), batch_dims=2))
    # GPT-2's shape with a real vocabulary (issue "A language model with a real vocabulary"): the error at
    # the LM head's input (head=, d_model wide; the head by BP on the last stage), DFA between the blocks
    g_vocab, g_context, g_d, g_layers, g_batch = (97, 8, 16, 2, 8) if tiny else (16384, 128, 256, 4, 8)

    gpt2_shaped = BenchModel(f"GPT-2-shaped LM d{g_d} x{g_layers} blocks, T{g_context}, V{g_vocab}, head=",
                             lambda: make_transformer_lm(g_vocab, g_context, d_model=g_d, heads=4 if not tiny else 2,
                                                         layers=g_layers),
                             g_batch, token_data(g_vocab, g_context, g_batch), lm_loss,
                             lambda model: dict(sites=list(model.blocks), batch_dims=2, head="head"))
    return [BenchModel(f"mlp {inputs}-{width}x{depth}-10", lambda: make_mlp(inputs, (width,) * depth, 10),
                       batch, mlp_data, F.cross_entropy), lm, gpt2_shaped]


def balanced_split_points(model: torch.nn.Module, stages: int, sites) -> list[str]:
    """The split points (stage-beginning DFA modules) that minimise the largest stage's multiplied
    parameters: a proxy of its compute (each weight is one multiply-add per row), in which an
    embedding's parameters count nothing (a row is looked up, not multiplied). Counted plainly, GPT-2's
    16,384 x 256 token embedding (4.2 M) weighed as much as its LM head, whose GEMMs are about 60% of
    the step, and the split put two of four blocks before the head's stage: CPU ms per rank 167 / 386."""
    import itertools

    steps = plan_stages(model, [], sites).steps[0]
    sizes = [sum(p.numel() for _, m in s.members for sub in m.modules() if not isinstance(sub, torch.nn.Embedding)
                 for p in sub.parameters(recurse=False)) for s in steps]
    allowed = []
    for i in range(1, len(steps)):
        try:
            plan_stages(model, [steps[i].name], sites)
            allowed.append(i)
        except ValueError:
            continue
    if len(allowed) < stages - 1:
        raise ValueError(f"{type(model).__name__} has {len(allowed) + 1} possible stages, fewer than {stages}")
    best = min(itertools.combinations(allowed, stages - 1),
               key=lambda cuts: max(sum(sizes[a:b]) for a, b in zip((0, *cuts), (*cuts, len(steps)))))
    return [steps[i].name for i in best]


def _method_steps(spec: BenchModel, base, x, t, splits, micro: int, schedule: str, device, rank: int,
                  world: int) -> dict[str, Callable[[], None]]:
    """Each method's step on this rank (a no-op on ranks > 0 for the single-process methods)."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    last = world - 1
    steps: dict[str, Callable[[], None]] = {}
    bp = copy.deepcopy(base).to(device)
    dfa_model = copy.deepcopy(base).to(device)
    dfa = DFA(dfa_model, seed=0, **spec.dfa_options(dfa_model))

    def single(module, params):
        def step():
            if rank == 0:
                for p in params:
                    p.grad = None
                spec.loss_fn(module(x), t).backward()
        return step
    steps["bp"], steps["dfa"] = single(bp, list(bp.parameters())), single(dfa, list(dfa_model.parameters()))
    for name, kind in (("bp-gpipe", ScheduleGPipe), ("bp-1f1b", Schedule1F1B)):
        model = copy.deepcopy(base)
        plan = plan_stages(model, splits, spec.dfa_options(model).get("sites"))
        stage_module = StageModule(plan.steps[rank], None).to(device)
        schedule_ = kind(PipelineStage(stage_module, rank, world, device), micro, loss_fn=spec.loss_fn)

        def pipelined(schedule_=schedule_, params=list(stage_module.parameters())):
            for p in params:
                p.grad = None
            if rank == 0:
                schedule_.step(x)
            elif rank == last:
                schedule_.step(target=t, losses=[])
            else:
                schedule_.step()
        steps[name] = pipelined
    model = copy.deepcopy(base)
    pipe = DFAPipeline(model, splits, micro_batches=micro, seed=0, schedule=schedule, device=device,
                       **spec.dfa_options(model))

    def dfa_pipeline():
        for p in pipe.parameters():
            p.grad = None
        pipe.step(x if rank == 0 else None, t if rank == last else None, spec.loss_fn)
    steps["dfa-pipeline"] = dfa_pipeline
    return steps


def bench_model(spec: BenchModel, stages: int, micro: int, rounds: int, warmup: int, schedule: str,
                device: torch.device, rank: int) -> dict:
    """Every method on ``spec``, interleaved; the rows of the report (filled on rank 0)."""
    torch.manual_seed(0)
    base = spec.build()
    x, t = spec.data(torch.Generator().manual_seed(0))
    x, t = x.to(device), t.to(device)
    splits = balanced_split_points(base, stages, spec.dfa_options(base).get("sites"))
    steps = _method_steps(spec, base, x, t, splits, micro, schedule, device, rank, stages)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    cpu: dict[str, list[float]] = {m: [] for m in METHODS}  # this process's CPU time (all its threads)
    for r in range(warmup + rounds):
        for method in METHODS:
            dist.barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            steps[method]()
            sync()
            end_cpu = time.process_time()
            dist.barrier()
            if r >= warmup:
                times[method].append(time.perf_counter() - start)
                cpu[method].append(end_cpu - start_cpu)
    cpu_ranks = [None] * dist.get_world_size()
    dist.all_gather_object(cpu_ranks, {m: statistics.median(v) for m, v in cpu.items()})
    rows = []
    for method in METHODS:
        values = times[method]
        median = statistics.median(values)
        q = statistics.quantiles(values, n=4) if len(values) > 1 else [median] * 3
        rows.append({"method": method, "samples_per_s": spec.batch / median, "median_ms": median * 1e3,
                     "q1_ms": q[0] * 1e3, "q3_ms": q[2] * 1e3, "rounds": len(values),
                     "cpu_ms_per_rank": [c[method] * 1e3 for c in cpu_ranks]})
    by = {row["method"]: row["samples_per_s"] for row in rows}
    ratio = by["dfa-pipeline"] / max(by["bp-gpipe"], by["bp-1f1b"])
    return {"model": spec.label, "batch": spec.batch, "micro_batches": micro, "split_points": splits,
            "rows": rows, "dfa_pipeline_over_best_bp_pipeline": ratio}


def worker(rank: int, world: int, init_method: str, options: dict, out_path: str) -> None:
    """One rank of the bench: every model, then (rank 0) the JSON record into ``out_path``."""
    device = torch.device(f"cuda:{rank}" if options["device"] == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_flush_denormal(True)
    torch.set_num_threads(options["threads"])
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init_method, rank=rank,
                            world_size=world, timeout=datetime.timedelta(minutes=10))
    try:
        results = [bench_model(spec, world, options["micro_batches"], options["rounds"], options["warmup"],
                               options["schedule"], device, rank) for spec in models(options["tiny"])]
        if rank == 0:
            setup = {**options, "stages": world, "world": world, "methods": list(METHODS), "target": TARGET,
                     "launcher": "torchrun" if init_method == "env://" else "torch.multiprocessing"}
            import json
            with open(out_path, "w") as f:
                json.dump({"machine": machine_info(), "setup": setup, "models": results}, f, indent=2)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(stages: int, micro_batches: int, rounds: int, threads: int, schedule: str, device: str, tiny: bool) -> dict:
    """Run the bench (spawned processes, or this process as one torchrun rank); the record (rank 0) or None."""
    options = dict(micro_batches=micro_batches, rounds=rounds, warmup=min(3, rounds), threads=threads,
                   schedule=schedule, device=device, tiny=tiny)
    import json
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "record.json")
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
            world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
            if world != stages:
                raise ValueError(f"--stages {stages} but torchrun started {world} processes")
            worker(rank, world, "env://", options, out_path)
            if rank != 0:
                return None
        else:
            import torch.multiprocessing as mp
            with _free_port() as port:
                init = f"tcp://127.0.0.1:{port}"
            os.environ.setdefault("OMP_NUM_THREADS", str(threads))
            mp.start_processes(worker, args=(stages, init, options, out_path), nprocs=stages, join=True,
                               start_method="spawn")
        with open(out_path) as f:
            return json.load(f)


class _free_port:
    """A free local TCP port (closed again before the processes bind it)."""

    def __enter__(self) -> int:
        import socket
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.sock.close()


def table(record: dict) -> str:
    lines = []
    for result in record["models"]:
        lines.append(f"\n{result['model']}, batch {result['batch']}, {result['micro_batches']} micro-batches, "
                     f"split at {result['split_points']}")
        lines.append(f"  {'method':<14}{'samples/s':>12}{'median ms':>12}{'q1-q3 ms':>18}  CPU ms per rank")
        for row in result["rows"]:
            busy = " ".join(f"{c:.1f}" for c in row["cpu_ms_per_rank"])
            lines.append(f"  {row['method']:<14}{row['samples_per_s']:>12.1f}{row['median_ms']:>12.2f}"
                         f"{row['q1_ms']:>9.2f}-{row['q3_ms']:<8.2f}  {busy}")
        lines.append(f"  dfa-pipeline / best BP pipeline: {result['dfa_pipeline_over_best_bp_pipeline']:.2f}x "
                     f"(target >= {TARGET})")
    return "\n".join(lines)


def plot(record: dict, path) -> None:
    """Samples per second of every method, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = record["models"]
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.6), squeeze=False)
    for ax, result in zip(axes[0], results):
        names = [row["method"] for row in result["rows"]]
        values = [row["samples_per_s"] for row in result["rows"]]
        colors = ["#999999", "#4c72b0", "#dd8452", "#c44e52", "#55a868"]
        ax.barh(names[::-1], values[::-1], color=colors[::-1])
        for y, v in enumerate(values[::-1]):
            ax.text(v, y, f" {v:.0f}", va="center", fontsize=8)
        ax.set_xlabel("samples / s")
        ax.set_title(f"{result['model']}\n{record['setup']['stages']} stages, {result['micro_batches']} "
                     f"micro-batches: DFA pipeline {result['dfa_pipeline_over_best_bp_pipeline']:.2f}x best BP "
                     "pipeline", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    save_figure(fig, path)
