"""The "cuda" backend's ops: cuBLAS GEMMs (through torch, on the current stream) plus the csrc/
kernels of ``fastdfa._C``, on the ``KernelBackend`` contract (``fastdfa.backends.base``).

    dfa_project  P = e F^T (cuBLAS) + ONE epilogue launch applying every claimed site's g'
    dfa_wgrad    one cuBLAS GEMM per layer, fanned out over a pool of CUDA streams
                 (``fastdfa.backends.streams``), joined before the gradients are returned
    jvp_linear   ONE GEMM over the stacked [x; dx_1; ...] rows (W read once) + the dual-number
                 activation epilogue (h, g'(a) u_t and the state in one pass)
    align_step   J^T = P^T T / N per site (cuBLAS, fp32) + ONE kernel for the column cosines,
                 the step and the normalisation of every site

``CudaBackend(C)`` binds them to a kernel module: ``fastdfa._C`` on a GPU, or
``EmulatedC`` (the same contracts in torch) so the wrappers' plumbing is
tested on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..activations import ACTIVATION_CODES, STATE_OF, apply_activation, derivative_from_state
from ..ops.align_step import AlignSite, column_step
from ..ops.dfa_project import ProjectSite
from ..triton_kernels._tables import TableCache
from . import streams as stream_pool
from .base import KernelBackend

_CODE_NAMES = {v: k for k, v in ACTIVATION_CODES.items()}


class EmulatedC:
    """The contracts of the csrc/ kernels in torch (for testing the wrappers without a GPU)."""

    states: dict = {}  # address -> state tensor: what the real kernel reads through the site table

    @classmethod
    def register_state(cls, state: torch.Tensor) -> None:
        cls.states[state.data_ptr()] = state

    @classmethod
    def dfa_project(cls, error, feedback, site_table, max_rows):
        out = error.to(feedback.dtype) @ feedback.t()
        for offset, rows, code, addr, _stride in site_table.tolist():
            if code:
                block = out[:, offset:offset + rows]
                block.mul_(derivative_from_state(cls.states[addr], _CODE_NAMES[code], block.dtype))
        return out

    @staticmethod
    def align_step(feedback, j, offsets, rows, lr):
        cos = torch.zeros(len(offsets), feedback.shape[1], dtype=torch.float32)
        for s, (o, r) in enumerate(zip(offsets.tolist(), rows.tolist())):
            new, cos[s] = column_step(feedback[o:o + r].float(), j[o:o + r], lr)
            feedback[o:o + r] = new.to(feedback.dtype)
        return cos

    @staticmethod
    def dual_activation(a, u, code):
        act = _CODE_NAMES[int(code)]
        h = apply_activation(a, act)
        state = {"mask": (a > 0).to(torch.uint8), "pre": a.clone(), "output": h, None: h}[STATE_OF[act]]
        # g'(a): from h for tanh / sigmoid, from a itself otherwise (a > 0 for ReLU, a for GELU).
        d = derivative_from_state(h if STATE_OF[act] == "output" else a, act, a.dtype)
        return [h, d * u, state]


class CudaBackend(KernelBackend):
    """The cuda backend's ops, bound to a kernel module ``C``."""

    name = "cuda"
    fuses_layers = True

    def __init__(self, C, streams: int = 4):
        self.C = C
        self.tables = TableCache()
        self.streams = streams

    # -------------------------------------------------------------- dfa_project
    def dfa_project(self, error: torch.Tensor, feedback_all: torch.Tensor, sites: Sequence[ProjectSite],
                    out: torch.Tensor | None = None) -> torch.Tensor:
        rows = []
        for s in sites:
            code = ACTIVATION_CODES[s.activation] if s.state is not None else 0
            state = s.state if code else None
            if state is not None:
                want = torch.uint8 if STATE_OF[s.activation] == "mask" else feedback_all.dtype
                if state.dtype != want or state.stride(1) != 1:
                    raise ValueError(f"site at offset {s.offset}: state must be {want} with unit column stride")
                register = getattr(self.C, "register_state", None)
                if register is not None:  # the emulation reads states by address as the kernel does
                    register(state)
            row = (s.offset, s.rows, code, state.data_ptr() if state is not None else 0,
                   state.stride(0) if state is not None else 0)
            rows.append(row)
        key = ("sites",) + tuple(rows)
        table = self.tables.get(key, lambda: rows, torch.int64, error.device)
        result = self.C.dfa_project(error, feedback_all, table, max((s.rows for s in sites), default=0))
        if out is not None:
            out.copy_(result)
            return out
        return result

    # -------------------------------------------------------------- dfa_wgrad
    def dfa_wgrad(self, deltas, inputs, bias, streams: int | None = None):
        def work(i):
            d, x = deltas[i], inputs[i]
            return d.t() @ x, (d.sum(0) if bias[i] else None)

        return stream_pool.fan_out([lambda i=i: work(i) for i in range(len(deltas))], streams or self.streams,
                       device=deltas[0].device if deltas else None, inputs=list(deltas) + list(inputs))

    # -------------------------------------------------------------- jvp_linear
    def jvp_linear(self, x, weight, bias, activation=None, tangents=None):
        n, k = x.shape
        t = 0 if tangents is None else tangents.shape[0]
        rows = x if t == 0 else torch.cat([x, tangents.reshape(t * n, k).to(x.dtype)])
        product = rows @ weight.t()  # ONE GEMM: W read once for the primal and every tangent
        a = product[:n] + bias if bias is not None else product[:n]
        u = product[n:].reshape(t, n, weight.shape[0])
        h, dh, state = self.C.dual_activation(a.contiguous(), u.contiguous(), ACTIVATION_CODES[activation])
        kind = STATE_OF[activation]
        return h, (dh if t else None), (None if kind is None else h if kind == "output" else state)

    # -------------------------------------------------------------- align_step
    def align_step(self, feedback_all, sites: Sequence[AlignSite], lr: float):
        if not sites:
            return torch.empty(0, dtype=torch.float32, device=feedback_all.device)
        j = torch.zeros(feedback_all.shape, dtype=torch.float32, device=feedback_all.device)
        for s in sites:
            p, t = s.perturbation.float(), s.tangent.float()
            j[s.offset:s.offset + s.rows] = p.t() @ t / p.shape[0]
        # [2, sites]: row 0 the offsets, row 1 the row counts (each row contiguous, as the kernel reads
        # them); cached, so no host-to-device copy per step (and none inside a captured CUDA graph)
        layout = [tuple(s.offset for s in sites), tuple(s.rows for s in sites)]
        table = self.tables.get(("align",) + tuple(layout), lambda: layout, torch.int64, feedback_all.device)
        return self.C.align_step(feedback_all, j, table[0], table[1], float(lr)).mean(dim=1)

