"""The Linux IPv6 multicast routing API (the MRT6 socket of <linux/mroute6.h>).

The IPv6 twin of `mroute`: one raw ICMPv6 socket per namespace becomes the
multicast router socket with MRT6_INIT. Through it a daemon adds a multicast
interface (MIF) per interface and installs (source, group) forwarding entries
(MFC entries: an incoming MIF and a set of outgoing MIFs). The kernel forwards
every packet that matches an entry by itself; the first packets of an unknown
(S, G) are held and reported to the socket as an MRT6MSG_NOCACHE upcall, and
forwarded once the entry is installed. The same socket receives the MLD packets
sent to a group it joined on an interface (ff02::16, where MLDv2 reports go).
Closing it (or the process dying) removes every MIF and entry.

Unlike IPv4's, a raw ICMPv6 socket reads no IP header: a packet is its ICMPv6
message, with the source from the socket address and the destination, the
interface, the hop limit and the Hop-by-Hop header (its Router Alert) from
ancillary data. An upcall has a zero first byte, where an ICMPv6 message has its
type (never 0). An ICMPv6 filter keeps the socket to MLD: neighbour discovery and
the rest never reach it.

Structures, packed with native alignment:

    mif6ctl      u16 mifi, u8 flags, u8 threshold, u16 pifi, u32 rate   12 bytes
    mf6cctl      sockaddr_in6 origin, sockaddr_in6 group, u16 parent,
                 u32 ifset[8]                                           92 bytes
    mrt6msg      u8 mbz, u8 msgtype, u16 mif, u32 pad, in6 src, in6 dst 40 bytes
    sioc_sg_req6 sockaddr_in6 src, sockaddr_in6 grp, ulong pkts, bytes,
                 wrong_if                                               80 bytes
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from manycast.drivers.mroute import CacheEntry, parse_cache

# Socket options at level IPPROTO_IPV6 (MRT6_BASE = 200).
MRT6_INIT, MRT6_DONE, MRT6_ADD_MIF, MRT6_DEL_MIF, MRT6_ADD_MFC, MRT6_DEL_MFC = range(200, 206)
MRT6MSG_NOCACHE, MRT6MSG_WRONGMIF, MRT6MSG_WHOLEPKT = 1, 2, 3
MAXMIFS = 32
IF_SETSIZE = 256
SIOCGETSGCNT_IN6 = 0x89E0 + 1  # SIOCPROTOPRIVATE + 1
IPV6_RECVPKTINFO, IPV6_PKTINFO = 49, 50
IPV6_RECVHOPLIMIT, IPV6_HOPLIMIT = 51, 52
IPV6_RECVHOPOPTS, IPV6_HOPOPTS = 53, 54
ICMP6_FILTER = 1  # at level IPPROTO_ICMPV6
MLD_TYPES = (130, 131, 132, 143)  # query, v1 report, v1 done, v2 report
ALL_MLDV2_ROUTERS = "ff02::16"

_MIF6CTL = struct.Struct("@HBBHI")
_SOCKADDR_IN6 = struct.Struct("@HHI16sI")
# mf6cctl field by field (each sockaddr_in6: family, port, flow info, address, scope
# id), so that an entry is one pack: the MIF set's first word holds every MIF there
# is (MAXMIFS = 32), the other seven stay zero.
_MF6CCTL = struct.Struct("@HHI16sIHHI16sIH2xI28x")
_MRT6MSG = struct.Struct("@BBHI16s16s")
_SG_REQ6 = struct.Struct("@28s28sLLL")
_MREQ6 = struct.Struct("@16si")
_PKTINFO6 = struct.Struct("@16si")
_INT = struct.Struct("@i")

assert _MIF6CTL.size == 12 and _MF6CCTL.size == 92 and _MRT6MSG.size == 40
assert _SOCKADDR_IN6.size == 28 and _SG_REQ6.size == 80


@dataclass(frozen=True, slots=True)
class Upcall6:
    """The kernel's message about a packet it could not forward by itself."""

    kind: int  # MRT6MSG_*
    mif: int
    source: int
    group: int


@dataclass(frozen=True, slots=True)
class Received6:
    """An ICMPv6 message (MLD) with what the IPv6 header said and where it came in."""

    ifindex: int
    source: ipaddress.IPv6Address
    destination: ipaddress.IPv6Address | None  # None: the kernel gave no pktinfo
    hop_limit: int | None
    message: bytes  # from the ICMPv6 type on
    hop_by_hop: bytes | None = None  # the Hop-by-Hop header as received, if any


def parse_upcall6(data: bytes) -> Upcall6 | None:
    """An upcall, or None for an ordinary ICMPv6 message (its type is never 0)."""
    if len(data) < _MRT6MSG.size or data[0] != 0:
        return None
    _, kind, mif, _, src, dst = _MRT6MSG.unpack_from(data)
    return Upcall6(kind, mif, int.from_bytes(src, "big"), int.from_bytes(dst, "big"))


def sockaddr_in6(address: int) -> bytes:
    return _SOCKADDR_IN6.pack(socket.AF_INET6, 0, 0, address.to_bytes(16, "big"), 0)


def mreq6(group: str, ifindex: int) -> bytes:
    return _MREQ6.pack(ipaddress.IPv6Address(group).packed, ifindex)


def icmp6_filter(passed: Iterable[int]) -> bytes:
    """An ICMP6_FILTER value (<netinet/icmp6.h>: a bit per type, set = blocked) that
    passes only the types `passed`."""
    words = [0xFFFFFFFF] * 8
    for kind in passed:
        words[kind >> 5] &= ~(1 << (kind & 31))
    return struct.pack("@8I", *words)


def _mf6cctl(source: int, group: int, parent: int, mif_bits: int) -> bytes:
    return _MF6CCTL.pack(
        socket.AF_INET6,
        0,
        0,
        source.to_bytes(16, "big"),
        0,
        socket.AF_INET6,
        0,
        0,
        group.to_bytes(16, "big"),
        0,
        parent,
        mif_bits,
    )


class Mroute6Socket:
    """The IPv6 multicast router socket of the current network namespace."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        try:
            self.sock.setsockopt(socket.IPPROTO_IPV6, MRT6_INIT, 1)
        except OSError:
            self.sock.close()
            raise
        self.sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
        self.sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVHOPLIMIT, 1)
        self.sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVHOPOPTS, 1)
        self.sock.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, icmp6_filter(MLD_TYPES))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def add_mif(self, mif: int, ifindex: int) -> None:
        if not 0 <= mif < MAXMIFS:
            raise ValueError(f"MIF {mif}: the kernel has {MAXMIFS} (0-{MAXMIFS - 1})")
        self.sock.setsockopt(
            socket.IPPROTO_IPV6, MRT6_ADD_MIF, _MIF6CTL.pack(mif, 0, 1, ifindex, 0)
        )

    def join(self, ifindex: int, group: str = ALL_MLDV2_ROUTERS) -> None:
        """Receive what is sent to `group` on that interface (MLDv2 reports)."""
        self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq6(group, ifindex))

    def set_entry(self, source: int, group: int, parent: int, outs: Iterable[int]) -> None:
        """Install or replace the entry for (source, group) arriving on MIF `parent`.
        No outgoing MIF is a valid entry: the kernel then drops (S, G) quietly
        instead of asking again."""
        # (On a first packet's path: one pack, nothing built apart.)
        mif_bits = 0
        for mif in outs:
            if mif != parent:
                mif_bits |= 1 << mif
        request = _mf6cctl(source, group, parent, mif_bits)
        self.sock.setsockopt(socket.IPPROTO_IPV6, MRT6_ADD_MFC, request)

    def delete_entry(self, source: int, group: int, parent: int) -> None:
        self.sock.setsockopt(socket.IPPROTO_IPV6, MRT6_DEL_MFC, _mf6cctl(source, group, parent, 0))

    def packets(self, source: int, group: int) -> int | None:
        """The kernel's packet counter of the (source, group) entry (None: no entry)."""
        request = bytearray(_SG_REQ6.pack(sockaddr_in6(source), sockaddr_in6(group), 0, 0, 0))
        try:
            fcntl.ioctl(self.sock.fileno(), SIOCGETSGCNT_IN6, request)
        except OSError:
            return None
        return int(_SG_REQ6.unpack(request)[2])

    def read(self, limit: int = 256) -> Iterator[Upcall6 | Received6]:
        """Whatever is queued: upcalls and ICMPv6 messages, up to `limit`."""
        for _ in range(limit):
            try:
                data, ancdata, _, address = self.sock.recvmsg(65535, 256)
            except BlockingIOError:
                return
            upcall = parse_upcall6(data)
            if upcall is not None:
                yield upcall
                continue
            ifindex, destination, hop_limit, hop_by_hop = 0, None, None, None
            for level, kind, value in ancdata:
                if level != socket.IPPROTO_IPV6:
                    continue
                if kind == IPV6_PKTINFO and len(value) >= _PKTINFO6.size:
                    packed, ifindex = _PKTINFO6.unpack_from(value)
                    destination = ipaddress.IPv6Address(packed)
                elif kind == IPV6_HOPLIMIT and len(value) >= 4:
                    hop_limit = _INT.unpack_from(value)[0]
                elif kind == IPV6_HOPOPTS:
                    hop_by_hop = bytes(value)
            source = ipaddress.IPv6Address(address[0].split("%")[0])
            yield Received6(ifindex, source, destination, hop_limit, data, hop_by_hop)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.IPPROTO_IPV6, MRT6_DONE, 1)
        self.sock.close()


# -- the kernel's tables, as /proc shows them -----------------------------------------


def parse_cache6(text: str) -> list[CacheEntry]:
    """/proc/net/ip6_mr_cache: the same columns as IPv4's, the addresses written out
    in full (%pI6)."""
    return parse_cache(text, ipaddress.IPv6Address)
