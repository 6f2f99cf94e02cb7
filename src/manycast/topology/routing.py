"""Each router's unicast routes: shortest paths by link delay, and reachability."""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass

from manycast.protocol.node import Interface
from manycast.topology.addressing import Graph
from manycast.topology.spec import Route
from manycast.wire.ip import Network


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
    """Dijkstra from `router`; every network gets the first hop of its shortest path
    (a dual-stack link's IPv6 network too, by the neighbour's IPv6 address).

    Every router must be reachable (see `reachable`). Routes come longest prefix first."""
    paths = shortest_paths(router, graph)
    table: list[Route] = []
    for other in sorted(routers, key=lambda r: paths[r].cost):
        first = paths[other].first
        hop: tuple[str, Interface] | None = None
        if first is not None:
            peer, link = first
            mine = next(i for i in interfaces[router].values() if i.link == link)
            theirs = next(i for i in interfaces[peer].values() if i.link == link)
            hop = (mine.name, theirs)
        for iface in interfaces[other].values():
            if hop is None:
                table.append(Route(iface.network, iface.name, None))
                if iface.network6 is not None:
                    table.append(Route(iface.network6, iface.name, None))
                continue
            out, neighbour = hop
            for network in (iface.network, iface.network6):
                gateway = neighbour.of_family(network.version) if network is not None else None
                if network is not None and gateway is not None:
                    table.append(Route(network, out, gateway.address))
    # A network seen from several routers keeps its nearest entry (the first).
    unique: dict[Network, Route] = {}
    for route in table:
        unique.setdefault(route.network, route)
    return sorted(unique.values(), key=lambda r: -r.network.prefixlen)


def hop_counts(router: str, graph: Graph) -> dict[str, int]:
    """Router-to-router hops from `router` to each router, along the routed paths."""
    return {peer: path.hops for peer, path in shortest_paths(router, graph).items()}


def costs(router: str, graph: Graph) -> dict[str, float]:
    """The routing metric (summed link delay) from `router` to each router."""
    return {peer: path.cost for peer, path in shortest_paths(router, graph).items()}


@dataclass(frozen=True, slots=True)
class Path:
    """The shortest path from a router to another: its cost, its router-to-router
    hops, and its first hop as (neighbour router, link) (None: the router itself)."""

    cost: float
    hops: int
    first: tuple[str, str] | None


def shortest_paths(router: str, graph: Graph) -> dict[str, Path]:
    """Dijkstra by link delay from `router` (ties: the lower name, then the lower link)."""
    paths = {router: Path(0.0, 0, None)}
    heap: list[tuple[float, str]] = [(0.0, router)]
    while heap:
        d, node = heapq.heappop(heap)
        if d > paths[node].cost:
            continue
        here = paths[node]
        for peer, cost, link in sorted(graph[node]):
            nd = d + cost
            if peer not in paths or nd < paths[peer].cost:
                first = (peer, link) if node == router else here.first
                paths[peer] = Path(nd, here.hops + 1, first)
                heapq.heappush(heap, (nd, peer))
    return paths
