"""``fastdfa.prepare``: one call from a model (a Hugging Face one included) to a wrapper that trains by DFA.

PEFT's ``get_peft_model`` and torchao's ``quantize_`` are the pattern: name what to convert, convert
it in place, wrap, return the wrapper; the user's training script (``loss.backward()``, any optimizer,
``transformers.Trainer``, an Accelerate loop) stays as it was.
"""

from __future__ import annotations

import os

from torch import nn

from .config import DFAConfig
from .dfa import DFA
from .engine.error_point import from_config
from .pretrained import STATE_FILE, read_record, restore
from .targets import ALL_LINEAR, convert_targets

__all__ = ["prepare"]


def prepare(model: nn.Module, config: DFAConfig | None = None, *, targets=ALL_LINEAR, exclude=(),
            sites: list[nn.Module] | None = None, example_input=None, **options) -> DFA:
    """Convert ``model``'s targeted modules to fastdfa layers (in place) and return ``fastdfa.DFA`` on it.

    ``targets`` / ``exclude``: which modules are converted (``fastdfa.targets``: ``"all-linear"``, a
    regex, names or suffixes, a filter ``(module, name) -> bool``; ``exclude`` also takes types).
    ``config`` and ``options``: the wrapper's options (``fastdfa.DFAConfig``; ``options`` override
    ``config``). With ``head=NAME`` the head is not converted: it trains by BP, and the error is taken
    at its input.

    A model loaded with ``from_pretrained`` from a directory that ``DFA.save_pretrained`` wrote (its
    ``name_or_path``) gets that directory's options, conversion and feedback back, so
    ``prepare(AutoModel.from_pretrained(dir))`` resumes the same training state; ``config`` and
    ``options`` given here override the saved options.

    Everything is checked before the model is changed: a bad option, target or head name raises and
    leaves the model as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare() takes an nn.Module, got {type(model).__name__}")
    if isinstance(model, DFA):
        raise TypeError("the model is already a fastdfa.DFA wrapper; prepare its .model, or use it as it is")
    record = _saved_record(model)
    if record is not None:
        overrides = {} if config is None else {f: getattr(config, f) for f in DFAConfig.__dataclass_fields__}
        overrides.update(options)
        wrapper = restore(DFA, model, record, overrides)
        from safetensors.torch import load_file  # a dependency of transformers: only HF directories get here
        wrapper.load_fastdfa_state(load_file(os.path.join(_directory(model), STATE_FILE)))
        return wrapper
    resolved = DFAConfig.from_options(config, **options)  # a bad option raises before any conversion
    if resolved.error_at is not None or resolved.head is not None:
        from_config(model, resolved.error_at, resolved.head)  # so does a bad module name
    names = convert_targets(model, targets, exclude, resolved.head)  # and a bad target (checked first)
    wrapper = DFA(model, resolved, sites=sites, example_input=example_input)
    # saved by save_pretrained: the names converted, so a reload converts exactly these
    wrapper.conversion = {"targets": names, "exclude": [], "head": resolved.head}
    return wrapper


def _directory(model: nn.Module):
    return getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)


def _saved_record(model: nn.Module):
    """The fastdfa record of the directory ``model`` was loaded from, if ``DFA.save_pretrained`` wrote one."""
    directory = _directory(model)
    if not isinstance(directory, str) or not os.path.isdir(directory):
        return None
    return read_record(directory)
