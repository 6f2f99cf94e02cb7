"""Give freed heap memory back to the system now and then (glibc's `malloc_trim`).

A long-running pool process allocates in bursts: an allocation change builds new
portion tables, owner arrays and per-client moves, then frees most of it. glibc
keeps the freed top of its heaps as long as nothing above it is in use, so the
resident size of a server or router process stays at the highest burst it has
seen and climbs in steps with each bigger one, while its live objects do not grow.
The soak measured it: the lab's server agents kept 10-25 MB after reallocations
that `malloc_trim(0)` gave back (docs/soak.md, lab finding 5). (The overlay's
infrastructure process also grows in steps at bursts of changes; trimming did not
flatten it, so that is more than glibc's heap: overlay finding 11.)

`trim_every` asks glibc to trim every `every` seconds of a network's clock, on the
network's own loop. Elsewhere (musl, macOS) it does nothing. `in_use_mb` is what
malloc holds alive, which the soak samples beside RSS (docs/soak.md, finding 29).

Trimming reaches only what malloc holds. CPython's own allocator for small objects
(pymalloc) keeps them in 1 MiB arenas it maps itself and gives back only when every
object in one is gone, so a pool process under faults keeps the arenas of its
largest burst, each held by a few long-lived objects, and its resident size creeps
up by an arena now and then for as long as it runs (2.3-2.7 MB an hour in the
soak's half hours, finding 31). With `PYTHONMALLOC=malloc` every object comes from
glibc, whose free pages the trim gives back, and the same half hour's floor stops
rising after its first quarter hour. So a process that runs a pool for long (`manycast
run`, the soak's pool processes) runs under `LONG_RUN_ALLOCATOR` unless the user's
environment names an allocator (`long_run_environment`); bench/allocator.py
measures what it costs in CPU time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable, Mapping
from typing import Any

from manycast.drivers.contract import Network

TRIM_EVERY_S = 30.0
LONG_RUN_ALLOCATOR = "malloc"  # PYTHONMALLOC for processes that run a pool for long


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@functools.cache
def _libc(name: str, restype: Any, *argtypes: Any) -> Callable[..., Any] | None:
    """glibc's function `name`, typed; None where the C library has none of it."""
    library = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(library) if library else None
        function = getattr(libc, name, None)
    except OSError:
        return None
    if function is None:
        return None
    function.argtypes = list(argtypes)
    function.restype = restype
    return function  # type: ignore[no-any-return]


def _malloc_trim() -> Callable[[int], int] | None:
    return _libc("malloc_trim", ctypes.c_int, ctypes.c_size_t)


def in_use_mb() -> float | None:
    """The bytes malloc has handed out and not had back, in MB: what the heap holds
    alive, unlike RSS, which also holds what glibc keeps (glibc's `mallinfo2`, 2.33
    on: its main arena, where a single-threaded asyncio process allocates, and its
    mmapped chunks). None elsewhere."""
    info = _libc("mallinfo2", _MallInfo2)
    if info is None:
        return None
    got = info()
    in_use: int = got.uordblks + got.hblkhd
    return round(in_use / 2**20, 3)


def trim() -> bool:
    """Give the heap's free memory back now; False where glibc is not the allocator."""
    release = _malloc_trim()
    if release is None:
        return False
    release(0)
    return True


def trim_every(network: Network, every: float = TRIM_EVERY_S) -> None:
    """Trim every `every` seconds of `network`'s clock from now on (while it runs)."""
    if _malloc_trim() is None:
        return

    def tick() -> None:
        trim()
        network.call_at(network.now + every, tick)

    network.call_at(network.now + every, tick)


def long_run_environment(environment: Mapping[str, str]) -> dict[str, str] | None:
    """`environment` with `PYTHONMALLOC=LONG_RUN_ALLOCATOR`, for a process that runs a
    pool for long to start with; None when it names an allocator already (the user's
    choice, or this process was started so) or where glibc's trim is missing."""
    if "PYTHONMALLOC" in environment or _malloc_trim() is None:
        return None
    return {**environment, "PYTHONMALLOC": LONG_RUN_ALLOCATOR}
