"""Fine-tuning a BP-pretrained network with BP, DFA or Feedback-Weight Matching + DFA.

    python -m fastdfa finetune --pretrain-data digits:0-4 --data digits:5-9 --method bp,dfa,fwm

1. Pretrain with BP on task A (once, seed of the first run), or load the
   weights from ``--pretrained``.
2. For every method and seed: copy the pretrained network, give it a fresh
   output layer for task B (seeded), and train on B:
     bp   plain backprop;
     dfa  DFA with random feedback (the baseline FWM improves on);
     fwm  ``fastdfa.init.feedback_weight_matching`` first, then DFA;
     jacobian  ``fastdfa.init.jacobian_feedback`` on the first ``JACOBIAN_SAMPLES`` training samples (the
          feedback set to BP's mean Jacobian path, the pretrained weights kept), then DFA.
   Weight decay (``--weight-decay``) applies to every method, as FWM's paper uses it.
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import replace

import torch
from torch import nn

from ..init import FWM_METHODS, feedback_weight_matching, jacobian_feedback
from ..layers import Linear
from .data import Dataset
from .train import TrainConfig, TrainResult, train

FINETUNE_METHODS = ("bp", "dfa", "fwm", "jacobian")
JACOBIAN_SAMPLES = 256  # the training samples the jacobian method measures BP's mean path on (n_e backwards)


def new_head(model: nn.Module, n_classes: int, seed: int) -> nn.Module:
    """A copy of ``model`` whose last fastdfa.Linear is re-initialised (seeded) with ``n_classes`` outputs."""
    model = copy.deepcopy(model)
    parent, name, last = None, None, None
    for module_name, module in model.named_modules():
        for child_name, child in module.named_children():
            if isinstance(child, Linear):
                parent, name, last = module, child_name, child
    if last is None:
        raise ValueError("the pretrained model has no fastdfa.Linear output layer to replace")
    torch.manual_seed(seed)
    head = Linear(last.in_features, n_classes, bias=last.bias is not None, activation=last.activation,
                  device=last.weight.device, dtype=last.weight.dtype)
    setattr(parent, name, head)
    return model


def pretrain(config: TrainConfig, data: Dataset, progress=None, log=print) -> TrainResult:
    """BP training on task A; ``result.model.model`` is the pretrained network."""
    return train(replace(config, method="bp"), data, progress=progress, log=log)


def finetune_runs(pretrained: nn.Module, config: TrainConfig, data: Dataset, methods: list[str], seeds: list[int],
                  fwm_method: str = "lstsq", progress=None, log=print) -> dict[str, list[TrainResult]]:
    """Every method x seed fine-tuned from ``pretrained`` on ``data``; results per method."""
    bad = [m for m in methods if m not in FINETUNE_METHODS]
    if bad or not methods:
        raise ValueError(f"fine-tuning methods are {FINETUNE_METHODS}, got {methods}")
    if fwm_method not in FWM_METHODS:
        raise ValueError(f"--fwm-method must be one of {FWM_METHODS}, got {fwm_method!r}")
    results: dict[str, list[TrainResult]] = {m: [] for m in methods}
    for seed in seeds:
        for method in methods:
            model = new_head(pretrained, data.n_classes, seed)
            run_config = replace(config, method="bp" if method == "bp" else "dfa", seed=seed)
            prepare = _preparation(method, fwm_method, data)
            if log is not None:
                log(f"-- fine-tune {method}, seed {seed}")
            results[method].append(train(run_config, data, progress=progress, log=log, model=model, prepare=prepare))
    return results


def _preparation(method: str, fwm_method: str, data: Dataset):
    """What runs on the built wrapper before the first step (``train(prepare=...)``), per method."""
    if method == "fwm":
        return lambda dfa: feedback_weight_matching(dfa, method=fwm_method)
    if method == "jacobian":
        def measured(dfa):
            device = next(dfa.model.parameters()).device
            return jacobian_feedback(dfa, data.x_train[:JACOBIAN_SAMPLES].to(device))
        return measured
    return None


def summary(results: dict[str, list[TrainResult]]) -> dict[str, dict]:
    """Final test accuracy per method: per seed, mean and standard deviation."""
    out = {}
    for method, runs in results.items():
        accs = [r.test_accuracy for r in runs]
        out[method] = {"seeds": [r.config["seed"] for r in runs], "test_accuracy": accs,
                       "mean": statistics.fmean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0}
    return out
