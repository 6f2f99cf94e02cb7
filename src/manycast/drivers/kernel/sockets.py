"""The ordinary sockets the daemons share: the control-port UDP socket, what it hands
the core, and the raw sockets that send the packets the core built.

The core reads whole IP packets; a datagram an ordinary socket received is
turned back into one (`udp_packet`), with the interface and destination address
the kernel reported through IP_PKTINFO (IPv6: IPV6_PKTINFO). A pool's network is
all IPv4 or all IPv6 (its space's family), and so are these sockets.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from manycast.drivers.mroute import IP_PKTINFO, mreqn
from manycast.drivers.mroute6 import IPV6_PKTINFO, IPV6_RECVPKTINFO
from manycast.wire.ip import IPPROTO_UDP, UDPDatagram, make_packet

_PKTINFO = struct.Struct("@i4s4s")
_PKTINFO6 = struct.Struct("@16si")


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
