"""A compiled topology as data: the pool, its nodes, links, addresses, routes and scenario."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property

from manycast.addressplan import DEFAULT_PRIVATE_RANGES
from manycast.policy import PolicyName
from manycast.protocol.node import Interface
from manycast.protocol.tcp.config import CLIENT_REQUEST_TIMEOUT_S
from manycast.protocol.technique import Technique
from manycast.space import AddressSpace
from manycast.steps import Step
from manycast.topology.addressing import assign_endpoints
from manycast.topology.coordination import Coordination
from manycast.topology.links import LinkSpec
from manycast.wire.ip import Address, Network


class Approach(StrEnum):
    """How clients reach the pool's servers: the `[pool] approach` key."""

    MANYCAST = "manycast"  # a multicast group; servers' masked joins split the clients (Fig 9-16)
    VIP = "vip"  # a unicast VIP; VIP routers tag each new flow onto a server's tree (Fig 17-19)


@dataclass(frozen=True)
class PoolSpec:
    """The `[pool]` table: the service's address, its address space, policy and technique.

    `group` is the address clients send to: the multicast group of a manycast pool,
    and in a VIP pool the `vip` itself, so code that reads `pool.group` as "the service
    address" works for both approaches. `control_group` is the servers' coordination
    channel in both."""

    name: str
    group: Address
    port: int
    control_group: Address
    control_port: int
    space: AddressSpace
    policy: PolicyName
    portions: int
    technique: Technique
    close_after_transaction: bool
    heartbeat_s: float
    heartbeat_misses: int
    report_interval_s: float
    private: bool
    key_file: str | None = None
    dns: tuple[str, int] | None = None  # a DNS server holding the pool's records
    # the private part of the multicast space (Fig 2), both families
    private_ranges: str = DEFAULT_PRIVATE_RANGES
    public_key: bytes | None = None  # a configured key (a certification authority's word)
    rebalance_above: float = 0.0
    # A private pool's clients sign their registration as senders this often; routers
    # keep a sender 3.5 times the longer of this and the report interval.
    register_interval_s: float = 10.0
    rebalance_target: float = 1.1
    rebalance_hold_s: float = 3.0
    # seconds a configured server not yet heard from counts alive while the pool starts
    startup_grace: float = 1.0
    approach: Approach = Approach.MANYCAST
    vip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None  # set exactly when VIP
    # technique D: a server whose load is above this times the pool's mean passes new
    # connections to a less loaded server (Fig 20); 0: never
    redirect_above: float = 0.0
    # how the servers agree: the control channel, or etcd (its client URLs; each
    # server's lease in seconds)
    coordination: Coordination = Coordination.CHANNEL
    etcd: tuple[str, ...] = ()
    lease_s: int = 2
    # how the servers find out who is alive: "heartbeat" or "swim"
    membership: str = "heartbeat"
    # A dual-stack pool (`space` and `group` list one of each family): the IPv6 group
    # and space beside `group` and `space` (IPv4), one allocation over both.
    group6: ipaddress.IPv6Address | None = None
    space6: AddressSpace | None = None

    @property
    def dual(self) -> bool:
        """Whether the pool serves IPv4 and IPv6 clients at once."""
        return self.space6 is not None

    @property
    def families(self) -> tuple[int, ...]:
        return (4, 6) if self.dual else (self.space.family,)

    def group_of(self, version: int) -> Address:
        """The group clients of IP `version` send to."""
        if version == 6 and self.group6 is not None:
            return self.group6
        return self.group


@dataclass(frozen=True)
class RouterSpec:
    name: str


@dataclass(frozen=True)
class ServerSpec:
    name: str
    router: str
    weight: float
    standby: bool
    authorized: bool = True  # holds the private pool's key (false: an outsider)
    etcd: tuple[str, ...] = ()  # the etcd members this server talks to (default: the pool's)


@dataclass(frozen=True)
class VipRouterSpec:
    """A VIP router: a node on its own point-to-point link to `router`, addressed and
    routed like a server."""

    name: str
    router: str


@dataclass(frozen=True)
class ClientSpec:
    name: str
    group: str  # the [[clients]] table it came from
    router: str
    rate: float
    authorized: bool = True
    # short connections: a new one (a new flow) after this many answers; 0: one for good
    requests_per_connection: int = 0
    # offers tag and cookie on its SYNs and follows destinations (Fig 20-21); false: a
    # client without the extension, which stays on the group address
    dynamic_destination: bool = True
    # an interactive client's retransmissions keep their interval for a few timeouts
    # (Linux's tcp_thin_linear_timeouts) instead of doubling it
    thin_stream: bool = False
    # a latency-sensitive client's cap on its retransmission timeout (Linux's
    # TCP_RTO_MAX_MS), and how many timeouts it lives through (tcp_retries2); None:
    # the transport's defaults
    rto_max: float | None = None
    max_retries: int | None = None
    # a request unanswered this long (s) has failed; the connection is given up when
    # its oldest request has waited `abandon_after` (None: at the deadline)
    request_timeout: float = CLIENT_REQUEST_TIMEOUT_S
    abandon_after: float | None = None


@dataclass(frozen=True)
class Route:
    network: Network
    iface: str
    next_hop: Address | None  # None: the destination is on the link


@dataclass
class Topology:
    """A checked and compiled topology."""

    source: str
    pool: PoolSpec
    routers: dict[str, RouterSpec]
    servers: dict[str, ServerSpec]
    clients: dict[str, ClientSpec]
    links: dict[str, LinkSpec]
    interfaces: dict[str, dict[str, Interface]]
    routes: dict[str, list[Route]]
    gateways: dict[str, tuple[str, Address]]
    router_ifaces: dict[str, set[str]]
    scenario: list[Step]
    duration: float
    hosts: dict[str, str] = field(default_factory=dict)
    # The kernel lab runs live TCP connections (a download per client) that `move` and
    # `drain` steps move (`[run] tcp_moves`, or any `move` step).
    tcp_moves: bool = False
    vip_routers: dict[str, VipRouterSpec] = field(default_factory=dict)
    # router -> router -> router-to-router hops on the routed (shortest-delay) path
    router_hops: dict[str, dict[str, int]] = field(default_factory=dict)
    # router -> router -> the routing metric (summed link delay, seconds) between them
    router_costs: dict[str, dict[str, float]] = field(default_factory=dict)
    # a dual-stack host's IPv6 router address on its (one) link
    gateways6: dict[str, Address] = field(default_factory=dict)

    def kind(self, node: str) -> str:
        if node in self.routers:
            return "router"
        if node in self.servers:
            return "server"
        if node in self.vip_routers:
            return "vip_router"
        if node in self.clients:
            return "client"
        raise KeyError(node)

    def router_of(self, node: str) -> str:
        """The router `node` is attached to (a router: itself)."""
        if node in self.routers:
            return node
        spec = self.servers.get(node) or self.vip_routers.get(node) or self.clients.get(node)
        if spec is None:
            raise KeyError(node)
        return spec.router

    def hops(self, router: str, node: str) -> int:
        """Router-to-router hops from `router` to the router `node` is attached to,
        along the routed path (0: the same router)."""
        if router not in self.routers:
            raise KeyError(router)
        return self.router_hops[router][self.router_of(node)]

    def distance(self, router: str, node: str) -> float:
        """The routing metric from `router` to `node` itself: the routed path's delay to
        the router `node` hangs off, plus `node`'s own link. Choosing the nearest of
        several nodes by it never loops: every router on the way chooses the same."""
        if router not in self.routers:
            raise KeyError(router)
        attached = self.router_of(node)
        cost = self.router_costs[router][attached]
        if node == attached:
            return cost
        link = next(
            spec
            for spec in self.links.values()
            if {m.node for m in spec.members} >= {node, attached}
        )
        return cost + link.delay

    def edge_router(self, address: Address) -> str | None:
        """The router whose directly attached non-router link (a client LAN, a server's
        or VIP router's link) holds `address`; None when no such link does."""
        for network, router in self._edge_networks:
            if address in network:
                return router
        return None

    @cached_property
    def _edge_networks(self) -> list[tuple[Network, str]]:
        """(network, router) of every link with a non-router member, longest prefix first."""
        found: list[tuple[Network, str]] = []
        for link in self.links.values():
            if all(m.node in self.routers for m in link.members):
                continue
            for m in link.members:
                if m.node in self.routers:
                    iface = self.interfaces[m.node][m.iface]
                    found.append((iface.network, m.node))
                    if iface.network6 is not None:
                        found.append((iface.network6, m.node))
        return sorted(found, key=lambda item: -item[0].prefixlen)

    @property
    def attachment_count(self) -> int:
        """How many (node, interface) pairs there are: the overlay's UDP endpoints."""
        return sum(len(ifaces) for ifaces in self.interfaces.values())

    def router_neighbors(self, router: str, version: int = 0) -> dict[str, tuple[int, ...]]:
        """For each router-facing interface of `router`, the neighbour routers'
        addresses (`version` 6 in a dual-stack topology: their IPv6 addresses)."""
        out: dict[str, tuple[int, ...]] = {}
        for iface in sorted(self.router_ifaces[router]):
            link = self.links[self.interfaces[router][iface].link]
            out[iface] = tuple(
                m.address6 if version == 6 and m.address6 is not None else m.address
                for m in link.members
                if m.node != router
            )
        return out

    def address(self, node: str) -> Address:
        """A node's first interface address (its id on the network)."""
        return next(iter(self.interfaces[node].values())).address

    def endpoints(self, base_port: int = 47000) -> dict[tuple[str, str], tuple[str, int]]:
        """Overlay UDP endpoints: one port per (node, interface), in a fixed order so
        every process that loads this file agrees."""
        return assign_endpoints(self.links.values(), base_port, self.hosts)
