"""fastdfa: Direct Feedback Alignment and its successors, faster than backprop.

``import fastdfa`` needs only torch: triton and the compiled extension are
looked for lazily (``python -m fastdfa info`` reports them).
"""

from .backends import BackendUnavailableError
from .dfa import DFA, NonFiniteErrorSignal, Site, backprop
from .graphs import CapturedStep
from .layers import Conv2d, Linear
from . import init, metrics  # noqa: E402  (fastdfa.init.feedback_weight_matching / soft_align, fastdfa.metrics)

__version__ = "0.1.0"

__all__ = ["DFA", "Site", "Linear", "Conv2d", "backprop", "CapturedStep", "NonFiniteErrorSignal",
           "BackendUnavailableError", "init", "metrics", "__version__"]
