"""Side-by-side step timing: the only step-time ratio fastdfa reports.

Timing one method after the other on a shared machine mixes the methods'
cost with the machine's drift (measured here: BP's median step moved from
3.1 to 5.3 ms between two runs of the same command). So steps of all methods
are interleaved, round after round, on the same batches, and each method's
median over the rounds is reported.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def interleaved_step_ms(steps: dict[str, Callable[[int], None]], rounds: int = 50, warmup: int = 5,
                        device: torch.device | None = None) -> dict[str, dict[str, float]]:
    """Median / quartiles (ms) of each ``steps[name](round)``, calling the methods in turn every round."""
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    times: dict[str, list[float]] = {name: [] for name in steps}
    sync = (lambda: torch.cuda.synchronize(device)) if device is not None and device.type == "cuda" else (lambda: None)
    for r in range(warmup + rounds):
        for name, step in steps.items():
            sync()
            t0 = time.perf_counter()
            step(r)
            sync()
            if r >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, values in times.items():
        q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        out[name] = {"median_ms": statistics.median(values), "q1_ms": q[0], "q3_ms": q[2], "rounds": len(values)}
    return out
