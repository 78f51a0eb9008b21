"""Which modules ``fastdfa.prepare`` converts: ``targets`` and ``exclude``, PEFT's way of naming them.

``targets``:
  * ``"all-linear"``: every module ``fastdfa.convert`` can convert (``nn.Linear``, ``nn.Conv1d``,
    ``nn.Conv2d``, Hugging Face's ``Conv1D`` and any type given to ``fastdfa.register_conversion``),
    the output layer included: it is DFA's output layer (PEFT's "all-linear" leaves the output layer
    out because PEFT does not train it; here it is trained, with ``e``);
  * any other string: a regular expression that a module's qualified name must match in full
    (``re.fullmatch``), e.g. ``r".*\\.(c_attn|c_proj)"``;
  * a list of strings: each an exact qualified name or a name suffix (``"q_proj"`` matches
    ``model.layers.0.self_attn.q_proj``);
  * a callable ``filter_fn(module, name) -> bool`` (torchao's ``quantize_`` filter).
Of the modules a regex, a suffix or a filter selects, the convertible ones are converted; an exact
name that is not convertible, or a selection with no convertible module, raises.

``exclude`` takes the same forms (no "all-linear") and ``nn.Module`` subclasses; ``head=NAME`` excludes
NAME and everything in it (the head trains by BP).
"""

from __future__ import annotations

import difflib
import re

from torch import nn

from .convert import convert, convertible, split_names_and_types

ALL_LINEAR = "all-linear"


def _matcher(spec, option: str):
    """``(names, modules) -> selected names`` for one ``targets`` / ``exclude`` value, and whether an exact
    name was given (exact names must exist and be convertible)."""
    if callable(spec) and not isinstance(spec, type):
        return (lambda name, module: bool(spec(module, name))), ()
    if isinstance(spec, type):
        spec = [spec]
    if isinstance(spec, str):
        try:
            pattern = re.compile(spec)
        except re.error as err:
            raise ValueError(f"{option}={spec!r} is not a valid regular expression ({err}); give a list of "
                             f"module names for exact names") from None
        return (lambda name, module: pattern.fullmatch(name) is not None), ()
    names, types = split_names_and_types(spec, option)

    def match(name: str, module: nn.Module) -> bool:
        return (any(name == n or name.endswith("." + n) for n in names)
                or (bool(types) and isinstance(module, types)))
    return match, tuple(names)


def select(model: nn.Module, targets=ALL_LINEAR, exclude=(), head: str | None = None) -> list[str]:
    """The qualified names of the modules to convert (see the module docstring); raises before any change."""
    modules = [(n, m) for n, m in model.named_modules() if n]
    by_name = dict(modules)
    if isinstance(exclude, str) and exclude == ALL_LINEAR:
        raise ValueError("exclude='all-linear' would convert nothing; give the names or types to leave alone")
    if targets == ALL_LINEAR:
        chosen = [(n, m) for n, m in modules if convertible(m)]
    else:
        match, exact = _matcher(targets, "targets")
        chosen = [(n, m) for n, m in modules if match(n, m)]
        for name in exact:
            if not any(n == name or n.endswith("." + name) for n, _ in chosen):
                close = difflib.get_close_matches(name, list(by_name), n=4, cutoff=0.5)
                raise ValueError(f"targets name {name!r} matches no module of the {type(model).__name__}"
                                 + (f" (close names: {', '.join(map(repr, close))})" if close else ""))
            if name in by_name and not convertible(by_name[name]):
                raise ValueError(f"targets name {name!r} is a {type(by_name[name]).__name__}, which fastdfa.convert "
                                 "cannot convert (a linear map: nn.Linear, nn.Conv1d/2d, transformers' Conv1D, or a "
                                 "type given to fastdfa.register_conversion). To train a block with DFA between "
                                 "blocks, name it in sites=[...] instead")
        chosen = [(n, m) for n, m in chosen if convertible(m)]
    drop, _ = _matcher([exclude] if isinstance(exclude, type) else exclude, "exclude")
    left_out = [m for n, m in modules if drop(n, m) or (head is not None and n == head)]
    inside = {id(sub) for m in left_out for sub in m.modules()}
    chosen = [(n, m) for n, m in chosen if id(m) not in inside]
    if not chosen:
        raise ValueError(f"targets={targets!r} (exclude={exclude!r}) selects no module fastdfa.convert can convert "
                         f"in the {type(model).__name__}: nothing would train with DFA")
    return [n for n, _ in chosen]


def convert_targets(model: nn.Module, targets=ALL_LINEAR, exclude=(), head: str | None = None) -> list[str]:
    """Convert the selected modules of ``model`` in place (``fastdfa.convert`` with every other convertible
    module skipped); returns the names converted."""
    names = select(model, targets, exclude, head)
    keep = set(names)
    skip = [n for n, m in model.named_modules() if n and convertible(m) and n not in keep]
    convert(model, skip=skip)
    return names
