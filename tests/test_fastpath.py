"""The router's fast path (`protocol/fastpath.py`): the overlay sends a cache hit itself,
and the outcome is the router's own, packet for packet.

* One router on the overlay, a batch of datagrams read in one wake-up (joins, data,
  TTL 1, no member, malformed, a member-down notice half-way), against a twin router
  fed the same packets by hand: the same copies reach each server in the same order,
  the same counters, the same membership; the fast path served the repeats.
* What is never installed: packets whose fate depends on time (a private group's
  senders on their own link), the R4 group, anything while no driver serves the
  tables; and every entry goes when membership changes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from manycast.drivers.links import Attachment, LinkSpec
from manycast.drivers.overlay import AsyncOverlay
from manycast.protocol.fastpath import FastPath
from manycast.protocol.membership import record_for
from manycast.protocol.node import Interface
from manycast.protocol.router import Router
from manycast.space import Portion, PortionSet
from manycast.wire import control
from manycast.wire.ip import (
    IPPROTO_IGMP,
    IPPROTO_UDP,
    IPv4Packet,
    UDPDatagram,
    decrement_ttl_v4,
    forward_copy_v4,
)
from manycast.wire.membership import GroupRecord, IGMPv3Report, RecordType, igmp_packet
from test_private import C1, S1, datagram, join, make_router, registration
from test_private import GROUP as PRIVATE_GROUP

DEADLINE = 20.0
GROUP = IPv4Address("232.1.1.1")
EMPTY_GROUP = IPv4Address("232.1.1.2")
UP, DOWN, SIDE = (IPv4Network(n) for n in ("10.0.0.0/24", "10.1.0.0/24", "10.2.0.0/24"))
CLIENTS = IPv4Network("198.18.0.0/15")
WATCHER = IPv4Address("198.51.100.7")  # a member beyond the upstream neighbour
EVEN = PortionSet((Portion(4, 0, 1),))
ALL = PortionSet((Portion(4, 0, 0),))
CONTROL_PORT = 7946


def router() -> Router:
    interfaces = {
        "up": Interface("up", "upstream", UP[254], UP),
        "down": Interface("down", "servers", DOWN[254], DOWN),
        "side": Interface("side", "side", SIDE[254], SIDE),
    }
    routes = [(CLIENTS, "up", UP[1]), (IPv4Network("198.51.100.0/24"), "up", UP[1])]
    return Router("r", interfaces, routes, router_ifaces=(), hold_time=3600.0)


def links() -> list[LinkSpec]:
    def at(node: str, iface: str, address: IPv4Address) -> Attachment:
        return Attachment(node, iface, int(address))

    return [
        LinkSpec("upstream", (at("tx", "eth0", UP[1]), at("r", "up", UP[254]))),
        LinkSpec("servers", (at("r", "down", DOWN[254]), at("s1", "eth0", DOWN[1]))),
        LinkSpec("side", (at("r", "side", SIDE[254]), at("s2", "eth0", SIDE[1]))),
    ]


def report(group: IPv4Address, portions: PortionSet, requester: IPv4Address) -> bytes:
    record = record_for(group, portions, RecordType.CHANGE_TO_INCLUDE_MODE)
    return igmp_packet(IGMPv3Report((record,)), requester).to_wire()


def data(
    src: IPv4Address, group: IPv4Address = GROUP, ttl: int = 64, options: bool = False
) -> bytes:
    udp = UDPDatagram(40000, 7000, b"fast path payload").to_wire(src, group)
    packet = IPv4Packet.make(
        src, group, IPPROTO_UDP, udp, ttl=ttl, options=b"\x01\x01\x01\x00" if options else b""
    )
    return packet.to_wire()


def member_down(member: IPv4Address, signer: IPv4Address) -> bytes:
    """A public group's notice: unsigned, from a member on its own side."""
    notice = control.MemberDown("tx", 0, GROUP, member, signer, 1, 0, b"\x05" * 8)
    dst = UP[254]
    udp = UDPDatagram(CONTROL_PORT, CONTROL_PORT, control.encode(notice)).to_wire(signer, dst)
    return IPv4Packet.make(signer, dst, IPPROTO_UDP, udp, ttl=64).to_wire()


def batch() -> list[bytes]:
    clients = [CLIENTS[7 * i + 1] for i in range(12)]
    first = [data(c) for c in clients] * 3  # repeats: served by the fast path
    odd = [
        data(clients[0], ttl=1),  # TTL expired, even with an entry
        data(clients[1], group=EMPTY_GROUP),  # no member
        b"\x45\x00\x00",  # malformed
        data(clients[2], options=True),  # a header with options: the same addresses
        b"\x60" + data(clients[3])[1:],  # not IPv4, same addresses
    ]
    # The side server is declared dead half-way: later copies go to s1 only.
    later = [data(c) for c in clients] * 2
    return first + odd + [member_down(SIDE[1], WATCHER)] + later


def twin_frames(packets: Iterable[bytes]) -> tuple[Router, dict[str, list[bytes]]]:
    """The same joins and batch fed to a router by hand (no fast path)."""
    twin = router()
    twin.receive("down", report(GROUP, EVEN, DOWN[1]), 0.0)
    twin.receive("side", report(GROUP, ALL, SIDE[1]), 0.0)
    twin.receive("up", report(GROUP, ALL, WATCHER), 0.0)
    twin.take_frames()
    sent: dict[str, list[bytes]] = {"down": [], "side": []}
    for packet in packets:
        twin.receive("up", packet, 1.0)
        for frame in twin.take_frames():
            sent[frame.iface].append(frame.packet)
    return twin, sent


def udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.setblocking(False)
    sock.bind(("127.0.0.1", 0))
    return sock


def drain(sock: socket.socket) -> list[bytes]:
    got = []
    while True:
        try:
            got.append(sock.recv(65535))
        except BlockingIOError:
            return got


async def overlay_run(packets: list[bytes]) -> tuple[Router, dict[str, list[bytes]], int]:
    tx, s1, s2 = udp_socket(), udp_socket(), udp_socket()
    node = router()
    endpoints: dict[tuple[str, str], tuple[str, int] | int] = {
        ("tx", "eth0"): tx.getsockname(),
        ("s1", "eth0"): s1.getsockname(),
        ("s2", "eth0"): s2.getsockname(),
        ("r", "up"): 0,
        ("r", "down"): 0,
        ("r", "side"): 0,
    }
    net = AsyncOverlay(links(), endpoints, [node])
    try:
        net.start()
        s1.sendto(report(GROUP, EVEN, DOWN[1]), net.endpoints[("r", "down")])
        s2.sendto(report(GROUP, ALL, SIDE[1]), net.endpoints[("r", "side")])
        tx.sendto(report(GROUP, ALL, WATCHER), net.endpoints[("r", "up")])
        assert await net.run_until(
            net.now + DEADLINE, lambda: len(node.members.get(int(GROUP), {})) == 3
        )
        # Everything queued before the loop looks again: one wake-up reads it all.
        for packet in packets:
            tx.sendto(packet, net.endpoints[("r", "up")])
        assert await net.run_until(
            net.now + DEADLINE, lambda: net.counters["upstream"].received == len(packets) + 1
        )
        entries = len(node.fast_path.tables["up"])
        await asyncio.sleep(0.05)  # let the last copies land in the sinks' buffers
        # Not the batch's: the General Queries the router sends as it starts.
        copies = {
            name: [p for p in drain(sink) if p[9] != IPPROTO_IGMP]
            for name, sink in (("down", s1), ("side", s2))
        }
        return node, copies, entries
    finally:
        net.close()
        for sock in (tx, s1, s2):
            sock.close()


def test_a_batch_served_by_the_fast_path_matches_the_router_packet_for_packet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    credited: list[int] = []
    credit = FastPath.credit

    def counting(self: FastPath, copies: int) -> None:
        credited.append(copies)
        credit(self, copies)

    monkeypatch.setattr(FastPath, "credit", counting)
    packets = batch()
    node, got, entries = asyncio.run(overlay_run(packets))
    twin, expected = twin_frames(packets)
    assert got == expected
    assert len(got["side"]) == 12 * 3 + 1  # before the notice: every client, and the options one
    assert len(got["down"]) == 6 * 3 + 6 * 2  # the even clients
    assert dataclasses.asdict(node.stats) == dataclasses.asdict(twin.stats)
    assert node.stats.members_down == 1 and node.stats.ttl_expired == 1
    assert node.stats.no_member == 1 and node.stats.malformed == 2
    assert node.membership() == twin.membership()
    # Entries are per cell of the members' masks (odd and even sources), so only a
    # cell's first packet goes to the router. Before the notice, of 3 rounds of 6 odd
    # clients (to s2) and 6 even (to both), all but the first odd and the first even:
    # 5 + 5 * 2 + 2 * (6 + 6 * 2); the options packet (its cell has an entry); after
    # the notice the even clients' 12 packets to s1 but the first (the odd ones now go
    # nowhere: no entry).
    assert sum(credited) == 5 + 5 * 2 + 2 * (6 + 6 * 2) + 1 + 11
    # Refilled after the notice emptied it: one entry, the even cell toward s1.
    assert entries == 1
    assert all(outs == (("down", int(DOWN[1])),) for outs in node.fast_path.tables["up"].values())


def test_nothing_is_installed_unless_a_driver_serves_the_tables() -> None:
    node = router()
    node.receive("down", report(GROUP, EVEN, DOWN[1]), 0.0)
    node.receive("up", data(CLIENTS[1]), 1.0)
    node.receive("up", data(CLIENTS[8]), 1.0)
    assert node.stats.multicast_forwarded == 1
    assert all(not table for table in node.fast_path.tables.values())
    node.fast_path.served = True
    node.receive("up", data(CLIENTS[8]), 1.0)
    assert node.fast_path.tables["up"] == {
        node.fast_path.key(data(CLIENTS[8])): (("down", int(DOWN[1])),)
    }
    # Any change of membership empties every table.
    node.receive("side", report(GROUP, ALL, SIDE[1]), 2.0)
    assert all(not table for table in node.fast_path.tables.values())


def test_a_private_groups_senders_on_their_own_link_are_not_installed() -> None:
    # Their right to send lapses with time; packets from upstream are transit.
    node = make_router()
    node.fast_path.served = True
    node.receive("eth2", join(S1), 0.1)
    node.receive("eth0", registration(C1), 0.2)
    node.receive("eth0", datagram(C1, PRIVATE_GROUP), 0.3)
    assert node.stats.multicast_forwarded == 1
    assert not node.fast_path.tables["eth0"]
    node.receive("eth1", datagram(IPv4Address("192.0.2.8"), PRIVATE_GROUP), 0.3)
    assert node.stats.multicast_forwarded == 2
    assert len(node.fast_path.tables["eth1"]) == 1


def test_the_r4_group_is_never_installed() -> None:
    # A connection tagged onto its old owner's tree must still be pushed onto it.
    interfaces = {
        "up": Interface("up", "upstream", UP[254], UP),
        "down": Interface("down", "servers", DOWN[254], DOWN),
    }
    node = Router("r", interfaces, [(CLIENTS, "up", UP[1])], (), r4_group=GROUP)
    node.fast_path.served = True
    node.receive("down", report(GROUP, ALL, DOWN[1]), 0.0)
    node.receive("up", data(CLIENTS[3]), 1.0)
    node.receive("up", data(CLIENTS[3], group=EMPTY_GROUP), 1.0)
    assert node.stats.multicast_forwarded == 1
    assert not node.fast_path.tables["up"]


def test_the_ttl_decrement_is_rfc_1624_equation_3_for_every_checksum() -> None:
    # decrement_ttl_v4 patches with (HC + 0x0100) mod 0xFFFF: the same 16 bits as
    # HC' = ~(~HC + ~m + m') for every HC (0xFEFF gives 0x0000, not 0xFFFF).
    header = bytearray(data(CLIENTS[1]))
    for checksum in range(1 << 16):
        header[10:12] = checksum.to_bytes(2, "big")
        total = (checksum ^ 0xFFFF) + 0xFEFF
        expected = ((total & 0xFFFF) + (total >> 16)) ^ 0xFFFF
        out = decrement_ttl_v4(bytes(header))
        assert out[10:12] == expected.to_bytes(2, "big"), hex(checksum)
        assert out[8] == header[8] - 1 and out[:8] == header[:8] and out[12:] == header[12:]


@given(st.binary(max_size=40), st.sampled_from([0x45, 0x46, 0x4F, 0x44, 0x50, 0x60]))
def test_forward_copy_is_the_decrement_exactly_when_the_router_would_forward(
    data: bytes, first: int
) -> None:
    for packet in (data, bytes([first]) + data[1:]):
        forwards = len(packet) >= 20 and 0x45 <= packet[0] <= 0x4F and packet[8] > 1
        assert forward_copy_v4(packet) == (decrement_ttl_v4(packet) if forwards else None)


def test_forwarding_state_follows_the_portions_not_the_clients() -> None:
    """10 000 client sources, two members splitting them on the lowest bit: the
    router's cache and its fast path hold one entry per cell (2), and every copy goes
    where a per-source decision would send it. A source-specific join (a whole address)
    makes the cells single addresses again."""
    node = router()
    node.fast_path.served = True
    odd = PortionSet((Portion(4, 1, 1),))
    node.receive("down", report(GROUP, EVEN, DOWN[1]), 0.0)
    node.receive("side", report(GROUP, odd, SIDE[1]), 0.0)
    node.take_frames()
    sources = [CLIENTS[i] for i in range(1, 10_001)]
    for source in sources:
        node.receive("up", data(source), 1.0)
    frames = node.take_frames()
    assert [f.iface for f in frames] == ["down" if int(s) % 2 == 0 else "side" for s in sources]
    assert len(node._mfc[int(GROUP)]) == 2
    assert len(node.fast_path.tables["up"]) == 2
    pinned = GroupRecord(RecordType.ALLOW_NEW_SOURCES, GROUP, sources=(CLIENTS[3],))
    node.receive("side", igmp_packet(IGMPv3Report((pinned,)), SIDE[2]).to_wire(), 2.0)
    for source in sources[:100]:
        node.receive("up", data(source), 3.0)
    assert len(node._mfc[int(GROUP)]) == 100
