"""Which lines of code hold the memory a pool process grew by (`soak.py --trace-heap`).

`sys.getallocatedblocks()` and malloc's bytes in use (`_pool.host_pool`) say how
much a process holds alive; `HeapTrace` says where it was allocated. It starts
`tracemalloc` (one frame a block: the line that allocated it), snapshots at
`mark`, and `growth` compares the end with that mark, line by line. Tracing every
allocation slows a busy process several fold (a traced infrastructure process lost
clients to timeouts it would not have lost), so a traced run's losses and recovery
times are not the pool's: it is for finding what grows, not for measuring.

Run alone, it prints one json object, its last line on stdout, naming the bench
to run (`_common.not_a_bench`).
"""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
import time
import tracemalloc
from typing import Any

TOP = 15  # lines kept in `growth`, the largest growth first
# Neither tracemalloc's own bookkeeping nor the import system is the process's work.
_SKIP = [
    tracemalloc.Filter(False, tracemalloc.__file__),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
    tracemalloc.Filter(False, "<unknown>"),
]


def where(filename: str, lineno: int) -> str:
    """A line's place short enough to read: from `manycast/` or `bench/` on, else
    the file's folder and name (the standard library, site packages)."""
    parts = filename.replace("\\", "/").split("/")
    for top in ("manycast", "bench"):
        if top in parts:
            last = len(parts) - 1 - parts[::-1].index(top)
            return f"{'/'.join(parts[last:])}:{lineno}"
    return f"{'/'.join(parts[-2:])}:{lineno}"


class HeapTrace:
    """tracemalloc from construction on; `mark` then `growth` (which stops it)."""

    def __init__(self) -> None:
        tracemalloc.start(1)
        self.marked_at: float | None = None
        self.paused_s: float | None = None  # how long `mark` stopped the process
        self.total: list[Any] | None = None  # every line's growth: [KiB, blocks]
        self._first: tracemalloc.Snapshot | None = None

    def mark(self, at: float) -> None:
        """The snapshot `growth` compares with, taken at bench time `at`."""
        began = time.monotonic()
        self._first = tracemalloc.take_snapshot().filter_traces(_SKIP)
        self.marked_at = at
        self.paused_s = round(time.monotonic() - began, 2)

    def growth(self, top: int = TOP) -> list[list[Any]]:
        """The `top` lines whose live blocks grew most since `mark`, as [where, KiB,
        blocks]; [] when `mark` never ran (the run ended first)."""
        if self._first is None or not tracemalloc.is_tracing():
            tracemalloc.stop()
            return []
        last = tracemalloc.take_snapshot().filter_traces(_SKIP)
        tracemalloc.stop()
        stats = last.compare_to(self._first, "lineno")
        stats.sort(key=lambda s: s.size_diff, reverse=True)
        self.total = [
            round(sum(s.size_diff for s in stats) / 1024, 1),
            sum(s.count_diff for s in stats),
        ]
        return [
            [
                where(s.traceback[0].filename, s.traceback[0].lineno),
                round(s.size_diff / 1024, 1),
                s.count_diff,
            ]
            for s in stats[:top]
        ]


if __name__ == "__main__":
    from _common import not_a_bench

    not_a_bench(__file__, "bench/soak.py")
