"""Addresses for every interface, the links they make, and the overlay's endpoint map.

A topology is of its pool's family: every address IPv4, or every one IPv6.
Unless a link or LAN names its own subnet: router-to-router links get /30s from
10.255.0.0/16, each server and VIP router a /30 to its router from 10.254.0.0/16,
and each client group one LAN (its subnet given) whose first address is the router.
IPv6 takes /64s from the documentation prefix 2001:db8::/32 (RFC 3849): router
links from 2001:db8:ffff::/48, servers' links from 2001:db8:fffe::/48, and client
LANs whose subnet is left out from 2001:db8:1::/48 on (2001:db8:1::/64 the first).

A dual-stack topology (a dual-stack pool's) gives router links and servers' links
one subnet of each family (the one the file names, the other from the plan above)
and each interface on them both addresses; a client LAN is of one family, its
subnet's.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

from manycast.errors import ConfigError
from manycast.ports import DEFAULT_HOST
from manycast.protocol.node import Interface
from manycast.topology.links import Attachment, LinkSpec
from manycast.wire.ip import Address, Network

# router -> (peer router, cost, link name): the graph routing runs on
Graph = dict[str, list[tuple[str, float, str]]]
# Raises a TopologyError naming `line` (0: the whole file).
Fail = Callable[[str, int], NoReturn]
# A dual-stack link's IPv6 subnet and the addresses still to give out on it.
Six = tuple[ipaddress.IPv6Network, Iterator[Address]]

# Where automatic subnets come from, by family and kind: (pool, subnet prefix length).
_AUTOMATIC: dict[int, dict[str, tuple[Network, int]]] = {
    4: {
        "router": (ipaddress.IPv4Network("10.255.0.0/16"), 30),
        "server": (ipaddress.IPv4Network("10.254.0.0/16"), 30),
    },
    6: {
        "router": (ipaddress.IPv6Network("2001:db8:ffff::/48"), 64),
        "server": (ipaddress.IPv6Network("2001:db8:fffe::/48"), 64),
        "lan": (ipaddress.IPv6Network("2001:db8:1::/48"), 64),
    },
}
_SERVER_LINK_DELAY = 0.0005


@dataclass(frozen=True)
class RouterLink:
    """A `[[link]]` between two routers, as read."""

    a: str
    b: str
    delay: float
    loss: float
    subnet: Network | None
    line: int


@dataclass(frozen=True)
class HostLink:
    """A server's or VIP router's point-to-point link to its router, as read
    (`subnet` None: pick one)."""

    node: str
    router: str
    subnet: Network | None
    line: int


@dataclass(frozen=True)
class Lan:
    """A `[[clients]]` group's LAN: its router, subnet (None: an automatic IPv6 /64)
    and members, as read."""

    group: str
    router: str
    subnet: Network | None
    members: tuple[str, ...]
    delay: float
    loss: float
    stride: int
    line: int


@dataclass
class Wiring:
    """What address assignment produces: each node's interfaces, the links, each
    host's gateway (interface, router address; `gateways6`: a dual-stack host's IPv6
    router address), routers' router-facing interfaces."""

    interfaces: dict[str, dict[str, Interface]]
    links: dict[str, LinkSpec] = field(default_factory=dict)
    gateways: dict[str, tuple[str, Address]] = field(default_factory=dict)
    gateways6: dict[str, Address] = field(default_factory=dict)
    router_ifaces: dict[str, set[str]] = field(default_factory=dict)
    graph: Graph = field(default_factory=dict)


def assign_addresses(
    routers: Sequence[str],
    router_links: Sequence[RouterLink],
    host_links: Sequence[HostLink],
    lans: Sequence[Lan],
    fail: Fail,
    family: int = 4,
    dual: bool = False,
) -> Wiring:
    """Give every interface an address, in file order: router links, then servers and
    VIP routers (`host_links`), then client LANs; subnets named in the file are taken
    first come, checked for overlaps, and automatic ones skip whatever is already taken.
    `dual`: router and host links get an IPv6 subnet beside their IPv4 one."""
    nodes = [*routers, *(h.node for h in host_links), *(m for lan in lans for m in lan.members)]
    wiring = Wiring(
        interfaces={n: {} for n in nodes},
        router_ifaces={r: set() for r in routers},
        graph={r: [] for r in routers},
    )
    used: list[Network] = []

    def take(network: Network, line: int) -> Network:
        if network.num_addresses < 4:
            fail(f"subnet {network} is too small: a link needs at least a /30", line)
        if network.is_multicast:
            fail(f"subnet {network} is multicast: hosts need unicast addresses", line)
        for other in used:
            if network.overlaps(other):
                fail(f"subnet {network} overlaps {other}", line)
        used.append(network)
        return network

    automatic = {
        (version, kind): _subnets(pool, length)
        for version in ((4, 6) if dual else (family,))
        for kind, (pool, length) in _AUTOMATIC[version].items()
    }

    def next_free(kind: str, version: int = family) -> Network:
        for candidate in automatic[(version, kind)]:
            if not any(candidate.overlaps(u) for u in used):
                return candidate
        fail(f"ran out of automatic {kind} link subnets", 0)

    def second(given: Network | None, kind: str, line: int) -> Six | None:
        """A dual-stack link's IPv6 subnet (the named one or the plan's) and its hosts."""
        if not dual:
            return None
        network6 = take(given if given and given.version == 6 else next_free(kind, 6), line)
        assert isinstance(network6, ipaddress.IPv6Network)
        return network6, _hosts(network6)

    def first(given: Network | None, kind: str, line: int) -> Network:
        """A link's subnet of the topology's family (a dual-stack one's: IPv4)."""
        return take(given if given and given.version == family else next_free(kind), line)

    def attach(
        node: str, link: str, address: Address, network: Network, six: Six | None
    ) -> Attachment:
        iface = f"eth{len(wiring.interfaces[node])}"
        if six is not None:
            network6, hosts6 = six
            address6 = next(hosts6)
            assert isinstance(address6, ipaddress.IPv6Address)
            wiring.interfaces[node][iface] = Interface(
                iface, link, address, network, address6, network6
            )
            return Attachment(node, iface, int(address), int(address6))
        wiring.interfaces[node][iface] = Interface(iface, link, address, network)
        return Attachment(node, iface, int(address))

    links = wiring.links
    for rl in router_links:
        network = first(rl.subnet, "router", rl.line)
        six = second(rl.subnet, "router", rl.line)
        hosts_iter = _hosts(network)
        name = f"{rl.a}-{rl.b}"
        if name in links or f"{rl.b}-{rl.a}" in links:
            fail(f"routers {rl.a} and {rl.b} are linked twice", rl.line)
        att_a = attach(rl.a, name, next(hosts_iter), network, six)
        att_b = attach(rl.b, name, next(hosts_iter), network, six)
        wiring.router_ifaces[rl.a].add(att_a.iface)
        wiring.router_ifaces[rl.b].add(att_b.iface)
        links[name] = LinkSpec(name, (att_a, att_b), rl.delay, rl.loss)
        # A tiny cost per hop: among equal delays, fewer hops win.
        wiring.graph[rl.a].append((rl.b, rl.delay + 1e-6, name))
        wiring.graph[rl.b].append((rl.a, rl.delay + 1e-6, name))

    for hl in host_links:
        network = first(hl.subnet, "server", hl.line)
        six = second(hl.subnet, "server", hl.line)
        hosts_iter = _hosts(network)
        name = f"{hl.router}-{hl.node}"
        router_address = next(hosts_iter)
        att_r = attach(hl.router, name, router_address, network, six)
        att_h = attach(hl.node, name, next(hosts_iter), network, six)
        links[name] = LinkSpec(name, (att_r, att_h), _SERVER_LINK_DELAY)
        wiring.gateways[hl.node] = (att_h.iface, router_address)
        if att_r.address6 is not None:
            wiring.gateways6[hl.node] = ipaddress.IPv6Address(att_r.address6)

    for lan in lans:
        # A LAN is of one family, its subnet's (an IPv6 one may be left to the plan).
        network = take(lan.subnet or next_free("lan", 6), lan.line)
        router_address = ipaddress.ip_address(int(network.network_address) + 1)
        name = f"{lan.router}-{lan.group}"
        attachments = [attach(lan.router, name, router_address, network, None)]
        for index, member in enumerate(lan.members):
            address = ipaddress.ip_address(int(router_address) + 1 + index * lan.stride)
            attachment = attach(member, name, address, network, None)
            attachments.append(attachment)
            wiring.gateways[member] = (attachment.iface, router_address)
        links[name] = LinkSpec(name, tuple(attachments), lan.delay, lan.loss)
    return wiring


def _subnets(pool: Network, length: int) -> Iterator[Network]:
    yield from pool.subnets(new_prefix=length)


def _hosts(network: Network) -> Iterator[Address]:
    """The network's host addresses, first to last (IPv6: from ::1)."""
    yield from network.hosts()


def assign_endpoints(
    links: Iterable[LinkSpec],
    base_port: int,
    hosts: Mapping[str, str] | None = None,
    default_host: str = DEFAULT_HOST,
) -> dict[tuple[str, str], tuple[str, int]]:
    """The overlay's endpoint map, deterministic: attachments sorted by (node, iface)
    get consecutive UDP ports from `base_port`; `hosts` places nodes on other machines."""
    keys = sorted({(m.node, m.iface) for link in links for m in link.members})
    if base_port < 1 or base_port + len(keys) - 1 > 65535:
        raise ConfigError(f"ports {base_port}..{base_port + len(keys) - 1} are not all valid")
    hosts = hosts or {}
    return {key: (hosts.get(key[0], default_host), base_port + i) for i, key in enumerate(keys)}
