"""The soak's memory figures (`bench/_soak_analysis.fit_per_hour`): the growth of a
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
    return importlib.import_module("_soak_analysis")


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
