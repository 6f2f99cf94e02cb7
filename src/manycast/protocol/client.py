"""A manycast client: resolves the service, keeps a session open, sends requests.

The client knows nothing of servers: it sends to the well-published group
address and whichever server owns its source address answers (from that same
address). After a reset or a timeout it reconnects, and its next SYN reaches
the portion's current owner. Every request's outcome and latency is recorded.

Its SYN offers tag and cookie (Fig 20), unless it is a client without the
extension: then it stays on the group address. A SYN-ACK that gives a
destination is followed (the rest of the connection goes there point to
point), and a change-destination is followed once `destination.DestinationGuard`
accepts it: signed with the key the pool publishes in DNS, which the client
asks its owner for (`PoolKeyNeeded`, answered by `provide_key`), fresh and not
replayed (Fig 21). Refused ones are counted by reason and change nothing.
"""

from __future__ import annotations

import ipaddress
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from manycast.auth import sign_join
from manycast.protocol.app import Answer, Session, SessionFactory
from manycast.protocol.destination import DestinationGuard, PoolKeyNeeded, Verdict
from manycast.protocol.host import HostStack
from manycast.protocol.membership import record_for
from manycast.protocol.node import Interface, Node
from manycast.protocol.querier import QueryResponder, is_query
from manycast.protocol.refusal import RedirectRefusal
from manycast.protocol.tcp import (
    ChangeDestinationIgnored,
    ChangeDestinationReceived,
    ConnectionClosed,
    ConnectionReset,
    ConnectionTimedOut,
    ConnKey,
    DataReceived,
    Demultiplexer,
    EndpointEvent,
    Rekeyed,
    SessionConfig,
    SessionError,
    State,
    StreamEnded,
    UnknownSegment,
)
from manycast.protocol.tcp import Connected as SessionConnected
from manycast.protocol.tcp.config import CLIENT_REQUEST_TIMEOUT_S, client_session
from manycast.space import Portion, PortionSet
from manycast.wire.ip import IPPROTO_TCP, Address
from manycast.wire.membership import (
    IGMPv3Report,
    MLDv2Report,
    RecordType,
    SignedJoin,
    igmp_packet,
    mld_packet,
)
from manycast.wire.transport import ChangeDestination

MAX_HELD = 64  # segments from a new destination kept while its change waits for the key

Resolver = Callable[[str], tuple[Address, int]]


# Reconnect delays (s): after a reset from a live server, and after anything else.
RESET_RECONNECT_S = 0.01
RECONNECT_S = (0.02, 0.1)


def registration(
    address: Address,
    group: Address,
    key: Ed25519PrivateKey,
    wall: float,
    rng: random.Random,
) -> bytes:
    """A participant's registration as it goes on the wire: a signed join for `group`
    whose only include mask is `address` itself (/32, or /128 in an IPv6 pool: an
    MLDv2 report), so that its first-hop router lets it send to the private group
    without delivering the group's traffic to it.

    `wall` is the sender's wall clock (seconds since the Unix epoch), which routers
    check against theirs; `rng` gives the join's random key (no two joins alike).
    """
    if address.version != group.version:
        raise ValueError(f"a registration from {address} cannot name group {group}")
    me = PortionSet((Portion(address.version, int(address), (1 << address.max_prefixlen) - 1),))
    record = record_for(group, me, RecordType.MODE_IS_INCLUDE)
    signed = SignedJoin(int(wall * 1000), address, rng.randbytes(8))
    if isinstance(address, ipaddress.IPv6Address):
        assert isinstance(group, ipaddress.IPv6Address)
        return mld_packet(sign_join(MLDv2Report((record,), signed), key), address).to_wire()
    return igmp_packet(sign_join(IGMPv3Report((record,), signed), key), address).to_wire()


@dataclass
class ClientStats:
    requests_ok: int = 0
    requests_failed: int = 0
    resets: int = 0
    timeouts: int = 0
    reconnects: int = 0
    connects: int = 0
    state_lost: int = 0
    late_answers: int = 0  # answers that came after their request had failed its deadline
    latencies: list[float] = field(default_factory=list)
    ok_times: list[float] = field(default_factory=list)
    failures: list[tuple[float, str]] = field(default_factory=list)
    disruptions: list[float] = field(default_factory=list)  # failed requests, resets, timeouts
    # Fig 20-21: SYN-ACK destinations followed, change-destinations accepted (when, and
    # their serial), and the ones refused, by reason
    destinations_followed: int = 0
    destination_changes: int = 0
    moves: list[tuple[float, int]] = field(default_factory=list)
    redirects_refused: Counter[RedirectRefusal] = field(default_factory=Counter)

    def first_ok_after(self, t: float) -> float | None:
        """When the first request completed successfully after time `t`."""
        import bisect

        i = bisect.bisect_right(self.ok_times, t)
        return self.ok_times[i] if i < len(self.ok_times) else None


class Client(Node):
    def __init__(
        self,
        name: str,
        interfaces: dict[str, Interface],
        gateway: tuple[str, Address],
        service: str,
        resolve: Resolver,
        rate: float,
        rng: random.Random,
        *,
        app: SessionFactory,
        session: SessionConfig | None = None,
        request_timeout: float = CLIENT_REQUEST_TIMEOUT_S,
        abandon_after: float | None = None,
        start_spread: float = 1.0,
        key: Ed25519PrivateKey | None = None,
        wall_base: float = 0.0,
        register_every: float = 1.0,
        requests_per_connection: int = 0,
        dynamic_destination: bool = True,
    ) -> None:
        super().__init__(name, interfaces)
        # A private pool's participants sign a join that registers them as senders.
        self.key = key
        self.wall_base = wall_base
        self.register_every = register_every
        iface, router = gateway
        self.address = interfaces[iface].address
        self.rng = rng
        self.service = service
        self.resolve = resolve
        self.rate = rate
        # A request unanswered `request_timeout` after it left has failed. With
        # `abandon_after` longer, that fails the request, not the connection (as a
        # gRPC call's deadline): the connection stays, its late answer is still
        # checked, and it is given up when its oldest request has waited
        # `abandon_after` or its transport gives up. None: at the deadline, as a
        # client that closes a connection on its first timeout.
        self.request_timeout = request_timeout
        self.abandon_after = request_timeout if abandon_after is None else abandon_after
        if self.abandon_after < request_timeout:
            raise ValueError("abandon_after must be at least request_timeout")
        self._late: set[int] = set()  # requests past their deadline still outstanding
        self.start_spread = start_spread
        self.endpoint = Demultiplexer(rng, session or client_session())
        self.host = HostStack(iface, self.address, router, self.endpoint, self.outbox.append)
        self.stats = ClientStats()
        self.conn_key: object | None = None
        # (SRTT, RTTVAR) of the last connection that measured one: the next SYN's timer.
        self._rtt: tuple[float, float] | None = None
        self.new_session = app
        self.app: Session | None = None
        self._port = 20000 + rng.randrange(20000)
        self.connected = False
        # Short connections (as HTTP clients open them): after this many answers the
        # client closes its connection and opens a new one, a new flow (0: one for good).
        self.requests_per_connection = requests_per_connection
        self._answered_here = 0
        # Fig 20-21: offer tag and cookie, follow destinations (False: a plain client)
        self.dynamic_destination = dynamic_destination
        self.guard = DestinationGuard(wall_base)
        self.stats.redirects_refused = self.guard.stats.refused
        self._held: list[UnknownSegment] = []
        # A private pool's participant answers a router's General Query (one that has
        # just started, knowing no sender) with its registration, not a second later.
        self.queries = QueryResponder(rng)

    # -- node interface --------------------------------------------------------
    def start(self, now: float) -> None:
        # A private pool's participant registers when it first connects (`_connect`):
        # clients started together must not sign and send their registrations
        # together, every interval from then on (as IGMP's hosts spread their
        # reports), or each first-hop router checks hundreds of signatures at once.
        self.timers.arm("connect", now + self.rng.uniform(0, self.start_spread))

    def receive(self, iface: str, packet: bytes, now: float) -> None:
        ip = self.host.parse(packet)
        if ip is None:
            return
        if is_query(ip):
            if self.key is not None and (answer_at := self.queries.on_query(ip, now)):
                self.timers.arm("register", answer_at)
            return
        if ip.protocol != IPPROTO_TCP or ip.header.dst != self.address:
            return
        self.host.deliver_tcp(ip, now)
        self._drain(now)

    def on_timer(self, now: float) -> None:
        for name in self.timers.expired(now):
            if name == "connect":
                self._connect(now)
            elif name == "request":
                self._request(now)
            elif name == "deadline":
                self._check_deadline(now)
            elif name == "register":
                self._register(now)
        self.endpoint.handle_timer(now)
        self._drain(now)

    def next_deadline(self) -> float | None:
        mine = self.timers.next_deadline()
        theirs = self.endpoint.next_deadline()
        if mine is None:
            return theirs
        return mine if theirs is None else min(mine, theirs)

    def set_rate(self, rate: float, now: float) -> None:
        self.rate = rate
        if rate > 0 and self.connected and not self.timers.armed("request"):
            self.timers.arm("request", now)

    # -- behaviour ---------------------------------------------------------------
    def _register(self, now: float) -> None:
        """A signed join naming only ourselves: we take part in the pool as a sender."""
        assert self.key is not None
        group, _ = self.resolve(self.service)
        packet = registration(self.address, group, self.key, self.wall_base + now, self.rng)
        self.send(self.host.iface, packet, self.host.gateway)
        self.queries.reported(now)
        self.timers.arm("register", now + self.register_every)

    def _connect(self, now: float) -> None:
        if self.key is not None and not self.timers.armed("register"):
            self._register(now)  # the first registration, before the first packet
        group, port = self.resolve(self.service)
        self._port = 20000 + (self._port - 20000 + 1 + self.rng.randrange(97)) % 40000
        offer = self.dynamic_destination
        conn = self.endpoint.connect(
            (self.address, self._port), (group, port), now, offer=offer, follow=offer, rtt=self._rtt
        )
        self.conn_key = conn.key
        self.guard.begin()
        self._held.clear()
        self.app = self.new_session()
        self._late.clear()
        self._answered_here = 0
        self.connected = False
        self.stats.connects += 1

    def _request(self, now: float) -> None:
        if not self.connected or self.app is None or self.conn_key is None or self.rate <= 0:
            return
        conn = self.endpoint.connection(self.conn_key)  # type: ignore[arg-type]
        if conn is None or conn.state is not State.ESTABLISHED:
            return
        # Kept here, while the connection lives: a reset removes it before we hear.
        self._rtt = conn.rtt_estimate or self._rtt
        if not self.app.outstanding:
            conn.send(self.app.request(1 + self.rng.randrange(9), now), now)
            self.timers.arm("deadline", now + self.request_timeout)
        self.timers.arm("request", now + self.rng.uniform(0.5, 1.5) / self.rate)

    def _check_deadline(self, now: float) -> None:
        if self.app is None or not self.app.outstanding:
            return
        sent = self.app.outstanding
        oldest = min(t for t, _ in sent.values())
        # The same expressions the timer was armed with: no rounding can make it fire
        # early forever.
        if now >= oldest + self.abandon_after:
            self._fail_outstanding(now, "no answer")
            if self.conn_key is not None:
                conn = self.endpoint.connection(self.conn_key)  # type: ignore[arg-type]
                if conn is not None:
                    conn.abort(now)
            self._lost(now, cause="no answer")
            return
        limit = self.request_timeout
        due = [s for s, (t, _) in sent.items() if s not in self._late and now >= t + limit]
        for _ in due:
            self._failed(now, "no answer")
        self._late.update(due)
        waiting = [t + limit for s, (t, _) in sent.items() if s not in self._late]
        self.timers.arm("deadline", min([oldest + self.abandon_after, *waiting]))

    def _failed(self, now: float, reason: str) -> None:
        self.stats.requests_failed += 1
        self.stats.failures.append((now, reason))
        self.stats.disruptions.append(now)

    def _fail_outstanding(self, now: float, reason: str) -> None:
        """Every outstanding request has failed (those past their deadline already
        counted)."""
        if self.app is None:
            return
        for sequence in self.app.outstanding:
            if sequence not in self._late:
                self._failed(now, reason)
        self.app.outstanding.clear()
        self._late.clear()

    def _lost(self, now: float, reset: bool = False, cause: str = "") -> None:
        """The session is gone: reconnect soon, to whichever server owns us now.

        A reset is a live server saying it does not hold the session (R1 after a
        reallocation or a death): the SYN goes at once, jittered by at most
        `RESET_RECONNECT_S` so a portion's clients do not arrive in one burst, and timed
        by the old connection's round trip (a SYN that reaches a server before the
        routers changed is sent again after about one round trip, not `rto_initial`).
        After a timeout or an unanswered request nothing says the path works again,
        so the wait is longer. `cause` says why, for whoever watches the calls
        (bench/soak.py)."""
        self.connected = False
        self.conn_key = None
        self.timers.cancel("request")
        self.timers.cancel("deadline")
        self.stats.reconnects += 1
        low, high = (0.0, RESET_RECONNECT_S) if reset else RECONNECT_S
        self.timers.arm("connect", now + self.rng.uniform(low, high))

    def _on_answers(self, answers: list[Answer], now: float) -> None:
        for answer in answers:
            # A late answer was counted failed at its deadline; it is still checked:
            # a wrong total means the session's state was lost.
            late = answer.sequence in self._late
            if late:
                self._late.discard(answer.sequence)
                self.stats.late_answers += 1
            if answer.ok:
                if not late:
                    self._answered_here += 1
                    self.stats.requests_ok += 1
                    self.stats.latencies.append(answer.latency)
                    self.stats.ok_times.append(now)
                continue
            if late:
                self.stats.failures.append((now, answer.reason))
                self.stats.disruptions.append(now)
            else:
                self._failed(now, answer.reason)
            if answer.reason.startswith("state lost"):
                self.stats.state_lost += 1
        if self.app is not None and not self.app.outstanding:
            self.timers.cancel("deadline")
            limit = self.requests_per_connection
            if limit and self._answered_here >= limit:
                self._next_connection(now)

    def _on_events(self, events: list[tuple[ConnKey, EndpointEvent]], now: float) -> None:
        for key, event in events:
            if isinstance(event, Rekeyed):
                if event.previous == self.conn_key:
                    # The SYN-ACK gave a destination (Fig 20): the rest goes there.
                    self.conn_key = key
                    self.stats.destinations_followed += 1
                    self.guard.prefetch(now)
                continue
            if isinstance(event, UnknownSegment):
                self._hold(event)
                continue
            if key != self.conn_key:
                continue
            if isinstance(event, ChangeDestinationReceived):
                self._on_change(event.message, now)
            elif isinstance(event, ChangeDestinationIgnored):
                self.stats.redirects_refused[event.reason] += 1
            elif isinstance(event, SessionConnected):
                self.connected = True
                self.timers.arm("request", now)
            elif isinstance(event, DataReceived) and self.app is not None:
                self._on_answers(self.app.on_data(event.data, now), now)
            elif isinstance(event, StreamEnded):
                # The server closed the session (after a transaction): close our side
                # and open a new one, which reaches the current owner.
                conn = self.endpoint.connection(key)
                if conn is not None:
                    conn.close(now)
                self._fail_outstanding(now, "closed by the server")
                self._lost(now, cause="closed by the server")
            elif isinstance(event, ConnectionReset | ConnectionTimedOut | ConnectionClosed):
                if isinstance(event, ConnectionReset) and event.remote:
                    self.stats.resets += 1
                self.stats.disruptions.append(now)
                if isinstance(event, ConnectionTimedOut):
                    self.stats.timeouts += 1
                self._fail_outstanding(now, type(event).__name__)
                remote = isinstance(event, ConnectionReset) and event.remote
                self._lost(now, reset=remote, cause=type(event).__name__)

    def _next_connection(self, now: float) -> None:
        """Done with this connection: close it (FIN) and open the next, a new flow."""
        if self.conn_key is not None:
            conn = self.endpoint.connection(self.conn_key)  # type: ignore[arg-type]
            if conn is not None:
                conn.close(now)
        self.connected = False
        self.conn_key = None
        self.timers.cancel("request")
        self.timers.arm("connect", now + self.rng.uniform(0.5, 1.5) / max(self.rate, 1e-9))

    # -- dynamic destinations (Fig 20-21) ----------------------------------------------------
    def provide_key(
        self, group: int, raw: bytes | None, ttl: float, now: float, error: str | None = None
    ) -> None:
        """The answer to a `PoolKeyNeeded`: judge the change-destinations that waited."""
        self.guard.provide_key(raw, ttl, now, error)
        conn = self.endpoint.connection(self.conn_key) if self.conn_key is not None else None  # type: ignore[arg-type]
        if conn is None:
            self.guard.waiting.clear()
        else:
            for message in self.guard.release(conn.remote[0], now):
                self._follow(message, now)
        self._drain(now)

    def _on_change(self, message: ChangeDestination, now: float) -> None:
        conn = self.endpoint.connection(self.conn_key)  # type: ignore[arg-type]
        if conn is not None and self.guard.check(message, conn.remote[0], now) is Verdict.ACCEPT:
            self._follow(message, now)

    def _follow(self, message: ChangeDestination, now: float) -> None:
        """Send the rest of the connection to the message's destination (Fig 21, 2130)."""
        if self.conn_key is None:
            return
        try:
            key = self.endpoint.rekey(
                self.conn_key,  # type: ignore[arg-type]
                remote=(message.address, message.port),
                keep_alias=True,
            )
        except (KeyError, SessionError):
            return
        self.conn_key = key
        self.stats.destination_changes += 1
        self.stats.moves.append((now, message.serial))
        conn = self.endpoint.connection(key)
        if conn is not None:
            conn.acknowledge(now)  # tells the new server at once that we came
        held = [h for h in self._held if h.src == message.address]
        self._held.clear()
        for item in held:
            self.endpoint.receive(item.src, item.dst, item.segment, now)

    def _hold(self, event: UnknownSegment) -> None:
        """A segment from a destination whose change waits for the pool's key: keep it."""
        waiting = {m.address for m in self.guard.waiting}
        if (
            waiting
            and event.src in waiting
            and event.dst == self.address
            and len(self._held) < MAX_HELD
        ):
            self._held.append(event)

    def _drain(self, now: float) -> None:
        # Following a destination may hand the endpoint segments it held back: their
        # events come in a second round.
        for _ in range(3):
            events = self.endpoint.events()
            if not events:
                break
            self._on_events(events, now)
        if self.guard.take_lookup():
            group, _ = self.resolve(self.service)
            self.effects.append(PoolKeyNeeded(int(group)))
        self.host.flush()
