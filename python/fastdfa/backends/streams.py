"""Per-layer work fanned out over a pool of CUDA streams, joined before the results are used.

DFA's weight gradients are independent once the deltas exist (no layer waits for the one above), so on
a GPU each layer's GEMM can run on its own stream. ``fan_out`` runs ``tasks`` round-robin on ``size``
side streams that first wait for the caller's current stream (their inputs are ready there), records
the inputs on the streams they are used on (``record_stream``: the caching allocator must not hand
their memory out while a side stream still reads it), then makes the caller's stream wait for every
side stream before the results are returned. DDP and the optimizer read the gradients on the caller's
stream, so they see finished values. On the CPU (or ``size`` <= 1) the tasks simply run in order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

_POOLS: dict = {}


def stream_pool(device: torch.device, size: int) -> list:
    """``size`` side streams of ``device``, created once and reused."""
    key = (device, size)
    if key not in _POOLS:
        _POOLS[key] = [torch.cuda.Stream(device=device) for _ in range(size)]
    return _POOLS[key]


def fan_out(tasks: Sequence[Callable[[], object]], size: int, device: torch.device | None = None,
            inputs: Sequence[torch.Tensor] = ()) -> list:
    """Results of ``tasks`` (in order), run on ``size`` side streams when ``device`` is a GPU."""
    if device is None or device.type != "cuda" or size <= 1 or len(tasks) <= 1:
        return [task() for task in tasks]
    main = torch.cuda.current_stream(device)
    pool = stream_pool(device, size)
    results = []
    for i, task in enumerate(tasks):
        side = pool[i % size]
        side.wait_stream(main)
        with torch.cuda.stream(side):
            for t in inputs:
                t.record_stream(side)
            out = task()
            for value in out if isinstance(out, tuple) else (out,):
                if isinstance(value, torch.Tensor):
                    value.record_stream(main)
        results.append(out)
    for side in pool[:min(size, len(tasks))]:
        main.wait_stream(side)
    return results
