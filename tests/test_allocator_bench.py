"""bench/allocator.py: the pool's replayed half of a soak under glibc's malloc and
under pymalloc, in fresh interpreters, rounds in random order, ending in one JSON
object with the CPU ratio of the two."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "allocator.py"


def test_each_allocator_runs_the_same_pool_and_the_ratio_is_theirs() -> None:
    command = [sys.executable, str(BENCH), "--rounds", "1", "--seconds", "60", "--per-lan", "5"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(result["order"]) == ["malloc", "pymalloc"]
    per = result["allocators"]
    for name in ("malloc", "pymalloc"):
        assert per[name]["cpu_s_median"] > 0
        assert len(per[name]["rss_anon_mb_by_tenth"][0]) == 10
    ratio = per["malloc"]["cpu_s_median"] / per["pymalloc"]["cpu_s_median"]
    assert result["cpu_ratio_malloc_to_pymalloc"] == round(ratio, 3)
    assert "round 1/2" in done.stderr  # progress on stderr
