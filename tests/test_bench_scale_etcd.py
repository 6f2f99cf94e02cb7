"""bench/scale.py's etcd part: in the same command as the memory part, its JSON line
carries share-change and failover latency with etcd beside the channel coordination;
`--skip-etcd` and a host without etcd leave it out with the reason, and the rest runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import etcdcluster
from etcdcluster import ETCD_MISSING, etcd_path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def scale(*args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(BENCH / "scale.py"), "--max-n", "4", "--skip-sim", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["bench"] == "scale" and result["sizes"] == [4]
    assert result["runs"][0]["converged_s"]["death"] is not None  # the memory part ran
    return result


@pytest.mark.slow
@pytest.mark.skipif(etcd_path() is None, reason=ETCD_MISSING)
def test_the_etcd_part_reports_both_coordinations_latencies_and_their_ratios() -> None:
    part = scale("--etcd-sizes", "4", "--etcd-rounds", "1")["etcd"]
    assert part["errors"] == [] and part["sizes"] == [4] and part["lease_s"] == 2
    for kind in ("etcd", "channel"):
        figures = part[kind]
        assert (figures["changes"], figures["failovers"], figures["timed_out"]) == (2, 1, 0)
        for key in ("change_s_median", "failover_s_median", "removed_s_median"):
            assert figures[key] > 0, (kind, key)
        # Every router forwards by an allocation only once some server holds it.
        assert figures["removed_s_median"] <= figures["failover_s_median"]
        assert 0 < figures["failover_cpu_over_wall_median"] <= 1.5  # 1: a core, all along
    # A killed server's buckets move only once etcd expires its lease (not given back),
    # which is at least two thirds of a lease after its last renewal; the channel sees
    # it dead after three missed 100 ms heartbeats.
    assert part["etcd"]["failover_s_median"] >= part["lease_s"] * 2 / 3
    assert 0.2 <= part["channel"]["failover_s_median"] < part["etcd"]["failover_s_median"]
    for figure in ("change", "failover"):
        ratio = part[f"etcd_over_channel_{figure}"]
        medians = (part["etcd"][f"{figure}_s_median"], part["channel"][f"{figure}_s_median"])
        assert ratio == pytest.approx(medians[0] / medians[1], abs=0.01)
    assert part["by_n"]["4"]["etcd"] == part["etcd"]  # one size: the same figures
    assert {r["coordination"] for r in part["rounds"]} == {"etcd", "channel"}


def test_skip_etcd_leaves_the_part_out_and_the_rest_runs() -> None:
    assert scale("--skip-etcd")["etcd"] == {"skipped": "--skip-etcd"}


def test_without_etcd_the_part_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setattr(etcdcluster, "etcd_path", lambda: None)
    import _scale_etcd

    assert _scale_etcd.run(sizes=(4,), rounds=1) == {"skipped": ETCD_MISSING}
