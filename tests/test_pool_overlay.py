"""The live pool on real UDP sockets (loopback): one process, and split over two."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from manycast.ports import free_base_port
from manycast.runtime import PoolRun
from manycast.topology import loads

SMALL = """
[pool]
group = "232.7.7.7"
heartbeat_ms = 100
report_interval_ms = 500

[[router]]
name = "edge"
[[router]]
name = "core"
[[router]]
name = "srv"

[[link]]
between = ["edge", "core"]
delay_ms = 1
[[link]]
between = ["core", "srv"]
delay_ms = 1

[[server]]
name = "s1"
router = "srv"
[[server]]
name = "s2"
router = "srv"
[[server]]
name = "s3"
router = "core"

[[clients]]
name = "c"
count = 24
router = "edge"
subnet = "10.9.0.0/24"
rate = 4.0

[[scenario]]
at = 2.0
action = "kill"
server = "s2"

[run]
duration = 5.0
"""


def test_pool_on_the_overlay_serves_everyone_and_survives_a_death() -> None:
    topo = loads(SMALL)
    run = PoolRun(topo, "overlay", seed=5, base_port=free_base_port(loads(SMALL).attachment_count))
    run.run(5.0)
    summary = run.summary()
    assert summary["clients"] == 24
    assert summary["clients_served_at_end"] == 24
    assert summary["requests_ok"] > 24 * 4 * 3  # most of 5 s at 4 requests/s each
    assert summary["servers"]["s2"]["status"] == "dead"
    live = {n: s for n, s in summary["servers"].items() if s["status"] == "up"}
    assert sum(s["share"] for s in live.values()) == pytest.approx(1.0)
    kill = next(e for e in summary["events"] if e["what"].startswith("kill"))
    assert kill["recovery_s"] is not None and kill["recovery_s"] < 2.5


def test_one_pool_split_over_two_processes(tmp_path: Path) -> None:
    """Routers and servers in one process, clients in another: one pool."""
    path = tmp_path / "split.toml"
    path.write_text(SMALL)
    base = str(free_base_port(loads(SMALL).attachment_count))
    command = [sys.executable, "-m", "manycast", "run", str(path), "--json", "--base-port", base]
    infrastructure = subprocess.Popen(
        [*command, "--nodes", "edge,core,srv,s1,s2,s3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    clients = subprocess.run([*command, "--nodes", "c"], capture_output=True, text=True, timeout=60)
    out, errors = infrastructure.communicate(timeout=60)
    assert infrastructure.returncode == 0, errors
    assert clients.returncode == 0, clients.stderr
    client_summary = json.loads(clients.stdout.strip().splitlines()[-1])
    server_summary = json.loads(out.strip().splitlines()[-1])
    assert client_summary["clients"] == 24
    assert client_summary["clients_served_at_end"] == 24
    assert client_summary["requests_ok"] > 100
    served = sum(s["requests"] for s in server_summary["servers"].values())
    # The servers in the other process answered what the clients counted (give or take
    # requests in flight at the end).
    assert served >= client_summary["requests_ok"]
    assert served - client_summary["requests_ok"] < 60
