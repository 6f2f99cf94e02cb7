"""TCP clients of a manycast pool in the lab: a unicast address mapped onto the group, and moves.

A kernel TCP client cannot connect to a multicast address (Linux refuses it), so
the pool's TCP service has a unicast address (`TCP_ADDRESS`) that the clients
connect to. Its packets are routed like any of the group's:

* at the client's edge router a stateless nftables rule rewrites the
  destination to the pool's group (after conntrack and the iptables hold, so
  conntrack and the hold see the flow by its unicast address), and the kernel's
  multicast forwarding takes the packet by the (client, group) entry the router
  daemons install, toward the server that owns the client;
* at the server a rule rewrites the group back to the unicast address (before
  conntrack, so that the service's socket, its guard and conntrack see one
  flow) and makes the packet the host's own (`meta pkttype set host`: TCP drops
  link-layer multicast); the service binds the address on the loopback and
  answers from it straight to the client.

An IPv6 pool's service address is `TCP_ADDRESS6` and its rules are in an `ip6`
table; everything else is the same. A dual-stack pool has both, each mapped onto
its family's group (the `ip` and `ip6` tables side by side).

A move switches the path of the client's source: the (client, group) entry of
every router on the way from the client's edge to the new server is steered
toward that server (`tcp_steer.py`, the router daemon's
`steer` request) while the edge holds the client's packets. The path is the
source's, so all of a client's connections move together.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from manycast.drivers import netns
from manycast.drivers.kernel import srv6
from manycast.drivers.kernel.control import ask

if TYPE_CHECKING:
    from manycast.topology import Topology

TCP_ADDRESS = ipaddress.IPv4Address("203.0.113.70")  # the pool's TCP service address
TCP_ADDRESS6 = ipaddress.IPv6Address("2001:db8:70::70")  # ... an IPv6 pool's
NFT_TABLE = "manycast_tcp"


def tcp_address(family: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The TCP service address of a pool of `family` (4 or 6)."""
    return TCP_ADDRESS6 if family == 6 else TCP_ADDRESS


def _nft_family(address: str) -> str:
    return "ip6" if ipaddress.ip_address(address).version == 6 else "ip"


def edge_ruleset(address: str, group: str, port: int) -> str:
    """The edge's rule: the service address becomes the group (after mangle: -150)."""
    family = _nft_family(address)
    return (
        f"table {family} {NFT_TABLE} {{\n"
        "  chain to_group {\n"
        "    type filter hook prerouting priority -140;\n"
        f"    {family} daddr {address} tcp dport {port} counter {family} daddr set {group}\n"
        "  }\n"
        "}\n"
    )


def server_ruleset(address: str, group: str, port: int) -> str:
    """A server's rule: the group becomes the service address, the packet the host's
    (before conntrack: -200)."""
    family = _nft_family(address)
    return (
        f"table {family} {NFT_TABLE} {{\n"
        "  chain from_group {\n"
        "    type filter hook prerouting priority -300;\n"
        f"    {family} daddr {group} tcp dport {port} counter"
        f" {family} daddr set {address} meta pkttype set host\n"
        "  }\n"
        "}\n"
    )


def _add_loopback(address: str) -> None:
    host = ipaddress.ip_address(address).max_prefixlen
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname="lo")[0]
        with contextlib.suppress(NetlinkError):  # already there
            ipr.addr("add", index=index, address=address, prefixlen=host)


def set_up_edge(ns: str, address: str, group: str, port: int) -> None:
    srv6.load_nft(partial(netns.enter, ns), edge_ruleset(address, group, port))


def set_up_server(ns: str, address: str, group: str, port: int) -> None:
    netns.run_in(ns, lambda: _add_loopback(address))
    srv6.load_nft(partial(netns.enter, ns), server_ruleset(address, group, port))


def path(topology: Topology, edge: str, server: str) -> list[str]:
    """The routers a packet from the edge router `edge` crosses to reach `server`, by
    the topology's unicast routes (the multicast entries follow them)."""
    target = topology.address(server)
    last = topology.router_of(server)
    owner = {
        iface.address: router
        for router in topology.routers
        for iface in topology.interfaces[router].values()
    }
    routers = [edge]
    while routers[-1] != last and len(routers) <= len(topology.routers):
        here = routers[-1]
        route = next((r for r in topology.routes[here] if target in r.network), None)
        hop = None if route is None or route.next_hop is None else owner.get(route.next_hop)
        if hop is None:
            break
        routers.append(hop)
    return routers


def steer(
    ask_router: Callable[[str, dict[str, Any]], Any],
    routes: dict[str, list[str]],
    group: str,
    to: str | None,
) -> dict[str, str]:
    """Each router of `routes` (router -> the client sources to steer there) points
    its (source, group) entries toward the server address `to` (None: back to the
    pool's allocation), all routers at once; the routers that refused, with why."""

    def one(router: str) -> tuple[str, str | None]:
        for source in routes[router]:
            request = {"op": "steer", "source": source, "group": group, "to": to}
            try:
                answer = ask_router(router, request)
            except (OSError, ValueError) as exc:
                return router, str(exc)
            if isinstance(answer, dict) and "error" in answer:
                return router, str(answer["error"])
        return router, None

    with ThreadPoolExecutor(max_workers=max(1, len(routes))) as pool:
        results = list(pool.map(one, sorted(routes)))
    return {router: why for router, why in results if why is not None}


def router_asker(run_dir: Any, role: str = "router") -> Callable[[str, dict[str, Any]], Any]:
    """Ask a router's daemon `role` (a dual-stack pool's IPv6 one: `router6`)."""
    return lambda router, request: ask(run_dir, router, role, request, 5.0)


__all__ = [
    "NFT_TABLE",
    "TCP_ADDRESS",
    "TCP_ADDRESS6",
    "edge_ruleset",
    "path",
    "router_asker",
    "server_ruleset",
    "set_up_edge",
    "set_up_server",
    "steer",
    "tcp_address",
]
