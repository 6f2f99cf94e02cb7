"""A host's IP layer: session segments in and out of inner IPv4 or IPv6 packets.

Clients and servers are hosts on one link with a default gateway (their
router). Everything they send goes to the gateway; what arrives is parsed
strictly, and anything malformed is counted and dropped.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

from manycast.protocol.node import Frame
from manycast.protocol.tcp import Demultiplexer
from manycast.wire.errors import WireError
from manycast.wire.ip import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    Address,
    InnerPacket,
    UDPDatagram,
    make_packet,
    parse_packet,
)
from manycast.wire.transport import TcpSegment


@dataclass
class HostCounters:
    received: int = 0
    malformed: int = 0
    sent: int = 0


class HostStack:
    """Wraps a `Demultiplexer` for one interface and gateway (of one family)."""

    def __init__(
        self,
        iface: str,
        address: Address,
        gateway: Address,
        endpoint: Demultiplexer,
        emit: Callable[[Frame], None],
    ) -> None:
        self.iface = iface
        self.address = address
        self.gateway = int(gateway)
        self.endpoint = endpoint
        self._emit = emit
        self._ids = itertools.count(1)
        self.counters = HostCounters()

    def parse(self, packet: bytes) -> InnerPacket | None:
        try:
            return parse_packet(packet)
        except WireError:
            self.counters.malformed += 1
            return None

    def deliver_tcp(self, ip: InnerPacket, now: float) -> None:
        """Hand a TCP packet to the session endpoint (malformed segments are dropped)."""
        header = ip.header
        try:
            segment = TcpSegment.from_wire(ip.payload, header.src, header.dst)
        except WireError:
            self.counters.malformed += 1
            return
        self.counters.received += 1
        self.endpoint.receive(header.src, header.dst, segment, now)

    def flush(self) -> None:
        """Put every segment the endpoint has queued on the link, via the gateway."""
        for src, dst, segment in self.endpoint.segments_to_send():
            self.send_ip(src, dst, IPPROTO_TCP, segment.to_wire(src, dst))

    def send_ip(
        self,
        src: Address,
        dst: Address,
        protocol: int,
        payload: bytes,
        ttl: int = 64,
        next_hop: int | None = None,
    ) -> bytes:
        identification = next(self._ids) & 0xFFFF
        packet = make_packet(src, dst, protocol, payload, ttl=ttl, identification=identification)
        wire = packet.to_wire()
        self._emit(Frame(self.iface, wire, self.gateway if next_hop is None else next_hop))
        self.counters.sent += 1
        return wire

    def send_udp(
        self,
        dst: Address,
        src_port: int,
        dst_port: int,
        payload: bytes,
        src: Address | None = None,
    ) -> bytes:
        source = self.address if src is None else src
        datagram = UDPDatagram(src_port, dst_port, payload).to_wire(source, dst)
        return self.send_ip(source, dst, IPPROTO_UDP, datagram)

    def parse_udp(self, ip: InnerPacket) -> UDPDatagram | None:
        try:
            return UDPDatagram.from_wire(ip.payload, ip.header.src, ip.header.dst)
        except WireError:
            self.counters.malformed += 1
            return None
