"""What a bench reads of a running process from /proc: its resident memory, split
into anonymous and file-backed pages, and its open descriptors.

Run alone, it prints one json object, its last line on stdout, naming the bench
to run (`_common.not_a_bench`).
"""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
import os
from pathlib import Path


def resident(pid: int) -> dict[str, float] | None:
    """RSS in MB, split into its anonymous part (heaps, arenas, stacks) and its
    file-backed part (the pages of mapped code and libraries the process has touched:
    clean, shared, given back by the kernel at need), and the open descriptors of
    `pid`; None when it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    kib = {
        key: int(rest.split()[0])
        for key, _, rest in (line.partition(":") for line in status.splitlines())
        if key in ("VmRSS", "RssAnon", "RssFile")
    }
    if "VmRSS" not in kib:
        return None  # a zombie: its memory is gone
    got: dict[str, float] = {"rss_mb": round(kib["VmRSS"] / 1024, 2), "fds": fds}
    if "RssAnon" in kib and "RssFile" in kib:
        got["rss_anon_mb"] = round(kib["RssAnon"] / 1024, 2)
        got["rss_file_mb"] = round(kib["RssFile"] / 1024, 2)
    return got


if __name__ == "__main__":
    from _common import not_a_bench

    not_a_bench(__file__, "bench/soak.py")
