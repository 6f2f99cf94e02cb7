"""A host's control-plane sockets in the lab: how a server agent or a VIP router reaches the pool.

The core's membership reports leave on a raw IGMP socket (Router Alert, TTL 1,
to 224.0.0.22) exactly as the core built them; control messages travel on an
ordinary UDP socket on the control port, joined to the control group, and come
back to the core as whole IPv4 packets (`sockets.udp_packet`).

On an IPv6 network (the control group is IPv6) the reports are MLDv2 (hop limit 1,
Hop-by-Hop Router Alert, to ff02::16), sent whole on a raw IPv6 socket
(`sockets.raw_sender`) from the interface's link-local address
(`sockets.from_link_local`), and the control socket is UDP over IPv6.

A dual-stack pool's server (`dual`) has both: its IPv4 control channel and IGMPv3
reports as above, and beside them its MLDv2 reports for the IPv6 group and its
IPv6 control messages (member-down notices to its IPv6 router) on sockets of
their own.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from manycast.drivers.kernel.loop import KernelLoop
from manycast.drivers.kernel.sockets import (
    control_socket,
    family_of,
    from_link_local,
    link_local,
    raw_sender,
    recv_with_pktinfo,
    udp_packet,
)
from manycast.drivers.mroute import ALL_V3_ROUTERS, mreqn
from manycast.drivers.mroute6 import ALL_MLDV2_ROUTERS, mreq6
from manycast.protocol.node import Frame
from manycast.wire.errors import WireError
from manycast.wire.ip import IPPROTO_ICMPV6, IPPROTO_IGMP, IPPROTO_UDP, UDPDatagram, parse_packet

log = logging.getLogger("manycast.kernel.endpoint")

CONTROL_TTL = 16


@dataclass
class EndpointStats:
    reports_sent: int = 0
    control_sent: int = 0
    control_received: int = 0


class ControlEndpoint:
    """The report and control-port sockets of one host on `iface`; each datagram
    received goes to `deliver(packet)` as an IP packet (the control group's family)."""

    def __init__(
        self,
        loop: KernelLoop,
        iface: str,
        control_group: str,
        control_port: int,
        deliver: Callable[[bytes], None],
        dual: bool = False,
        receive6: bool = False,
    ) -> None:
        """`dual`: a dual-stack pool's host, with an IPv6 side; `receive6`: its IPv6
        control socket's datagrams are delivered too (a VIP router's IPv6 logic hears
        its router's label bindings there)."""
        self.port = control_port
        self.deliver = deliver
        self.stats = EndpointStats()
        self.iface = iface
        ifindex = socket.if_nametoindex(iface)
        self.family = family_of(control_group)
        self.udp = control_socket(control_port, self.family)
        # The reports' source on an IPv6 link (None: IPv4, or no link-local address).
        self.link_local = link_local(iface) if self.family == 6 else None
        if self.family == 6:
            self.reports_to: tuple[str, int] | tuple[str, int, int, int] = (
                ALL_MLDV2_ROUTERS,
                0,
                0,
                ifindex,
            )
            self.igmp = raw_sender(iface, 6)
            v6 = socket.IPPROTO_IPV6
            self.udp.setsockopt(v6, socket.IPV6_MULTICAST_IF, ifindex)
            self.udp.setsockopt(v6, socket.IPV6_MULTICAST_HOPS, CONTROL_TTL)
            self.udp.setsockopt(v6, socket.IPV6_MULTICAST_LOOP, 0)
            self.udp.setsockopt(v6, socket.IPV6_JOIN_GROUP, mreq6(control_group, ifindex))
        else:
            self.reports_to = (ALL_V3_ROUTERS, 0)
            self.igmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_IGMP)
            self.igmp.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
            self.igmp.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.encode())
            multicast_if = mreqn("0.0.0.0", ifindex)
            self.igmp.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, multicast_if)
            self.udp.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, multicast_if)
            self.udp.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, CONTROL_TTL)
            self.udp.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
            self.udp.setsockopt(
                socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn(control_group, ifindex)
            )
            # (The IPv6 reports' IPPROTO_RAW socket receives nothing.)
            loop.watch(self.igmp, self._drain_igmp)
        loop.watch(self.udp, lambda: self._on_udp(self.udp))
        # A dual-stack pool's IPv6 side: (report socket, control socket, link-local
        # source, where reports go).
        self.six: tuple[socket.socket, socket.socket, Any, tuple[str, int, int, int]] | None
        self.six = None
        if dual and self.family == 4:
            udp6 = control_socket(control_port, 6)
            udp6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
            to = (ALL_MLDV2_ROUTERS, 0, 0, ifindex)
            self.six = (raw_sender(iface, 6), udp6, link_local(iface), to)
            if receive6:
                loop.watch(udp6, lambda: self._on_udp(udp6))

    def _drain_igmp(self) -> None:
        # The raw IGMP socket also sees the host's own IGMP traffic: nothing to do with it.
        with contextlib.suppress(BlockingIOError):
            while self.igmp.recv(65535):
                pass

    def _on_udp(self, sock: socket.socket | None = None) -> None:
        while (got := recv_with_pktinfo(sock or self.udp)) is not None:
            data, (src, sport), _, dst = got
            self.stats.control_received += 1
            self.deliver(udp_packet(src, sport, dst, self.port, data))

    def _link_local_now(self) -> ipaddress.IPv6Address | None:
        """The interface's link-local address, looked for again: the kernel gives one
        only once the link has a carrier, which may come after this agent started."""
        address = link_local(self.iface)
        if address is not None:
            if self.six is not None:
                self.six = (self.six[0], self.six[1], address, self.six[3])
            else:
                self.link_local = address
        return address

    def send(self, frame: Frame) -> bool:
        """Send a report or a control message the core built; False for anything else."""
        packet = frame.packet
        try:
            ip = parse_packet(packet)
            reports, udp_sock, source, reports_to = self.igmp, self.udp, self.link_local, None
            if self.six is not None and ip.header.dst.version == 6:
                reports, udp_sock, source, reports_to = self.six
            if ip.protocol in (IPPROTO_IGMP, IPPROTO_ICMPV6):
                if source is None and ip.header.dst.version == 6:
                    source = self._link_local_now()
                reports.sendto(from_link_local(packet, source), reports_to or self.reports_to)
                self.stats.reports_sent += 1
                return True
            if ip.protocol == IPPROTO_UDP:
                udp = UDPDatagram.from_wire(ip.payload, ip.header.src, ip.header.dst)
                udp_sock.sendto(udp.payload, (str(ip.header.dst), udp.dst_port))
                self.stats.control_sent += 1
                return True
        except (OSError, WireError) as exc:
            log.warning("cannot send a control frame: %s", exc)
            return True
        return False

    def close(self) -> None:
        self.igmp.close()
        self.udp.close()
        if self.six is not None:
            self.six[0].close()
            self.six[1].close()
