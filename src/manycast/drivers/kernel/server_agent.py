"""The server agent: the sans-I/O `Server` (coordination and membership) on a server's namespace.

Coordination and membership run exactly as in the overlay. The core's reports
leave on a raw IGMP socket (Router Alert, TTL 1, to 224.0.0.22) as it built
them; control messages travel on an ordinary UDP socket joined to the control
group. The service itself is a separate program (`responder`), so the session
frames the core would send are dropped and counted.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

from manycast.drivers.kernel.loop import KernelLoop
from manycast.drivers.kernel.sockets import control_socket, recv_with_pktinfo, udp_packet
from manycast.drivers.mroute import ALL_V3_ROUTERS, mreqn
from manycast.errors import ConfigError
from manycast.protocol.node import Frame
from manycast.wire import control
from manycast.wire.errors import WireError
from manycast.wire.ip import IPPROTO_IGMP, IPPROTO_UDP, IPv4Packet, UDPDatagram, peek_v4

if TYPE_CHECKING:
    from manycast.protocol.server import Server
    from manycast.topology import Topology

log = logging.getLogger("manycast.kernel.server")

CONTROL_TTL = 16


@dataclass
class AgentStats:
    reports_sent: int = 0
    control_sent: int = 0
    control_received: int = 0
    session_frames_dropped: int = 0  # the lab's service is a separate program


class ServerAgent:
    def __init__(self, topology: Topology, name: str, run_dir: Path, seed: int) -> None:
        from manycast.pool import build

        self.loop = KernelLoop(run_dir, name, "server", send=self._send)
        nodes = build(topology, seed=seed, wall_base=self.loop.wall_base, only={name})
        server = nodes.servers.get(name) or nodes.standby.get(name)
        if server is None:
            self.loop.close()
            raise ConfigError(f"{name} is not a server of this topology")
        self.server: Server = server
        self.stats = AgentStats()
        self.pool = topology.pool
        self.iface, _ = topology.gateways[name]
        ifindex = socket.if_nametoindex(self.iface)
        self.igmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_IGMP)
        self.igmp.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
        self.igmp.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.iface.encode())
        self.igmp.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn("0.0.0.0", ifindex))
        self.udp = control_socket(self.pool.control_port)
        self.udp.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn("0.0.0.0", ifindex))
        self.udp.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, CONTROL_TTL)
        self.udp.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        self.udp.setsockopt(
            socket.IPPROTO_IP,
            socket.IP_ADD_MEMBERSHIP,
            mreqn(str(self.pool.control_group), ifindex),
        )
        self.loop.watch(self.udp, self._on_udp)
        self.loop.watch(self.igmp, self._drain_igmp)
        self.loop.handlers.update(
            status=self._status,
            set_share=self._set_share,
            rebalance=self._rebalance,
            owners=self._owners,
        )
        self.loop.add(self.server)

    # events ------------------------------------------------------------------------
    def _drain_igmp(self) -> None:
        # The raw IGMP socket also sees the host's own IGMP traffic: nothing to do with it.
        with contextlib.suppress(BlockingIOError):
            while self.igmp.recv(65535):
                pass

    def _on_udp(self) -> None:
        port = self.pool.control_port
        while (got := recv_with_pktinfo(self.udp)) is not None:
            data, (src, sport), _, dst = got
            self.stats.control_received += 1
            packet = udp_packet(src, sport, dst, port, data)
            self.server.receive(self.iface, packet, self.loop.now)

    def _send(self, frame: Frame) -> None:
        packet = frame.packet
        try:
            protocol = peek_v4(packet)[2]
            if protocol == IPPROTO_IGMP:
                self.igmp.sendto(packet, (ALL_V3_ROUTERS, 0))
                self.stats.reports_sent += 1
            elif protocol == IPPROTO_UDP:
                ip = IPv4Packet.from_wire(packet)
                udp = UDPDatagram.from_wire(ip.payload, ip.header.src, ip.header.dst)
                self.udp.sendto(udp.payload, (str(ip.header.dst), udp.dst_port))
                self.stats.control_sent += 1
            else:
                self.stats.session_frames_dropped += 1
        except (OSError, WireError) as exc:
            log.warning("%s: cannot send a frame: %s", self.server.name, exc)

    # control requests (the loop sends what they produce before answering) -------------
    def _status(self, _: dict[str, Any]) -> dict[str, Any]:
        now = self.loop.now
        coordinator = self.server.coordinator
        allocation = coordinator.allocation
        portions = self.server.portions
        name = self.server.name
        return {
            "node": name,
            "pid": os.getpid(),
            "epoch": coordinator.epoch,
            "state": coordinator.state.name,
            "alive": coordinator.alive(now),
            "coordinator": coordinator.coordinator(now),
            "digest": coordinator.digest,
            "portions": str(portions) if portions is not None else "",
            "share": str(allocation.share(name))
            if allocation is not None and name in allocation.servers
            else "0",
            "shares": {s: str(f) for s, f in allocation.shares().items()} if allocation else {},
            "agent": asdict(self.stats),
        }

    def _owners(self, request: dict[str, Any]) -> dict[str, Any]:
        allocation = self.server.coordinator.allocation
        if allocation is None:
            return {"epoch": 0, "owners": {}}
        return {
            "epoch": self.server.coordinator.epoch,
            "owners": {a: allocation.owner(ipaddress.IPv4Address(a)) for a in request["addresses"]},
        }

    def _set_share(self, request: dict[str, Any]) -> dict[str, Any]:
        op = control.SetShareOp(request["server"], Fraction(request["share"]))
        self.server.command(op, self.loop.now)
        return {"ok": True}

    def _rebalance(self, request: dict[str, Any]) -> dict[str, Any]:
        self.server.command(control.RebalanceOp(float(request["target"]), ()), self.loop.now)
        return {"ok": True}

    def run(self) -> None:
        """Serve until SIGTERM."""
        self.loop.ready()
        try:
            self.loop.run_until(float("inf"))
        finally:
            self.loop.close()
