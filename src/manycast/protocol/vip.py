"""The VIP router (seed Fig 17-19): picks each new flow's server and tags the flow onto its tree.

Packets for the pool's VIP that carry no label reach the nearest live VIP router.
For a packet of a flow it has not seen, the VIP router picks a server by the
pool's allocation (the owner of the client's address, among the live servers),
sends the packet down that server's label-switched tree, and tells the client's
edge router to push that tree's label on the flow's next packets (`FlowTag`).
From then on the flow bypasses the VIP router.

The allocation is the servers' own (Fig 19): a VIP router follows their
coordination on the control channel as an observer (heartbeats carry liveness
and load; proposals and commits, or a snapshot, carry each change), so two VIP
routers given the same inputs pick the same server for a flow, and either can
die without breaking the other's choices. A flow already tagged keeps its
server whatever the policy does later.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Mapping
from dataclasses import dataclass, field

from manycast import policy
from manycast.protocol.coordination import Coordinator, PoolSettings
from manycast.protocol.dualstack import in_space
from manycast.protocol.handover import Edges
from manycast.protocol.labels import LabelTable
from manycast.protocol.membership import any_source_record, report_packets
from manycast.protocol.node import Interface, Node
from manycast.protocol.vipplane import Flow, flow_of, wrap
from manycast.space import AddressSpace, Allocation
from manycast.wire import control
from manycast.wire.errors import WireError
from manycast.wire.ip import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPV6_HEADER_LEN,
    Address,
    UDPDatagram,
    decrement_hop_limit_v6,
    decrement_ttl_v4,
    make_packet,
    parse_packet,
    peek_v4,
    peek_v6,
)
from manycast.wire.label import entropy_port, push
from manycast.wire.membership import IGMPv3Report, RecordType, igmp_packet

TAG_RESEND = 0.2  # seconds: a flow's packets still reaching us re-send its tag this often


@dataclass(slots=True)
class _Picked:
    server: str
    address: int
    last_seen: float
    tagged_at: float
    isn: int = -1  # the initial sequence number of a TCP flow's SYN (-1: none seen)


@dataclass(frozen=True, slots=True)
class OntoTree:
    """Effect (with `tree_effects`): send `packet` down the tree of the server at `server`."""

    server: int
    packet: bytes


@dataclass
class VipRouterStats:
    first_packets: int = 0  # packets of flows that reached us (goal: the first of each)
    repeat_packets: int = 0  # ... of a flow we had already picked a server for (goal: 0)
    flows: int = 0  # new flows we picked a server for
    tags_sent: int = 0
    repicked: int = 0  # flows whose server died before they were tagged away from us
    ports_reused: int = 0  # new connections on a (client, port) we had placed before
    no_server: int = 0  # no live server in the allocation
    no_tree: int = 0  # the chosen server's tree does not reach us yet
    no_edge: int = 0  # no edge router known for the client
    malformed: int = 0
    picks: dict[str, int] = field(default_factory=dict)  # server -> new flows given to it


class VipRouter(Node):
    def __init__(
        self,
        name: str,
        interfaces: dict[str, Interface],
        gateway: tuple[str, Address],
        settings: PoolSettings,
        rng: random.Random,
        *,
        vip: Address,
        initial: Allocation | None,
        edges: Edges,
        flow_idle: float = 30.0,
        follows: Coordinator | None = None,
        space: AddressSpace | None = None,
        server_addresses: Mapping[str, Address] | None = None,
    ) -> None:
        """`follows`: another logic's observer of the pool, which that logic feeds and
        drives (a dual-stack VIP router's IPv6 logic follows its IPv4 logic's: one
        allocation over both families); `space`: the space new flows' clients are
        placed in (that allocation's buckets read in it); `server_addresses`: the
        servers' addresses of this logic's family, when not the ones they coordinate
        from."""
        super().__init__(name, interfaces)
        iface, router = gateway
        self.iface = iface
        self.address = interfaces[iface].address
        self.gateway = int(router)
        # The network's family (the VIP's): how packets are read, and addresses written.
        self._v6 = self.address.version == 6
        self._peek = peek_v6 if self._v6 else peek_v4
        self._decrement = decrement_hop_limit_v6 if self._v6 else decrement_ttl_v4
        self._address: type[Address] = type(self.address)
        self.settings = settings
        self.rng = rng
        self.vip = vip
        self._vip = int(vip)
        self.edges = sorted(edges, key=lambda e: -e[0].prefixlen)
        self.flow_idle = flow_idle
        # Routers stop sending us new flows one failure-detection time after our last
        # advert, the time the servers take to notice one of their own is dead.
        self.advert_every = settings.heartbeat_s
        self.hold = settings.dead_after
        # We advertise ourselves once we can place new flows: routers turn to the nearest
        # VIP router they hear, and one that cannot place a flow yet loses its first
        # packet. Or, once our router has told us its trees, a hold time after we
        # started: a server whose tree has not reached us by then has none through us.
        self._started: float | None = None
        self._advertising = False
        self._follows = follows is not None
        self.observer = follows or Coordinator(
            name, self.address, settings, rng, initial=initial, observer=True
        )
        self.space = space
        self.server_addresses = server_addresses
        self.table = LabelTable(lambda _dst: (iface, self.gateway))
        self.flows: dict[Flow, _Picked] = {}
        # Hand each picked packet out as an `OntoTree` effect instead of label-switching
        # it (the kernel lab's trees are SRv6 segments the kernel forwards on).
        self.tree_effects = False
        # Off only for a benchmark's baseline: the VIP router stays in every packet's
        # path, as a load balancer in the path does.
        self.tagging = True
        self.stats = VipRouterStats()
        self._seq = 0
        self._generation = 0  # our MLDv2 reports, numbered
        self._effective: tuple[tuple[int, str, frozenset[str]], Allocation | None] | None = None

    # -- node interface ------------------------------------------------------------------
    def start(self, now: float) -> None:
        self._started = now
        self.timers.arm("advert", now)
        if not self._follows:
            self.observer.start(now)
            self.timers.arm("report", now)

    def on_timer(self, now: float) -> None:
        fired = self.timers.expired(now)
        if "advert" in fired:
            self._advertise(now)
        if "report" in fired:
            self._join_control_channel(now)
        if "expire" in fired:
            self._expire(now)
        if not self._follows:
            self.observer.on_timer(now)
        self._act()

    def next_deadline(self) -> float | None:
        if self._follows:
            return self.timers.next_deadline()
        deadlines = [self.timers.next_deadline(), self.observer.next_deadline()]
        return min((d for d in deadlines if d is not None), default=None)

    def receive(self, iface: str, packet: bytes, now: float) -> None:
        try:
            src, dst, protocol, ttl = self._peek(packet)
        except WireError:
            self.stats.malformed += 1
            return
        if dst == self._vip:
            self._on_flow_packet(packet, ttl, now)
        elif protocol == IPPROTO_UDP and dst in (
            int(self.address),
            int(self.settings.control_group),
        ):
            self._on_control(src, packet, now)
        self._act()

    # -- flows ---------------------------------------------------------------------------
    def _on_flow_packet(self, packet: bytes, ttl: int, now: float) -> None:
        self.stats.first_packets += 1
        found = flow_of(packet)
        if found is None or ttl <= 1:
            return
        flow, flags = found
        picked = self.flows.get(flow)
        isn = _syn_isn(packet, flow.protocol, flags)
        if picked is not None and isn >= 0 and picked.isn >= 0 and isn != picked.isn:
            # A SYN with another initial sequence number: not a retransmission but a
            # new connection from the same port (the old one closed); a new flow.
            del self.flows[flow]
            picked = None
            self.stats.ports_reused += 1
        if picked is not None and self.table.toward(picked.address) is None:
            # Its server's tree is gone (no hello for a hold time: the server is dead,
            # not just slow to send a heartbeat), and so is the flow: it may start over
            # on a live server (its SYN is still being retransmitted).
            del self.flows[flow]
            picked = None
            self.stats.repicked += 1
        if picked is not None:
            self.stats.repeat_packets += 1
        else:
            server = self.pick(flow.client, now)
            if server is None:
                self.stats.no_server += 1
                return
            address = self.server_address(server)
            if address is None:
                self.stats.no_server += 1
                return
            picked = self.flows[flow] = _Picked(server, address, now, -TAG_RESEND, isn)
            self.stats.flows += 1
            self.stats.picks[server] = self.stats.picks.get(server, 0) + 1
            self._arm_expiry(now)
        picked.last_seen = now
        hop = self.table.toward(picked.address)
        if hop is None or hop.label is None:
            self.stats.no_tree += 1
            return
        inner = self._decrement(packet)
        if self.tree_effects:
            # A kernel data plane puts it on the tree itself (its SRv6 segment).
            self.effects.append(OntoTree(picked.address, inner))
        else:
            payload = push(inner, hop.label, ttl=inner[7 if self._v6 else 8])
            self.send(
                hop.iface,
                wrap(self.address, hop.neighbor, payload, entropy_port(inner)),
                hop.neighbor,
            )
        if now - picked.tagged_at >= TAG_RESEND:
            picked.tagged_at = now
            self._tag(flow, picked, now)

    def flows_held(self) -> int:
        """How many flows we remember now (a dual-stack VIP router's: both families')."""
        return len(self.flows)

    def moved(self, client: int, port: int, vip_port: int, server: str, now: float) -> bool:
        """A live TCP connection from (client, port) to the VIP's `vip_port` now lives on
        `server` (moved whole, socket and all, by the kernel lab's TCP moves): the
        flow's record follows, so a packet of it that still reaches us goes to `server`
        and is tagged there. False when `server`'s address is not known to us."""
        address = self.server_address(server)
        if address is None:
            return False
        flow = Flow(IPPROTO_TCP, client, port, vip_port)
        picked = self.flows.get(flow)
        if picked is None:
            self.flows[flow] = _Picked(server, address, now, now)
            self._arm_expiry(now)
        else:
            picked.server, picked.address, picked.last_seen = server, address, now
        return True

    def pick(self, client: int, now: float) -> str | None:
        """The server for a new flow from `client`: its owner in the pool's allocation,
        the allocation first cleared of servers the pool has stopped hearing from (so
        every VIP router with the same view picks the same server)."""
        allocation = self._live_allocation(now)
        return None if allocation is None else allocation.owner(client)

    def _live_allocation(self, now: float) -> Allocation | None:
        allocation = self.observer.allocation
        if allocation is None:
            return None
        alive = frozenset(self.observer.alive(now))
        key = (self.observer.epoch, self.observer.digest, alive)
        if self._effective is not None and self._effective[0] == key:
            return self._effective[1]
        result: Allocation | None = allocation
        for server in sorted(set(allocation.servers) - alive):
            if result is None or len(result.servers) <= 1:
                result = None
                break
            result = policy.remove_server(result, server)
        if result is not None and self.space is not None:
            result = in_space(result, self.space)  # its buckets read in our family's space
        self._effective = (key, result)
        return result

    def server_address(self, server: str) -> int | None:
        peer = self.observer.peers.get(server)
        if peer is None or int(peer.address) == 0:
            return None  # not heard from yet
        if self.server_addresses is not None:
            address = self.server_addresses.get(server)
            return None if address is None else int(address)
        return int(peer.address)

    def edge_of(self, client: int) -> Address | None:
        address = self._address(client)
        return next((router for net, router in self.edges if address in net), None)

    def _tag(self, flow: Flow, picked: _Picked, now: float) -> None:
        if not self.tagging:
            return
        edge = self.edge_of(flow.client)
        if edge is None:
            self.stats.no_edge += 1
            return
        key = control.FlowKey(
            flow.protocol,
            self._address(flow.client),
            flow.client_port,
            self.vip,
            flow.vip_port,
        )
        idle_ms = max(1, int(self.flow_idle * 1000))
        message = control.FlowTag(
            self.name, self._next_seq(), key, self._address(picked.address), idle_ms
        )
        self._send_control(edge, message)
        self.stats.tags_sent += 1

    def _expire(self, now: float) -> None:
        for flow in [f for f, p in self.flows.items() if now - p.last_seen > self.flow_idle]:
            del self.flows[flow]
        self._arm_expiry(now)

    def _arm_expiry(self, now: float) -> None:
        if self.flows and not self.timers.armed("expire"):
            oldest = min(p.last_seen for p in self.flows.values())
            self.timers.arm("expire", max(now, oldest + self.flow_idle) + 0.001)

    # -- control -------------------------------------------------------------------------
    def _on_control(self, src: int, packet: bytes, now: float) -> None:
        try:
            ip = parse_packet(packet)
            datagram = UDPDatagram.from_wire(ip.payload, ip.header.src, ip.header.dst)
            if datagram.dst_port != self.settings.control_port:
                return
            message = control.decode(datagram.payload)
        except WireError:
            self.stats.malformed += 1
            return
        if isinstance(message, control.LabelMapping):
            if src == self.gateway:
                bindings = ((int(f), label) for f, label in message.bindings)
                self.table.mapping(src, bindings, message.hold_ms / 1000, now)
        elif message.sender != self.name and not self._follows:
            self.observer.on_message(message, now)

    def _act(self) -> None:
        if self._follows:
            return  # the logic we follow sends for the observer
        for message in self.observer.take_messages():
            self._send_control(self.settings.control_group, message)
        self.observer.take_new_allocation()

    def _advertise(self, now: float) -> None:
        self.table.expire(now)
        started = now if self._started is None else self._started
        if not self._advertising and (
            self.ready(now) or (self.table.stats.mappings > 0 and now >= started + self.hold)
        ):
            self._advertising = True  # from now on every heartbeat, as long as we live
        if self._advertising:
            hold_ms = max(1, int(self.hold * 1000))
            advert = control.VipAdvert(self.name, self._next_seq(), self.vip, self.address, hold_ms)
            self._send_control(self._address(self.gateway), advert)
        self.timers.arm("advert", now + self.advert_every)

    def ready(self, now: float) -> bool:
        """Whether we can place every new flow now: the pool's allocation, cleared of
        the servers it no longer hears from, names only servers whose addresses we know
        and whose trees reach us."""
        allocation = self._live_allocation(now)
        if allocation is None:
            return False
        for server in allocation.servers:
            address = self.server_address(server)
            if address is None or self.table.toward(address) is None:
                return False
        return True

    def _join_control_channel(self, now: float) -> None:
        """Join the control group (every source), as the servers do, to follow them."""
        record = any_source_record(self.settings.control_group, RecordType.MODE_IS_EXCLUDE)
        if isinstance(self.address, ipaddress.IPv6Address):
            # As a server's: the signed-join TLV names us (an MLDv2 report may leave
            # from a link-local address, RFC 3810 §5, and the kernel lab's does).
            self._generation = (self._generation + 1) & 0xFFFFFFFF
            wall_ms = int((self.settings.wall_base + now) * 1000)
            packets = report_packets([record], self.address, wall_ms, self._generation, self.rng)
        else:
            packets = [igmp_packet(IGMPv3Report((record,)), self.address).to_wire()]
        for packet in packets:
            self.send(self.iface, packet, self.gateway)
        self.timers.arm("report", now + self.settings.report_interval_s)

    def _send_control(self, to: Address, message: control.ControlMessage) -> None:
        port = self.settings.control_port
        udp = UDPDatagram(port, port, control.encode(message)).to_wire(self.address, to)
        packet = make_packet(self.address, to, IPPROTO_UDP, udp, ttl=16).to_wire()
        self.send(self.iface, packet, self.gateway)

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq


_TCP_SYN, _TCP_ACK = 0x02, 0x10


def _syn_isn(packet: bytes, protocol: int, flags: int) -> int:
    """The initial sequence number of a TCP SYN (not a SYN-ACK); -1 for anything else."""
    if protocol != IPPROTO_TCP or flags & (_TCP_SYN | _TCP_ACK) != _TCP_SYN:
        return -1
    header = IPV6_HEADER_LEN if packet[0] >> 4 == 6 else (packet[0] & 0x0F) * 4
    return int.from_bytes(packet[header + 4 : header + 8], "big")
