"""Freed heap memory goes back to the system (`drivers/heap.py`).

A pool process allocates in bursts (an allocation change) and frees most of it;
glibc keeps freed memory it cannot trim from the top of its heap, so the process's
resident size stays at its highest burst. These tests free such a burst for real in
a child process, and check what `trim` gives back.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from manycast.drivers import heap
from manycast.drivers.memory import MemoryNetwork
from manycast.ports import free_base_port

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


def test_a_long_run_gets_the_long_run_allocator_unless_one_is_named() -> None:
    assert heap.long_run_environment({"HOME": "/root"}) == {
        "HOME": "/root",
        "PYTHONMALLOC": heap.LONG_RUN_ALLOCATOR,
    }
    assert heap.long_run_environment({"PYTHONMALLOC": "pymalloc"}) is None


POOL = textwrap.dedent(
    """
    [pool]
    group = "232.7.7.9"
    [[router]]
    name = "edge"
    [[router]]
    name = "srv"
    [[link]]
    between = ["edge", "srv"]
    [[server]]
    name = "s1"
    router = "srv"
    [[clients]]
    name = "c"
    count = 4
    router = "edge"
    subnet = "10.9.9.0/24"
    rate = 4.0
    """
)


def _allocator_of_manycast_run(
    tmp_path: Path, named: str | None
) -> tuple[str | None, dict[str, Any]]:
    """Start `manycast run` on a small pool; the PYTHONMALLOC its process runs under
    (from /proc, once it has exec'd itself if it does), and its JSON summary."""
    topology = tmp_path / "pool.toml"
    topology.write_text(POOL)
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONMALLOC"}
    if named is not None:
        environment["PYTHONMALLOC"] = named
    base = free_base_port(16)
    command = [sys.executable, "-m", "manycast", "run", str(topology), "--json"]
    command += ["--duration", "3", "--base-port", str(base)]
    process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, text=True)
    seen: str | None = None
    deadline = time.monotonic() + 10
    while seen is None and time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(OSError):  # the process may end meanwhile
            entries = Path(f"/proc/{process.pid}/environ").read_bytes().split(b"\0")
            named_here = [
                e[len(b"PYTHONMALLOC=") :] for e in entries if e.startswith(b"PYTHONMALLOC=")
            ]
            seen = named_here[0].decode() if named_here else None
        time.sleep(0.02)
    out, _ = process.communicate(timeout=30)
    assert process.returncode == 0, out
    return seen, json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(heap.long_run_environment({}) is None, reason="glibc's malloc_trim is missing")
def test_manycast_run_restarts_itself_under_the_long_run_allocator(tmp_path: Path) -> None:
    """`manycast run` hosts a pool for as long as asked: its process (same id) runs
    under glibc's malloc, whose freed pages the heap trim gives back (finding 31),
    and serves its clients as before."""
    seen, summary = _allocator_of_manycast_run(tmp_path, None)
    assert seen == heap.LONG_RUN_ALLOCATOR
    assert summary["requests_ok"] > 0


def test_an_allocator_the_user_names_is_kept(tmp_path: Path) -> None:
    seen, summary = _allocator_of_manycast_run(tmp_path, "pymalloc")
    assert seen == "pymalloc"
    assert summary["requests_ok"] > 0
