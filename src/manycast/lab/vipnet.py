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
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from manycast.drivers import netns
from manycast.drivers.kernel import srv6
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
    none on an IPv6 network, whose links have it already."""
    if topology.pool.space.family == 6:
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


def build_vip_plane(topology: Topology, ns: Callable[[str], str]) -> None:
    vip = topology.pool.vip
    if vip is None:
        raise LabError("build_vip_plane needs a VIP pool")
    marks = srv6.server_marks(topology.servers)
    servers = {name: topology.address(name) for name in topology.servers}
    for router in topology.routers:

        def setup(ipr: Any, router: str = router) -> None:
            for ifname, link_address in _router_v6(topology, router):
                srv6.add_v6_address(ipr, ifname, link_address)
            for name, address in servers.items():
                sid = srv6.sid_of(address, marks[name])
                ifname, hop = next_hop(topology, router, address)
                attached = topology.servers[name].router == router
                if attached:
                    srv6.sid_end_dx(ipr, sid, ifname, address)
                else:
                    srv6.sid_route(ipr, sid, 128, _v6_hop(hop))
                srv6.server_table(
                    ipr, vip, marks[name], sid, ifname, str(address) if attached else None
                )
            nearest = nearest_vip_router(topology, router)
            if nearest is None:
                srv6.vip_route(ipr, vip, None)
            else:
                srv6.vip_route(ipr, vip, next_hop(topology, router, topology.address(nearest))[1])

        netns.sysctl(
            ns(router),
            {"net.ipv6.conf.all.forwarding": "1", "net.ipv6.conf.default.forwarding": "1"},
        )
        netns.configure(ns(router), setup)
        srv6.load_nft(lambda router=router: netns.enter(ns(router)), srv6.nft_ruleset(vip))
        # Conntrack (loaded by the rule) ends an established flow's entry, and so its
        # tag, after the VIP routers' flow idle time instead of its default 5 days.
        netns.sysctl(ns(router), {srv6.CT_ESTABLISHED: str(srv6.FLOW_IDLE_S)})
    for name in topology.vip_routers:

        def setup_vip_router(ipr: Any, name: str = name) -> None:
            for ifname, address in _router_v6(topology, name):
                srv6.add_v6_address(ipr, ifname, address)
            gateway = str(topology.gateways[name][1])
            srv6.sid_route(
                ipr, srv6.SID_PREFIX.network_address, srv6.SID_PREFIX.prefixlen, _v6_hop(gateway)
            )
            srv6.blackhole(ipr, vip)

        netns.configure(ns(name), setup_vip_router)
    for name in topology.servers:
        netns.configure(ns(name), lambda ipr: srv6.vip_on_loopback(ipr, vip))
