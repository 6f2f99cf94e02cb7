"""Which losses the soak charges to a crash (`bench/_soak_analysis.analyse`)."""

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


def _analyse(analysis: ModuleType, losses: list[list[Any]]) -> dict[str, Any]:
    plan = importlib.import_module("_soak_plan")
    kill = plan.Fault("kill", 356.7, 359.9, {"server": "s3"})
    # two clients, both owned by s4 in every allocation
    infra = {"epochs": {1: (0.0, [1, 1])}, "servers": ["s3", "s4"], "done": []}
    clients = {
        "names": ["a1", "a2"],
        "losses": losses,
        "wrong": [],
        "watch": [],
        "again": [],
        "ok_per_s": {},
        "failed_per_s": {},
        "latency_per_min": {},
        "connected_at_end": 2,
    }
    return analysis.analyse([kill], infra, clients, 600.0, "D", 0.5)  # type: ignore[no-any-return]


def test_a_d_session_held_by_the_killed_server_died_with_it(analysis: ModuleType) -> None:
    """docs/soak.md finding 23 (seed 20261201, technique D): s3's kill at 356.7 s lost
    10 sessions of clients that s4 or s6 owned, which counted in `sessions_lost`; each
    one's connection was sent to s3, which held its only state (a loaded owner passes
    new connections to a less loaded server, which keeps them). Charged to the crash
    now; a session on s4 lost at the same moment still counts."""
    result = _analyse(
        analysis,
        [[0, 358.67, "no answer", None, "s3"], [1, 358.91, "no answer", None, "s4"]],
    )
    assert result["sessions_lost_to_crashes"] == 1
    assert result["sessions_lost"] == 1
    assert [row["via"] for row in result["sessions_lost_all"]] == ["s4"]


def test_without_the_server_held_the_owner_decides(analysis: ModuleType) -> None:
    """R3's connections go to the group, and the lab's records name no server."""
    result = _analyse(
        analysis, [[0, 358.67, "no answer", None, "group"], [1, 358.91, "no answer", None]]
    )
    assert result["sessions_lost_to_crashes"] == 0
    assert result["sessions_lost"] == 2
