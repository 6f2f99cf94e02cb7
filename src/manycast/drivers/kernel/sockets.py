"""The ordinary sockets the daemons share: the control-port UDP socket, what it hands
the core, and the raw sockets that send the packets the core built.

The core reads whole IP packets; a datagram an ordinary socket received is
turned back into one (`udp_packet`), with the interface and destination address
the kernel reported through IP_PKTINFO (IPv6: IPV6_PKTINFO). A pool's network is
all IPv4 or all IPv6 (its space's family), and so are these sockets.

MLD messages leave from the interface's link-local address (RFC 3810 §5.2.13,
§5.1.14): the core builds them from the host's global address, which also names
the requester inside the report's signed-join field, and `from_link_local` puts
the link-local source in their IPv6 header just before they are sent (the
signature leaves the checksum out, which is recomputed for the new source).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
import struct
from pathlib import Path

from manycast.drivers.mroute import IP_PKTINFO, mreqn
from manycast.drivers.mroute6 import IPV6_PKTINFO, IPV6_RECVPKTINFO
from manycast.wire.cursor import internet_checksum
from manycast.wire.errors import WireError
from manycast.wire.ip import (
    IPPROTO_HOPOPTS,
    IPPROTO_ICMPV6,
    IPPROTO_UDP,
    IPv6Packet,
    UDPDatagram,
    make_packet,
    pseudo_header,
)

_PKTINFO = struct.Struct("@i4s4s")
_PKTINFO6 = struct.Struct("@16si")
# MLD's ICMPv6 types: query, v1 report, v1 done, v2 report.
_MLD_TYPES = frozenset((130, 131, 132, 143))
_LINK_LOCAL = ipaddress.IPv6Network("fe80::/10")


def family_of(address: str) -> int:
    """4 or 6: the family of an address written out (a group, say)."""
    return ipaddress.ip_address(address).version


def control_socket(port: int, family: int = 4) -> socket.socket:
    """A UDP socket on the pool's control port, reporting each datagram's interface."""
    if family == 6:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
        sock.bind(("::", port))
        return sock
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    sock.bind(("0.0.0.0", port))
    return sock


def recv_with_pktinfo(sock: socket.socket) -> tuple[bytes, tuple[str, int], int, str] | None:
    """(payload, sender, ifindex, destination address) of one datagram, or None."""
    try:
        data, ancdata, _, sender = sock.recvmsg(65535, 64)
    except BlockingIOError:
        return None
    ifindex, dst = 0, "::" if sock.family == socket.AF_INET6 else "0.0.0.0"
    for level, kind, value in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
            ifindex, _, addr = _PKTINFO.unpack_from(value)
            dst = socket.inet_ntoa(addr)
        elif level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO:
            packed, ifindex = _PKTINFO6.unpack_from(value)
            dst = str(ipaddress.IPv6Address(packed))
    # An IPv6 sender is (host, port, flow info, scope id); a link-local host says its
    # interface after a '%'.
    return data, (str(sender[0]).split("%")[0], int(sender[1])), ifindex, dst


def udp_packet(src: str, sport: int, dst: str, dport: int, payload: bytes) -> bytes:
    """A datagram an ordinary socket received, as the inner packet the core reads
    (IPv4 or IPv6, as the addresses are)."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    segment = UDPDatagram(sport, dport, payload).to_wire(s, d)
    return make_packet(s, d, IPPROTO_UDP, segment).to_wire()


def raw_sender(iface: str, family: int = 4) -> socket.socket:
    """A raw socket that sends whole packets the core built (header, Router Alert and
    all) out of `iface`, never looped back. IPPROTO_RAW implies the header is ours
    (IP_HDRINCL; on IPv6 as well) and receives nothing, so it never needs draining."""
    ifindex = socket.if_nametoindex(iface)
    if family == 6:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn("0.0.0.0", ifindex))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.encode())
    return sock


def destination(
    address: int, family: int, ifindex: int
) -> tuple[str, int] | tuple[str, int, int, int]:
    """The sendto() address of a raw packet to `address` out of interface `ifindex`
    (IPv6 link-scope groups need the interface as the scope)."""
    if family == 6:
        return str(ipaddress.IPv6Address(address)), 0, 0, ifindex
    return socket.inet_ntoa(address.to_bytes(4, "big")), 0


def link_local(iface: str, if_inet6: str | None = None) -> ipaddress.IPv6Address | None:
    """The link-local address of `iface` in this network namespace (or as the text
    of another's /proc/net/if_inet6 says), None if it has none."""
    if if_inet6 is None:
        try:
            if_inet6 = Path("/proc/net/if_inet6").read_text()
        except OSError:
            return None
    for line in if_inet6.splitlines():
        fields = line.split()
        if len(fields) == 6 and fields[5] == iface:
            address = ipaddress.IPv6Address(int(fields[0], 16))
            if address in _LINK_LOCAL:
                return address
    return None


def from_link_local(packet: bytes, source: ipaddress.IPv6Address | None) -> bytes:
    """`packet` from `source` (a link-local address) if it is an MLD message (its
    ICMPv6 checksum recomputed for it), else `packet` as it is."""
    if source is None or len(packet) < 41 or packet[0] >> 4 != 6:
        return packet
    if packet[6] not in (IPPROTO_HOPOPTS, IPPROTO_ICMPV6):
        return packet
    try:
        ip = IPv6Packet.from_wire(packet)
    except WireError:
        return packet
    message = ip.payload
    if ip.protocol != IPPROTO_ICMPV6 or len(message) < 4 or message[0] not in _MLD_TYPES:
        return packet
    unsummed = message[:2] + b"\0\0" + message[4:]
    prefix = pseudo_header(source, ip.header.dst, IPPROTO_ICMPV6, len(message))
    checksum = internet_checksum(prefix + unsummed).to_bytes(2, "big")
    header = dataclasses.replace(ip.header, src=source)
    payload = unsummed[:2] + checksum + unsummed[4:]
    return dataclasses.replace(ip, header=header, payload=payload).to_wire()
