"""A compiled topology as data: the pool, its nodes, links, addresses, routes and scenario."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from manycast.policy import PolicyName
from manycast.protocol.node import Interface
from manycast.protocol.technique import Technique
from manycast.space import AddressSpace
from manycast.steps import Step
from manycast.topology.addressing import assign_endpoints
from manycast.topology.links import LinkSpec


@dataclass(frozen=True)
class PoolSpec:
    """The `[pool]` table: the service's group, its address space, policy and technique."""

    name: str
    group: ipaddress.IPv4Address
    port: int
    control_group: ipaddress.IPv4Address
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
    private_ranges: str = "232.0.0.0/5"  # the private part of the multicast space (Fig 2)
    public_key: bytes | None = None  # a configured key (a certification authority's word)
    rebalance_above: float = 0.0
    rebalance_target: float = 1.1
    rebalance_hold_s: float = 3.0


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


@dataclass(frozen=True)
class ClientSpec:
    name: str
    group: str  # the [[clients]] table it came from
    router: str
    rate: float
    authorized: bool = True


@dataclass(frozen=True)
class Route:
    network: ipaddress.IPv4Network
    iface: str
    next_hop: ipaddress.IPv4Address | None  # None: the destination is on the link


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
    gateways: dict[str, tuple[str, ipaddress.IPv4Address]]
    router_ifaces: dict[str, set[str]]
    scenario: list[Step]
    duration: float
    hosts: dict[str, str] = field(default_factory=dict)

    def kind(self, node: str) -> str:
        if node in self.routers:
            return "router"
        if node in self.servers:
            return "server"
        if node in self.clients:
            return "client"
        raise KeyError(node)

    @property
    def attachment_count(self) -> int:
        """How many (node, interface) pairs there are: the overlay's UDP endpoints."""
        return sum(len(ifaces) for ifaces in self.interfaces.values())

    def router_neighbors(self, router: str) -> dict[str, tuple[int, ...]]:
        """For each router-facing interface of `router`, the neighbour routers' addresses."""
        out: dict[str, tuple[int, ...]] = {}
        for iface in sorted(self.router_ifaces[router]):
            link = self.links[self.interfaces[router][iface].link]
            out[iface] = tuple(m.address for m in link.members if m.node != router)
        return out

    def address(self, node: str) -> ipaddress.IPv4Address:
        """A node's first interface address (its id on the network)."""
        return next(iter(self.interfaces[node].values())).address

    def endpoints(self, base_port: int = 47000) -> dict[tuple[str, str], tuple[str, int]]:
        """Overlay UDP endpoints: one port per (node, interface), in a fixed order so
        every process that loads this file agrees."""
        return assign_endpoints(self.links.values(), base_port, self.hosts)
