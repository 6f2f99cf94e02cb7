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

A move switches the path of the client's source: every router's (client, group)
entry is steered toward the new server (`tcp_steer.py`, the router daemon's
`steer` request) while the edge holds the client's packets. The path is the
source's, so all of a client's connections move together.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from manycast.drivers import netns
from manycast.drivers.kernel import srv6
from manycast.drivers.kernel.control import ask

TCP_ADDRESS = ipaddress.IPv4Address("203.0.113.70")  # the pool's TCP service address
NFT_TABLE = "manycast_tcp"


def edge_ruleset(address: str, group: str, port: int) -> str:
    """The edge's rule: the service address becomes the group (after mangle: -150)."""
    return (
        f"table ip {NFT_TABLE} {{\n"
        "  chain to_group {\n"
        "    type filter hook prerouting priority -140;\n"
        f"    ip daddr {address} tcp dport {port} counter ip daddr set {group}\n"
        "  }\n"
        "}\n"
    )


def server_ruleset(address: str, group: str, port: int) -> str:
    """A server's rule: the group becomes the service address, the packet the host's
    (before conntrack: -200)."""
    return (
        f"table ip {NFT_TABLE} {{\n"
        "  chain from_group {\n"
        "    type filter hook prerouting priority -300;\n"
        f"    ip daddr {group} tcp dport {port} counter"
        f" ip daddr set {address} meta pkttype set host\n"
        "  }\n"
        "}\n"
    )


def _add_loopback(address: str) -> None:
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname="lo")[0]
        with contextlib.suppress(NetlinkError):  # already there
            ipr.addr("add", index=index, address=address, prefixlen=32)


def set_up_edge(ns: str, address: str, group: str, port: int) -> None:
    srv6.load_nft(partial(netns.enter, ns), edge_ruleset(address, group, port))


def set_up_server(ns: str, address: str, group: str, port: int) -> None:
    netns.run_in(ns, lambda: _add_loopback(address))
    srv6.load_nft(partial(netns.enter, ns), server_ruleset(address, group, port))


def steer(
    ask_router: Callable[[str, dict[str, Any]], Any],
    routers: Iterable[str],
    sources: Iterable[str],
    group: str,
    to: str | None,
) -> dict[str, str]:
    """Every router's (source, group) entry toward the server address `to` (None: back
    to the pool's allocation); the routers that refused, with why."""
    failed: dict[str, str] = {}
    for router in routers:
        for source in sources:
            request = {"op": "steer", "source": source, "group": group, "to": to}
            try:
                answer = ask_router(router, request)
            except (OSError, ValueError) as exc:
                failed[router] = str(exc)
                continue
            if isinstance(answer, dict) and "error" in answer:
                failed[router] = str(answer["error"])
    return failed


def router_asker(run_dir: Any) -> Callable[[str, dict[str, Any]], Any]:
    return lambda router, request: ask(run_dir, router, "router", request, 5.0)


__all__ = [
    "NFT_TABLE",
    "TCP_ADDRESS",
    "edge_ruleset",
    "router_asker",
    "server_ruleset",
    "set_up_edge",
    "set_up_server",
    "steer",
]
