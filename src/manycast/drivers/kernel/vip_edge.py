"""A router daemon's part in a VIP pool: tags become conntrack marks; the VIP's route follows.

Flow tags become conntrack marks, and the VIP's route follows the nearest live
VIP router. The core (`VipPlane`) takes the VIP routers' `FlowTag`s, their adverts, the
servers' hellos and the label bindings exactly as on the other drivers; this
module only carries its decisions into the kernel (`srv6.py` says how):

* a flow the core holds a tag for gets the tagged server's mark on its
  conntrack entry, so its next packets take the server's segment;
* the VIP's route points at the nearest VIP router whose advert is current.

The core never sees a tagged flow's packets here (the kernel forwards them), so
its own idle sweep of tags means nothing to the kernel: conntrack ends a flow's
entry, and its mark with it, when the flow ends or idles.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from manycast.drivers.kernel import srv6
from manycast.drivers.kernel.ctmark import ConntrackMarker

if TYPE_CHECKING:
    from manycast.protocol.router import Router
    from manycast.protocol.vipplane import Flow, VipPlane
    from manycast.topology import Topology

log = logging.getLogger("manycast.kernel.vip")

FULL_SYNC_EVERY = 0.5  # seconds between sweeps of what the core has forgotten


@dataclass
class EdgeStats:
    vip_route_changes: int = 0


class VipEdge:
    """The kernel side of `router`'s VIP plane (in a dual-stack pool, of its logic of
    `family`, whose VIP is the pool's VIP of that family)."""

    def __init__(self, router: Router, topology: Topology, family: int = 0) -> None:
        vip = topology.pool.group_of(family) if topology.pool.vip is not None else None
        if router.vip is None or vip is None:
            raise ValueError(f"{router.name} takes no part in a VIP pool")
        self.router = router
        self.plane: VipPlane = router.vip
        self.vip = vip
        # Addresses of the VIP's family, from the core's integers.
        self.address: type[ipaddress.IPv4Address | ipaddress.IPv6Address] = type(self.vip)
        marks = srv6.server_marks(topology.servers)
        self.mark_of = {
            int(srv6.address_of(topology, name, vip.version)): mark for name, mark in marks.items()
        }
        self.stats = EdgeStats()
        self.installed: dict[Flow, int] = {}
        self.marker = ConntrackMarker()
        self.ipr = IPRoute()
        self.via: int | None = -1  # the VIP route's VIP router; -1: as built
        self._synced_at = -FULL_SYNC_EVERY
        self.plane.tag_log = []

    def sync(self, now: float) -> None:
        """Carry what the core decided since the last call into the kernel."""
        log_ = self.plane.tag_log
        assert log_ is not None
        for flow, server in log_:
            if self.installed.get(flow) != server:
                self._mark(flow, server)
        log_.clear()
        if now - self._synced_at >= FULL_SYNC_EVERY:
            # Forget what the core forgot (its idle sweep; conntrack keeps the marks).
            self._synced_at = now
            flows = self.plane.flows
            for flow in [f for f in self.installed if f not in flows]:
                del self.installed[flow]
        nearest = self.plane.nearest_vip_router(now)
        if nearest != self.via and not (nearest is None and self.via == -1):
            self._route_vip(nearest)

    def next_lapse(self, now: float) -> float | None:
        """When the next VIP router's advert lapses (the VIP's route may change then)."""
        return min((u for u, _ in self.plane.vip_routers.values() if u > now), default=None)

    def _mark(self, flow: Flow, server: int) -> None:
        self.installed[flow] = server
        mark = self.mark_of.get(server)
        if mark is None:
            return
        client = str(self.address(flow.client))
        self.marker.mark(
            flow.protocol, client, flow.client_port, str(self.vip), flow.vip_port, mark
        )

    def _route_vip(self, nearest: int | None) -> None:
        via: str | None = None
        if nearest is not None:
            way = self.router.route(nearest)
            if way is None:
                return
            via = str(self.address(way[1]))
        try:
            srv6.vip_route(self.ipr, self.vip, via)
        except NetlinkError as exc:
            log.warning("cannot route the VIP via %s: %s", via, exc)
            return
        self.via = nearest
        self.stats.vip_route_changes += 1

    def status(self) -> dict[str, Any]:
        via = None if self.via is None or self.via < 0 else str(self.address(self.via))
        return {
            "tags": len(self.installed),
            "pushed": srv6.pushed_packets(srv6.nft_family(self.vip)),
            "vip_via_router": via,
            "marks_set": self.marker.sent,
            # tags for a flow conntrack does not know (yet, or any more)
            "marks_missing": self.marker.missing,
            "marks_failed": self.marker.failed,
            "vip_route_changes": self.stats.vip_route_changes,
            "plane": dict(vars(self.plane.stats)),
        }

    def close(self) -> None:
        self.marker.close()
        self.ipr.close()
