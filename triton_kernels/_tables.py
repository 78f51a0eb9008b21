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


def stream_capturing(device: torch.device) -> bool:
    """Whether ``device``'s current stream is being captured into a CUDA graph (False off CUDA)."""
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class TableCache:
    """key -> device int tensor, least recently used evicted past ``maxsize``.

    ``maxsize`` 8: a model alternates at most a few shapes (train / last
    partial batch / eval), and each entry is a few hundred bytes.

    Under CUDA graph capture (``fastdfa.CapturedStep``) a table the graph
    reads must outlive the graph: every entry used during a capture is
    pinned (never evicted), and one built during a capture keeps its pinned
    host copy, since the captured host-to-device copy re-reads it at every
    replay.
    """

    def __init__(self, maxsize: int = 8):
        self.maxsize = maxsize
        self.builds = 0
        self._tables: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._pinned: dict[Hashable, tuple[torch.Tensor, torch.Tensor | None]] = {}  # used by a captured graph

    def get(self, key: Hashable, build: Callable[[], Sequence[Sequence[int]]], dtype: torch.dtype,
            device: torch.device) -> torch.Tensor:
        pinned = self._pinned.get(key)
        if pinned is not None:
            return pinned[0]
        capturing = stream_capturing(device)
        table = self._tables.get(key)
        if table is not None:
            if capturing:
                self._pinned[key] = (self._tables.pop(key), None)
            else:
                self._tables.move_to_end(key)
            return table
        rows = build()
        host = torch.tensor(rows, dtype=dtype).reshape(len(rows), -1)
        table = host
        if device.type == "cuda":
            host = host.pin_memory()
            table = host.to(device, non_blocking=True)
        self.builds += 1
        if capturing:
            self._pinned[key] = (table, host)
            return table
        self._tables[key] = table
        if len(self._tables) > self.maxsize:
            self._tables.popitem(last=False)
        return table

    def clear(self) -> None:
        """Forget the unpinned tables (the pinned ones belong to captured graphs)."""
        self._tables.clear()


def grouped_tiles(shapes: Sequence[tuple[int, int]], block_m: int, block_n: int) -> list[tuple[int, int, int]]:
    """Rows of a grouped launch's tile table: (group, tile row, tile column) for every output tile
    of every group's ``[M, N]`` output, group after group."""
    return [(g, i, j) for g, (m, n) in enumerate(shapes)
            for i in range(-(-m // block_m)) for j in range(-(-n // block_n))]
