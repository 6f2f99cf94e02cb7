"""The kernel lab: the pool on network namespaces with the kernel's multicast forwarding.

These tests build real namespaces, veth links and bridges, run the router daemons
on the MRT socket, and drive third-party programs (socat, iperf 2) as clients.
They need root; elsewhere they skip and say why.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from labcheck import lab_missing
from manycast.drivers import mroute

NEEDS_ROOT = "the kernel lab needs root and network namespaces; CI runs as root"

TOPOLOGY = """
[pool]
group = "232.1.1.1"
port = 7000
control_group = "239.255.77.1"
technique = "{technique}"
heartbeat_ms = 100
report_interval_ms = 1000

[[router]]
name = "ra"
[[router]]
name = "core"
[[router]]
name = "rs"

[[link]]
between = ["ra", "core"]
[[link]]
between = ["core", "rs"]

[[server]]
name = "s1"
router = "core"
[[server]]
name = "s2"
router = "rs"
[[server]]
name = "s3"
router = "rs"
[[server]]
name = "s4"
router = "rs"
standby = true

[[clients]]
name = "a"
count = 16
router = "ra"
subnet = "10.1.0.0/24"
rate = 4.0
[[clients]]
name = "b"
count = 16
router = "core"
subnet = "10.2.0.0/24"
rate = 4.0

[[scenario]]
at = 2.5
action = "set_share"
server = "s1"
share = 0.2
[[scenario]]
at = 5.0
action = "kill"
server = "s2"
[[scenario]]
at = 7.5
action = "add"
server = "s4"

[run]
duration = 11.0
"""


# A private pool (docs/private.md): members s1, s2 and a1..a6; an outsider server on
# the core and outsider clients x1, x2 on the members' edge router, all of whom know
# the group address but hold another key.
PRIVATE_TOPOLOGY = """
[pool]
name = "vault.lab.test"
group = "232.7.7.7"
port = 7000
control_group = "239.255.77.2"
private = true
heartbeat_ms = 100
report_interval_ms = 500

[[router]]
name = "ra"
[[router]]
name = "core"
[[router]]
name = "rs"

[[link]]
between = ["ra", "core"]
[[link]]
between = ["core", "rs"]

[[server]]
name = "s1"
router = "rs"
[[server]]
name = "s2"
router = "rs"
[[server]]
name = "evil"
router = "core"
authorized = false

[[clients]]
name = "a"
count = 6
router = "ra"
subnet = "10.1.0.0/24"
rate = 4.0
[[clients]]
name = "x"
count = 2
router = "ra"
subnet = "10.6.0.0/24"
rate = 4.0
authorized = false

[run]
duration = 4.0
"""


# IPv4 literals of this file's topologies and what they become on an IPv6 network.
_IPV6_OF = {
    '"232.1.1.1"': '"ff3e::1:1"',
    '"232.7.7.7"': '"ff3e::8000:707"',
    '"239.255.77.1"': '"ff15::77:1"',
    '"239.255.77.2"': '"ff15::77:2"',
    '"10.1.0.0/24"': '"2001:db8:a::/64"',
    '"10.2.0.0/24"': '"2001:db8:b::/64"',
    '"10.6.0.0/24"': '"2001:db8:f::/64"',
}


def _in_family(text: str, family: int) -> str:
    """A topology of this file on an IPv4 network, or the same on an IPv6 one (its
    group, control group and client subnets IPv6; the rest numbered from
    2001:db8::/32 by the compiler)."""
    if family == 4:
        return text
    for old, new in _IPV6_OF.items():
        text = text.replace(old, new)
    left = re.findall(r'"\d+\.\d+\.\d+\.\d+[^"]*"', text)
    assert not left, f"IPv4 addresses left in an IPv6 topology: {left}"
    return text


def _lab_possible() -> str | None:
    return lab_missing()


def _counts_written_after(
    lab: object, servers: list[str], since: float, writes: int = 2, timeout: float = 20.0
) -> dict[str, dict[str, int]]:
    """Each service's per-source counts (`<server>.counts.json`) once the service has
    rewritten the file `writes` times after `since` (time.time()): it reads what has
    arrived before each write, so by then it has counted every datagram sent before
    `since`. A busy machine only makes this wait longer."""
    from manycast.lab import Lab

    assert isinstance(lab, Lab)
    paths = {s: lab.run_dir / f"{s}.counts.json" for s in servers}
    last: dict[str, tuple[int, int] | None] = dict.fromkeys(servers)
    seen = dict.fromkeys(servers, 0)
    deadline = time.monotonic() + timeout
    while min(seen.values()) < writes:
        for server, path in paths.items():
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            # Each write replaces the file: a new inode, a new mtime.
            key = (st.st_ino, st.st_mtime_ns)
            if key != last[server] and st.st_mtime >= since:
                seen[server] += 1
            last[server] = key
        if time.monotonic() > deadline:
            pytest.fail(f"the services did not write their counts: {seen}")
        time.sleep(0.02)
    return {s: json.loads(p.read_text())["sources"] for s, p in paths.items()}


def _until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Whether `condition()` holds within `timeout` s (looked at every 50 ms)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _probe_until(prober: object, condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    """Run the prober's clients until `condition()` holds; False after `timeout` s."""
    from manycast.lab import Prober

    assert isinstance(prober, Prober)
    deadline = prober.now() + timeout
    while not condition():
        if prober.now() > deadline:
            return False
        prober.run_until(prober.now() + 0.1)
    return True


def _wait_settled(lab: object, topology: object, timeout: float = 30.0) -> None:
    """Wait until the pool has settled after `up`: every configured server's agent at
    one epoch with a share, and every router holding each server's current portions.
    (Just after `up` one server may hold everything for a moment; with R4, sources
    that sent then would stay pinned to it.)"""
    from manycast.lab import Lab
    from manycast.topology import Topology

    assert isinstance(lab, Lab) and isinstance(topology, Topology)
    members = sorted(
        s for s, spec in topology.servers.items() if spec.authorized and not spec.standby
    )
    group = str(topology.pool.group)

    def settled() -> bool:
        agents = {s: lab.ask(s, "server", {"op": "status"}) for s in members}
        if len({a["epoch"] for a in agents.values()}) != 1 or any(
            Fraction(a["share"]) <= 0 for a in agents.values()
        ):
            return False
        portions = {str(topology.address(s)): a["portions"] for s, a in agents.items()}
        return all(
            lab.ask(r, "router", {"op": "status"})["membership"].get(group, {}) == portions
            for r in topology.routers
        )

    deadline = time.monotonic() + timeout
    while not settled():
        if time.monotonic() > deadline:
            pytest.fail("the pool never settled after up")
        time.sleep(0.1)


# The parsers and the scenario's mapping onto the agents need nothing special.


def test_structures_pack_as_linux_expects() -> None:
    assert mroute._MFCCTL.size == 60
    assert mroute._VIFCTL.size == 16
    upcall = bytes(8) + bytes([1, 0, 2, 0]) + bytes([10, 1, 0, 2]) + bytes([232, 1, 1, 1])
    assert mroute.parse_upcall(upcall) == mroute.Upcall(1, 2, 0x0A010002, 0xE8010101)
    igmp = bytes([0x46, 0xC0, 0, 40, 0, 0, 0x40, 0, 1, 2]) + bytes(30)
    assert mroute.parse_upcall(igmp) is None


def test_proc_tables_parse() -> None:
    order = sys.byteorder
    group = int.from_bytes(bytes([232, 1, 1, 1]), order)
    source = int.from_bytes(bytes([10, 1, 0, 2]), order)
    cache = (
        "Group    Origin   Iif     Pkts    Bytes    Wrong Oifs\n"
        f"{group:08X} {source:08X} 1         93   139314        0  0:1    2:1  \n"
        f"{group:08X} {source + 1:08X} -1          0        0        0\n"
    )
    first, second = mroute.parse_cache(cache)
    assert str(first.group) == "232.1.1.1" and str(first.source) == "10.1.0.2"
    assert (first.parent, first.packets, first.outs, first.resolved) == (1, 93, (0, 2), True)
    assert not second.resolved
    vifs = mroute.parse_vifs(
        "Interface      BytesIn  PktsIn  BytesOut PktsOut Flags Local    Remote\n"
        " 0 eth0           1848      24      3542      46 00008 00000002 00000000\n"
    )
    assert vifs == [mroute.Vif(0, "eth0", 24, 46)]


def test_mld_messages_leave_from_the_link_local_address() -> None:
    """A signed MLDv2 registration the core built from a global address, sent from the
    interface's link-local one (as /proc/net/if_inet6 lists it): a valid checksum for
    the new source, the requester and signature untouched; other packets unchanged."""
    import ipaddress
    import random

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from manycast.auth import verify_join
    from manycast.drivers.kernel.sockets import from_link_local, link_local
    from manycast.protocol.client import registration
    from manycast.wire.ip import IPv6Packet
    from manycast.wire.membership import MLDv2Report

    if_inet6 = (
        "20010db800000000000000000000000a 02 40 00 80 eth0\n"
        "fe80000000000000a8c1abfffe123456 02 40 20 80 eth0\n"
        "fe800000000000000000000000000001 03 40 20 80 eth1\n"
    )
    source = link_local("eth0", if_inet6)
    assert source == ipaddress.IPv6Address("fe80::a8c1:abff:fe12:3456")
    assert link_local("eth2", if_inet6) is None
    key = Ed25519PrivateKey.generate()
    requester = ipaddress.IPv6Address("2001:db8::a")
    group = ipaddress.IPv6Address("ff3e::8000:1")
    packet = registration(requester, group, key, 1.0e9, random.Random(1))
    moved = IPv6Packet.from_wire(from_link_local(packet, source))
    assert moved.header.src == source
    report = MLDv2Report.from_wire(moved.payload, source, moved.header.dst)  # checksum checked
    assert report.signed is not None and report.signed.requester == requester
    assert verify_join(report, key.public_key())
    assert from_link_local(packet, None) == packet
    udp = IPv6Packet.make(requester, group, 17, bytes(12)).to_wire()
    assert from_link_local(udp, source) == udp


def test_policy_ops_become_agent_requests() -> None:
    from manycast.lab import LabError, agent_request
    from manycast.wire import control

    assert agent_request(control.SetShareOp("s1", Fraction(1, 5))) == {
        "op": "set_share",
        "server": "s1",
        "share": "1/5",
    }
    assert agent_request(control.RebalanceOp(1.1, ())) == {"op": "rebalance", "target": 1.1}
    loads = (control.BucketLoad(0, 10.0),)
    with pytest.raises(LabError, match="RebalanceOp"):
        agent_request(control.RebalanceOp(1.1, loads))


def test_scenario_steps_reach_the_lab_through_the_one_engine() -> None:
    """The engine's rules (who takes a command, what is dead) hold on the lab too:
    LabControl only turns each decision into a signal, a start, a request or a rate."""
    from manycast.lab import LabControl
    from manycast.scenario import ScenarioEngine
    from manycast.topology import loads

    calls: list[tuple[object, ...]] = []

    class FakeLab:
        def kill_server(self, name: str) -> None:
            calls.append(("kill", name))

        def start_server(self, name: str, wait: bool = True) -> None:
            calls.append(("start", name, wait))

        def ask(self, node: str, role: str, request: dict[str, object]) -> object:
            calls.append(("ask", node, role, request))
            return {"ok": True}

    class FakeProber:
        def set_rate(self, group: str, rate: float) -> None:
            calls.append(("rate", group, rate))

    text = TOPOLOGY.replace("{technique}", "R1") + (
        '[[scenario]]\nat = 8.0\naction = "set_share"\nserver = "s2"\nshare = 0.5\n'
        '[[scenario]]\nat = 9.0\naction = "client_rate"\nclients = "b"\nrate = 1.0\n'
    )
    topology = loads(text, "test-lab.toml")
    engine = ScenarioEngine(topology, LabControl(FakeLab(), FakeProber()))  # type: ignore[arg-type]
    pending = engine.steps()
    engine.carry_out_due(pending, 100.0)
    assert calls == [
        ("ask", "s1", "server", {"op": "set_share", "server": "s1", "share": "1/5"}),
        ("kill", "s2"),
        # Without waiting: the clients keep asking while its programs start.
        ("start", "s4", False),
        # s2 is dead: the first live server takes the command about it.
        ("ask", "s1", "server", {"op": "set_share", "server": "s2", "share": "1/2"}),
        ("rate", "b", 1.0),
    ]
    assert engine.status("s2") == "dead" and engine.status("s4") == "up"


# The lab itself.


@pytest.fixture
def lab_factory(tmp_path: Path) -> Iterator[object]:
    from manycast.lab import Lab

    labs: list[Lab] = []

    def make(technique: str = "R1", text: str | None = None) -> tuple[Lab, object]:
        # Unique per test process, so that two runs on one machine never meet.
        lab = Lab(prefix=f"mt{os.getpid()}n{len(labs)}", run_root=tmp_path)
        labs.append(lab)
        lab.down()
        if text is None:
            text = TOPOLOGY.replace("{technique}", technique)
        topology = lab.up(text, "test-lab.toml")
        return lab, topology

    yield make
    for lab in labs:
        lab.down()


def _owner_vifs(lab: object, topology: object, client: str, owner: str) -> bool:
    """Whether the kernel of the owner's router forwards (client, group) toward the owner."""
    from manycast.lab import Lab
    from manycast.topology import Topology

    assert isinstance(lab, Lab) and isinstance(topology, Topology)
    router = topology.servers[owner].router
    link = f"{router}-{owner}"
    iface = next(i.name for i in topology.interfaces[router].values() if i.link == link)
    vif = next(v.index for v in lab.vifs(router) if v.name == iface)
    source = topology.address(client)
    for entry in lab.mfc(router):
        if entry.group == topology.pool.group and entry.source == source:
            return vif in entry.outs
    return False


@pytest.mark.lab
@pytest.mark.skipif(_lab_possible() is not None, reason=_lab_possible() or "")
@pytest.mark.parametrize("family", [4, 6])
def test_demo_scenario_every_client_served_by_its_owner(lab_factory, family: int) -> None:  # type: ignore[no-untyped-def]
    from manycast.lab import LabRun
    from manycast.summary import EVENT_KEYS, SERVER_KEYS, SUMMARY_KEYS

    lab, topology = lab_factory(text=_in_family(TOPOLOGY.replace("{technique}", "R1"), family))
    assert {
        i.address.version for ifaces in topology.interfaces.values() for i in ifaces.values()
    } == {family}
    # The added server takes seconds to start on a busy machine: the run goes on
    # (30 s at most) until the pool has settled after the last step.
    summary = LabRun(lab, topology).run(topology.duration, settle=30.0)
    # The one summary schema, as every driver fills it.
    assert tuple(summary) == SUMMARY_KEYS
    assert all(tuple(e) == EVENT_KEYS for e in summary["events"])
    assert all(tuple(s) == SERVER_KEYS for s in summary["servers"].values())
    assert summary["driver"] == "kernel"
    assert summary["clients"] == 32
    assert summary["clients_served_at_end"] == 32, summary
    assert summary["requests_ok"] > 0, summary
    kernel = summary["kernel"]
    # Every client's last answer came from the server the allocation gives it.
    assert kernel["clients_not_at_owner"] == [], summary
    by_server = kernel["clients_by_server"]
    assert "s2" not in by_server, "the dead server still has clients"
    assert by_server.get("s4", 0) > 0, "the added server serves no one"
    # After every step, every client it disrupted was answered again.
    assert [e["what"].split()[0] for e in summary["events"]] == ["set_share", "kill", "add"]
    assert all(e["recovery_s"] is not None for e in summary["events"]), summary["events"]
    assert summary["recovery_s"] is not None
    servers = summary["servers"]
    assert servers["s2"]["status"] == "dead" and servers["s2"]["share"] == 0.0
    assert servers["s4"]["status"] == "up" and servers["s4"]["requests"] > 0
    assert abs(sum(s["share"] for s in servers.values()) - 1.0) < 1e-9, servers
    # The kernel, not the daemon, forwards: each client's entry at its owner's router
    # (in IPv6's MFC on an IPv6 network) points at the owner.
    run = LabRun(lab, topology)
    owners = run.owners([str(topology.address(c)) for c in sorted(topology.clients)])
    for client in sorted(topology.clients):
        owner = owners[str(topology.address(client))]
        assert owner is not None
        assert _owner_vifs(lab, topology, client, owner), (client, owner)


@pytest.mark.lab
@pytest.mark.skipif(_lab_possible() is not None, reason=_lab_possible() or "")
@pytest.mark.skipif(
    shutil.which("socat") is None or shutil.which("iperf") is None,
    reason="needs socat and iperf (make lab-deps installs them)",
)
@pytest.mark.parametrize("family", [4, 6])
def test_third_party_programs_are_served_by_the_owner(
    lab_factory: Callable[..., tuple[Any, Any]], family: int
) -> None:
    """socat and iperf 2 (`-V` on an IPv6 network) run with `manycast lab exec` as a
    user would, each answered by or sending to the owner of its client's address."""
    from manycast.lab import LabRun
    from manycast.lab.build import socat_address

    lab, topology = lab_factory(text=_in_family(TOPOLOGY.replace("{technique}", "R1"), family))
    group, port = topology.pool.group, topology.pool.port
    clients = ["a1", "a2", "a3", "b4", "b5"]
    _wait_settled(lab, topology)
    owners = LabRun(lab, topology).owners([str(topology.address(c)) for c in clients])
    cli = [sys.executable, "-m", "manycast", "lab", "exec", "--prefix", lab.prefix]
    env = {**os.environ, "MANYCAST_LAB_RUN_ROOT": str(lab.run_root)}
    for client in clients:
        answer = subprocess.run(
            [
                *cli,
                client,
                "--",
                "socat",
                "-t",
                "2",
                "-",
                socat_address(group, port, hops=8),
            ],
            input=b"hello\n",
            capture_output=True,
            timeout=20,
            env=env,
        )
        assert answer.returncode == 0, answer.stderr.decode()
        server = answer.stdout.split()[0].decode()
        assert server == owners[str(topology.address(client))], (client, answer.stdout)

    # iperf 2 in multicast mode: every datagram reaches the owner and no one else.
    send = ["iperf", "-c", str(group), "-p", str(port), "-u", "-T", "8", "-t", "1", "-b", "2M"]
    if family == 6:
        send.append("-V")
    iperf = subprocess.run(
        [*cli, "b7", "--", *send],
        capture_output=True,
        timeout=30,
        env=env,
    )
    assert iperf.returncode == 0, iperf.stderr.decode()
    source = str(topology.address("b7"))
    owner = LabRun(lab, topology).owners([source])[source]
    sources = _counts_written_after(lab, ["s1", "s2", "s3"], time.time())
    counts = {s: sources[s].get(source, 0) for s in sources}
    assert counts[owner] >= 150, (owner, counts, iperf.stdout.decode())
    assert all(n == 0 for s, n in counts.items() if s != owner), counts


@pytest.mark.lab
@pytest.mark.skipif(_lab_possible() is not None, reason=_lab_possible() or "")
def test_plain_kernel_joins_create_no_membership(lab_factory) -> None:  # type: ignore[no-untyped-def]
    from manycast.drivers import netns

    lab, topology = lab_factory()
    before = lab.ask("ra", "router", {"op": "status"})
    sock = netns.socket_in(lab.ns("a9"), socket.AF_INET, socket.SOCK_DGRAM)
    try:
        mreq = mroute.mreqn(str(topology.pool.group), 0)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            after = lab.ask("ra", "router", {"op": "status"})
            ignored = after["daemon"]["plain_reports_ignored"]
            if ignored > before["daemon"]["plain_reports_ignored"]:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the router never saw the kernel's own report")
        servers = sorted(str(topology.address(s)) for s in ("s1", "s2", "s3"))
        # The servers' joins reach ra relayed hop by hop: wait for all three.
        while sorted(after["membership"].get(str(topology.pool.group), {})) != servers:
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
            after = lab.ask("ra", "router", {"op": "status"})
    finally:
        sock.close()
    members = after["membership"].get(str(topology.pool.group), {})
    assert str(topology.address("a9")) not in members
    assert sorted(members) == servers


def _ns_pids(ns: str) -> list[str]:
    """The processes running in network namespace `ns` (`ip netns pids`)."""
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return out.stdout.split()


@pytest.mark.lab
@pytest.mark.skipif(_lab_possible() is not None, reason=_lab_possible() or "")
def test_down_leaves_nothing_even_after_sigkill(lab_factory) -> None:  # type: ignore[no-untyped-def]
    from manycast.drivers import netns

    lab, topology = lab_factory()
    assert len(lab.namespaces()) == len(topology.interfaces)
    pids = [lab.pid(r, "router") for r in topology.routers]
    pids += [lab.pid(s, role) for s in ("s1", "s2", "s3") for role in ("server", "service")]
    assert all(pids)
    # A program of the user's, left running in a node.
    cli = [sys.executable, "-m", "manycast", "lab", "exec", "--prefix", lab.prefix]
    stray = subprocess.Popen(
        [*cli, "a1", "--", "sleep", "600"],
        env={**os.environ, "MANYCAST_LAB_RUN_ROOT": str(lab.run_root)},
    )
    # It must be running in the node before the crash (the CLI takes a while to
    # start on a busy machine): the namespace lists its process.
    deadline = time.monotonic() + 60
    while not _ns_pids(lab.ns("a1")) and time.monotonic() < deadline:
        assert stray.poll() is None, "manycast lab exec ended before it ran the program"
        time.sleep(0.05)
    assert _ns_pids(lab.ns("a1")), "the program never ran in the node"
    # Traffic, so the routers hold forwarding entries.
    sock = netns.socket_in(lab.ns("a1"), socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 8)
    sock.sendto(b"x", (str(topology.pool.group), topology.pool.port))
    sock.close()
    deadline = time.monotonic() + 20
    while not lab.mfc("ra") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lab.mfc("ra")
    # The crash: every daemon SIGKILLed at once.
    for pid in pids:
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
    removed = lab.down()
    assert removed["namespaces"] == len(topology.interfaces)
    # `sleep 600` ended within seconds: `down` stopped it (wait would time out else).
    stray.wait(timeout=30)
    assert lab.namespaces() == []
    assert not any(Path(f"/proc/{pid}").exists() and _not_zombie(pid) for pid in pids)
    assert not lab.run_dir.exists()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert all(f"{lab.prefix}-" not in line for line in links.splitlines())
    root_cache = Path("/proc/net/ip_mr_cache")
    if root_cache.exists():
        assert all(
            str(topology.pool.group) != str(e.group)
            for e in mroute.parse_cache(root_cache.read_text())
        )
    assert lab.down() == {"namespaces": 0, "processes": 0}


def _not_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_lab_refuses_clearly_without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    from manycast import lab

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(lab.LabError, match="needs root"):
        lab.Lab(prefix="mct").down()


@pytest.mark.lab
@pytest.mark.skipif(_lab_possible() is not None, reason=_lab_possible() or "")
@pytest.mark.parametrize("family", [4, 6])
def test_r4_keeps_active_sources_on_the_old_owner_until_idle(lab_factory, family: int) -> None:  # type: ignore[no-untyped-def]
    from manycast.lab import LabRun, Prober

    lab, topology = lab_factory(text=_in_family(TOPOLOGY.replace("{technique}", "R4"), family))
    # The clients start once the pool has settled (else the first owner pins them).
    _wait_settled(lab, topology)
    run = LabRun(lab, topology)
    prober = Prober(lab, topology)
    clients = prober.clients.values()

    def held() -> int:
        return int(lab.ask("core", "router", {"op": "status"})["held"])

    try:
        prober.run_until(2.0)
        _probe_until(prober, lambda: all(c.server is not None for c in clients))
        addresses = {c.name: c.address for c in clients}
        before = run.owners(list(addresses.values()))
        assert all(c.server == before[c.address] for c in clients)
        lab.ask("s1", "server", {"op": "set_share", "server": "s1", "share": "1/5"})
        after: dict[str, str | None] = {}
        moved: list[str] = []

        def some_moved() -> bool:
            after.update(run.owners(list(addresses.values())))
            moved[:] = [n for n, a in addresses.items() if before[a] != after[a]]
            return bool(moved)

        _probe_until(prober, some_moved)
        assert moved, "the share change moved no client"
        # The routers learn the new allocation from the agents' next reports.
        _probe_until(prober, lambda: held() >= len(moved))
        # Active sources stay pinned to the old owner: the kernel entry was held.
        prober.run_until(prober.now() + 1.0)
        assert all(prober.clients[n].server == before[addresses[n]] for n in moved)
        assert held() >= len(moved)
        # Idle for longer than pin_idle: the entries move to the new owners.
        for group in ("a", "b"):
            prober.set_rate(group, 0.0)
        _probe_until(prober, lambda: held() == 0)
        assert held() == 0
        restart = prober.now()
        for group in ("a", "b"):
            prober.set_rate(group, 4.0)
        _probe_until(prober, lambda: all(c.last_reply > restart for c in clients))
        assert all(c.server == after[c.address] for c in clients)
    finally:
        prober.close()


def _send_join(
    lab: object, topology: object, client: str, portions: int, key: object | None
) -> int:
    """From `client`'s namespace, a join of the pool's group for `portions` single
    addresses no client has (in 2001:db8:ee::/64, or 10.99.0.0/16), as the core sends
    a server's report: cut into parts within the link MTU (IGMPv3, or MLDv2 on IPv6),
    each signed with `key` (None: unsigned). How many parts went out."""
    import ipaddress
    import random

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from manycast.lab import Lab
    from manycast.lab.prober import report_sender
    from manycast.protocol.membership import report_packets, whole_record_for
    from manycast.space import Portion, PortionSet
    from manycast.topology import Topology
    from manycast.wire.membership import RecordType

    assert isinstance(lab, Lab) and isinstance(topology, Topology)
    assert key is None or isinstance(key, Ed25519PrivateKey)
    group = topology.pool.group
    base = ipaddress.ip_network("2001:db8:ee::/64" if group.version == 6 else "10.99.0.0/16")
    full = (1 << base.max_prefixlen) - 1
    wanted = PortionSet(
        tuple(Portion(group.version, int(base[i + 1]), full) for i in range(portions))
    )
    records = [whole_record_for(group, wanted, RecordType.MODE_IS_INCLUDE)]
    requester = topology.address(client)
    packets = report_packets(records, requester, int(time.time() * 1000), 1, random.Random(), key)
    sender = report_sender(lab.ns(client), topology.gateways[client][0], group.version)
    try:
        for packet in packets:
            sender.send(packet)
    finally:
        sender.close()
    return len(packets)


def _mld_listener(lab: object, router: str) -> socket.socket:
    """A raw ICMPv6 socket inside `router`'s namespace that reads the MLDv2 reports
    reaching it (ff02::16, which its daemon joined on every interface)."""
    from manycast.drivers import mroute6, netns
    from manycast.lab import Lab

    assert isinstance(lab, Lab)
    sock = netns.socket_in(lab.ns(router), socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    sock.setsockopt(socket.IPPROTO_ICMPV6, mroute6.ICMP6_FILTER, mroute6.icmp6_filter([143]))
    sock.setblocking(False)
    return sock


def _report_sources(sock: socket.socket, seconds: float) -> list[tuple[str, bool]]:
    """(source, whether it carries manycast's extensions) of each MLDv2 report `sock`
    reads within `seconds`."""
    import ipaddress
    import selectors

    from manycast.wire.errors import WireError
    from manycast.wire.membership import MLD_V2_ROUTERS, MLDv2Report

    seen = []
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if not selector.select(left):
                continue
            message, sender = sock.recvfrom(65535)
            source = str(sender[0]).split("%")[0]
            try:
                report = MLDv2Report.from_wire(
                    message, ipaddress.IPv6Address(source), MLD_V2_ROUTERS
                )
            except WireError:
                seen.append((source, False))
                continue
            extended = report.signed is not None or any(r.include_masks for r in report.records)
            seen.append((source, extended))
    return seen


@pytest.mark.lab
@pytest.mark.skipif(_lab_possible() is not None, reason=_lab_possible() or "")
@pytest.mark.parametrize("family", [4, 6])
def test_private_pool_serves_participants_and_gives_outsiders_nothing(
    lab_factory: Callable[..., tuple[Any, Any]], family: int
) -> None:
    """Signed joins and sender registrations (IGMPv3, or MLDv2 on an IPv6 network)
    checked by the routers' daemons with the pool's key."""
    from manycast.lab import LabRun, Prober

    lab, topology = lab_factory(text=_in_family(PRIVATE_TOPOLOGY, family))
    assert topology.pool.group.version == family
    # Packets that reach the first-hop router before the sender's registration get
    # a kernel entry toward nowhere; the admission must rewrite it.
    early = Prober(lab, topology, ["a1", "a2"])
    try:
        for client in early.clients.values():
            client.next_register = 1.0
        early.run_until(1.0)
        assert early.served_since(0.0) == 0, "served before registering"
        _probe_until(early, lambda: early.served_since(1.5) == 2)
        assert early.served_since(1.5) == 2, {c.name: c.server for c in early.participants()}
    finally:
        early.close()
    summary = LabRun(lab, topology).run(topology.duration, settle=30.0)
    ended = time.time()
    # Every participant registered with the pool's key and is served by its owner.
    assert summary["clients"] == 6, summary
    assert summary["clients_served_at_end"] == 6, summary
    assert summary["kernel"]["clients_not_at_owner"] == [], summary
    assert set(summary["kernel"]["clients_by_server"]) == {"s1", "s2"}, summary
    assert summary["servers"]["evil"]["status"] == "outsider", summary
    # The outsider clients registered too (with the outsider's key) and had no answer.
    assert summary["outsiders"] == 2 and summary["outsider_answers"] == 0, summary

    def rejected(router: str) -> dict[str, int]:
        return dict(lab.ask(router, "router", {"op": "status"})["rejected"])

    # The outsiders' registrations and packets die at their first-hop router...
    ra = rejected("ra")
    assert ra.get("bad signature", 0) >= 2, ra
    assert ra.get("unauthorized sender", 0) >= 2, ra
    outsiders = {topology.address(c) for c in ("x1", "x2")}
    participants = {topology.address(f"a{i}") for i in range(1, 7)}
    sources = {e.source: e for e in lab.mfc("ra") if e.group == topology.pool.group}
    assert outsiders <= set(sources) and all(not sources[x].outs for x in outsiders)
    assert participants <= set(sources) and all(sources[a].outs for a in participants)
    # ... and the outsider server's joins and control traffic at its own.
    core = rejected("core")
    assert core.get("bad signature", 0) > 0, core
    assert core.get("unauthorized sender", 0) > 0, core
    evil = str(topology.address("evil"))
    for router in topology.routers:
        membership = lab.ask(router, "router", {"op": "status"})["membership"]
        assert all(evil not in members for members in membership.values()), (router, membership)
    # The outsider server received nothing: no request, no control message.
    assert lab.ask("evil", "service", {"op": "status"})["total"] == 0
    assert lab.ask("evil", "server", {"op": "status"})["agent"]["control_received"] == 0
    # Nor did the members' services get a packet of an outsider client.
    for server, counts in _counts_written_after(lab, ["s1", "s2"], ended).items():
        assert not {str(x) for x in outsiders} & set(counts), (server, counts)

    # A long join (as a server with many portions sends: parts within the link MTU,
    # each signed on its own) is admitted once every part has come; the same join
    # unsigned, or signed with another key (forged), is refused and joins no one.
    from manycast.pool import pool_keys

    key, other = pool_keys(topology, lab.state().get("seed", 1))
    group = str(topology.pool.group)

    def at_ra() -> tuple[dict[str, int], dict[str, str]]:
        status = lab.ask("ra", "router", {"op": "status"})
        return dict(status["rejected"]), dict(status["membership"].get(group, {}))

    listeners = {r: _mld_listener(lab, r) for r in ("ra", "rs")} if family == 6 else {}
    before, _ = at_ra()
    assert _send_join(lab, topology, "x1", 200, other) > 1
    assert _send_join(lab, topology, "x2", 200, None) > 1

    def refused() -> bool:
        rejected, _ = at_ra()
        return rejected.get("bad signature", 0) > before.get("bad signature", 0) and rejected.get(
            "unsigned", 0
        ) > before.get("unsigned", 0)

    assert _until(refused), at_ra()
    assert not {str(x) for x in outsiders} & set(at_ra()[1]), at_ra()
    a1 = str(topology.address("a1"))
    assert _send_join(lab, topology, "a1", 200, key) > 1
    assert _until(lambda: a1 in at_ra()[1]), at_ra()
    assert at_ra()[1][a1].count("/") == 200, at_ra()[1][a1]

    def at_core() -> dict[str, str]:
        return dict(lab.ask("core", "router", {"op": "status"})["membership"].get(group, {}))

    # ra relayed every part (from its own address on that link); core checked each.
    assert _until(lambda: a1 in at_core()), at_core()
    assert at_core()[a1] == at_ra()[1][a1]
    # On IPv6 every report leaves from its sender's link-local address (RFC 3810
    # §5.2.13): the servers' (at rs), the routers' relays and the clients' (at ra).
    for router, sock in listeners.items():
        try:
            seen = _report_sources(sock, 1.5)
        finally:
            sock.close()
        assert sum(1 for _, extended in seen if extended) >= 2, (router, seen)
        assert all(source.startswith("fe80:") for source, _ in seen), (router, seen)
