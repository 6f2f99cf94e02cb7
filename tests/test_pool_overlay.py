"""The live pool on real UDP sockets (loopback): one process, and split over two.

Real time on a machine that may be busy: each test waits for the outcome it checks
under a generous deadline (never less long than the run it replaces), and failure
detection allows for scheduling stalls, so that a slow host is not taken for a
dead server.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from manycast.drivers.overlay_network import OverlayNetwork
from manycast.ports import free_base_port
from manycast.runtime import PoolRun
from manycast.steps import Kill
from manycast.topology import loads
from pooltools import (
    DEADLINE,
    Settled,
    every,
    once,
    patient,
    requests_ok,
    run_pool_until,
    served_now,
)

# A server is declared dead after 20 missed heartbeats (2 s): a busy host's stalls
# and backlogs last less, and the pool still has to notice the real death below.
BASE = """
[pool]
group = "232.7.7.7"
heartbeat_ms = 100
heartbeat_misses = 20
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
"""

SMALL = (
    BASE
    + """
[[scenario]]
at = 2.0
action = "kill"
server = "s2"

[run]
duration = 5.0
"""
)


def test_pool_on_the_overlay_serves_everyone_and_survives_a_death() -> None:
    topo = loads(SMALL)
    run = patient(PoolRun(topo, "overlay", seed=5, base_port=free_base_port(topo.attachment_count)))
    # At least the topology's 5 s; then until the pool has taken s2's clients over and
    # served everyone most of the time (as on an idle host by then).
    recovered = Settled(run, lambda alloc: "s2" not in alloc.servers, since=2.0)
    done, summary = run_pool_until(
        run,
        every(
            run,
            0.05,
            lambda: (
                run.now >= 5.0
                and "s2" in run.engine.dead
                and recovered()
                and served_now(run)
                and requests_ok(run) > 24 * 4 * 3
            ),
        ),
    )
    history = {n: s.coordinator.changes for n, s in run.nodes.servers.items()}
    assert done, f"not settled after {DEADLINE} s: {summary}; changes: {history}"
    assert summary["clients"] == 24
    assert summary["clients_served_at_end"] == 24
    assert summary["requests_ok"] > 24 * 4 * 3  # most of 5 s at 4 requests/s each
    assert summary["servers"]["s2"]["status"] == "dead"
    live = {n: s for n, s in summary["servers"].items() if s["status"] == "up"}
    assert sum(s["share"] for s in live.values()) == pytest.approx(1.0)
    kill = next(e for e in summary["events"] if e["what"].startswith("kill"))
    # How fast on an idle host is checked on the virtual clock (test_coordination);
    # here, that every client disrupted by the death was answered again.
    assert kill["recovery_s"] is not None and kill["recovery_s"] < DEADLINE


CLIENTS_RUN = 15.0


def test_one_pool_split_over_two_processes(tmp_path: Path) -> None:
    """Routers and servers in this process, clients in another (`manycast run --nodes`):
    one pool, which loses a server while the clients are connected."""
    path = tmp_path / "split.toml"
    path.write_text(BASE)  # the same file for both halves; the test kills s2 itself
    topo = loads(BASE)
    base = free_base_port(topo.attachment_count)
    infrastructure = {"edge", "core", "srv", "s1", "s2", "s3"}
    run = PoolRun(topo, "overlay", seed=1, base_port=base, local=infrastructure)
    network = run.network
    assert isinstance(network, OverlayNetwork)
    addresses = {str(i.address) for c in topo.clients for i in topo.interfaces[c].values()}
    servers = run.nodes.servers

    def connected() -> set[str]:
        return {str(remote[0]) for s in servers.values() for _, remote in s.endpoint.keys()}

    clients: subprocess.Popen[str] | None = None
    try:
        network.run_until(0.0)  # every endpoint of this half bound before the clients start
        # The clients' run has a fixed length: 15 s leaves a busy host time to connect
        # them, notice s2's death (2 s), move its clients, and serve everyone again.
        clients = subprocess.Popen(
            [
                *(sys.executable, "-m", "manycast", "run", str(path), "--json"),
                *("--base-port", str(base), "--nodes", "c", "--duration", str(CLIENTS_RUN)),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        process = clients
        assert network.run_until(network.now + DEADLINE, once(lambda: connected() >= addresses)), (
            f"only {len(connected() & addresses)} of 24 clients connected"
        )
        at = network.now
        kill = Kill(at=at, server="s2")
        network.call_at(at, lambda: run.engine.carry_out(kill, at))
        # This half serves until the clients' run is over, however long that takes.
        network.run_until(network.now + CLIENTS_RUN + DEADLINE, lambda: process.poll() is not None)
        out, errors = clients.communicate(timeout=DEADLINE)
    finally:
        run.close()
        if clients is not None and clients.poll() is None:
            clients.kill()
            clients.communicate()
    assert clients.returncode == 0, errors
    client_summary = json.loads(out.strip().splitlines()[-1])
    server_summary = run.summary()
    assert server_summary["servers"]["s2"]["status"] == "dead"
    assert client_summary["clients"] == 24
    assert client_summary["clients_served_at_end"] == 24
    assert client_summary["requests_ok"] > 100
    served = sum(s["requests"] for s in server_summary["servers"].values())
    # The servers in the other process answered what the clients counted (give or take
    # requests in flight at the end).
    assert served >= client_summary["requests_ok"]
    assert served - client_summary["requests_ok"] < 60
