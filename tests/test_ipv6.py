"""IPv6 pools beside IPv4 ones: the same pool on either family (issue 16, first part).

A pool whose space is IPv6 runs on an IPv6 network: servers join with MLDv2
reports carrying their masks, routers admit and forward by them, clients hold
their sessions over IPv6. Each test here runs for both families from one
topology generator, so what works on IPv4 is checked to work the same on IPv6.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random
import re
from collections.abc import Sequence
from importlib.resources import files
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from manycast.pool import build
from manycast.ports import free_base_port
from manycast.protocol.fastpath import FastPath
from manycast.protocol.membership import record_for, report_packets
from manycast.protocol.node import Interface
from manycast.protocol.querier import QUERY_RESPONSE_S
from manycast.protocol.router6 import Router6
from manycast.runtime import PoolRun
from manycast.space import Portion, PortionSet
from manycast.topology import TopologyError, builtin, bundled, loads
from manycast.wire.ip import IPPROTO_UDP, IPv6Packet, UDPDatagram
from manycast.wire.membership import MaskPair, MLDv2Report, RecordType
from pooltools import DEADLINE, Settled, every, patient, requests_ok, run_pool_until, served_now

FAMILIES = (4, 6)
# Per family: the pool's group and the clients' LAN (None: the address plan picks a
# /64 of 2001:db8::/32).
GROUP = {4: "232.1.1.1", 6: "ff3e::8000:1"}
LAN = {4: "10.1.0.0/24", 6: None}


def pool_text(
    family: int,
    *,
    technique: str = "R1",
    clients: int = 24,
    scenario: Sequence[tuple[float, str, str, str]] = (),
    pool: dict[str, Any] | None = None,
    misses: int = 3,
) -> str:
    """clients c1.. -- ra -- core -- rs1 (s1, s3) / rs2 (s2, s4): every address of the
    network in `family`, given by the address plan unless the LAN is IPv4."""
    keys: dict[str, Any] = {
        "group": GROUP[family],
        "technique": technique,
        "heartbeat_ms": 100,
        "heartbeat_misses": misses,
        "report_interval_ms": 500,
        **(pool or {}),
    }
    text = "[pool]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in keys.items())
    text += "".join(f'[[router]]\nname = "{r}"\n' for r in ("ra", "core", "rs1", "rs2"))
    for a, b, delay in (("ra", "core", 2), ("core", "rs1", 1), ("core", "rs2", 3)):
        text += f'[[link]]\nbetween = ["{a}", "{b}"]\ndelay_ms = {delay}\n'
    for i in range(1, 5):
        text += f'[[server]]\nname = "s{i}"\nrouter = "rs{2 - i % 2}"\n'
    text += f'[[clients]]\nname = "c"\ncount = {clients}\nrouter = "ra"\nrate = 4.0\n'
    if LAN[family] is not None:
        text += f'subnet = "{LAN[family]}"\n'
    for at, action, server, extra in scenario:
        text += f'[[scenario]]\nat = {at}\naction = "{action}"\nserver = "{server}"\n{extra}\n'
    return text + "[run]\nduration = 6.0\n"


def _toml(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else str(value).lower()


def memory_run(text: str, seed: int = 3) -> PoolRun:
    return PoolRun(loads(text), "memory", seed)


def outcome(run: PoolRun) -> dict[str, int]:
    clients = run.nodes.clients.values()
    return {
        "resets": sum(c.stats.resets for c in clients),
        "failed": sum(c.stats.requests_failed for c in clients),
        "state_lost": sum(c.stats.state_lost for c in clients),
        "timeouts": sum(c.stats.timeouts for c in clients),
    }


# -- the topology ------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_every_address_of_a_topology_is_of_its_pools_family(family: int) -> None:
    topo = loads(pool_text(family))
    assert topo.pool.space.family == family
    addresses = [i.address for ifaces in topo.interfaces.values() for i in ifaces.values()]
    assert {a.version for a in addresses} == {family}
    assert len(set(addresses)) == len(addresses)
    if family == 6:
        documentation = ipaddress.IPv6Network("2001:db8::/32")
        assert all(a in documentation for a in addresses)
        # the clients' LAN: a /64 the plan gave, its first address the router's
        lan = topo.interfaces["c1"]["eth0"].network
        assert lan.prefixlen == 64 and topo.gateways["c1"][1] == lan.network_address + 1


def test_demo6_is_bundled_beside_demo_with_the_same_scenario() -> None:
    assert "demo6" in bundled()
    demo, demo6 = builtin("demo"), builtin("demo6")
    assert demo6.pool.space.family == 6 and demo6.pool.group.is_multicast
    steps = [dataclasses.replace(s, line=0) for s in demo6.scenario]
    assert steps == [dataclasses.replace(s, line=0) for s in demo.scenario]
    assert set(demo6.clients) == set(demo.clients) and set(demo6.servers) == set(demo.servers)


def test_demo6_runs_as_the_ipv4_demo_does() -> None:
    """The first 6 s of both demos on the virtual clock (the share change at 5 s): the
    same clients disrupted, served again as soon, every client served."""
    events = {}
    for name in ("demo", "demo6"):
        run = PoolRun(builtin(name), "memory", 1)
        run.network.run_until(6.0)  # type: ignore[union-attr]
        assert served_now(run), name
        events[name] = run.summary()["events"]
    assert events["demo6"] == events["demo"]
    assert events["demo"][0]["affected_clients"] > 0


BAD = {
    "group outside ff3x": ({"group": "ff15::1"}, "is not in ff3x::/32"),
    "ipv4 control group": ({"control_group": "239.1.1.1"}, "is not an IPv6 address"),
    "link-local control": ({"control_group": "ff12::1"}, "is link-local"),
}


@pytest.mark.parametrize(("keys", "message"), BAD.values(), ids=BAD.keys())
def test_an_ipv6_pools_groups_are_checked(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(TopologyError, match=message):
        loads(pool_text(6, pool=keys))


def test_an_ipv4_subnet_in_an_ipv6_topology_is_refused() -> None:
    text = pool_text(6).replace("rate = 4.0\n", 'rate = 4.0\nsubnet = "10.1.0.0/24"\n', 1)
    with pytest.raises(TopologyError, match="is not an IPv6 network"):
        loads(text)


def test_vip6_is_bundled_beside_vip_with_an_ipv6_vip_and_the_same_scenario() -> None:
    vip, vip6 = builtin("vip"), builtin("vip6")
    assert vip6.pool.vip == vip6.pool.group == ipaddress.IPv6Address("2001:db8:80::80")
    assert vip6.pool.space.family == 6  # from the vip: no space or group given
    addresses = {i.address for ifaces in vip6.interfaces.values() for i in ifaces.values()}
    assert {a.version for a in addresses} == {6}
    assert [(s.at, s.describe()) for s in vip6.scenario] == [
        (s.at, s.describe()) for s in vip.scenario
    ]
    assert (vip6.vip_routers, vip6.servers) == (vip.vip_routers, vip.servers)
    assert len(vip6.clients) == len(vip.clients)


VIP6_TEXT = files("manycast").joinpath("topologies", "vip6.toml").read_text()


def vip6_with(old: str, new: str) -> str:
    text = VIP6_TEXT
    assert old in text
    return text.replace(old, new, 1)


BAD_VIP = {
    "link-local": ('vip = "fe80::80"', "vip fe80::80 is link-local"),
    "multicast": ('vip = "ff3e::80"', "vip ff3e::80 is multicast"),
    "inside a lan": ('vip = "2001:db8:a::9"', "is inside subnet 2001:db8:a::/64"),
    "ipv4 in an ipv6 space": (
        'space = "2001:db8::/32"\nvip = "203.0.113.80"',
        "'vip' = '203.0.113.80' is not an IPv6 address",
    ),
}


@pytest.mark.parametrize(("vip", "message"), BAD_VIP.values(), ids=BAD_VIP.keys())
def test_an_ipv6_vip_is_checked(vip: str, message: str) -> None:
    with pytest.raises(TopologyError, match=re.escape(message)):
        loads(vip6_with('vip = "2001:db8:80::80"', vip))


@pytest.mark.parametrize("family", FAMILIES)
def test_live_tcp_connections_that_move_read_on_either_family(family: int) -> None:
    """`tcp_moves` (the kernel lab's moved TCP connections, tests/test_lab_tcp_move.py)
    reads on an IPv6 pool as on an IPv4 one."""
    text = pool_text(family).replace("[run]\n", "[run]\ntcp_moves = true\n")
    assert loads(text).tcp_moves


# -- the pool on the memory driver --------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_every_client_is_answered_by_the_owner_of_its_address(family: int) -> None:
    run = memory_run(pool_text(family))
    run.network.run_until(3.0)  # type: ignore[union-attr]
    assert outcome(run) == {"resets": 0, "failed": 0, "state_lost": 0, "timeouts": 0}
    assert served_now(run)
    allocation = next(iter(run.nodes.servers.values())).coordinator.allocation
    assert allocation is not None
    sessions = {
        (name, remote[0])
        for name, s in run.nodes.servers.items()
        for _, remote in s.endpoint.keys()
    }
    clients = {c.address for c in run.nodes.clients.values()}
    assert {address for _, address in sessions} == clients
    assert all(allocation.owner(address) == name for name, address in sessions)
    # The routers hold each server's masked join, written in the family's addresses.
    joined = run.nodes.routers["ra"].membership()[GROUP[family]]
    assert len(joined) == 4 and all(":" in f for f in joined.values()) == (family == 6)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_default_index_spreads_one_lan_and_high_keeps_it_together(family: int) -> None:
    """The index field's default, the addresses' low-order bits (for IPv6, the interface
    identifier's), spreads one LAN over every server; `index = "high"` takes the bits
    after the space's prefix, which one LAN shares."""
    space = {4: "10.0.0.0/8", 6: "2001:db8::/32"}[family]
    low = loads(pool_text(family, pool={"space": space}))
    high = loads(pool_text(family, pool={"space": space, "index": "high"}))
    for topo, owners in ((low, 4), (high, 1)):
        run = PoolRun(topo, "memory", 1)
        allocation = next(iter(run.nodes.servers.values())).coordinator.allocation
        assert allocation is not None
        found = {allocation.owner(run.nodes.clients[f"c{i}"].address) for i in range(1, 25)}
        assert len(found) == owners


KEEPERS = ("R2", "R3")


@pytest.mark.parametrize("technique", KEEPERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_share_change_moves_clients_without_losing_a_session(family: int, technique: str) -> None:
    run = memory_run(
        pool_text(family, technique=technique, scenario=[(2.0, "set_share", "s1", "share = 0.1")])
    )
    run.network.run_until(5.0)  # type: ignore[union-attr]
    assert outcome(run) == {"resets": 0, "failed": 0, "state_lost": 0, "timeouts": 0}
    carried = dict(run.live_view().carried)
    moved = carried["forwarded"] if technique == "R2" else carried["transferred"]
    assert moved > 0  # sessions did move, and none was lost
    assert served_now(run)
    shares = {n: s.coordinator.allocation.share(n) for n, s in run.nodes.servers.items()}  # type: ignore[union-attr]
    assert float(shares["s1"]) == pytest.approx(0.1, abs=1 / 64)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_dead_servers_clients_are_served_again(family: int) -> None:
    run = memory_run(pool_text(family, scenario=[(2.0, "kill", "s3", "")]))
    run.network.run_until(4.5)  # type: ignore[union-attr]
    assert served_now(run)
    members = {r.membership()[GROUP[family]].__len__() for r in run.nodes.routers.values()}
    assert members == {3}  # the pool told the routers at once (no wait for a timeout)


# -- on real sockets -----------------------------------------------------------------------


def test_an_ipv6_pool_on_the_overlay_serves_everyone_through_a_share_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The IPv4 pool's overlay tests are in test_pool_overlay.py. The routers' cache
    hits are sent by the overlay itself (the fast path keyed by the 32 bytes of the
    IPv6 addresses), and a share change still moves the clients it should."""
    credited: list[int] = []
    credit = FastPath.credit

    def counting(self: FastPath, copies: int) -> None:
        assert self.family == 6
        credited.append(copies)
        credit(self, copies)

    monkeypatch.setattr(FastPath, "credit", counting)
    text = pool_text(6, misses=20, scenario=[(1.5, "set_share", "s1", "share = 0.1")])
    # Links without emulated delay: the fast path sends only where nothing is emulated.
    topo = loads(re.sub(r"delay_ms = \d+", "delay_ms = 0", text))
    run = patient(PoolRun(topo, "overlay", seed=5, base_port=free_base_port(topo.attachment_count)))
    changed = Settled(run, lambda alloc: float(alloc.share("s1")) < 0.2, since=1.5)
    done, summary = run_pool_until(
        run,
        every(
            run,
            0.05,
            lambda: run.now >= 3.0 and changed() and served_now(run) and requests_ok(run) > 24 * 4,
        ),
    )
    assert done, f"not settled after {DEADLINE} s: {summary}"
    assert summary["clients_served_at_end"] == 24
    assert summary["state_lost"] == 0
    # Most of the clients' packets went by the fast path (the first of each cell,
    # and those after each membership change, by the routers' own).
    forwarded = sum(r.stats.multicast_forwarded for r in run.nodes.routers.values())
    assert sum(credited) > forwarded / 2, (sum(credited), forwarded)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_restarted_router_learns_every_member_from_its_queries(family: int) -> None:
    """IGMPv3 or MLDv2 General Queries: every server answers at once, those behind
    other routers through the routers that pass the query on."""
    run = memory_run(pool_text(family))
    network = run.network
    network.run_until(1.5)  # type: ignore[union-attr]
    network.kill("rs1")
    network.run_until(2.0)  # type: ignore[union-attr]
    fresh = build(run.topology, seed=3, wall_base=network.wall_base, only={"rs1"}).routers["rs1"]
    run.nodes.routers["rs1"] = fresh
    network.add(fresh)
    network.run_until(2.0 + QUERY_RESPONSE_S + 0.02)  # type: ignore[union-attr]
    servers = {int(s.address) for s in run.nodes.servers.values()}
    assert set(fresh.members.get(int(run.topology.pool.control_group), {})) == servers


# -- the IPv6 router on its own ------------------------------------------------------------

S1 = ipaddress.IPv6Address("2001:db8:fffe::2")
ODD = PortionSet((Portion(6, 1, 1),))  # sources whose last bit is 1


def router6() -> Router6:
    """eth0 toward the other routers, eth1 the link to server S1."""
    interfaces = {
        "eth0": Interface("eth0", "up", *_on("2001:db8:ffff::1/64")),
        "eth1": Interface("eth1", "s1", *_on("2001:db8:fffe::1/64")),
    }
    return Router6(
        "r", interfaces, [], ["eth0"], neighbors={"eth0": (int(_on("2001:db8:ffff::2/64")[0]),)}
    )


def _on(text: str) -> tuple[ipaddress.IPv6Address, ipaddress.IPv6Network]:
    interface = ipaddress.IPv6Interface(text)
    return interface.ip, interface.network


def mld_join(portions: PortionSet = ODD) -> bytes:
    group = ipaddress.IPv6Address(GROUP[6])
    records = [record_for(group, portions, RecordType.MODE_IS_INCLUDE)]
    [packet] = report_packets(records, S1, 1000, 1, random.Random(1))
    return packet


def test_an_mld_join_is_admitted_forwarded_by_and_relayed_with_its_masks() -> None:
    r = router6()
    r.receive("eth1", mld_join(), 0.0)
    assert r.membership() == {GROUP[6]: {str(S1): "::1/::1"}}
    [relayed] = r.take_frames()
    assert relayed.iface == "eth0"
    ip = IPv6Packet.from_wire(relayed.packet)
    assert ip.header.src == r.interfaces["eth0"].address and ip.header.hop_limit == 1
    assert ip.hop_by_hop is not None and ip.hop_by_hop.router_alert == 0
    # The checksum covers the relaying router's address: the next router accepts it.
    report = MLDv2Report.from_wire(ip.payload, ip.header.src, ip.header.dst)
    assert report.records[0].include_masks[0] == MaskPair(1, 1)
    # A client packet from an odd source goes to S1, an even one nowhere.
    for source, copies in (("2001:db8:a::3", 1), ("2001:db8:a::4", 0)):
        src, dst = ipaddress.IPv6Address(source), ipaddress.IPv6Address(GROUP[6])
        packet = IPv6Packet.make(
            src, dst, IPPROTO_UDP, UDPDatagram(1, 7000, b"x").to_wire(src, dst)
        )
        r.receive("eth0", packet.to_wire(), 0.0)
        frames = r.take_frames()
        assert len(frames) == copies
        if copies:
            forwarded = IPv6Packet.from_wire(frames[0].packet)
            assert frames[0].iface == "eth1" and forwarded.header.hop_limit == 63


@given(st.integers(0, len(mld_join()) - 1), st.integers(1, 255))
def test_an_mld_join_with_any_byte_corrupted_changes_nothing(position: int, flip: int) -> None:
    # Nothing covers bytes 0-3 but the version (the traffic class and flow label: IPv6
    # has no header checksum) nor byte 46, the Hop-by-Hop padding's type (a receiver
    # skips an unknown option of type 0-63): changed, the join is still the join.
    assume(position >= 4 or (position == 0 and flip & 0xF0))
    assume(position != 46)
    wire = bytearray(mld_join())
    wire[position] ^= flip
    r = router6()
    r.receive("eth1", bytes(wire), 0.0)
    assert r.membership() == {}


@given(st.binary(max_size=120))
def test_arbitrary_bytes_never_raise_in_an_ipv6_router(packet: bytes) -> None:
    r = router6()
    r.receive("eth1", mld_join(), 0.0)
    r.receive("eth1", packet, 0.0)
    r.receive("eth0", b"\x60" + packet, 0.0)
