"""bench/soak.py --lab: the chaos soak in the kernel lab (docs/soak.md).

A short run: the soak's pool in namespaces with a few clients per LAN, server kills,
router-daemon restarts and loss bursts from the seeded schedule, 1 minute. The run
needs root and network namespaces; elsewhere it skips and says why. The refusals
(a kind the lab cannot do, no root) need neither.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from labcheck import lab_missing
from manycast.drivers import netns

BENCH = Path(__file__).resolve().parent.parent / "bench"
NEEDS_ROOT = "the kernel lab needs root and network namespaces; CI runs as root"
CLIENTS_PER_LAN = 4


def _lab_possible() -> str | None:
    missing = lab_missing()
    if missing is None and shutil.which("nft") is None:
        return "the lab soak's loss bursts need nft (nftables)"
    return missing


def _soak(*options: str, prefix: list[str] | None = None, timeout: float = 240) -> Any:
    done = subprocess.run(
        [*(prefix or []), sys.executable, str(BENCH / "soak.py"), *options],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = done.stdout.strip().splitlines()
    assert lines, done.stderr[-3000:]
    return done, json.loads(lines[-1])


def test_lab_refuses_a_kind_it_cannot_do_and_says_why() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "soak.py"), "--lab", "--kinds", "kill,delay_spike"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--lab does not do delay_spike" in done.stderr and "netem" in done.stderr


def test_lab_without_root_ends_in_an_error_naming_root() -> None:
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("unshare") is None:
            pytest.skip("running as root, and no unshare to run as another user")
        prefix = ["unshare", "--user"]  # the same files, but not root
    done, result = _soak("--lab", "--minutes", "0.1", prefix=prefix, timeout=60)
    assert done.returncode == 1
    assert "needs root" in result["error"], result


@pytest.mark.lab
@pytest.mark.slow
@pytest.mark.skipif(_lab_possible() is not None, reason=_lab_possible() or "")
def test_lab_soak_lives_through_kills_and_router_restarts() -> None:
    done, result = _soak(
        "--lab",
        "--minutes",
        "1",
        "--clients-per-lan",
        str(CLIENTS_PER_LAN),
        "--kinds",
        "kill,router_restart,loss_burst",
    )
    assert "error" not in result, done.stderr[-3000:]
    assert result["variant"] == "kernel lab"
    clients = 2 * CLIENTS_PER_LAN
    assert result["clients"] == clients
    # The faults drawn were carried out, each the lab's way.
    assert result["faults"]["kill"] >= 1 and result["faults"]["router_restart"] >= 1, result
    assert result["faults_not_carried_out"] == []
    for row in result["per_fault"]:
        assert row["carried_out"] is not None, row
        if row["kind"] == "kill":  # started again, and ready
            assert row["ready_at"] > row["restarted_at"] >= row["until"] - 0.5, row
        if row["kind"] == "router_restart":  # a fresh daemon, ready after the drawn outage
            assert row["down_actual_s"] >= row["down_s"], row
            assert row["behind_not_answered_again"] == 0, row
        if row["kind"] == "loss_burst":  # the rules were in place at both ends of ra-rb
            assert set(row["dropped"]) == {"ra", "rb"}, row
    assert len(result["router_starts"]) == result["faults"]["router_restart"]
    # Why the allocation changed, from s1's agent on the bench's clock: every rb outage
    # (a daemon starting, longer than the failure detection) removed s3 or s4.
    assert result["epoch_changes_of"] == "s1", result["epoch_changes_of"]
    changes = result["epoch_changes"]
    assert [c[1] for c in changes] == sorted({c[1] for c in changes}), changes
    assert all(0 <= c[0] <= 60 + 5 for c in changes), changes  # (asked at the end)
    for row in result["per_fault"]:
        if row["kind"] == "router_restart":
            window = (row["at"], row["at"] + row["down_actual_s"] + 1.0)
            removed = [c for c in changes if window[0] <= c[0] <= window[1] and "remove" in c[2]]
            assert any("s3" in c[2] or "s4" in c[2] for c in removed), (row, changes)
    # Nothing died that was not killed, nothing logged a traceback.
    assert result["unexpected_exits"] == [], result["unexpected_exits"]
    assert result["tracebacks"] == {}, result["tracebacks"]
    # Every client served at the end, each by the server the allocation gives it.
    assert result["clients_served_at_end"] == clients, result
    assert result["clients_not_at_owner_at_end"] == 0, result
    # Sane figures: each loss is at least one failed request; every minute counted.
    assert result["requests_answered"] > clients * 10, result
    lost = (
        result["sessions_lost"]
        + result["sessions_lost_to_crashes"]
        + result["sessions_lost_in_warmup"]
    )
    assert lost <= result["requests_failed"], result
    assert sum(m["answered"] for m in result["per_minute"]) == result["requests_answered"]
    assert result["recovery_by_kind"]["kill"]["count"] == result["faults"]["kill"]
    # Samples of every long-lived program and of the kernel's forwarding entries.
    assert len(result["samples"]) >= 5
    for sample in result["samples"]:
        assert sample["ra.router"]["rss_mb"] > 0 and sample["s1.server"]["fds"] > 0, sample
        assert set(sample["mfc_entries"]) == {"ra", "rb"}, sample
    assert result["growth_per_hour"]["ra.router"]["rss_mb_per_hour"] is not None
    assert result["mfc_entries_growth"]["ra"]["max"] >= CLIENTS_PER_LAN, result
    # The lab is gone.
    assert result["lab_left_namespaces"] == 0
    assert netns.names(result["lab"]["prefix"]) == []
