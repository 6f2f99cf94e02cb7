"""Freed heap memory goes back to the system (`drivers/heap.py`).

A pool process allocates in bursts (an allocation change) and frees most of it;
glibc keeps freed memory it cannot trim from the top of its heap, so the process's
resident size stays at its highest burst. These tests free such a burst for real in
a child process, and check what `trim` gives back.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from manycast.drivers import heap
from manycast.drivers.memory import MemoryNetwork

BURST = textwrap.dedent(
    """
    import os
    from manycast.drivers import heap

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    # 200 MB in 4 KiB blocks (malloc's heap, below its mmap threshold); every 64th
    # stays, so the freed memory is not at the heap's top and is not trimmed by free.
    blocks = [bytearray(4096) for _ in range(50_000)]
    kept = blocks[::64]
    del blocks
    before = rss_mb()
    trimmed = heap.trim()
    print(trimmed, round(before), round(rss_mb()))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim: Linux")
def test_a_freed_burst_is_given_back() -> None:
    out = subprocess.run(
        [sys.executable, "-c", BURST], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    trimmed, before, after = out[0] == "True", int(out[1]), int(out[2])
    if not trimmed:
        pytest.skip("the C library here has no malloc_trim (not glibc)")
    # The burst's 197 MB freed are still resident before the trim, and gone after it.
    assert before - after > 150, (before, after)


def test_the_network_clock_paces_the_trims(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[float] = []
    network = MemoryNetwork.build([], [])
    monkeypatch.setattr(heap, "trim", lambda: calls.append(network.now) or True)
    heap.trim_every(network, 30.0)
    network.run_until(100.0)
    assert calls == [30.0, 60.0, 90.0]


KEPT = textwrap.dedent(
    """
    import os
    from manycast.drivers import heap

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    start = heap.in_use_mb()
    blocks = [bytearray(4096) for _ in range(50_000)]
    kept = blocks[::64]
    burst = heap.in_use_mb()
    del blocks
    print(start, burst, heap.in_use_mb(), round(rss_mb()))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallinfo2: Linux")
def test_what_malloc_holds_alive_falls_with_a_freed_burst_that_rss_keeps() -> None:
    """`in_use_mb` counts what is alive: after the burst is freed it falls back to
    where it was (plus the 1 block in 64 kept), while RSS still holds the burst."""
    out = subprocess.run(
        [sys.executable, "-c", KEPT], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    if out[0] == "None":
        pytest.skip("the C library here has no mallinfo2 (not glibc 2.33 or later)")
    start, burst, after, rss = (float(x) for x in out)
    assert burst - start > 190, out  # 50 000 blocks of 4 KiB and a bit
    assert after - start < 10, out  # 781 blocks kept: about 3 MB
    assert rss > start + 150, out  # the freed burst is still resident
