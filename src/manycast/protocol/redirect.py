"""Technique D on a server (seed Fig 20-21): point to point connections, moved by signed messages.

* Fig 20, destination in the SYN-ACK. The server listens with its own unicast
  address as the destination: a client that offered tag and cookie on its SYN
  gets them back with that destination, sends the rest of the connection there,
  and the first segment there moves the server's connection to it (`Rekeyed`).
  From then on the routers only route the connection, they no longer multicast it.
* Fig 20, a second server. A server over its load target (`less_loaded` names a
  less loaded server, or None) passes a new connection's SYN to that server
  (`Forwarded`, point to point), which answers it with its own destination: the
  client connects there in its one handshake. A SYN sent again goes the same way.
* Fig 20-21, a live connection moves. When the allocation changes, every
  connection whose client is now another server's (or all of them, for a server
  being drained) goes to its new owner: its transport and application state in
  a `MoveConnection` (the state codec R3 uses); the new owner continues it,
  acknowledges (`MoveAck`) and sends the client a `ChangeDestination` signed
  with the pool's key, with the connection's next serial, again until the client
  sends to it directly. Segments that still reach the old server meanwhile are
  forwarded to the new one. A move is sent again, with a backoff, until it is
  acknowledged; one to a server that died, or never acknowledged, is taken back.

Connections whose client did not offer the extension stay on the group address
and are left to the pool's fallback (R3, state transfer on demand, in
`handover.py`).
"""

from __future__ import annotations

import random
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from manycast.protocol.app import Service
from manycast.protocol.destination import sign_change
from manycast.protocol.host import HostStack
from manycast.protocol.tcp import Connection, ConnKey, Demultiplexer, SessionConfig, SessionError
from manycast.protocol.tcp import State as TcpState
from manycast.wire import control
from manycast.wire.errors import WireError
from manycast.wire.ip import IPPROTO_TCP, Address, InnerPacket, make_packet, parse_packet
from manycast.wire.transport import ChangeDestination, TagCookie, TcpFlags, TcpSegment

# A connection's addresses are of its client's family: the group's, the client's and
# ours. A dual-stack pool's server has an address of each family and the pool a group
# of each; its servers speak to one another on the IPv4 control channel, so a server
# is named below (`OwnerOf`, `LessLoaded`, `Alive`, a message's origin) by its
# control-channel address, whatever the family of the connection in question.
SendControl = Callable[[control.ControlMessage, Address | None], None]
# client address -> its owner's unicast address now (None: not known yet)
OwnerOf = Callable[[Address], Address | None]
# now -> a less loaded server to pass a new connection to, or None (we are not overloaded)
LessLoaded = Callable[[float], Address | None]
# (server address, now) -> whether we still hear from that server
Alive = Callable[[Address, float], bool]
# the epoch of the allocation we hold
Epoch = Callable[[], int]

MOVABLE = (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT)  # closing ones finish where they are
# A move is sent again 0.25 s after it went out, then twice as long each time: six
# copies, 15.75 s in all. The connection is in neither server's hands meanwhile,
# and a client gives up after a few seconds of silence (3.2 s in bench/soak.py): a
# first resend after 1 s let two lost copies (a loss burst on the path) carry the
# move past that (docs/soak.md, finding 37). A copy that arrives twice is
# acknowledged again, nothing more (`on_move`).
MOVE_TRIES = 6
MOVE_TIMEOUT = 0.25
MOVE_BATCH = 8  # connections moved at once; the next ones a moment later
MOVE_GAP = 0.002  # seconds between batches: the server sees to the rest meanwhile
# Moves sent to one server and not yet acknowledged, at most. The next connection is
# let go when an acknowledgment comes: until then its old server serves it as usual,
# while a new owner handed many at once makes each one wait for all before it
# (bench/redirect.py part 2: p99 pause 2.3-3.2 round trips with no window, 1.6-2.2
# with one). A draining server must empty itself within its grace: more at once.
MOVE_WINDOW = 1
DRAIN_WINDOW = 16
ANNOUNCE_TRIES = 8
PASS_MEMORY = 3.0  # seconds a passed SYN's target is remembered (for the SYN sent again)
RETRY = 0.1  # seconds between attempts at moves that had to wait
RELEASED_KEPT = 10_000  # moves remembered when a measurement asks (`record_moves`)
Flow = tuple[int, int]  # (client address, client port)


def _order(key: ConnKey) -> tuple[int, int, int, int]:
    """The order pending moves go in: by client, then local end, as numbers (a key's
    text would cost a formatting of its addresses at every pass)."""
    (local, local_port), (client, client_port) = key
    return int(client), client_port, int(local), local_port


@dataclass
class RedirectStats:
    followed: int = 0  # connections whose client came to our destination (Fig 20)
    passed: int = 0  # new connections (SYNs) we passed to a less loaded server
    taken: int = 0  # passed SYNs we answered
    moved_out: int = 0  # live connections we gave to their new owner
    moved_in: int = 0  # ... and took from another server
    move_resent: int = 0
    move_failed: int = 0  # moves never acknowledged: we took the connection back
    announced: int = 0  # change-destinations sent (first copies)
    announce_resent: int = 0
    switched: int = 0  # moved-in connections whose client now sends to us
    stragglers: int = 0  # segments forwarded to where a connection went
    stale_moves: int = 0  # MoveConnections refused: not newer than one we took
    half_open_dropped: int = 0  # our half-open connections a moved-in one replaced


@dataclass
class _Move:
    message: control.MoveConnection
    target: Address
    deadline: float
    tries: int = 1


@dataclass
class _Announce:
    message: ChangeDestination
    due: float
    gap: float
    tries: int = 1


@dataclass
class _Forward:
    target: Address
    last_used: float


class Redirector:
    """Technique D's state and decisions, for one server agent."""

    def __init__(
        self,
        name: str,
        address: Address,
        group: Address,
        port: int,
        endpoint: Demultiplexer,
        app: Service,
        host: HostStack,
        send_control: SendControl,
        session: SessionConfig,
        rng: random.Random,
        key: Ed25519PrivateKey,
        wall_base: float,
        *,
        owner_of: OwnerOf,
        owned: Callable[[Address], bool],
        serving: Callable[[], bool],
        less_loaded: LessLoaded,
        alive: Alive,
        epoch: Epoch,
        move_timeout: float = MOVE_TIMEOUT,
        idle_timeout: float = 30.0,
        address6: Address | None = None,
        group6: Address | None = None,
    ) -> None:
        """`address6`, `group6`: a dual-stack pool's server's IPv6 address and the
        pool's IPv6 group, beside `address` and `group` (its IPv4 ones)."""
        self.name = name
        self.address = address
        self.group = group
        self.address6 = address6
        self._own = {address} if address6 is None else {address, address6}
        self._groups = {group} if group6 is None else {group, group6}
        self._families = {a.version for a in self._own}
        self.port = port
        self.endpoint = endpoint
        self.app = app
        self.host = host
        self.send_control = send_control
        self.session = session
        self.rng = rng
        self.key = key
        self.wall_base = wall_base
        self.owner_of = owner_of
        self.owned = owned
        self.serving = serving  # we hold a share of the clients (not drained)
        self.less_loaded = less_loaded
        self.alive = alive
        self.epoch = epoch
        self.move_timeout = move_timeout
        self.idle_timeout = idle_timeout
        self.stats = RedirectStats()
        self.serials: dict[ConnKey, int] = {}  # the serial each connection was last given
        self.pending: set[ConnKey] = set()  # to move, when it can be
        # Connections we answered for a loaded server (Fig 20's second server): ours
        # although their clients are not, until they close or we are drained.
        self.guests: set[Flow] = set()
        # Moved-in connections, with the epoch they were moved by: not moved on before
        # we hold it (our allocation may still be the old one that sent it away).
        self._arrived: dict[ConnKey, int] = {}
        # (wall-clock time, client, client port, serial) of the last moves we began, if
        # a measurement asked for them (`record_moves`): a server kept RELEASED_KEPT of
        # them per server, some 2 MB, which grew the soak's infrastructure for an hour
        # and more as they filled (docs/soak.md, finding 30)
        self.released: deque[tuple[float, Address, int, int]] | None = None
        self._outgoing: dict[ConnKey, _Move] = {}
        self._awaiting: dict[ConnKey, _Announce] = {}
        self._forwards: dict[Flow, _Forward] = {}
        self._latest: dict[Flow, tuple[int, float]] = {}  # serial taken, when
        self._passed: dict[Flow, tuple[Address, float]] = {}
        self._wake: float | None = None

    def record_moves(self, kept: int = RELEASED_KEPT) -> None:
        """Keep the last `kept` moves we begin from now on, in `released`."""
        self.released = deque(maxlen=kept)

    # -- Fig 20: new connections --------------------------------------------------------
    def pass_syn(self, ip: InnerPacket, packet: bytes, now: float) -> bool:
        """A packet to the group from a client we own: if it opens a connection and we
        are over our load target, pass it to a less loaded server (True: taken care of)."""
        payload = ip.payload
        flags = payload[13] if len(payload) > 13 else 0
        if flags & (TcpFlags.SYN | TcpFlags.ACK | TcpFlags.RST) != TcpFlags.SYN:
            return False
        src, sport = ip.header.src, int.from_bytes(payload[:2], "big")
        key: ConnKey = ((ip.header.dst, int.from_bytes(payload[2:4], "big")), (src, sport))
        if self.endpoint.resolve(key) is not None:
            return False  # a SYN again, of a connection we answered ourselves
        flow = (int(src), sport)
        remembered = self._passed.get(flow)
        target = remembered[0] if remembered is not None and remembered[1] > now else None
        if target is None:
            target = self.less_loaded(now)
            if target is None:
                return False
            try:
                segment = TcpSegment.from_wire(payload, src, ip.header.dst)
            except WireError:
                return False
            if segment.option(TagCookie) is None:
                return False  # it cannot follow a destination: it stays with us
        self.send_control(control.Forwarded(self.name, 0, self.address, packet), target)
        self._passed[flow] = (target, now + PASS_MEMORY)
        self._schedule(now + PASS_MEMORY)
        self.stats.passed += 1
        return True

    def on_rekeyed(self, previous: ConnKey, key: ConnKey, now: float) -> None:
        """A connection moved to our destination: its client follows it (Fig 20)."""
        if key[0][0] in self._own and previous[0][0] not in self._own:
            self.stats.followed += 1
            if self._should_move(key):
                self.pending.add(key)  # its client became another server's meanwhile
                self._schedule(now + RETRY)

    # -- Fig 21: live connections move ---------------------------------------------------
    def follows(self, key: ConnKey) -> bool:
        """A connection its client sends to our own address (not the group's)."""
        return key[0][0] in self._own

    def _local(self, client: Address) -> Address:
        """Our own address of `client`'s family (a dual-stack pool's server has two)."""
        if client.version == 6 and self.address6 is not None:
            return self.address6
        return self.address

    def _should_move(self, key: ConnKey) -> bool:
        """Its client is another server's now, and it is not a guest we keep (a drained
        server keeps nothing)."""
        client = key[1][0]
        if self.owned(client):
            return False
        return (int(client), key[1][1]) not in self.guests or not self.serving()

    def _settled(self, key: ConnKey) -> bool:
        """A connection moved to us goes on only once we hold the allocation that sent
        it (ours may still be the old one, which gave it away)."""
        arrived = self._arrived.get(key)
        if arrived is not None and self.epoch() < arrived:
            return False
        self._arrived.pop(key, None)
        return True

    def after_change(self, now: float) -> None:
        """The allocation changed: move every following connection we no longer own."""
        for key in self.endpoint.keys():
            if self.follows(key) and self._should_move(key):
                self.pending.add(key)
        self._move_pending(now)

    def _move_pending(self, now: float) -> None:
        """Move what waits, a batch at a time: hundreds of connections moved in one go
        would hold up everything else the server does (its heartbeats among them)."""
        moved = 0
        in_flight = Counter(move.target for move in self._outgoing.values())
        window = MOVE_WINDOW if self.serving() else DRAIN_WINDOW
        for key in sorted(self.pending, key=_order):
            if moved >= MOVE_BATCH:
                self._schedule(now + MOVE_GAP)
                return
            conn = self.endpoint.connection(key)
            if conn is not None and not self._settled(key):
                continue
            if conn is None or not self._should_move(key):
                self.pending.discard(key)
                continue
            target = self.owner_of(key[1][0])
            if target is None or target == self.address or conn.state not in MOVABLE:
                continue  # no owner we can reach yet, or a moment that does not suit
            if in_flight[target] >= window:
                continue  # when an acknowledgment comes (or at the retry)
            self.pending.discard(key)
            if self.move(key, target, now):
                moved += 1
                in_flight[target] += 1
        if self.pending:
            self._schedule(now + RETRY)

    def move(self, key: ConnKey, target: Address, now: float) -> bool:
        """Give the connection `key` to the server at `target` (Fig 20, 2020)."""
        conn = self.endpoint.connection(key)
        if conn is None or conn.state not in MOVABLE or conn.tag is None:
            return False
        self.host.flush()  # what it queued still goes out from here
        try:
            transport = self.endpoint.release(key).export_state()
        except SessionError:
            return False
        app_state = self.app.export(key) if key in self.app else b""
        self.app.close(key)
        self._awaiting.pop(key, None)
        serial = self.serials.pop(key, 0) + 1
        (_, port), (client, client_port) = key
        self.guests.discard((int(client), client_port))
        wanted = control.ConnectionKey(client, client_port, self._local(client), port)
        message = control.MoveConnection(
            self.name, 0, self.address, self.epoch(), wanted, serial, transport, app_state
        )
        self.send_control(message, target)
        deadline = now + self.move_timeout
        self._outgoing[key] = _Move(message, target, deadline)
        self._schedule(deadline)
        self._forwards[(int(client), client_port)] = _Forward(target, now)
        self._schedule(now + self.idle_timeout)
        if self.released is not None:
            self.released.append((self.wall_base + now, client, client_port, serial))
        self.stats.moved_out += 1
        return True

    def on_move(self, message: control.MoveConnection, now: float) -> None:
        """Another server gives us a connection: continue it, acknowledge, and tell the
        client where to send, signed (Fig 21, 2120)."""
        wanted = message.key
        if wanted.client.version not in self._families:
            return  # not of our pool's family
        flow = (int(wanted.client), wanted.client_port)
        local = self._local(wanted.client)
        key: ConnKey = ((local, wanted.service_port), (wanted.client, wanted.client_port))
        old: ConnKey = ((wanted.group, wanted.service_port), (wanted.client, wanted.client_port))
        ack = control.MoveAck(self.name, 0, wanted, message.serial)
        taken = self._latest.get(flow, (0, 0.0))[0]
        if message.serial <= taken:
            if message.serial == taken and key in self.endpoint:
                self._reply(ack, message.origin)  # our acknowledgment was lost: again
            else:
                self.stats.stale_moves += 1
            return
        for held in (self.endpoint.resolve(key), self.endpoint.resolve(old)):
            if held is not None and not self._drop_half_open(held):
                self.stats.stale_moves += 1
                return
        try:
            conn = Connection.import_state(message.transport_state, now, self.rng, self.session)
            if conn.key != old or conn.tag is None or conn.cookie is None:
                return
            self.endpoint.adopt(conn)
            key = self.endpoint.rekey(old, local=(local, wanted.service_port), keep_alias=True)
            if message.app_state:
                self.app.restore(key, message.app_state)
            else:
                self.app.open(key)
        except (WireError, SessionError):
            if key in self.endpoint:
                self.endpoint.release(key)
            return
        self._latest[flow] = (message.serial, now)
        self.serials[key] = message.serial
        self._arrived[key] = message.epoch
        self._forwards.pop(flow, None)  # it came back to us
        self._outgoing.pop(key, None)
        self.stats.moved_in += 1
        self._announce(key, conn, message.serial, now)
        self._reply(ack, message.origin)
        if self._should_move(key):
            self.pending.add(key)  # not ours either by now: it moves on
            self._schedule(now + RETRY)

    def _drop_half_open(self, key: ConnKey) -> bool:
        """Let a connection of ours go, silently, if it never got past SYN_RCVD: its
        client took another server's SYN-ACK (two servers answered one SYN, one of
        them restarted on an allocation out of date), so the one moved to us is the
        one the client uses. Kept, it would refuse that move for as long as its
        SYN-ACK is retransmitted, and the client's connection would time out."""
        conn = self.endpoint.connection(key)
        if conn is None or conn.state is not TcpState.SYN_RCVD:
            return False
        self.endpoint.release(key)  # no RST: it would reach the client's live connection
        self.on_closed(key)
        self.stats.half_open_dropped += 1
        return True

    def _reply(self, message: control.MoveAck, to: control.Address) -> None:
        if to.version == self.address.version:
            self.send_control(message, to)

    def _announce(self, key: ConnKey, conn: Connection, serial: int, now: float) -> None:
        assert conn.tag is not None and conn.cookie is not None
        wall_ms = int((self.wall_base + now) * 1000)
        unsigned = ChangeDestination(conn.tag, conn.cookie, key[0][0], key[0][1], serial, wall_ms)
        message = sign_change(unsigned, self.key)
        conn.send_change_destination(message, now)
        gap = max(conn.rto, 0.05)
        self._awaiting[key] = _Announce(message, now + gap, gap)
        self._schedule(now + gap)
        self.stats.announced += 1

    def _announce_again(self, key: ConnKey, announce: _Announce, now: float) -> None:
        conn = self.endpoint.connection(key)
        if conn is None or conn.state is TcpState.CLOSED or announce.tries >= ANNOUNCE_TRIES:
            self._awaiting.pop(key, None)
            return
        conn.send_change_destination(announce.message, now)
        announce.tries += 1
        announce.gap *= 2
        announce.due = now + announce.gap
        self._schedule(announce.due)
        self.stats.announce_resent += 1

    def on_ack(self, message: control.MoveAck, now: float) -> None:
        wanted = message.key
        key: ConnKey = ((wanted.group, wanted.service_port), (wanted.client, wanted.client_port))
        move = self._outgoing.get(key)
        if move is not None and move.message.serial == message.serial:
            del self._outgoing[key]
            if self.pending:
                self._move_pending(now)  # the window has room again

    def on_direct(self, key: ConnKey, now: float) -> None:
        """A segment of connection `key` came to our own address, from its client: a
        moved-in connection's client has switched to us (Fig 21, 2130)."""
        if key in self._awaiting:
            del self._awaiting[key]
            self.stats.switched += 1
            conn = self.endpoint.connection(key)
            if conn is not None:
                conn.retransmit_now(now)  # what we sent before it switched went astray

    # -- segments that reach the wrong server ------------------------------------------
    def on_unknown(self, src: Address, segment: TcpSegment, now: float) -> bool:
        """A segment to our own address for no connection of ours: one we moved away
        (forward it to where it went; True) or not (False: reset it)."""
        entry = self._forwards.get((int(src), segment.src_port))
        if entry is None:
            return False
        entry.last_used = now
        dst = self._local(src)
        packet = make_packet(src, dst, IPPROTO_TCP, segment.to_wire(src, dst))
        self.send_control(
            control.Forwarded(self.name, 0, self.address, packet.to_wire()), entry.target
        )
        self.stats.stragglers += 1
        return True

    def on_forwarded(self, message: control.Forwarded, now: float) -> None:
        """A packet another server passed us: a new connection's SYN to answer with our
        own destination (Fig 20's second server), or a straggler of a moved connection."""
        try:
            ip = parse_packet(message.packet)
            if ip.protocol != IPPROTO_TCP:
                return
            src, dst = ip.header.src, ip.header.dst
            segment = TcpSegment.from_wire(ip.payload, src, dst)
        except WireError:
            return
        key: ConnKey = ((dst, segment.dst_port), (src, segment.src_port))
        opening = segment.flags & (TcpFlags.SYN | TcpFlags.ACK | TcpFlags.RST) == TcpFlags.SYN
        if opening and dst in self._groups and segment.option(TagCookie) is not None:
            if segment.dst_port == self.port and key not in self.endpoint:
                self.stats.taken += 1
                self.guests.add((int(src), segment.src_port))
            self.endpoint.receive(src, dst, segment, now)
            return
        primary = self.endpoint.resolve(key)
        if primary is not None:
            self.endpoint.receive(src, dst, segment, now)
            announce = self._awaiting.get(primary)
            if announce is not None and now >= announce.due - announce.gap / 2:
                self._announce_again(primary, announce, now)  # the client still sends there
            return
        if dst not in self._groups and src.version in self._families:
            self.on_unknown(src, segment, now)  # it moved on from here too

    # -- housekeeping --------------------------------------------------------------------
    def on_closed(self, key: ConnKey) -> None:
        self.serials.pop(key, None)
        self._awaiting.pop(key, None)
        self.pending.discard(key)
        self._arrived.pop(key, None)
        self.guests.discard((int(key[1][0]), key[1][1]))

    def next_deadline(self) -> float | None:
        return self._wake

    def _schedule(self, at: float) -> None:
        if self._wake is None or at < self._wake:
            self._wake = at

    def on_timer(self, now: float) -> None:
        if self._wake is None or now < self._wake:
            return
        self._wake = None
        if self.pending:
            self._move_pending(now)
        for key, move in list(self._outgoing.items()):
            if move.deadline > now:
                self._schedule(move.deadline)
            elif move.tries < MOVE_TRIES and self.alive(move.target, now):
                # Slow, or lost: a busy pool takes its time; a dead server never answers.
                self.send_control(move.message, move.target)
                move.deadline = now + self.move_timeout * 2**move.tries
                move.tries += 1
                self._schedule(move.deadline)
                self.stats.move_resent += 1
            else:
                del self._outgoing[key]
                self._take_back(key, move.message, now)
        for key, announce in list(self._awaiting.items()):
            if announce.due <= now:
                self._announce_again(key, announce, now)
            else:
                self._schedule(announce.due)
        limit = now - self.idle_timeout
        for flow in [f for f, e in self._forwards.items() if e.last_used < limit]:
            del self._forwards[flow]
        for flow in [f for f, (_, at) in self._latest.items() if at < limit]:
            del self._latest[flow]
        for flow in [f for f, (_, until) in self._passed.items() if until <= now]:
            del self._passed[flow]
        if self._forwards or self._latest:
            self._schedule(now + 1.0)
        if self._passed:
            self._schedule(min(until for _, until in self._passed.values()))

    def _take_back(self, key: ConnKey, message: control.MoveConnection, now: float) -> None:
        """Nobody took the connection: continue it here from the state we sent (the
        client never heard of another server, or that one is gone)."""
        self._forwards.pop((int(key[1][0]), key[1][1]), None)
        self.stats.move_failed += 1
        if self.endpoint.resolve(key) is not None:
            return
        try:
            conn = Connection.import_state(message.transport_state, now, self.rng, self.session)
            self.endpoint.adopt(conn)
            if message.app_state:
                self.app.restore(key, message.app_state)
            else:
                self.app.open(key)
        except (WireError, SessionError):
            return
        # The next move signs above anything the other server may have sent.
        self.serials[key] = message.serial
        self.pending.add(key)
        self._schedule(now + RETRY)
