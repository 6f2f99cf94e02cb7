"""The manycast router: masked source-specific membership and forwarding.

Membership: each member's join (a server's IGMPv3 report with mask TLVs) sets
its filter for a group (see `membership.py`). A join is accepted only on the
interface the router's route toward the requester uses (for a first-hop
router, the requester's own link), which also keeps joins from looping. An
accepted join is relayed, unchanged, out of every other router-facing
interface, so the routers upstream learn the member too; relaying the member's
own report instead of an aggregate keeps its signature checkable at every hop.

Forwarding: a multicast packet from source S to group G goes to the neighbour
toward every member whose filter matches S, so a client's packets reach only
the server that serves it. The outgoing set is computed on the first packet of
(S, G) and cached, like a kernel multicast forwarding entry, until membership
of G changes. Unicast follows the routes computed from the topology.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from manycast.protocol.membership import SourceFilter, changes
from manycast.protocol.node import Interface, Node
from manycast.wire.errors import WireError
from manycast.wire.ip import IPPROTO_IGMP, ROUTER_ALERT_V4, IPv4Packet, decrement_ttl_v4, peek_v4
from manycast.wire.membership import IGMP_V3_ROUTERS, IGMPv3Report

MULTICAST_LOW, MULTICAST_HIGH = 0xE0000000, 0xEFFFFFFF
_LINK_LOCAL_MASK, _LINK_LOCAL = 0xFFFFFF00, 0xE0000000
_ALL_V3_ROUTERS = int(IGMP_V3_ROUTERS)
_MFC_LIMIT = 1 << 16

# An admission check: (report, arrival interface, now) -> None to admit, or the reason to refuse.
Admission = Callable[[IGMPv3Report, str, float], str | None]


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
    rejected: Counter[str] = field(default_factory=Counter)
    local: int = 0


class Router(Node):
    def __init__(
        self,
        name: str,
        interfaces: dict[str, Interface],
        routes: Iterable[tuple[ipaddress.IPv4Network, str, ipaddress.IPv4Address | None]],
        router_ifaces: Iterable[str],
        *,
        hold_time: float = 3.5,
        admission: Admission | None = None,
    ) -> None:
        super().__init__(name, interfaces)
        self.hold_time = hold_time
        self.admission = admission
        self.router_ifaces = set(router_ifaces)
        self.stats = RouterStats()
        self.members: dict[int, dict[int, Member]] = {}  # group -> origin -> member
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
        # group -> source -> outgoing (interface, neighbour) pairs: the forwarding cache
        self._mfc: dict[int, dict[int, tuple[tuple[str, int], ...]]] = {}

    # -- node interface ----------------------------------------------------------
    def start(self, now: float) -> None:
        pass

    def on_timer(self, now: float) -> None:
        if self.timers.expired(now):
            self._expire(now)

    def receive(self, iface: str, packet: bytes, now: float) -> None:
        try:
            src, dst, proto, ttl = peek_v4(packet)
        except WireError:
            self.stats.malformed += 1
            return
        if MULTICAST_LOW <= dst <= MULTICAST_HIGH:
            if dst & _LINK_LOCAL_MASK == _LINK_LOCAL:
                if dst == _ALL_V3_ROUTERS and proto == IPPROTO_IGMP:
                    self._on_report(iface, packet, now)
                return
            self._forward_multicast(iface, src, dst, packet, ttl)
        elif dst in self._own:
            self.stats.local += 1
        else:
            self._forward_unicast(dst, packet, ttl)

    # -- forwarding ----------------------------------------------------------------
    def _forward_multicast(self, iface: str, src: int, group: int, packet: bytes, ttl: int) -> None:
        cache = self._mfc.get(group)
        if cache is None:
            cache = self._mfc[group] = {}
        outs = cache.get(src)
        if outs is None:
            outs = self.resolve(src, group)
            if len(cache) >= _MFC_LIMIT:
                cache.clear()
            cache[src] = outs
        if not outs:
            self.stats.no_member += 1
            return
        if ttl <= 1:
            self.stats.ttl_expired += 1
            return
        forwarded = decrement_ttl_v4(packet)
        for out_iface, neighbor in outs:
            if out_iface != iface:
                self.send(out_iface, forwarded, neighbor)
                self.stats.multicast_forwarded += 1

    def resolve(self, src: int, group: int) -> tuple[tuple[str, int], ...]:
        """The (interface, neighbour) pairs toward every member of `group` matching `src`."""
        outs: dict[tuple[str, int], None] = {}
        for member in self.members.get(group, {}).values():
            if member.filter.matches(src):
                outs[(member.iface, member.neighbor)] = None
        return tuple(outs)

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
        self.send(hop[0], decrement_ttl_v4(packet), hop[1])
        self.stats.unicast_forwarded += 1

    # -- membership ----------------------------------------------------------------
    def _on_report(self, iface: str, packet: bytes, now: float) -> None:
        try:
            ip = IPv4Packet.from_wire(packet)
            report = IGMPv3Report.from_wire(ip.payload)
        except WireError:
            self.stats.malformed += 1
            self.stats.rejected["malformed"] += 1
            return
        requester = report.signed.requester if report.signed is not None else ip.header.src
        origin = int(requester)
        toward = self.route(origin)
        if toward is None or toward[0] != iface:
            self.stats.rejected["wrong link"] += 1
            return
        if self.admission is not None:
            reason = self.admission(report, iface, now)
            if reason is not None:
                self.stats.rejected[reason] += 1
                return
        self.stats.joins_accepted += 1
        neighbor = int(ip.header.src)
        for group_address, source_filter in changes(report.records):
            group = int(group_address)
            members = self.members.setdefault(group, {})
            if source_filter is None:
                members.pop(origin, None)
            else:
                members[origin] = Member(
                    origin, iface, neighbor, source_filter, now + self.hold_time
                )
            self._invalidate(group)
        self._arm_expiry()
        self._relay(iface, ip.payload)

    def _relay(self, arrived_on: str, igmp: bytes) -> None:
        for out in sorted(self.router_ifaces - {arrived_on}):
            relayed = IPv4Packet.make(
                self.interfaces[out].address,
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

    def _invalidate(self, group: int) -> None:
        self._mfc.pop(group, None)

    def _arm_expiry(self) -> None:
        soonest = min(
            (m.expires for members in self.members.values() for m in members.values()),
            default=None,
        )
        if soonest is None:
            self.timers.cancel("expire")
        else:
            self.timers.arm("expire", soonest)

    def _expire(self, now: float) -> None:
        for group, members in self.members.items():
            gone = [origin for origin, m in members.items() if m.expires <= now]
            for origin in gone:
                del members[origin]
            if gone:
                self._invalidate(group)
        self._arm_expiry()

    # -- views -----------------------------------------------------------------------
    def membership(self) -> dict[str, dict[str, str]]:
        """group -> requester -> its filter, for status displays."""
        return {
            str(ipaddress.IPv4Address(g)): {
                str(ipaddress.IPv4Address(o)): str(m.filter) for o, m in members.items()
            }
            for g, members in self.members.items()
            if members
        }
