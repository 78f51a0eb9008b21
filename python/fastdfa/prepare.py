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

    A causal LM (a Hugging Face model that generates, not an encoder-decoder) given none of ``batch_dims``,
    ``head``, ``error_at``, ``error_rank``, ``sites``, ``targets`` or ``config`` gets ``CAUSAL_LM_DEFAULT``:
    each token's error (``batch_dims=2``) taken at the LM head's input (``head=`` its output embeddings),
    compressed to rank 32 (``error_rank=32``), every other linear map a DFA site; the choice and its
    measurements are in docs/results.md. Any of those options given: exactly what was asked, nothing
    added.

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
    if config is None and sites is None and targets == ALL_LINEAR and not RULE_SHAPE & options.keys():
        options = {**causal_lm_defaults(model), **options}
    resolved = DFAConfig.from_options(config, **options)  # a bad option raises before any conversion
    if resolved.error_at is not None or resolved.head is not None:
        from_config(model, resolved.error_at, resolved.head)  # so does a bad module name
    names = convert_targets(model, targets, exclude, resolved.head)  # and a bad target (checked first)
    wrapper = DFA(model, resolved, sites=sites, example_input=example_input)
    # saved by save_pretrained: the names converted, so a reload converts exactly these
    wrapper.conversion = {"targets": names, "exclude": [], "head": resolved.head}
    return wrapper


# What a causal LM gets when prepare is given none of the options that shape the rule (RULE_SHAPE, nor
# sites=, targets= or config=): chosen from the GPT-2 table of docs/results.md ("A GPT-2-shaped LM with a
# real vocabulary"), the best test perplexity at equal wall time (548.0 against 552.0 for the full
# head-input error, 3 seeds, in 0.94 of BP's step against 0.97); head=True names the model's output
# embeddings (its LM head).
CAUSAL_LM_DEFAULT = {"batch_dims": 2, "head": True, "error_rank": 32}
RULE_SHAPE = {"batch_dims", "head", "error_at", "error_rank"}


def is_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face decoder LM: it generates (``GenerationMixin``), is not an encoder-decoder, and has
    output embeddings (its LM head). Read from the classes' names: transformers is not imported here."""
    generates = any(c.__name__ == "GenerationMixin" for c in type(model).__mro__)
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    head = getattr(model, "get_output_embeddings", None)
    return generates and not encoder_decoder and callable(head) and isinstance(head(), nn.Module)


def causal_lm_defaults(model: nn.Module) -> dict:
    """``CAUSAL_LM_DEFAULT`` for a causal LM (``head`` resolved to its output embeddings' name), else {}."""
    if not is_causal_lm(model):
        return {}
    defaults = dict(CAUSAL_LM_DEFAULT)
    if defaults.get("head") is True:
        head = model.get_output_embeddings()
        defaults["head"] = next(n for n, m in model.named_modules() if m is head)
    return defaults


def _directory(model: nn.Module):
    return getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)


def _saved_record(model: nn.Module):
    """The fastdfa record of the directory ``model`` was loaded from, if ``DFA.save_pretrained`` wrote one."""
    directory = _directory(model)
    if not isinstance(directory, str) or not os.path.isdir(directory):
        return None
    return read_record(directory)
