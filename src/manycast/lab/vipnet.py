"""A VIP pool's data plane built into the lab's namespaces (see `drivers/kernel/srv6.py`).

After `namespaces.build_network`: IPv6 beside IPv4 on every router link and VIP
router link, every server's segment routed toward the router it hangs off and
decapsulated there (End.DX4), per server a table that puts a marked flow on its
segment, the rule that carries a flow's conntrack mark onto its packets, the VIP
on every server's loopback, a blackhole for it at the VIP routers, and at every
router the VIP routed toward the nearest VIP router (the router daemons keep
this route on the nearest live one).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from manycast.drivers import netns
from manycast.drivers.kernel import srv6
from manycast.errors import LabError
from manycast.protocol.node import ipv4_only
from manycast.topology import Topology


def next_hop(topology: Topology, router: str, address: ipaddress.IPv4Address) -> tuple[str, str]:
    """(interface, IPv4 next hop) from `router` toward `address` by the topology's routes;
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
    """`node`'s interfaces on links between routers and VIP routers (IPv6 goes there)."""
    carriers = set(topology.routers) | set(topology.vip_routers)
    found = []
    for iface in topology.interfaces[node].values():
        link = topology.links[iface.link]
        if all(m.node in carriers for m in link.members):
            v4 = ipaddress.IPv4Interface(f"{iface.address}/{iface.network.prefixlen}")
            found.append((iface.name, v4))
    return found


def build_vip_plane(topology: Topology, ns: Callable[[str], str]) -> None:
    if topology.pool.vip is None:
        raise LabError("build_vip_plane needs a VIP pool")
    vip = ipv4_only(topology.pool.vip, "a VIP pool in the kernel lab")
    marks = srv6.server_marks(topology.servers)
    servers = {
        name: ipv4_only(topology.address(name), "the kernel lab") for name in topology.servers
    }
    for router in topology.routers:

        def setup(ipr: Any, router: str = router) -> None:
            for ifname, link_address in _router_v6(topology, router):
                srv6.add_v6_address(ipr, ifname, link_address)
            for name, address in servers.items():
                sid = srv6.sid_of(address)
                ifname, hop = next_hop(topology, router, address)
                attached = topology.servers[name].router == router
                if attached:
                    srv6.sid_end_dx4(ipr, sid, ifname, str(address))
                else:
                    hop6 = str(srv6.v6_of(ipaddress.IPv4Address(hop)))
                    srv6.sid_route(ipr, sid, 128, hop6)
                srv6.server_table(
                    ipr, vip, marks[name], sid, ifname, str(address) if attached else None
                )
            nearest = nearest_vip_router(topology, router)
            if nearest is None:
                srv6.vip_route(ipr, vip, None)
            else:
                address = ipv4_only(topology.address(nearest), "the kernel lab")
                srv6.vip_route(ipr, vip, next_hop(topology, router, address)[1])

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
            gateway = ipv4_only(topology.gateways[name][1], "the kernel lab")
            srv6.sid_route(
                ipr,
                srv6.SID_PREFIX.network_address,
                srv6.SID_PREFIX.prefixlen,
                str(srv6.v6_of(gateway)),
            )
            srv6.blackhole(ipr, vip)

        netns.configure(ns(name), setup_vip_router)
    for name in topology.servers:
        netns.configure(ns(name), lambda ipr: srv6.vip_on_loopback(ipr, vip))
