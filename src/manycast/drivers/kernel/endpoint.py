"""A host's control-plane sockets in the lab: how a server agent or a VIP router reaches the pool.

The core's membership reports leave on a raw IGMP socket (Router Alert, TTL 1,
to 224.0.0.22) exactly as the core built them; control messages travel on an
ordinary UDP socket on the control port, joined to the control group, and come
back to the core as whole IPv4 packets (`sockets.udp_packet`).
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

from manycast.drivers.kernel.loop import KernelLoop
from manycast.drivers.kernel.sockets import control_socket, recv_with_pktinfo, udp_packet
from manycast.drivers.mroute import ALL_V3_ROUTERS, mreqn
from manycast.protocol.node import Frame
from manycast.wire.errors import WireError
from manycast.wire.ip import IPPROTO_IGMP, IPPROTO_UDP, IPv4Packet, UDPDatagram, peek_v4

log = logging.getLogger("manycast.kernel.endpoint")

CONTROL_TTL = 16


@dataclass
class EndpointStats:
    reports_sent: int = 0
    control_sent: int = 0
    control_received: int = 0


class ControlEndpoint:
    """The IGMP and control-port sockets of one host on `iface`; each datagram received
    goes to `deliver(packet)` as an IPv4 packet."""

    def __init__(
        self,
        loop: KernelLoop,
        iface: str,
        control_group: str,
        control_port: int,
        deliver: Callable[[bytes], None],
    ) -> None:
        self.port = control_port
        self.deliver = deliver
        self.stats = EndpointStats()
        ifindex = socket.if_nametoindex(iface)
        self.igmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_IGMP)
        self.igmp.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
        self.igmp.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.encode())
        self.igmp.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn("0.0.0.0", ifindex))
        self.udp = control_socket(control_port)
        self.udp.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn("0.0.0.0", ifindex))
        self.udp.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, CONTROL_TTL)
        self.udp.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        self.udp.setsockopt(
            socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn(control_group, ifindex)
        )
        loop.watch(self.udp, self._on_udp)
        loop.watch(self.igmp, self._drain_igmp)

    def _drain_igmp(self) -> None:
        # The raw IGMP socket also sees the host's own IGMP traffic: nothing to do with it.
        with contextlib.suppress(BlockingIOError):
            while self.igmp.recv(65535):
                pass

    def _on_udp(self) -> None:
        while (got := recv_with_pktinfo(self.udp)) is not None:
            data, (src, sport), _, dst = got
            self.stats.control_received += 1
            self.deliver(udp_packet(src, sport, dst, self.port, data))

    def send(self, frame: Frame) -> bool:
        """Send a report or a control message the core built; False for anything else."""
        packet = frame.packet
        try:
            protocol = peek_v4(packet)[2]
            if protocol == IPPROTO_IGMP:
                self.igmp.sendto(packet, (ALL_V3_ROUTERS, 0))
                self.stats.reports_sent += 1
                return True
            if protocol == IPPROTO_UDP:
                ip = IPv4Packet.from_wire(packet)
                udp = UDPDatagram.from_wire(ip.payload, ip.header.src, ip.header.dst)
                self.udp.sendto(udp.payload, (str(ip.header.dst), udp.dst_port))
                self.stats.control_sent += 1
                return True
        except (OSError, WireError) as exc:
            log.warning("cannot send a control frame: %s", exc)
            return True
        return False

    def close(self) -> None:
        self.igmp.close()
        self.udp.close()
