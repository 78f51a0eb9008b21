"""fastdfa: Direct Feedback Alignment and its successors, faster than backprop.

``import fastdfa`` needs only torch: triton and the compiled extension are
looked for lazily (``python -m fastdfa info`` reports them), and so are the
subpackages (``fastdfa.distributed``, ``fastdfa.models``, ``fastdfa.lab``, ...):
each is imported on first attribute access (PEP 562).
"""

import importlib

from . import grape, init, metrics  # fastdfa.grape.calibrate, fastdfa.init.feedback_weight_matching, fastdfa.metrics
from .backends import BackendUnavailableError
from .checkpoint import checkpoint
from .config import DFAConfig
from .convert import convert, register_conversion
from .dfa import DFA, NonFiniteErrorSignal, Site, backprop
from .graphs import CapturedStep
from .layers import Conv1D, Conv1d, Conv2d, Linear
from .prepare import prepare

__version__ = "0.1.0"

__all__ = ["DFA", "DFAConfig", "prepare", "checkpoint", "convert", "register_conversion", "Site", "Linear", "Conv1d",
           "Conv1D", "Conv2d", "backprop", "CapturedStep", "NonFiniteErrorSignal", "BackendUnavailableError", "grape",
           "init", "metrics", "__version__"]

# Imported on first use, not by ``import fastdfa`` (they pull in more: torch.distributed, the lab's data
# and plotting, the kernel packages).
_LAZY_SUBPACKAGES = ("distributed", "models", "lab", "backends", "engine", "ops", "matching", "activations",
                     "feedback", "layers", "pretrained", "targets", "triton_kernels", "info", "plots")


def __getattr__(name: str):
    if name in _LAZY_SUBPACKAGES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'fastdfa' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBPACKAGES))
