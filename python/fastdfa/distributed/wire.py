"""The pipeline's point-to-point messages, and how a failure reaches every rank without a hang.

A step's message (an activation, ``e``, GrAPE's dual pass or output
tangents) is ONE point-to-point send of the tensor's values followed by one
status value, ``-1`` (OK) or the stage where a failure began (``FAILED``;
the values are then zeros). So a rank that fails still sends, and receives,
every message the schedule gives it: each message a rank waits for is
always sent, and no rank is left waiting for one. The failure's text stays
on the rank where it happened; the step's closing agreement
(``agreement.agree``) hands it to every rank. Those messages are floating
point (any float dtype holds the small integer status exactly).

The setup pass, which does not know the shapes yet, sends a header first:
``HEADER_LEN`` int64 values ``[status, origin, dtype code, ndim, d_0, ...,
d_7]``, then the values it announces.

Every wait has a timeout (the pipeline's ``timeout``): a rank that dies, or
hangs outside the pipeline, ends the others' waits with ``PipelineTimeout``
instead of a hang.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

HEADER_LEN = 12
MAX_DIMS = HEADER_LEN - 4
OK, FAILED = 0, 1
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8,
          torch.bool, torch.int8, torch.int16)
TAG_HEADER, TAG_PAYLOAD, TAG_MESSAGE = 1, 2, 3


class PipelineError(RuntimeError):
    """A step failed on some stage; every rank of the pipeline raises it with that stage's message."""


class PipelineTimeout(PipelineError):
    """A rank waited longer than the pipeline's timeout for a message (a peer died or hangs)."""


@dataclass
class Message:
    failed: bool
    origin: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    payload: torch.Tensor | None


class Pending:
    """A posted receive: the buffer of values and status, and its work."""

    __slots__ = ("src", "shape", "packed", "work", "what")

    def __init__(self, src: int, shape: tuple, packed: torch.Tensor, work, what: str):
        self.src, self.shape, self.packed, self.work, self.what = src, shape, packed, work, what


class Wire:
    """Messages between the stages of one pipeline.

    ``forward`` and ``backward`` are two process groups over the same ranks: messages to a later stage
    (activations, GrAPE's dual pass) go through the first, messages to an earlier stage (``e``, output
    tangents) through the second. So each pair of ranks carries one direction in each group, in the
    order it is sent: NCCL runs a group's point-to-point calls between two ranks in issue order on one
    stream, and a receive posted early for ``e`` would otherwise hold up the activation sent after it.
    ``ranks[s]`` is the global rank of stage ``s`` (point-to-point calls take global ranks), ``device``
    the stage's device (NCCL sends CUDA tensors only), ``timeout`` every wait's limit. Sends are
    non-blocking; their tensors are kept until ``flush``.
    """

    def __init__(self, forward, backward, stage: int, ranks: list[int], device: torch.device,
                 timeout: datetime.timedelta):
        self.forward, self.backward = forward, backward
        self.stage, self.ranks, self.device, self.timeout = stage, ranks, device, timeout
        self.in_flight: list[tuple] = []  # (work, tensor) of every send not yet flushed

    def _group(self, peer: int):
        return self.forward if peer > self.stage else self.backward

    def _irecv(self, tensor: torch.Tensor, src: int, tag: int):
        # a message from an earlier stage travels forward
        return dist.irecv(tensor, src=self.ranks[src], group=self.forward if src < self.stage else self.backward,
                          tag=tag)

    # ------------------------------------------------------------------ send
    def send(self, dst: int, tensor: torch.Tensor | None, origin: int | None, shape, dtype: torch.dtype) -> None:
        """A step's message: ``tensor`` (or, on a failure that began at stage ``origin``, zeros of ``shape`` /
        ``dtype``) and the status, in one send to stage ``dst``."""
        numel = math.prod(shape)
        packed = torch.empty(numel + 1, dtype=dtype, device=self.device)
        if origin is None:
            packed[:numel].copy_(tensor.reshape(-1))
            packed[numel] = -1
        else:
            packed[:numel].zero_()
            packed[numel] = origin
        self._isend(packed, dst, TAG_MESSAGE)

    def send_announced(self, dst: int, tensor: torch.Tensor | None, origin: int | None, shape,
                       dtype: torch.dtype) -> None:
        """A setup message: a header announcing ``shape`` / ``dtype``, then the values (zeros on a failure)."""
        payload = tensor.contiguous() if origin is None else torch.zeros(shape, dtype=dtype, device=self.device)
        self.send_header(dst, origin, tuple(payload.shape), payload.dtype)
        self._isend(payload, dst, TAG_PAYLOAD)

    def send_header(self, dst: int, origin: int | None, shape, dtype: torch.dtype) -> None:
        shape = tuple(shape)
        if len(shape) > MAX_DIMS:
            raise ValueError(f"the pipeline sends tensors of at most {MAX_DIMS} dims, got shape {shape}")
        values = [OK if origin is None else FAILED, -1 if origin is None else origin, DTYPES.index(dtype), len(shape),
                  *shape, *([0] * (MAX_DIMS - len(shape)))]
        self._isend(torch.tensor(values, dtype=torch.int64, device=self.device), dst, TAG_HEADER)

    def _isend(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        work = dist.isend(tensor, dst=self.ranks[dst], group=self._group(dst), tag=tag)
        self.in_flight.append((work, tensor))

    def flush(self) -> None:
        """Wait for every send (their peers have received them)."""
        in_flight, self.in_flight = self.in_flight, []
        for work, _ in in_flight:
            self._wait(work, "a send to be received", None)

    # --------------------------------------------------------------- receive
    def post(self, src: int, shape, dtype: torch.dtype, what: str) -> Pending:
        """Post the receive of a step's message of ``shape`` / ``dtype`` from stage ``src``."""
        packed = torch.empty(math.prod(shape) + 1, dtype=dtype, device=self.device)
        work = self._irecv(packed, src, TAG_MESSAGE)
        return Pending(src, tuple(shape), packed, work, what)

    def wait(self, pending: Pending) -> Message:
        self._wait(pending.work, pending.what, pending.src)
        status = int(pending.packed[-1].item())
        values = pending.packed[:-1].view(pending.shape)
        return Message(status != -1, status, pending.shape, values.dtype, values)

    def recv_header(self, src: int, what: str) -> Message:
        header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
        self._wait(self._irecv(header, src, TAG_HEADER), what, src)
        return _decode(header, None)

    def recv_announced(self, src: int, what: str) -> Message:
        """A setup message: the header, then the values it announces."""
        head = self.recv_header(src, what)
        payload = torch.empty(head.shape, dtype=head.dtype, device=self.device)
        self._wait(self._irecv(payload, src, TAG_PAYLOAD), what, src)
        head.payload = payload
        return head

    def _wait(self, work, what: str, src: int | None) -> None:
        try:
            work.wait(self.timeout)
        except RuntimeError as exc:
            peer = "" if src is None else f" from stage {src} (rank {self.ranks[src]})"
            raise PipelineTimeout(
                f"stage {self.stage} (rank {self.ranks[self.stage]}) got no {what}{peer} within "
                f"{self.timeout.total_seconds():g} s (DFAPipeline(timeout=...)): that rank failed outside a "
                f"pipeline step, or hangs. The process group cannot be used after this; restart the processes "
                f"(underlying error: {exc})") from exc


def _decode(header: torch.Tensor, payload: torch.Tensor | None) -> Message:
    status, origin, code, ndim, *dims = header.tolist()
    return Message(status == FAILED, origin, tuple(dims[:ndim]), DTYPES[code], payload)
