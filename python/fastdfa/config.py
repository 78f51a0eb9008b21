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
    conv_feedback   the older spelling for conv sites: "channel" means feedback_layout="per-feature"
    feedback_scale  multiplies the default feedback scale (> 0)
    batch_dims      leading dims treated as the batch (2 for [batch, tokens, ...])
    nonfinite       what a NaN/inf output error does: "raise", "skip" or "ignore"
    backend         None (FASTDFA_BACKEND, else "auto"), "auto", "torch", "triton" or "cuda"
    wgrad           kernel backends: "grouped" (one launch / a stream fan-out) or "per-layer"
    streams         cuda backend: side streams for the weight gradients (None: FASTDFA_STREAMS, else 4)
    feedback_lr     GrAPE: the alignment step size (> 0)
    perturb         GrAPE: "activation", "weight" or "auto"
    jvp             GrAPE: "per-site" (exact, K x N rows) or "shared" (one pass of N rows)
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, replace

MODES = ("bp", "fa", "dfa", "grape")
FEEDBACK_KINDS = ("uniform", "gaussian")
CONV_FEEDBACK = ("dense", "channel")
FEEDBACK_LAYOUTS = ("dense", "per-feature")
# What a NaN/inf output error does. "raise" and "skip" read the error on the host: one device sync per
# backward, which stalls the CPU's launch queue on a GPU; "ignore" checks nothing (BP's behaviour).
NONFINITE = ("raise", "skip", "ignore")
WGRAD = ("grouped", "per-layer")
BACKEND_CHOICES = ("auto", "torch", "triton", "cuda")
PERTURB = ("activation", "weight", "auto")
JVP = ("per-site", "shared")
STREAMS_ENV = "FASTDFA_STREAMS"
DEFAULT_STREAMS = 4  # side streams for the cuda backend's weight gradients (docs/kernels.md)


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

    def __post_init__(self):
        _choice("mode", self.mode, MODES)
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))  # numpy ints are accepted and stored as int
        _choice("feedback", self.feedback, FEEDBACK_KINDS)
        _choice("conv_feedback", self.conv_feedback, CONV_FEEDBACK)
        _choice("feedback_layout", self.feedback_layout, FEEDBACK_LAYOUTS)
        if self.conv_feedback == "channel":  # the conv spelling of per-feature feedback
            object.__setattr__(self, "feedback_layout", "per-feature")
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
    def config(self) -> DFAConfig:
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

    streams = _read("streams", "The cuda backend's stream pool size (``streams``, else FASTDFA_STREAMS, else 4).")
