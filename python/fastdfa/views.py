"""What a ``fastdfa.DFA`` wrapper says about itself: its sites, their order, the error point, the backend,
and why each layer did or did not take the kernel backends' fused route.

Read-only views over the wrapper's parts (the feedback store, the recorder, the backend); the wrapper
(``fastdfa.dfa``) holds and changes them. A mixin so the wrapper's class stays one screenful of logic.
"""

from __future__ import annotations

import contextlib

from torch import nn

from .backends import get_backend
from .engine import fused
from .engine.sites import Site


class WrapperViews:
    """The inspection API of ``fastdfa.DFA`` (see the module docstring)."""

    @property
    def error_point(self) -> str:
        """Where the error is taken, in words (``fastdfa.engine.error_point``)."""
        return "not found yet (the first training forward finds it)" if self._point is None else \
            self._point.describe()

    @property
    def perturbations(self):
        """GrAPE's perturbation stream (``engine.grape_pass.PerturbationStream``), held by the feedback store,
        which saves it in the state_dict."""
        return self.feedback.perturbations

    @property
    def skipped_steps(self) -> int:
        return self._router.skipped_steps

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._router.skipped_steps = value

    # ------------------------------------------------------------- sites
    @property
    def sites(self) -> list[Site]:
        """The sites from input to output (empty until the feedback is built)."""
        return list(self.feedback.sites or [])

    @property
    def built(self) -> bool:
        return self.feedback.sites is not None

    @property
    def out_features(self) -> int | None:
        return self.feedback.n_out

    @property
    def execution_order(self) -> tuple[nn.Module, ...]:
        """The first module executed, then every site module, in the order they run (once built)."""
        return self._recorder.expected or ()

    def name_of(self, module: nn.Module) -> str:
        return self.module_names[module]

    @property
    def backend(self) -> str | None:
        """The backend resolved on the first DFA forward (None before)."""
        return None if self.kernels is None else self.kernels.name

    @property
    def fused_layers(self) -> list[str]:
        """Names of the layers whose delta and weight gradient the last training forward left to the
        fused backward (kernel backends; ``fastdfa.engine.fused``). Empty with the torch backend."""
        return [n for n, why in self.fusion_report().items() if why == fused.FUSED]

    def fusion_report(self) -> dict[str, str]:
        """For every fastdfa layer: "fused", or why the last training forward did not fuse it."""
        refusal, reasons = self._fusion
        if self.kernels is not None and not self.kernels.fuses_layers:
            refusal = self.kernels.fused_route_refusal(False)
        return {self.module_names[m]: refusal or reasons.get(m, "did not run in the last training forward")
                for m in self.feedback.fa_layers}

    @contextlib.contextmanager
    def using_backend(self, name: str):
        """Run the block on backend ``name`` (e.g. "torch" for a measurement), then restore."""
        self._resolve_backend(())
        previous, self.kernels = self.kernels, get_backend(name)
        try:
            yield self
        finally:
            self.kernels = previous

    def extra_repr(self) -> str:
        sites = len(self.feedback.sites) if self.built else "unbuilt"
        return (f"mode={self.mode!r}, seed={self.seed}, feedback={self.feedback_kind!r}, sites={sites}, "
                f"backend={self.backend!r}")

