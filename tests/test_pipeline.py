"""fastdfa.distributed.DFAPipeline on gloo (2 and 3 CPU processes): the gradients, feedback and loss of
whole-model fastdfa.DFA in float64 (MLP, CNN, transformer LM with blocks as stages; DFA and GrAPE; both
schedules), the messages of a step (e once per micro-batch, nothing else backwards), the 2-D grid with
DDP, and every bad input ending every rank with its message and no hang.

Each process runs every scenario of its world size in one process group (``_spawn`` once per world
size, module-scoped), so the group also proves that a failed step leaves it usable.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import subprocess
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 5
FLOAT64 = dict(rtol=0, atol=1e-12)  # micro-batches sum the gradients in another order: rounding only

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


# ----------------------------------------------------------------------------- models (every rank builds the same)
def _mlp():
    from fastdfa.models import make_mlp
    torch.manual_seed(0)
    model = make_mlp(12, (16, 16, 16), 5).double()
    return model, torch.randn(8, 12, dtype=torch.float64), torch.randint(0, 5, (8,)), F.cross_entropy, {}


def _cnn():
    from fastdfa.models import make_cnn
    torch.manual_seed(0)
    model = make_cnn((1, 8, 8), 4, channels=(3, 4), hidden=6).double()
    return model, torch.randn(8, 1, 8, 8, dtype=torch.float64), torch.randint(0, 4, (8,)), F.cross_entropy, {}


def _lm_loss(y, t):
    return F.cross_entropy(y.reshape(-1, y.shape[-1]), t.reshape(-1))


def _lm():
    from fastdfa.models import make_transformer_lm
    torch.manual_seed(0)
    model = make_transformer_lm(11, 6, d_model=8, heads=2, layers=3, mlp_ratio=2).double()
    x, t = torch.randint(0, 11, (4, 6)), torch.randint(0, 11, (4, 6))
    return model, x, t, _lm_loss, dict(sites=model.sites("blocks"), batch_dims=2)


class Widen(nn.Module):
    """The identity, or (``on``) one more feature: a stage output whose shape changes."""

    on = False

    def forward(self, h):
        return torch.cat([h, h[:, :1]], 1) if self.on else h


def _widening_mlp():
    import fastdfa
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), fastdfa.Linear(12, 16, activation="relu"), Widen(),
                          fastdfa.Linear(16, 16, activation="relu"), fastdfa.Linear(16, 5)).double()
    return model, torch.randn(8, 12, dtype=torch.float64), torch.randint(0, 5, (8,)), F.cross_entropy, {}


MODELS = {"mlp": _mlp, "cnn": _cnn, "lm": _lm}
SPLITS = {("mlp", 2): ["3"], ("mlp", 3): ["2", "4"], ("cnn", 2): ["2"], ("cnn", 3): ["2", "5"],
          ("lm", 2): ["blocks.1"], ("lm", 3): ["blocks.1", "blocks.2"]}


def _message(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test reads the type and text
        return f"{type(exc).__name__}: {exc}"
    return None


def _feed(pipe, x, t):
    """(x, target) as the rank of ``pipe`` passes them: x on stage 0, target on the last stage."""
    return (x if pipe.stage == 0 else None), (t if pipe.stage == pipe.num_stages - 1 else None)


# ----------------------------------------------------------------------------- scenarios (run in every process)
def _compare(world, model_name, schedule="sync", mode="dfa", micro=4, steps=2, dtype=torch.float64, **options):
    """Pipeline and whole-model wrapper side by side for ``steps`` SGD steps: the largest differences."""
    import fastdfa
    from fastdfa.distributed import DFAPipeline
    model, x, t, loss_fn, opts = MODELS[model_name]()
    model, x = model.to(dtype), (x.to(dtype) if x.is_floating_point() else x)
    pipe = DFAPipeline(model, SPLITS[model_name, world], micro_batches=micro, seed=SEED, mode=mode,
                       schedule=schedule, **opts, **options)
    ref, _, _, _, ref_opts = MODELS[model_name]()
    ref = ref.to(dtype)
    single = fastdfa.DFA(ref, seed=SEED, mode=mode, **ref_opts, **options)
    out = side_by_side(pipe, single, model, ref, x, t, loss_fn, steps)
    assert not out["missing"], out["missing"]  # every parameter got a gradient in both
    out["alignment"] = None if pipe.wrapper.last_alignment is None else pipe.wrapper.last_alignment.tolist()
    out["fused"], out["fused_single"] = pipe.wrapper.fused_layers, single.fused_layers
    return out


def side_by_side(pipe, single, model, ref, x, t, loss_fn, steps: int) -> dict:
    """``steps`` SGD steps of the pipeline and of the whole-model wrapper ``single`` (on ``ref``, the same
    model built again) on the same batch: per step the largest gradient, loss and feedback differences, and
    the parameters that got no gradient in either ("missing")."""
    opt, ref_opt = torch.optim.SGD(pipe.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    ref_params = dict(ref.named_parameters())
    out = {"grad": [], "loss": [], "feedback": [], "names": [n for n, _ in pipe.named_parameters()],
           "model_names": [n for n, _ in model.named_parameters()], "sites": [], "stage": pipe.stage, "missing": []}
    for _ in range(steps):
        opt.zero_grad()
        ref_opt.zero_grad()
        loss = pipe.step(*_feed(pipe, x, t), loss_fn)
        ref_loss = loss_fn(single(x), t)
        ref_loss.backward()
        both = [(n, p) for n, p in pipe.named_parameters() if p.grad is not None and ref_params[n].grad is not None]
        out["missing"] += [n for n, p in pipe.named_parameters() if p.grad is None or ref_params[n].grad is None]
        out["grad"].append(max((p.grad - ref_params[n].grad).abs().max().item() for n, p in both))
        out["loss"].append(abs(loss.item() - ref_loss.item()))
        out["feedback"].append(max([(s.feedback - single.sites[pipe.first_site + i].feedback).abs().max().item()
                                    for i, s in enumerate(pipe.sites)], default=0.0))
        out["sites"] = [(s.name, single.sites[pipe.first_site + i].name) for i, s in enumerate(pipe.sites)]
        opt.step()
        ref_opt.step()
    return out


def _collectives(world):
    """Every point-to-point message and collective of one step (after the setup step)."""
    from fastdfa.distributed import DFAPipeline
    model, x, t, loss_fn, _ = _mlp()
    pipe = DFAPipeline(model, SPLITS["mlp", world], micro_batches=4, seed=SEED)
    pipe.step(*_feed(pipe, x, t), loss_fn)
    log, saved = [], {}
    for name in ("isend", "irecv", "send", "recv", "all_reduce", "all_gather_object", "broadcast", "all_gather",
                 "reduce_scatter", "barrier", "batch_isend_irecv"):
        saved[name] = real = getattr(dist, name)

        def spy(*args, _name=name, _real=real, **kwargs):
            tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
            peer = kwargs.get("dst", kwargs.get("src", args[1] if len(args) > 1 and isinstance(args[1], int) else None))
            log.append((_name, peer, kwargs.get("tag"), None if tensor is None else tuple(tensor.shape),
                        None if tensor is None else str(tensor.dtype)))
            return _real(*args, **kwargs)
        setattr(dist, name, spy)
    try:
        pipe.step(*_feed(pipe, x, t), loss_fn)
    finally:
        for name, real in saved.items():
            setattr(dist, name, real)
    return {"log": log, "stage": pipe.stage}


def _errors(world):
    from fastdfa.distributed import DFAPipeline
    last = world - 1
    rank = dist.get_rank()
    model, x, t, loss_fn, _ = _mlp()
    out = {"missing": _message(lambda: DFAPipeline(model, ["7"], micro_batches=2)),
           "not_a_site": _message(lambda: DFAPipeline(_cnn()[0], ["1"] + (["5"] if world == 3 else []),
                                                      micro_batches=2)),
           "world": _message(lambda: DFAPipeline(model, ["2", "3", "4"][:world], micro_batches=2))}
    pipe = DFAPipeline(model, SPLITS["mlp", world], micro_batches=2, seed=SEED)
    culprit = 1  # the rank that gets the input it should not have
    out["x_on_wrong_rank"] = _message(lambda: pipe.step(x if rank in (0, culprit) else None,
                                                        t if rank == last else None, loss_fn))
    out["no_target"] = _message(lambda: pipe.step(x if rank == 0 else None, None, loss_fn))
    out["target_everywhere"] = _message(lambda: pipe.step(x if rank == 0 else None, t, loss_fn))
    out["first_good"] = float(pipe.step(x if rank == 0 else None, t if rank == last else None, loss_fn))
    out["batch_changed"] = _message(lambda: pipe.step(x[:4] if rank == 0 else None, t[:4] if rank == last else None,
                                                      loss_fn))

    def bad_loss(y, target):
        raise ValueError("this loss cannot be computed")
    out["loss_fn"] = _message(lambda: pipe.step(x if rank == 0 else None, t if rank == last else None, bad_loss))
    out["second_good"] = float(pipe.step(x if rank == 0 else None, t if rank == last else None, loss_fn))
    calls = []

    def nan_in_second_micro_batch(y, target):
        calls.append(1)
        return loss_fn(y, target) * (float("nan") if len(calls) == 2 else 1.0)
    skipping = DFAPipeline(_mlp()[0], SPLITS["mlp", world], micro_batches=2, seed=SEED, nonfinite="skip")
    skipping.step(x if rank == 0 else None, t if rank == last else None, nan_in_second_micro_batch)
    out["skip"] = ([p.grad is None for p in skipping.parameters()], skipping.wrapper.skipped_steps)
    weight_space = DFAPipeline(_mlp()[0], SPLITS["mlp", world], micro_batches=2, seed=SEED, mode="grape",
                               perturb="weight")
    out["grape_boundary"] = _message(lambda: weight_space.step(x if rank == 0 else None, t if rank == last else None,
                                                               loss_fn))
    widening, x, t, _, _ = _widening_mlp()
    pipe = DFAPipeline(widening, ["3", "4"][:world - 1], micro_batches=2, seed=SEED)
    pipe.step(x if rank == 0 else None, t if rank == last else None, loss_fn)
    widening[2].on = True
    out["output_widened"] = _message(lambda: pipe.step(x if rank == 0 else None, t if rank == last else None,
                                                       loss_fn))
    return out


def _grid(world, stages, replicas, mode="dfa", steps=2):
    """DFAPipeline on a stages x replicas grid, against one process on the whole mini-batch (SGD steps)."""
    import fastdfa
    from fastdfa.distributed import DFAPipeline, process_grid
    grid = process_grid(stages, replicas)
    model, x, t, loss_fn, _ = _mlp()
    pipe = DFAPipeline(model, ["3"][:stages - 1], micro_batches=2, seed=SEED, mode=mode, group=grid.pipeline_group,
                       data_parallel_group=grid.data_group)
    ref, _, _, _, _ = _mlp()
    single = fastdfa.DFA(ref, seed=SEED, mode=mode)
    opt, ref_opt = torch.optim.SGD(pipe.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    ref_params = dict(ref.named_parameters())
    shard = slice(grid.replica * 8 // replicas, (grid.replica + 1) * 8 // replicas)
    out = {"grad": [], "feedback": [], "stage": grid.stage, "replica": grid.replica, "ddp": pipe.ddp is not None}
    for _ in range(steps):
        opt.zero_grad()
        ref_opt.zero_grad()
        pipe.step(*_feed(pipe, x[shard], t[shard]), loss_fn)
        loss_fn(single(x), t).backward()
        out["grad"].append(max((p.grad - ref_params[n].grad).abs().max().item() for n, p in pipe.named_parameters()))
        out["feedback"].append(max([(s.feedback - single.sites[pipe.first_site + i].feedback).abs().max().item()
                                    for i, s in enumerate(pipe.sites)], default=0.0))
        opt.step()
        ref_opt.step()
    return out


def _timeout(world):
    """The last rank never takes its step: the others raise PipelineTimeout after ``timeout``, no hang.
    (The process group is unusable afterwards: the last scenario.)"""
    from fastdfa.distributed import DFAPipeline
    model, x, t, loss_fn, _ = _mlp()
    pipe = DFAPipeline(model, SPLITS["mlp", world], micro_batches=2, seed=SEED, timeout=1.0)
    pipe.step(*_feed(pipe, x, t), loss_fn)
    if pipe.stage == world - 1:
        time.sleep(3.0)
        return {"stage": pipe.stage}
    start = time.monotonic()
    message = _message(lambda: pipe.step(*_feed(pipe, x, t), loss_fn))
    return {"stage": pipe.stage, "message": message, "seconds": time.monotonic() - start}


SCENARIOS = {
    "mlp-sync": lambda w: _compare(w, "mlp"),
    "mlp-overlapped": lambda w: _compare(w, "mlp", "overlapped"),
    "cnn": lambda w: _compare(w, "cnn", "overlapped", micro=2),
    "lm": lambda w: _compare(w, "lm", micro=2),
    "lm-overlapped": lambda w: _compare(w, "lm", "overlapped", micro=2),
    "grape": lambda w: _compare(w, "mlp", "overlapped", mode="grape", steps=3),
    "grape-auto": lambda w: _compare(w, "mlp", mode="grape", steps=2, perturb="auto"),  # weight space on stage 1
    "grape-shared": lambda w: _compare(w, "mlp", mode="grape", steps=2, jvp="shared"),
    "grape-lm": lambda w: _compare(w, "lm", mode="grape", micro=2, steps=2),
    # a kernel backend's fused route through a stage (the boundary's input is a claimed layer output)
    "mlp-triton": lambda w: _compare(w, "mlp", dtype=torch.float32, backend="triton"),
    "collectives": _collectives,
    "errors": _errors,
    "grid-2x1": lambda w: _grid(w, 2, 1),
    "grid-1x2": lambda w: _grid(w, 1, 2),
    "grid-1x2-grape": lambda w: _grid(w, 1, 2, mode="grape"),
    "timeout": _timeout,
}
RUNS = {2: ["mlp-sync", "mlp-overlapped", "cnn", "lm", "grape", "grape-auto", "grape-shared", "grape-lm",
            "mlp-triton", "collectives", "errors", "grid-2x1", "grid-1x2", "grid-1x2-grape", "timeout"],
        3: ["mlp-sync", "mlp-overlapped", "cnn", "lm-overlapped", "grape", "collectives", "errors"]}


def run_scenarios(rank, world, port, out_dir, scenarios: dict) -> None:
    """One process of a gloo group: every scenario in turn, each result (or its traceback) written to
    ``out_dir/rank<r>.pkl`` after each, so a scenario that hangs still leaves the earlier ones."""
    sys.path.insert(0, os.path.join(ROOT, "python"))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    results = {}
    for name, scenario in scenarios.items():
        try:
            results[name] = scenario(world)
        except Exception:  # noqa: BLE001 - reported by the test that reads this scenario
            results[name] = {"crashed": traceback.format_exc()}
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(results, f)


def _worker(rank, world, port, out_dir):
    run_scenarios(rank, world, port, out_dir, {name: SCENARIOS[name] for name in RUNS[world]})
    # the timeout scenario leaves the group unusable: exit without a last collective
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, out_dir, limit_s: float = 150) -> dict[int, dict]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    context = mp.start_processes(_worker, args=(world, _free_port(), str(out_dir)), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + limit_s
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in context.processes:  # only the processes this test started
                if p.is_alive():
                    p.kill()
            pytest.fail(f"the {world}-process run did not finish in {limit_s} s (a hang)")
    results = {}
    for rank in range(world):
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "rb") as f:
            results[rank] = pickle.load(f)
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache = {}

    def get(world):
        if world not in cache:
            cache[world] = _spawn(world, tmp_path_factory.mktemp(f"world{world}"))
        return cache[world]
    return get


def _scenario(runs, world, name) -> list[dict]:
    per_rank = [runs(world)[r][name] for r in range(world)]
    for rank, result in enumerate(per_rank):
        assert "crashed" not in result, f"rank {rank}, scenario {name}:\n{result['crashed']}"
    return per_rank


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("world,name", [(w, n) for w in (2, 3) for n in RUNS[w]
                                        if n.startswith(("mlp", "cnn", "lm", "grape"))])
def test_gradients_loss_and_feedback_equal_whole_model_dfa(runs, world, name):
    if name.endswith("triton"):
        pytest.importorskip("triton")
    per_rank = _scenario(runs, world, name)
    stages = sorted(r["stage"] for r in per_rank)
    assert stages == list(range(world))
    names = [n for r in sorted(per_rank, key=lambda r: r["stage"]) for n in r["names"]]
    assert names == per_rank[0]["model_names"], "the stages together hold every parameter once, in model order"
    # float32 on the triton backend: the micro-batches' kernels round differently from the whole batch's
    tol = 2e-5 if name.endswith("triton") else FLOAT64["atol"]
    for r in per_rank:
        assert max(r["grad"]) <= tol, (r["stage"], r["grad"])
        assert max(r["loss"]) <= max(tol, 1e-12), (r["stage"], r["loss"])
        assert all(mine == theirs for mine, theirs in r["sites"]), r["sites"]
        if name.endswith("triton"):  # every layer of the stage takes the fused route, as in the whole model
            assert r["fused"] and set(r["fused"]) <= set(r["fused_single"]), (r["fused"], r["fused_single"])
        if name.startswith("grape"):  # the alignment steps moved the feedback as the whole model's did
            assert max(r["feedback"]) <= 1e-12, (r["stage"], r["feedback"])
            assert r["alignment"] is not None or not r["sites"]
        else:  # the same seed gives a site the same feedback, bit for bit, wherever it lives
            assert max(r["feedback"]) == 0.0, (r["stage"], r["feedback"])


@pytest.mark.parametrize("world", [2, 3])
def test_e_is_sent_once_per_micro_batch_and_nothing_travels_backwards(runs, world):
    per_rank = _scenario(runs, world, "collectives")
    micro, last = 4, world - 1
    # micro-batches of 2 samples; every boundary of this MLP is 16 wide; one message = the values + a status
    act_shape, e_shape = (2 * 16 + 1,), (2 * 5 + 1,)
    for rank, result in enumerate(per_rank):
        log = result["log"]
        ops = {op for op, *_ in log}
        assert ops <= {"isend", "irecv", "all_reduce"}, ops
        assert sum(op == "all_reduce" for op, *_ in log) == 1  # the step's closing agreement (loss, failures)
        sends = [(peer, shape) for op, peer, tag, shape, _ in log if op == "isend"]
        recvs = [(peer, shape) for op, peer, tag, shape, _ in log if op == "irecv"]
        if rank < last:
            assert sends == [(rank + 1, act_shape)] * micro  # activations forward, to the next stage only
            assert [s for p, s in recvs if p == last] == [e_shape] * micro  # e, once per micro-batch
            assert [s for p, s in recvs if p != last] == ([(act_shape)] * micro if rank > 0 else [])
        else:
            assert sorted(sends) == sorted([(s, e_shape) for s in range(last)] * micro)
            assert recvs == [(last - 1, act_shape)] * micro


def test_every_bad_input_ends_every_rank_with_its_message(runs):
    for world in (2, 3):
        per_rank = _scenario(runs, world, "errors")
        expected = {
            "missing": "split point '7' is not a module of the model",
            "not_a_site": "split point '1' (MaxPool2d) is not a DFA module",
            "world": f"has {world + 1} stages (split_points=",
            "x_on_wrong_rank": "x was given on rank 1 (stage 1): only stage 0 (rank 0) takes the input",
            "no_target": f"rank {world - 1} (stage {world - 1}) holds the last stage and needs the target",
            "target_everywhere": f"target was given on rank 0 (stage 0): only the last stage (rank {world - 1})",
            "batch_changed": "stage 0's output has shape (2, 16)",
            "loss_fn": "ValueError: this loss cannot be computed",
            "output_widened": "site '3': input of per-sample shape (17,), but its feedback was built for (16,)",
            "grape_boundary": "(a stage boundary) in weight space",
        }
        for rank, result in enumerate(per_rank):
            for case, fragment in expected.items():
                message = result[case]
                assert message is not None, f"{world} ranks, rank {rank}: {case} raised nothing"
                assert message.startswith("PipelineError"), (case, message)
                assert fragment in message, (world, rank, case, message)
            # the failed steps left the pipeline and the process group usable
            assert result["first_good"] == result["second_good"] == per_rank[0]["first_good"] > 0
            # a non-finite e in one micro-batch (nonfinite="skip") skips the whole step on every stage, once
            no_grads, skipped = result["skip"]
            assert all(no_grads) and no_grads and skipped == 1, result["skip"]


def test_a_rank_that_never_takes_its_step_ends_the_others_with_a_timeout(runs):
    per_rank = _scenario(runs, 2, "timeout")
    waiting = [r for r in per_rank if r["stage"] == 0][0]
    assert waiting["message"].startswith("PipelineTimeout"), waiting["message"]
    assert "within 1 s" in waiting["message"]
    assert waiting["seconds"] < 2.5  # the timeout, not the absent rank's return, ended the wait


@pytest.mark.parametrize("grid", ["grid-2x1", "grid-1x2", "grid-1x2-grape"])
def test_ddp_replicas_of_each_stage_give_whole_batch_gradients(runs, grid):
    per_rank = _scenario(runs, 2, grid)
    for r in per_rank:
        assert r["ddp"]
        assert max(r["grad"]) <= FLOAT64["atol"], r
        assert max(r["feedback"]) <= 1e-12, r  # GrAPE: the replicas align with the whole batch's estimate
    placement = sorted((r["stage"], r["replica"]) for r in per_rank)
    assert placement == ([(0, 0), (1, 0)] if grid == "grid-2x1" else [(0, 0), (0, 1)])


# ----------------------------------------------------------------------------- in one process
def test_schedules_order_and_saved_activations():
    from fastdfa.distributed import saved_micro_batches, stage_order
    assert stage_order("sync", 0, 2, 3) == [("F", 0), ("F", 1), ("F", 2), ("B", 0), ("B", 1), ("B", 2)]
    assert stage_order("overlapped", 0, 2, 4) == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("F", 3),
                                                  ("B", 2), ("B", 3)]
    assert stage_order("sync", 1, 2, 2) == stage_order("overlapped", 1, 2, 2) == [("F", 0), ("B", 0), ("F", 1),
                                                                                 ("B", 1)]
    for schedule in ("sync", "overlapped"):
        for s in range(4):
            order = stage_order(schedule, s, 4, 8)
            assert sorted(order) == sorted([("F", m) for m in range(8)] + [("B", m) for m in range(8)])
            assert all(order.index(("F", m)) < order.index(("B", m)) for m in range(8))
    assert [saved_micro_batches("sync", s, 4, 8) for s in range(4)] == [8, 8, 8, 1]
    assert [saved_micro_batches("overlapped", s, 4, 8) for s in range(4)] == [4, 3, 2, 1]
    with pytest.raises(ValueError, match="schedule must be one of"):
        stage_order("zero-bubble", 0, 2, 2)


def test_the_split_names_each_stage_and_its_first_site():
    from fastdfa.distributed.split import plan_stages
    model, *_ = _lm()
    plan = plan_stages(model, ["blocks.1", "head"], model.sites("blocks"))
    assert [[s.name for s in steps] for steps in plan.steps] == [["", "blocks.0"], ["blocks.1", "blocks.2"], ["head"]]
    # sites of the whole model: blocks.1, blocks.2, head (site j is the input of DFA module j + 1)
    assert plan.first_site == [0, 1, 3] and plan.boundary_names == ["blocks.1", "head", None]
    with pytest.raises(ValueError, match="inside a step that the pipeline runs as one piece"):
        plan_stages(model, ["blocks.1.mlp"], model.sites("blocks"))
    with pytest.raises(ValueError, match="is not a DFA module"):  # the blocks are not sites: the residual crosses
        plan_stages(model, ["blocks.1"], None)
    with pytest.raises(ValueError, match="first DFA module to run"):
        plan_stages(model, ["blocks.0"], model.sites("blocks"))
    with pytest.raises(TypeError, match="splits an nn.Sequential"):
        plan_stages(nn.Linear(2, 2), [], None)
    import fastdfa
    nested = nn.Sequential(fastdfa.Linear(4, 4), nn.Sequential(fastdfa.Linear(4, 4), fastdfa.Linear(4, 4)),
                           fastdfa.Linear(4, 2))
    plan = plan_stages(nested, ["1.1"], None)  # a nested Sequential holding a split point is opened
    assert [[s.name for s in steps] for steps in plan.steps] == [["0", "1.0"], ["1.1", "2"]]
    assert plan.first_site == [0, 2]


def test_a_pipeline_needs_a_process_group():
    from fastdfa.distributed import DFAPipeline
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="needs an initialised process group"):
        DFAPipeline(_mlp()[0], ["3"], micro_batches=2)


def test_bench_pipeline_runs_at_tiny_size(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "python"), os.environ.get("PYTHONPATH", "")])}
    record, plot = tmp_path / "pipeline.json", tmp_path / "pipeline.png"
    proc = subprocess.run([sys.executable, "-m", "fastdfa", "bench", "--pipeline", "--stages", "2", "--tiny",
                           "--rounds", "2", "--json", str(record), "--plot", str(plot)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    import json
    data = json.loads(record.read_text())
    assert {"machine", "setup", "models"} <= set(data)
    assert data["machine"]["torch"] == torch.__version__ and "commit" in data["machine"]
    for model in data["models"]:
        methods = [row["method"] for row in model["rows"]]
        assert methods == ["bp", "dfa", "bp-gpipe", "bp-1f1b", "dfa-pipeline"]
        assert all(row["samples_per_s"] > 0 for row in model["rows"])
    assert plot.stat().st_size > 0
