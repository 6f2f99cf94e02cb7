"""The kernel's IPv6 multicast forwarding, in four namespaces: the MFC through
`drivers/mroute6.py`, and the portion plane (`drivers/kernel/portion_plane.py`).

    sender (s0) --- (r0) router (r1) --- (d0) receiver
                            (r2) --- (e0) receiver2

The router's MRT6 socket has r0 and r1 as MIFs 0 and 1. A packet from the sender to
an ff3e:: group is held by the kernel and reported as a NOCACHE upcall; once the
entry (sender, group, in on MIF 0, out on MIF 1) is installed, the kernel forwards
it, hop limit one less, and counts it. A receiver joining the group sends an MLDv2
report, which the router's socket reads with the interface it came in on. The
portion plane sends each sender address to the receiver whose portion (value/mask
on the source's low bit) holds it, with no MFC entry and no upcall.

Needs root and network namespaces (CI runs as root); skips with the reason otherwise.
"""

from __future__ import annotations

import ipaddress
import os
import select
import shutil
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from manycast.drivers import mroute, netns
from manycast.drivers.kernel.portion_plane import PortionPlane, compile_portions
from manycast.drivers.mroute6 import (
    MLD_TYPES,
    MRT6MSG_NOCACHE,
    Mroute6Socket,
    Received6,
    Upcall6,
    icmp6_filter,
    parse_cache6,
    parse_upcall6,
    sockaddr_in6,
)
from manycast.protocol.membership import SourceFilter
from manycast.wire.membership import MLDv2Report

NEEDS_ROOT = "the kernel's IPv6 multicast routing needs root and network namespaces"
PREFIX = f"mc6t{os.getpid() % 10000}"
SENDER, ROUTER, RECEIVER, RECEIVER2 = (f"{PREFIX}-{n}" for n in ("s", "r", "d", "e"))
GROUP = ipaddress.IPv6Address("ff3e::8000:1")
SENDER_ADDRESS = ipaddress.IPv6Address("2001:db8:1::1")
PORT = 9000
WAIT_S = 3.0


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return NEEDS_ROOT
    if not os.path.exists("/proc/net/ip6_mr_cache"):
        return "this kernel has no IPv6 multicast routing (CONFIG_IPV6_MROUTE)"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


def _configure(name: str, links: list[tuple[str, str]], route_via: str | None = None) -> None:
    ipr = netns.iproute(name)
    try:
        for ifname, addr in links:
            netns.address(ipr, ifname, addr, 64)
            netns.up(ipr, ifname)
        netns.up(ipr, "lo")
        if route_via is not None:
            ipr.route("add", dst="ff3e::/16", oif=netns.index(ipr, route_via), family=10)
    finally:
        ipr.close()


@pytest.fixture
def three() -> Iterator[dict[str, int]]:
    """The four namespaces, linked and addressed; the router's interface indexes."""
    names = (SENDER, ROUTER, RECEIVER, RECEIVER2)
    try:
        for name in names:
            netns.create(name)
            # Addresses usable at once (no duplicate address detection wait).
            netns.sysctl(
                name,
                {"net.ipv6.conf.all.accept_dad": "0", "net.ipv6.conf.default.accept_dad": "0"},
            )
        netns.sysctl(ROUTER, {"net.ipv6.conf.all.forwarding": "1"})
        ipr = netns.iproute(ROUTER)
        try:
            netns.veth(ipr, "r0", SENDER, "s0")
            netns.veth(ipr, "r1", RECEIVER, "d0")
            netns.veth(ipr, "r2", RECEIVER2, "e0")
        finally:
            ipr.close()
        _configure(SENDER, [("s0", f"{SENDER_ADDRESS}")], route_via="s0")
        _configure(
            ROUTER, [("r0", "2001:db8:1::2"), ("r1", "2001:db8:2::1"), ("r2", "2001:db8:3::1")]
        )
        _configure(RECEIVER, [("d0", "2001:db8:2::2")], route_via="d0")
        _configure(RECEIVER2, [("e0", "2001:db8:3::2")], route_via="e0")
        ipr = netns.iproute(ROUTER)
        try:
            yield {name: netns.index(ipr, name) for name in ("r0", "r1", "r2")}
        finally:
            ipr.close()
    finally:
        for name in names:
            netns.remove(name)


def _receiver_socket(ifindex: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)
    sock.bind(("::", PORT))
    request = GROUP.packed + struct.pack("@I", ifindex)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, request)
    sock.setblocking(False)
    return sock


def _receiver_in(name: str, ifname: str) -> socket.socket:
    return netns.run_in(name, lambda: _receiver_socket(socket.if_nametoindex(ifname)))


def _wait_for(
    router: Mroute6Socket, want: type[Upcall6] | type[Received6]
) -> Upcall6 | Received6 | None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        select.select([router], [], [], 0.05)
        for item in router.read():
            if isinstance(item, want):
                return item
    return None


def test_parse_upcall6_tells_an_upcall_from_an_icmpv6_message() -> None:
    upcall = bytes([0, MRT6MSG_NOCACHE]) + (3).to_bytes(2, "little") + bytes(4)
    upcall += SENDER_ADDRESS.packed + GROUP.packed
    got = parse_upcall6(upcall)
    assert got == Upcall6(MRT6MSG_NOCACHE, 3, int(SENDER_ADDRESS), int(GROUP))
    assert parse_upcall6(bytes([143]) + upcall[1:]) is None  # an MLDv2 report's type
    assert parse_upcall6(upcall[:39]) is None
    assert len(sockaddr_in6(int(GROUP))) == 28


def test_proc_tables_parse() -> None:
    """/proc/net/ip6_mr_cache and ip6_mr_vif as this kernel prints them (a lab's router)."""
    cache = (
        "Group                            Origin                           Iif      Pkts  Bytes"
        "     Wrong  Oifs\n"
        "ff3e:0000:0000:0000:0000:0000:8000:0001 2001:0db8:000a:0000:0000:0000:0000:0002 1"
        "          2      108        0  0:1  \n"
        "ff15:0000:0000:0000:0000:0000:0077:0001 2001:0db8:fffe:0000:0000:0000:0000:0002 2"
        "        343    37387        0  0:1   3:1  \n"
        "ff3e:0000:0000:0000:0000:0000:8000:0001 2001:0db8:000a:0000:0000:0000:0000:0009 -1"
        "          0        0        0\n"
    )
    first, second, third = parse_cache6(cache)
    assert (str(first.group), str(first.source)) == ("ff3e::8000:1", "2001:db8:a::2")
    assert (first.parent, first.packets, first.bytes, first.outs) == (1, 2, 108, (0,))
    assert second.outs == (0, 3) and second.resolved
    assert not third.resolved
    # The MIF table's first columns are the VIF table's.
    mifs = mroute.parse_vifs(
        "Interface      BytesIn  PktsIn  BytesOut PktsOut Flags\n"
        " 2 eth2          74665     685     74774     686 00000\n"
    )
    assert mifs == [mroute.Vif(2, "eth2", 685, 686)]


def test_the_icmpv6_filter_passes_mld_only() -> None:
    words = struct.unpack("@8I", icmp6_filter(MLD_TYPES))
    blocked = {kind for kind in range(256) if words[kind >> 5] >> (kind & 31) & 1}
    assert set(range(256)) - blocked == {130, 131, 132, 143}


def test_the_kernel_forwards_an_entry_installed_on_its_upcall_and_reports_mld(
    three: dict[str, int],
) -> None:
    router = netns.run_in(ROUTER, Mroute6Socket)
    try:
        netns.run_in(ROUTER, lambda: router.add_mif(0, three["r0"]))
        netns.run_in(ROUTER, lambda: router.add_mif(1, three["r1"]))
        netns.run_in(ROUTER, lambda: router.join(three["r1"]))

        # The receiver joins: its kernel sends an MLDv2 report toward ff02::16.
        receiver_if = netns.run_in(RECEIVER, lambda: socket.if_nametoindex("d0"))
        receiver = netns.run_in(RECEIVER, lambda: _receiver_socket(receiver_if))
        # Reports of the receiver's other groups (solicited-node, all-routers) come
        # too; the one naming GROUP must, parsed by our own MLDv2 codec.
        groups: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
        report = None
        deadline = time.monotonic() + WAIT_S
        while GROUP not in groups and time.monotonic() < deadline:
            report = _wait_for(router, Received6)
            if isinstance(report, Received6) and report.message[0] == 143:
                assert report.destination is not None  # IPV6_RECVPKTINFO is on
                parsed = MLDv2Report.from_wire(report.message, report.source, report.destination)
                groups |= {record.group for record in parsed.records}
        assert GROUP in groups, f"no MLDv2 report for {GROUP} reached the router: {groups}"
        assert isinstance(report, Received6)
        assert report.ifindex == three["r1"]
        assert report.destination == ipaddress.IPv6Address("ff02::16")
        assert report.source.is_link_local and report.hop_limit == 1

        # The first packet of (sender, group) is held and reported.
        sender = netns.socket_in(SENDER, socket.AF_INET6, socket.SOCK_DGRAM)
        sender.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 8)
        sender.sendto(b"first", (str(GROUP), PORT))
        upcall = _wait_for(router, Upcall6)
        assert upcall == Upcall6(MRT6MSG_NOCACHE, 0, int(SENDER_ADDRESS), int(GROUP))
        assert router.packets(upcall.source, upcall.group) is None  # no entry yet

        netns.run_in(ROUTER, lambda: router.set_entry(upcall.source, upcall.group, 0, [1]))
        sender.sendto(b"second", (str(GROUP), PORT))
        got = _received(receiver, 2)
        # The held packet went on once the entry was in, and the next one with it;
        # each with its hop limit one less.
        assert got == {b"first": 7, b"second": 7}
        assert router.packets(int(SENDER_ADDRESS), int(GROUP)) == 2

        # Deleted, the entry's packets are held and asked about again.
        netns.run_in(ROUTER, lambda: router.delete_entry(int(SENDER_ADDRESS), int(GROUP), 0))
        assert router.packets(int(SENDER_ADDRESS), int(GROUP)) is None
        sender.sendto(b"third", (str(GROUP), PORT))
        again = _wait_for(router, Upcall6)
        assert again is not None and again.source == int(SENDER_ADDRESS)
        sender.close()
        receiver.close()
    finally:
        router.close()


def test_an_entry_reaches_the_kernel_with_its_incoming_and_outgoing_mifs(
    three: dict[str, int],
) -> None:
    """What `set_entry` packs is what the kernel reads: the origin, the group, the
    incoming MIF and every outgoing MIF but the incoming one, as the kernel's table
    shows them; a rewrite replaces the set, a deletion removes the entry."""
    router = netns.run_in(ROUTER, Mroute6Socket)

    def table() -> list[tuple[object, ...]]:
        text = netns.read_in(ROUTER, "/proc/net/ip6_mr_cache")
        return [(e.source, e.group, e.parent, e.outs) for e in parse_cache6(text)]

    try:
        for mif, name in enumerate(("r0", "r1", "r2")):
            router.add_mif(mif, three[name])  # (in the socket's namespace, wherever called)
        router.set_entry(int(SENDER_ADDRESS), int(GROUP), 1, {0, 1, 2})
        assert table() == [(SENDER_ADDRESS, GROUP, 1, (0, 2))]
        router.set_entry(int(SENDER_ADDRESS), int(GROUP), 1, {2})
        assert table() == [(SENDER_ADDRESS, GROUP, 1, (2,))]
        router.set_entry(int(SENDER_ADDRESS), int(GROUP), 1, ())  # drop quietly
        assert table() == [(SENDER_ADDRESS, GROUP, 1, ())]
        router.delete_entry(int(SENDER_ADDRESS), int(GROUP), 1)
        assert table() == []
    finally:
        router.close()


def _received(sock: socket.socket, want: int, wait: float = WAIT_S) -> dict[bytes, int]:
    """Up to `want` datagrams (within `wait` s): payload -> hop limit as it arrived."""
    got: dict[bytes, int] = {}
    deadline = time.monotonic() + wait
    while len(got) < want and time.monotonic() < deadline:
        select.select([sock], [], [], 0.05)
        try:
            data, ancdata, _, _ = sock.recvmsg(2048, 64)
        except BlockingIOError:
            continue
        got[data] = next(
            struct.unpack("@i", value[:4])[0]
            for level, kind, value in ancdata
            if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_HOPLIMIT
        )
    return got


@pytest.mark.skipif(shutil.which("nft") is None, reason="nft (nftables) is not installed")
def test_the_portion_plane_forwards_ipv6_sources_by_mask(three: dict[str, int]) -> None:
    """Sources ending in an even word go to the receiver, odd ones to receiver2: two
    map elements, however many sources; hop limit one less; no MFC, no upcall."""
    even, odd = ipaddress.IPv6Address("2001:db8:1::10"), ipaddress.IPv6Address("2001:db8:1::11")
    ipr = netns.iproute(SENDER)
    try:
        for source in (even, odd):
            netns.address(ipr, "s0", str(source), 64)
    finally:
        ipr.close()
    receivers = [
        _receiver_in(name, ifname) for name, ifname in ((RECEIVER, "d0"), (RECEIVER2, "e0"))
    ]
    neighbours = {
        "r1": int(ipaddress.IPv6Address("2001:db8:2::2")),
        "r2": int(ipaddress.IPv6Address("2001:db8:3::2")),
    }

    class Member:
        def __init__(self, iface: str, value: int) -> None:
            self.iface, self.neighbor = iface, neighbours[iface]
            self.filter = SourceFilter(((value, 1),))

    plane = PortionPlane(int(GROUP), ["r0", "r1", "r2"], family=6)
    entries = compile_portions([Member("r1", 0), Member("r2", 1)])
    assert entries is not None and len(entries) == 2
    netns.run_in(ROUTER, plane.install)
    try:
        netns.run_in(ROUTER, lambda: plane.update(entries))
        senders = []
        for source in (even, odd):
            sock = netns.socket_in(SENDER, socket.AF_INET6, socket.SOCK_DGRAM)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 8)
            sock.bind((str(source), 0))
            senders.append(sock)
        for round_ in range(3):
            for source, sock in zip((even, odd), senders, strict=True):
                sock.sendto(f"{source} {round_}".encode(), (str(GROUP), PORT))
        got = [_received(sock, 3) for sock in receivers]
        assert got[0] == {f"{even} {i}".encode(): 7 for i in range(3)}
        assert got[1] == {f"{odd} {i}".encode(): 7 for i in range(3)}
        assert plane.status()["portions"] == {
            "::/::1": ["r1 2001:db8:2::2"],
            "::1/::1": ["r2 2001:db8:3::2"],
        }
        # Moved: the even sources' portion to receiver2 as well (one transaction).
        netns.run_in(
            ROUTER, lambda: plane.update(compile_portions([Member("r2", 0), Member("r2", 1)]))
        )
        senders[0].sendto(b"moved", (str(GROUP), PORT))
        assert _received(receivers[1], 1) == {b"moved": 7}
        assert _received(receivers[0], 1, wait=0.3) == {}  # (it came within ms above)
    finally:
        netns.run_in(ROUTER, plane.remove)
        for sock in [*receivers, *senders]:
            sock.close()
