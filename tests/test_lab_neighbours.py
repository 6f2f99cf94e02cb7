"""The lab fits the host's neighbour table to its namespaces (`lab/neighbours.py`).

Seed 20261201, bench/soak.py --lab, 1000 clients, no fault, 1 minute: at the
kernel's default limits (gc_thresh3 = 1024, one ARP table for every namespace) the
table stayed full for the whole run (16 249 failed neighbour creations): 13 973
requests answered and 14 989 failed, 57 epochs, 16 clients served at the end.
With the limits raised to 4032 / 8064 (3051 entries in use): 29 990 answered, 0
failed, 1 epoch, all 1000 served.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from manycast.lab.neighbours import fit_neighbour_table, table_fulls, wanted_limits


def _table(tmp_path: Path, thresh2: int, thresh3: int) -> Path:
    (tmp_path / "gc_thresh2").write_text(f"{thresh2}\n")
    (tmp_path / "gc_thresh3").write_text(f"{thresh3}\n")
    return tmp_path


def _limits(table: Path) -> tuple[int, int]:
    return int((table / "gc_thresh2").read_text()), int((table / "gc_thresh3").read_text())


def test_the_soaks_1008_namespaces_get_room_for_three_entries_each(tmp_path: Path) -> None:
    table = _table(tmp_path, 512, 1024)  # the kernel's defaults
    raised = fit_neighbour_table(1008, table)
    assert raised == {"gc_thresh3": 8064, "gc_thresh2": 4032}
    soft, hard = _limits(table)
    assert soft >= 3 * 1008  # 3051 entries were in use in the soak's 1000-client run
    assert hard > soft


def test_limits_already_large_enough_are_left_alone(tmp_path: Path) -> None:
    table = _table(tmp_path, 50_000, 100_000)
    assert fit_neighbour_table(1008, table) == {}
    assert _limits(table) == (50_000, 100_000)


def test_a_small_lab_never_lowers_the_defaults(tmp_path: Path) -> None:
    table = _table(tmp_path, 512, 1024)
    assert wanted_limits(20)["gc_thresh3"] < 1024
    assert fit_neighbour_table(20, table) == {}
    assert _limits(table) == (512, 1024)


@pytest.mark.skipif(
    not Path("/proc/sys/net/ipv4/neigh/default/gc_thresh3").exists(), reason="Linux only"
)
def test_the_hosts_table_has_the_limits_the_lab_writes() -> None:
    from manycast.lab.neighbours import NEIGH

    assert (NEIGH / "gc_thresh2").exists() and (NEIGH / "gc_thresh3").exists()


def test_table_fulls_sums_every_cpus_row(tmp_path: Path) -> None:
    stats = tmp_path / "arp_cache"
    header = "entries  allocs   destroys hash_grows lookups  hits     res_failed "
    header += "rcv_probes_mcast rcv_probes_ucast periodic_gc_runs forced_gc_runs "
    header += "unresolved_discards table_fulls"
    rows = [
        "00000bf3 0 0 0 0 0 0 0 0 0 0 000000a3 0001f284",
        "00000bf3 0 0 0 0 0 0 0 0 0 0 00000000 00027032",
    ]
    stats.write_text("\n".join([header, *rows]) + "\n")
    assert table_fulls(stats) == 0x1F284 + 0x27032  # 287 414, as this host said once
    assert table_fulls(tmp_path / "missing") is None


def test_a_table_that_cannot_be_written_leaves_the_lab_to_go_on(tmp_path: Path) -> None:
    assert fit_neighbour_table(1008, tmp_path / "no-such-table") == {}
