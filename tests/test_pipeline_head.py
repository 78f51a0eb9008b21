"""fastdfa.distributed.DFAPipeline with the error taken inside the last stage (head=, error_at=), on gloo
(2 CPU processes): the gradients (the head's BP ones and every site's DFA ones), the loss and the feedback
of a whole-model ``fastdfa.DFA(model, head=NAME)`` step in float64, in modes "dfa" and "grape" and both
schedules; the e message has the shape of the head's input; and a head outside the last stage, or at its
boundary, ends every rank with a message naming the stage.

One process group per run (``_spawn`` once, module-scoped) runs every scenario, as tests/test_pipeline.py.
"""

from __future__ import annotations

import os
import pickle
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_pipeline import FLOAT64, SEED, _free_port, _lm_loss, _message, run_scenarios, side_by_side
from torch import nn

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")
WORLD = 2


# ----------------------------------------------------------------------------- models (every rank builds the same)
def _mlp():
    """Three DFA layers, then a head "4" of a fastdfa layer and a plain nn.Linear (16 -> 8 -> 5)."""
    import fastdfa
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), fastdfa.Linear(12, 16, activation="relu"),
                          fastdfa.Linear(16, 16, activation="relu"), fastdfa.Linear(16, 16, activation="relu"),
                          nn.Sequential(fastdfa.Linear(16, 8, activation="relu"), nn.Linear(8, 5))).double()
    return model, torch.randn(8, 12, dtype=torch.float64), torch.randint(0, 5, (8,)), F.cross_entropy, {}


def _mlp_log_softmax():
    """The MLP with a LogSoftmax after its last layer: error_at="4" takes e at the logits, before it."""
    import fastdfa
    from fastdfa.models import make_mlp
    torch.manual_seed(0)
    model = nn.Sequential(*make_mlp(12, (16, 16, 16), 5), nn.LogSoftmax(-1)).double()
    assert isinstance(model[4], fastdfa.Linear)
    return model, torch.randn(8, 12, dtype=torch.float64), torch.randint(0, 5, (8,)), F.nll_loss, {}


def _lm(head_site=False):
    from fastdfa.models import make_transformer_lm
    torch.manual_seed(0)
    model = make_transformer_lm(11, 6, d_model=8, heads=2, layers=3, mlp_ratio=2).double()
    x, t = torch.randint(0, 11, (4, 6)), torch.randint(0, 11, (4, 6))
    sites = model.sites("blocks")
    return model, x, t, _lm_loss, dict(sites=sites if head_site else sites[:-1], batch_dims=2)


MODELS = {"mlp": _mlp, "mlp-log-softmax": _mlp_log_softmax, "lm": _lm, "lm-head-site": lambda: _lm(True)}


# ----------------------------------------------------------------------------- scenarios (run in every process)
def _compare(model_name, split, micro=4, steps=2, schedule="sync", mode="dfa", **options):
    """Pipeline and whole-model wrapper side by side for ``steps`` SGD steps: the largest differences."""
    import fastdfa
    from fastdfa.distributed import DFAPipeline
    model, x, t, loss_fn, opts = MODELS[model_name]()
    pipe = DFAPipeline(model, split, micro_batches=micro, seed=SEED, mode=mode, schedule=schedule, **opts,
                       **options)
    ref, _, _, _, ref_opts = MODELS[model_name]()
    single = fastdfa.DFA(ref, seed=SEED, mode=mode, **ref_opts, **options)
    out = side_by_side(pipe, single, model, ref, x, t, loss_fn, steps)
    out["n_sites"] = (len(single.sites), sum(1 for _ in pipe.sites))
    out["e_spec"] = pipe.runner.spec["e"]
    out["out_features"] = (pipe.wrapper.out_features, single.out_features)
    out["alignment"] = None if pipe.wrapper.last_alignment is None else pipe.wrapper.last_alignment.tolist()
    return out


def _errors(world):
    from fastdfa.distributed import DFAPipeline
    rank, last = dist.get_rank(), world - 1
    lm, _, _, _, lm_opts = _lm()
    out = {"head_in_stage_0": _message(lambda: DFAPipeline(_mlp()[0], ["3"], micro_batches=2, head="2")),
           "head_is_split_point": _message(lambda: DFAPipeline(_mlp()[0], ["3"], micro_batches=2, head="3")),
           "head_opened": _message(lambda: DFAPipeline(_mlp()[0], ["4.0"], micro_batches=2, head="4")),
           "head_spans_stages": _message(lambda: DFAPipeline(lm, ["blocks.1"], micro_batches=2, head="blocks",
                                                               **lm_opts)),
           "no_such_module": _message(lambda: DFAPipeline(_mlp()[0], ["3"], micro_batches=2, head="9")),
           "both": _message(lambda: DFAPipeline(_mlp()[0], ["3"], micro_batches=2, head="4", error_at="4")),
           "ranks_differ": _message(lambda: DFAPipeline(_mlp()[0], ["3"], micro_batches=2,
                                                        head="4" if rank == 0 else "4.1"))}
    # a NaN loss under nonfinite="skip": every stage skips the whole step, the head's BP gradients included
    model, x, t, loss_fn, _ = _mlp()
    calls = []

    def nan_in_second_micro_batch(y, target):
        calls.append(1)
        return loss_fn(y, target) * (float("nan") if len(calls) == 2 else 1.0)
    skipping = DFAPipeline(model, ["2"], micro_batches=2, seed=SEED, nonfinite="skip", head="4")
    skipping.step(x if rank == 0 else None, t if rank == last else None, nan_in_second_micro_batch)
    out["skip"] = ([p.grad is None for p in skipping.parameters()], skipping.wrapper.skipped_steps)
    out["after_skip"] = float(skipping.step(x if rank == 0 else None, t if rank == last else None, loss_fn))
    return out


SCENARIOS = {
    # the head a Sequential (a fastdfa layer and an nn.Linear, both BP); stage 1 holds site '3' too
    "mlp-head": lambda w: _compare("mlp", ["2"], head="4"),
    # the head the plain nn.Linear: '4.0' stays a DFA layer, its input a site of the last stage
    "mlp-head-inner": lambda w: _compare("mlp", ["3"], head="4.1", schedule="overlapped"),
    "mlp-head-micro-1": lambda w: _compare("mlp", ["3"], micro=1, head="4"),
    "lm-head": lambda w: _compare("lm", ["blocks.1"], micro=2, head="head"),
    "lm-head-site": lambda w: _compare("lm-head-site", ["blocks.2"], micro=2, head="head", schedule="overlapped"),
    "mlp-error-at": lambda w: _compare("mlp-log-softmax", ["3"], error_at="4"),
    "grape-head": lambda w: _compare("mlp", ["2"], mode="grape", steps=3, head="4", schedule="overlapped"),
    "grape-head-inner": lambda w: _compare("mlp", ["3"], mode="grape", steps=2, head="4.1"),
    "grape-head-shared": lambda w: _compare("mlp", ["2"], mode="grape", steps=2, head="4", jvp="shared"),
    "grape-error-at": lambda w: _compare("mlp-log-softmax", ["3"], mode="grape", steps=2, error_at="4"),
    "grape-lm-head": lambda w: _compare("lm", ["blocks.1"], mode="grape", micro=2, steps=2, head="head"),
    "errors": _errors,
}
COMPARED = [n for n in SCENARIOS if n != "errors"]


def _worker(rank, world, port, out_dir):
    run_scenarios(rank, world, port, out_dir, SCENARIOS)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("head")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    context = mp.start_processes(_worker, args=(WORLD, _free_port(), str(out_dir)), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + 150
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in context.processes:  # only the processes this test started
                if p.is_alive():
                    p.kill()
            pytest.fail("the 2-process run did not finish in 150 s (a hang)")
    results = {}
    for rank in range(WORLD):
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "rb") as f:
            results[rank] = pickle.load(f)
    return results


def _scenario(runs, name) -> list[dict]:
    per_rank = [runs[r][name] for r in range(WORLD)]
    for rank, result in enumerate(per_rank):
        assert "crashed" not in result, f"rank {rank}, scenario {name}:\n{result['crashed']}"
    return per_rank


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", COMPARED)
def test_gradients_loss_and_feedback_equal_whole_model_dfa_with_head(runs, name):
    per_rank = sorted(_scenario(runs, name), key=lambda r: r["stage"])
    assert [r["stage"] for r in per_rank] == list(range(WORLD))
    names = [n for r in per_rank for n in r["names"]]
    assert names == per_rank[0]["model_names"], "the stages together hold every parameter once, in model order"
    # the stages' sites are the whole model's, boundaries included (none inside the head)
    assert sum(r["n_sites"][1] for r in per_rank) == per_rank[0]["n_sites"][0]
    for r in per_rank:
        assert not r["missing"], (r["stage"], r["missing"])  # the head's parameters get their BP gradients
        assert max(r["grad"]) <= FLOAT64["atol"], (r["stage"], r["grad"])
        assert max(r["loss"]) <= 1e-12, (r["stage"], r["loss"])
        assert all(mine == theirs for mine, theirs in r["sites"]), r["sites"]
        # every stage's feedback is as wide as the error point: the head's input, not the model output
        assert r["out_features"][0] == r["out_features"][1], r["out_features"]
        assert r["e_spec"][0][-1] == r["out_features"][1], (r["e_spec"], r["out_features"])
        if name.startswith("grape"):
            assert max(r["feedback"]) <= 1e-12, (r["stage"], r["feedback"])
            assert r["alignment"] is not None or not r["sites"]
        else:
            assert max(r["feedback"]) == 0.0, (r["stage"], r["feedback"])


def test_e_has_the_shape_of_the_heads_input(runs):
    for r in _scenario(runs, "mlp-head"):
        assert tuple(r["e_spec"][0]) == (2, 16) and r["e_spec"][1] == torch.float64, r["e_spec"]
    for r in _scenario(runs, "lm-head"):  # [micro-batch, tokens, d_model], not the vocabulary
        assert tuple(r["e_spec"][0]) == (2, 6, 8), r["e_spec"]
    for r in _scenario(runs, "mlp-error-at"):  # the logits, before the LogSoftmax
        assert tuple(r["e_spec"][0]) == (2, 5), r["e_spec"]


def test_a_head_outside_the_last_stage_is_refused_on_every_rank(runs):
    per_rank = _scenario(runs, "errors")
    for r in per_rank:
        assert "head='2' is in stage 0" in r["head_in_stage_0"] and "last stage (stage 1)" in r["head_in_stage_0"], \
            r["head_in_stage_0"]
        assert "head='3' begins the last stage" in r["head_is_split_point"], r["head_is_split_point"]
        assert "head='4' is an nn.Sequential that the split opened" in r["head_opened"], r["head_opened"]
        assert "head='blocks' is in stages 0, 1" in r["head_spans_stages"], r["head_spans_stages"]
        assert "head='9' is not a submodule" in r["no_such_module"], r["no_such_module"]
        assert "not both" in r["both"], r["both"]
        assert "different arguments" in r["ranks_differ"] and "'4.1'" in r["ranks_differ"], r["ranks_differ"]
        assert r["skip"][0] and all(r["skip"][0]) and r["skip"][1] == 1, r["skip"]
        assert r["after_skip"] == r["after_skip"] and r["after_skip"] > 0  # a finite loss: the group goes on
