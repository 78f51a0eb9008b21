"""Whole training steps captured in a CUDA graph and replayed: ``fastdfa.CapturedStep``.

    step = fastdfa.CapturedStep(dfa, optimizer)          # optimizer built with capturable=True
    for x, y in loader:                                 # static shapes (drop_last=True)
        loss = step(x, y)                               # forward, loss, DFA backward, optimizer step

A DFA step on a latency-bound model (16 layers of 512, batch 256) is a few
dozen small launches, each costing the CPU several microseconds to issue;
replaying a captured graph issues the whole step (forward, projection,
weight gradients on their streams, GrAPE's dual pass and alignment step,
optimizer) with one call. Capture follows PyTorch's whole-network recipe:

1. warm-up: ``warmup`` eager steps on a side stream (Triton compiles, the
   optimizer creates its state, the kernel tables are cached), then
   everything the warm-up changed is put back: parameters, buffers (the
   feedback included), the RNG states, the optimizer state (tensors that
   existed are restored, tensors the warm-up created are zeroed, which is a
   fresh state for Adam, AdamW and SGD without dampening). The first call's
   batch therefore trains exactly once, as in an eager loop.
2. capture: the gradients set to None, then one step recorded on the capture
   stream into the graph's private memory pool (the gradients are allocated
   there, written, not accumulated, by every replay).
3. replay: the batch is copied into the static input tensors and the graph
   replayed; the loss is returned as a fresh tensor.

One graph per input signature (shape, dtype), at most ``max_graphs``, each in
its own memory pool (graphs that shared a pool could overwrite each other's
static outputs when replayed out of capture order).

What a replay cannot see, because no Python runs in it: a changed learning
rate or other optimizer hyperparameter, a changed DFA mode or feedback_lr,
train/eval switches. ``CapturedStep`` fingerprints them on every call and
captures again when one changed (``captures`` counts the captures). A
learning-rate scheduler that changes lr every step therefore recaptures
every step: give the optimizer a tensor lr (``Adam(..., lr=torch.tensor(1e-3),
capturable=True)``) and change it in place instead. Inside a captured step
the output error is not checked for NaN/inf (that check reads the error on
the host, which a graph cannot do); check the returned loss. Not for
DistributedDataParallel models (its reducer communicates outside the graph).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .dfa import DFA

__all__ = ["CapturedStep"]


@dataclass
class _Captured:
    graph: object                 # torch.cuda.CUDAGraph (or the CPU stand-in in the tests)
    x: torch.Tensor               # static input, the batch is copied in before each replay
    target: torch.Tensor          # static target
    loss: torch.Tensor            # static loss, written by each replay


class _CudaGraphs:
    """The real thing: torch.cuda.CUDAGraph capture on a side stream."""

    @staticmethod
    def side_stream(device: torch.device):
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        return torch.cuda.stream(stream), stream

    @staticmethod
    def join(device: torch.device, stream) -> None:
        torch.cuda.current_stream(device).wait_stream(stream)

    @staticmethod
    def capture(step: Callable[[], torch.Tensor], generators) -> tuple[object, torch.Tensor]:
        graph = torch.cuda.CUDAGraph()
        for gen in generators:  # a non-default generator must be registered, or capture refuses it
            graph.register_generator_state(gen)
        with torch.cuda.graph(graph):
            loss = step()
        return graph, loss

    @staticmethod
    def replay(graph) -> None:
        graph.replay()


class CapturedStep:
    """One training step (forward, ``loss_fn``, backward, ``optimizer.step()``) as a replayed CUDA graph.

    ``module``: a ``fastdfa.DFA`` (any mode and backend) or any ``nn.Module``
    on a CUDA device (BP can be captured the same way, for comparison).
    ``optimizer``: an optimizer whose ``defaults`` has ``capturable`` must
    have it True (``torch.optim.Adam(..., capturable=True)``); SGD has none.
    ``warmup``: eager steps before capture (undone afterwards, see the module
    docstring); ``max_graphs``: input signatures captured at most.

    Calling it returns the step's loss (a new tensor; no host sync).
    """

    _graphs_impl = _CudaGraphs  # the tests swap in a CPU stand-in that re-runs the recorded step

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy, *,
                 warmup: int = 3, max_graphs: int = 4):
        if isinstance(module, DistributedDataParallel):
            raise ValueError("CapturedStep does not capture DistributedDataParallel models: the reducer's "
                             "all-reduce runs outside the graph. Train DDP models with eager steps.")
        if not isinstance(module, nn.Module):
            raise TypeError(f"CapturedStep needs an nn.Module (e.g. a fastdfa.DFA), got {type(module).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"CapturedStep needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if "capturable" in optimizer.defaults and not all(g.get("capturable") for g in optimizer.param_groups):
            raise ValueError(f"{type(optimizer).__name__} keeps its step count on the host unless built with "
                             f"capturable=True; a replayed graph would repeat the first step's bias correction. "
                             f"Create it as {type(optimizer).__name__}(params, ..., capturable=True).")
        if not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be a positive int (Triton compiles and optimizer state are created "
                             f"there), got {warmup!r}")
        if not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs must be a positive int, got {max_graphs!r}")
        self.module, self.optimizer, self.loss_fn = module, optimizer, loss_fn
        self.warmup, self.max_graphs = warmup, max_graphs
        self.captures = 0
        self._graphs: dict[tuple, _Captured] = {}
        self._fingerprint: tuple | None = None

    # ------------------------------------------------------------------ call
    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        device = self._device()
        for name, t in (("input", x), ("target", target)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"CapturedStep takes tensors; the {name} is {type(t).__name__}")
            if t.device != device:
                raise ValueError(f"the {name} is on {t.device} but the model is on {device}; move it first")
        fingerprint = self._hyperparameters()
        if fingerprint != self._fingerprint:  # a replay would not see the change: capture again
            self.reset()
            self._fingerprint = fingerprint
        key = (tuple(x.shape), x.dtype, tuple(target.shape), target.dtype)
        captured = self._graphs.get(key)
        if captured is None:
            if len(self._graphs) >= self.max_graphs:
                raise ValueError(f"input signature {key} would be graph {len(self._graphs) + 1}, above "
                                 f"max_graphs={self.max_graphs}: keep batch shapes static (drop_last=True) or "
                                 f"raise max_graphs")
            captured = self._graphs[key] = self._capture(x, target, device)
        captured.x.copy_(x)
        captured.target.copy_(target)
        self._graphs_impl.replay(captured.graph)
        return captured.loss.detach().clone()

    def reset(self) -> None:
        """Drop every captured graph (and its memory pool); the next call captures again."""
        self._graphs.clear()
        self._fingerprint = None

    @property
    def signatures(self) -> list[tuple]:
        """The (input shape, input dtype, target shape, target dtype) captured so far."""
        return list(self._graphs)

    # --------------------------------------------------------------- capture
    def _device(self) -> torch.device:
        first = next(self.module.parameters(), None)  # every call: no list of all parameters
        if first is None:
            raise ValueError("the module has no parameters to train")
        if self._graphs_impl is _CudaGraphs and not torch.cuda.is_available():
            why = (f"this torch ({torch.__version__}) is a CPU build" if torch.version.cuda is None
                   else "no CUDA GPU is visible")
            raise RuntimeError(f"CapturedStep replays CUDA graphs and needs a CUDA GPU; {why}. Train with eager "
                               "steps (call the model, loss.backward(), optimizer.step()) instead")
        if first.device.type != "cuda" and self._graphs_impl is _CudaGraphs:
            raise ValueError(f"CapturedStep replays CUDA graphs: the model is on {first.device}; move it to a "
                             "CUDA device first (model.to('cuda') before wrapping)")
        return first.device

    def _hyperparameters(self) -> tuple:
        """What a replay bakes in as Python values: optimizer scalars, DFA mode and feedback_lr, train flags."""
        groups = tuple(tuple(sorted((k, v) for k, v in g.items()
                                    if k != "params" and isinstance(v, (int, float, bool))))
                       for g in self.optimizer.param_groups)
        dfa = tuple((getattr(self.module, a, None) for a in ("mode", "feedback_lr", "nonfinite")))
        return groups, dfa, tuple(m.training for m in self.module.modules())

    def _one_step(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.loss_fn(self.module(x), target)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def _capture(self, x: torch.Tensor, target: torch.Tensor, device: torch.device) -> _Captured:
        impl = self._graphs_impl
        dfa = self.module if isinstance(self.module, DFA) else None
        if dfa is not None and not dfa.built and dfa.mode in ("dfa", "grape"):
            dfa.build(x[:1])  # the feedback must exist before the snapshot that undoes the warm-up
        static_x, static_t = x.detach().clone(), target.detach().clone()
        saved = _Snapshot(self.module, self.optimizer, dfa)
        try:
            context, stream = impl.side_stream(device)
            with context:
                for _ in range(self.warmup):
                    self.optimizer.zero_grad(set_to_none=True)
                    self._one_step(static_x, static_t)
            impl.join(device, stream)
        finally:
            saved.restore()  # the warm-up did not happen, as far as training is concerned
        generators = list(dfa.perturbations.generators.values()) if dfa is not None else []
        self.optimizer.zero_grad(set_to_none=True)  # the graph allocates the gradients in its own pool
        graph, loss = impl.capture(lambda: self._one_step(static_x, static_t), generators)
        self.captures += 1
        return _Captured(graph, static_x, static_t, loss)


class _Snapshot:
    """Parameters, buffers, RNG states and optimizer state, put back by ``restore``."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, dfa):
        # dict.fromkeys: each tensor once (tensors hash by identity), in order
        tensors = dict.fromkeys([*module.parameters(), *module.buffers()])
        self.tensors = [(t, t.detach().clone()) for t in tensors]
        self.optimizer = optimizer
        self.opt_state = {p: {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
                              for k, v in state.items()} for p, state in optimizer.state.items()}
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self.dfa = dfa
        self.generators = dfa.perturbations.snapshot() if dfa is not None else {}
        self.skipped = dfa.skipped_steps if dfa is not None else 0

    def restore(self) -> None:
        with torch.no_grad():
            for live, value in self.tensors:
                live.copy_(value)
            for p, state in self.optimizer.state.items():
                before = self.opt_state.get(p, {})
                for k, v in list(state.items()):
                    if k in before:
                        if isinstance(v, torch.Tensor):
                            v.copy_(before[k])
                        else:
                            state[k] = before[k]
                    elif isinstance(v, torch.Tensor):
                        v.zero_()  # created by the warm-up: a fresh state (zero moments, step 0)
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        if self.dfa is not None:
            self.dfa.perturbations.restore(self.generators)  # first drawn in the warm-up: back to its seed
            self.dfa.skipped_steps = self.skipped

