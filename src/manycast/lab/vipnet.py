"""A VIP pool's data plane built into the lab's namespaces (see `drivers/kernel/srv6.py`).

After `namespaces.build_network`: IPv6 beside IPv4 on every router link and VIP
router link, every server's segment routed toward the router it hangs off and
decapsulated there (End.DX4), per server a table that puts a marked flow on its
segment, the rule that carries a flow's conntrack mark onto its packets, the VIP
on every server's loopback, a blackhole for it at the VIP routers, and at every
router the VIP routed toward the nearest VIP router (the router daemons keep
this route on the nearest live one).

On an IPv6 network the links' own addresses carry the segments (nothing is
added to them), and the last hop is End.DX6.

A dual-stack VIP pool has both planes, side by side: each server has a segment
for its IPv4 tree (End.DX4 to its IPv4 address, for the IPv4 VIP's flows) and one
for its IPv6 tree (End.DX6 to its IPv6 address, for the IPv6 VIP's), both routed
over the links' own IPv6 addresses; a server's table holds its route for each
VIP, and each family has its rule and its nftables table. Every server has both
VIPs on its loopback, every VIP router a blackhole for each.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from manycast.drivers import netns
from manycast.drivers.kernel import srv6
from manycast.drivers.kernel.srv6 import address_of
from manycast.errors import LabError
from manycast.topology import Topology

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def next_hop(topology: Topology, router: str, address: Address) -> tuple[str, str]:
    """(interface, next hop) from `router` toward `address` by the topology's routes;
    the next hop is `address` itself when it is on one of `router`'s links."""
    for route in topology.routes.get(router, ()):
        if address in route.network:
            return route.iface, str(route.next_hop or address)
    raise LabError(f"{router} has no route to {address}")


def nearest_vip_router(topology: Topology, router: str) -> str | None:
    return min(
        topology.vip_routers,
        key=lambda name: (topology.distance(router, name), int(topology.address(name))),
        default=None,
    )


def _router_v6(topology: Topology, node: str) -> list[tuple[str, ipaddress.IPv4Interface]]:
    """`node`'s interfaces on links between routers and VIP routers (IPv6 goes there);
    none on an IPv6 or dual-stack network, whose links have it already."""
    if topology.pool.space.family == 6 or topology.pool.dual:
        return []
    carriers = set(topology.routers) | set(topology.vip_routers)
    found = []
    for iface in topology.interfaces[node].values():
        link = topology.links[iface.link]
        if all(m.node in carriers for m in link.members):
            v4 = ipaddress.IPv4Interface(f"{iface.address}/{iface.network.prefixlen}")
            found.append((iface.name, v4))
    return found


def _v6_hop(hop: str) -> str:
    """A next hop's IPv6 address: its own, or an IPv4 link's mirror (`srv6.v6_of`)."""
    address = ipaddress.ip_address(hop)
    return hop if address.version == 6 else str(srv6.v6_of(ipaddress.IPv4Address(hop)))


def vips_of(topology: Topology) -> list[Address]:
    """The pool's VIPs: one, or a dual-stack pool's of each family."""
    pool = topology.pool
    if pool.vip is None:
        raise LabError("build_vip_plane needs a VIP pool")
    return [pool.vip] if pool.group6 is None else [pool.vip, pool.group6]


def build_vip_plane(topology: Topology, ns: Callable[[str], str]) -> None:
    vips = vips_of(topology)
    marks = srv6.server_marks(topology.servers)
    # Where the segments go: a dual-stack network routes them by the IPv6 routes.
    carrier = 6 if topology.pool.dual else topology.pool.space.family
    for router in topology.routers:

        def setup(ipr: Any, router: str = router) -> None:
            for ifname, link_address in _router_v6(topology, router):
                srv6.add_v6_address(ipr, ifname, link_address)
            for vip in vips:
                for name in topology.servers:
                    address = address_of(topology, name, vip.version)
                    sid = srv6.sid_of(address, marks[name])
                    ifname, _ = next_hop(topology, router, address)
                    attached = topology.servers[name].router == router
                    if attached:
                        srv6.sid_end_dx(ipr, sid, ifname, address)
                    else:
                        hop = next_hop(topology, router, address_of(topology, name, carrier))[1]
                        srv6.sid_route(ipr, sid, 128, _v6_hop(hop))
                    srv6.server_table(
                        ipr, vip, marks[name], sid, ifname, str(address) if attached else None
                    )
                nearest = nearest_vip_router(topology, router)
                via = None
                if nearest is not None:
                    via = next_hop(topology, router, address_of(topology, nearest, vip.version))[1]
                srv6.vip_route(ipr, vip, via)

        netns.sysctl(
            ns(router),
            {"net.ipv6.conf.all.forwarding": "1", "net.ipv6.conf.default.forwarding": "1"},
        )
        netns.configure(ns(router), setup)
        for vip in vips:
            srv6.load_nft(lambda router=router: netns.enter(ns(router)), srv6.nft_ruleset(vip))
        # Conntrack (loaded by the rule) ends an established flow's entry, and so its
        # tag, after the VIP routers' flow idle time instead of its default 5 days.
        netns.sysctl(ns(router), {srv6.CT_ESTABLISHED: str(srv6.FLOW_IDLE_S)})
    for name in topology.vip_routers:

        def setup_vip_router(ipr: Any, name: str = name) -> None:
            for ifname, address in _router_v6(topology, name):
                srv6.add_v6_address(ipr, ifname, address)
            gateway = str(topology.gateways6.get(name) or topology.gateways[name][1])
            srv6.sid_route(
                ipr, srv6.SID_PREFIX.network_address, srv6.SID_PREFIX.prefixlen, _v6_hop(gateway)
            )
            for vip in vips:
                srv6.blackhole(ipr, vip)

        netns.configure(ns(name), setup_vip_router)
    for name in topology.servers:

        def setup_server(ipr: Any) -> None:
            for vip in vips:
                srv6.vip_on_loopback(ipr, vip)

        netns.configure(ns(name), setup_server)
