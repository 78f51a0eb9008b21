"""The training loop behind ``python -m fastdfa train`` and ``compare``."""

from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MODES, DFAConfig
from ..dfa import DFA
from ..engine.error_point import error_tensor
from ..feedback import seeded_generator
from ..grape import CALIBRATE_SCALES, calibration_step
from ..graphs import CapturedStep
from ..metrics import alignment_summary, gradient_alignment, weight_alignment
from ..models import TRANSFORMER_SITES, make_model, make_transformer_lm
from ..targets import convert_targets
from .data import Dataset

METHODS = MODES  # every mode of fastdfa.DFA is a training method
# Adam step sizes. FA and DFA updates are not gradients of the loss and were
# unstable at BP's 1e-3: on Fashion-MNIST (784-256-256-256-10, ReLU) DFA's
# training loss rose after epoch 3 and test accuracy swung between 0.80 and
# 0.85; at 3e-4 it fell steadily (0.853 after 5 epochs).
DEFAULT_LR = {"bp": 1e-3, "fa": 3e-4, "dfa": 3e-4, "grape": 3e-4}
LM_MODELS = ("transformer", "gpt2")  # models trained on text, with per-token outputs (batch_dims=2)
LM_FIELDS = ("sites", "context", "d_model", "heads", "layers", "error_point")  # TrainConfig fields of the LM only
ERROR_POINTS = ("logits", "head")  # gpt2: the error at the LM head's output, or at its input (the head by BP)


def logits_of(output) -> torch.Tensor:
    """The logits of a model's output: the tensor itself, or a Hugging Face ``ModelOutput``'s ``logits``."""
    return output if isinstance(output, torch.Tensor) else error_tensor(output)


def make_gpt2_lm(vocab: int, context: int, d_model: int, heads: int, layers: int) -> nn.Module:
    """transformers' ``GPT2LMHeadModel`` from a ``GPT2Config`` of these sizes (random init, dropout 0.1 as
    GPT-2's), the LM head tied to the input embedding as GPT-2's is."""
    try:
        import transformers
    except ImportError:
        raise ImportError("--model gpt2 needs Hugging Face transformers: "
                          "pip install -r requirements-test.txt") from None
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=vocab, n_positions=context, n_embd=d_model, n_head=heads, n_layer=layers,
        bos_token_id=0, eos_token_id=0))


def token_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every token: logits ``[B, T, V]``, targets ``[B, T]``."""
    return F.cross_entropy(logits.flatten(0, -2), target.flatten())


@dataclass
class TrainConfig:
    method: str = "dfa"
    model: str = "mlp"
    hidden: tuple[int, ...] = (256, 256, 256)
    activation: str = "relu"
    epochs: int = 10
    batch_size: int = 128
    lr: float | None = None  # None: DEFAULT_LR[method]
    optimizer: str = "adam"
    weight_decay: float = 0.0
    seed: int = 0
    feedback: str = "uniform"
    conv_feedback: str = "dense"
    feedback_layout: str = "dense"   # "per-feature": one row per feature, broadcast over tokens / space
    device: str = "cpu"
    backend: str | None = None  # None: FASTDFA_BACKEND or "auto" (fastdfa.backends)
    log_alignment: bool = False  # WA and GA after every epoch (fastdfa.metrics), for fa, dfa and grape
    # GrAPE (method "grape", fastdfa.grape)
    feedback_lr: float = 0.5
    perturb: str = "activation"
    jvp: str = "per-site"
    calibrate_every: int = 0         # one exact-BP batch every T epochs (0: never)
    calibrate_every_steps: int = 0   # every N-th training step runs exact BP instead of the rule (0: never)
    calibrate_below: float | None = None  # adaptive: one BP batch whenever the mean GA drops below this
    check_every: int = 50            # steps between GA checks for calibrate_below
    calibrate_scale: str = "raw"     # "rule": each BP gradient rescaled to the rule's norm (fastdfa.grape.calibrate)
    cuda_graph: bool = False         # each rule step captured once and replayed (fastdfa.CapturedStep; CUDA only)
    # the transformer LM (model "transformer", text data; fastdfa.models.TransformerLM)
    sites: str = "blocks"            # "blocks": DFA between blocks; "layers": at every attention / MLP sub-layer
    context: int = 64                # characters per training window (the data's windows; the position table)
    d_model: int = 128
    heads: int = 4
    layers: int = 2
    error_point: str = "logits"      # gpt2: "logits" (the LM head's output) or "head" (its input; the head by BP)
    error_rank: int | None = None    # k: the error compressed by a fixed P [k, n_e] (fastdfa.DFAConfig.error_rank)
    eval_every: int = 0              # LM: a test evaluation every N training steps too (0: after each epoch only)

    @property
    def effective_lr(self) -> float:
        return DEFAULT_LR[self.method] if self.lr is None else self.lr

    @property
    def is_lm(self) -> bool:
        return self.model in LM_MODELS

    @property
    def loss_fn(self):
        """Cross-entropy over classes, or over every token for the LM."""
        return token_cross_entropy if self.is_lm else F.cross_entropy

    def dfa_config(self) -> DFAConfig:
        """The wrapper's options, validated by ``fastdfa.DFAConfig`` (the one place they are checked).
        The LM's outputs are per token: ``batch_dims=2``, each token's error projected to that token."""
        return DFAConfig(mode=self.method, seed=self.seed, feedback=self.feedback, conv_feedback=self.conv_feedback,
                         feedback_layout=self.feedback_layout, batch_dims=2 if self.is_lm else 1,
                         backend=self.backend, feedback_lr=self.feedback_lr, perturb=self.perturb, jvp=self.jvp,
                         head="lm_head" if self.model == "gpt2" and self.error_point == "head" else None,
                         error_rank=self.error_rank)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        self.dfa_config()
        check_device(self.device)
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be a positive integer, "
                                 f"got {getattr(self, name)!r}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr (--lr) must be a positive number, got {self.lr!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        for name, low in (("calibrate_every", 0), ("calibrate_every_steps", 0), ("check_every", 1),
                          ("eval_every", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be an integer >= {low}, "
                                 f"got {getattr(self, name)!r}")
        if self.calibrate_below is not None and not -1 <= self.calibrate_below <= 1:
            raise ValueError(f"calibrate_below (--calibrate-below) is a gradient alignment in [-1, 1], "
                             f"got {self.calibrate_below!r}")
        if self.cuda_graph and not str(self.device).startswith("cuda"):
            raise ValueError(f"cuda_graph replays CUDA graphs and needs a CUDA device, got device {self.device!r}")
        if self.calibrate_scale not in CALIBRATE_SCALES:
            raise ValueError(f"calibrate_scale must be one of {CALIBRATE_SCALES}, got {self.calibrate_scale!r}")
        calibrates = self.calibrate_every or self.calibrate_every_steps or self.calibrate_below is not None
        if calibrates and self.method not in ("dfa", "grape", "fa"):
            raise ValueError(f"calibration re-anchors fa, dfa or grape with BP steps; method is {self.method!r}")
        if self.sites not in TRANSFORMER_SITES:
            raise ValueError(f"sites must be one of {TRANSFORMER_SITES}, got {self.sites!r}")
        if self.eval_every and not self.is_lm:
            raise ValueError(f"eval_every (--eval-every) evaluates an LM's test perplexity; --model {self.model} "
                             "is evaluated after each epoch")
        if self.error_point not in ERROR_POINTS:
            raise ValueError(f"error_point (--error-point) must be one of {ERROR_POINTS}, got {self.error_point!r}")
        if self.error_point != "logits" and self.model != "gpt2":
            raise ValueError(f"--error-point {self.error_point} takes the error at the LM head's input of --model "
                             f"gpt2; --model {self.model} takes it at its logits")
        if self.is_lm:
            for name in ("context", "d_model", "heads", "layers"):
                if getattr(self, name) < 1:
                    raise ValueError(f"{name} (--{name.replace('_', '-')}) must be a positive integer, "
                                     f"got {getattr(self, name)!r}")
            if self.d_model % self.heads:
                raise ValueError(f"d_model (--d-model {self.d_model}) must be a multiple of heads "
                                 f"(--heads {self.heads})")


def check_device(device) -> torch.device:
    """``device`` as a torch.device, or a ValueError that says why it cannot be used here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a torch device ({exc}); use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = (f"this torch ({torch.__version__}) is a CPU build" if torch.version.cuda is None
               else "no CUDA GPU is visible")
        raise ValueError(f"device {device!r}: {why}; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: fastdfa trains on cpu or cuda")
    return dev


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    test_accuracy: float
    step_ms_mean: float
    step_ms_median: float
    seconds: float
    alignment: dict | None = None  # {"weight": {layer: WA}, "gradient": {layer: GA}} with log_alignment
    test_loss: float | None = None  # LM: mean per-character cross-entropy (nats) on the test text


@dataclass
class TrainResult:
    config: dict
    dataset: str
    test_accuracy: float
    epochs: list[EpochResult] = field(default_factory=list)
    skipped_steps: int = 0
    calibrations: list = field(default_factory=list)  # (epoch, step, reason) of every BP calibration batch
    initial_alignment: dict | None = None  # WA / GA before the first step, with log_alignment
    alignment_steps: list = field(default_factory=list)  # {"step", "weight", "gradient"} every N steps (finetune_hf)
    # LM with eval_every: {"step", "tokens", "train_seconds", "test_loss"} every N steps and after each epoch;
    # train_seconds sums the timed steps only (no evaluation), the x axis of a perplexity-against-time curve
    evals: list = field(default_factory=list)
    prepared: object = None                # what train(prepare=...) returned (e.g. the FWM report)
    # LM only (test_accuracy is then the next-character accuracy): exp of the mean per-character
    # cross-entropy on the held-out text, and that cross-entropy in bits
    test_perplexity: float | None = None
    bits_per_character: float | None = None
    model: object = field(default=None, repr=False)
    optimizer: object = field(default=None, repr=False)

    @property
    def step_ms_median(self) -> float:
        """Median step time over all epochs after the first (the first holds warm-up)."""
        tail = self.epochs[1:] or self.epochs
        return statistics.median(e.step_ms_median for e in tail)

    def to_json(self) -> dict:
        # Field by field: asdict() would deep-copy the model and optimizer it then drops.
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("model", "optimizer")}
        lm_only = ("test_perplexity", "bits_per_character", "test_loss")  # absent for image tasks
        out = {k: v for k, v in out.items() if not (k in lm_only and v is None)}
        out["epochs"] = [{k: v for k, v in asdict(e).items() if not (k in lm_only and v is None)}
                         for e in self.epochs]
        if isinstance(self.prepared, list):
            out["prepared"] = [p.to_dict() if hasattr(p, "to_dict") else p for p in self.prepared]
        out["step_ms_median"] = self.step_ms_median
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    model.train(was_training)
    return correct / len(x)


EVAL_LOGITS = 2 ** 24  # logits per evaluation batch (64 MiB of float32): 512 windows of 64 characters x 82,
# but a 16,384-token vocabulary would make the same 512 windows a 2.1 GB logits tensor (4.3 GB in float64)


@torch.no_grad()
def evaluate_lm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> tuple[float, float]:
    """``(mean cross-entropy in nats, next-token accuracy)`` over every target token of ``y`` ``[N, T]``
    (summed in float64). ``exp`` of the first is the perplexity; divided by ln 2, bits per token. The batch
    is cut so that it holds at most ``EVAL_LOGITS`` logits."""
    was_training = model.training
    model.eval()
    total, correct = 0.0, 0
    if len(x):
        vocab = logits_of(model(x[:1])).shape[-1]
        batch_size = max(1, min(batch_size, EVAL_LOGITS // max(1, y[:1].numel() * vocab)))
    for i in range(0, len(x), batch_size):
        logits, target = logits_of(model(x[i:i + batch_size])), y[i:i + batch_size]
        # per token in the logits' precision, summed in float64: a float64 copy of the logits would cost
        # 8 bytes x 115,401 tokens x 16,384 = 15 GB of traffic per evaluation of the austen-bpe test text
        per_token = F.cross_entropy(logits.flatten(0, -2), target.flatten(), reduction="none")
        total += float(per_token.sum(dtype=torch.float64))
        correct += int((logits.argmax(-1) == target).sum())
    model.train(was_training)
    return total / y.numel(), correct / y.numel()


def build(config: TrainConfig, data: Dataset, model: nn.Module | None = None) -> tuple[DFA, torch.optim.Optimizer]:
    """Model (seeded by config.seed: the same init for every method; or ``model``, e.g. a pretrained
    one), wrapper and optimizer."""
    torch.manual_seed(config.seed)
    text = getattr(data, "is_text", False)
    if text != config.is_lm:
        raise ValueError(f"{data.name} is text: train it with --model transformer" if text else
                         f"--model {config.model} is a character LM: train it on text (--data austen), "
                         f"not on {data.name}")
    sites = None
    if model is None:
        if config.model == "gpt2":
            model = make_gpt2_lm(data.n_classes, data.context, config.d_model, config.heads, config.layers)
        elif config.is_lm:
            model = make_transformer_lm(data.n_classes, data.context, config.d_model, config.heads, config.layers)
        else:
            model = make_model(config.model, data.input_shape, data.n_classes, config.hidden, config.activation)
    if config.model == "gpt2":
        sites = _gpt2_sites(model, config)
    elif config.is_lm:
        sites = model.sites(config.sites)
    # On the device before wrapping: an explicitly requested backend is checked against it.
    model = model.to(config.device)
    dfa = DFA.from_config(model, config.dfa_config(), sites=sites).to(config.device)
    dfa.build(data.x_train[:2].to(config.device))
    if config.optimizer == "adam":
        # capturable: the step count stays on the GPU, so a replayed graph advances it (fastdfa.CapturedStep)
        opt = torch.optim.Adam(dfa.parameters(), lr=config.effective_lr, weight_decay=config.weight_decay,
                               **({"capturable": True} if config.cuda_graph else {}))
    else:
        opt = torch.optim.SGD(dfa.parameters(), lr=config.effective_lr, momentum=0.9,
                              weight_decay=config.weight_decay)
    return dfa, opt


def _gpt2_sites(model: nn.Module, config: TrainConfig):
    """gpt2's DFA sites: "blocks" names the blocks (their Conv1D left alone), "layers" converts every Conv1D
    (each a site); the LM head is converted (the output layer) unless the error is taken at its input."""
    head = config.error_point == "head"
    if config.sites == "layers":
        convert_targets(model, "all-linear", head="lm_head" if head else None)
        return None
    if not head:
        convert_targets(model, ["lm_head"])
    return list(model.transformer.h)


def train_step(dfa: DFA, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               loss_fn=F.cross_entropy) -> torch.Tensor:
    """zero_grad, forward, loss (cross-entropy), backward, optimizer step; returns the loss."""
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(logits_of(dfa(x)), y)
    loss.backward()
    opt.step()
    return loss


def make_step(dfa: DFA, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, batch_size: int,
              seed: int = 0, loss_fn=F.cross_entropy):
    """A training step on batch ``r`` of a fixed seeded order (the same batches for every method)."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).to(x.device)
    n_batches = max(1, len(x) // batch_size)

    def step(r: int) -> None:
        idx = order[(r % n_batches) * batch_size:(r % n_batches + 1) * batch_size]
        train_step(dfa, opt, x[idx], y[idx], loss_fn)

    return step


ALIGNMENT_SAMPLES = 256  # the fixed training batch WA/GA logging measures GA on


def _eval_point(dfa, x_test, y_test, step: int, tokens: int, train_seconds: float, log, data) -> dict:
    """A mid-epoch point of the perplexity curve (``eval_every``): the whole test text, as at an epoch's end."""
    test_loss, _ = evaluate_lm(dfa, x_test, y_test)
    if log is not None:
        log(f"     step {step:>6}  {tokens:>9,} tokens  {train_seconds:8.1f} s training  "
            f"test ppl {math.exp(test_loss):.3f}  bpc {data.bits_per_character(test_loss):.4f}")
    return {"step": step, "tokens": tokens, "train_seconds": train_seconds,
            "test_loss": test_loss}


def _calibrate(dfa: DFA, opt, x_train, y_train, config: TrainConfig, gen: torch.Generator) -> None:
    """GrAPE's calibration: one exact-BP step on one random batch (``fastdfa.grape.calibrate``)."""
    idx = torch.randperm(len(x_train), generator=gen)[:config.batch_size].to(x_train.device)
    calibration_step(dfa, opt, x_train[idx], y_train[idx], config.loss_fn, scale=config.calibrate_scale)


def measure_alignment(dfa: DFA, x: torch.Tensor, y: torch.Tensor, loss_fn=F.cross_entropy) -> dict:
    """WA per layer and GA per layer on (x, y) (fastdfa.metrics); leaves the model as it was."""

    return {"weight": weight_alignment(dfa), "gradient": gradient_alignment(dfa, x, y, loss_fn)}


def train(config: TrainConfig, data: Dataset, progress: bool | None = None, log=print,
          model: nn.Module | None = None, prepare=None) -> TrainResult:
    """Train with ``config.method``; per epoch: train loss, test accuracy, step times
    (and WA / GA with ``config.log_alignment``).

    ``model``: start from this network (fine-tuning) instead of a fresh one.
    ``prepare(dfa)``: called once the wrapper is built, before the first step
    (e.g. ``fastdfa.init.feedback_weight_matching``); its return value is kept
    in ``result.prepared``. A step is forward, loss, backward and optimizer
    step, timed with ``time.perf_counter`` (after ``torch.cuda.synchronize``
    on a GPU).
    """
    from tqdm.auto import tqdm

    config.validate()
    device = torch.device(config.device)
    if progress is None:
        progress = sys.stderr.isatty()
    dfa, opt = build(config, data, model)
    prepared = prepare(dfa) if prepare is not None else None
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    gen = torch.Generator().manual_seed(config.seed)
    # Calibration batches come from their own stream, so a calibrated run sees the data in the same
    # order as the uncalibrated run of its seed and the two differ only by the BP steps.
    calibration_gen = seeded_generator(config.seed, "calibration")
    recorded = {k: v for k, v in asdict(config).items() if config.is_lm or k not in LM_FIELDS}
    result = TrainResult(config={**recorded, "lr": config.effective_lr}, dataset=data.name,
                         test_accuracy=0.0, prepared=prepared)
    n = len(x_train)
    loss_fn = config.loss_fn
    log_alignment = config.log_alignment and config.method in ("fa", "dfa", "grape")
    x_align, y_align = x_train[:ALIGNMENT_SAMPLES], y_train[:ALIGNMENT_SAMPLES]
    if log_alignment:
        result.initial_alignment = measure_alignment(dfa, x_align, y_align, loss_fn)
    steps_done = 0  # over all epochs, for calibrate_every_steps
    train_seconds = 0.0  # the timed steps only: the x axis of result.evals
    tokens_per_window = y_train[0].numel() if config.is_lm and len(y_train) else 0
    captured = None
    if config.cuda_graph:
        captured = CapturedStep(dfa, opt, loss_fn)  # the last partial batch gets its own graph
    for epoch in range(1, config.epochs + 1):
        dfa.train()
        order = torch.randperm(n, generator=gen).to(device)
        step_ms, losses = [], []
        start = time.perf_counter()
        batches = range(0, n, config.batch_size)
        bar = tqdm(batches, desc=f"{config.method} epoch {epoch}/{config.epochs}", disable=not progress,
                   leave=False, unit="step")
        for i in bar:
            idx = order[i:i + config.batch_size]
            xb, yb = x_train[idx], y_train[idx]
            _sync(device)
            t0 = time.perf_counter()
            steps_done += 1
            # sparse BP: every N-th step takes its own batch with exact BP instead of the rule, so the
            # number of steps and the data seen are those of the uncalibrated run
            bp_step = config.calibrate_every_steps and steps_done % config.calibrate_every_steps == 0
            if bp_step:
                loss = calibration_step(dfa, opt, xb, yb, loss_fn, scale=config.calibrate_scale)
            elif captured is not None:
                loss = captured(xb, yb)
            else:
                loss = train_step(dfa, opt, xb, yb, loss_fn)
            _sync(device)
            step_ms.append((time.perf_counter() - t0) * 1e3)
            train_seconds += step_ms[-1] / 1e3
            losses.append(loss.detach())
            if config.eval_every and steps_done % config.eval_every == 0 and i + config.batch_size < n:
                windows_seen = (epoch - 1) * n + i + len(idx)
                result.evals.append(_eval_point(dfa, x_test, y_test, steps_done, windows_seen * tokens_per_window,
                                                train_seconds, log, data))
            if bp_step:
                result.calibrations.append((epoch, len(losses), f"every {config.calibrate_every_steps} steps"))
            if config.calibrate_below is not None and len(losses) % config.check_every == 0:
                ga = alignment_summary(gradient_alignment(dfa, x_align, y_align, loss_fn))
                if ga < config.calibrate_below:  # event-driven: re-anchor when the rule drifts from BP
                    _calibrate(dfa, opt, x_train, y_train, config, calibration_gen)
                    result.calibrations.append((epoch, len(losses), f"GA {ga:.3f} < {config.calibrate_below}"))
            if progress and len(losses) % 20 == 0:
                bar.set_postfix(loss=f"{float(losses[-1]):.4f}")
        bar.close()
        if config.calibrate_every and epoch % config.calibrate_every == 0:
            _calibrate(dfa, opt, x_train, y_train, config, calibration_gen)
            result.calibrations.append((epoch, len(losses), f"every {config.calibrate_every} epochs"))
        seconds = time.perf_counter() - start
        test_loss = None
        if config.is_lm:
            test_loss, acc = evaluate_lm(dfa, x_test, y_test)
        else:
            acc = evaluate(dfa, x_test, y_test)
        alignment = measure_alignment(dfa, x_align, y_align, loss_fn) if log_alignment else None
        epoch_result = EpochResult(epoch, float(torch.stack(losses).mean()), acc, statistics.fmean(step_ms),
                                   statistics.median(step_ms), seconds, alignment, test_loss)
        result.epochs.append(epoch_result)
        if config.eval_every:  # the epoch's end is a point of the curve too
            result.evals.append({"step": steps_done, "tokens": epoch * n * tokens_per_window,
                                 "train_seconds": train_seconds, "test_loss": test_loss})
        if log is not None:
            extra = ""
            if test_loss is not None:
                extra = f"  test ppl {math.exp(test_loss):.3f}  bpc {data.bits_per_character(test_loss):.4f}"
            if alignment is not None:
                extra += (f"  WA {alignment_summary(alignment['weight']):.3f}"
                         f"  GA {alignment_summary(alignment['gradient']):.3f}")
            log(f"{config.method:>4} epoch {epoch:>3}/{config.epochs}  loss {epoch_result.train_loss:.4f}  "
                f"test acc {acc:.4f}  step {epoch_result.step_ms_mean:.2f} ms mean, "
                f"{epoch_result.step_ms_median:.2f} median{extra}")
    result.test_accuracy = result.epochs[-1].test_accuracy
    if config.is_lm:
        result.test_perplexity = math.exp(result.epochs[-1].test_loss)
        # per character, not per token: for subword data (austen-bpe) tokens x nats / characters / ln 2
        result.bits_per_character = data.bits_per_character(result.epochs[-1].test_loss)
    result.skipped_steps = dfa.skipped_steps
    result.model, result.optimizer = dfa, opt  # for side-by-side timing after training
    return result
