"""The chaos soak's short variant (`bench/soak.py --minutes 1.5`), so that its
harness cannot rot: every kind of fault happens, no pool process dies or logs a
traceback, the fault windows are measured, and (the goal) no session is lost
beyond those that died with a killed server.

200 clients rather than the bench's 1000: on a loaded 2-core machine 1000 clients
alone saturate the pool's processes and time out for want of CPU, which would
measure the machine, not the faults.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
MINUTES = 1.5

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def soak(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    plots = tmp_path_factory.mktemp("soak")
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH / "soak.py"),
            "--minutes",
            str(MINUTES),
            "--clients-per-lan",
            "100",
            "--plots",
            str(plots),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = done.stdout.strip().splitlines()
    assert lines, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(lines[-1])
    assert "error" not in result, result.get("error")
    result["_returncode"] = done.returncode
    result["_plots"] = sorted(p.name for p in plots.iterdir())
    return result


def test_every_kind_of_fault_happens(soak: dict[str, Any]) -> None:
    assert set(soak["faults"]) == set(soak["fault_kinds"])
    assert all(count >= 1 for count in soak["faults"].values()), soak["faults"]
    # the infrastructure process carried out every fault it was given
    inside = sum(n for k, n in soak["faults"].items() if k not in ("kill", "flood"))
    assert soak["infra_faults_done"] >= inside
    assert soak["flood_sent"]["malformed"] > 0 and soak["flood_sent"]["replayed"] > 0


def test_no_process_dies_or_logs_a_traceback(soak: dict[str, Any]) -> None:
    assert soak["unexpected_exits"] == []
    assert soak["tracebacks"] == {}


def test_the_pool_serves_and_is_measured(soak: dict[str, Any]) -> None:
    assert soak["requests_answered"] > 0
    assert len(soak["per_minute"]) == 2 and soak["per_minute"][0]["answered"] > 0
    assert soak["sessions_lost_to_crashes"] > 0  # killed servers held sessions
    for name in ("infra", "clients", "bench"):
        growth = soak["growth_per_hour"][name]
        assert growth["samples"] >= 3 and growth["rss_mb_per_hour"] is not None
    assert soak["_plots"] == ["soak.json", "soak_requests.png", "soak_rss.png"]


@pytest.mark.xfail(
    reason="the soak finds sessions lost with R3 under overlapping faults "
    "(docs/soak.md, 'Findings'); the goal is 0",
    strict=False,
)
def test_no_session_lost_with_a_lossless_technique(soak: dict[str, Any]) -> None:
    assert soak["technique"] == "R3"
    assert soak["sessions_lost"] == 0, soak["sessions_lost_by_cause"]
    assert soak["wrong_answers"] == 0
    assert soak["_returncode"] == 0


def _failures_after(driver: str, seconds: float) -> list[tuple[float, str]]:
    sys.path.insert(0, str(BENCH))
    from _pool import PORT_SEARCH
    from _soak_plan import WARMUP_S, scenario_text
    from manycast.ports import free_base_port
    from manycast.runtime import PoolRun
    from manycast.topology import loads

    topo = loads(scenario_text(20261201, seconds, 100))
    base = free_base_port(topo.attachment_count, PORT_SEARCH)
    run = PoolRun(topo, driver, seed=20261201, base_port=base)
    try:
        run.run(seconds, None)
        clients = run.nodes.clients.values()
        assert sum(c.stats.requests_ok for c in clients) > 100 * seconds  # the pool served
        return sorted((t, why) for c in clients for t, why in c.stats.failures if t >= WARMUP_S)
    finally:
        run.close()


def test_seed_20261201_share_changes_and_joins_lose_nothing_on_the_memory_driver() -> None:
    """The soak's seed 20261201 broke most sessions after `set_share s1 0.323` at
    29.9 s (and after s6 joined at 45.1 s); the same steps on the memory driver lose
    none: whatever breaks them needs real time (docs/soak.md, Findings)."""
    assert _failures_after("memory", 60.0) == []


@pytest.mark.xfail(
    reason="seed 20261201: on the overlay, one process, set_share s1 0.323 at 29.9 s "
    "resets or times out about a tenth of the R3 sessions (docs/soak.md, Findings)",
    strict=False,
)
def test_seed_20261201_share_change_loses_nothing_on_the_overlay() -> None:
    assert _failures_after("overlay", 38.0) == []
