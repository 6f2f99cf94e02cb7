"""The VIP router daemon: the sans-I/O `VipRouter` on a VIP router's namespace.

First packets of flows reach this namespace by the VIP's route; here the VIP is a
blackhole route, so the kernel drops them while a packet socket, filtered to the
VIP, hands a copy to the core. The core picks the flow's server by the pool's
allocation (it follows the servers' coordination on the control channel through
the host's `ControlEndpoint`, as a server agent does) and tags the flow at the
client's edge router; the packet itself goes out here in an IPv6 header to the
server's segment (`srv6.sid_of`), which the kernel routes to the server's router.
On an IPv6 network the packet socket reads IPv6 packets to the VIP and the
segment carries them (IPv6 in IPv6). A dual-stack pool's VIP router reads both
VIPs' first packets (a packet socket for each) into its one dual-stack core, and
sends each to the chosen server's segment of the packet's family: IPv4 in IPv6 to
its End.DX4 segment, IPv6 in IPv6 to its End.DX6 one; the core's IPv6 messages
(its adverts, tags and the label bindings it hears) go on the control port over
IPv6 beside the IPv4 control channel.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from manycast.drivers.kernel import srv6
from manycast.drivers.kernel.endpoint import ControlEndpoint
from manycast.drivers.kernel.loop import KernelLoop
from manycast.errors import ConfigError
from manycast.protocol.node import Frame, Node
from manycast.protocol.vip import OntoTree
from manycast.protocol.vipplane import Flow, flow_of
from manycast.wire.ip import complete_l4_checksum_v4, complete_l4_checksum_v6

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

    from manycast.protocol.vip import VipRouter
    from manycast.topology import Topology

log = logging.getLogger("manycast.kernel.vip_router")

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
SOL_PACKET = 263
PACKET_AUXDATA = 8
TP_STATUS_CSUMNOTREADY = 8
SO_ATTACH_FILTER = 26
IPPROTO_IPIP = 4
IPPROTO_IPV6 = 41  # IPv6 in IPv6, as IPIP is IPv4 in IPv6
_BATCH = 256
TAG_LEAD = 0.001  # seconds a new flow's first packet waits behind its tag


def vip_filter(vip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """A classic BPF program for a cooked packet socket: keep IPv4 (or IPv6) packets to
    `vip`: its destination address compared word by word (at 16, or 24 to 36)."""
    insn = struct.Struct("=HBBI")
    start = 16 if vip.version == 4 else 24
    words = [int.from_bytes(vip.packed[i : i + 4], "big") for i in range(0, len(vip.packed), 4)]
    program = []
    for index, word in enumerate(words):
        drop = 2 * (len(words) - index) - 1  # jumps over the words left, and keep
        program.append(insn.pack(0x20, 0, 0, start + 4 * index))  # ld [start + 4i]
        program.append(insn.pack(0x15, 0, drop, word))  # jeq #word, next, drop
    program.append(insn.pack(0x06, 0, 0, 0xFFFF))  # ret: keep (up to 64 KiB)
    program.append(insn.pack(0x06, 0, 0, 0))  # ret: drop
    return b"".join(program)


class VipRouterDaemon:
    def __init__(
        self,
        topology: Topology,
        name: str,
        run_dir: Path,
        seed: int,
        tag_lead: float = TAG_LEAD,
    ) -> None:
        from manycast.pool import build

        vip = topology.pool.vip
        if vip is None or name not in topology.vip_routers:
            raise ConfigError(f"{name} is not a VIP router of this topology")
        pool = topology.pool
        vips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [vip]
        if pool.group6 is not None:
            vips.append(pool.group6)
        marks = srv6.server_marks(topology.servers)
        # Each server's mark by its address of each family its trees are of.
        self._mark_of = {
            int(srv6.address_of(topology, n, vip.version)): mark
            for n, mark in marks.items()
            for vip in vips
        }
        self.loop = KernelLoop(run_dir, name, "vip_router", send=self._send)
        self.loop.on_effect = self._on_effect
        nodes = build(topology, seed=seed, wall_base=self.loop.wall_base, only={name})
        self.core: VipRouter = nodes.vip_routers[name]
        for logic in (self.core, getattr(self.core, "six", self.core)):
            logic.tree_effects = True
        self.iface, _ = topology.gateways[name]
        self.endpoint = ControlEndpoint(
            self.loop,
            self.iface,
            str(pool.control_group),
            pool.control_port,
            lambda packet: self.core.receive(self.iface, packet, self.loop.now),
            dual=pool.dual,
            receive6=pool.dual,  # the IPv6 logic's label bindings from its router
        )
        self.frames_dropped = 0
        # Make before break: a new flow's first packet leaves `tag_lead` seconds after
        # its tag, so that the tag is in place at the edge before the flow's next packet
        # arrives there (in the lab the kernel answers a SYN far faster than two user-space
        # hops install a tag; on a real network the tag's shorter path does this).
        self.tag_lead = tag_lead
        self.held = 0
        self._tags_seen = 0
        self._held_until: dict[Flow, float] = {}
        self.sent_to_trees = 0
        self.send_errors = 0
        # Per VIP: a packet socket reading its first packets, and a raw socket sending
        # them on a segment (IPv4 in IPv6, or IPv6 in IPv6), by IP version.
        self._programs: list[Any] = []  # kept alive
        self.readers: list[socket.socket] = []
        self.tunnels: dict[int, socket.socket] = {}
        for vip in vips:
            self.readers.append(self._reader(vip))
            inner = IPPROTO_IPV6 if vip.version == 6 else IPPROTO_IPIP
            self.tunnels[vip.version] = socket.socket(socket.AF_INET6, socket.SOCK_RAW, inner)
        self.loop.handlers["status"] = self._status
        self.loop.handlers["tagging"] = self._tagging
        self.loop.handlers["metrics"] = self._metrics
        self.loop.handlers["moved"] = self._moved
        self._registry: CollectorRegistry | None = None  # metrics, made when first asked
        self.loop.add(self.core)

    def _reader(self, vip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> socket.socket:
        """A packet socket on our link that reads the packets to `vip`."""
        ethertype = ETH_P_IPV6 if vip.version == 6 else ETH_P_IP
        reader = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ethertype))
        program = vip_filter(vip)
        buffer = ctypes.create_string_buffer(program)
        self._programs.append(buffer)
        fprog = struct.pack("HL", len(program) // 8, ctypes.addressof(buffer))
        reader.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        reader.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        reader.bind((self.iface, ethertype))
        complete = complete_l4_checksum_v6 if vip.version == 6 else complete_l4_checksum_v4
        self.loop.watch(reader, lambda: self._on_packets(reader, complete))
        return reader

    def _on_packets(self, reader: socket.socket, complete: Callable[[bytes], bytes]) -> None:
        for _ in range(_BATCH):
            try:
                packet, ancdata, _, address = reader.recvmsg(65535, 64)
            except BlockingIOError:
                return
            if address[2] == socket.PACKET_OUTGOING:
                continue
            for level, kind, data in ancdata:
                partial = struct.unpack_from("=I", data)[0] & TP_STATUS_CSUMNOTREADY
                if level == SOL_PACKET and kind == PACKET_AUXDATA and partial:
                    packet = complete(packet)
            # The loop carries out what the core made of the batch once it returns.
            self.core.receive(self.iface, packet, self.loop.now)

    def _on_effect(self, node: Node, effect: object) -> None:
        if not isinstance(effect, OntoTree):
            return
        now = self.loop.now
        found = flow_of(effect.packet)
        flow = None if found is None else found[0]
        if self.core.stats.tags_sent != self._tags_seen:
            # This packet came with a new tag (sent just before it): let the tag lead.
            self._tags_seen = self.core.stats.tags_sent
            if flow is not None and self.tag_lead > 0:
                self._held_until[flow] = now + self.tag_lead
        release = self._held_until.get(flow) if flow is not None else None
        if flow is not None and release is not None and release > now:
            self.held += 1
            self.loop.call_at(release, lambda: self._release(flow, effect))
            return
        self._onto_tree(effect)

    def _release(self, flow: Flow, effect: OntoTree) -> None:
        """A held packet leaves; the flow's hold ends with the last one held."""
        self._onto_tree(effect)
        if self._held_until.get(flow, self.loop.now) <= self.loop.now:
            self._held_until.pop(flow, None)

    def _onto_tree(self, effect: OntoTree) -> None:
        # The server's tree is of the packet's family.
        server: ipaddress.IPv4Address | ipaddress.IPv6Address
        version = effect.packet[0] >> 4
        if version == 6:
            server = ipaddress.IPv6Address(effect.server)
        else:
            server = ipaddress.IPv4Address(effect.server)
        sid = str(srv6.sid_of(server, self._mark_of.get(effect.server, 0)))
        try:
            self.tunnels[version].sendto(effect.packet, (sid, 0))
            self.sent_to_trees += 1
        except OSError as exc:
            self.send_errors += 1
            log.warning("cannot send to %s: %s", sid, exc)

    def _send(self, frame: Frame) -> None:
        if not self.endpoint.send(frame):
            self.frames_dropped += 1

    def _status(self, _: dict[str, Any]) -> dict[str, Any]:
        core = self.core
        return {
            "node": core.name,
            "pid": os.getpid(),
            "epoch": core.observer.epoch,
            "alive": core.observer.alive(self.loop.now),
            "flows": core.flows_held(),
            "stats": asdict(core.stats),
            "sent_to_trees": self.sent_to_trees,
            "held_behind_tags": self.held,
            "tag_lead_s": self.tag_lead,
            "send_errors": self.send_errors,
            "frames_dropped": self.frames_dropped,
            "endpoint": asdict(self.endpoint.stats),
        }

    def _tagging(self, request: dict[str, Any]) -> dict[str, Any]:
        """Turn flow tags off (a benchmark's baseline: every packet through us) or on."""
        self.core.tagging = bool(request["on"])
        return {"tagging": self.core.tagging}

    def _moved(self, request: dict[str, Any]) -> dict[str, Any]:
        """TCP moves (`tcp_move.py`): `flows` ([client, port] to the VIP's `port`) now
        live on `server`; the flows recorded so."""
        server, port, now = str(request["server"]), int(request["port"]), self.loop.now
        recorded = sum(
            self.core.moved(int(ipaddress.ip_address(c)), int(p), port, server, now)
            for c, p in request["flows"]
        )
        return {"recorded": recorded}

    def _metrics(self, _: dict[str, Any]) -> dict[str, Any]:
        """Prometheus text of this VIP router (docs/metrics.md): the core's counters."""
        from manycast.observe import metrics

        if self._registry is None:
            self._registry = metrics.registry(
                metrics.PoolCollector(
                    now=lambda: self.loop.now,
                    vip_routers=lambda: [metrics.VipRouterItem(self.core)],
                )
            )
        return {"text": metrics.exposition(self._registry)}

    def run(self) -> None:
        """Serve until SIGTERM."""
        self.loop.ready()
        try:
            self.loop.run_until(float("inf"))
        finally:
            for sock in (*self.readers, *self.tunnels.values()):
                sock.close()
            self.endpoint.close()
            self.loop.close()
