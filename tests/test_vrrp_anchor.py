"""The VRRP anchor (bench/vrrp_anchor.py): keepalived's VRRPv3 takeover in network namespaces,
measured from the clients' side. Two SIGKILLs of the master; needs root and keepalived
(`make lab-deps`), and skips saying which is missing."""

from __future__ import annotations

import importlib
import math
import os
import shutil
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _skip_reason() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "the VRRP anchor needs root and network namespaces; CI runs as root"
    if not (shutil.which("keepalived") or os.access("/usr/sbin/keepalived", os.X_OK)):
        return "keepalived is not installed: run `make lab-deps` as root"
    return None


pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or ""),
]


def test_keepalived_backup_takes_over_and_every_client_is_answered_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    anchor = importlib.import_module("vrrp_anchor")
    result = anchor.measure_vrrp(runs=2, clients=20)

    assert "skipped" not in result, result
    assert result["vrrp_version"] == 3 and result["advert_int_s"] == 0.01
    # The smallest interval keepalived takes for VRRPv3: half of it is refused.
    assert result["advert_int_accepted"] and result["advert_int_below_refused"]
    assert result["keepalived_version"].startswith("v")
    assert result["master_down_interval_s"] == pytest.approx(3 * 0.01 + 156 / 256 * 0.01, abs=1e-5)
    assert len(result["runs"]) == 2
    for run in result["runs"]:
        assert run["takeover_s"] is not None, run  # the backup took the VIP
        assert 0 < run["takeover_s"] < 3.0, run
        clients_s = run["clients_s"]
        assert clients_s is not None and math.isfinite(clients_s) and 0 < clients_s < 3.0, run
        assert run["clients_answered"] == 20 and run["answered_by"] == ["b"], run
    assert result["clients_s_median"] is not None and result["clients_s_p95"] is not None
    assert result["takeover_s_median"] is not None
    # Ours were removed, even the namespaces.
    assert not [n for n in os.listdir("/var/run/netns") if n.startswith(f"vr-{os.getpid()}-")]
