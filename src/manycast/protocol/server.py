"""The manycast server agent: joins the group for its portions and serves them.

It joins the pool's group with a source-specific join whose masks are its
portions (Fig 9), and the control group with an any-source join (Fig 13). When
the allocation changes it leaves the old portions and joins the new ones in one
report (claim 3; a report too long for one packet goes out in parts that the
routers act on together, `membership.report_packets`), then deals with the
connections whose clients it no longer serves by the pool's technique
(`handover.py`: R1 reset, R2 forward, R3 state transfer, R4 pinned paths; D,
dynamic destination, in `redirect.py`: under D it also answers SYNs with its own
address as the destination and takes the connections' segments there, Fig 20-21).

A router's General Query (one that has just started, knowing nothing) is
answered with the current report within the query's Max Resp Time (`querier.py`).

Coordination (who is alive, which allocation is current) is the job of
`coordination.Coordinator`, which this agent feeds with control messages and
whose decisions it carries out.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter, deque
from dataclasses import dataclass, replace

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from manycast.errors import ConfigError
from manycast.protocol.app import Service
from manycast.protocol.coordination import Coordinator, PoolSettings
from manycast.protocol.dualstack import in_space
from manycast.protocol.handover import Edges, Handover
from manycast.protocol.host import HostStack
from manycast.protocol.membership import (
    FamilyFilters,
    Held,
    SourceFilter,
    any_source_record,
    report_packets,
    whole_record_for,
)
from manycast.protocol.node import Interface, Node
from manycast.protocol.querier import QueryResponder, is_query
from manycast.protocol.redirect import Redirector
from manycast.protocol.tcp import (
    ConnectionClosed,
    ConnectionReset,
    ConnectionTimedOut,
    ConnKey,
    DataReceived,
    Demultiplexer,
    Rekeyed,
    SessionConfig,
    StreamEnded,
    UnknownSegment,
)
from manycast.protocol.technique import Technique
from manycast.space import AddressSpace, Allocation, PortionSet
from manycast.wire import control
from manycast.wire.errors import WireError
from manycast.wire.ip import IPPROTO_TCP, IPPROTO_UDP, Address, InnerPacket
from manycast.wire.membership import GroupRecord, RecordType
from manycast.wire.report_split import WholeRecord

# A server keeps retransmitting an answer for 8 doubling timeouts (25.5 s from the
# 50 ms floor): longer than a client waits for a late answer (`abandon_after`), so a
# loss burst that outlasts a few retransmissions delays the answer, and does not
# make the server forget a connection its client still keeps (docs/soak.md
# finding 24; Linux's tcp_retries2 gives minutes). A SYN-ACK nobody acknowledges is
# given up after 5 (18.9 s from 0.3 s, as Linux's tcp_synack_retries): a client that
# took another server's SYN-ACK leaves a half-open connection here (finding 25).
DEFAULT_SESSION = SessionConfig(rto_initial=0.3, rto_min=0.05, max_retries=8, syn_retries=5)
HOT_BUCKETS = 256  # how many of its busiest buckets a congested server reports
APPLIED_KEPT = 4  # allocations remembered for `_previous_owner`


@dataclass
class ServerStats:
    sessions_opened: int = 0
    misrouted: int = 0
    reports_sent: int = 0  # report packets: each part of a split report counts
    control_sent: int = 0
    control_received: int = 0
    deaths_told: int = 0  # member-down notices sent to our router, as coordinator


class Server(Node):
    def __init__(
        self,
        name: str,
        interfaces: dict[str, Interface],
        gateway: tuple[str, Address],
        settings: PoolSettings,
        rng: random.Random,
        *,
        initial: Allocation | None,
        service: Service,
        session: SessionConfig | None = None,
        key: Ed25519PrivateKey | None = None,
        edges: Edges = (),
        pool_key: Ed25519PrivateKey | None = None,
        redirect_above: float = 0.0,
        gateway6: Address | None = None,
    ) -> None:
        """`edges`: every client network with its edge router, where R4 tags the
        connections we give up. `pool_key`: technique D signs change-destinations with
        it; `redirect_above`: under D, a server whose load is above this times the
        pool's mean passes new connections to a less loaded server (0: never).
        `gateway6`: a dual-stack pool's server's IPv6 router on its link."""
        super().__init__(name, interfaces)
        self.key = key  # a private pool's key: every join is signed with it
        iface, router = gateway
        self.settings = settings
        self.rng = rng
        self.address = interfaces[iface].address
        self.router = router
        self.session = session or DEFAULT_SESSION
        self.endpoint = Demultiplexer(rng, self.session)
        # A dual-stack pool's server: an IPv6 address too, and the same buckets of the
        # IPv6 space (`dualstack.py`).
        self.address6 = interfaces[iface].address6 if settings.space6 is not None else None
        self.router6 = gateway6
        self.portions6: PortionSet | None = None
        self._filter6: SourceFilter | None = None
        self.host = HostStack(
            iface, self.address, router, self.endpoint, self.outbox.append, self.address6, gateway6
        )
        self.app = service
        self.stats = ServerStats()
        self.coordinator = Coordinator(name, self.address, settings, rng, initial=initial)
        self.coordinator.on_offer = self._prepare
        self.coordinator.hot_buckets = self._hot_buckets
        self._bucket_requests: Counter[int] = Counter()
        self._bucket_since = 0.0
        self.portions: PortionSet | None = None
        self._servers_held: tuple[str, ...] = initial.servers if initial is not None else ()
        self._filter: SourceFilter | None = None
        self.redirect_above = redirect_above
        self._loads_settle = 0.0  # loads are averages: trust them from then on
        self.redirector: Redirector | None = None
        if settings.technique == Technique.D and not settings.vip:
            if pool_key is None:
                raise ConfigError("technique D needs the pool's key to sign with")
            self.redirector = Redirector(
                name,
                self.address,
                settings.group,
                settings.port,
                self.endpoint,
                self.app,
                self.host,
                # through the technique's sender, whatever wraps it (counters, tests)
                lambda message, to: self.handover.send_control(message, to),
                self.session,
                rng,
                pool_key,
                settings.wall_base,
                owner_of=self._owner_address,
                owned=self._serves,
                serving=lambda: self._filter is not None,
                less_loaded=self._less_loaded,
                alive=self._alive,
                epoch=lambda: self.coordinator.epoch,
                address6=self.address6,
                group6=settings.group6,
            )
        self.handover = Handover(
            settings.technique,
            name,
            self.address,
            settings.group,
            settings.port,
            self.endpoint,
            self.app,
            self.host,
            self._send_control,
            self.session,
            rng,
            close_after_transaction=settings.close_after_transaction,
            edges=edges,
            redirector=self.redirector,
            group6=settings.group6,
            address6=self.address6,
            previous_owner=self._previous_owner,
            serves=None if settings.vip else self._serves,
            keeps=None if settings.vip else self._keeps,
            alive=self._alive,
        )
        # The latest allocations we applied, the newest last (`_previous_owner`).
        self._applied: deque[Allocation] = deque(maxlen=APPLIED_KEPT)
        # Our label-switched tree: a VIP pool's flows (Fig 17) and R4's pinned paths
        # (Fig 16) come down it; our router is its last hop.
        self.roots_tree = settings.vip or self.handover.technique is Technique.R4
        self._seq = 0
        self._generation = 0  # our membership reports, numbered (a split one's parts share it)
        # A (re)started router's General Query: our current report at once (`querier.py`).
        self.queries = QueryResponder(rng)

    # -- node interface -----------------------------------------------------------------
    def start(self, now: float) -> None:
        port = self.settings.port
        self._loads_settle = now + 3 * self.settings.load_smoothing
        # D (Fig 20): our SYN-ACKs give clients our own address to send the rest to.
        # A dual-stack pool's server gives each client its address of the client's family.
        dynamic = self.redirector is not None
        self.endpoint.listen(
            port,
            destination=(self.address, port) if dynamic else None,
            destination6=(self.address6, port) if dynamic and self.address6 else None,
        )
        self.coordinator.start(now)
        self._send_report(now, refresh=True)  # the control channel, before any portion
        self._act(now)

    def receive(self, iface: str, packet: bytes, now: float) -> None:
        ip = self.host.parse(packet)
        if ip is None:
            return
        protocol, dst = ip.protocol, ip.header.dst
        if protocol == IPPROTO_TCP and (dst == self.settings.group or dst == self.settings.group6):
            # A VIP pool's flows come to whichever server the VIP router chose for them.
            vip = self.settings.vip
            if (
                not vip
                and not self._knows(ip)
                and (not self._serves(ip.header.src) or self._yielding(now))
            ):
                # Neither our client nor a connection we keep (a stale route during a
                # change): drop it; the client retransmits to the new owner.
                self.stats.misrouted += 1
                return
            if self.redirector is not None and self.redirector.pass_syn(ip, packet, now):
                self._act(now)  # a new connection for a less loaded server (Fig 20)
                return
            self.host.deliver_tcp(ip, now)
        elif (
            protocol == IPPROTO_TCP
            and (dst == self.address or dst == self.address6)
            and self.redirector is not None
        ):
            # D: a connection its client sends to us point to point (Fig 20-21).
            self.host.deliver_tcp(ip, now)
            payload = ip.payload
            if len(payload) >= 4:
                key: ConnKey = (
                    (dst, int.from_bytes(payload[2:4], "big")),
                    (ip.header.src, int.from_bytes(payload[:2], "big")),
                )
                self.redirector.on_direct(key, now)
        elif protocol == IPPROTO_UDP and dst in (self.settings.control_group, self.address):
            self._on_control(ip, now)
        elif is_query(ip):
            answer_at = self.queries.on_query(ip, now)
            if answer_at is not None:
                self.timers.arm("query", answer_at)
        self._act(now)

    def on_timer(self, now: float) -> None:
        if self.timers.expired(now):  # the periodic report, or the answer to a query
            self._send_report(now, refresh=True)
        self.coordinator.on_timer(now)
        self.handover.forget_servers(self.coordinator.dead_addresses(now))
        self.handover.on_timer(now)
        self.endpoint.handle_timer(now)
        self._act(now)

    def next_deadline(self) -> float | None:
        deadlines = (
            self.timers.next_deadline(),
            self.endpoint.next_deadline(),
            self.coordinator.next_deadline(),
            self.handover.next_deadline(),
        )
        return min((d for d in deadlines if d is not None), default=None)

    # -- operator --------------------------------------------------------------------------
    def command(self, op: control.PolicyOp, now: float) -> None:
        """An operator's request (the CLI or a scenario): pass it to the pool."""
        self.coordinator.command(op, now)
        self._act(now)

    @property
    def sessions(self) -> int:
        return len(self.app)

    def _serves(self, client: Address) -> bool:
        """Whether `client` is ours (in a dual-stack pool, by its family's filter)."""
        held = self._held()
        return held is not None and held.owns(client)

    def _keeps(self, client: Address, now: float) -> bool:
        """R3: whether a connection of `client` we hold stays here when another server
        asks for it: we serve the client, and our view of the allocation does not
        yield to another (`_yielding`)."""
        return self._serves(client) and not self._yielding(now)

    def _yielding(self, now: float) -> bool:
        """Whether our part of the pool is outnumbered (`Coordinator.outnumbered`).
        Meanwhile the other part's servers serve the clients: we take no connection we
        do not hold (both would take a client's SYN, each with its own sequence
        numbers), and give the ones we hold when asked (docs/soak.md, finding 13). A
        server that outlived the others hears none of them, and serves everyone."""
        return self.coordinator.outnumbered(now)

    def _held(self) -> Held | None:
        """What we serve, as the technique sees it (a dual-stack pool's: both families)."""
        if self.settings.space6 is None:
            return self._filter
        return FamilyFilters(self._filter, self._filter6)

    def _knows(self, ip: InnerPacket) -> bool:
        payload = ip.payload
        if len(payload) < 4:
            return False
        key: ConnKey = (
            (ip.header.dst, int.from_bytes(payload[2:4], "big")),
            (ip.header.src, int.from_bytes(payload[:2], "big")),
        )
        return self.endpoint.resolve(key) is not None

    # -- technique D: whom to move a connection to, whom to pass one to -------------------
    def _owner_address(self, client: Address) -> Address | None:
        """The unicast address of the server that owns `client` now, if we know it."""
        return self._owner_in(client, self.coordinator.allocation)

    def _owner_in(self, client: Address, allocation: Allocation | None) -> Address | None:
        """The unicast address of `client`'s owner in `allocation`, if we know it (its
        control-channel address: a dual-stack pool's IPv4 one, whatever the client's
        family; the owner of a dual-stack pool's IPv6 client by the same buckets of the
        IPv6 space)."""
        space6 = self.settings.space6
        if allocation is not None and space6 is not None and client.version == 6:
            allocation = in_space(allocation, space6)
        owner = allocation.owner(client) if allocation is not None else None
        if owner is None or owner == self.name:
            return None if owner is None else self.address
        peer = self.coordinator.peers.get(owner)
        if peer is None or not int(peer.address):  # not heard from yet (NO_ADDRESS)
            return None
        return peer.address

    def _less_loaded(self, now: float) -> Address | None:
        """Fig 20's second server: when our load is above `redirect_above` times the
        mean of the live serving servers' loads (the pool's load loop, heartbeats), one
        of those below the mean, at random; None when we are not overloaded."""
        coordinator = self.coordinator
        allocation = coordinator.allocation
        if (
            self.redirect_above <= 0
            or allocation is None
            or self._filter is None
            or now < self._loads_settle
        ):
            return None
        alive = set(coordinator.alive(now))
        loads = {self.name: coordinator.load_watch.load}
        addresses: dict[str, Address] = {}
        for peer in coordinator.peers.values():
            if (
                peer.name in alive
                and peer.name in allocation.servers
                and allocation.count(peer.name) > 0
                and int(peer.address)  # heard from (not NO_ADDRESS)
            ):
                loads[peer.name] = peer.load
                addresses[peer.name] = peer.address
        mean = sum(loads.values()) / len(loads)
        if len(loads) < 2 or mean <= 0 or loads[self.name] <= self.redirect_above * mean:
            return None
        idle = sorted(name for name in addresses if loads[name] < mean)
        return addresses[self.rng.choice(idle)] if idle else None

    # -- control channel ---------------------------------------------------------------------
    def _on_control(self, ip: InnerPacket, now: float) -> None:
        datagram = self.host.parse_udp(ip)
        if datagram is None or datagram.dst_port != self.settings.control_port:
            return
        try:
            message = control.decode(datagram.payload)
        except WireError:
            self.host.counters.malformed += 1
            return
        if message.sender == self.name:
            return
        self.stats.control_received += 1
        via_group = ip.header.dst == self.settings.control_group
        was_dead = self.coordinator.held_dead(message.sender, now)
        if not self.handover.on_message(message, now, via_group, ip.header.src):
            self.coordinator.on_message(message, now)
        if was_dead and not self.coordinator.held_dead(message.sender, now):
            # Alive again to the pool (a router between us restarted, a partition
            # healed): it may hold the states our R3 queries wait for.
            self.handover.peer_returned(now, ip.header.src)

    def _send_control(self, message: control.ControlMessage, to: Address | None) -> None:
        """To the control group, or to one server or router (point to point)."""
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        payload = _with_seq(message, self._seq).to_wire()
        port = self.settings.control_port
        self.host.send_udp(self.settings.control_group if to is None else to, port, port, payload)
        self.stats.control_sent += 1

    def _act(self, now: float) -> None:
        """Carry out what the coordinator decided, then flush the session layer."""
        for message, to in self.coordinator.take_addressed():
            if to is None or to.version == self.address.version:  # (the pool's family)
                self._send_control(message, to)
        allocation = self.coordinator.take_new_allocation()
        if allocation is not None:
            self._apply(allocation, now)
        self.coordinator.report_load(self.app.requests, len(self.app), now)
        self._drain(now)

    # -- allocation ------------------------------------------------------------------------
    def _prepare(self, allocation: Allocation) -> None:
        """A change is about to execute: the technique gets ready (R4 tags the
        connections we will lose onto our tree)."""
        if self.settings.vip:
            return  # tagged flows keep their server: nothing moves
        keep = allocation.portions(self.name) if self.name in allocation.servers else PortionSet()
        four = SourceFilter.of(keep) if len(keep) else None
        kept: Held | None = four
        space6 = self.settings.space6
        if space6 is not None:
            keep6 = self._portions_in(allocation, space6)
            kept = FamilyFilters(four, SourceFilter.of(keep6) if len(keep6) else None)
        self.handover.before_change(kept)

    def _hot_buckets(self, now: float) -> list[control.BucketLoad]:
        """Our busiest buckets since the last allocation change, as requests per second."""
        elapsed = max(now - self._bucket_since, 1e-9)
        busiest = self._bucket_requests.most_common(HOT_BUCKETS)
        return sorted(control.BucketLoad(b, n / elapsed) for b, n in busiest)

    def _alive(self, address: Address, now: float) -> bool:
        """Whether the server at `address` is one our view counts alive."""
        return address not in self.coordinator.dead_addresses(now)

    def _previous_owner(self, client: Address) -> Address | None:
        """Who owned `client` before it was ours, by the changes we applied before the
        latest: where R3 asks first for the state of a connection of it we do not
        know. Two changes can pass between a client's packets (a join gives it to us,
        a death follows); the owner before the latest is then ourselves, and the
        state is at the owner before that (docs/soak.md, finding 27)."""
        for allocation in list(self._applied)[-2::-1]:
            owner = self._owner_in(client, allocation)
            if owner not in (self.address, self.address6):
                return owner
        return None

    def _apply(self, allocation: Allocation, now: float) -> None:
        self._applied.append(allocation)
        self._tell_routers_of_deaths(allocation, now)
        self._bucket_requests.clear()
        self._bucket_since = now
        old = self.portions
        new = allocation.portions(self.name) if self.name in allocation.servers else PortionSet()
        self.portions = new
        self._filter = SourceFilter.of(new) if len(new) else None
        old6 = self.portions6
        if self.settings.space6 is not None:
            self.portions6 = self._portions_in(allocation, self.settings.space6)
            self._filter6 = SourceFilter.of(self.portions6) if len(self.portions6) else None
        if old != new or self.settings.vip:
            # (Portions unchanged: the routers have them; in a large pool most servers
            # keep theirs through a change, and each report reaches every router.)
            self._send_report(now, refresh=False, previous=old, previous6=old6)
        if not self.settings.vip:
            self.handover.after_change(self._held(), now)

    def _portions_in(self, allocation: Allocation, space: AddressSpace) -> PortionSet:
        """Our buckets of `allocation`, written in another family's `space`."""
        if self.name not in allocation.servers:
            return PortionSet()
        return in_space(allocation, space).portions(self.name)

    def _tell_routers_of_deaths(self, allocation: Allocation, now: float) -> None:
        """As coordinator, tell our router of each server this change removed because
        the pool stopped hearing from it: the routers drop its membership at once (and
        pass the notice on) instead of holding it until it times out."""
        held = self._servers_held
        self._servers_held = allocation.servers
        if not self.coordinator.is_coordinator(now):
            return
        dead = self.coordinator.dead_addresses(now)
        for name in sorted(set(held) - set(allocation.servers)):
            peer = self.coordinator.peers.get(name)
            if peer is None or peer.address not in dead:
                continue  # it left on purpose: its own report ends its membership
            if peer.address.version != self.address.version:
                continue  # an IPv6 pool's peer never heard from: no address of ours
            told = [(self.settings.group, peer.address, self.address, self.router)]
            group6, address6, router6 = self.settings.group6, self.address6, self.router6
            dead6 = self.settings.member_addresses6.get(name)
            if group6 is not None and address6 is not None and router6 is not None and dead6:
                # A dual-stack pool: its IPv6 routers drop its MLDv2 membership too.
                told.append((group6, dead6, address6, router6))
            for group, member, signer, router in told:
                self._tell_death(group, member, signer, router, now)

    def _tell_death(
        self, group: Address, member: Address, signer: Address, router: Address, now: float
    ) -> None:
        wall_ms = int((self.settings.wall_base + now) * 1000)
        notice = control.MemberDown(
            self.name,
            0,
            group,
            member,
            signer,
            self.coordinator.epoch,
            wall_ms,
            self.rng.randbytes(8),
        )
        if self.key is not None:
            notice = dataclasses.replace(notice, signature=self.key.sign(notice.signed_bytes()))
        self._send_control(notice, router)
        self.stats.deaths_told += 1

    def _send_report(
        self,
        now: float,
        *,
        refresh: bool,
        previous: PortionSet | None = None,
        previous6: PortionSet | None = None,
    ) -> None:
        records: list[GroupRecord | WholeRecord] = [
            any_source_record(self.settings.control_group, RecordType.MODE_IS_EXCLUDE)
        ]
        if self.roots_tree:
            self._hello(now)
        if not self.settings.vip:  # a VIP pool's server joins the control channel only
            records += _portion_records(self.settings.group, self.portions, previous, refresh)
        wall_ms = int((self.settings.wall_base + now) * 1000)
        self._generation = (self._generation + 1) & 0xFFFFFFFF
        # Fragmented portions make a long report: it goes out in as many packets as
        # the link's MTU needs, each signed on its own (RFC 3376 4.2.16).
        reports = [(records, self.address, self.host.gateway)]
        vip = self.settings.vip
        group6, address6, router6 = self.settings.group6, self.address6, self.router6
        if group6 is not None and address6 is not None and router6 is not None and not vip:
            # A dual-stack pool: the same buckets in an MLDv2 report for the IPv6 group
            # (a VIP pool's: none, its IPv6 VIP is no group).
            records6 = _portion_records(group6, self.portions6, previous6, refresh)
            reports.append((records6, address6, int(router6)))
        for part_records, requester, gateway in reports:
            for packet in report_packets(
                part_records, requester, wall_ms, self._generation, self.rng, self.key
            ):
                self.send(self.host.iface, packet, gateway)
                self.stats.reports_sent += 1
        self.timers.arm("report", now + self.settings.report_interval_s)
        if refresh:  # a current-state report answers any query pending
            self.timers.cancel("query")
            self.queries.reported(now)

    def _hello(self, now: float) -> None:
        """Tell our router we serve the pool here (its VIP, or its group under R4): the
        root of our label-switched tree (Fig 17)."""
        hold_ms = max(1, int(self.settings.report_interval_s * 3500))
        hello = control.ServerHello(self.name, 0, self.address, self.settings.group, hold_ms)
        self._send_control(hello, self.router)
        group6, address6, router6 = self.settings.group6, self.address6, self.router6
        if group6 is not None and address6 is not None and router6 is not None:
            # A dual-stack pool: our tree in the IPv6 routers' logic too, rooted at our
            # IPv6 address (its IPv6 clients' connections are pinned on it).
            hello6 = control.ServerHello(self.name, 0, address6, group6, hold_ms)
            self._send_control(hello6, router6)

    # -- sessions ------------------------------------------------------------------------------
    def _drain(self, now: float) -> None:
        for key, event in self.endpoint.events():
            if isinstance(event, UnknownSegment):
                self.handover.on_unknown(event.src, event.dst, event.segment, now)
            elif isinstance(event, DataReceived):
                if key not in self.app:
                    self.app.open(key)
                    self.stats.sessions_opened += 1
                answered = self.app.requests
                answer = self.app.on_data(key, event.data)
                if self.app.requests > answered:
                    client = key[1][0]
                    space6 = self.settings.space6
                    space = space6 if space6 is not None and client.version == 6 else None
                    bucket = (space or self.settings.space).bucket(int(client))
                    self._bucket_requests[bucket] += self.app.requests - answered
                conn = self.endpoint.connection(key)
                if answer and conn is not None:
                    conn.send(answer, now)
                    self.handover.on_answer(key, conn, now)
            elif isinstance(event, StreamEnded):
                conn = self.endpoint.connection(key)
                if conn is not None:
                    conn.close(now)
            elif isinstance(event, ConnectionClosed | ConnectionReset | ConnectionTimedOut):
                self.app.close(key)
                self.handover.on_closed(key)
            elif isinstance(event, Rekeyed):
                # The client sends to our own address now (D, Fig 20): same session.
                if event.previous in self.app:
                    state = self.app.export(event.previous)
                    self.app.close(event.previous)
                    self.app.restore(key, state)
                self.handover.on_rekeyed(event.previous, key, now)
        self.host.flush()


def _portion_records(
    group: Address, portions: PortionSet | None, previous: PortionSet | None, refresh: bool
) -> list[GroupRecord | WholeRecord]:
    """The records that join `group` for `portions`: the current state, or (claim 3)
    leaving the `previous` portions and joining the new ones in one report."""
    records: list[GroupRecord | WholeRecord] = []
    if refresh:
        if portions is not None and len(portions):
            records.append(whole_record_for(group, portions, RecordType.MODE_IS_INCLUDE))
        return records
    if previous is not None and len(previous):
        records.append(whole_record_for(group, previous, RecordType.BLOCK_OLD_SOURCES))
    if portions is not None and len(portions):
        records.append(whole_record_for(group, portions, RecordType.ALLOW_NEW_SOURCES))
    return records


def _with_seq(message: control.ControlMessage, seq: int) -> control.ControlMessage:
    """The message stamped with our sequence number (the envelope's `seq`)."""
    return replace(message, seq=seq) if message.seq != seq else message
