"""A router's part in a VIP pool (seed Fig 17-18): label switching, edge flow tags, VIP routing.

* Labelled packets (MPLS-in-UDP, RFC 7510, to our address) are switched by the
  label table: swapped toward the next router of the server's tree, or popped
  at the last hop and handed to the server. Label switching comes before any
  routing.
* A client's packet to the VIP at its edge router: if a VIP router has tagged
  the flow (`FlowTag`), the edge pushes the label of the chosen server's tree and
  the VIP router never sees the packet; an RST ends the tag, a FIN a little later
  (the close's last ACKs still need it), and so does idling.
* Any other packet to the VIP goes, unlabelled, to the nearest live VIP router
  (by the routing metric; ties by address, so every router agrees and no loop
  forms). VIP routers announce themselves with `VipAdvert`, flooded to every
  router and valid for a hold time.
* A manycast pool under R4 (pinned paths, Fig 16) uses the same trees and tags:
  a server about to give up part of the space tags each connection it will lose
  onto its own tree at the client's edge router, which pushes the label on that
  connection's packets to the group; untagged packets follow the multicast
  allocation as before.
* On an IPv6 network all of it runs on IPv6 packets: labelled ones are
  MPLS-in-UDP over IPv6, with the UDP checksum RFC 7510 requires there
  (`wire/label6.py`), and flows are read from the IPv6 header.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from manycast.protocol.labels import Hop, LabelTable
from manycast.wire import control
from manycast.wire.errors import WireError
from manycast.wire.ip import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPV6_HEADER_LEN,
    Address,
    decrement_hop_limit_v6,
    decrement_ttl_v4,
)
from manycast.wire.label import LABELLED_V4_LEN, LabelledReaderV4, TunnelV4, wrap_v4
from manycast.wire.label6 import LABELLED_V6_LEN, LabelledReaderV6, TunnelV6, wrap_v6

_PORTS = struct.Struct("!HH")
_TCP_FIN, _TCP_RST = 0x01, 0x04
FIN_LINGER = 2.0  # seconds a flow's tag outlives its FIN (the close's last ACKs)
_WIRE_CACHED = 4096  # labels (and hops) whose precomputed headers are kept between changes


class Forwarder(Protocol):
    """What the plane needs of its router."""

    name: str
    router_ifaces: set[str]

    def send(self, iface: str, packet: bytes, next_hop: int | None) -> None: ...

    def route(self, dst: int) -> tuple[str, int] | None: ...

    def address_on(self, iface: str) -> Address: ...

    def control_to(self, iface: str, neighbor: int, payload: bytes) -> None: ...


@dataclass(frozen=True, slots=True)
class Flow:
    """A client flow to the VIP, as the edge router keys it."""

    protocol: int
    client: int
    client_port: int
    vip_port: int


@dataclass(slots=True)
class _Tag:
    server: int
    idle: float
    last_used: float


@dataclass
class VipPlaneStats:
    labelled_switched: int = 0  # swapped toward the next router of a tree
    labelled_delivered: int = 0  # popped at a tree's last hop, handed to the server
    label_unknown: int = 0  # a label we did not bind, or whose tree is gone
    label_ttl_expired: int = 0
    malformed: int = 0  # labelled packets that do not decode
    pushed: int = 0  # tagged flows' packets labelled at this edge
    to_vip_router: int = 0  # unlabelled VIP packets sent toward a VIP router
    no_vip_router: int = 0  # ... with no live VIP router known
    flows_tagged: int = 0
    retags_refused: int = 0  # a tag naming another server for a flow whose server lives
    flows_ended: int = 0  # by FIN or RST
    flows_idle: int = 0
    flows_of_dead_servers: int = 0  # untagged when the pool declared their server dead
    refused: int = 0  # control messages from where they may not come


def flow_of(packet: bytes) -> tuple[Flow, int] | None:
    """The flow of an IPv4 or IPv6 TCP or UDP packet and its TCP flags (0 for UDP),
    unchecked beyond lengths: routers read it on the fast path. An IPv6 packet whose
    transport header sits behind extension headers is no flow (None)."""
    if packet[0] >> 4 == 6:
        header, protocol, client = IPV6_HEADER_LEN, packet[6], packet[8:24]
    else:
        header, protocol, client = (packet[0] & 0x0F) * 4, packet[9], packet[12:16]
    if protocol not in (IPPROTO_TCP, IPPROTO_UDP) or len(packet) < header + 14:
        return None
    sport, dport = _PORTS.unpack_from(packet, header)
    flags = packet[header + 13] if protocol == IPPROTO_TCP else 0
    return Flow(protocol, int.from_bytes(client, "big"), sport, dport), flags


def wrap(src: Address, dst: int, payload: bytes, sport: int) -> bytes:
    """An MPLS-in-UDP payload (label stack and inner packet) in UDP and IPv4 or IPv6
    (`src`'s family) to `dst`, the next router (TTL 1: the tunnel is one hop)."""
    if src.version == 6:
        return wrap_v6(int(src), dst, payload, sport)
    return wrap_v4(int(src), dst, payload, sport)


class Tunnel(Protocol):
    """One next hop of a label-switched path, its outer headers precomputed
    (`label.TunnelV4`, `label6.TunnelV6`)."""

    def swap(self, packet: bytes, sport: int, word: int) -> bytes | None: ...

    def push(self, inner: bytes) -> bytes: ...


class LabelledReader(Protocol):
    def read(self, packet: bytes) -> tuple[int, int]: ...


@dataclass(frozen=True)
class _LabelWire:
    """How one family carries labelled packets: the outer headers' length with one
    entry, their reader, a tunnel to a next hop, how an inner packet's TTL or hop
    limit drops, and the address of an integer."""

    labelled_len: int
    reader: Callable[[], LabelledReader]
    tunnel: Callable[[int, int, int], Tunnel]
    decrement: Callable[[bytes], bytes]
    address: Callable[[int], Address]


_WIRES = {
    4: _LabelWire(
        LABELLED_V4_LEN, LabelledReaderV4, TunnelV4, decrement_ttl_v4, ipaddress.IPv4Address
    ),
    6: _LabelWire(
        LABELLED_V6_LEN, LabelledReaderV6, TunnelV6, decrement_hop_limit_v6, ipaddress.IPv6Address
    ),
}


@dataclass
class VipPlane:
    router: Forwarder
    vip: int
    # every VIP router of the pool -> its distance from us by the routing metric
    distances: Mapping[int, float]
    # interface -> the label neighbours on it (routers, and VIP routers on their links)
    label_neighbors: Mapping[str, tuple[int, ...]]
    hold: float
    control_port: int
    # the pool's servers (the topology names them): only they root a tree
    servers: frozenset[int] = frozenset()
    # A manycast pool's R4 (Fig 16): the servers tag their own connections; in a VIP
    # pool only VIP routers tag flows (Fig 18).
    tags_from_servers: bool = False
    # The network's family: labelled packets travel in IPv4 or in IPv6 (with a UDP
    # checksum, `label6.py`), and so do the packets they carry.
    family: int = 4
    table: LabelTable = field(init=False)
    stats: VipPlaneStats = field(default_factory=VipPlaneStats)
    flows: dict[Flow, _Tag] = field(default_factory=dict)
    # Every tag taken, in order, for a kernel data plane to carry out (None: not kept).
    tag_log: list[tuple[Flow, int]] | None = None
    # VIP router -> (when its advert lapses, the last sequence number we took)
    vip_routers: dict[int, tuple[float, int]] = field(default_factory=dict)
    _seq: int = 0
    # The data plane's per-hop state, dropped whenever the label table changes: incoming
    # label -> (interface, next hop, the outer headers to it; None: pop; interface None:
    # no tree), and for pushing at the edge, id(hop) -> (that hop, its outer headers).
    _switching: dict[int, tuple[str | None, int, Tunnel | None]] = field(
        default_factory=dict, init=False, repr=False
    )
    _pushing: dict[int, tuple[Hop, Tunnel]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.table = LabelTable(self.router.route, on_change=self._forget_wire)
        self._label_peers = {n for peers in self.label_neighbors.values() for n in peers}
        wire = _WIRES[self.family]
        self._wire = wire
        self._reader = wire.reader()
        self._labelled_len = wire.labelled_len
        self._decrement = wire.decrement

    # -- packets -------------------------------------------------------------------------
    def on_labelled(self, packet: bytes, now: float) -> None:
        """An MPLS-in-UDP packet to one of our addresses: switch it by its top label.
        Per packet: one read of its headers and top entry (the outer IPv4 header checked
        once per upstream router and length; over IPv6, the UDP checksum), one lookup
        of the label's next hop with the outer headers to it precomputed, one pack and
        join."""
        try:
            sport, word = self._reader.read(packet)
        except WireError:
            self.stats.malformed += 1
            return
        switching = self._switching.get(word >> 12)
        if switching is None:
            switching = self._switching_for(word >> 12)
        iface, neighbor, tunnel = switching
        if iface is None:
            self.stats.label_unknown += 1
            return
        if tunnel is None:  # the tree's last hop: pop, hand the inner packet to the server
            if word & 0xFF <= 1:
                self.stats.label_ttl_expired += 1
                return
            self.router.send(iface, packet[self._labelled_len :], neighbor)
            self.stats.labelled_delivered += 1
            return
        try:
            out = tunnel.swap(packet, sport, word)
        except WireError:  # a reserved label that breaks the bottom-of-stack rules
            self.stats.malformed += 1
            return
        if out is None:
            self.stats.label_ttl_expired += 1
            return
        self.router.send(iface, out, neighbor)
        self.stats.labelled_switched += 1

    def _forget_wire(self) -> None:
        """The label table changed: drop the headers computed for the old hops."""
        self._switching.clear()
        self._pushing.clear()

    def _tunnel(self, hop: Hop, label: int) -> Tunnel:
        return self._wire.tunnel(int(self.router.address_on(hop.iface)), hop.neighbor, label)

    def _switching_for(self, label: int) -> tuple[str | None, int, Tunnel | None]:
        hop = self.table.switch(label)
        entry: tuple[str | None, int, Tunnel | None] = (None, 0, None)
        if hop is not None:
            tunnel = None if hop.label is None else self._tunnel(hop, hop.label)
            entry = (hop.iface, hop.neighbor, tunnel)
        if len(self._switching) >= _WIRE_CACHED:
            self._switching.clear()  # labels nobody bound, many of them: stay bounded
        self._switching[label] = entry
        return entry

    def on_vip_packet(self, iface: str, packet: bytes, ttl: int, now: float) -> None:
        """An unlabelled packet to the VIP: push a tagged flow's label at its edge, else
        send it to the nearest live VIP router."""
        if ttl <= 1 or self.push_tagged(iface, packet, now):
            return
        target = self.nearest_vip_router(now)
        if target is None:
            self.stats.no_vip_router += 1
            return
        way = self.router.route(target)
        if way is None:
            self.stats.no_vip_router += 1
            return
        self.router.send(way[0], self._decrement(packet), way[1])
        self.stats.to_vip_router += 1

    def push_tagged(self, iface: str, packet: bytes, now: float) -> bool:
        """At a client's edge: put a tagged flow's packet (to the VIP, or to a manycast
        pool's group under R4) on its server's tree, labelled. False when the flow is
        not tagged here or its server's tree is gone (the server died): the packet then
        goes the way of untagged ones, so a dead tree never black-holes a flow. The
        caller checks the TTL and the destination."""
        if iface in self.router.router_ifaces or not self.flows:
            return False
        found = flow_of(packet)
        if found is None:
            return False
        flow, flags = found
        tag = self.flows.get(flow)
        if tag is None:
            return False
        hop = self.table.toward(tag.server)
        if hop is None:
            return False
        tag.last_used = now
        self._send_on(hop, self._decrement(packet))
        self.stats.pushed += 1
        if flags & _TCP_RST:
            del self.flows[flow]
            self.stats.flows_ended += 1
        elif flags & _TCP_FIN and tag.idle > FIN_LINGER:
            # The close's last ACKs follow the FIN: keep the tag for them.
            tag.idle = FIN_LINGER
            self.stats.flows_ended += 1
        return True

    def _send_on(self, hop: Hop, packet: bytes) -> None:
        """Put an unlabelled packet on a server's tree at `hop`, labelled with the
        packet's TTL (hop limit) (the outer headers to each hop are computed once)."""
        if hop.label is None:
            self.router.send(hop.iface, packet, hop.neighbor)
            return
        # Keyed by identity: the table hands out one Hop object per server between
        # changes, and the entry holds it, so its id is not reused while cached.
        pushing = self._pushing.get(id(hop))
        if pushing is None or pushing[0] is not hop:
            if len(self._pushing) >= _WIRE_CACHED:
                self._pushing.clear()
            pushing = self._pushing[id(hop)] = (hop, self._tunnel(hop, hop.label))
        try:
            wire = pushing[1].push(packet)
        except WireError:  # too long to carry with a label
            self.stats.malformed += 1
            return
        self.router.send(hop.iface, wire, hop.neighbor)

    def nearest_vip_router(self, now: float) -> int | None:
        return self.nearest_vip_router_among(
            addr for addr, (until, _) in self.vip_routers.items() if until > now
        )

    def nearest_vip_router_among(self, live: Iterable[int]) -> int | None:
        """The nearest by the routing metric, ties by address: every router on the way
        to it picks it too (subpaths of shortest paths are shortest), so no loop."""
        return min(
            live, key=lambda addr: (self.distances.get(addr, float("inf")), addr), default=None
        )

    # -- control messages ----------------------------------------------------------------
    def on_control(
        self, iface: str, src: int, message: control.ControlMessage, raw: bytes, now: float
    ) -> bool:
        """Handle a VIP-pool control message; False if it is not one."""
        if isinstance(message, control.LabelMapping):
            if src not in self.label_neighbors.get(iface, ()):
                self.stats.refused += 1
                return True
            hold = message.hold_ms / 1000
            self.table.mapping(src, ((int(f), label) for f, label in message.bindings), hold, now)
        elif isinstance(message, control.ServerHello):
            server = int(message.server)
            toward = self.router.route(server)
            # Only from the server itself, on its own link.
            if (
                int(message.vip) != self.vip
                or server not in self.servers
                or src != server
                or toward is None
                or toward != (iface, server)
                or iface in self.router.router_ifaces
            ):
                self.stats.refused += 1
                return True
            self.table.hello(server, iface, message.hold_ms / 1000, now)
        elif isinstance(message, control.FlowTag):
            flow = message.flow
            server = int(message.server)
            if not self._may_tag(iface, src, server) or int(flow.vip) != self.vip:
                self.stats.refused += 1
                return True
            key = Flow(flow.protocol, int(flow.client), flow.client_port, flow.vip_port)
            held = self.flows.get(key)
            if held is None:
                self.stats.flows_tagged += 1
            elif held.server != server and self.table.toward(held.server) is not None:
                # A flow keeps its server while that server's tree stands: a second
                # opinion (another VIP router's, a stale one) does not split it.
                self.stats.retags_refused += 1
                return True
            self.flows[key] = _Tag(server, message.idle_ms / 1000, now)
            if self.tag_log is not None:
                self.tag_log.append((key, server))
        elif isinstance(message, control.FlowUntag):
            if not self._may_tag(iface, src, None):
                self.stats.refused += 1
                return True
            for flow in message.flows:
                key = Flow(flow.protocol, int(flow.client), flow.client_port, flow.vip_port)
                held = self.flows.get(key)
                # A server ends only its own connections' tags.
                if held is not None and (src in self.distances or held.server == src):
                    del self.flows[key]
        elif isinstance(message, control.VipAdvert):
            origin = int(message.router)
            if origin not in self.distances or int(message.vip) != self.vip:
                self.stats.refused += 1
                return True
            until, last = self.vip_routers.get(origin, (0.0, -1))
            if until > now and message.seq <= last:
                return True  # a copy we already have (flooding)
            self.vip_routers[origin] = (now + message.hold_ms / 1000, message.seq)
            self._flood(iface, raw)
        else:
            return False
        return True

    def _may_tag(self, iface: str, src: int, server: int | None) -> bool:
        """Whether `src` may tag flows here (onto `server`'s tree, None: untag): a VIP
        router (Fig 18); in a manycast pool's R4 a server of the pool, onto its own
        tree only, arriving from its side of the network as its joins do (Fig 16)."""
        if src in self.distances:
            return True
        if not self.tags_from_servers or src not in self.servers or server not in (None, src):
            return False
        toward = self.router.route(src)
        return toward is not None and toward[0] == iface

    def _flood(self, arrived_on: str, payload: bytes) -> None:
        for out in sorted(self.router.router_ifaces - {arrived_on}):
            for neighbor in self.label_neighbors.get(out, ()):
                self._control_to(out, neighbor, payload)

    def _control_to(self, iface: str, neighbor: int, payload: bytes) -> None:
        self.router.control_to(iface, neighbor, payload)

    def drop_server(self, server: int) -> bool:
        """The pool declared `server` dead: its tagged flows fall back to membership
        (R4's paths pinned to it end). True if any did."""
        dead = [flow for flow, tag in self.flows.items() if tag.server == server]
        for flow in dead:
            del self.flows[flow]
        self.stats.flows_of_dead_servers += len(dead)
        return bool(dead)

    # -- time ----------------------------------------------------------------------------
    def advertise(self, now: float, force: bool = False) -> None:
        """Send our bindings to every label neighbour when they changed (or `force`)."""
        if not (self.table.changed() or force):
            return
        address = self._wire.address
        bindings: dict[control.Address, int] = {
            address(f): label for f, label in self.table.bindings()
        }
        hold_ms = max(1, int(self.hold * 1000))
        for iface, peers in sorted(self.label_neighbors.items()):
            for neighbor in peers:
                self._seq = (self._seq + 1) & 0xFFFFFFFF
                message = control.LabelMapping.of(
                    self.router.name, self._seq, self.router.address_on(iface), hold_ms, bindings
                )
                self._control_to(iface, neighbor, control.encode(message))

    def expire(self, now: float) -> None:
        self.table.expire(now)
        # The same expression as `next_expiry`: no rounding can make it fire early forever.
        for flow in [f for f, t in self.flows.items() if t.last_used + t.idle <= now]:
            del self.flows[flow]
            self.stats.flows_idle += 1
        for origin in [o for o, (until, _) in self.vip_routers.items() if until <= now]:
            del self.vip_routers[origin]

    def next_expiry(self) -> float | None:
        times = [t.last_used + t.idle for t in self.flows.values()]
        times += [until for until, _ in self.vip_routers.values()]
        table = self.table.next_expiry()
        if table is not None:
            times.append(table)
        return min(times, default=None)
