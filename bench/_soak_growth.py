"""The soak's growth figures: how fast each long-lived process's memory and
descriptors grow, per hour, from the samples the bench takes each 10 s
(`bench/_proc_sample.py`) and the rows each pool process takes of its own heap
(`_pool.host_pool`).

scipy, which fits these lines, is imported where it is used, not with this module:
the pool processes the soak spawns import bench/soak.py again (as `__mp_main__`,
for their targets), and scipy would add some 70 MB to each process whose memory
is measured.

Run alone, it prints one json object, its last line on stdout, naming the bench
to run (`_common.not_a_bench`).
"""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from _soak_plan import WARMUP_S

# The window whose lowest RSS sample is the floor (`fit_per_hour`): twice the period of
# the pool processes' heap trim (`drivers/heap.py`), so each holds a sample after one.
FLOOR_WINDOW_S = 60.0
# A live-heap row's figures after its bench time (`_pool.host_pool`).
_LIVE_COLUMNS = ("blocks_k", "malloc_mb", "arenas_mb", "arena_used_mb")


def fit_per_hour(
    samples: list[dict[str, Any]],
    names: Sequence[str],
    since: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Per process: RSS (MB) and descriptors, first and last sample, and the slope of a
    least-squares line per hour over the samples after the warm-up (None under 3), or
    after its bench time in `since` (a process whose nodes start later: a standby's).
    `rss_floor_mb_per_hour` is the slope through the lowest RSS of each
    `FLOOR_WINDOW_S` instead (`_floor_line`): a process that works in bursts peaks
    after each and gives the memory back at its next heap trim, so the line through
    every sample follows where the last samples fell in that saw-tooth, while a leak
    raises the floor. With it, what "within noise of 0" means
    (`rss_floor_noise_mb_per_hour`, `rss_floor_ci_mb_per_hour`) and the second half's
    slope (`rss_floor_late_mb_per_hour`). The same floor lines of RSS's anonymous part
    (`rss_anon_*`: heaps, arenas) and of its file-backed part (`rss_file_*`: pages of
    mapped code touched, which the kernel may take back at any time) tell memory kept
    from code first run (`bench/_proc_sample.py`)."""
    out: dict[str, Any] = {}
    for name in names:
        start = (since or {}).get(name, WARMUP_S)
        points = [(s["t"], s[name]) for s in samples if name in s and s["t"] >= start]
        entry: dict[str, Any] = {"samples": len(points), "from_s": round(start, 1)}
        for key in ("rss_mb", "fds"):
            if points:
                entry[f"{key}_first_last"] = [points[0][1][key], points[-1][1][key]]
            entry[f"{key}_per_hour"] = _slope_per_hour([(t, got[key]) for t, got in points])
        for part in ("rss", "rss_anon", "rss_file"):
            key = f"{part}_mb"
            if part != "rss" and not all(key in got for _, got in points):
                continue  # the lab's samples, or a kernel without the split
            if part != "rss" and points:
                entry[f"{key}_first_last"] = [points[0][1][key], points[-1][1][key]]
            _put_floor(entry, f"{part}_floor{{}}_mb_per_hour", points, key)
        out[name] = entry
    return out


def fit_live_heap(
    series: dict[str, list[list[Any]]], since: Mapping[str, float] | None = None
) -> dict[str, Any]:
    """Per process, from the rows it sampled inside itself ([bench time, allocated
    blocks, malloc MB in use, pymalloc's MB of arenas held, its MB of blocks in use],
    `_pool.host_pool`; the last two absent from older rows): the floor lines of what
    its heap holds, as `fit_per_hour` fits RSS's, in thousands of blocks and in MB.
    A process whose RSS floor rises while its live blocks and malloc's bytes stay
    level keeps memory it has freed, it does not leak; `live_arenas_mb` rising while
    `live_arena_used_mb` stays level says where: pymalloc's arenas, each held by a
    few long-lived objects (`_pymalloc`). From the warm-up's end, or `since`'s time
    as `fit_per_hour`."""
    out: dict[str, Any] = {}
    for name, rows in series.items():
        start = (since or {}).get(name, WARMUP_S)
        points = [
            (row[0], dict(zip(_LIVE_COLUMNS, (_thousands(row[1]), *row[2:]), strict=False)))
            for row in rows
            if row[0] >= start
        ]
        entry: dict[str, Any] = {}
        for key in _LIVE_COLUMNS:
            if not points or points[0][1].get(key) is None:
                continue
            entry[f"live_{key}_first_last"] = [points[0][1][key], points[-1][1][key]]
            _put_floor(entry, f"live_{key}_floor{{}}_per_hour", points, key)
        out[name] = entry
    return out


def _thousands(blocks: float | None) -> float | None:
    return None if blocks is None else blocks / 1000


def _put_floor(
    entry: dict[str, Any], name: str, points: list[tuple[float, dict[str, Any]]], key: str
) -> None:
    """`key`'s floor line (`_floor_line`) into `entry`: its slope, noise, interval and
    second half under `name` with "", "_noise", "_ci" and "_late" in its braces."""
    figures = _floor_line(_floors(points, key))
    for kind, value in zip(("", "_noise", "_ci", "_late"), figures, strict=True):
        entry[name.format(kind)] = value


def _floor_line(
    floors: list[tuple[float, float]],
) -> tuple[float | None, float | None, list[float] | None, float | None]:
    """A floor's growth per hour: the Theil-Sen slope (the median of the slopes
    between every two windows; None under 3), half the width of its 95 % interval
    (the noise: a slope within it is within noise of 0) and the interval itself (None
    under 4), and the slope over the second half of the run alone (None under 6).

    The median, not least squares: a window can hold no trough (a burst whose objects
    live past it), and such a window pulls a least-squares line far more than its
    weight; the 60-minute run of finding 29 had five in its last twelve minutes (1 to
    6 MB above a floor level within 0.4 MB over the last 40 minutes), which made the
    second half's floor rise 4.9 MB an hour by least squares. The second half's
    slope tells growth that levels off (a heap reaching its working size over the
    first faults: allocation changes, connection tables) from a leak, which goes on
    in the second half."""
    if len(floors) < 3:
        return None, None, None, None
    slope, interval = _sen(floors)
    late = _sen(floors[len(floors) // 2 :])[0] if len(floors) >= 6 else None
    if len(floors) < 4:
        return slope, None, None, late
    return slope, round((interval[1] - interval[0]) / 2, 2), interval, late


def _sen(points: list[tuple[float, float]]) -> tuple[float, list[float]]:
    """The Theil-Sen slope of (seconds, value) points per hour, and its 95 % interval."""
    from scipy.stats import theilslopes  # here: not in the measured processes (docstring)

    t = np.array([p[0] for p in points], dtype=float)
    y = np.array([p[1] for p in points], dtype=float)
    fit = theilslopes(y, t, alpha=0.95)
    per_hour = [round(float(v) * 3600, 2) for v in (fit.slope, fit.low_slope, fit.high_slope)]
    return per_hour[0], per_hour[1:]


def _floors(
    points: list[tuple[float, dict[str, Any]]], key: str = "rss_mb"
) -> list[tuple[float, float]]:
    """The lowest `key` sample of each whole `FLOOR_WINDOW_S` from the first sample on (a
    window the run ended in is left out: it may hold only a peak)."""
    if len(points) < 2:
        return []
    times = [t for t, _ in points]
    spacing = float(np.median(np.diff(times)))
    floors: dict[int, tuple[float, float]] = {}
    for t, got in points:
        window = int((t - times[0]) // FLOOR_WINDOW_S)
        if times[0] + (window + 1) * FLOOR_WINDOW_S > times[-1] + spacing:
            break
        if window not in floors or got[key] < floors[window][1]:
            floors[window] = (t, got[key])
    return list(floors.values())


def _slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """The least-squares slope of (seconds, value) points, per hour; None under 3."""
    if len(points) < 3:
        return None
    t = np.array([p[0] for p in points], dtype=float)
    y = np.array([p[1] for p in points], dtype=float)
    return round(float(np.polyfit(t, y, 1)[0]) * 3600, 2)


if __name__ == "__main__":
    from _common import not_a_bench

    not_a_bench(__file__, "bench/soak.py")
