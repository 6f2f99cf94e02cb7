"""The kernel's IPv6 multicast routing through `drivers/mroute6.py`, in three namespaces.

    sender (s0) --- (r0) router (r1) --- (d0) receiver

The router's MRT6 socket has r0 and r1 as MIFs 0 and 1. A packet from the sender to
an ff3e:: group is held by the kernel and reported as a NOCACHE upcall; once the
entry (sender, group, in on MIF 0, out on MIF 1) is installed, the kernel forwards
it, hop limit one less, and counts it. A receiver joining the group sends an MLDv2
report, which the router's socket reads with the interface it came in on.

Needs root and network namespaces (CI runs as root); skips with the reason otherwise.
"""

from __future__ import annotations

import ipaddress
import os
import select
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from manycast.drivers import netns
from manycast.drivers.mroute6 import (
    MRT6MSG_NOCACHE,
    Mroute6Socket,
    Received6,
    Upcall6,
    parse_upcall6,
    sockaddr_in6,
)
from manycast.wire.membership import MLDv2Report

NEEDS_ROOT = "the kernel's IPv6 multicast routing needs root and network namespaces"
PREFIX = f"mc6t{os.getpid() % 10000}"
SENDER, ROUTER, RECEIVER = (f"{PREFIX}-{n}" for n in ("s", "r", "d"))
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
    """The three namespaces, linked and addressed; the router's interface indexes."""
    names = (SENDER, ROUTER, RECEIVER)
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
        finally:
            ipr.close()
        _configure(SENDER, [("s0", f"{SENDER_ADDRESS}")], route_via="s0")
        _configure(ROUTER, [("r0", "2001:db8:1::2"), ("r1", "2001:db8:2::1")])
        _configure(RECEIVER, [("d0", "2001:db8:2::2")], route_via="d0")
        ipr = netns.iproute(ROUTER)
        try:
            yield {"r0": netns.index(ipr, "r0"), "r1": netns.index(ipr, "r1")}
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
        got: dict[bytes, int] = {}
        deadline = time.monotonic() + WAIT_S
        while len(got) < 2 and time.monotonic() < deadline:
            select.select([receiver], [], [], 0.05)
            try:
                data, ancdata, _, _ = receiver.recvmsg(2048, 64)
            except BlockingIOError:
                continue
            got[data] = next(
                struct.unpack("@i", value[:4])[0]
                for level, kind, value in ancdata
                if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_HOPLIMIT
            )
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
