"""Pointer and tile tables for the grouped launches, cached between calls (no triton import: the
cuda backend uses them too).

A grouped launch (all sites, all layers) reads per-group metadata — addresses,
shapes, strides — from a small int64 table in device memory. Building it is a
host-to-device copy, so it is cached under a key of everything it holds
(shapes and addresses): with the caching allocator a training step usually
gets the same addresses as the step before, and then no table is built or
copied at all. ``builds`` counts real builds (the tests check it).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

import torch


class TableCache:
    """key -> device int tensor, least recently used evicted past ``maxsize``.

    ``maxsize`` 8: a model alternates at most a few shapes (train / last
    partial batch / eval), and each entry is a few hundred bytes.
    """

    def __init__(self, maxsize: int = 8):
        self.maxsize = maxsize
        self.builds = 0
        self._tables: OrderedDict[Hashable, torch.Tensor] = OrderedDict()

    def get(self, key: Hashable, build: Callable[[], Sequence[Sequence[int]]], dtype: torch.dtype,
            device: torch.device) -> torch.Tensor:
        table = self._tables.get(key)
        if table is not None:
            self._tables.move_to_end(key)
            return table
        rows = build()
        table = torch.tensor(rows, dtype=dtype).reshape(len(rows), -1)
        if device.type == "cuda":
            table = table.pin_memory().to(device, non_blocking=True)
        self._tables[key] = table
        self.builds += 1
        if len(self._tables) > self.maxsize:
            self._tables.popitem(last=False)
        return table

    def clear(self) -> None:
        self._tables.clear()


def grouped_tiles(shapes: Sequence[tuple[int, int]], block_m: int, block_n: int) -> list[tuple[int, int, int]]:
    """Rows of a grouped launch's tile table: (group, tile row, tile column) for every output tile
    of every group's ``[M, N]`` output, group after group."""
    return [(g, i, j) for g, (m, n) in enumerate(shapes)
            for i in range(-(-m // block_m)) for j in range(-(-n // block_n))]
