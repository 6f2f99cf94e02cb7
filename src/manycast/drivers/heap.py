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
network's own loop. Elsewhere (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

from manycast.drivers.contract import Network

TRIM_EVERY_S = 30.0


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        return None
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


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
