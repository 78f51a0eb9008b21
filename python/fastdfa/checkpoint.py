"""``fastdfa.checkpoint``: activation checkpointing for models trained by ``fastdfa.DFA``.

    h = fastdfa.checkpoint(self.blocks, h)        # inside the model's forward

is ``torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)`` whose
recomputation (in the backward) cuts the graph at the same sites as the
training forward did: each site module computes on its detached input again,
so the recomputed saved tensors are the forward's and DFA's rule holds inside
the segment. It says so through ``context_fn``; torch's own non-reentrant
checkpoint gets the same recomputation through the layers'
``RECOMPUTE_FORWARD`` registry (``fastdfa/layers.py``), so both work. The
reentrant form would run the segment without grad and recompute it with BP's
rule, which the wrapper refuses (a site that runs under no_grad inside a
training forward raises).

Outside a wrapper's training forward (mode "bp", eval, no grad) it is torch's
checkpoint as it is.
"""

from __future__ import annotations

import contextlib

import torch.utils.checkpoint as torch_checkpoint

from .layers import LAYER_FORWARD

__all__ = ["checkpoint"]


def checkpoint(function, *args, **kwargs):
    """``function(*args, **kwargs)`` with its activations recomputed in the backward (see the module
    docstring). Keyword arguments go to ``function``, as with torch's checkpoint, except
    ``preserve_rng_state`` and ``determinism_check``, which go to torch's checkpoint."""
    options = {k: kwargs.pop(k) for k in ("preserve_rng_state", "determinism_check") if k in kwargs}
    handler = LAYER_FORWARD.get()
    interceptor = getattr(handler, "__self__", None)
    replay = interceptor.replay() if interceptor is not None and hasattr(interceptor, "replay") else None
    if replay is None:
        return torch_checkpoint.checkpoint(function, *args, use_reentrant=False, **options, **kwargs)
    recorder = interceptor.recorder

    def contexts():
        return contextlib.nullcontext(), recorder.intercepting(replay)

    return torch_checkpoint.checkpoint(function, *args, use_reentrant=False, context_fn=contexts, **options,
                                       **kwargs)
