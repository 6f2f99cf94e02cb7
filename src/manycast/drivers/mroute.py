"""The Linux multicast routing API (the MRT socket of <linux/mroute.h>).

One raw IGMP socket per namespace becomes the multicast router socket with
MRT_INIT. Through it a daemon adds a virtual interface (VIF) per interface and
installs (source, group) forwarding entries (MFC entries: an incoming VIF and a
TTL threshold per outgoing VIF). The kernel then forwards every packet that
matches an entry by itself; the first packet of an unknown (S, G) is held and
reported to the socket as an IGMPMSG_NOCACHE upcall, and forwarded once the
entry is installed. The same socket receives the IGMP packets addressed to
groups this host joined on an interface (224.0.0.22, where membership reports
go). Closing it (or the process dying) removes every VIF and entry.

Structures, packed with native alignment (Linux rejects the '=' layouts):

    vifctl      u16 vifi, u8 flags, u8 threshold, u32 rate_limit,
                union {in_addr local; int ifindex}, in_addr remote     16 bytes
    mfcctl      in_addr origin, in_addr group, u16 parent, u8 ttls[32],
                u32 pkt_cnt, u32 byte_cnt, u32 wrong_if, int expire    60 bytes
    igmpmsg     u32, u32, u8 msgtype, u8 mbz, u8 vif, u8 vif_hi,
                in_addr src, in_addr dst                               20 bytes
    sioc_sg_req in_addr src, in_addr grp, ulong pkts, bytes, wrong_if
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import socket
import struct
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

MRT_INIT, MRT_DONE, MRT_ADD_VIF, MRT_DEL_VIF, MRT_ADD_MFC, MRT_DEL_MFC = range(200, 206)
IGMPMSG_NOCACHE, IGMPMSG_WRONGVIF, IGMPMSG_WHOLEPKT = 1, 2, 3
VIFF_USE_IFINDEX = 0x8
MAXVIFS = 32
SIOCGETSGCNT = 0x89E0 + 1  # SIOCPROTOPRIVATE + 1
IP_PKTINFO = 8
ALL_V3_ROUTERS = "224.0.0.22"
FORWARD_THRESHOLD = 1  # forward on a VIF when the packet's TTL exceeds this

_VIFCTL = struct.Struct("@HBBIi4s")
_MFCCTL = struct.Struct("@4s4sH32sIIIi")
_IGMPMSG = struct.Struct("@IIBBBB4s4s")
_SG_REQ = struct.Struct("@4s4sLLL")
_MREQN = struct.Struct("@4s4si")
_PKTINFO = struct.Struct("@i4s4s")
_ANY = b"\0\0\0\0"

assert _MFCCTL.size == 60 and _VIFCTL.size == 16 and _IGMPMSG.size == 20


def multicast_routing_missing(family: int = 4) -> str | None:
    """Why this kernel cannot route multicast for `family`, or None when it can: a
    kernel built without CONFIG_IP_MROUTE (CONFIG_IPV6_MROUTE) refuses MRT_INIT
    (MRT6_INIT) with ENOPROTOOPT. Tried in the current namespace and given back at
    once; a router socket that another program holds there (EADDRINUSE) is an answer
    too. Needs root (raw sockets): without it, None (nothing could be learned)."""
    inet, proto, level, option = (
        (socket.AF_INET, socket.IPPROTO_IGMP, socket.IPPROTO_IP, MRT_INIT)
        if family == 4
        else (socket.AF_INET6, socket.IPPROTO_ICMPV6, socket.IPPROTO_IPV6, MRT_INIT)
    )  # MRT6_INIT is 200 too, on the IPv6 level
    try:
        sock = socket.socket(inet, socket.SOCK_RAW, proto)
    except PermissionError:
        return None
    with sock:
        try:
            sock.setsockopt(level, option, 1)
        except OSError as exc:
            if exc.errno == errno.ENOPROTOOPT:
                config = "CONFIG_IP_MROUTE" if family == 4 else "CONFIG_IPV6_MROUTE"
                return (
                    f"this kernel has no IPv{family} multicast routing ({config} is not set: "
                    f"MRT{'' if family == 4 else '6'}_INIT refused), which the kernel lab's "
                    "routers need"
                )
            return None
    return None


@dataclass(frozen=True, slots=True)
class Upcall:
    """The kernel's message about a packet it could not forward by itself."""

    kind: int  # IGMPMSG_*
    vif: int
    source: int
    group: int


@dataclass(frozen=True, slots=True)
class Received:
    """An IGMP packet (whole, IP header first) and the interface it came in on."""

    ifindex: int
    packet: bytes


def parse_upcall(data: bytes) -> Upcall | None:
    """An upcall, or None for an ordinary IGMP packet. Upcalls reuse the IP
    header's shape with zero where the protocol number would be."""
    if len(data) < _IGMPMSG.size or data[9] != 0:
        return None
    _, _, kind, _, vif, vif_hi, src, dst = _IGMPMSG.unpack_from(data)
    return Upcall(kind, vif | vif_hi << 8, int.from_bytes(src, "big"), int.from_bytes(dst, "big"))


def mreqn(group: str, ifindex: int) -> bytes:
    return _MREQN.pack(socket.inet_aton(group), _ANY, ifindex)


class MrouteSocket:
    """The multicast router socket of the current network namespace."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_IGMP)
        try:
            self.sock.setsockopt(socket.IPPROTO_IP, MRT_INIT, 1)
        except OSError:
            self.sock.close()
            raise
        self.sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def add_vif(self, vif: int, ifindex: int) -> None:
        request = _VIFCTL.pack(vif, VIFF_USE_IFINDEX, FORWARD_THRESHOLD, 0, ifindex, _ANY)
        self.sock.setsockopt(socket.IPPROTO_IP, MRT_ADD_VIF, request)

    def join(self, ifindex: int, group: str = ALL_V3_ROUTERS) -> None:
        """Receive what is sent to `group` on that interface (membership reports)."""
        self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn(group, ifindex))

    def set_entry(self, source: int, group: int, parent: int, outs: Iterable[int]) -> None:
        """Install or replace the entry for (source, group) arriving on VIF `parent`.
        No outgoing VIF is a valid entry: the kernel then drops (S, G) quietly
        instead of asking again."""
        ttls = bytearray(MAXVIFS)
        for vif in outs:
            if vif != parent:
                ttls[vif] = FORWARD_THRESHOLD
        request = _MFCCTL.pack(
            source.to_bytes(4, "big"), group.to_bytes(4, "big"), parent, bytes(ttls), 0, 0, 0, 0
        )
        self.sock.setsockopt(socket.IPPROTO_IP, MRT_ADD_MFC, request)

    def delete_entry(self, source: int, group: int, parent: int) -> None:
        request = _MFCCTL.pack(
            source.to_bytes(4, "big"), group.to_bytes(4, "big"), parent, bytes(MAXVIFS), 0, 0, 0, 0
        )
        self.sock.setsockopt(socket.IPPROTO_IP, MRT_DEL_MFC, request)

    def packets(self, source: int, group: int) -> int | None:
        """The kernel's packet counter of the (source, group) entry (None: no entry)."""
        request = bytearray(
            _SG_REQ.pack(source.to_bytes(4, "big"), group.to_bytes(4, "big"), 0, 0, 0)
        )
        try:
            fcntl.ioctl(self.sock.fileno(), SIOCGETSGCNT, request)
        except OSError:
            return None
        return int(_SG_REQ.unpack(request)[2])

    def read(self, limit: int = 256) -> Iterator[Upcall | Received]:
        """Whatever is queued: upcalls and IGMP packets, up to `limit`."""
        for _ in range(limit):
            try:
                data, ancdata, _, _ = self.sock.recvmsg(65535, 64)
            except BlockingIOError:
                return
            upcall = parse_upcall(data)
            if upcall is not None:
                yield upcall
                continue
            ifindex = 0
            for level, kind, value in ancdata:
                if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
                    ifindex = _PKTINFO.unpack_from(value)[0]
            yield Received(ifindex, data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.IPPROTO_IP, MRT_DONE, 1)
        self.sock.close()


# -- the kernel's tables, as /proc shows them -----------------------------------------


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One line of /proc/net/ip_mr_cache (or ip6_mr_cache: `mroute6.parse_cache6`)."""

    group: ipaddress.IPv4Address | ipaddress.IPv6Address
    source: ipaddress.IPv4Address | ipaddress.IPv6Address
    parent: int  # incoming VIF (-1 on an unresolved entry)
    packets: int
    bytes: int
    wrong_if: int
    outs: tuple[int, ...]  # outgoing VIFs

    @property
    def resolved(self) -> bool:
        return self.parent >= 0


@dataclass(frozen=True, slots=True)
class Vif:
    """One line of /proc/net/ip_mr_vif."""

    index: int
    name: str
    packets_in: int
    packets_out: int


def _proc_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    # The kernel prints the network-order word as a host-order number.
    return ipaddress.IPv4Address(int(text, 16).to_bytes(4, sys.byteorder))


def parse_cache(
    text: str,
    address: Callable[[str], ipaddress.IPv4Address | ipaddress.IPv6Address] = _proc_address,
) -> list[CacheEntry]:
    """/proc/net/ip_mr_cache: `group origin iif pkts bytes wrong oif:ttl...`;
    `address` reads the first two fields (IPv4's: a host-order hex word)."""
    entries = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 6:
            continue
        parent = int(fields[2])
        outs = tuple(int(f.split(":")[0]) for f in fields[6:] if ":" in f)
        entries.append(
            CacheEntry(
                address(fields[0]),
                address(fields[1]),
                -1 if parent >= 0xFFFF or parent < 0 else parent,
                int(fields[3]),
                int(fields[4]),
                int(fields[5]),
                outs,
            )
        )
    return entries


def parse_vifs(text: str) -> list[Vif]:
    vifs = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 6:
            vifs.append(Vif(int(fields[0]), fields[1], int(fields[3]), int(fields[5])))
    return vifs
