"""The soak's VIP pool figures (`bench/_soak_vip.analyse_vip`), from what its clients'
process keeps (`bench/_soak_hosts._clients_setup`)."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> tuple[ModuleType, ModuleType]:
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("_soak_vip"), importlib.import_module("_soak_plan")


def _vip(losses: list[list[Any]], watch: list[float]) -> dict[str, Any]:
    return {
        "names": ["v1", "v2", "v3"],
        "losses": losses,
        "wrong": [],
        "watch": watch,
        "again": [[101.0, 101.5, 102.0] for _ in watch],
        "ok_per_s": {99: 3, 101: 3},
        "failed_per_s": {100: 1},
        "served_at_end": 3,
    }


def test_a_vip_session_lost_at_a_router_kill_is_counted_against_it(
    bench: tuple[ModuleType, ModuleType],
) -> None:
    """Seed 20261201, D, 12 minutes: the first VIP session lost in a soak ended the
    run in "too many values to unpack" and took every figure with it. A loss is kept
    as [client, t, cause, first answer after, the server its connection was sent
    to] (`_clients_setup`)."""
    vip_module, plan = bench
    kill = plan.Fault("vip_router_kill", at=100.0, until=103.0)
    losses = [
        [1, 100.4, "reset", 101.5, "group"],  # the kill's
        [2, 5.0, "closed", 5.5, "group"],  # in the warm-up: apart
        [0, 300.0, "ConnectionTimedOut", None, None],  # nobody's, never answered again
    ]
    got = vip_module.analyse_vip([kill], _vip(losses, watch=[100.0]))
    summary = got["summary"]
    assert summary["sessions_lost"] == 2
    assert summary["sessions_lost_in_warmup"] == 1
    assert summary["sessions_lost_by_cause"] == {"reset": 1, "ConnectionTimedOut": 1}
    assert [(d["client"], d["after"]) for d in summary["sessions_lost_detail"]] == [
        ("v2", "vip_router_kill@100.0"),
        ("v1", None),
    ]
    (row,) = got["rows"]
    assert row["affected"] == 1
    assert row["recovery_s"] == 2.0  # every client answered again by 102.0
    assert summary["requests_answered"] == 6 and summary["requests_failed"] == 1
