"""`soak.py --trace-heap`'s tracer (`bench/_heap_trace.py`): the lines whose live
blocks grew between its mark and its end, the largest first."""

from __future__ import annotations

import importlib
import tracemalloc
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def heap_trace(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("_heap_trace")


def test_the_line_that_keeps_blocks_leads_and_freed_ones_do_not_count(
    heap_trace: ModuleType,
) -> None:
    kept: list[bytes] = []
    trace = heap_trace.HeapTrace()
    _ = [bytes(100) for _ in range(500)]  # before the mark: not growth
    trace.mark(at=12.5)
    for _ in range(2000):
        kept.append(bytes(200))  # line A: 2000 blocks kept
    freed = [bytes(300) for _ in range(2000)]  # line B: freed before the end
    del freed
    lines = trace.growth()
    assert not tracemalloc.is_tracing()
    assert trace.marked_at == 12.5
    top, kib, blocks = lines[0]
    assert top.endswith("test_heap_trace.py:" + str(_line_of("kept.append(bytes(200))")))
    assert blocks >= 2000 and kib >= 2000 * 200 / 1024
    assert not any(
        where.endswith(f":{_line_of('freed = [bytes(300)')}") and n > 10 for where, _, n in lines
    )
    # Every line's growth together: the kept bytes, less the 500 blocks of before the
    # mark that `_` let go when the loop took the name.
    assert trace.total[0] >= (2000 * 200 - 500 * 160) / 1024, trace.total


def test_without_a_mark_there_is_no_growth(heap_trace: ModuleType) -> None:
    trace = heap_trace.HeapTrace()
    assert trace.growth() == []
    assert not tracemalloc.is_tracing()


def test_places_read_from_the_package_or_the_bench(heap_trace: ModuleType) -> None:
    where = heap_trace.where
    assert where("/x/src/manycast/space.py", 436) == "manycast/space.py:436"
    assert where("/x/bench/_pool.py", 9) == "bench/_pool.py:9"
    assert where("/usr/lib/python3.11/asyncio/events.py", 80) == "asyncio/events.py:80"


def _line_of(text: str) -> int:
    lines = Path(__file__).read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if text in line and "_line_of" not in line)
