"""``fastdfa.convert``: swap a model's torch (and Hugging Face) layers for fastdfa's, in place.

One call turns an existing model (torch's own blocks, a Hugging Face
transformer, a hand-written net) into one ``fastdfa.DFA`` can train, the way
torchao's ``quantize_`` and BioTorch's ``BioModule`` swap layers: walk the
module tree, build each replacement cheaply, hand it the original Parameters,
and set it on the parent under the same name. No weight is copied or
re-initialised, so the model computes exactly what it computed before.

Which types are converted, and how, is a registry, ``source type -> converter``
(``register_conversion``): torch's ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d``
are registered here, Hugging Face's ``Conv1D`` is added at convert time when
``transformers`` is loaded, and a user may register their own types.
"""

from __future__ import annotations

import difflib
import sys
from typing import Callable

import torch
from torch import nn

from .layers import FASTDFA_LAYERS, Conv1D, Conv1d, Conv2d, Linear, init_feedback_weight

__all__ = ["convert", "convertible", "register_conversion"]

# The containers of an nn.Module's __dict__ (torch's Module.__init__) that the replacement gets as its own
# copies: the same Parameters, buffers and children in a new dict / set. Every other entry is taken over as
# it is: the hook OrderedDicts are then shared, so a RemovableHandle taken on the original still removes its
# hook from the replacement.
_COPIED = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")


def _adopt(old: nn.Module, layer: nn.Module) -> nn.Module:
    """``layer`` (a fastdfa layer just built on the meta device: no allocation, no random init) given
    ``old``'s whole state. Attributes the fastdfa constructor adds (``activation``) keep their fresh
    values; every attribute of ``old`` is taken over."""
    state = layer.__dict__
    for key, value in old.__dict__.items():
        # _COPIED: same objects, the new layer's own container; the rest (hook dicts, training, the
        # constructor options, extra attributes) as they are.
        state[key] = type(value)(value) if key in _COPIED else value
    # feedback_weight as the fastdfa constructor makes it, on the weight's device and dtype.
    layer._buffers["feedback_weight"] = torch.empty_like(old.weight)
    layer._non_persistent_buffers_set.add("feedback_weight")
    init_feedback_weight(layer, seed=0, index=0)
    return layer


def _from_linear(old: nn.Linear) -> Linear:
    return _adopt(old, Linear(old.in_features, old.out_features, bias=old.bias is not None, device="meta"))


def _from_conv(old: nn.Conv1d | nn.Conv2d) -> Conv1d | Conv2d:
    cls = Conv1d if isinstance(old, nn.Conv1d) else Conv2d
    return _adopt(old, cls(old.in_channels, old.out_channels, old.kernel_size, stride=old.stride,
                           padding=old.padding, dilation=old.dilation, groups=old.groups,
                           bias=old.bias is not None, padding_mode=old.padding_mode, device="meta"))


def _from_hf_conv1d(old: nn.Module) -> Conv1D:
    return _adopt(old, Conv1D(old.nf, old.nx, device="meta"))


# source type -> converter. Exact types (``type(m) is ...``, not isinstance): a subclass may override forward
# or add state that a fastdfa layer would silently drop, so it is left alone unless registered itself.
_CONVERTERS: dict[type, Callable[[nn.Module], nn.Module]] = {
    nn.Linear: _from_linear, nn.Conv1d: _from_conv, nn.Conv2d: _from_conv}


def register_conversion(source_type: type, fn: Callable[[nn.Module], nn.Module]) -> None:
    """Make ``fastdfa.convert`` replace every module of exactly ``source_type`` by ``fn(module)``.

    ``fn(old)`` returns the fastdfa layer (an instance of one of ``fastdfa.layers.FASTDFA_LAYERS``)
    that takes ``old``'s place, holding ``old``'s very Parameter objects (``layer.weight is
    old.weight``, ``layer.bias is old.bias``: not copies, so values, tying and an optimizer's
    references are kept), with a ``feedback_weight`` of the weight's shape, dtype and device, and
    computing what ``old`` computed. Anything else ``old`` carries (hooks, extra attributes) is
    ``fn``'s to take over. For example, a subclass whose only change is elsewhere than its forward::

        def to_fastdfa(m):
            layer = fastdfa.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                                   device=m.weight.device, dtype=m.weight.dtype)
            layer.weight, layer.bias = m.weight, m.bias
            return layer

        register_conversion(MyLinear, to_fastdfa)

    Matching is by exact type, as for the built-in conversions (subclasses of ``source_type`` are not
    converted unless registered themselves); registering a type again replaces its converter, the
    built-in ones (``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, Hugging Face's ``Conv1D``) included.
    ``convert`` checks each result before changing anything (see its docstring).

    Raises ``TypeError`` if ``source_type`` is not an ``nn.Module`` subclass, or is a fastdfa layer
    type (those are what convert produces and leaves alone), or if ``fn`` is not callable.
    """
    if not (isinstance(source_type, type) and issubclass(source_type, nn.Module)):
        what = f"the class {source_type.__name__}" if isinstance(source_type, type) else \
            f"{source_type!r} ({type(source_type).__name__})"
        raise TypeError(f"register_conversion needs an nn.Module subclass as source_type, got {what}")
    if issubclass(source_type, FASTDFA_LAYERS):
        raise TypeError(f"{source_type.__qualname__} is already a fastdfa layer type: convert leaves those "
                        "alone, so it cannot be a conversion's source")
    if not callable(fn):
        raise TypeError(f"register_conversion needs a callable fn(module) -> fastdfa layer for "
                        f"{source_type.__qualname__}, got {fn!r} ({type(fn).__name__})")
    _CONVERTERS[source_type] = fn


def _converters() -> dict[type, Callable[[nn.Module], nn.Module]]:
    """The registry, plus Hugging Face's ``Conv1D`` when ``transformers.pytorch_utils`` is loaded: a model
    holding a Conv1D implies it is, so fastdfa never imports transformers itself. A registration of
    that class by the user (``register_conversion``) wins."""
    table = dict(_CONVERTERS)
    hf_conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    if isinstance(hf_conv1d, type):
        table.setdefault(hf_conv1d, _from_hf_conv1d)
    return table


def convertible(module: nn.Module) -> bool:
    """Whether ``convert`` converts ``module`` (its exact type is registered, Hugging Face's Conv1D
    included), or it already is a fastdfa layer (converting it again is a no-op)."""
    return type(module) in _converters() or isinstance(module, FASTDFA_LAYERS)


def convert(module: nn.Module, *, skip=()) -> nn.Module:
    """Replace every ``torch.nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` and Hugging Face ``Conv1D`` in
    ``module`` by ``fastdfa.Linear`` / ``Conv1d`` / ``Conv2d`` / ``Conv1D`` (and every module of a
    type registered with ``register_conversion`` by its converter's layer), in place, and return
    ``module``.

    Contract:

    * Every module whose type is exactly a registered one, at any depth (inside torch's blocks such
      as ``TransformerEncoderLayer`` and inside Hugging Face models too), is replaced on its parent,
      under the same name, by a fastdfa layer that holds the SAME Parameter objects: values,
      ``requires_grad``, device, dtype, an optimizer's references and any sharing of a Parameter
      between layers (tied weights, e.g. GPT-2's ``lm_head`` and ``wte``) are kept, nothing is
      copied. A module reachable under two names is replaced by one fastdfa layer at both.
    * Built in: ``nn.Linear`` -> ``fastdfa.Linear``, ``nn.Conv1d`` -> ``fastdfa.layers.Conv1d``,
      ``nn.Conv2d`` -> ``fastdfa.Conv2d``, and ``transformers.pytorch_utils.Conv1D`` (GPT-2, OpenAI
      GPT, ...: ``y = x W + b`` with ``W`` ``[in, out]``) -> ``fastdfa.layers.Conv1D``. The Hugging Face
      class is looked up in ``sys.modules`` when convert runs, so fastdfa never imports
      ``transformers``: a model holding a Conv1D has loaded it.
    * For the built-in conversions every other attribute is carried over: the constructor options
      (a conv's stride, padding including "same"/"valid", dilation, groups, bias, padding_mode;
      Conv1D's ``nf``, ``nx``), the training flag, extra buffers and attributes set on the layer,
      and its hooks (forward, forward pre-, backward and state_dict hooks: the replacement uses the
      original's hook dictionaries, so handles taken on the original still remove them). The new
      layer has ``activation=None`` and a ``feedback_weight`` buffer of the weight's shape, dtype
      and device, exactly as a freshly constructed fastdfa layer has (``fastdfa.DFA`` reseeds it).
    * So the outputs are bit-identical and the ``state_dict`` keys unchanged (``feedback_weight`` is
      not persistent). The replacements are built on the meta device: converting a large model
      allocates no second set of weights; the only new memory is each ``feedback_weight``.
    * Left alone: fastdfa layers (so converting twice equals converting once), and subclasses of
      the registered types that are not registered themselves, since their forward or state may
      differ: ``NonDynamicallyQuantizableLinear`` (``nn.MultiheadAttention.out_proj``, whose weight
      ``MultiheadAttention`` reads directly, never calling its forward, so a fastdfa layer there
      would never run), ``LazyLinear`` / ``LazyConv2d`` before their first forward (they become
      plain ``nn.Linear`` / ``nn.Conv2d`` after it: convert then), parametrized layers
      (``torch.nn.utils.parametrize``), and user subclasses (register them to convert them).
    * ``skip``: module names (qualified, as in ``named_modules()``; a name skips that module and
      everything under it) and/or ``nn.Module`` subclasses (modules of those types, and everything
      under them, are left alone). A single name or type may be given without a tuple. A module
      that is skipped under one name is skipped everywhere it appears.
    * If ``module`` itself is of a registered type it cannot be replaced in place: a new fastdfa
      layer holding the same Parameters (and hooks, attributes) is returned instead; use the return
      value.
    * Errors (raised before anything is changed: every replacement is planned, built and checked
      before the first is set): ``TypeError`` for a ``module`` that is not an ``nn.Module`` or a
      ``skip`` entry that is neither a ``str`` nor an ``nn.Module`` subclass; ``ValueError`` for a
      skip name that is not in the module (the message lists close names) and for a layer whose
      forward was replaced on the instance (``layer.forward = ...``, as accelerate's hooks do, or
      ``layer.compile()``): such a layer would keep running the original's forward; convert before
      patching it, or skip it. A registered converter that returns something that is not a fastdfa
      layer raises ``TypeError``; one whose layer does not hold the original's ``weight`` / ``bias``
      Parameter objects, or whose ``feedback_weight`` is not of the weight's shape, dtype and device,
      raises ``ValueError``; both name the source type and the module.

    Convert before wrapping the model in ``fastdfa.DFA`` (the wrapper finds its layers when it is
    built); an optimizer built before the conversion keeps working (the Parameters are the same).
    References to a replaced layer held outside the module tree
    (a plain Python list, a closure) still point at the old layer. torch's
    ``TransformerEncoderLayer`` inference fast path (eval mode, no grad) reads the weights directly
    without calling the layers; its result is the same. Hugging Face code that tests
    ``isinstance(m, transformers.pytorch_utils.Conv1D)`` (its ``_init_weights``, head pruning,
    quantizers) no longer sees the converted layers.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert() takes an nn.Module, got {type(module).__name__}")
    names, types = split_names_and_types(skip)
    skipped = _skipped_modules(module, names, types)
    converters = _converters()

    # Plan and check every swap first, (parent, child name, old layer, qualified name), so an error leaves
    # the model as it was. A module shared under two names appears twice and gets one replacement.
    plan: list[tuple[nn.Module | None, str, nn.Module, str]] = []
    if type(module) in converters and id(module) not in skipped:
        plan.append((None, "", module, ""))
    for parent_name, parent in module.named_modules(remove_duplicate=False):
        if id(parent) in skipped:
            continue
        for child_name, child in parent._modules.items():
            if child is not None and type(child) in converters and id(child) not in skipped:
                qualified = f"{parent_name}.{child_name}" if parent_name else child_name
                plan.append((parent, child_name, child, qualified))
    for _, _, old, qualified in plan:
        _check_swappable(qualified, old)

    # Build and check every replacement (the built-ins: cheap, meta device, then the original
    # Parameters), then set them.
    new: dict[int, nn.Module] = {}
    for _, _, old, qualified in plan:
        if id(old) not in new:
            new[id(old)] = _checked(converters[type(old)](old), old, qualified)
    for parent, child_name, old, _ in plan:
        if parent is not None:
            setattr(parent, child_name, new[id(old)])
    return new[id(module)] if id(module) in new else module


def split_names_and_types(spec, option: str = "skip") -> tuple[list[str], tuple[type, ...]]:
    """``spec`` (a module name, an ``nn.Module`` subclass, or an iterable of them) as (names, types); a
    ``TypeError`` naming ``option`` for anything else. ``convert``'s ``skip`` and ``fastdfa.prepare``'s
    ``targets`` / ``exclude`` lists read their entries through it."""
    entries = (spec,) if isinstance(spec, (str, type)) else spec
    try:
        entries = list(entries)
    except TypeError:
        raise TypeError(f"{option} must be module names (str) and/or nn.Module subclasses, got "
                        f"{type(spec).__name__}") from None
    names, types = [], []
    for entry in entries:
        if isinstance(entry, str):
            names.append(entry)
        elif isinstance(entry, type) and issubclass(entry, nn.Module):
            types.append(entry)
        else:
            what = f"the class {entry.__name__}, not an nn.Module subclass" if isinstance(entry, type) \
                else f"{entry!r} ({type(entry).__name__})"
            raise TypeError(f"{option} entries must be module names (str) or nn.Module subclasses; got {what}")
    return names, tuple(types)


def _skipped_modules(module: nn.Module, names: list[str], types: tuple) -> set[int]:
    """ids of the modules left alone: those named or of a skipped type, and everything under them."""
    by_name = dict(module.named_modules(remove_duplicate=False))
    roots = []
    for name in names:
        if name not in by_name:
            close = difflib.get_close_matches(name, [n for n in by_name if n], n=5, cutoff=0.6)
            hint = (f"close names: {', '.join(map(repr, close))}" if close else
                    f"no close name; its children are: {', '.join(map(repr, module._modules)) or 'none'}")
            raise ValueError(f"skip name {name!r} is not a module of this {type(module).__name__} ({hint})")
        roots.append(by_name[name])
    if types:
        roots += [m for m in module.modules() if isinstance(m, types)]
    return {id(sub) for root in roots for sub in root.modules()}


def _check_swappable(name: str, old: nn.Module) -> None:
    patched = [k for k in ("forward", "_compiled_call_impl") if k in old.__dict__]
    if patched:
        where = repr(name) if name else "the module itself"
        raise ValueError(f"{type(old).__name__} {where} has {patched[0]!r} set on the instance (a patched "
                         "or compiled forward) that would keep running the torch layer; convert before "
                         f"patching or compiling it, or pass skip=[{name!r}]")


def _checked(layer, old: nn.Module, name: str):
    """``layer``, the converter's result for ``old``, if it can take ``old``'s place (else raise)."""
    source = f"the converter registered for {type(old).__module__}.{type(old).__qualname__}"
    where = repr(name) if name else "the module itself"
    if not isinstance(layer, FASTDFA_LAYERS):
        kinds = ", ".join(t.__name__ for t in FASTDFA_LAYERS)
        raise TypeError(f"{source} returned a {type(layer).__qualname__} for {where}, not a fastdfa layer "
                        f"({kinds} from fastdfa.layers): return one of those (register_conversion)")
    for key in ("weight", "bias"):
        if getattr(layer, key, None) is not getattr(old, key, None):
            raise ValueError(f"{source} returned a {type(layer).__name__} for {where} whose {key!r} is not the "
                             f"original's Parameter object: set layer.{key} = old.{key} (the same object, not a "
                             "copy), so the values, tied weights and optimizer references are kept")
    fb, weight = layer.feedback_weight, layer.weight
    if (fb.shape, fb.dtype, fb.device) != (weight.shape, weight.dtype, weight.device):
        raise ValueError(f"{source} returned a {type(layer).__name__} for {where} whose feedback_weight "
                         f"({tuple(fb.shape)}, {fb.dtype}, {fb.device}) is not like its weight ({tuple(weight.shape)}, "
                         f"{weight.dtype}, {weight.device}): build the layer on the weight's device and dtype")
    return layer
