"""The order in which a stage runs its micro-batches' forwards (F) and DFA backwards (B).

A DFA backward needs only the stage's own saved activations and the output
error ``e`` of its micro-batch, which the last stage sends to every stage
right after its forward; no backward waits for another stage's backward.
With ``S`` stages, ``M`` micro-batches, and a forward costing ``f`` and a
DFA backward ``b`` per stage (``b`` is about ``f``: the weight gradient and
a small projection, no input gradient):

``"sync"`` (GPipe's order): every stage but the last runs its ``M`` forwards,
then its ``M`` backwards in order; the last stage runs each backward right
after its forward (its ``e`` is local). Saved activations: ``M``
micro-batches on every stage but the last, 1 on the last. Time: the last
stage is busy from ``(S-1) f`` (the forward fill) to ``(S-1) f + M (f + b)``;
stage ``r`` ends its backwards at about ``max(M f + M b, (S-1) f + M (f + b) +
latency)``. Bubble: the fill ``(S-1) f`` on the last stage, and the drain on
the first, where ``e`` of the last micro-batch comes one latency after the
last stage's forward.

``"overlapped"`` (1F1B's order, no backward traffic): stage ``r`` runs
``w_r = min(S - r, M)`` forwards, then alternates the backward of its oldest
micro-batch with the forward of the next one. ``e`` of micro-batch ``m``
reaches stage ``r`` about ``(S-1-r)`` stage-forwards after stage ``r``'s own
forward of ``m``, which is the time the ``w_r - 1`` forwards in between
take, so the backward finds its ``e`` there. Saved activations: at most
``S - r`` micro-batches on stage ``r``. Same time as "sync" to first order
(every stage is busy ``M (f + b)`` after the fill), with memory bounded by
the number of stages instead of the number of micro-batches.

A BP pipeline needs ``(M + S - 1)(f + b_BP)`` with ``b_BP`` about ``2 f``
(input gradient and weight gradient) for GPipe and 1F1B alike; the DFA
pipeline ``(S - 1) f + M (f + b)`` plus one latency of ``e``: for ``M = 8``,
``S = 2``, ``b = f``: ``17 f`` against ``27 f``.
"""

from __future__ import annotations

SCHEDULES = ("sync", "overlapped")


def stage_order(schedule: str, stage: int, num_stages: int, micro_batches: int) -> list[tuple[str, int]]:
    """The ``("F", m)`` / ``("B", m)`` operations of ``stage``, in the order it runs them."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    m_all = range(micro_batches)
    if stage == num_stages - 1:
        return [op for m in m_all for op in (("F", m), ("B", m))]
    if schedule == "sync":
        return [("F", m) for m in m_all] + [("B", m) for m in m_all]
    warm = min(num_stages - stage, micro_batches)
    order = [("F", m) for m in range(warm)]
    for m in m_all:
        order.append(("B", m))
        if m + warm < micro_batches:
            order.append(("F", m + warm))
    return order


def saved_micro_batches(schedule: str, stage: int, num_stages: int, micro_batches: int) -> int:
    """The most micro-batches whose activations ``stage`` holds at once under ``schedule``."""
    live = peak = 0
    for op, _ in stage_order(schedule, stage, num_stages, micro_batches):
        live += 1 if op == "F" else -1
        peak = max(peak, live)
    return peak
