"""What every rank of a group agrees on at the end of a step: whether it failed, where, and why."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .wire import PipelineError


class Fault:
    """The first failure a rank knows of in this step: the stage where it began (``origin``) and, if this
    rank has it (it began here, or an agreement brought it), its text. False while there is none."""

    __slots__ = ("stage", "rank", "origin", "text")

    def __init__(self, stage: int, rank: int):
        self.stage, self.rank = stage, rank
        self.origin: int | None = None
        self.text: str | None = None

    def __bool__(self) -> bool:
        return self.origin is not None

    def local(self, exc: BaseException) -> None:
        """A failure on this rank (kept only if it is the first)."""
        if self.origin is None:
            self.origin, self.text = self.stage, f"stage {self.stage} (rank {self.rank}): {type(exc).__name__}: {exc}"

    def adopt(self, origin: int, text: str | None = None) -> None:
        """A failure that began elsewhere (a FAILED header, or an agreement)."""
        if self.origin is None:
            self.origin, self.text = origin, text


def agree(group, device: torch.device, fault: Fault, value: float = 0.0) -> float:
    """ONE all-reduce over ``group`` of ``[failed, value]``; the sum of ``value`` over the group.

    If any rank failed, the failures' texts are gathered and every rank adopts the first (lowest
    origin); ``fault`` then holds it on every rank. Costs one small collective when nothing failed.
    """
    flags = torch.tensor([1.0 if fault else 0.0, value], dtype=torch.float64, device=device)
    dist.all_reduce(flags, group=group)
    if flags[0].item() > 0:
        known = [None] * dist.get_world_size(group)
        dist.all_gather_object(known, (fault.origin, fault.text) if fault.text is not None else None, group=group)
        reports = sorted(entry for entry in known if entry is not None)
        fault.origin, fault.text = reports[0] if reports else (-1, "a rank failed without a message")
    return flags[1].item()


def raise_if_failed(fault: Fault) -> None:
    if fault:
        raise PipelineError(fault.text or f"stage {fault.origin} failed")
