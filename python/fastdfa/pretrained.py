"""The wrapper as its model's users know it: attributes, ``save_pretrained`` / ``from_pretrained``, pickling.

``PretrainedMixin`` gives ``fastdfa.DFA`` what PEFT's ``PeftModel`` gives its
wrapper (learned from ``peft_model.py``, nothing copied):

  * attribute access falls through to the wrapped model, so ``wrapper.config`` is a Hugging Face
    model's config (``transformers.Trainer`` writes to it), ``wrapper.generate(...)`` and
    ``wrapper.gradient_checkpointing_enable()`` work; fastdfa's own options are ``wrapper.dfa_config``
    (``wrapper.config`` is the ``DFAConfig`` only for a model without a ``config`` of its own);
  * ``save_pretrained(dir)`` writes the model exactly as the model's own ``save_pretrained`` does (so
    ``transformers`` loads the directory without fastdfa), plus ``fastdfa_config.json`` (the options,
    the conversion targets, the sites) and ``fastdfa_state.safetensors`` (the feedback and GrAPE's
    random stream); ``DFA.from_pretrained(dir)`` rebuilds the same training state;
  * the wrapper class is made per wrapped class (``wrapper_class``) so that its ``forward`` has the
    model's signature: ``transformers.Trainer`` reads the signature to keep the dataset's columns and to
    find the labels (``labels=``); pickling rebuilds that class from the model's class.

The wrapper's ``state_dict()`` holds tensors only; for a Hugging Face model each tensor shared under two
names (an LM head tied to the input embedding) is saved once, under its first name, as ``save_pretrained``
does, so ``safetensors`` (which refuses shared tensors) can save it; ``load_state_dict`` accepts the
missing alias (the tie fills it).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os

from torch import nn

from .config import DFAConfig

CONFIG_FILE = "fastdfa_config.json"
STATE_FILE = "fastdfa_state.safetensors"
MODEL_FILE = "model.safetensors"  # a model without save_pretrained of its own
FORMAT = 1

_CLASSES: dict[type, type] = {}


def wrapper_class(base: type, model_class: type) -> type:
    """``base`` (``fastdfa.DFA``) with ``forward`` carrying ``model_class.forward``'s signature (cached per
    model class). Named like ``base`` (``repr`` and messages say "DFA")."""
    key = (base, model_class)
    cls = _CLASSES.get(key)
    if cls is not None:
        return cls
    try:
        signature = inspect.signature(model_class.forward)
    except (TypeError, ValueError):  # a builtin or C forward: keep (*args, **kwargs)
        signature = None

    def forward(self, *args, **kwargs):
        return base.forward(self, *args, **kwargs)

    forward.__doc__ = base.forward.__doc__
    if signature is not None:
        forward.__signature__ = signature
    cls = type(base.__name__, (base,), {"forward": forward, "__module__": base.__module__,
                                         "__qualname__": f"{base.__qualname__}[{model_class.__qualname__}]",
                                         "_model_class": model_class})
    _CLASSES[key] = cls
    return cls


def _rebuild(base: type, model_class: type):
    """Unpickling: an empty wrapper of the class ``wrapper_class`` makes (its state is set after)."""
    cls = wrapper_class(base, model_class)
    return cls.__new__(cls)


def is_hf_model(model: nn.Module) -> bool:
    return hasattr(model, "save_pretrained") and hasattr(model, "config")


class PretrainedMixin:
    """Attribute fall-through, Hugging Face style saving and loading, pickling (module docstring)."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # nn.Module's parameters, buffers, submodules
        except AttributeError:
            modules = self.__dict__.get("_modules")
            if name.startswith("__") or modules is None or "model" not in modules:
                raise
            return getattr(modules["model"], name)

    @property
    def config(self):
        """The wrapped model's ``config`` (a Hugging Face ``PretrainedConfig``); for a model without one,
        fastdfa's ``DFAConfig`` (always at ``dfa_config``)."""
        model_config = getattr(self.model, "config", None)
        return self._config if model_config is None else model_config

    @config.setter
    def config(self, value) -> None:
        if not hasattr(self.model, "config"):
            raise AttributeError("the wrapper's options are fixed at construction (dfa.dfa_config); build a new "
                                 "fastdfa.DFA(model, config) to change them")
        self.model.config = value

    def __reduce_ex__(self, protocol):
        model_class = type(self).__dict__.get("_model_class")
        if model_class is None:
            return super().__reduce_ex__(protocol)
        return _rebuild, (type(self).__mro__[1], model_class), self.__getstate__()

    # ---------------------------------------------------------------- state_dict with ties saved once
    def _aliases(self) -> dict[str, str]:
        """For a Hugging Face model: state_dict key -> the key it is tied to (the same Parameter under a
        later name: an LM head tied to the embedding), as ``save_pretrained`` drops them."""
        if not is_hf_model(self.model):
            return {}
        first: dict[int, str] = {}
        aliases = {}
        for name, p in self.model.named_parameters(prefix="model", remove_duplicate=False):
            if id(p) in first:
                aliases[name] = first[id(p)]
            else:
                first[id(p)] = name
        return aliases

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        aliases = self._aliases()
        prefix = kwargs.get("prefix", "")
        for alias in aliases:
            state.pop(prefix + alias, None)
        return state

    def _fill_aliases(self, state_dict) -> dict:
        """``state_dict`` with each tied alias the checkpoint dropped filled from the key it is tied to."""
        aliases = self._aliases()
        missing = {a: k for a, k in aliases.items() if a not in state_dict and k in state_dict}
        if not missing:
            return state_dict
        full = dict(state_dict)
        full.update({a: state_dict[k] for a, k in missing.items()})
        return full

    # ---------------------------------------------------------------- save / load
    def save_pretrained(self, save_directory, **kwargs) -> None:
        """Write the model as its own ``save_pretrained`` does (``kwargs`` go to it; a model without one
        is written to ``model.safetensors``), then fastdfa's options and state beside it."""
        from safetensors.torch import save_file, save_model

        os.makedirs(save_directory, exist_ok=True)
        if hasattr(self.model, "save_pretrained"):
            self.model.save_pretrained(save_directory, **kwargs)
        else:
            save_model(self.model, os.path.join(save_directory, MODEL_FILE))
        own = {k: v.detach().contiguous() for k, v in self.state_dict().items() if not k.startswith("model.")}
        save_file(own, os.path.join(save_directory, STATE_FILE), metadata={"format": "pt"})
        record = {"format": FORMAT, "options": dataclasses.asdict(self._config),
                  "conversion": getattr(self, "conversion", None),
                  "sites": [self.module_names[m] for m in self._recorder.site_modules],
                  "built_sites": self.feedback.site_names,
                  "model_class": f"{type(self.model).__module__}.{type(self.model).__qualname__}"}
        with open(os.path.join(save_directory, CONFIG_FILE), "w") as f:
            json.dump(record, f, indent=2, sort_keys=True)

    @classmethod
    def from_pretrained(cls, directory, model: nn.Module | None = None, **overrides):
        """The wrapper ``save_pretrained`` wrote to ``directory``: the model (loaded with
        ``transformers`` from the directory's ``config.json`` when ``model`` is None, else ``model``
        with the saved weights loaded into it), converted as it was, wrapped with the saved options
        (``overrides`` change them), the feedback and GrAPE's stream restored. A directory that
        ``transformers.Trainer.save_model`` wrote for a wrapper (one ``model.safetensors`` of the
        wrapper's state_dict) loads the same way, given ``model``."""
        from safetensors.torch import load_file

        record = read_record(directory)
        if record is None:
            return _from_trainer_directory(cls, directory, model, overrides)
        if model is None:
            model = load_hf_model(directory)
        elif os.path.exists(os.path.join(directory, MODEL_FILE)) and not hasattr(model, "save_pretrained"):
            from safetensors.torch import load_model
            load_model(model, os.path.join(directory, MODEL_FILE))
        elif hasattr(model, "save_pretrained"):
            _load_hf_weights(model, directory)
        wrapper = restore(cls, model, record, overrides)
        wrapper.load_fastdfa_state(load_file(os.path.join(directory, STATE_FILE)))
        return wrapper

    def load_fastdfa_state(self, tensors: dict) -> None:
        """Load fastdfa's own entries (``feedback.*``) of a state_dict, keeping the model's weights."""
        self.feedback.load_state_dict({k[len("feedback."):]: v for k, v in tensors.items()
                                       if k.startswith("feedback.")}, strict=True)


def read_record(directory) -> dict | None:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        record = json.load(f)
    if record.get("format") != FORMAT:
        raise ValueError(f"{path}: fastdfa format {record.get('format')!r}, this fastdfa reads format {FORMAT}")
    return record


def restore(cls, model: nn.Module, record: dict, overrides: dict):
    """Convert ``model`` as the record says and wrap it with the record's options (``overrides`` win)."""
    from .targets import convert_targets

    conversion = record.get("conversion")
    if conversion is not None:
        convert_targets(model, conversion["targets"], conversion["exclude"], conversion.get("head"))
    options = {k: v for k, v in record["options"].items() if k in {f.name for f in dataclasses.fields(DFAConfig)}}
    options.update(overrides)
    modules = dict(model.named_modules())
    sites = [modules[name] for name in record.get("sites", [])] or None
    wrapper = cls(model, sites=sites, **options)
    wrapper.conversion = conversion
    return wrapper


def load_hf_model(directory) -> nn.Module:
    """The ``transformers`` model a directory holds (the class named in its ``config.json``)."""
    try:
        import transformers
    except ImportError:
        raise ImportError(f"{directory} holds a Hugging Face model: install transformers, or pass model=") from None
    config = transformers.AutoConfig.from_pretrained(directory)
    names = getattr(config, "architectures", None) or []
    model_class = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), None)
    if model_class is None:
        raise ValueError(f"{directory}/config.json names no transformers class (architectures={names!r}); pass "
                         "model= (the model to load the weights into)")
    return model_class.from_pretrained(directory)


def _load_hf_weights(model: nn.Module, directory) -> None:
    """The weights ``save_pretrained`` wrote (one ``model.safetensors``, or the shards its index names)
    into ``model``; every key must fit (tied aliases aside)."""
    from safetensors.torch import load_file

    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state = {}
    for name in files:
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found; pass model=None to load the model with transformers")
        state.update(load_file(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"{directory} does not fit the given model: missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]}")


def _from_trainer_directory(cls, directory, model, overrides):
    from safetensors.torch import load_file

    path = os.path.join(directory, MODEL_FILE)
    if model is None or not os.path.exists(path):
        raise FileNotFoundError(f"{directory} holds no {CONFIG_FILE} (written by DFA.save_pretrained); a directory "
                                "that transformers.Trainer.save_model wrote for a wrapper loads with the model "
                                "given: DFA.from_pretrained(directory, model=fastdfa.prepare(...).model)")
    state = load_file(path)
    wrapper = model if isinstance(model, cls) else cls(model, **overrides)
    wrapper.load_state_dict(state)
    return wrapper
