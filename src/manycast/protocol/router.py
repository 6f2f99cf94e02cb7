"""The manycast router: masked source-specific membership and forwarding.

Membership: each member's join (a server's IGMPv3 report with mask TLVs) sets
its filter for a group (see `membership.py`). A join is accepted only on the
interface the router's route toward the requester uses (for a first-hop
router, the requester's own link), which also keeps joins from looping. An
accepted join is relayed, unchanged, out of every other router-facing
interface, so the routers upstream learn the member too; relaying the member's
own report instead of an aggregate keeps its signature checkable at every hop.

A router that starts (or restarts, knowing nothing) sends General Queries, and
the members answer at once with their current reports (`querier.py`). Until it
stops asking, every packet from one of its own hosts also goes to every neighbour
router, which forwards it by its own membership: the neighbours know the members
the starting router has yet to learn. A server's heartbeat and a
client's request then pass at once instead of being dropped for the second or
more a lossy core link can take to bring every member's report (docs/soak.md,
finding 17). Only packets from its own hosts are sent on so (packets from a
router never are), so the copies cannot loop however the routers are meshed; a
member behind two neighbours may get a packet twice meanwhile.

A report too long for one packet comes as parts (RFC 3376 §4.2.16), each
admitted and relayed on its own, and acted on as one report once all have come
(`reassembly.py` says why).

Forwarding: a multicast packet from source S to group G goes to the neighbour
toward every member whose filter matches S, so a client's packets reach only
the server that serves it. The outgoing set is computed on the first packet of
(S, G) and cached, like a kernel multicast forwarding entry, until membership
of G changes; where a packet's fate depends on its addresses alone, the entry is
also published for the driver to serve (`fastpath.py`). Unicast follows the
routes computed from the topology.

On an IPv6 network the same router reads MLDv2 reports and IPv6 headers
(`router6.py`); everything that decides is shared.

Label switching (`vipplane.py`): in a VIP pool (Fig 17-18), and in a manycast
pool under R4 (pinned paths, Fig 16), the routers build one label-switched tree
per server. Under R4 a server about to give up a portion tags each connection it
will lose onto its own tree at the client's edge router; the edge pushes the
label on that connection's packets to the group, which then reach the old owner
by label switching whatever the membership says, until the connection closes
(the server untags it) or idles. Label switching comes before routing.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from manycast.auth import ReplayCache
from manycast.protocol.admission import Admission
from manycast.protocol.fastpath import FastPath
from manycast.protocol.membership import SourceFilter, changes
from manycast.protocol.node import Frame, Interface, Node
from manycast.protocol.querier import Querier
from manycast.protocol.reassembly import Reassembly
from manycast.protocol.refusal import Refusal
from manycast.protocol.vipplane import VipPlane
from manycast.wire import control
from manycast.wire.errors import WireError
from manycast.wire.ip import (
    IPPROTO_IGMP,
    IPPROTO_UDP,
    ROUTER_ALERT_V4,
    Address,
    InnerPacket,
    IPv4Packet,
    UDPDatagram,
    decrement_ttl_v4,
    make_packet,
    parse_packet,
    peek_v4,
)
from manycast.wire.label import MPLS_UDP_PORT
from manycast.wire.membership import (
    IGMP_V3_ROUTERS,
    GroupRecord,
    IGMPv3Report,
    MLDv2Report,
    RecordType,
)
from manycast.wire.membership_query import ALL_SYSTEMS

MULTICAST_LOW, MULTICAST_HIGH = 0xE0000000, 0xEFFFFFFF
_LINK_LOCAL_MASK, _LINK_LOCAL = 0xFFFFFF00, 0xE0000000
_ALL_V3_ROUTERS = int(IGMP_V3_ROUTERS)
_ALL_SYSTEMS = int(ALL_SYSTEMS)
_MFC_LIMIT = 1 << 16

_FULL = 0xFFFFFFFF
_BLOCK = RecordType.BLOCK_OLD_SOURCES
MAX_PENDING_JOINS = 1024  # joins held while their group's key is looked up
VIP_SWEEP = 0.25  # seconds between sweeps of a VIP pool's lapsed tags and bindings
_MPLS_DPORT = MPLS_UDP_PORT.to_bytes(2, "big")
NOTICE_MEMORY = 60.0  # seconds a member-down notice is remembered, so its copies stop


@dataclass(frozen=True, slots=True)
class RouteEntry:
    network: int
    mask: int
    prefixlen: int
    iface: str
    next_hop: int | None


@dataclass(slots=True)
class Member:
    """One requester's membership of one group, as seen by this router."""

    origin: int
    iface: str
    neighbor: int
    filter: SourceFilter
    expires: float


@dataclass(frozen=True, slots=True)
class KeyNeeded:
    """Joins for `group` wait for its public key: look it up, then `provide_key`."""

    group: int


@dataclass(frozen=True, slots=True)
class GroupChanged:
    """The membership or admitted senders of `group` changed (a join, a leave, an
    expiry): a driver that mirrors forwarding decisions elsewhere (the kernel's
    table) re-resolves that group's entries."""

    group: int


RouterEffect = KeyNeeded | GroupChanged


@dataclass
class RouterStats:
    multicast_forwarded: int = 0
    unicast_forwarded: int = 0
    no_member: int = 0
    no_route: int = 0
    ttl_expired: int = 0
    malformed: int = 0
    joins_accepted: int = 0
    joins_relayed: int = 0
    rejected: Counter[Refusal] = field(default_factory=Counter)
    local: int = 0
    members_down: int = 0  # members dropped on the pool's notice that they died
    notices_refused: Counter[Refusal] = field(default_factory=Counter)


def _ipv4(number: int) -> Address:
    return ipaddress.IPv4Address(number)


class Router(Node):
    """An IPv4 network's router (`router6.Router6`: an IPv6 network's)."""

    # What differs between the families where the code is shared: an address from its
    # integer, the mask of one whole address (a sender's registration names itself
    # with it), and (`_decrement`, set in __init__: an instance attribute is the
    # cheaper lookup per packet) how a forwarded packet's TTL or hop limit drops.
    _address = staticmethod(_ipv4)
    _full_mask = _FULL

    def __init__(
        self,
        name: str,
        interfaces: dict[str, Interface],
        routes: Iterable[
            tuple[
                ipaddress.IPv4Network | ipaddress.IPv6Network,
                str,
                ipaddress.IPv4Address | ipaddress.IPv6Address | None,
            ]
        ],
        router_ifaces: Iterable[str],
        *,
        hold_time: float = 3.5,
        sender_hold: float | None = None,
        admission: Admission | None = None,
        control_port: int = 7946,
        neighbors: dict[str, tuple[int, ...]] | None = None,
        vip: Address | None = None,
        vip_routers: Mapping[int, float] | None = None,
        vip_router_links: Mapping[str, tuple[int, ...]] | None = None,
        vip_servers: Iterable[int] = (),
        r4_group: Address | None = None,
    ) -> None:
        """`hold_time`: how long a membership lasts without a refresh; `sender_hold`:
        a private pool's sender registration (default: `hold_time`). `vip` and the
        `vip_*` options: a VIP pool's router. `r4_group`: a manycast pool's group under
        R4, whose servers tag the connections they give up onto their trees
        (`vip_servers` names them)."""
        super().__init__(name, interfaces)
        self._decrement: Callable[[bytes], bytes] = decrement_ttl_v4
        self._neighbors = neighbors or {}  # router-facing interface -> neighbour routers' addresses
        self.hold_time = hold_time
        self.sender_hold = hold_time if sender_hold is None else sender_hold
        self.admission = admission
        self.control_port = control_port
        self.senders: dict[int, dict[int, float]] = {}  # group -> participant -> expiry
        self._pending: list[tuple[str, InnerPacket, IGMPv3Report | MLDv2Report, tuple[int, ...]]]
        self._pending = []
        self._notices_seen = ReplayCache(NOTICE_MEMORY)  # member-down notices (floods)
        self.router_ifaces = set(router_ifaces)
        # Every neighbour router, for what a starting router sends them all.
        self._neighbor_routers = tuple(
            (iface, neighbor)
            for iface in sorted(self.router_ifaces)
            for neighbor in self._neighbors.get(iface, ())
        )
        self.stats = RouterStats()
        # Cache hits a driver may serve without calling in (`fastpath.py`).
        self.fast_path = FastPath(interfaces, self.stats)
        self.members: dict[int, dict[int, Member]] = {}  # group -> origin -> member
        self.parts = Reassembly(hold_time)  # split reports waiting for their other parts
        self._flooded: set[int] = set()  # groups sent to every neighbour while starting
        self._own = {i.address_int for i in interfaces.values()}
        self._routes = sorted(
            (
                RouteEntry(
                    int(n.network_address),
                    int(n.netmask),
                    n.prefixlen,
                    iface,
                    None if hop is None else int(hop),
                )
                for n, iface, hop in routes
            ),
            key=lambda r: -r.prefixlen,
        )
        for iface in interfaces.values():
            net = iface.network
            self._routes.insert(
                0,
                RouteEntry(
                    int(net.network_address), int(net.netmask), net.prefixlen, iface.name, None
                ),
            )
        self._routes.sort(key=lambda r: -r.prefixlen)
        self._fib: dict[int, tuple[str, int] | None] = {}
        self.querier = Querier(interfaces, self.router_ifaces, self.send, self.route, self.timers)
        # group -> masked source -> outgoing (interface, neighbour) pairs: the forwarding
        # cache. A packet's fate depends only on the bits of its source some member's
        # mask looks at (`_cell_masks`: per group, the union of its members' masks), so
        # entries follow the portions' cells, not the clients.
        self._mfc: dict[int, dict[int, tuple[tuple[str, int], ...]]] = {}
        self._cell_masks: dict[int, int] = {}
        # group -> how many of its members' pairs use each mask: the union above is
        # kept from these, not read again from every member on each join.
        self._pair_masks: dict[int, Counter[int]] = {}
        # Label switching and edge flow tags: a VIP pool's router, with VIP routing
        # (Fig 17-18), or a manycast pool's under R4 (Fig 16), whose tags are for
        # connections to the group.
        self.vip: VipPlane | None = None
        self._vip = -1  # the VIP, routed to VIP routers (-1: none)
        tagged = vip if vip is not None else r4_group
        if tagged is not None:
            label_neighbors = {i: self._neighbors.get(i, ()) for i in self.router_ifaces}
            for link_iface, peers in (vip_router_links or {}).items():
                label_neighbors[link_iface] = (*label_neighbors.get(link_iface, ()), *peers)
            self.vip = VipPlane(
                self,
                int(tagged),
                dict(vip_routers or {}),
                label_neighbors,
                hold_time,
                control_port,
                frozenset(vip_servers),
                tags_from_servers=vip is None,
                family=self._address(0).version,
            )
            self._vip = -1 if vip is None else int(vip)

    # -- node interface ----------------------------------------------------------
    def start(self, now: float) -> None:
        self.querier.startup(now)
        if self.vip is not None:
            self.timers.arm("labels", now)

    def address_on(self, iface: str) -> Address:
        """An interface's address (the label plane's tunnels start there)."""
        return self.interfaces[iface].address

    def on_timer(self, now: float) -> None:
        fired = self.timers.expired(now)
        if self.vip is not None:
            if "labels" in fired:
                self.vip.advertise(now, force=True)
                self.timers.arm("labels", now + self.hold_time / 3)
            if "vip" in fired:
                self.vip.expire(now)
                self.vip.advertise(now)
                if self.vip.next_expiry() is not None:
                    self.timers.arm("vip", now + VIP_SWEEP)
        if "expire" in fired:
            self._expire(now)
        if "query" in fired:
            self.querier.startup(now, self.stats.no_member)
            if not self.querier.starting and self._flooded:
                for group in sorted(self._flooded):
                    self._invalidate(group)  # a kernel data plane rewrites those entries
                self._flooded.clear()

    def receive(self, iface: str, packet: bytes, now: float) -> None:
        try:
            src, dst, proto, ttl = peek_v4(packet)
        except WireError:
            self.stats.malformed += 1
            return
        if dst == self._vip and self.vip is not None:
            self.vip.on_vip_packet(iface, packet, ttl, now)
            self._vip_changed(now)
        elif MULTICAST_LOW <= dst <= MULTICAST_HIGH:
            if dst & _LINK_LOCAL_MASK == _LINK_LOCAL:
                if dst == _ALL_V3_ROUTERS and proto == IPPROTO_IGMP:
                    self._on_report(iface, packet, now)
                elif dst == _ALL_SYSTEMS and proto == IPPROTO_IGMP:
                    self.querier.on_query(iface, packet, now)
                return
            self._forward_multicast(iface, src, dst, packet, ttl, now)
        elif dst in self._own:
            self.stats.local += 1
            if proto == IPPROTO_UDP:
                # MPLS-in-UDP: read in place when the header has no options (per packet)
                if self.vip is not None and (
                    packet[22:24] == _MPLS_DPORT
                    if packet[0] == 0x45
                    else _udp_dport(packet) == MPLS_UDP_PORT
                ):
                    self.vip.on_labelled(packet, now)
                else:
                    self._on_control(iface, packet, now)
        else:
            self._forward_unicast(dst, packet, ttl)

    # -- forwarding ----------------------------------------------------------------
    def _forward_multicast(
        self, iface: str, src: int, group: int, packet: bytes, ttl: int, now: float
    ) -> None:
        if self.admission is not None and not self.sender_allowed(iface, src, group, now):
            self.stats.rejected[Refusal.UNAUTHORIZED_SENDER] += 1
            return
        plane = self.vip
        if (
            plane is not None
            and plane.flows
            and group == plane.vip
            and ttl > 1
            and plane.push_tagged(iface, packet, now)
        ):
            return  # R4: a connection its old owner tagged onto its tree (Fig 16)
        starting = self._to_every_neighbor(iface)
        unplaced = False
        if starting:
            # Not in the forwarding cache: these copies depend on the interface. The
            # fast path is per interface, and emptied when the router stops asking.
            outs = self.resolve(src, group, iface)
            self._flooded.add(group)
            members = self.members.get(group, {}).values()
            unplaced = not any(m.filter.matches(src) for m in members)
            if unplaced:
                self.stats.no_member += 1  # the querier asks again while this grows
        else:
            cache = self._mfc.get(group)
            if cache is None:
                cache = self._mfc[group] = {}
            cell = src & self._cell_masks.get(group, 0)
            cached = cache.get(cell)
            if cached is None:
                cached = self.resolve(src, group)
                if len(cache) >= _MFC_LIMIT:
                    cache.clear()
                cache[cell] = cached
            outs = cached
        if not outs:
            if not starting:  # (counted above)
                self.stats.no_member += 1
            return
        if ttl <= 1:
            self.stats.ttl_expired += 1
            return
        forwarded = self._decrement(packet)
        append = self.outbox.append  # Node.send, inlined: this runs per packet
        sent = 0
        for out_iface, neighbor in outs:
            if out_iface != iface:
                append(Frame(out_iface, forwarded, neighbor))
                sent += 1
        self.stats.multicast_forwarded += sent
        # The same fate for every packet of (src, group) from this interface until
        # membership changes, unless time or pinned paths could change it.
        if (
            self.fast_path.served
            and not unplaced  # (the router must go on counting those)
            and (plane is None or group != plane.vip)
            and group != self._vip
            and (
                self.admission is None
                or iface in self.router_ifaces
                or not self.admission.is_private(group)
            )
        ):
            copies = outs if sent == len(outs) else tuple(o for o in outs if o[0] != iface)
            self.fast_path.install(iface, packet, copies)

    def resolve(
        self, src: int, group: int, arrived_on: str | None = None
    ) -> tuple[tuple[str, int], ...]:
        """The (interface, neighbour) pairs toward every member of `group` matching `src`;
        while the router is starting, for a packet that `arrived_on` a host's link,
        every neighbour router's too (the module's docstring says why)."""
        outs: dict[tuple[str, int], None] = {}
        for member in self.members.get(group, {}).values():
            if member.filter.matches(src):
                outs[(member.iface, member.neighbor)] = None
        if arrived_on is not None and self._to_every_neighbor(arrived_on):
            for pair in self._neighbor_routers:
                outs[pair] = None
        return tuple(outs)

    def _to_every_neighbor(self, arrived_on: str) -> bool:
        """Whether a packet that arrived on `arrived_on` also goes to every neighbour
        router: one from a host's link while the router is starting."""
        return (
            self.querier.starting
            and bool(self._neighbor_routers)
            and arrived_on not in self.router_ifaces
        )

    def route(self, dst: int) -> tuple[str, int] | None:
        """(interface, next hop) toward `dst`, by longest prefix."""
        if dst in self._fib:
            return self._fib[dst]
        hop: tuple[str, int] | None = None
        for entry in self._routes:
            if dst & entry.mask == entry.network:
                hop = (entry.iface, dst if entry.next_hop is None else entry.next_hop)
                break
        if len(self._fib) >= _MFC_LIMIT:
            self._fib.clear()
        self._fib[dst] = hop
        return hop

    def _forward_unicast(self, dst: int, packet: bytes, ttl: int) -> None:
        hop = self.route(dst)
        if hop is None:
            self.stats.no_route += 1
            return
        if ttl <= 1:
            self.stats.ttl_expired += 1
            return
        self.send(hop[0], self._decrement(packet), hop[1])
        self.stats.unicast_forwarded += 1

    # -- membership ----------------------------------------------------------------
    def _on_report(self, iface: str, packet: bytes, now: float) -> None:
        try:
            ip = IPv4Packet.from_wire(packet)
            report = IGMPv3Report.from_wire(ip.payload)
        except WireError:
            self.stats.malformed += 1
            self.stats.rejected[Refusal.MALFORMED] += 1
            return
        self._admit(iface, ip, report, now)

    def _admit(
        self, iface: str, ip: InnerPacket, report: IGMPv3Report | MLDv2Report, now: float
    ) -> None:
        requester = report.signed.requester if report.signed is not None else ip.header.src
        origin = int(requester)
        toward = self.route(origin)
        right_link = toward is not None and toward[0] == iface
        if self.admission is None:
            reason = None if right_link else Refusal.WRONG_LINK
        else:
            verdict = self.admission.check(report, right_link, now)
            # Keys to look up: those waited for, and stale ones still in use meanwhile.
            self.effects.extend(KeyNeeded(group) for group in self.admission.take_requests())
            if verdict.waiting_for:
                if len(self._pending) >= MAX_PENDING_JOINS:
                    self.stats.rejected[Refusal.TOO_MANY_WAITING] += 1
                    return
                self._pending.append((iface, ip, report, verdict.waiting_for))
                return
            reason = verdict.reason
        if reason is not None:
            self.stats.rejected[reason] += 1
            return
        self.stats.joins_accepted += 1
        neighbor = int(ip.header.src)
        first_hop = toward is not None and toward[1] == origin
        signed = report.signed
        if signed is None or signed.parts == 1:
            if self._join(report.records, origin, iface, neighbor, first_hop, now):
                self._relay(iface, ip.payload)
        else:
            # One part of a split report: relayed now (each part is signed on its
            # own, so every router upstream checks it), acted on once all have come.
            self._relay(iface, ip.payload)
            self._keep_alive(report.records, origin, iface, first_hop, now)
            whole = self.parts.add(origin, signed, report.records, now)
            if whole is not None:
                self._join(whole, origin, iface, neighbor, first_hop, now)
        if not self.timers.armed("expire"):
            # Whatever this report set expires a hold time from now, no sooner than
            # what the armed timer waits for: it fires at or before the soonest expiry
            # (and `_expire` arms it again), so one look at every member is enough then.
            self._arm_expiry()

    def _join(
        self,
        records: tuple[GroupRecord, ...],
        origin: int,
        iface: str,
        neighbor: int,
        first_hop: bool,
        now: float,
    ) -> bool:
        """Act on an admitted report's records; whether it is to be relayed."""
        relay = False
        for group_address, source_filter in changes(records):
            group = int(group_address)
            if first_hop:
                # A participant on our own link may send to the group (private pools).
                senders = self.senders.setdefault(group, {})
                if origin not in senders:
                    self.effects.append(GroupChanged(group))  # a kernel data plane lets it in
                senders[origin] = now + self.sender_hold
            if (
                first_hop
                and source_filter is not None
                and source_filter.include == ((origin, self._full_mask),)
            ):
                continue  # a sender's registration only: nothing to deliver to it
            members = self.members.setdefault(group, {})
            before = members.get(origin)
            if source_filter is None:
                if members.pop(origin, None) is not None:
                    self._count_masks(group, before, -1)
            else:
                members[origin] = Member(
                    origin, iface, neighbor, source_filter, now + self.hold_time
                )
                self._count_masks(group, before, -1)
                self._count_masks(group, members[origin], 1)
            relay = True
            unchanged = (
                before is not None
                and source_filter is not None
                and (before.iface, before.neighbor, before.filter)
                == (iface, neighbor, source_filter)
            )
            if not unchanged:  # a refresh keeps the forwarding cache
                self._invalidate(group)
        return relay

    def _keep_alive(
        self, records: tuple[GroupRecord, ...], origin: int, iface: str, first_hop: bool, now: float
    ) -> None:
        """A part of a split report shows its sender is alive: the memberships (and
        sender registrations) it already holds for the groups the part joins last
        another hold time, whether or not the other parts come."""
        for record in records:
            group = int(record.group)
            if first_hop and origin in self.senders.get(group, {}):
                self.senders[group][origin] = now + self.sender_hold
            member = self.members.get(group, {}).get(origin)
            if member and member.iface == iface and record.record_type != _BLOCK:
                member.expires = max(member.expires, now + self.hold_time)

    def restore_key(self, group: int, raw: bytes, stale_for: float, now: float) -> bool:
        """A key this router held before a restart (`Admission.restore_key`)."""
        return self.admission is not None and self.admission.restore_key(group, raw, stale_for, now)

    def provide_key(
        self,
        group: int,
        raw: bytes | None,
        ttl: float,
        now: float,
        error: str | None = None,
        unanswered: bool = False,
    ) -> None:
        """The answer to a `KeyNeeded(group)`: admit or refuse the joins that waited.
        `unanswered`: DNS gave no word on the key (a key held before is kept a while)."""
        if self.admission is None:
            return
        self.admission.provide_key(group, raw, ttl, now, error, unanswered)
        waiting, self._pending = self._pending, []
        for iface, ip, report, groups in waiting:
            if group in groups:
                self._admit(iface, ip, report, now)
            else:
                self._pending.append((iface, ip, report, groups))

    def sender_allowed(self, iface: str, src: int, group: int, now: float) -> bool:
        """Private groups: only participants (an admitted join on this link) may send."""
        if (
            self.admission is None
            or iface in self.router_ifaces
            or not self.admission.is_private(group)
        ):
            return True
        expires = self.senders.get(group, {}).get(src)
        return expires is not None and expires > now

    def _relay(self, arrived_on: str, igmp: bytes) -> None:
        for out in sorted(self.router_ifaces - {arrived_on}):
            src = self.address_on(out)
            assert isinstance(src, ipaddress.IPv4Address)  # (Router6 relays MLDv2 reports)
            relayed = IPv4Packet.make(
                src,
                IGMP_V3_ROUTERS,
                IPPROTO_IGMP,
                igmp,
                ttl=1,
                dscp=48,
                dont_fragment=True,
                options=ROUTER_ALERT_V4,
            )
            self.send(out, relayed.to_wire(), None)
            self.stats.joins_relayed += 1

    # -- control messages to the router itself --------------------------------------
    def _on_control(self, iface: str, packet: bytes, now: float) -> None:
        try:
            ip = parse_packet(packet)
            datagram = UDPDatagram.from_wire(ip.payload, ip.header.src, ip.header.dst)
            if datagram.dst_port != self.control_port:
                return
            message = control.decode(datagram.payload)
        except WireError:
            self.stats.malformed += 1
            return
        if isinstance(message, control.MemberDown):
            self._on_member_down(iface, message, datagram.payload, now)
        elif self.vip is not None and self.vip.on_control(
            iface, int(ip.header.src), message, datagram.payload, now
        ):
            self._vip_changed(now)

    def _on_member_down(
        self, iface: str, notice: control.MemberDown, payload: bytes, now: float
    ) -> None:
        """The pool declared a member dead: drop its membership and the R4 paths pinned
        to it now, rather than when its membership times out, and pass the notice on.
        A private group's notice must be signed with the group's key (and timely, new,
        from the signer's side); a public group's must come from the signer's side and
        the signer must be a member itself."""
        group, member, signer = int(notice.group), int(notice.member), int(notice.signer)
        signed = notice.signed_bytes()
        if signed in self._notices_seen:
            return  # a flooded copy
        toward = self.route(signer)
        right_link = toward is not None and toward[0] == iface
        members = self.members.get(group, {})
        reason: Refusal | None
        if self.admission is not None and self.admission.is_private(group):
            verdict = self.admission.check_notice(notice, right_link, now)
            self.effects.extend(KeyNeeded(g) for g in self.admission.take_requests())
            # Not held when waiting: the member's membership still times out if the key
            # never comes.
            reason = Refusal.NO_KEY if verdict.waiting_for else verdict.reason
        elif not right_link:
            reason = Refusal.WRONG_LINK
        elif signer not in members:
            reason = Refusal.UNAUTHORIZED_SENDER
        else:
            reason = None
        if reason is not None:
            self.stats.notices_refused[reason] += 1
            return
        self._notices_seen.remember(signed, now)
        dropped = members.pop(member, None)
        if dropped is not None:
            self._count_masks(group, dropped, -1)
            self.stats.members_down += 1
            self._invalidate(group)
            self._arm_expiry()
        if self.vip is not None and self.vip.drop_server(member):
            self._vip_changed(now)
        for out in sorted(self.router_ifaces - {iface}):
            for neighbor in self._neighbors.get(out, ()):
                self.control_to(out, neighbor, payload)

    def control_to(self, iface: str, neighbor: int, payload: bytes) -> None:
        """A control message to a neighbouring router, on the link to it."""
        src = self.interfaces[iface].address
        dst = self._address(neighbor)
        udp = UDPDatagram(self.control_port, self.control_port, payload).to_wire(src, dst)
        self.send(iface, make_packet(src, dst, IPPROTO_UDP, udp, ttl=1).to_wire(), neighbor)

    def _count_masks(self, group: int, member: Member | None, sign: int) -> None:
        """Count `member`'s pairs' masks in (`sign` 1) or out (-1) of `group`'s."""
        if member is None:
            return
        counts = self._pair_masks.setdefault(group, Counter())
        for _, pair_mask in member.filter.include + member.filter.exclude:
            counts[pair_mask] += sign
            if not counts[pair_mask]:
                del counts[pair_mask]

    def _invalidate(self, group: int) -> None:
        self._mfc.pop(group, None)
        mask = 0
        for pair_mask in self._pair_masks.get(group, ()):
            mask |= pair_mask
        self._cell_masks[group] = mask
        union = 0
        for group_mask in self._cell_masks.values():
            union |= group_mask
        self.fast_path.invalidate(union)
        self.effects.append(GroupChanged(group))

    def _arm_expiry(self) -> None:
        expiries = [m.expires for members in self.members.values() for m in members.values()]
        expiries += [t for senders in self.senders.values() for t in senders.values()]
        soonest = min(expiries, default=None)
        if soonest is None:
            self.timers.cancel("expire")
        else:
            self.timers.arm("expire", soonest)

    def _expire(self, now: float) -> None:
        for group, senders in self.senders.items():
            lapsed = [s for s, expires in senders.items() if expires <= now]
            for sender in lapsed:
                del senders[sender]
            if lapsed:
                self._invalidate(group)  # a kernel data plane must drop their entries
        for group, members in self.members.items():
            gone = [origin for origin, m in members.items() if m.expires <= now]
            for origin in gone:
                self._count_masks(group, members.pop(origin), -1)
            if gone:
                self._invalidate(group)
        self._arm_expiry()

    def _vip_changed(self, now: float) -> None:
        """After any VIP-plane event: advertise changed bindings; make sure a sweep of
        lapsed tags, bindings and adverts is due (a sweep, not one timer per flow:
        per packet work stays constant however many flows there are)."""
        assert self.vip is not None
        self.vip.advertise(now)
        if not self.timers.armed("vip"):
            self.timers.arm("vip", now + VIP_SWEEP)

    # -- views -----------------------------------------------------------------------
    def membership(self) -> dict[str, dict[str, str]]:
        """group -> requester -> its filter, for status displays."""
        family = self._address(0).version
        return {
            str(self._address(g)): {
                str(self._address(o)): m.filter.describe(family) for o, m in members.items()
            }
            for g, members in self.members.items()
            if members
        }


def _udp_dport(packet: bytes) -> int:
    header = (packet[0] & 0x0F) * 4
    return (
        int.from_bytes(packet[header + 2 : header + 4], "big") if len(packet) >= header + 4 else -1
    )
