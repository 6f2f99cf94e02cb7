"""The ordinary sockets the daemons share: the control-port UDP socket and what it hands the core.

The core reads whole IPv4 packets; a datagram an ordinary socket received is
turned back into one (`udp_packet`), with the interface and destination address
the kernel reported through IP_PKTINFO.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from manycast.drivers.mroute import IP_PKTINFO
from manycast.wire.ip import IPPROTO_UDP, IPv4Packet, UDPDatagram

_PKTINFO = struct.Struct("@i4s4s")


def control_socket(port: int) -> socket.socket:
    """A UDP socket on the pool's control port, reporting each datagram's interface."""
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
    ifindex, dst = 0, "0.0.0.0"
    for level, kind, value in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
            ifindex, _, addr = _PKTINFO.unpack_from(value)
            dst = socket.inet_ntoa(addr)
    return data, sender, ifindex, dst


def udp_packet(src: str, sport: int, dst: str, dport: int, payload: bytes) -> bytes:
    """A datagram an ordinary socket received, as the inner IPv4 packet the core reads."""
    s, d = ipaddress.IPv4Address(src), ipaddress.IPv4Address(dst)
    segment = UDPDatagram(sport, dport, payload).to_wire(s, d)
    return IPv4Packet.make(s, d, IPPROTO_UDP, segment).to_wire()
