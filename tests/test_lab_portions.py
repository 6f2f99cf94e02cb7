"""The portion plane in the lab: one nftables map element per portion, no per-source state.

A pool of three servers behind a core router, clients behind an edge router that
learns the portions from the joins the core relays. With `plane="portions"` both
routers forward the group by the masks alone: every client is answered by the
server whose portion covers its address, the kernel holds as many elements as
there are portions (and no MFC entry for a client), and an allocation change
rewrites the elements and moves the clients. Needs root; elsewhere it skips and
says why.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from labcheck import lab_missing

NEEDS_ROOT = "the kernel lab needs root and network namespaces; CI runs as root"

TOPOLOGY = """
[pool]
group = "232.1.1.1"
port = 7000
control_group = "239.255.77.1"
heartbeat_ms = 100
report_interval_ms = 1000

[[router]]
name = "ra"
[[router]]
name = "core"

[[link]]
between = ["ra", "core"]

[[server]]
name = "s1"
router = "core"
[[server]]
name = "s2"
router = "core"
[[server]]
name = "s3"
router = "core"

[[clients]]
name = "a"
count = 12
router = "ra"
subnet = "10.1.0.0/24"
"""
SERVERS = ("s1", "s2", "s3")


def _why_not() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return NEEDS_ROOT
    missing = lab_missing()  # the kernel's multicast routing, which every lab router needs
    if missing is not None:
        return missing
    import shutil

    if shutil.which("nft") is None or shutil.which("ip") is None:
        return "needs nft and ip (make lab-deps installs them)"
    return None


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Any]:
    from manycast.lab import Lab

    lab = Lab(prefix=f"mp{os.getpid()}", run_root=tmp_path)
    lab.down()
    try:
        yield lab
    finally:
        lab.down()


def _settled(lab: Any, topology: Any) -> bool:
    """Every agent at one epoch with a share, every router holding their portions, and
    every router's plane compiled from that membership."""
    agents = {s: lab.ask(s, "server", {"op": "status"}) for s in SERVERS}
    if len({a["epoch"] for a in agents.values()}) != 1 or any(
        Fraction(a["share"]) <= 0 for a in agents.values()
    ):
        return False
    portions = {str(topology.address(s)): a["portions"] for s, a in agents.items()}
    group = str(topology.pool.group)
    for router in topology.routers:
        status = lab.ask(router, "router", {"op": "status"})
        if status["membership"].get(group, {}) != portions:
            return False
        if status["plane"].get("entries", 0) == 0:
            return False
    return True


def _wait_settled(lab: Any, topology: Any, timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    while not _settled(lab, topology):
        if time.monotonic() > deadline:
            pytest.fail("the pool never settled")
        time.sleep(0.2)


def _kernel_elements(lab: Any, router: str) -> dict[str, list[Any]]:
    """The portion maps' elements as the router's kernel holds them (`nft -j`)."""
    listing = subprocess.run(
        ["ip", "netns", "exec", lab.ns(router), "nft", "-j", "list", "table", "netdev", "manycast"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    maps = {}
    for item in json.loads(listing)["nftables"]:
        found = item.get("map")
        if found and found["name"].startswith("p_"):
            maps[found["name"]] = found.get("elem", [])
    return maps


def _portions_held(status: dict[str, Any], group: str) -> tuple[int, bool]:
    """Distinct value/mask pairs the members' joins name ("v/m v/m ... except v/m ..."),
    and whether any excludes."""
    pairs: set[str] = set()
    excludes = False
    for text in status["membership"].get(group, {}).values():
        excludes = excludes or "except" in text
        pairs.update(p for p in text.split() if p != "except")
    return len(pairs), excludes


def _ask_each(lab: Any, topology: Any, clients: list[str]) -> dict[str, str]:
    """Each client sends datagrams to the group until one is answered: who answered."""
    from manycast.drivers import netns

    answered = {}
    group, port = str(topology.pool.group), topology.pool.port
    for client in clients:
        sock = netns.socket_in(lab.ns(client), socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 8)
            sock.bind((str(topology.address(client)), 0))
            sock.settimeout(0.5)
            for _ in range(10):
                sock.sendto(b"hello", (group, port))
                try:
                    answered[client] = sock.recv(100).split()[0].decode()
                    break
                except TimeoutError:
                    continue
        finally:
            sock.close()
    return answered


def _ttl_at_owner(lab: Any, topology: Any, client: str, owner: str) -> int | None:
    """The TTL of a datagram sent with TTL 8 by `client` to the group, as it arrives at
    `owner`'s interface (an AF_PACKET tap there)."""
    from manycast.drivers import netns

    iface = topology.gateways[owner][0]
    tap = netns.socket_in(lab.ns(owner), socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
    sock = netns.socket_in(lab.ns(client), socket.AF_INET, socket.SOCK_DGRAM)
    try:
        tap.bind((iface, 0x0800))
        tap.settimeout(0.5)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 8)
        sock.bind((str(topology.address(client)), 0))
        source = topology.address(client).packed
        for _ in range(10):
            sock.sendto(b"ttl", (str(topology.pool.group), topology.pool.port))
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline:
                try:
                    packet = tap.recv(2048)
                except TimeoutError:
                    break
                if packet[12:16] == source and packet[9] == socket.IPPROTO_UDP:
                    return packet[8]
    finally:
        tap.close()
        sock.close()
    return None


def _cover(status: dict[str, Any], address: int) -> list[str]:
    """The outputs of the plane's entry covering `address` ("<iface> <neighbour>")."""
    for key, outs in status["plane"]["portions"].items():
        value, mask = (int(ipaddress.IPv4Address(p)) for p in key.split("/"))
        if address & mask == value:
            return list(outs)
    return []


@pytest.mark.parametrize("seed", range(12))
def test_compiled_entries_decide_every_source_as_the_filters_do(seed: int) -> None:
    """Random filters (overlapping, nested, excluding): the disjoint entries give
    every source exactly the members whose filter matches it."""
    import random
    from dataclasses import dataclass

    from manycast.drivers.kernel.portion_plane import compile_portions
    from manycast.protocol.membership import SourceFilter

    @dataclass
    class Member:
        iface: str
        neighbor: int
        filter: SourceFilter

    rng = random.Random(seed)

    def pair() -> tuple[int, int]:
        mask = (1 << rng.randrange(0, 12)) - 1
        return rng.getrandbits(32) & mask, mask

    # Several members behind one neighbour (servers behind the next router): one
    # member's exclusion must not take the cell from another's inclusion.
    members = [
        Member(
            f"eth{i % 2}",
            i % 2,
            SourceFilter(
                tuple(pair() for _ in range(rng.randrange(1, 6))),
                tuple(pair() for _ in range(rng.randrange(0, 3))),
            ),
        )
        for i in range(rng.randrange(2, 6))
    ]
    entries = compile_portions(members)
    assert entries is not None and entries
    for _ in range(20000):
        source = rng.getrandbits(32)
        want = frozenset((m.iface, m.neighbor) for m in members if m.filter.matches(source))
        got = [e.outs for e in entries if source & e.mask == e.value]
        assert len(got) <= 1, (source, got)
        assert (got[0] if got else frozenset()) == want, source


def test_disjoint_portions_are_one_entry_each() -> None:
    from dataclasses import dataclass

    from manycast.drivers.kernel.portion_plane import compile_portions
    from manycast.protocol.membership import SourceFilter

    @dataclass
    class Member:
        iface: str
        neighbor: int
        filter: SourceFilter

    # A half and two quarters (three masks' worth of the space), one member each.
    members = [
        Member("eth0", 1, SourceFilter(((0, 1),))),
        Member("eth1", 2, SourceFilter(((1, 3),))),
        Member("eth1", 3, SourceFilter(((3, 3),))),
    ]
    entries = compile_portions(members)
    assert entries is not None
    assert [(e.value, e.mask, sorted(e.outs)) for e in entries] == [
        (0, 1, [("eth0", 1)]),
        (1, 3, [("eth1", 2)]),
        (3, 3, [("eth1", 3)]),
    ]


@pytest.mark.lab
@pytest.mark.skipif(_why_not() is not None, reason=_why_not() or "")
def test_portion_plane_forwards_by_mask_and_follows_the_allocation(lab: Any) -> None:
    from manycast.lab import LabRun

    topology = lab.up(TOPOLOGY, "test-portions.toml", plane="portions")
    _wait_settled(lab, topology)
    group = str(topology.pool.group)
    clients = sorted(topology.clients)
    server_of = {str(topology.address(s)): s for s in SERVERS}

    def check() -> dict[str, str]:
        core = lab.ask("core", "router", {"op": "status"})
        for router in topology.routers:
            status = lab.ask(router, "router", {"op": "status"})
            plane = status["plane"]
            assert plane["plane"] == "portions" and plane["mode"] == "portions", plane
            # One element per portion, in the plane and in the kernel.
            held, excludes = _portions_held(status, group)
            if excludes:  # portions minus pieces: cut into disjoint cells, about as many
                assert 0 < plane["entries"] <= 2 * held, (router, plane, status["membership"])
            else:
                assert plane["entries"] == held, (router, plane, status["membership"])
            elements = _kernel_elements(lab, router)
            assert sum(len(e) for e in elements.values()) == plane["entries"], (router, elements)
        answered = _ask_each(lab, topology, clients)
        assert sorted(answered) == clients, answered
        owners = LabRun(lab, topology).owners([str(topology.address(c)) for c in clients])
        for client in clients:
            address = topology.address(client)
            # The server whose portion covers the client answered, and the core's
            # plane entry for that portion points at that server.
            assert answered[client] == owners[str(address)], (client, answered, owners)
            outs = _cover(core, int(address))
            assert len(outs) == 1, (client, outs)
            assert server_of[outs[0].split()[1]] == answered[client], (client, outs)
        # No per-source state: the kernels hold no MFC entry for a client.
        for router in topology.routers:
            sources = {e.source for e in lab.mfc(router) if str(e.group) == group}
            assert not sources & {topology.address(c) for c in clients}, (router, sources)
        return answered

    before = check()
    # Each router took one from the TTL (8 at the client, 6 at the server), and the
    # server's stack took the packet (its header checksum was updated with it).
    assert _ttl_at_owner(lab, topology, clients[0], before[clients[0]]) == 6
    updates = {
        r: lab.ask(r, "router", {"op": "status"})["plane"]["updates"] for r in topology.routers
    }
    # An allocation change: s1 takes 3/5 of the space.
    answer = lab.ask("s1", "server", {"op": "set_share", "server": "s1", "share": "3/5"})
    deadline = time.monotonic() + 40
    while Fraction(lab.ask("s1", "server", {"op": "status"})["share"]) < Fraction(1, 2):
        assert time.monotonic() < deadline, ("the share never changed", answer)
        time.sleep(0.2)
    _wait_settled(lab, topology)
    after = check()
    assert sum(1 for c in clients if before[c] != after[c]) > 0, (before, after)
    for router in topology.routers:
        status = lab.ask(router, "router", {"op": "status"})["plane"]
        assert status["updates"] > updates[router], (router, status)


def test_each_change_is_one_script_and_a_refused_one_changes_nothing() -> None:
    """The plane's scripts, recorded instead of run: one per change (one nft
    transaction), maps of masks no longer used deleted in it, and after nft refuses
    a change the next one still creates what the refused one would have."""
    from manycast.drivers.kernel.portion_plane import PlaneError, PortionEntry, PortionPlane

    scripts: list[str] = []
    refuse = False

    def run(script: str) -> None:
        if refuse:
            raise PlaneError("refused")
        scripts.append(script)

    plane = PortionPlane(int(ipaddress.IPv4Address("232.1.1.1")), ["eth0", "eth1"], run=run)
    plane.install()
    assert 'devices = { "eth0", "eth1" }' in scripts[-1]
    assert "ip daddr 232.1.1.1 jump classify" in scripts[-1]
    a, b = ("eth1", 0x0AFE0002), ("eth1", 0x0AFE0006)
    half = [PortionEntry(0, 1, frozenset({a})), PortionEntry(1, 1, frozenset({b}))]
    assert plane.update(half)
    script = scripts[-1]
    assert script.count("add chain") == 2 and "fwd ip to 10.254.0.2" in script
    assert "ip saddr & 0.0.0.1 vmap @p_00000001" in script
    assert (
        "add element netdev manycast p_00000001 { 0.0.0.0 : goto out_0, 0.0.0.1 : goto out_1 }"
        in script
    )
    assert not plane.update(list(half))  # nothing changed: nothing sent
    assert len(scripts) == 2
    refuse = True
    quarters = [PortionEntry(v, 3, frozenset({("eth0", 0x0AFE000A + v)})) for v in range(4)]
    with pytest.raises(PlaneError):
        plane.update(quarters)
    assert plane.entries == half  # the kernel kept the old classification; so do we
    refuse = False
    assert plane.update(quarters)
    script = scripts[-1]
    assert script.count("add chain") == 4, script  # the chains the refused one had named
    assert "delete map netdev manycast p_00000001" in script
    assert plane.status()["entries"] == 4
