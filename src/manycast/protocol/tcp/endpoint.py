"""The demultiplexer: all connections of one host, found by 4-tuple, with their timers.

It listens on ports, opens connections for the SYNs they receive, and never
answers a segment for a 4-tuple it does not know: it reports `UnknownSegment`
and its owner resets it (R1), forwards it (R2) or fetches the state and adopts
the connection (R3).

Dynamic destinations (Fig 20-21) give a connection more than one 4-tuple. A
client that follows the DESTINATION of its SYN-ACK files its connection under
the new remote address; a listener that advertises a destination takes the
client's segments there too, and the first one moves the connection to it (it
then sends from there). A connection keeps answering to the 4-tuples it left
(aliases), and a following client's connection takes a change-destination
from any source, by its local address: the new server sends it from its own.
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass

from manycast.protocol.tcp.config import SessionConfig
from manycast.protocol.tcp.connection import MOD, Address, Connection, ConnKey
from manycast.protocol.tcp.errors import SessionError
from manycast.protocol.tcp.events import Event, Rekeyed
from manycast.protocol.tcp.states import State
from manycast.wire.transport import ChangeDestinationMark, IPAddress, TcpFlags, TcpSegment

_F = TcpFlags
MAX_ALIASES = 4  # the 4-tuples a connection left that still reach it (the oldest goes)


@dataclass(frozen=True, slots=True)
class UnknownSegment:
    """A segment for no known connection and not an opening SYN to a listening port.

    The owner decides: `Demultiplexer.reset_for` (R1), forward it (R2), or import the
    connection's state and `Demultiplexer.adopt` it (R3)."""

    src: IPAddress
    dst: IPAddress
    segment: TcpSegment


EndpointEvent = Event | UnknownSegment


class Demultiplexer:
    """All connections of one host, demultiplexed by 4-tuple.

    Connections may be driven directly (`conn.send(...)`); they tell the
    demultiplexer, which collects their segments, events and deadlines lazily, so
    the work per call is proportional to the connections that changed.
    """

    def __init__(self, rng: random.Random, config: SessionConfig | None = None) -> None:
        self._rng = rng
        self.config = config or SessionConfig()
        self._conns: dict[ConnKey, Connection] = {}
        self._listeners: dict[int, tuple[Address | None, Address | None]] = {}
        self._out: list[tuple[IPAddress, IPAddress, TcpSegment]] = []
        self._events: list[tuple[ConnKey, EndpointEvent]] = []
        self._dirty: dict[ConnKey, Connection] = {}
        # Deadlines: a heap with lazy invalidation against _deadline[key].
        self._heap: list[tuple[float, int, ConnKey]] = []
        self._deadline: dict[ConnKey, float] = {}
        self._tiebreak = itertools.count()
        # Other 4-tuples that reach a connection: alias -> its key, and back. Aliases in
        # `_promote` move the connection to themselves on their first segment.
        self._aliases: dict[ConnKey, ConnKey] = {}
        self._alias_of: dict[ConnKey, list[ConnKey]] = {}
        self._promote: set[ConnKey] = set()
        # Following connections by local address: a change-destination reaches them
        # from whatever source it comes (the new server, Fig 20-21).
        self._followers: dict[Address, ConnKey] = {}

    # --- connections -------------------------------------------------------------------

    def listen(
        self, port: int, *, destination: Address | None = None, destination6: Address | None = None
    ) -> None:
        """Accept SYNs to `port` on any local address; SYN-ACKs advertise `destination`
        (a dual-stack server's to IPv6 clients: `destination6`, of their family)."""
        self._listeners[port] = (destination, destination6)

    def unlisten(self, port: int) -> None:
        self._listeners.pop(port, None)

    def connect(
        self,
        local: Address,
        remote: Address,
        now: float,
        *,
        offer: bool = True,
        follow: bool = False,
        rtt: tuple[float, float] | None = None,
    ) -> Connection:
        """Open a connection. `offer`: tag and cookie on the SYN (Fig 20); `follow`:
        send to the destination a SYN-ACK gives, and take change-destinations from
        any source (the caller checks their signatures); `rtt`: (SRTT, RTTVAR) of an
        earlier connection to `remote`, to time the SYN by (`Connection.seed_rtt`)."""
        if (local, remote) in self._conns:
            raise SessionError(f"a connection {(local, remote)} already exists")
        conn = Connection(local, remote, self._rng, self.config)
        if rtt is not None:
            conn.seed_rtt(*rtt)
        conn.follow = follow and offer
        conn.connect(now, offer=offer)
        self.adopt(conn)
        return conn

    def connection(self, key: ConnKey) -> Connection | None:
        return self._conns.get(key)

    def resolve(self, key: ConnKey) -> ConnKey | None:
        """The key of the connection `key` reaches: itself, or the one it is an alias of."""
        if key in self._conns:
            return key
        primary = self._aliases.get(key)
        return primary if primary in self._conns else None

    def __contains__(self, key: object) -> bool:
        return key in self._conns

    def __len__(self) -> int:
        return len(self._conns)

    def keys(self) -> list[ConnKey]:
        return list(self._conns)

    def adopt(self, conn: Connection) -> None:
        """Take over a connection (one imported from another server, typically)."""
        if conn.key in self._conns:
            raise SessionError(f"a connection {conn.key} already exists")
        if conn.state is State.CLOSED:
            raise SessionError("cannot adopt a closed connection")
        self._conns[conn.key] = conn
        if conn.follow:
            self._followers[conn.local] = conn.key
        conn.set_observer(self._mark)
        self._mark(conn)

    def release(self, key: ConnKey) -> Connection:
        """Remove a connection without sending anything; what it had queued still goes out."""
        conn = self._conns.get(key)
        if conn is None:
            raise KeyError(key)
        self._flush_one(key, conn)
        self._forget(key)
        return conn

    def rekey(
        self,
        key: ConnKey,
        *,
        local: Address | None = None,
        remote: Address | None = None,
        keep_alias: bool = False,
    ) -> ConnKey:
        """Move a connection to a new 4-tuple after a destination change (Fig 20):
        the client to the new remote, the new server to its own local address.
        Segments queued before the call leave from the old addresses; with
        `keep_alias` segments to the old 4-tuple still reach the connection."""
        conn = self._conns.get(key)
        if conn is None:
            raise KeyError(key)
        self._flush_one(key, conn)
        if self._conns.get(key) is not conn:
            raise SessionError("cannot rekey a closed connection")
        new = (local or conn.local, remote or conn.remote)
        if new != key and new in self._conns:
            raise SessionError(f"a connection {new} already exists")
        conn.local, conn.remote = new
        self._move(key, conn, keep_alias=keep_alias)
        return conn.key

    def alias(self, alias: ConnKey, key: ConnKey, *, promote: bool = False) -> None:
        """Segments for the 4-tuple `alias` reach the connection `key` too; with
        `promote`, the first one moves the connection to `alias` (it sends from there)."""
        if key not in self._conns or alias in self._conns or alias == key:
            return
        self._drop_alias(alias)
        self._aliases[alias] = key
        aliases = self._alias_of.setdefault(key, [])
        aliases.append(alias)
        if promote:
            self._promote.add(alias)
        if len(aliases) > MAX_ALIASES:
            self._drop_alias(aliases[0])

    def _drop_alias(self, alias: ConnKey) -> None:
        key = self._aliases.pop(alias, None)
        self._promote.discard(alias)
        if key is None:
            return
        aliases = self._alias_of.get(key)
        if aliases is not None and alias in aliases:
            aliases.remove(alias)
            if not aliases:
                del self._alias_of[key]

    def _move(
        self, old: ConnKey, conn: Connection, *, keep_alias: bool, announce: bool = False
    ) -> None:
        """File `conn`, which was `old`, under its key now."""
        new = conn.key
        if new == old:
            return
        del self._conns[old]
        self._conns[new] = conn
        self._dirty.pop(old, None)
        deadline = self._deadline.pop(old, None)
        if deadline is not None:
            self._schedule(new, deadline)
        aliases = self._alias_of.pop(old, [])
        for alias in aliases:
            self._aliases[alias] = new
        if aliases:
            self._alias_of[new] = aliases
        self._drop_alias(new)
        if keep_alias:
            self.alias(old, new)
        if conn.follow:
            if self._followers.get(old[0]) == old:
                del self._followers[old[0]]
            self._followers[conn.local] = new
        if announce:
            self._events.append((new, Rekeyed(old)))

    # --- segments ----------------------------------------------------------------------

    def receive(self, src: IPAddress, dst: IPAddress, segment: TcpSegment, now: float) -> None:
        key = ((dst, segment.dst_port), (src, segment.src_port))
        conn = self._conns.get(key)
        if conn is None and self._aliases:
            conn = self._via_alias(key)
        if conn is None and self._followers and segment.options:
            conn = self._follower(key, segment)
        if conn is not None:
            conn.receive(segment, now)
            return
        opening = segment.flags & (_F.SYN | _F.ACK | _F.RST) == _F.SYN
        if opening and segment.dst_port in self._listeners:
            destination, destination6 = self._listeners[segment.dst_port]
            if destination6 is not None and key[1][0].version == 6:
                destination = destination6
            conn = Connection(key[0], key[1], self._rng, self.config, destination=destination)
            conn.accept(segment, now)
            self.adopt(conn)
            if destination is not None and conn.tag is not None and destination != key[0]:
                # The client may follow our destination (Fig 20): its segments there
                # reach this connection, and the first one moves the connection there.
                self.alias((destination, key[1]), conn.key, promote=True)
            return
        self._events.append((key, UnknownSegment(src, dst, segment)))

    def _via_alias(self, key: ConnKey) -> Connection | None:
        primary = self._aliases.get(key)
        conn = None if primary is None else self._conns.get(primary)
        if conn is None or primary is None:
            return None
        if key in self._promote:
            # The client sends to the destination we gave it: from now on, so do we.
            self._flush_one(primary, conn)
            if self._conns.get(primary) is not conn:
                return None
            conn.local, conn.remote = key
            self._move(primary, conn, keep_alias=True, announce=True)
        return conn

    def _follower(self, key: ConnKey, segment: TcpSegment) -> Connection | None:
        """A following connection on our local address, for a change-destination
        from a source it does not know (the new server)."""
        if segment.option(ChangeDestinationMark) is None:
            return None
        primary = self._followers.get(key[0])
        return None if primary is None else self._conns.get(primary)

    def reset_for(self, src: IPAddress, dst: IPAddress, segment: TcpSegment) -> TcpSegment | None:
        """Queue the RFC 9293 reply RST to a segment received from `src` to `dst`.

        Returns it, or None for a RST (never answered)."""
        if segment.flags & _F.RST:
            return None
        if segment.flags & _F.ACK:
            rst = TcpSegment(segment.dst_port, segment.src_port, segment.ack, 0, _F.RST, 0)
        else:
            ack = (segment.seq + segment.seq_length) % MOD
            rst = TcpSegment(segment.dst_port, segment.src_port, 0, ack, _F.RST | _F.ACK, 0)
        self._out.append((dst, src, rst))
        return rst

    def segments_to_send(self) -> list[tuple[IPAddress, IPAddress, TcpSegment]]:
        """Drain: (source, destination, segment) for every segment to put on the wire."""
        self._flush()
        out, self._out = self._out, []
        return out

    def events(self) -> list[tuple[ConnKey, EndpointEvent]]:
        self._flush()
        events, self._events = self._events, []
        return events

    # --- timers --------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        self._flush()
        while self._heap:
            deadline, _, key = self._heap[0]
            if self._deadline.get(key) == deadline:
                return deadline
            heapq.heappop(self._heap)
        return None

    def handle_timer(self, now: float) -> None:
        self._flush()
        while self._heap and self._heap[0][0] <= now:
            deadline, _, key = heapq.heappop(self._heap)
            if self._deadline.get(key) != deadline:
                continue
            del self._deadline[key]
            self._conns[key].handle_timer(now)
        self._flush()

    # --- bookkeeping ---------------------------------------------------------------------

    def _mark(self, conn: Connection) -> None:
        moved = conn.moved_from
        if moved is not None:
            # The connection followed a destination by itself (a client, Fig 20).
            conn.moved_from = None
            if self._conns.get(moved) is conn:
                if conn.key in self._conns:
                    conn.local, conn.remote = moved  # taken: it stays where it was
                else:
                    self._move(moved, conn, keep_alias=True, announce=True)
        self._dirty[conn.key] = conn

    def _flush(self) -> None:
        while self._dirty:
            dirty, self._dirty = self._dirty, {}
            for key, conn in dirty.items():
                if self._conns.get(key) is conn:
                    self._flush_one(key, conn)

    def _flush_one(self, key: ConnKey, conn: Connection) -> None:
        self._dirty.pop(key, None)
        local, remote = conn.local[0], conn.remote[0]
        self._out.extend((local, remote, seg) for seg in conn.segments_to_send())
        self._events.extend((key, event) for event in conn.events())
        if conn.state is State.CLOSED:
            self._forget(key)
        else:
            self._schedule(key, conn.next_deadline())

    def _schedule(self, key: ConnKey, deadline: float | None) -> None:
        if deadline is None:
            self._deadline.pop(key, None)
        elif self._deadline.get(key) != deadline:
            self._deadline[key] = deadline
            heapq.heappush(self._heap, (deadline, next(self._tiebreak), key))
            if len(self._heap) > 2 * len(self._deadline) + 64:
                self._heap = [(d, next(self._tiebreak), k) for k, d in self._deadline.items()]
                heapq.heapify(self._heap)

    def _forget(self, key: ConnKey) -> None:
        conn = self._conns.pop(key, None)
        if conn is not None:
            conn.set_observer(None)
            if conn.follow and self._followers.get(conn.local) == key:
                del self._followers[conn.local]
        self._deadline.pop(key, None)
        self._dirty.pop(key, None)
        for alias in self._alias_of.pop(key, []):
            self._aliases.pop(alias, None)
            self._promote.discard(alias)
