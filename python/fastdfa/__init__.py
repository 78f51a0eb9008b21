"""fastdfa: Direct Feedback Alignment and its successors, faster than backprop.

``import fastdfa`` needs only torch: triton and the compiled extension are
looked for lazily (``python -m fastdfa info`` reports them).
"""

from .backends import BackendUnavailableError
from .checkpoint import checkpoint
from .config import DFAConfig
from .convert import convert
from .dfa import DFA, NonFiniteErrorSignal, Site, backprop
from .graphs import CapturedStep
from .layers import Conv2d, Linear
from . import grape, init, metrics  # fastdfa.grape.calibrate, fastdfa.init.feedback_weight_matching, fastdfa.metrics

__version__ = "0.1.0"

__all__ = ["DFA", "DFAConfig", "checkpoint", "convert", "Site", "Linear", "Conv2d", "backprop", "CapturedStep", "NonFiniteErrorSignal",
           "BackendUnavailableError", "grape", "init", "metrics", "__version__"]
