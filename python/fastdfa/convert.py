"""``fastdfa.convert``: swap a model's ``torch.nn.Linear`` / ``Conv2d`` for fastdfa's, in place.

One call turns an existing model (torch's own blocks, a Hugging Face
transformer, a hand-written net) into one ``fastdfa.DFA`` can train, the way
torchao's ``quantize_`` and BioTorch's ``BioModule`` swap layers: walk the
module tree, build each replacement cheaply, hand it the original Parameters,
and set it on the parent under the same name. No weight is copied or
re-initialised, so the model computes exactly what it computed before.
"""

from __future__ import annotations

import difflib

import torch
from torch import nn

from .layers import Conv2d, Linear, init_feedback_weight

__all__ = ["convert"]

# Exact types converted (``type(m) is ...``, not isinstance): a subclass may override forward or add state
# that a fastdfa layer would silently drop, so it is left alone (see ``convert``'s docstring).
_SWAPS = {nn.Linear: Linear, nn.Conv2d: Conv2d}

# The containers of an nn.Module's __dict__ (torch's Module.__init__) that the replacement gets as its own
# copies: the same Parameters, buffers and children in a new dict / set. Every other entry is taken over as
# it is: the hook OrderedDicts are then shared, so a RemovableHandle taken on the original still removes its
# hook from the replacement.
_COPIED = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")


def convert(module: nn.Module, *, skip=()) -> nn.Module:
    """Replace every ``torch.nn.Linear`` and ``torch.nn.Conv2d`` in ``module`` by ``fastdfa.Linear`` /
    ``fastdfa.Conv2d``, in place, and return ``module``.

    Contract:

    * Every module whose type is exactly ``torch.nn.Linear`` or ``torch.nn.Conv2d``, at any depth
      (inside torch's blocks such as ``TransformerEncoderLayer`` and inside Hugging Face models too),
      is replaced on its parent, under the same name, by a fastdfa layer that holds the SAME Parameter
      objects: values, ``requires_grad``, device, dtype, an optimizer's references and any sharing of
      a Parameter between layers (tied weights) are kept, nothing is copied. A module reachable under
      two names is replaced by one fastdfa layer at both.
    * Every other attribute is carried over: the constructor options (Conv2d's stride, padding
      including "same"/"valid", dilation, groups, bias, padding_mode), the training flag, extra
      buffers and attributes set on the layer, and its hooks (forward, forward pre-, backward and
      state_dict hooks: the replacement uses the original's hook dictionaries, so handles taken on
      the original still remove them). The new layer has ``activation=None`` and a
      ``feedback_weight`` buffer of the weight's shape, dtype and device, exactly as a freshly
      constructed fastdfa layer has (``fastdfa.DFA`` reseeds it).
    * So the outputs are bit-identical and the ``state_dict`` keys unchanged (``feedback_weight`` is
      not persistent). The replacements are built on the meta device: converting a large model
      allocates no second set of weights; the only new memory is each ``feedback_weight``.
    * Left alone: fastdfa layers (so converting twice equals converting once), and subclasses of
      ``nn.Linear`` / ``nn.Conv2d`` that are not those exact classes, since their forward or state
      may differ: ``NonDynamicallyQuantizableLinear`` (``nn.MultiheadAttention.out_proj``, whose
      weight ``MultiheadAttention`` reads directly, never calling its forward, so a fastdfa layer
      there would never run), ``LazyLinear`` / ``LazyConv2d`` before their first forward (they
      become plain ``nn.Linear`` / ``nn.Conv2d`` after it: convert then), parametrized layers
      (``torch.nn.utils.parametrize``), and user subclasses. Hugging Face's GPT-2 style ``Conv1D``
      is not an ``nn.Linear`` and is left alone too.
    * ``skip``: module names (qualified, as in ``named_modules()``; a name skips that module and
      everything under it) and/or ``nn.Module`` subclasses (modules of those types, and everything
      under them, are left alone). A single name or type may be given without a tuple. A module
      that is skipped under one name is skipped everywhere it appears.
    * If ``module`` itself is an ``nn.Linear`` / ``nn.Conv2d`` it cannot be replaced in place: a
      new fastdfa layer holding the same Parameters (and hooks, attributes) is returned instead; use
      the return value.
    * Errors (raised before anything is changed): ``TypeError`` for a ``module`` that is not an
      ``nn.Module`` or a ``skip`` entry that is neither a ``str`` nor an ``nn.Module`` subclass;
      ``ValueError`` for a skip name that is not in the module (the message lists close names) and
      for a layer whose forward was replaced on the instance (``layer.forward = ...``, as
      accelerate's hooks do, or ``layer.compile()``): such a layer would keep running the original's
      forward; convert before patching it, or skip it.

    Convert before wrapping the model in ``fastdfa.DFA`` (the wrapper finds its layers when it is
    built); an optimizer built before the conversion keeps working (the Parameters are the same).
    References to a replaced layer held outside the module tree
    (a plain Python list, a closure) still point at the old ``torch.nn`` layer. torch's
    ``TransformerEncoderLayer`` inference fast path (eval mode, no grad) reads the weights directly
    without calling the layers; its result is the same.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert() takes an nn.Module, got {type(module).__name__}")
    names, types = _split_skip(skip)
    skipped = _skipped_modules(module, names, types)

    # Plan and check every swap first, (parent, child name, old layer, qualified name), so an error leaves
    # the model as it was. A module shared under two names appears twice and gets one replacement.
    plan: list[tuple[nn.Module | None, str, nn.Module, str]] = []
    if type(module) in _SWAPS and id(module) not in skipped:
        plan.append((None, "", module, ""))
    for parent_name, parent in module.named_modules(remove_duplicate=False):
        if id(parent) in skipped:
            continue
        for child_name, child in parent._modules.items():
            if child is not None and type(child) in _SWAPS and id(child) not in skipped:
                qualified = f"{parent_name}.{child_name}" if parent_name else child_name
                plan.append((parent, child_name, child, qualified))
    for _, _, old, qualified in plan:
        _check_swappable(qualified, old)

    # Build every replacement (cheap: meta device, then the original Parameters), then set them.
    new: dict[int, nn.Module] = {}
    for _, _, old, _ in plan:
        if id(old) not in new:
            new[id(old)] = _replacement(old)
    for parent, child_name, old, _ in plan:
        if parent is not None:
            setattr(parent, child_name, new[id(old)])
    return new[id(module)] if id(module) in new else module


def _split_skip(skip) -> tuple[list[str], tuple[type, ...]]:
    entries = (skip,) if isinstance(skip, (str, type)) else skip
    try:
        entries = list(entries)
    except TypeError:
        raise TypeError(f"skip must be module names (str) and/or nn.Module subclasses, got "
                        f"{type(skip).__name__}") from None
    names, types = [], []
    for entry in entries:
        if isinstance(entry, str):
            names.append(entry)
        elif isinstance(entry, type) and issubclass(entry, nn.Module):
            types.append(entry)
        else:
            what = f"the class {entry.__name__}, not an nn.Module subclass" if isinstance(entry, type) \
                else f"{entry!r} ({type(entry).__name__})"
            raise TypeError(f"skip entries must be module names (str) or nn.Module subclasses; got {what}")
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


def _replacement(old: nn.Module) -> nn.Module:
    """The fastdfa layer for ``old``: built on the meta device (no allocation, no random init), then
    given ``old``'s state. Attributes the fastdfa constructor adds (``activation``) keep their fresh
    values; every attribute of ``old`` is taken over."""
    weight = old.weight
    if isinstance(old, nn.Conv2d):
        layer = Conv2d(old.in_channels, old.out_channels, old.kernel_size, stride=old.stride,
                       padding=old.padding, dilation=old.dilation, groups=old.groups, bias=old.bias is not None,
                       padding_mode=old.padding_mode, device="meta")
    else:
        layer = Linear(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
    state = layer.__dict__
    for key, value in old.__dict__.items():
        # _COPIED: same objects, the new layer's own container; the rest (hook dicts, training, the
        # constructor options, extra attributes) as they are.
        state[key] = type(value)(value) if key in _COPIED else value
    # feedback_weight as the fastdfa constructor makes it, on the weight's device and dtype.
    layer._buffers["feedback_weight"] = torch.empty_like(weight)
    layer._non_persistent_buffers_set.add("feedback_weight")
    init_feedback_weight(layer, seed=0, index=0)
    return layer
