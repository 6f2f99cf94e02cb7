"""The lab's network: a topology built in Linux network namespaces, one per node.

A veth pair per point-to-point link, a bridge in the router's namespace for each
client LAN (multicast snooping off, so reports and the clients' multicast reach
the router as sent; the clients' ports isolated, so no client hears another's),
every address and route, and IP forwarding in the routers.
Nothing of it ever exists in the root namespace; only the host's neighbour table
limits, shared by every namespace, are raised to fit it (`neighbours.py`).

An IPv6 topology (its pool's space is IPv6) gets the same network with its IPv6
addresses; every interface also has the link-local address the kernel gives it.
A dual-stack topology's interfaces get both their addresses, its hosts a default
route of each family their link has, its routers both families' forwarding.
Duplicate address detection is off in its namespaces, set before any interface
exists, so that every address is usable at once instead of after a second or
more of probing (the addresses are the topology's, unique by construction).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from manycast.drivers import netns
from manycast.lab.neighbours import NEIGH, NEIGH6, fit_neighbour_table
from manycast.topology import Attachment, Topology


def build_network(topology: Topology, ns: Callable[[str], str]) -> None:
    """Build `topology`; `ns(node)` is the name of `node`'s namespace."""
    family = topology.pool.space.family
    six = family == 6 or topology.pool.dual  # the network has IPv6 addresses
    fit_neighbour_table(len(topology.interfaces), NEIGH6 if six else NEIGH)
    for node in sorted(topology.interfaces):
        netns.create(ns(node))
        if six:
            # Before the interfaces: each takes the `default` values when created.
            no_dad = {f"net.ipv6.conf.{c}.accept_dad": "0" for c in ("all", "default")}
            netns.sysctl(ns(node), no_dad)
    # Links are made from one end: a veth's peer is created directly in the
    # other namespace; a LAN is a bridge in its router's namespace.
    for link in topology.links.values():
        members = link.members
        if any(topology.kind(m.node) == "client" for m in members):
            router = next(m for m in members if topology.kind(m.node) == "router")
            hosts = [m for m in members if m is not router]

            def lan(ipr: Any, router: Attachment = router, hosts: list[Attachment] = hosts) -> None:
                bridge = netns.bridge(ipr, router.iface)
                for i, member in enumerate(hosts):
                    port = f"{router.iface}p{i}"
                    netns.veth(ipr, port, ns(member.node), member.iface)
                    netns.enslave(ipr, port, bridge)
                    if topology.kind(member.node) == "client":
                        # The bridge floods multicast (no snooping): without this,
                        # each client's requests reach every other client too.
                        netns.isolate(ipr, port)
                    netns.up(ipr, port)

            netns.configure(ns(router.node), lan)
        else:
            a, b = members

            def pair(ipr: Any, a: Attachment = a, b: Attachment = b) -> None:
                netns.veth(ipr, a.iface, ns(b.node), b.iface)

            netns.configure(ns(a.node), pair)
    for node in topology.interfaces:

        def setup(ipr: Any, node: str = node) -> None:
            netns.up(ipr, "lo")
            for iface in topology.interfaces[node].values():
                netns.address(ipr, iface.name, str(iface.address), iface.network.prefixlen)
                if iface.address6 is not None and iface.network6 is not None:
                    netns.address(ipr, iface.name, str(iface.address6), iface.network6.prefixlen)
                netns.up(ipr, iface.name)
            for route in topology.routes.get(node, ()):
                if route.next_hop is not None:
                    netns.route(ipr, str(route.network), str(route.next_hop))
            gateways = [topology.gateways[node][1]] if node in topology.gateways else []
            if node in topology.gateways6:
                gateways.append(topology.gateways6[node])
            for gateway in gateways:
                default = "::/0" if gateway.version == 6 else "0.0.0.0/0"
                netns.route(ipr, default, str(gateway))

        netns.configure(ns(node), setup)
    for name in topology.routers:
        # Forwarding on; no reverse-path filter (the benchmark's sources are
        # many addresses behind one client interface). IPv6 has none.
        values = {
            "net.ipv4.ip_forward": "1",
            "net.ipv4.conf.all.rp_filter": "0",
            "net.ipv4.conf.default.rp_filter": "0",
        }
        for ifname in topology.interfaces[name]:
            values[f"net.ipv4.conf.{ifname}.rp_filter"] = "0"
        if six:
            # Multicast forwarding is the MRT6 socket's (the router daemon's) to turn on.
            values["net.ipv6.conf.all.forwarding"] = "1"
        netns.sysctl(ns(name), values)
    if topology.pool.vip is not None:
        from manycast.lab.vipnet import build_vip_plane

        build_vip_plane(topology, ns)
