"""Steering one client source of a manycast group to a chosen server: a TCP move's path switch.

In a manycast pool the path of a client's packets is the routers' multicast
forwarding entry for (client, group): every connection of a client goes where
that entry points. When a TCP move hands a client's connections to another
server, every router's entry for (client, group) must point toward that server
before the client's held packets are released. The router daemon takes a
`steer` request on its command socket (`handle`, registered by the daemon):

    {"op": "steer", "source": "10.1.0.2", "group": "232.1.1.1", "to": "10.0.3.2"}

The daemon's decision for (source, group) becomes the interface of its route
toward `to` (the server's own address: its link when the server hangs off this
router, else the next hop's), whatever the pool's allocation says, until a
request with `"to": null` takes the steering away. An entry already installed
is rewritten at once; one not yet installed is installed so at its first
packet's upcall. A membership change leaves a steered entry as it is.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import TYPE_CHECKING, Any

from pyroute2 import IPRoute

if TYPE_CHECKING:
    from manycast.drivers.kernel.router_daemon import RouterDaemon


def _int(address: str) -> int:
    """An address as the daemon's entries key it (IPv4 or IPv6: its daemon's family)."""
    return int(ipaddress.ip_address(address))


_TOWARD: dict[str, str] = {}  # the lab's unicast routes do not change


def iface_toward(address: str) -> str:
    """The interface this namespace's unicast routing sends `address` out of."""
    if address in _TOWARD:
        return _TOWARD[address]
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    with IPRoute() as ipr:
        routes = ipr.route("get", dst=address, family=family)
        if not routes:
            raise ValueError(f"no route to {address}")
        index = routes[0].get_attr("RTA_OIF")
    _TOWARD[address] = socket.if_indextoname(index)
    return _TOWARD[address]


def handle(daemon: RouterDaemon, request: dict[str, Any]) -> dict[str, Any]:
    """The `steer` request: point (source, group) toward `to`, or (null) follow the pool."""
    try:
        source, group = _int(str(request["source"])), _int(str(request["group"]))
        to = request.get("to")
        outs: frozenset[int] | None = None
        if to is not None:
            outs = frozenset({daemon.vif_of[iface_toward(str(to))]})
    except (KeyError, ValueError, OSError) as exc:
        return {"error": f"cannot steer: {exc}"}
    if daemon.portions is not None:
        return {"error": "the portion plane forwards the pool's group: steering needs the MFC"}
    key = (source, group)
    if outs is None:
        daemon.steered.pop(key, None)
    else:
        daemon.steered[key] = outs
    entry = daemon.entries.get(group, {}).get(source)
    if entry is not None:
        wanted, owners = daemon._decide(source, group, entry.parent)
        if wanted != entry.outs:
            daemon.mroute.set_entry(source, group, entry.parent, wanted)
            entry.outs, entry.owners, entry.held = wanted, owners, None
    return {
        "steered": len(daemon.steered),
        "installed": entry is not None,
        "outs": sorted(daemon.iface_of_vif[v] for v in (outs or ())),
    }


__all__ = ["handle", "iface_toward"]
