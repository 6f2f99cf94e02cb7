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
    """Wraps a `Demultiplexer` for one interface and gateway (of one family; a
    dual-stack host's has an IPv6 address and gateway too: each packet goes to the
    gateway of its destination's family)."""

    def __init__(
        self,
        iface: str,
        address: Address,
        gateway: Address,
        endpoint: Demultiplexer,
        emit: Callable[[Frame], None],
        address6: Address | None = None,
        gateway6: Address | None = None,
    ) -> None:
        self.iface = iface
        self.address = address
        self.gateway = int(gateway)
        self.address6 = address6
        self.gateway6 = int(gateway6) if gateway6 is not None else None
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
        if next_hop is None:
            six = self.gateway6
            next_hop = six if six is not None and dst.version == 6 else self.gateway
        self._emit(Frame(self.iface, wire, next_hop))
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
        if src is not None:
            source = src
        elif self.address6 is not None and dst.version == 6:
            source = self.address6
        else:
            source = self.address
        datagram = UDPDatagram(src_port, dst_port, payload).to_wire(source, dst)
        return self.send_ip(source, dst, IPPROTO_UDP, datagram)

    def parse_udp(self, ip: InnerPacket) -> UDPDatagram | None:
        try:
            return UDPDatagram.from_wire(ip.payload, ip.header.src, ip.header.dst)
        except WireError:
            self.counters.malformed += 1
            return None
