"""The router daemon: the sans-I/O `Router` driving the kernel's multicast forwarding table.

It opens the MRT socket, adds a VIF per interface and joins 224.0.0.22 on each
(reports are sent there, and a host only accepts a group it joined). Extended
membership reports go to `Router.receive`; the frames the core sends (relayed
joins, label bindings, VIP adverts) go out of the interface it names. On a
NOCACHE upcall for (S, G) the daemon installs the entry toward the interfaces `Router.resolve`
names, possibly none (then the kernel drops (S, G) quietly instead of asking
again). When the core says a group changed, exactly the entries of that group
whose outgoing interfaces differ are rewritten. The kernel alone forwards
established sources; the daemon only decides.

Plain IGMP reports (no RFC 9279 extension) are ignored, but for a VIP router's
join of the control channel. Linux sends them by
itself whenever a socket joins a group, the service's and the agent's own
sockets included; such a join names no mask and, for an any-source join, means
"every source", so honouring it would hand every client to whichever server
happened to open a socket. Only the agent's extended report says which portions
a server serves.

Pinned paths (R4) are per source here: when a change would move an (S, G) entry
away from an owner that is still a member (take an outgoing interface away, not
only add one), the old entry stays while its kernel packet counter keeps
increasing, and is rewritten once it has been idle for `pin_idle` seconds.

On an IPv6 network (the pool's space is IPv6) the same daemon hosts a `Router6`
on the MRT6 socket (`mroute6.py`): a MIF per interface, ff02::16 joined on each,
MLDv2 reports read without their IP header and handed to the core whole again
(source, destination, hop limit and the Hop-by-Hop header as the kernel reported
them), the core's frames sent on raw IPv6 sockets (its MLD messages from the
interface's link-local address, as the hosts' are), and the portion plane in table
`netdev manycast6`. Plain MLD reports (the hosts' kernels' own, from link-local
addresses) are ignored as IGMP's are.

A dual-stack pool's router runs two daemons (roles `router` and `router6`), one
per family: each hosts the whole dual-stack core but drives its family's table
with its family's logic (`DualStackRouter` or its `six`) over the interfaces that
have an address of its family, and sends only its family's frames.

With `plane="portions"` the pool's group is forwarded by the portion plane
(`portion_plane.py`): one nftables map element per portion, rewritten in one
transaction when the group's members change; no upcall, no per-source entry.
The MFC stays underneath as the fallback: for a source two members hold at once,
and for the pools the plane cannot serve (private pools: senders are admitted
one by one; R4: pins are per source; VIP pools), which keep the MFC for all.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from manycast.drivers.kernel import tcp_steer
from manycast.drivers.kernel.loop import KernelLoop
from manycast.drivers.kernel.portion_plane import PlaneError, PortionPlane, compile_portions
from manycast.drivers.kernel.sockets import (
    control_socket,
    destination,
    from_link_local,
    link_local,
    raw_sender,
    recv_with_pktinfo,
    udp_packet,
)
from manycast.drivers.mroute import IGMPMSG_NOCACHE, MrouteSocket, Received, Upcall
from manycast.drivers.mroute6 import Mroute6Socket, Received6
from manycast.naming import key_from_directory
from manycast.protocol.node import Frame, Node, family_view
from manycast.protocol.refusal import Refusal
from manycast.protocol.router import GroupChanged, KeyNeeded
from manycast.wire.errors import WireError
from manycast.wire.ip import (
    IPPROTO_ICMPV6,
    IPPROTO_IGMP,
    HopByHop,
    IPv4Packet,
    IPv6Packet,
    peek_v4,
    peek_v6,
)
from manycast.wire.membership import IGMP_V3_REPORT, MLD_V2_REPORT, IGMPv3Report, MLDv2Report

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

    from manycast.drivers.kernel.vip_edge import VipEdge
    from manycast.protocol.router import Router
    from manycast.topology import Topology

log = logging.getLogger("manycast.kernel.router")
PLANES = ("mfc", "portions")


@dataclass
class _Entry:
    """What the daemon installed for one (S, G)."""

    parent: int
    outs: frozenset[int]
    owners: frozenset[int]  # the members whose filters matched S at install time
    held: int | None = None  # the packet counter when a move was postponed (R4)


@dataclass
class RouterDaemonStats:
    upcalls: int = 0
    installed: int = 0
    rewritten: int = 0
    held: int = 0
    released: int = 0
    reports: int = 0
    plain_reports_ignored: int = 0
    install_seconds: float = 0.0  # upcall read to entry installed, summed
    first_upcall: float | None = None
    last_install: float | None = None


def _is_extended(report: IGMPv3Report | MLDv2Report) -> bool:
    """Whether the report carries manycast's RFC 9279 extensions (masks or a signed join)."""
    return report.signed is not None or any(
        r.include_masks or r.exclude_masks for r in report.records
    )


class RouterDaemon:
    def __init__(
        self,
        topology: Topology,
        name: str,
        run_dir: Path,
        seed: int,
        pin_idle: float | None,
        plane: str = "mfc",
        family: int | None = None,
    ) -> None:
        """`family`: in a dual-stack pool, the family this daemon drives (role
        `router` for 4, `router6` for 6); else the pool's."""
        from manycast.pool import build
        from manycast.protocol.dualstack import DualStackRouter

        pool = topology.pool
        self.family = family or pool.space.family
        role = "router6" if pool.dual and self.family == 6 else "router"
        self.loop = KernelLoop(run_dir, name, role, send=self._send, after=self._after)
        self.loop.on_effect = self._on_effect
        nodes = build(topology, seed=seed, wall_base=self.loop.wall_base, only={name})
        self.node: Router = nodes.routers[name]
        # The logic of this daemon's family (a dual-stack router's IPv6 one: its `six`).
        self.router: Router = self.node
        if isinstance(self.node, DualStackRouter) and self.family == 6:
            self.router = self.node.six
        self.directory = nodes.directory
        self.pin_idle = pin_idle
        self.stats = RouterDaemonStats()
        interfaces = family_view(topology.interfaces[name], self.family)
        self.vif_of: dict[str, int] = {}
        self.iface_of_vif: dict[int, str] = {}
        self.iface_of_index: dict[int, str] = {}
        self.own = {i.address for i in interfaces.values()}
        # A VIP router joins the control channel with a plain report (it serves no
        # part of the space): the one plain report honoured.
        self.vip_routers = {topology.address(v) for v in topology.vip_routers}
        self.mroute: MrouteSocket | Mroute6Socket = (
            Mroute6Socket() if self.family == 6 else MrouteSocket()
        )
        self.send_socks: dict[str, socket.socket] = {}
        self.index_of: dict[str, int] = {}
        # Each interface's link-local address: the source of the MLD messages sent there.
        self.link_local = {
            iface: link_local(iface) if self.family == 6 else None for iface in interfaces
        }
        self.own |= {a for a in self.link_local.values() if a is not None}
        for vif, iface in enumerate(sorted(interfaces)):
            ifindex = socket.if_nametoindex(iface)
            if isinstance(self.mroute, Mroute6Socket):
                self.mroute.add_mif(vif, ifindex)
            else:
                self.mroute.add_vif(vif, ifindex)
            self.mroute.join(ifindex)
            self.vif_of[iface], self.iface_of_vif[vif] = vif, iface
            self.iface_of_index[ifindex], self.index_of[iface] = iface, ifindex
            self.send_socks[iface] = raw_sender(iface, self.family)
        # Pin requests and other unicast control messages for the router itself.
        self.control = control_socket(topology.pool.control_port, self.family)
        self.entries: dict[int, dict[int, _Entry]] = {}  # group -> source -> entry
        self.dirty: set[int] = set()
        self.seen: dict[int, tuple[Any, ...]] = {}  # group -> membership last acted on
        self.pin_check_due = False
        self._registry: CollectorRegistry | None = None  # metrics, made when first asked
        self.loop.watch(self.mroute.sock, self._on_mroute)
        self.loop.watch(self.control, self._on_control)
        self.loop.handlers["status"] = self._status
        self.loop.handlers["metrics"] = self._metrics
        # TCP moves in a manycast pool: sources steered to a server (`tcp_steer.py`).
        self.steered: dict[tuple[int, int], frozenset[int]] = {}
        self.loop.handlers["steer"] = partial(tcp_steer.handle, self)
        self.loop.handlers["plane"] = self._plane_request
        # The portion plane of the pool's group (None: the MFC alone).
        self.portions: PortionPlane | None = None
        self.plane_refused = self._plane_refusal(topology)
        self._plane_devices = sorted(interfaces)
        self._pool_group = int(pool.group_of(self.family))
        if plane not in PLANES:
            raise ValueError(f"plane {plane!r}: expected one of {', '.join(PLANES)}")
        if plane == "portions":
            self.use_plane("portions")
        # A VIP pool: the core's tags and VIP routing carried into the kernel.
        self.edge: VipEdge | None = None
        self.lapse_check: float | None = None
        if topology.pool.vip is not None:
            from manycast.drivers.kernel.vip_edge import VipEdge

            self.edge = VipEdge(self.router, topology, self.family)  # its family's VIP
            self.loop.watch(self.edge.marker.sock, self.edge.marker.read_answers)
        self.loop.add(self.node)

    # the portion plane -------------------------------------------------------------
    def _plane_refusal(self, topology: Topology) -> str | None:
        """Why this pool's group must stay on the MFC, or None."""
        admission = self.router.admission
        if admission is not None and admission.is_private(int(topology.pool.group)):
            return "private pool: senders are admitted one by one (per source)"
        if self.pin_idle is not None:
            return "R4: active sources are pinned one by one (per source)"
        if topology.pool.vip is not None:
            return "VIP pool: flows are tagged at the edge"
        return None

    def use_plane(self, plane: str) -> str:
        """Switch the pool's group to `plane` ("mfc" or "portions"); the plane in use."""
        if plane == "portions" and self.plane_refused is None:
            if self.portions is None:
                self.portions = PortionPlane(
                    self._pool_group, self._plane_devices, family=self.family
                )
                self.portions.install()
            self._sync_plane()
        elif self.portions is not None:
            self.portions.remove()
            self.portions = None
        return "mfc" if self.portions is None else "portions"

    def _sync_plane(self) -> None:
        if self.portions is None:
            return
        members = self.router.members.get(self._pool_group, {}).values()
        try:
            self.portions.update(compile_portions(members))
        except PlaneError as exc:
            log.error("the portion plane refused a change (%s): the MFC takes the group", exc)
            with contextlib.suppress(PlaneError):
                self.portions.update(None)

    def _plane_request(self, request: dict[str, Any]) -> dict[str, Any]:
        if "use" in request:
            if request["use"] not in PLANES:
                return {"error": f"use: expected one of {', '.join(PLANES)}"}
            self.use_plane(str(request["use"]))
        return self._plane_status()

    def _plane_status(self) -> dict[str, Any]:
        status: dict[str, Any] = {"plane": "mfc" if self.portions is None else "portions"}
        if self.plane_refused is not None:
            status["portions_refused"] = self.plane_refused
        if self.portions is not None:
            status.update(self.portions.status())
        return status

    # events ------------------------------------------------------------------------
    def _on_mroute(self) -> None:
        for item in self.mroute.read():
            if isinstance(item, Received):
                self._on_igmp(item)
            elif isinstance(item, Received6):
                self._on_mld(item)
            elif item.kind == IGMPMSG_NOCACHE:  # (MRT6MSG_NOCACHE is the same 1)
                self._on_nocache(
                    item.vif if isinstance(item, Upcall) else item.mif, item.source, item.group
                )

    def _on_igmp(self, item: Received) -> None:
        iface = self.iface_of_index.get(item.ifindex)
        if iface is None:
            return
        try:
            ip = IPv4Packet.from_wire(item.packet)
            if ip.header.src in self.own:
                return
            if ip.header.protocol != IPPROTO_IGMP or ip.payload[:1] != bytes([IGMP_V3_REPORT]):
                return  # a query or an older report: not a join for us
            report = IGMPv3Report.from_wire(ip.payload)
        except WireError:
            self.router.stats.malformed += 1
            self.router.stats.rejected[Refusal.MALFORMED] += 1
            return
        if not _is_extended(report) and ip.header.src not in self.vip_routers:
            self.stats.plain_reports_ignored += 1
            return
        self.stats.reports += 1
        self.router.receive(iface, item.packet, self.loop.now)

    def _on_mld(self, item: Received6) -> None:
        """An MLD message (no IP header) the MRT6 socket read: the MLDv2 reports with
        manycast's extensions go to the core, as the whole packet that came."""
        iface = self.iface_of_index.get(item.ifindex)
        if iface is None or item.source in self.own or item.destination is None:
            return
        if item.message[:1] != bytes((MLD_V2_REPORT,)):
            return  # a query, or MLDv1: not a join for us
        try:
            report = MLDv2Report.from_wire(item.message, item.source, item.destination)
            hop_by_hop = None if item.hop_by_hop is None else HopByHop.from_wire(item.hop_by_hop)
            packet = IPv6Packet.make(
                item.source,
                item.destination,
                IPPROTO_ICMPV6,
                item.message,
                hop_limit=item.hop_limit if item.hop_limit is not None else 0,  # unknown: refused
                hop_by_hop=hop_by_hop,
            ).to_wire()
        except (WireError, ValueError):
            self.router.stats.malformed += 1
            self.router.stats.rejected[Refusal.MALFORMED] += 1
            return
        if not _is_extended(report) and item.source not in self.vip_routers:
            self.stats.plain_reports_ignored += 1
            return
        self.stats.reports += 1
        self.router.receive(iface, packet, self.loop.now)

    def _on_control(self) -> None:
        port = self.control.getsockname()[1]
        while (got := recv_with_pktinfo(self.control)) is not None:
            data, (src, sport), ifindex, dst = got
            iface = self.iface_of_index.get(ifindex)
            if iface is not None:
                packet = udp_packet(src, sport, dst, port, data)
                self.router.receive(iface, packet, self.loop.now)

    def _on_nocache(self, vif: int, source: int, group: int) -> None:
        start = time.monotonic()
        self.stats.upcalls += 1
        if self.stats.first_upcall is None:
            self.stats.first_upcall = start
        if vif not in self.iface_of_vif:
            return
        if group not in self.seen:
            self.seen[group] = self._membership(group)
        outs, owners = self._decide(source, group, vif, upcall=True)
        self.mroute.set_entry(source, group, vif, outs)
        self.entries.setdefault(group, {})[source] = _Entry(vif, outs, owners)
        done = time.monotonic()
        self.stats.installed += 1
        self.stats.install_seconds += done - start
        self.stats.last_install = done

    def _on_effect(self, node: Node, effect: object) -> None:
        if isinstance(effect, KeyNeeded):
            # The lab's keys are the topology's directory, in memory: answered at
            # once, in the loop (a DNS lookup would go through `loop.defer`).
            answer = key_from_directory(self.directory, effect.group)
            self.node.provide_key(
                effect.group, answer.public_key, answer.ttl, self.loop.now, answer.reason
            )
        elif isinstance(effect, GroupChanged):
            self.dirty.add(effect.group)

    def _after(self) -> None:
        """Once the core is quiet: re-resolve the groups that changed."""
        now = self.loop.now
        while self.dirty:
            group = self.dirty.pop()
            if group == self._pool_group:
                self._sync_plane()
            self._refresh(group, now)
        if self.edge is not None:
            self.edge.sync(now)
            # Re-check the VIP's route the moment an advert lapses, not at the next
            # packet or sweep: new flows reach a live VIP router sooner.
            lapse = self.edge.next_lapse(now)
            if lapse is not None and lapse != self.lapse_check:
                self.lapse_check = lapse
                self.loop.call_at(lapse + 0.001, lambda: None)

    def _link_local(self, iface: str) -> ipaddress.IPv6Address | None:
        """`iface`'s link-local address. The kernel gives one only once the link has
        a carrier: one not there when the daemon started is looked for again."""
        address = self.link_local.get(iface)
        if address is None and self.family == 6:
            address = link_local(iface)
            if address is not None:
                self.link_local[iface] = address
                self.own.add(address)
        return address

    def _send(self, frame: Frame) -> None:
        sock = self.send_socks.get(frame.iface)
        if sock is None or frame.packet[0] >> 4 != self.family:
            return  # (a dual-stack core's frames of the other family: the other daemon's)
        hop = frame.next_hop
        try:
            peek = peek_v6 if self.family == 6 else peek_v4
            dst = peek(frame.packet)[1] if hop is None else hop
            packet = from_link_local(frame.packet, self._link_local(frame.iface))
            sock.sendto(packet, destination(dst, self.family, self.index_of[frame.iface]))
        except (OSError, WireError) as exc:
            log.warning("send on %s failed: %s", frame.iface, exc)

    # decisions -----------------------------------------------------------------------
    def _membership(self, group: int) -> tuple[Any, ...]:
        members = self.router.members.get(group, {})
        return (
            tuple(sorted((o, m.iface, m.neighbor, m.filter) for o, m in members.items())),
            frozenset(self.router.senders.get(group, {})),
            self.router.querier.starting,  # a starting router's entries also reach its neighbours
        )

    def _decide(
        self, source: int, group: int, parent: int, *, upcall: bool = False
    ) -> tuple[frozenset[int], frozenset[int]]:
        """The core's decision for (source, group) arriving on VIF `parent`, as VIFs."""
        members = self.router.members.get(group, {})
        owners = frozenset(o for o, m in members.items() if m.filter.matches(source))
        iface = self.iface_of_vif[parent]
        if not self.router.sender_allowed(iface, source, group, self.loop.now):
            if upcall:
                # The kernel drops the source's later packets by the empty entry,
                # unseen: the refusal is counted once per source, here.
                self.router.stats.rejected[Refusal.UNAUTHORIZED_SENDER] += 1
            return frozenset(), owners
        steered = self.steered.get((source, group))
        if steered is not None:
            return steered - {parent}, owners
        outs = frozenset(
            self.vif_of[i] for i, _ in self.router.resolve(source, group, iface) if i in self.vif_of
        )
        return outs - {parent}, owners

    def _refresh(self, group: int, now: float) -> None:
        """Membership of `group` changed: rewrite exactly the entries that move."""
        membership = self._membership(group)
        if self.seen.get(group) == membership:
            return  # a refresh that changed nothing
        self.seen[group] = membership
        live = set(self.router.members.get(group, {}))
        for source, entry in self.entries.get(group, {}).items():
            outs, owners = self._decide(source, group, entry.parent)
            if outs == entry.outs:
                entry.owners, entry.held = owners, None
                continue
            # Pin (R4) only a move: an entry that merely gains interfaces (a new
            # member of the control channel, say) is rewritten at once.
            moving = bool(entry.outs - outs)
            if self.pin_idle is not None and moving and entry.owners <= live:
                if entry.held is None:
                    entry.held = self.mroute.packets(source, group) or 0
                    self.stats.held += 1
                    self._check_pins_at(now + self.pin_idle)
                continue
            self._write(source, group, entry, outs, owners)

    def _write(
        self, source: int, group: int, entry: _Entry, outs: frozenset[int], owners: frozenset[int]
    ) -> None:
        self.mroute.set_entry(source, group, entry.parent, outs)
        entry.outs, entry.owners, entry.held = outs, owners, None
        self.stats.rewritten += 1

    def _check_pins_at(self, at: float) -> None:
        if not self.pin_check_due:
            self.pin_check_due = True
            self.loop.call_at(at, self._check_pins)

    def _check_pins(self) -> None:
        """Release the held entries whose counter stopped increasing."""
        self.pin_check_due = False
        waiting = False
        for group, sources in self.entries.items():
            live = set(self.router.members.get(group, {}))
            for source, entry in sources.items():
                if entry.held is None:
                    continue
                count = self.mroute.packets(source, group) or 0
                if count == entry.held or not entry.owners <= live:
                    outs, owners = self._decide(source, group, entry.parent)
                    self._write(source, group, entry, outs, owners)
                    self.stats.released += 1
                else:
                    entry.held = count
                    waiting = True
        if waiting and self.pin_idle is not None:
            self._check_pins_at(self.loop.now + self.pin_idle)

    # views ---------------------------------------------------------------------------
    def _status(self, _: dict[str, Any]) -> dict[str, Any]:
        stats = self.router.stats
        return {
            "node": self.router.name,
            "pid": os.getpid(),
            "membership": self.router.membership(),
            "entries": sum(len(s) for s in self.entries.values()),
            "held": sum(1 for s in self.entries.values() for e in s.values() if e.held is not None),
            "daemon": asdict(self.stats),
            "joins_accepted": stats.joins_accepted,
            "joins_relayed": stats.joins_relayed,
            "rejected": dict(stats.rejected),
            "vifs": {str(v): i for v, i in self.iface_of_vif.items()},
            "vip": None if self.edge is None else self.edge.status(),
            "plane": self._plane_status(),
        }

    def _metrics(self, _: dict[str, Any]) -> dict[str, Any]:
        """Prometheus text of this router (docs/metrics.md): the core's counters, with
        the entries installed in the kernel's table as its forwarding entries."""
        from manycast.observe import metrics

        if self._registry is None:

            def routers() -> list[metrics.RouterItem]:
                installed = sum(len(s) for s in self.entries.values())
                return [metrics.RouterItem(self.router, installed)]

            self._registry = metrics.registry(
                metrics.PoolCollector(now=lambda: self.loop.now, routers=routers)
            )
        return {"text": metrics.exposition(self._registry)}

    def run(self) -> None:
        """Serve until SIGTERM."""
        self.loop.ready()
        try:
            self.loop.run_until(float("inf"))
        finally:
            if self.edge is not None:
                self.edge.close()
            if self.portions is not None:
                with contextlib.suppress(PlaneError):
                    self.portions.remove()
            self.mroute.close()
            self.loop.close()
