"""A dual-stack pool's VIP router: one node placing IPv4 and IPv6 flows by one allocation.

A dual-stack VIP pool has a VIP of each family (`[pool] vip` lists both). Its VIP
router runs the IPv4 VIP router's logic and the IPv6 one's side by side, as a
dual-stack router runs both families' router logic (`dualstack.py`): each over its
family's view of the interface, with its own VIP, label table (the IPv4 or IPv6
trees its router tells it of), flows, adverts and edges, each packet to the one of
its IP version.

What the two share is the pool: the IPv4 logic follows the servers' coordination
on the IPv4 control channel as an observer, and the IPv6 logic reads the same
observer (`follows`), its allocation's buckets in the IPv6 space (`in_space`), and
sends a flow to the chosen server's IPv6 address. So one allocation places both
families' clients, with one view of who is alive, and every VIP router given the
same inputs picks the same server for a flow of either family. The counters are
shared too: a driver and the summary see one VIP router.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from manycast.protocol.coordination import PoolSettings
from manycast.protocol.handover import Edges
from manycast.protocol.node import Interface, family_view
from manycast.protocol.vip import VipRouter
from manycast.space import AddressSpace, Allocation
from manycast.wire.ip import Address


class DualStackVipRouter(VipRouter):
    """This IPv4 VIP router, and `six`, an IPv6 one over the same interface that takes
    the IPv6 packets and follows this one's view of the pool."""

    def __init__(
        self,
        name: str,
        interfaces: dict[str, Interface],
        gateway: tuple[str, Address],
        settings: PoolSettings,
        rng: random.Random,
        *,
        vip: Address,
        initial: Allocation | None,
        edges: Edges,
        flow_idle: float = 30.0,
        gateway6: Address,
        vip6: Address,
        space6: AddressSpace,
        server_addresses6: Mapping[str, Address],
    ) -> None:
        """`VipRouter`'s arguments for the IPv4 logic; `gateway6`, `vip6`, `space6`:
        the IPv6 router on our link, the IPv6 VIP and space; `server_addresses6`: each
        server's IPv6 address (its IPv6 tree's root)."""
        iface = gateway[0]
        super().__init__(
            name,
            family_view(interfaces, 4),
            gateway,
            settings,
            rng,
            vip=vip,
            initial=initial,
            edges=edges,
            flow_idle=flow_idle,
        )
        self.six = VipRouter(
            name,
            family_view(interfaces, 6),
            (iface, gateway6),
            settings,
            rng,
            vip=vip6,
            initial=None,
            edges=edges,
            flow_idle=flow_idle,
            follows=self.observer,
            space=space6,
            server_addresses=server_addresses6,
        )
        # One node to the driver: one outbox, one list of effects, one set of counters.
        self.six.outbox = self.outbox
        self.six.effects = self.effects
        self.six.stats = self.stats
        self.all_interfaces = interfaces  # both families' addresses (a restart's)

    @property
    def both(self) -> tuple[VipRouter, VipRouter]:
        """The IPv4 logic (this node) and the IPv6 one."""
        return self, self.six

    def start(self, now: float) -> None:
        super().start(now)
        self.six.start(now)

    def receive(self, iface: str, packet: bytes, now: float) -> None:
        if packet[:1] and packet[0] >> 4 == 6:
            if iface in self.six.interfaces:
                self.six.receive(iface, packet, now)
        elif iface in self.interfaces:
            super().receive(iface, packet, now)

    def on_timer(self, now: float) -> None:
        super().on_timer(now)
        self.six.on_timer(now)

    def next_deadline(self) -> float | None:
        deadlines = (super().next_deadline(), self.six.next_deadline())
        return min((d for d in deadlines if d is not None), default=None)

    def take_effects(self) -> list[object]:
        # Emptied in place: the IPv6 logic appends to the same list.
        effects = self.effects[:]
        self.effects.clear()
        return effects

    def flows_held(self) -> int:
        return len(self.flows) + len(self.six.flows)
