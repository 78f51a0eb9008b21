"""``DFAConfig``: every option of ``fastdfa.DFA``, validated once, in one place.

The wrapper, the training loop (``fastdfa.lab.train.TrainConfig``) and the CLI
take their choices and their checks from here instead of repeating them: a
frozen dataclass whose ``__post_init__`` refuses a bad value with a message
that names the option, the value and the choices (torchao's
``float8/config.py`` pattern). Runtime-settable options (``mode``,
``feedback_lr``, ``nonfinite``) are changed with ``dataclasses.replace``, so a
new value is checked by the same code.

The options (docs/design.md section 2 has the reasons behind each):

    mode            "dfa", "fa", "bp" or "grape"
    seed            seeds every feedback matrix (site feedback, FA feedback_weight)
    feedback        "uniform" or "gaussian": variance feedback_scale**2 / n per site
    feedback_layout "dense" (one row per element of the site, tied to its shape) or "per-feature"
                    (one row per feature: the channel axis of a [C, H, W] site, the last axis of any
                    other, broadcast over the rest: tokens, space; such a site takes any length)
    conv_feedback   deprecated alias: "channel" means feedback_layout="per-feature" (warns)
    feedback_scale  multiplies the default feedback scale (> 0)
    batch_dims      leading dims treated as the batch (2 for [batch, tokens, ...])
    nonfinite       what a NaN/inf output error does: "raise", "skip" or "ignore"
    backend         None (FASTDFA_BACKEND, else "auto"), "auto", "torch", "triton" or "cuda"
    wgrad           kernel backends: "grouped" (one launch / a stream fan-out) or "per-layer"
    streams         cuda backend: side streams for the weight gradients (None: FASTDFA_STREAMS, else 4)
    feedback_lr     GrAPE: the alignment step size (> 0)
    perturb         GrAPE: "activation", "weight" or "auto"
    jvp             GrAPE: "per-site" (exact, K x N rows) or "shared" (one pass of N rows)
    error_at        where e is taken: None (the model's tensor output, or the module that returns a
                    ModelOutput's ``logits``) or a module name: e = dLoss/d(output of that module)
    head            a module name: it and everything after it train by BP; e = dLoss/d(its input)
    error_rank      None (the full error) or k: each site receives F_l (P e), P a fixed seeded [k, n_e]
                    random projection (rank-k feedback: n_e k + k R multiply-adds per row instead of n_e R)
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
from dataclasses import dataclass, fields, replace

MODES = ("bp", "fa", "dfa", "grape")
FEEDBACK_KINDS = ("uniform", "gaussian")
CONV_FEEDBACK = ("dense", "channel")
FEEDBACK_LAYOUTS = ("dense", "per-feature")
# What a NaN/inf output error does. "raise" and "skip" read the error on the host: one device sync per
# backward, which stalls the CPU's launch queue on a GPU; "ignore" checks nothing (BP's behaviour).
NONFINITE = ("raise", "skip", "ignore")
WGRAD = ("grouped", "per-layer")
BACKENDS = ("torch", "triton", "cuda")  # the backend names (fastdfa.backends dispatches on them)
BACKEND_CHOICES = ("auto",) + BACKENDS
PERTURB = ("activation", "weight", "auto")
JVP = ("per-site", "shared")
STREAMS_ENV = "FASTDFA_STREAMS"
DEFAULT_STREAMS = 4  # side streams for the cuda backend's weight gradients (docs/kernels.md)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _caller_level() -> int:
    """The ``stacklevel`` that points a warning at the user's line: past fastdfa's frames and the
    dataclass's generated ``__init__`` (file "<string>")."""
    frame, level = sys._getframe(2), 2
    while frame is not None and (frame.f_code.co_filename.startswith(_PACKAGE_DIR)
                                 or frame.f_code.co_filename == "<string>"):
        frame, level = frame.f_back, level + 1
    return level


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _positive_finite(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _int_at_least(name: str, value, low: int, what: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}{what}, got {value!r}")


def env_streams() -> int:
    """The stream pool size from ``FASTDFA_STREAMS`` (default 4)."""
    value = os.environ.get(STREAMS_ENV, str(DEFAULT_STREAMS))
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{STREAMS_ENV} must be an int >= 1, got {value!r}") from None


@dataclass(frozen=True)
class DFAConfig:
    """The options of ``fastdfa.DFA`` (see the module docstring), checked on construction."""

    mode: str = "dfa"
    seed: int = 0
    feedback: str = "uniform"
    conv_feedback: str = "dense"
    feedback_layout: str = "dense"
    feedback_scale: float = 1.0
    batch_dims: int = 1
    nonfinite: str = "raise"
    backend: str | None = None
    wgrad: str = "grouped"
    streams: int | None = None
    feedback_lr: float = 0.5
    perturb: str = "activation"
    jvp: str = "per-site"
    error_at: str | None = None
    head: str | None = None
    error_rank: int | None = None

    def __post_init__(self):
        _choice("mode", self.mode, MODES)
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))  # numpy ints are accepted and stored as int
        _choice("feedback", self.feedback, FEEDBACK_KINDS)
        _choice("conv_feedback", self.conv_feedback, CONV_FEEDBACK)
        _choice("feedback_layout", self.feedback_layout, FEEDBACK_LAYOUTS)
        if self.conv_feedback == "channel":  # the older conv spelling of per-feature feedback
            warnings.warn('conv_feedback="channel" is deprecated: use feedback_layout="per-feature" (the same '
                          'feedback, for every site kind)', DeprecationWarning, stacklevel=_caller_level())
            object.__setattr__(self, "feedback_layout", "per-feature")
            object.__setattr__(self, "conv_feedback", "dense")  # folded: a later replace() does not warn again
        _positive_finite("feedback_scale", self.feedback_scale)
        _int_at_least("batch_dims", self.batch_dims, 1)
        _choice("nonfinite", self.nonfinite, NONFINITE)
        if self.backend is not None and self.backend not in BACKEND_CHOICES:
            raise ValueError(f"unknown backend {self.backend!r}; backend must be one of {BACKEND_CHOICES}")
        _choice("wgrad", self.wgrad, WGRAD)
        if self.streams is not None:
            _int_at_least("streams", self.streams, 1, " (1: no side streams)")
        _positive_finite("feedback_lr", self.feedback_lr)
        _choice("perturb", self.perturb, PERTURB)
        _choice("jvp", self.jvp, JVP)
        for name in ("error_at", "head"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a module name (as in model.named_modules()) or None, got {value!r}")
        if self.error_rank is not None:
            _int_at_least("error_rank", self.error_rank, 1, " (None: the full error)")
        if self.error_at is not None and self.head is not None:
            raise ValueError(f"give error_at= or head=, not both (error_at={self.error_at!r}, head={self.head!r}): "
                             "head=NAME already takes the error at the input of NAME")

    @classmethod
    def from_options(cls, config: "DFAConfig | None" = None, **overrides) -> "DFAConfig":
        """``config`` (default: all defaults) with ``overrides`` applied, checked once; an unknown option
        raises naming the close ones (the one path every entry point builds its config by)."""
        if config is not None and not isinstance(config, DFAConfig):
            raise TypeError(f"config must be a fastdfa.DFAConfig or None, got {type(config).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = [k for k in overrides if k not in names]
        if unknown:
            import difflib
            hints = {k: difflib.get_close_matches(k, names, n=2) for k in unknown}
            said = "; ".join(f"{k!r}" + (f" (did you mean {', '.join(map(repr, h))}?)" if h else "")
                             for k, h in hints.items())
            raise TypeError(f"unknown fastdfa.DFA option(s) {said}; the options are {names}")
        return cls(**overrides) if config is None else replace(config, **overrides)

    @property
    def stream_count(self) -> int:
        """``streams``, or ``FASTDFA_STREAMS`` (default 4) when None; checked like ``streams``."""
        n = env_streams() if self.streams is None else self.streams
        _int_at_least("streams", n, 1, " (1: no side streams)")
        return n


def _read(name: str, doc: str = "") -> property:
    return property(lambda self: getattr(self._config, name), doc=doc)


def _settable(name: str, doc: str) -> property:
    def set_(self, value) -> None:
        self._config = replace(self._config, **{name: value})  # checked by DFAConfig.__post_init__
    return property(lambda self: getattr(self._config, name), set_, doc=doc)


class WrapperOptions:
    """The options of a wrapper that holds a ``DFAConfig`` in ``self._config``, as attributes.

    ``mode``, ``feedback_lr`` and ``nonfinite`` can be set at any time (the new value is checked like
    the constructor's); the others are fixed when the wrapper is built.
    """

    _config: DFAConfig

    @property
    def dfa_config(self) -> DFAConfig:
        """The options in force (a frozen ``DFAConfig``)."""
        return self._config

    mode = _settable("mode", "'dfa', 'fa', 'bp' or 'grape'; settable at any time.")
    feedback_lr = _settable("feedback_lr", "GrAPE's alignment step size; settable.")
    nonfinite = _settable("nonfinite", "What a NaN/inf output error does: 'raise', 'skip' or 'ignore'; settable.")
    seed = _read("seed")
    feedback_kind = _read("feedback", "'uniform' or 'gaussian'")
    conv_feedback = _read("conv_feedback")
    feedback_layout = _read("feedback_layout", "'dense' or 'per-feature' (see fastdfa.DFAConfig)")
    feedback_scale = _read("feedback_scale")
    batch_dims = _read("batch_dims")
    wgrad = _read("wgrad")
    perturb = _read("perturb")
    jvp = _read("jvp")
    error_at = _read("error_at", "The module whose output the error is taken at (None: the model's output).")
    head = _read("head", "The module trained by BP, with everything after it; the error is taken at its input.")
    error_rank = _read("error_rank", "k: the error is compressed to P e (P fixed, [k, n_e]) before the feedback.")

    streams = _read("streams", "The cuda backend's stream pool size (``streams``, else FASTDFA_STREAMS, else 4).")
