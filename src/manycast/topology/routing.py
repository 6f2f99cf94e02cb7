"""Each router's unicast routes: shortest paths by link delay, and reachability."""

from __future__ import annotations

import heapq
import ipaddress
from collections.abc import Iterable

from manycast.protocol.node import Interface
from manycast.topology.addressing import Graph
from manycast.topology.spec import Route


def reachable(start: str, graph: Graph) -> set[str]:
    """The routers `start` can reach over router links (itself included)."""
    seen, stack = {start}, [start]
    while stack:
        for peer, _, _ in graph[stack.pop()]:
            if peer not in seen:
                seen.add(peer)
                stack.append(peer)
    return seen


def routes(
    router: str,
    routers: Iterable[str],
    graph: Graph,
    interfaces: dict[str, dict[str, Interface]],
) -> list[Route]:
    """Dijkstra from `router`; every network gets the first hop of its shortest path.

    Every router must be reachable (see `reachable`). Routes come longest prefix first."""
    first_hop: dict[str, tuple[str, ipaddress.IPv4Address] | None] = {router: None}
    dist = {router: 0.0}
    heap: list[tuple[float, str]] = [(0.0, router)]
    while heap:
        d, node = heapq.heappop(heap)
        if d > dist[node]:
            continue
        for peer, cost, link in sorted(graph[node]):
            nd = d + cost
            if nd < dist.get(peer, float("inf")):
                dist[peer] = nd
                if node == router:
                    mine = next(i for i in interfaces[router].values() if i.link == link)
                    theirs = next(i for i in interfaces[peer].values() if i.link == link)
                    first_hop[peer] = (mine.name, theirs.address)
                else:
                    first_hop[peer] = first_hop[node]
                heapq.heappush(heap, (nd, peer))
    table: list[Route] = []
    for other in sorted(routers, key=lambda r: dist[r]):
        for iface in interfaces[other].values():
            hop = first_hop[other]
            if hop is None:
                table.append(Route(iface.network, iface.name, None))
            else:
                table.append(Route(iface.network, hop[0], hop[1]))
    # A network seen from several routers keeps its nearest entry (the first).
    unique: dict[ipaddress.IPv4Network, Route] = {}
    for route in table:
        unique.setdefault(route.network, route)
    return sorted(unique.values(), key=lambda r: -r.network.prefixlen)
