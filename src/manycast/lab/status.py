"""What a lab looks like now: its nodes, links, programs and kernel forwarding tables."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from manycast.drivers import mroute, netns
from manycast.errors import LabError
from manycast.lab.build import Lab, require_root
from manycast.lab.daemons import ROLES_OF
from manycast.topology import Topology


@dataclass
class NodeStatus:
    name: str
    kind: str
    namespace: bool
    processes: dict[str, int | None]
    addresses: list[str]


@dataclass
class RouterTables:
    vifs: list[mroute.Vif]  # (MIFs in an IPv6 lab)
    entries: list[mroute.CacheEntry]
    # The pool group's plane as the daemon tells it (`{"op": "plane"}`): "mfc" or
    # "portions" with its kernel map elements; empty when the daemon does not answer.
    plane: dict[str, Any] = field(default_factory=dict)


@dataclass
class LabStatus:
    prefix: str
    up: bool
    nodes: list[NodeStatus]
    links: dict[str, list[str]]
    routers: dict[str, RouterTables]


def status(lab: Lab) -> LabStatus:
    """The lab's state, found by name; namespaces no topology names are listed as `?`."""
    require_root()
    names = lab.namespaces()
    try:
        topology: Topology | None = lab.topology()
    except LabError:
        topology = None
    nodes: list[NodeStatus] = []
    routers: dict[str, RouterTables] = {}
    known = set()
    if topology is not None:
        for node in sorted(topology.interfaces, key=lambda n: (topology.kind(n), n)):
            kind = topology.kind(node)
            known.add(lab.ns(node))
            roles = ROLES_OF.get(kind, ())
            if kind == "router" and topology.pool.dual:
                roles = (*roles, "router6")  # a dual-stack pool's IPv6 daemon
            processes = {role: lab.pid(node, role) for role in roles}
            addresses = [
                f"{i.name} {i.address}/{i.network.prefixlen}"
                + (f" {i.address6}/{i.network6.prefixlen}" if i.network6 is not None else "")
                for i in topology.interfaces[node].values()
            ]
            nodes.append(NodeStatus(node, kind, netns.exists(lab.ns(node)), processes, addresses))
            if kind == "router" and netns.exists(lab.ns(node)):
                # (A dual-stack pool's: its IPv4 tables, whose entries the VIFs name.)
                tables = RouterTables(lab.vifs(node), lab.mfc(node, lab.family), _plane(lab, node))
                routers[node] = tables
    for name in names:
        if name not in known:
            nodes.append(NodeStatus(name.removeprefix(f"{lab.prefix}-"), "?", True, {}, []))
    links = (
        {
            name: [f"{m.node}/{m.iface}" for m in link.members]
            for name, link in topology.links.items()
        }
        if topology is not None
        else {}
    )
    return LabStatus(lab.prefix, bool(names), nodes, links, routers)


def _plane(lab: Lab, router: str) -> dict[str, Any]:
    if lab.pid(router, "router") is None:
        return {}
    try:
        answer = lab.ask(router, "router", {"op": "plane"})
    except (OSError, ValueError):
        return {}
    return answer if isinstance(answer, dict) else {}
