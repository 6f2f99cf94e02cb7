"""What CPython's small-object allocator (pymalloc) holds, read inside a process.

Objects of 512 bytes or less live in pymalloc's 1 MiB arenas, which it maps
itself (not through malloc, so glibc's `mallinfo2` does not see them) and gives
back only when every object in one is gone. A process whose live blocks stay
level can still hold more and more arenas, each kept by a few long-lived objects
among freed ones: its anonymous RSS rises and its heap does not. `arenas` tells
the two apart: the MB of arenas held, and the MB of blocks in use inside them.

CPython prints these figures only (`sys._debugmallocstats`, on the C stderr), so
`arenas` points descriptor 2 at a file for the call (about half a millisecond).
None where the interpreter has no such report (another allocator, PyPy).

Run alone, it prints one json object, its last line on stdout, naming the bench
to run (`_common.not_a_bench`).
"""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
import os
import re
import sys
import tempfile

_MB = 2**20
_FIGURE = re.compile(r"^# (arenas allocated current|bytes in allocated blocks)\s*=\s*([\d,]+)$")
_ARENA_BYTES = re.compile(r"^\d+ arenas \* (\d+) bytes/arena", re.MULTILINE)


def parse(report: str) -> tuple[float, float] | None:
    """(MB of arenas held, MB of blocks in use in them) from the report's text; None
    when it lacks either figure (the interpreter runs another allocator)."""
    figures: dict[str, int] = {}
    for line in report.splitlines():
        found = _FIGURE.match(line.strip())
        if found:
            figures[found.group(1)] = int(found.group(2).replace(",", ""))
    size = _ARENA_BYTES.search(report)
    arena_bytes = int(size.group(1)) if size else _MB  # 1 MiB since CPython 3.10
    if len(figures) < 2:
        return None
    held = figures["arenas allocated current"] * arena_bytes / _MB
    return round(held, 3), round(figures["bytes in allocated blocks"] / _MB, 3)


def arenas() -> tuple[float, float] | None:
    """This process's (MB of pymalloc arenas held, MB of blocks in use in them)."""
    report = getattr(sys, "_debugmallocstats", None)
    if report is None:
        return None
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as out:
            os.dup2(out.fileno(), 2)
            try:
                report()
            finally:
                os.dup2(saved, 2)
            out.seek(0)
            return parse(out.read().decode(errors="replace"))
    finally:
        os.close(saved)


if __name__ == "__main__":
    from _common import not_a_bench

    not_a_bench(__file__, "bench/soak.py")
