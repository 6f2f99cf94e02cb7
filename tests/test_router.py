"""The manycast router on its own: joins and packets are fed in, frames read out.

The router under test (r) has a client LAN, two servers on their own /30s, and
two router-facing links:

    clients 10.1.0.0/24 -- eth0                    eth1 -- 10.255.0.2 (upstream, 10/8, 10.9.9/24)
    s1 10.254.0.2       -- eth2   r                eth4 -- 10.255.0.6 (upstream, 10.9/16)
    s2 10.254.0.6       -- eth3
"""

from __future__ import annotations

import ipaddress
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from manycast.protocol.membership import any_source_record, record_for
from manycast.protocol.node import Frame, Interface
from manycast.protocol.router import Router
from manycast.space import Portion, PortionSet
from manycast.wire.ip import IPPROTO_IGMP, IPPROTO_UDP, IPv4Packet, UDPDatagram
from manycast.wire.membership import (
    IGMP_V3_ROUTERS,
    GroupRecord,
    IGMPv3Report,
    RecordType,
    SignedJoin,
    igmp_packet,
)

GROUP = IPv4Address("232.1.1.1")
CONTROL = IPv4Address("239.255.77.1")
S1, S2 = IPv4Address("10.254.0.2"), IPv4Address("10.254.0.6")
UP1, UP2 = IPv4Address("10.255.0.2"), IPv4Address("10.255.0.6")
FAR = IPv4Address("10.9.1.7")  # a requester behind eth4 (10.9.0.0/16)
HOLD = 3.5

EVEN = PortionSet((Portion.parse("0.0.0.0/0.0.0.1"),))
ODD = PortionSet((Portion.parse("0.0.0.1/0.0.0.1"),))
LAN = PortionSet((Portion.parse("10.1.0.0/24"),))


def _iface(name: str, link: str, address: str, network: str) -> Interface:
    return Interface(name, link, IPv4Address(address), IPv4Network(network))


def make_router(hold_time: float = HOLD) -> Router:
    interfaces = {
        "eth0": _iface("eth0", "lan", "10.1.0.1", "10.1.0.0/24"),
        "eth1": _iface("eth1", "up1", "10.255.0.1", "10.255.0.0/30"),
        "eth2": _iface("eth2", "r-s1", "10.254.0.1", "10.254.0.0/30"),
        "eth3": _iface("eth3", "r-s2", "10.254.0.5", "10.254.0.4/30"),
        "eth4": _iface("eth4", "up2", "10.255.0.5", "10.255.0.4/30"),
    }
    routes = [
        (IPv4Network("10.0.0.0/8"), "eth1", UP1),
        (IPv4Network("10.9.0.0/16"), "eth4", UP2),
        (IPv4Network("10.9.9.0/24"), "eth1", UP1),
    ]
    return Router("r", interfaces, routes, {"eth1", "eth4"}, hold_time=hold_time)


def report(
    requester: IPv4Address,
    *records: GroupRecord,
    src: IPv4Address | None = None,
) -> bytes:
    """A server's signed report as it sends it (224.0.0.22, TTL 1, Router Alert)."""
    signed = SignedJoin(1_700_000_000_000, requester, b"k" * 8)
    return igmp_packet(IGMPv3Report(records, signed), src or requester).to_wire()


def join(requester: IPv4Address, portions: PortionSet, src: IPv4Address | None = None) -> bytes:
    return report(requester, record_for(GROUP, portions, RecordType.MODE_IS_INCLUDE), src=src)


def datagram(src: str, dst: IPv4Address | str = GROUP, ttl: int = 64) -> bytes:
    return IPv4Packet.make(
        IPv4Address(src), IPv4Address(dst), IPPROTO_UDP, b"\x00" * 16, ttl=ttl
    ).to_wire()


def data_frames(router: Router) -> list[Frame]:
    """Frames the router sent other than relayed reports."""
    return [f for f in router.take_frames() if f.packet[9] != IPPROTO_IGMP]


def hops(frames: list[Frame]) -> list[tuple[str, IPv4Address | None]]:
    return [(f.iface, None if f.next_hop is None else IPv4Address(f.next_hop)) for f in frames]


def forwarded(
    router: Router, src: str, *, on: str = "eth0", now: float = 0.0
) -> list[tuple[str, IPv4Address | None]]:
    """Where a group packet from `src`, arriving on `on`, goes."""
    router.receive(on, datagram(src), now)
    return hops(data_frames(router))


@pytest.fixture
def router() -> Router:
    r = make_router()
    r.receive("eth2", join(S1, EVEN), 0.0)
    r.receive("eth3", join(S2, ODD), 0.0)
    r.take_frames()
    return r


# -- masked source-specific membership (Fig 7C, Fig 9) --------------------------------


def test_masked_join_forwards_each_source_to_its_member_only(router: Router) -> None:
    assert forwarded(router, "10.1.0.2") == [("eth2", S1)]
    assert forwarded(router, "10.1.0.3") == [("eth3", S2)]
    assert forwarded(router, "10.1.0.200") == [("eth2", S1)]
    assert router.stats.multicast_forwarded == 3


def test_forwarded_packet_is_intact_with_ttl_one_less(router: Router) -> None:
    original = datagram("10.1.0.2", ttl=9)
    router.receive("eth0", original, 0.0)
    [frame] = data_frames(router)
    sent = IPv4Packet.from_wire(frame.packet)  # checksum still valid
    before = IPv4Packet.from_wire(original)
    assert sent.header.ttl == 8
    assert (sent.header.src, sent.header.dst, sent.payload) == (
        before.header.src,
        before.header.dst,
        before.payload,
    )


def test_source_outside_every_mask_goes_nowhere() -> None:
    r = make_router()
    r.receive("eth2", join(S1, LAN), 0.0)
    r.take_frames()
    assert forwarded(r, "10.2.0.5") == []
    assert r.stats.no_member == 1


def test_exclude_mask_carves_out_of_an_include() -> None:
    r = make_router()
    carved = PortionSet((Portion.parse("10.1.0.0/24"),), (Portion.parse("10.1.0.16/28"),))
    r.receive("eth2", join(S1, carved), 0.0)
    r.take_frames()
    assert forwarded(r, "10.1.0.5") == [("eth2", S1)]
    assert forwarded(r, "10.1.0.17") == []
    assert forwarded(r, "10.1.0.31") == []
    assert forwarded(r, "10.1.0.32") == [("eth2", S1)]


def test_arbitrary_bit_masks_not_only_prefixes() -> None:
    r = make_router()
    # Sources whose third-lowest bit is set and lowest is clear: ...x1x0.
    r.receive("eth2", join(S1, PortionSet((Portion.parse("0.0.0.4/0.0.0.5"),))), 0.0)
    r.take_frames()
    got = [a for a in range(2, 40) if forwarded(r, f"10.1.0.{a}")]
    assert got == [a for a in range(2, 40) if a & 5 == 4]


def test_block_alone_is_a_leave(router: Router) -> None:
    assert forwarded(router, "10.1.0.2") == [("eth2", S1)]  # primes the forwarding cache
    router.receive("eth2", report(S1, record_for(GROUP, EVEN, RecordType.BLOCK_OLD_SOURCES)), 1.0)
    assert forwarded(router, "10.1.0.2", now=1.0) == []
    assert forwarded(router, "10.1.0.3", now=1.0) == [("eth3", S2)]
    assert str(S1) not in router.membership()[str(GROUP)]


@pytest.mark.parametrize("block_first", [True, False], ids=["block-allow", "allow-block"])
def test_block_and_allow_in_one_report_replace_the_filter(
    router: Router, block_first: bool
) -> None:
    # Claim 3: leave the old portions and join the new ones in one message.
    assert forwarded(router, "10.1.0.2") == [("eth2", S1)]
    block = record_for(GROUP, EVEN, RecordType.BLOCK_OLD_SOURCES)
    allow = record_for(GROUP, LAN, RecordType.ALLOW_NEW_SOURCES)
    records = (block, allow) if block_first else (allow, block)
    router.receive("eth2", report(S1, *records), 1.0)
    assert router.membership()[str(GROUP)][str(S1)] == str(LAN)
    assert forwarded(router, "10.1.0.2", now=1.0) == [("eth2", S1)]
    assert forwarded(router, "10.1.0.3", now=1.0) == [("eth2", S1), ("eth3", S2)]
    assert forwarded(router, "10.2.0.2", now=1.0) == []  # even, but outside the new portion


def test_membership_expires_after_the_hold_time_unless_refreshed() -> None:
    r = make_router()
    r.receive("eth2", join(S1, EVEN), 0.0)
    r.receive("eth3", join(S2, ODD), 0.0)
    assert r.next_deadline() == pytest.approx(HOLD)
    r.receive("eth3", join(S2, ODD), 2.0)  # s2 refreshes, s1 does not
    r.take_frames()
    assert forwarded(r, "10.1.0.2", now=HOLD - 0.1) == [("eth2", S1)]
    r.on_timer(HOLD)
    assert forwarded(r, "10.1.0.2", now=HOLD) == []
    assert forwarded(r, "10.1.0.3", now=HOLD) == [("eth3", S2)]
    assert r.next_deadline() == pytest.approx(2.0 + HOLD)
    r.on_timer(2.0 + HOLD)
    assert forwarded(r, "10.1.0.3", now=2.0 + HOLD) == []
    assert r.membership() == {}
    assert r.next_deadline() is None


def test_any_source_join_receives_every_source() -> None:
    r = make_router()
    r.receive("eth2", report(S1, any_source_record(CONTROL, RecordType.MODE_IS_EXCLUDE)), 0.0)
    r.take_frames()
    for src in ("10.1.0.2", "10.1.0.3", "10.254.0.6"):
        r.receive("eth0", datagram(src, CONTROL), 0.0)
        assert hops(data_frames(r)) == [("eth2", S1)]


# -- admission: the link check, malformed reports -----------------------------------


@pytest.mark.parametrize("iface", ["eth0", "eth3", "eth1"])
def test_join_on_the_wrong_link_is_refused(iface: str) -> None:
    r = make_router()
    r.receive(iface, join(S1, EVEN), 0.0)
    assert r.stats.rejected["wrong link"] == 1
    assert r.stats.joins_accepted == 0
    assert r.take_frames() == []  # not relayed
    assert forwarded(r, "10.1.0.2") == []


def test_join_claiming_another_requester_is_refused_on_the_senders_link() -> None:
    # A client on the LAN sends a report naming s1 as the requester: the route
    # toward s1 is eth2, so a report for s1 arriving on eth0 is not believed.
    r = make_router()
    r.receive("eth0", join(S1, EVEN, src=IPv4Address("10.1.0.9")), 0.0)
    assert r.stats.rejected["wrong link"] == 1
    assert r.membership() == {}


def test_a_refused_join_leaves_the_earlier_join_of_its_requester_intact() -> None:
    # s1 joins for the even sources; then an impostor on the client LAN claims to be
    # s1 and asks for the odd ones (or to leave: an empty include). Neither is
    # believed, and s1 keeps receiving exactly its even sources.
    r = make_router()
    r.receive("eth2", join(S1, EVEN), 0.0)
    r.take_frames()
    before = r.membership()
    impostor = IPv4Address("10.1.0.9")
    r.receive("eth0", join(S1, ODD, src=impostor), 0.1)
    r.receive("eth0", join(S1, PortionSet(()), src=impostor), 0.2)
    assert r.stats.rejected["wrong link"] == 2
    assert r.membership() == before
    assert forwarded(r, "10.1.0.2", now=0.3) == [("eth2", S1)]
    assert forwarded(r, "10.1.0.3", now=0.3) == []


def _bad_checksum() -> bytes:
    packet = IPv4Packet.from_wire(join(S1, EVEN))
    igmp = bytearray(packet.payload)
    igmp[2] ^= 0xFF
    return IPv4Packet.make(
        S1, IGMP_V3_ROUTERS, IPPROTO_IGMP, bytes(igmp), ttl=1, options=packet.header.options
    ).to_wire()


MALFORMED = {
    "empty": b"",
    "short": b"\x45\x00\x00",
    "not ipv4": b"\x60" + b"\x00" * 39,
    "igmp garbage": IPv4Packet.make(S1, IGMP_V3_ROUTERS, IPPROTO_IGMP, b"\x22\xff\x00").to_wire(),
    "igmp checksum": _bad_checksum(),
    "ip length lies": join(S1, EVEN)[:-4],
}


@pytest.mark.parametrize("packet", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_packet_is_counted_never_raises(packet: bytes) -> None:
    r = make_router()
    r.receive("eth2", packet, 0.0)
    assert r.stats.malformed == 1
    assert r.membership() == {}
    assert r.take_frames() == []


@given(st.binary(max_size=120))
def test_arbitrary_bytes_never_raise(packet: bytes) -> None:
    r = make_router()
    r.receive("eth2", join(S1, EVEN), 0.0)
    r.receive("eth2", packet, 0.0)
    r.receive("eth0", b"\x45" + packet, 0.0)
    # Control datagrams addressed to the router itself (label mappings, flow tags) too.
    me = r.interfaces["eth2"].address
    udp = UDPDatagram(7946, 7946, packet).to_wire(S1, me)
    r.receive("eth2", IPv4Packet.make(S1, me, IPPROTO_UDP, udp).to_wire(), 0.0)


_JOIN = join(S1, LAN)


@given(st.integers(0, len(_JOIN) - 1), st.integers(1, 255))
def test_a_join_with_any_byte_corrupted_changes_nothing(position: int, flip: int) -> None:
    # Checksums (IP header, IGMP) catch every single-byte error; a flip that turns
    # the packet into something else (another protocol, another address) is not a join.
    wire = bytearray(_JOIN)
    wire[position] ^= flip
    r = make_router()
    r.receive("eth2", bytes(wire), 0.0)
    assert r.membership() == {}
    assert r.stats.joins_accepted == 0


# -- relaying joins upstream --------------------------------------------------------------


def test_accepted_join_is_relayed_unchanged_out_of_router_links_only() -> None:
    r = make_router()
    original = join(S1, EVEN)
    r.receive("eth2", original, 0.0)
    frames = r.take_frames()
    assert sorted(f.iface for f in frames) == ["eth1", "eth4"]
    for frame in frames:
        ip = IPv4Packet.from_wire(frame.packet)
        assert frame.next_hop is None
        assert ip.header.dst == IGMP_V3_ROUTERS and ip.header.ttl == 1
        assert ip.header.router_alert
        assert ip.header.src == r.interfaces[frame.iface].address
        assert ip.payload == IPv4Packet.from_wire(original).payload  # signature still checks
    assert r.stats.joins_relayed == 2


def test_join_from_upstream_is_relayed_onward_and_forwarded_toward() -> None:
    r = make_router()
    relayed = join(FAR, LAN, src=UP2)  # a neighbour relays FAR's report to us
    r.receive("eth4", relayed, 0.0)
    assert [f.iface for f in r.take_frames()] == ["eth1"]
    # Traffic for FAR goes to the neighbour that relayed the join, and never
    # back out of the link it came in on.
    assert forwarded(r, "10.1.0.2") == [("eth4", UP2)]
    assert forwarded(r, "10.1.0.2", on="eth4") == []


def test_relayed_join_arriving_off_the_route_is_refused() -> None:
    # FAR is reached via eth4; the same report arriving over eth1 (a loop) is dropped.
    r = make_router()
    r.receive("eth1", join(FAR, LAN, src=UP1), 0.0)
    assert r.stats.rejected["wrong link"] == 1
    assert r.take_frames() == []


# -- TTL and unicast ----------------------------------------------------------------------


def test_ttl_one_group_packet_is_not_forwarded(router: Router) -> None:
    router.receive("eth0", datagram("10.1.0.2", ttl=1), 0.0)
    assert data_frames(router) == []
    assert router.stats.ttl_expired == 1
    router.receive("eth0", datagram("10.1.0.2", ttl=2), 0.0)
    [frame] = data_frames(router)
    assert IPv4Packet.from_wire(frame.packet).header.ttl == 1


def test_link_local_group_is_never_forwarded(router: Router) -> None:
    router.receive("eth2", join(S1, LAN), 0.0)
    router.take_frames()
    router.receive("eth0", datagram("10.1.0.2", "224.0.0.5"), 0.0)
    assert data_frames(router) == []


@pytest.mark.parametrize(
    ("dst", "expected"),
    [
        ("10.9.9.5", ("eth1", UP1)),  # /24 beats /16
        ("10.9.1.1", ("eth4", UP2)),  # /16 beats /8
        ("10.200.0.1", ("eth1", UP1)),  # only /8
        ("10.254.0.6", ("eth3", S2)),  # on a connected /30: straight to the host
        ("10.1.0.77", ("eth0", IPv4Address("10.1.0.77"))),
    ],
)
def test_unicast_follows_the_longest_prefix(dst: str, expected: tuple[str, IPv4Address]) -> None:
    r = make_router()
    r.receive("eth2", datagram("10.254.0.2", dst), 0.0)
    [frame] = r.take_frames()
    assert hops([frame]) == [expected]
    assert IPv4Packet.from_wire(frame.packet).header.ttl == 63


def test_unicast_without_route_or_ttl_is_dropped() -> None:
    r = make_router()
    r.receive("eth0", datagram("10.1.0.2", "192.168.1.1"), 0.0)
    r.receive("eth0", datagram("10.1.0.2", "10.9.1.1", ttl=1), 0.0)
    r.receive("eth0", datagram("10.1.0.2", "10.255.0.1"), 0.0)  # the router itself
    assert r.take_frames() == []
    assert (r.stats.no_route, r.stats.ttl_expired, r.stats.local) == (1, 1, 1)


def test_route_lookup_outside_every_prefix_is_none() -> None:
    r = make_router()
    assert r.route(int(ipaddress.IPv4Address("172.16.0.1"))) is None
    assert r.route(int(ipaddress.IPv4Address("10.9.9.255"))) == ("eth1", int(UP1))
