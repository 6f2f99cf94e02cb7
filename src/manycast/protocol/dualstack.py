"""Dual-stack pools: one pool serving IPv4 and IPv6 clients at once.

The pool has one allocation (over the IPv4 space's buckets) and one coordination
on the IPv4 control channel; its IPv6 space has as many buckets, so the same
bucket-to-server map reads in either family (`in_space`). A server joins the
IPv4 group with IGMPv3 masks and the IPv6 group with MLDv2 masks, both from its
buckets (`membership.FamilyFilters` says what it serves in each).

A dual-stack router runs the IPv4 router's logic and the IPv6 router's side by
side (`DualStackRouter`): each over its family's view of the interfaces (a
dual-stack link's interface has an address of each family; a client LAN has
one), each packet to the one of its IP version. They share the outbox, the
effects and the counters, so a driver sees one node. Each has its own fast path
(`fast_path`, `fast_path6`); the IPv6 one's invalidations move the IPv4 one's
generation too, so a driver serving both watches one. Under R4 each builds its own
family's label-switched trees and pins its own family's flows; under D the
servers move each connection within its client's family (`redirect.py`). In a
dual-stack VIP pool each family's logic routes its family's VIP (`vip6`: the IPv6
one) to the VIP routers' addresses of that family and builds that family's trees
(`vipdual.py` is the VIP router's side).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from manycast.addressplan import IPV4_LIMIT
from manycast.protocol.admission import Admission
from manycast.protocol.fastpath import FastPath
from manycast.protocol.node import Interface, family_view
from manycast.protocol.router import Router
from manycast.protocol.router6 import Router6
from manycast.space import AddressSpace, Allocation
from manycast.wire.ip import Address


def in_space(allocation: Allocation, space: AddressSpace) -> Allocation:
    """The same owner for every bucket, over another family's space of as many buckets."""
    if allocation.space == space:
        return allocation
    return Allocation(space, allocation.servers, allocation.owners)


class _Beside(FastPath):
    """The IPv6 logic's fast path, beside the IPv4 logic's `four`: it credits the
    shared counters, and its invalidations move `four`'s generation too."""

    __slots__ = ("four",)

    def __init__(self, interfaces: Iterable[str], stats: Any, four: FastPath) -> None:
        super().__init__(interfaces, stats, family=6)
        self.four = four

    def invalidate(self, source_mask: int = -1) -> None:
        super().invalidate(source_mask)
        self.four.generation += 1


class DualStackRouter(Router):
    """A router of a dual-stack network: this IPv4 router, and `six`, an IPv6 router
    over the interfaces that have an IPv6 address, taking the IPv6 packets."""

    def __init__(
        self,
        name: str,
        interfaces: dict[str, Interface],
        routes: Any,
        router_ifaces: Any,
        *,
        neighbors6: dict[str, tuple[int, ...]] | None = None,
        admission6: Admission | None = None,
        r4_group6: Address | None = None,
        vip_servers6: Iterable[int] = (),
        vip6: Address | None = None,
        vip_routers6: Mapping[int, float] | None = None,
        vip_router_links6: Mapping[str, tuple[int, ...]] | None = None,
        **options: Any,
    ) -> None:
        """`Router`'s arguments over every interface, with both families' routes;
        `neighbors6`: the neighbour routers' IPv6 addresses; `admission6`: a private
        pool's admission of MLDv2 joins (its keys, replay cache and waiting joins are
        the IPv6 logic's own). Under R4, `r4_group6` and `vip_servers6` are the IPv6
        group and the servers' IPv6 addresses: each family's logic builds its own
        servers' trees from its own label bindings, and pins its own clients' flows.
        In a VIP pool, `vip6`, `vip_routers6`, `vip_router_links6` and `vip_servers6`
        are the IPv6 logic's `vip_*` options: the IPv6 VIP, the VIP routers' and the
        servers' IPv6 addresses."""
        routes = list(routes)
        router_ifaces = set(router_ifaces)
        four, six = family_view(interfaces, 4), family_view(interfaces, 6)
        super().__init__(
            name,
            four,
            [r for r in routes if r[0].version == 4],
            router_ifaces & set(four),
            **options,
        )
        self.six = Router6(
            name,
            six,
            [r for r in routes if r[0].version == 6],
            router_ifaces & set(six),
            **{
                **options,
                "neighbors": neighbors6,
                "admission": admission6,
                "r4_group": r4_group6,
                "vip_servers": vip_servers6,
                "vip": vip6,
                "vip_routers": vip_routers6,
                "vip_router_links": vip_router_links6,
            },
        )
        # One node to the driver: one outbox, one list of effects, one set of counters.
        self.six.outbox = self.outbox
        self.six.effects = self.effects
        self.six.stats = self.stats
        self.six.fast_path = self.fast_path6 = _Beside(
            self.six.interfaces, self.stats, self.fast_path
        )
        self.all_interfaces = interfaces

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
        # Emptied in place: the IPv6 router appends to the same list.
        effects = self.effects[:]
        self.effects.clear()
        return effects

    def provide_key(
        self,
        group: int,
        raw: bytes | None,
        ttl: float,
        now: float,
        error: str | None = None,
        unanswered: bool = False,
    ) -> None:
        """The key of `group`, to the logic of its family (an integer group above
        2**32 is IPv6's, as `AddressPlan.is_private_int` reads it)."""
        if group >= IPV4_LIMIT:
            self.six.provide_key(group, raw, ttl, now, error, unanswered)
        else:
            super().provide_key(group, raw, ttl, now, error, unanswered)

    def restore_key(self, group: int, raw: bytes, stale_for: float, now: float) -> bool:
        if group >= IPV4_LIMIT:
            return self.six.restore_key(group, raw, stale_for, now)
        return super().restore_key(group, raw, stale_for, now)

    def membership(self) -> dict[str, dict[str, str]]:
        return {**super().membership(), **self.six.membership()}
