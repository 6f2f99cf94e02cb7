"""Membership queries: a router that starts knowing nothing learns its members at once.

A router keeps no membership across a restart: it comes back with no member, no
forwarding entry and no key, and without help it would learn each member only from
its next periodic report (every report interval, 1 s by default), while every
packet to the group meets an empty membership. Multicast routers solve this with
the General Query (RFC 3376 §6.1, §8.6-8.7): a querier that starts sends Startup
Query Count General Queries, Startup Query Interval apart, and every member answers
with its current-state report within the query's Max Resp Time.

Here membership also travels between routers (a member's report is relayed, signed,
to every router), so a restarted router must hear the members behind its
neighbours too. A router that gets a General Query from a neighbour router passes
it on: as its own query on its other links (its members answer, and their reports
are relayed back as usual) and unchanged, source kept, to its other neighbour
routers. It takes a query only on the interface its route toward the query's
source uses (the reverse-path check of DVMRP and PIM flooding), so each router
takes a query once however the routers are meshed, and passes on at most one query per
source every RELAY_GAP seconds, so a flood of queries costs little. Queries from
hosts are not taken.

Two startup queries are enough on a clean link, not on a lossy one: an answer is
a report of several parts, relayed across the routers, and a member is learned
only once every part of one report has come (`reassembly.py`). Under a loss burst
of a quarter of the packets (the soak, docs/soak.md finding 15) a restarted router
learned some members only from their periodic reports, a second or more later,
and dropped their clients' packets meanwhile. So a starting router that is still
dropping packets for want of a member after its startup queries keeps asking,
one query each Startup Query Interval, up to STARTUP_QUERIES_MAX in all: it stops
at the first interval in which no packet found no member. Until then the router
is `starting`, and sends every packet from its own hosts to its neighbour
routers as well (`router.py`).

A member (`QueryResponder`, RFC 3376 §5.2) answers a General Query with its current
report after a random delay within the Max Resp Time, so members do not all answer
in one instant; a query while an answer is pending changes nothing, and answers are
at least MIN_ANSWER_GAP apart.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from manycast.protocol.node import Interface, Timers
from manycast.wire.errors import WireError
from manycast.wire.ip import (
    IPPROTO_ICMPV6,
    IPPROTO_IGMP,
    Address,
    HopByHop,
    InnerPacket,
    IPv6Packet,
    parse_packet,
)
from manycast.wire.membership_query import (
    ALL_NODES,
    ALL_SYSTEMS,
    MLD_QUERY,
    IGMPv3Query,
    MLDv2Query,
    igmp_query_packet,
    mld_value_code,
    value_code,
)

STARTUP_QUERIES = 2  # RFC 3376 §8.7: the Robustness Variable's default
STARTUP_QUERY_INTERVAL = 0.25  # §8.6: a quarter of the query interval (here the report interval)
STARTUP_QUERIES_MAX = 12  # while packets still find no member: 3 s of asking at most
QUERY_RESPONSE_S = 0.1  # the Max Resp Time we ask for: a tenth of the report interval
RELAY_GAP = 0.2  # seconds: at most one query per source passed on in this time
MIN_ANSWER_GAP = 0.1  # seconds between a member's answers to queries
_SOURCES_KEPT = 1024  # query sources remembered for RELAY_GAP (a flood forgets them all)

Send = Callable[[str, bytes, int | None], None]  # Node.send: interface, packet, next hop
Route = Callable[[int], tuple[str, int] | None]


@dataclass
class QuerierStats:
    queries_sent: int = 0  # one per interface
    queries_relayed: int = 0  # queries passed on, one per interface
    queries_refused: int = 0  # malformed, from a host, off the reverse path, too soon


class Querier:
    """A router's General Queries: its own at start, and its neighbours' passed on."""

    def __init__(
        self,
        interfaces: Mapping[str, Interface],
        router_ifaces: set[str],
        send: Send,
        route: Route,
        timers: Timers,
    ) -> None:
        """`send`, `route` and `timers` are the router's; the next startup query is
        its timer "query"."""
        self._interfaces = interfaces
        self._router_ifaces = router_ifaces
        self._send = send
        self._route = route
        self._timers = timers
        self._own = {i.address_int for i in interfaces.values()}
        self._sent = 0  # startup queries sent
        self.starting = False  # between the first startup query and the end of asking
        self._unplaced = 0  # packets dropped for want of a member, at the last one
        self._relayed: dict[int, float] = {}  # query source -> when we last passed one on
        self.query = IGMPv3Query(max_resp_code=value_code(round(QUERY_RESPONSE_S * 10)))
        self.query6 = MLDv2Query(max_resp_code=mld_value_code(round(QUERY_RESPONSE_S * 1000)))
        self.stats = QuerierStats()

    def startup(self, now: float, unplaced: int = 0) -> None:
        """Send the next startup General Query on every interface, if one is due (the
        router calls this as it starts, then when its timer "query" fires);
        `unplaced`: the group packets it has dropped so far for want of a member."""
        if self._sent >= STARTUP_QUERIES and (
            unplaced <= self._unplaced or self._sent >= STARTUP_QUERIES_MAX
        ):
            self.starting = False
            return
        self.starting = True
        self._sent += 1
        self._unplaced = unplaced
        for iface in sorted(self._interfaces):
            self._query_on(iface)
        self._timers.arm("query", now + STARTUP_QUERY_INTERVAL)

    def on_query(self, iface: str, packet: bytes, now: float) -> None:
        """A query arrived on `iface`: pass a neighbour router's General Query on."""
        try:
            ip = parse_packet(packet)
            query = _query_of(ip)
        except WireError:
            self.stats.queries_refused += 1
            return
        source = int(ip.header.src)
        toward = self._route(source)
        if (
            not query.general
            or iface not in self._router_ifaces
            or source in self._own
            or toward is None
            or toward[0] != iface
            or now - self._relayed.get(source, -RELAY_GAP) < RELAY_GAP
        ):
            self.stats.queries_refused += 1
            return
        if len(self._relayed) >= _SOURCES_KEPT:
            self._relayed.clear()
        self._relayed[source] = now
        for out in sorted(set(self._interfaces) - {iface}):
            if out in self._router_ifaces:
                self._send(out, _query_packet(query, ip.header.src), None)
                self.stats.queries_relayed += 1
            else:
                self._query_on(out)

    def _query_on(self, iface: str) -> None:
        address = self._interfaces[iface].address
        query = self.query6 if address.version == 6 else self.query
        self._send(iface, _query_packet(query, address), None)
        self.stats.queries_sent += 1


def is_query(ip: InnerPacket) -> bool:
    """Whether `ip` is a membership query to every host (IGMP to 224.0.0.1, MLD to
    ff02::1) for a member's `QueryResponder`."""
    if ip.protocol == IPPROTO_IGMP:
        return ip.header.dst == ALL_SYSTEMS
    return (
        ip.protocol == IPPROTO_ICMPV6
        and ip.header.dst == ALL_NODES
        and ip.payload[:1] == bytes((MLD_QUERY,))
    )


def _query_of(ip: InnerPacket) -> IGMPv3Query | MLDv2Query:
    """The IGMPv3 or MLDv2 query `ip` carries; WireError if it carries neither."""
    if isinstance(ip, IPv6Packet):
        if ip.protocol != IPPROTO_ICMPV6:
            raise WireError("MLDv2 query: not an ICMPv6 message")
        return MLDv2Query.from_wire(ip.payload, ip.header.src, ip.header.dst)
    return IGMPv3Query.from_wire(ip.payload)


def _query_packet(query: IGMPv3Query | MLDv2Query, src: Address) -> bytes:
    """A General Query from `src` to every host on the link. An MLDv2 query goes out
    from the router's interface address: the memory and overlay links carry no
    link-local addresses (RFC 3810 §5.1.14 asks for one; the kernel lab will)."""
    if isinstance(query, IGMPv3Query) and isinstance(src, IPv4Address):
        return igmp_query_packet(query, src).to_wire()
    if not (isinstance(query, MLDv2Query) and isinstance(src, IPv6Address)):
        raise ValueError(f"a query from {src} must be of its family")
    packet = IPv6Packet.make(
        src,
        ALL_NODES,
        IPPROTO_ICMPV6,
        query.to_wire(src, ALL_NODES),
        hop_limit=1,
        hop_by_hop=HopByHop.with_router_alert(IPPROTO_ICMPV6),
    )
    return packet.to_wire()


class QueryResponder:
    """A member's side: when to answer a General Query with its current report."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.pending: float | None = None  # when the answer goes out
        self._answered = float("-inf")
        self.queries = 0  # General Queries taken
        self.refused = 0  # malformed or not general

    def on_query(self, ip: InnerPacket, now: float) -> float | None:
        """A query arrived: the time to answer it, or None (nothing new to do)."""
        try:
            query = _query_of(ip)
        except WireError:
            self.refused += 1
            return None
        if not query.general:
            self.refused += 1  # we answer General Queries only (routers send no other)
            return None
        self.queries += 1
        if self.pending is not None:
            return None
        delay = self.rng.uniform(0.0, query.max_response)
        self.pending = max(now + delay, self._answered + MIN_ANSWER_GAP)
        return self.pending

    def reported(self, now: float) -> None:
        """A current-state report went out (an answer or the periodic one)."""
        self._answered = now
        self.pending = None
