"""The soak's memory figures (`bench/_soak_growth.fit_per_hour`): the growth of a
process's floor, beside the line through every sample.

A pool process that works in bursts (the infrastructure at each router restart)
peaks after each and gives the memory back at its next heap trim (every 30 s), so a
line through every sample follows where the last samples fell in that saw-tooth; a
leak raises the lowest sample of each minute as well.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def analysis(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("_soak_growth")


def _samples(rss: list[float], every: float = 10.0, start: float = 10.0) -> list[dict[str, Any]]:
    return [
        {"t": start + i * every, "infra": {"rss_mb": value, "fds": 20}}
        for i, value in enumerate(rss)
    ]


def _saw_tooth(minutes: int, leak_per_minute: float = 0.0) -> list[float]:
    """Six samples a minute: a floor of 80 MB (plus the leak), a 9 MB peak after a burst
    in the fifth sample, given back at the sixth, and the last minute ending on a peak."""
    rss: list[float] = []
    for minute in range(minutes):
        floor = 80.0 + leak_per_minute * minute
        rss += [floor, floor, floor + 0.5, floor, floor + 9.0, floor]
    rss[-1] = rss[-2]
    return rss


def test_a_saw_tooth_with_a_level_floor_has_no_floor_growth(analysis: ModuleType) -> None:
    growth = analysis.fit_per_hour(_samples(_saw_tooth(5)), ["infra"])["infra"]
    assert growth["samples"] == 30
    assert growth["rss_mb_per_hour"] > 5  # the last samples on a peak pull the line up
    assert growth["rss_floor_mb_per_hour"] == pytest.approx(0.0, abs=0.01)


def test_a_leak_raises_the_floor(analysis: ModuleType) -> None:
    growth = analysis.fit_per_hour(_samples(_saw_tooth(5, leak_per_minute=0.5)), ["infra"])
    assert growth["infra"]["rss_floor_mb_per_hour"] == pytest.approx(30.0, abs=0.01)


def test_under_three_minutes_there_is_no_floor(analysis: ModuleType) -> None:
    growth = analysis.fit_per_hour(_samples(_saw_tooth(2)), ["infra"])["infra"]
    assert growth["rss_floor_mb_per_hour"] is None
    assert growth["rss_mb_per_hour"] is not None


def _noisy(values: list[float], seed: int = 1, spread: float = 1.0) -> list[float]:
    import random

    rng = random.Random(seed)
    return [v + rng.uniform(0.0, spread) for v in values]


def test_a_level_floor_is_within_its_noise_and_a_leak_is_not(analysis: ModuleType) -> None:
    """The floor's slope is given with its noise (twice its standard error): a floor
    that wanders by a megabyte and stays level is within it; a leak of 10 MB an hour,
    half the wander in a minute, is well outside."""
    level = analysis.fit_per_hour(_samples(_noisy(_saw_tooth(30))), ["infra"])["infra"]
    assert level["rss_floor_noise_mb_per_hour"] > 0
    assert abs(level["rss_floor_mb_per_hour"]) <= level["rss_floor_noise_mb_per_hour"]
    leak = _noisy(_saw_tooth(30, leak_per_minute=10 / 60))
    leaking = analysis.fit_per_hour(_samples(leak), ["infra"])["infra"]
    assert leaking["rss_floor_mb_per_hour"] == pytest.approx(10.0, abs=3.0)
    assert leaking["rss_floor_mb_per_hour"] > 2 * leaking["rss_floor_noise_mb_per_hour"]


def test_growth_that_levels_off_is_told_from_a_leak_by_the_late_floor(
    analysis: ModuleType,
) -> None:
    """A heap that reaches its working size over the first minutes (80 to 86 MB in 5)
    and then stays there: the second half's floor does not rise; a leak's does."""
    warm = [min(80.0 + 0.2 * i, 86.0) for i in range(180)]  # 30 minutes, 6 a minute
    leveled = analysis.fit_per_hour(_samples(warm), ["infra"])["infra"]
    assert leveled["rss_mb_per_hour"] > 5  # least squares through every sample
    assert leveled["rss_floor_late_mb_per_hour"] == pytest.approx(0.0, abs=0.01)
    leak = [80.0 + 0.02 * i for i in range(180)]  # 7.2 MB an hour throughout
    leaking = analysis.fit_per_hour(_samples(leak), ["infra"])["infra"]
    assert leaking["rss_floor_late_mb_per_hour"] == pytest.approx(7.2, abs=0.5)
    short = analysis.fit_per_hour(_samples(_saw_tooth(4)), ["infra"])["infra"]
    assert short["rss_floor_late_mb_per_hour"] is None


def test_a_few_windows_without_a_trough_do_not_make_a_level_floor_rise(
    analysis: ModuleType,
) -> None:
    """A window can hold no trough (a burst whose objects outlive it): the finding-29
    hour had five such in its last twelve minutes, up to 6 MB above a floor level
    within 0.4 MB. The floor's line is the median of the slopes between windows, so
    four such minutes do not tilt it; a least-squares line through these floors rises
    4.6 MB an hour."""
    rss = _noisy(_saw_tooth(60), spread=0.3)
    for minute in (51, 53, 56, 58):  # every sample of the minute high
        rss[minute * 6 : minute * 6 + 6] = [94.0] * 6
    growth = analysis.fit_per_hour(_samples(rss), ["infra"])["infra"]
    low, high = growth["rss_floor_ci_mb_per_hour"]
    assert low <= 0 <= high, growth
    assert abs(growth["rss_floor_mb_per_hour"]) <= growth["rss_floor_noise_mb_per_hour"]
    assert abs(growth["rss_floor_late_mb_per_hour"]) < 1.0, growth


def _heap_rows(blocks: list[float], every: float = 10.0, start: float = 10.0) -> list[list[Any]]:
    return [[start + i * every, int(b * 1000), b / 10] for i, b in enumerate(blocks)]


def test_the_live_heap_is_fitted_as_rss_is(analysis: ModuleType) -> None:
    """What a process holds alive (thousands of blocks, malloc MB), sampled inside it:
    a level saw-tooth has no floor growth, a leak has it, in both figures."""
    level = analysis.fit_live_heap({"infra": _heap_rows(_noisy(_saw_tooth(30)))})["infra"]
    assert level["live_blocks_k_first_last"][0] >= 80
    assert abs(level["live_blocks_k_floor_per_hour"]) <= level["live_blocks_k_floor_noise_per_hour"]
    leak = _heap_rows(_noisy(_saw_tooth(30, leak_per_minute=10 / 60)))
    leaking = analysis.fit_live_heap({"infra": leak})["infra"]
    assert leaking["live_blocks_k_floor_per_hour"] == pytest.approx(10.0, abs=3.0)
    assert leaking["live_malloc_mb_floor_per_hour"] == pytest.approx(1.0, abs=0.3)
    assert (
        leaking["live_blocks_k_floor_late_per_hour"]
        > 2 * level["live_blocks_k_floor_noise_per_hour"]
    )


def test_without_mallinfo_only_the_blocks_are_fitted(analysis: ModuleType) -> None:
    rows = [[t, blocks, None] for t, blocks, _ in _heap_rows(_saw_tooth(5))]
    got = analysis.fit_live_heap({"clients": rows})["clients"]
    assert got["live_blocks_k_floor_per_hour"] == pytest.approx(0.0, abs=0.01)
    assert not any(key.startswith("live_malloc") for key in got)


def test_the_anonymous_and_file_backed_floors_are_fitted_apart(analysis: ModuleType) -> None:
    """Code first run pulls the pages of its libraries in: the file-backed part of RSS
    grows while the anonymous part (heaps, arenas) stays level, and the fit says so."""
    samples = _samples(_saw_tooth(6))
    for i, sample in enumerate(samples):
        figures = sample["infra"]
        figures["rss_file_mb"] = 30.0 + i / 6  # one MB a minute: 60 an hour
        figures["rss_anon_mb"] = figures["rss_mb"]
        figures["rss_mb"] += figures["rss_file_mb"]
    growth = analysis.fit_per_hour(samples, ["infra"])["infra"]
    assert growth["rss_floor_mb_per_hour"] == pytest.approx(60.0, abs=0.5)
    assert growth["rss_anon_floor_mb_per_hour"] == pytest.approx(0.0, abs=0.01)
    assert growth["rss_file_floor_mb_per_hour"] == pytest.approx(60.0, abs=0.5)
    assert growth["rss_file_mb_first_last"] == [30.0, 30.0 + 35 / 6]


def test_a_process_is_read_from_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bench's sample of a live process: its two parts add up to its RSS."""
    import os

    monkeypatch.syspath_prepend(str(BENCH))
    resident = importlib.import_module("_proc_sample").resident
    got = resident(os.getpid())
    assert got is not None and got["fds"] > 0
    assert got["rss_anon_mb"] + got["rss_file_mb"] == pytest.approx(got["rss_mb"], abs=1.0)
    assert resident(2**22 + 1) is None  # above pid_max: no such process


def test_the_pool_processes_do_not_load_the_fit() -> None:
    """scipy, which fits the growth lines, would add some 70 MB to each process whose
    memory the soak measures. Those processes are spawned: each imports bench/soak.py
    again as `__mp_main__` (for its target), then its target's module."""
    import subprocess
    import sys

    probe = (
        "import runpy, sys\n"
        "runpy.run_path('soak.py', run_name='__mp_main__')\n"
        "import _soak_hosts, _soak_vip\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('scipy', 'matplotlib')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=BENCH, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_arenas_held_by_few_objects_are_told_from_a_growing_heap(analysis: ModuleType) -> None:
    """Rows with pymalloc's figures: arenas held rise a MB every two minutes while the
    blocks in use in them, the live blocks and malloc's bytes stay level, and the fit
    says which of the four grew."""
    rows = [
        [t, blocks, mb, 20.0 + i // 12, 12.0 + (i % 6) / 10]
        for i, (t, blocks, mb) in enumerate(_heap_rows(_saw_tooth(30)))
    ]
    got = analysis.fit_live_heap({"infra": rows})["infra"]
    assert got["live_arenas_mb_floor_per_hour"] == pytest.approx(30.0, abs=1.0)
    assert got["live_arenas_mb_first_last"][0] == 20.0
    for level in ("arena_used_mb", "blocks_k", "malloc_mb"):
        assert abs(got[f"live_{level}_floor_per_hour"]) <= got[f"live_{level}_floor_noise_per_hour"]


def test_under_glibcs_malloc_only_mallocs_count_is_fitted(analysis: ModuleType) -> None:
    """With `PYTHONMALLOC=malloc` (the soak's default) a process has no pymalloc blocks
    or arenas to count (None in its rows); malloc's MB in use holds every object."""
    rows = [[t, None, 40 + mb, None, None] for t, _, mb in _heap_rows(_saw_tooth(5))]
    got = analysis.fit_live_heap({"infra": rows})["infra"]
    assert got["live_malloc_mb_floor_per_hour"] == pytest.approx(0.0, abs=0.01)
    assert got["live_malloc_mb_first_last"][0] == pytest.approx(48.0)
    assert not any(key.startswith(("live_blocks", "live_arena")) for key in got)


def test_a_standby_is_fitted_from_its_time_not_from_before_its_join(
    analysis: ModuleType,
) -> None:
    """A standby's process holds a server that has not started until its join, which
    starts it (a step in its memory, as the pool's start is in the others'); so its
    line starts at the time `since` gives it."""
    idle = [60.0] * 12  # two minutes a standby
    rss = idle + [70.0 + 0.01 * i for i in range(60)]  # joined at 130 s; 0.06 MB/min
    samples = _samples(rss)
    whole = analysis.fit_per_hour(samples, ["infra"])["infra"]
    since = analysis.fit_per_hour(samples, ["infra"], {"infra": 140.0})["infra"]
    assert whole["from_s"] == 10.0 and since["from_s"] == 140.0
    assert since["samples"] == len(rss) - 13
    assert whole["rss_mb_per_hour"] > 10 * since["rss_mb_per_hour"]  # the join's step
    assert since["rss_mb_per_hour"] == pytest.approx(3.6, abs=0.01)
