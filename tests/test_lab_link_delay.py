"""The kernel lab's emulated link delay (`drivers/kernel/link_delay.py`).

Which router delays which direction of which link is checked everywhere; the
delay itself is measured on a real lab (root, namespaces, iptables' NFQUEUE): a
TCP connection attempt from a client to a server across a delayed LAN and a
delayed link between routers takes the round trip the topology gives, and about nothing
without the emulation. Elsewhere those tests skip and say why.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from labcheck import lab_missing
from manycast.drivers.kernel.link_delay import QUEUE_BASE, delayed_paths, delayed_routers
from manycast.topology import loads

NEEDS_ROOT = "emulated link delay needs root, network namespaces and iptables' NFQUEUE"
LAN_DELAY_MS = 6.0
CORE_DELAY_MS = 2.0

TOPOLOGY = f"""
[pool]
group = "232.1.1.1"
port = 7000
control_group = "239.255.77.1"
heartbeat_ms = 100
report_interval_ms = 1000

[[router]]
name = "ra"
[[router]]
name = "rs"

[[link]]
between = ["ra", "rs"]
delay_ms = {CORE_DELAY_MS}

[[server]]
name = "s1"
router = "rs"

[[clients]]
name = "a"
count = 2
router = "ra"
subnet = "10.1.0.0/24"
delay_ms = {LAN_DELAY_MS}
rate = 1.0

[run]
duration = 1.0
"""

ONE_WAY_MS = LAN_DELAY_MS + CORE_DELAY_MS  # a server's own link is not delayed


def _skip_reason() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return NEEDS_ROOT
    missing = lab_missing()  # the kernel's multicast routing, which every lab router needs
    if missing is not None:
        return missing
    if not (shutil.which("iptables") or os.path.exists("/usr/sbin/iptables")):
        return "emulated link delay needs iptables (NFQUEUE): make lab-deps"
    return None


# -- everywhere ------------------------------------------------------------------------
def test_each_direction_of_a_delayed_link_is_delayed_once_by_a_router() -> None:
    topology = loads(TOPOLOGY, "delay.toml")
    ra = {(p.direction, p.delay) for p in delayed_paths(topology, "ra")}
    rs = {(p.direction, p.delay) for p in delayed_paths(topology, "rs")}
    # ra: its LAN both ways (the clients run nothing of ours), the core link inward.
    assert ra == {("in", LAN_DELAY_MS / 1e3), ("out", LAN_DELAY_MS / 1e3), ("in", 0.002)}
    # rs: the core link inward (ra delays the other way); not the server's own link.
    assert rs == {("in", 0.002)}
    queues = [p.queue for p in delayed_paths(topology, "ra")]
    assert queues == list(range(QUEUE_BASE, QUEUE_BASE + 3))
    rule = delayed_paths(topology, "ra")[0].rule()
    assert rule[:4] in (["-t", "raw", "-A", "PREROUTING"], ["-t", "mangle", "-A", "POSTROUTING"])
    assert rule[-1] == "--queue-bypass"  # no program on the queue: undelayed, not dropped
    undelayed = TOPOLOGY.replace(f"delay_ms = {LAN_DELAY_MS}", "delay_ms = 0")
    undelayed = undelayed.replace(f"delay_ms = {CORE_DELAY_MS}", "delay_ms = 0")
    no_delay = loads(undelayed, "no-delay.toml")
    assert delayed_routers(no_delay) == []  # a server's own 0.5 ms link is not emulated
    assert [p.direction for p in delayed_paths(no_delay, "ra")] == []


# -- in the lab ------------------------------------------------------------------------
@pytest.fixture
def lab(tmp_path: Path) -> Iterator[object]:
    from manycast.lab import Lab

    made = Lab(prefix=f"ld{os.getpid()}", run_root=tmp_path)
    made.down()
    yield made
    made.down()


def _connect_rtts(lab: object, topology: object, count: int) -> list[float]:
    """Times (ms) of connection attempts from a1 to a closed port of s1: SYN out, RST
    back, one round trip each."""
    from manycast.drivers import netns
    from manycast.lab import Lab
    from manycast.topology import Topology

    assert isinstance(lab, Lab) and isinstance(topology, Topology)
    server = str(topology.address("s1"))
    samples = []
    for _ in range(count):
        sock = netns.socket_in(lab.ns("a1"), socket.AF_INET, socket.SOCK_STREAM)
        with sock:
            sock.settimeout(2.0)
            began = time.perf_counter()
            with contextlib.suppress(ConnectionRefusedError):
                sock.connect((server, 9))
                raise AssertionError("port 9 of s1 answered: nothing listens there")
            samples.append((time.perf_counter() - began) * 1e3)
        time.sleep(0.01)
    return samples


@pytest.mark.lab
@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
def test_a_round_trip_across_delayed_links_takes_their_delay(lab: object) -> None:
    from manycast.lab import Lab

    assert isinstance(lab, Lab)
    topology = lab.up(TOPOLOGY, "delay.toml", start_servers=False, emulate_delay=True)
    rtt = statistics.median(_connect_rtts(lab, topology, 15))
    assert 2 * ONE_WAY_MS <= rtt <= 2 * ONE_WAY_MS + 5, rtt
    status = lab.ask("ra", "link_delay", {"op": "status"})
    paths = {(p["iface"], p["direction"]): p for p in status["paths"]}
    assert len(paths) == 3
    assert all(p["passed"] > 0 for p in paths.values()), paths  # every path carried some
    assert all(p["dropped"] == 0 for p in paths.values()), paths
    lab.down()
    assert not lab.is_up()
    topology = lab.up(TOPOLOGY, "delay.toml", start_servers=False, emulate_delay=False)
    assert lab.pid("ra", "link_delay") is None
    undelayed = statistics.median(_connect_rtts(lab, topology, 15))
    assert undelayed < 2.0, undelayed
