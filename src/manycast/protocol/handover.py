"""What a server does with connections when portions change hands (Fig 12-16).

The pool chooses one technique:

* R1 reset (Fig 12): the old owner resets the connections it gave up; a new
  owner resets segments of connections it has no state for. Clients reconnect.
* R2 forward (Fig 14): the old owner keeps its connections. A new owner that
  receives a segment of a connection it does not know forwards the packet over
  the control channel; the old owner processes it, answers the client itself and
  tells the new owner its direct address, after which the new owner forwards
  that connection's packets point to point. With `close_after_transaction` the
  old owner closes such a connection after its next answer, and the client's new
  connection lands on the new owner (the combination the seed describes).
* R3 state transfer (Fig 15): a new owner that receives a segment of an unknown
  connection asks for its state: first the client's owner before the latest change,
  point to point, which says so if it does not hold it; then the whole control
  channel. The old owner exports the transport and application state, sends it to
  the asker alone and lets the connection go; the new owner
  imports it and continues the connection, segments that arrived meanwhile
  included. The old owner keeps the reply for `given_kept` seconds and sends it
  again when the same query comes again: the reply is the connection's only copy,
  and one lost or late datagram must not lose it. A server that serves the
  connection's client by its own view keeps it and answers "held" (`keeps`): the
  asker's view is behind or ahead, and it passes the client's segments on to the
  holder instead, resetting nothing. The asker asks again every
  `QUERY_RESEND` seconds until its `query_timeout`, and at once when a server it
  held dead is heard again (`peer_returned`): an old owner cut off by a router's
  outage keeps its connections, and its return restarts the wait.
* R4 pinned paths (Fig 16): before a reallocation executes, a server creates a
  tag-switched path to itself for each connection it is about to lose: it tags
  the connection onto its own label-switched tree at the client's edge router
  (`FlowTag`, as a VIP router tags a flow, Fig 18). The edge pushes the tree's
  label on that connection's packets, so they keep coming to the old owner until
  the connection closes (then it untags it) or idles, while new connections go
  to the new owner by the allocation.
* D dynamic destination (Fig 20-21): connections whose clients offered tag and
  cookie are sent point to point to their server, and a connection whose client
  moved goes to its new owner, which tells the client to follow it with a signed
  change-destination (`redirect.Redirector`). Connections of clients without the
  extension stay on the group address and are kept by R3.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from manycast.errors import ConfigError
from manycast.protocol.app import Service
from manycast.protocol.host import HostStack
from manycast.protocol.membership import Held
from manycast.protocol.redirect import Redirector
from manycast.protocol.tcp import Connection, ConnKey, Demultiplexer, SessionConfig, SessionError
from manycast.protocol.technique import Technique
from manycast.wire import control
from manycast.wire.errors import WireError
from manycast.wire.ip import IPPROTO_TCP, Address, Network, make_packet, parse_packet
from manycast.wire.transport import TcpFlags, TcpSegment

# Sends a control message: to the control group (None) or to one server's address.
SendControl = Callable[[control.ControlMessage, Address | None], None]
# Every network a client may be on, with its edge router's address there.
Edges = Sequence[tuple[Network, Address]]


QUERY_RESEND = 0.3  # seconds between R3 state queries for one connection
# After a server held dead is heard again, ask once more this soon: it can send
# before it receives (its router, just restarted, learns it as a member of the
# control group from its next report, within the router's query's Max Resp Time).
RETURN_RESEND = 0.1
# R3: how long a query may wait, in all, for a server that neither answers nor is held
# dead (its answers lost on a lossy path): a loss burst or a router's outage outlasts
# `query_timeout`, and the connection it would reset lives there (docs/soak.md, 27).
QUERY_PATIENCE = 6.0
GIVEN_LIMIT = 10_000  # released states kept for their asker at most (oldest go first)
MOVED_SWEEP_S = 1.0  # how often the connections we keep for others are checked for silence


@dataclass
class HandoverStats:
    reset_moved: int = 0  # R1: connections we gave up and reset
    reset_unknown: int = 0  # segments of unknown connections answered with a reset
    forwarded_out: int = 0  # R2: packets we forwarded to an old owner
    forwarded_in: int = 0  # R2: forwarded packets we processed as the old owner
    redirects: int = 0
    queries: int = 0  # R3: state queries we sent
    transferred_out: int = 0  # R3: connections whose state we handed over
    transfer_resent: int = 0  # R3: a handed-over state sent again to the same asker
    transferred_in: int = 0  # R3: connections we continued from another server's state
    held_back: int = 0  # R3: asked for a connection whose client we serve: kept, said so
    pinned: int = 0  # R4: connections we tagged onto our tree before giving them up
    unpinned: int = 0  # ... and untagged when they closed
    no_edge: int = 0  # R4: connections of clients with no edge router known (not pinned)
    closed_after_transaction: int = 0
    expired_moved: int = 0  # kept connections reset after `idle_timeout` with no segment


Segment = tuple[Address, Address, TcpSegment]  # src, dst, segment


@dataclass
class _Query:
    query_id: int
    deadline: float
    wanted: control.ConnectionKey
    resend: float
    segments: list[Segment] = field(default_factory=list)
    # A server that keeps the connection, as it serves its client by its view (ours is
    # behind, or ahead): the segments are passed on to it, and nothing is reset.
    holder: Address | None = None
    # Waited for a server's return once (`peer_returned`): under a loss burst peers are
    # held dead and heard again many times a second, and a query for a state no one
    # holds, made to wait again at each, lived on asking the whole group.
    extended: bool = False
    # The server asked first (the client's previous owner), until a server says it
    # has no such state: while it is alive, its silence is a lost answer.
    asked: Address | None = None
    started: float = 0.0


@dataclass
class _Forward:
    target: Address | None  # None until the old owner redirects us
    first: float
    last_used: float


class Handover:
    """The technique's state and decisions, for one server agent."""

    def __init__(
        self,
        technique: str,
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
        *,
        close_after_transaction: bool = False,
        query_timeout: float = 1.5,
        forward_timeout: float = 0.3,
        idle_timeout: float = 30.0,
        edges: Edges = (),
        redirector: Redirector | None = None,
        group6: Address | None = None,
        address6: Address | None = None,
        previous_owner: Callable[[Address], Address | None] | None = None,
        serves: Callable[[Address], bool] | None = None,
        keeps: Callable[[Address, float], bool] | None = None,
        alive: Callable[[Address, float], bool] | None = None,
    ) -> None:
        """`group6`, `address6`: a dual-stack pool's IPv6 group beside `group`, and our
        IPv6 address beside `address` (the root of our tree for IPv6 clients);
        `previous_owner`: a client's owner before the latest change (R3 asks it first);
        `serves`: whether a client is ours by the allocation we hold now (R3 resets a
        connection no state came for only then); `keeps`: whether we keep a connection
        of a client when another server asks for it (`Server._keeps`); `alive`:
        whether the server at an address is one our view counts alive (R3 waits for
        its answer past `query_timeout`, up to `QUERY_PATIENCE`)."""
        if technique not in tuple(Technique):
            names = ", ".join(Technique)
            raise ConfigError(f"technique must be one of {names}, not {technique!r}")
        self.technique = Technique(technique)
        if (self.technique is Technique.D) != (redirector is not None):
            raise ConfigError("technique D, and only D, works with a redirector")
        # D: the dynamic destination; connections without it fall back on R3
        self.redirector = redirector
        self.name = name
        self.address = address
        self.address6 = address6
        self.previous_owner = previous_owner
        self.serves = serves
        self.keeps = keeps
        self.alive = alive
        self.group = group
        self._groups = {group} if group6 is None else {group, group6}
        self.port = port
        self.endpoint = endpoint
        self.app = app
        self.host = host
        self.send_control = send_control
        self.session = session
        self.rng = rng
        self.close_after_transaction = close_after_transaction
        # R3: asked every QUERY_RESEND s; then the connection is reset, unless the
        # server waited on is alive (`_answer_may_come`). A reply can be late on a
        # loaded host.
        self.query_timeout = query_timeout
        # As long as an asker may ask the same query again (`QUERY_PATIENCE`).
        self.given_kept = max(2 * query_timeout, QUERY_PATIENCE)
        self.forward_timeout = forward_timeout  # R2: forwarded packets nobody claims
        self.idle_timeout = idle_timeout
        self.stats = HandoverStats()
        self.moved: set[ConnKey] = set()  # connections we keep although their portion left us
        self._queries: dict[ConnKey, _Query] = {}
        self._query_ids: dict[int, ConnKey] = {}
        # R3: states we handed over, kept for the asker's same query, asked again:
        # query id -> (the reply, the asker's name, until when, the asker's address).
        self._given: dict[int, tuple[control.StateReply, str, float, Address | None]] = {}
        # Queries that ran out with no state, for as long as a reply may still come:
        # query id -> (connection, until).
        self._ended: dict[int, tuple[ConnKey, float]] = {}
        self._forwards: dict[tuple[int, int], _Forward] = {}  # (client, port) -> old owner
        self.edges = sorted(edges, key=lambda e: -e[0].prefixlen)
        self._tagged: dict[ConnKey, Address] = {}  # R4: -> the edge told
        self._next_sweep = 0.0  # of `moved` (`_expire_moved`)

    # -- the allocation changes --------------------------------------------------------
    def before_change(self, keep: Held | None) -> None:
        """R4 (Fig 16, 1600): a reallocation is about to execute; create a tag-switched
        path for each connection we will lose (claims 13, 39): tag it onto our tree at
        its client's edge router."""
        if self.technique is not Technique.R4:
            return
        idle_ms = max(1, int(self.idle_timeout * 1000))
        for key in self.endpoint.keys():
            if _owned(keep, key) or key in self._tagged:
                continue
            (group, port), (client, client_port) = key
            edge = self.edge_of(client)
            if edge is None:
                self.stats.no_edge += 1
                continue
            flow = control.FlowKey(IPPROTO_TCP, client, client_port, group, port)
            # Onto our tree of the client's family (a dual-stack pool's server has two).
            root = self.address6 if client.version == 6 and self.address6 else self.address
            self.send_control(control.FlowTag(self.name, 0, flow, root, idle_ms), edge)
            self._tagged[key] = edge
            self.stats.pinned += 1

    def edge_of(self, client: control.Address) -> Address | None:
        """The router the client's network is attached to, by longest prefix."""
        return next((router for net, router in self.edges if client in net), None)

    def after_change(self, owned: Held | None, now: float) -> None:
        """The new allocation is in force: deal with the connections we gave up."""
        redirector = self.redirector
        for key in self.endpoint.keys():
            if _owned(owned, key):
                self.moved.discard(key)
                continue
            if redirector is not None and redirector.follows(key):
                continue  # D moves it below
            if self.technique is Technique.R1:
                conn = self.endpoint.connection(key)
                if conn is not None:
                    conn.abort(now)
                self.app.close(key)
                self.stats.reset_moved += 1
            else:
                self.moved.add(key)
        if redirector is not None:
            redirector.after_change(now)

    def on_rekeyed(self, previous: ConnKey, key: ConnKey, now: float) -> None:
        """A connection moved to our own address (its client follows it, Fig 20)."""
        self.moved.discard(previous)
        if self.redirector is not None:
            self.redirector.on_rekeyed(previous, key, now)

    # -- segments of connections we do not know ---------------------------------------
    def on_unknown(
        self,
        src: Address,
        dst: Address,
        segment: TcpSegment,
        now: float,
    ) -> None:
        if segment.flags & TcpFlags.RST:
            return
        key: ConnKey = ((dst, segment.dst_port), (src, segment.src_port))
        if self.redirector is not None and dst != self.group:
            # D: a segment to our own address, of a connection we moved away or never had
            if not self.redirector.on_unknown(src, segment, now):
                self._reset((src, dst, segment))
        elif self.technique is Technique.R2:
            self._forward((src, dst, segment), now)
        elif self.technique in (Technique.R3, Technique.D):
            self._query(key, (src, dst, segment), now)
        else:
            self._reset((src, dst, segment))

    def _reset(self, item: Segment) -> None:
        self.endpoint.reset_for(*item)
        self.stats.reset_unknown += 1

    def _forward(self, item: Segment, now: float) -> None:
        src, _, segment = item
        flow = (int(src), segment.src_port)
        entry = self._forwards.get(flow)
        if entry is None:
            entry = self._forwards[flow] = _Forward(None, now, now)
        if entry.target is None and now - entry.first > self.forward_timeout:
            # Nobody has claimed this connection: it cannot continue anywhere.
            del self._forwards[flow]
            self._reset(item)
            return
        entry.last_used = now
        self._pass_on(item, entry.target)

    def _pass_on(self, item: Segment, to: Address | None) -> None:
        """The client's segment, as it came, to the server that holds its connection
        (R2; R3's `holder`), or to the whole control group (R2, not known yet)."""
        src, dst, segment = item
        packet = make_packet(src, dst, IPPROTO_TCP, segment.to_wire(src, dst))
        message = control.Forwarded(self.name, 0, self.address, packet.to_wire())
        self.send_control(message, to)
        self.stats.forwarded_out += 1

    def _query(self, key: ConnKey, item: Segment, now: float) -> None:
        query = self._queries.get(key)
        if query is None:
            query_id = self.rng.getrandbits(63)
            client, port = key[1]
            wanted = control.ConnectionKey(client, port, key[0][0], key[0][1])
            query = self._queries[key] = _Query(
                query_id, now + self.query_timeout, wanted, now + QUERY_RESEND
            )
            self._query_ids[query_id] = key
            # First the client's owner before the latest change, point to point: it
            # mostly holds the state, and the whole pool need not read the question
            # (a merge after a router's outage moves hundreds of connections at once).
            # It says so if it does not (a reply not found), and we ask everyone.
            owner = self.previous_owner(client) if self.previous_owner is not None else None
            to = owner if owner is not None and owner not in (self.address, self.address6) else None
            query.asked, query.started = to, now
            self.send_control(control.StateQuery(self.name, 0, query_id, wanted), to)
            self.stats.queries += 1
        if query.holder is not None:
            self._pass_on(item, query.holder)
        elif len(query.segments) < 64:
            query.segments.append(item)

    def peer_returned(self, now: float, peer: Address) -> None:
        """A server we held dead is heard again (R3, D): it may be the old owner our
        queries wait for, cut off by a router's outage with its connections kept
        (finding 5 of docs/soak.md). Ask it now, point to point, and everyone again
        `RETURN_RESEND` later, and wait `query_timeout` from now, once in a query's
        life: what ran out while it was unreachable says nothing of whether it holds
        the state. A query whose holder is known is asked only when that is the
        server heard again (its view may now agree with ours). Under a loss burst
        peers are held dead and heard again many times a second: asking the whole
        group at each return, and waiting again each time, made a storm of questions
        that starved the pool (docs/soak.md, finding 14)."""
        for query in self._queries.values():
            if query.holder not in (None, peer):
                continue  # (its holder is known and was not away)
            if not query.extended:
                query.extended = True
                query.deadline = max(query.deadline, now + self.query_timeout)
            query.resend = min(query.resend, now + RETURN_RESEND)
            self.send_control(control.StateQuery(self.name, 0, query.query_id, query.wanted), peer)

    # -- control messages ----------------------------------------------------------------
    def on_message(
        self,
        message: control.ControlMessage,
        now: float,
        via_group: bool = True,
        source: Address | None = None,
    ) -> bool:
        """Handle a technique's message; False if it is not one of ours. `via_group`: it
        came over the control group (not point to point); `source`: its sender's address."""
        redirector = self.redirector
        if redirector is not None and isinstance(
            message, control.Forwarded | control.MoveConnection | control.MoveAck
        ):
            if isinstance(message, control.Forwarded):
                redirector.on_forwarded(message, now)
            elif isinstance(message, control.MoveConnection):
                redirector.on_move(message, now)
            else:
                redirector.on_ack(message, now)
        elif isinstance(message, control.Forwarded):
            self._on_forwarded(message, now, via_group)
        elif isinstance(message, control.Redirect):
            flow = (int(message.client), message.client_port)
            entry = self._forwards.get(flow)
            if entry is not None and message.target.version == self.address.version:
                entry.target = message.target
                self.stats.redirects += 1
        elif isinstance(message, control.StateQuery):
            self._on_state_query(message, now, source, via_group)
        elif isinstance(message, control.StateReply):
            self._on_state_reply(message, now, source)
        else:
            return False
        return True

    def _on_forwarded(self, message: control.Forwarded, now: float, via_group: bool) -> None:
        try:
            ip = parse_packet(message.packet)
        except WireError:
            return
        if ip.protocol != IPPROTO_TCP or ip.header.dst not in self._groups or len(ip.payload) < 4:
            return
        src_port = int.from_bytes(ip.payload[:2], "big")
        dst_port = int.from_bytes(ip.payload[2:4], "big")
        key: ConnKey = ((ip.header.dst, dst_port), (ip.header.src, src_port))
        if key not in self.endpoint:
            return  # not ours either
        self.stats.forwarded_in += 1
        self.host.deliver_tcp(ip, now)
        conn = self.endpoint.connection(key)
        if self.technique is not Technique.R2 and conn is not None and conn.bytes_unacked:
            # R3: a server whose view is behind or ahead of ours passed the client's
            # segment on (`_Query.holder`): the client did not reach us, so what we
            # sent it since may have gone astray too, and our timer has backed off.
            conn.retransmit_now(now)
        receiver = message.receiver
        if receiver.version != self.address.version or receiver == self.address:
            return
        if via_group:
            # The new owner does not know where this connection lives: tell it. (Point
            # to point forwards need no answer; a lost redirect is repaired by the next
            # packet that comes over the group.)
            redirect = control.Redirect(
                self.name, 0, ip.header.src, src_port, dst_port, self.address, 0
            )
            self.send_control(redirect, receiver)

    def _on_state_query(
        self, query: control.StateQuery, now: float, source: Address | None, via_group: bool
    ) -> None:
        """Hand the connection's state over to the asker, point to point (`source`):
        only it can use it. Asked point to point for a state we do not hold, say so.
        Keep a connection whose client we serve now (`keeps`), and say so: the asker's
        view of the allocation is not ours (a server cut off by a router's outage takes
        the whole space until it merges back, and asks for every connection it is
        sent; or its change committed a moment before ours): given, the connection
        would leave the server its client reaches, or die with a server it never
        belonged to (finding 13 of docs/soak.md). Once we no longer serve the client,
        the asker's next resend gets it."""
        wanted = query.key
        key: ConnKey = ((wanted.group, wanted.service_port), (wanted.client, wanted.client_port))
        conn = self.endpoint.connection(key)
        if conn is None:
            if not self._give_again(query, now) and not via_group and source is not None:
                missing = control.StateReply(self.name, 0, query.query_id, wanted, False)
                self.send_control(missing, source)
            return
        if self.keeps is not None and self.keeps(wanted.client, now):
            if source is not None:
                held = control.StateReply(self.name, 0, query.query_id, wanted, False, held=True)
                self.send_control(held, source)
            self.stats.held_back += 1
            return
        try:
            self.host.flush()  # what it queued still goes out from here
            transport = self.endpoint.release(key).export_state()
        except (SessionError, KeyError):
            return
        app_state = self.app.export(key) if key in self.app else b""
        self.app.close(key)
        self.moved.discard(key)
        reply = control.StateReply(self.name, 0, query.query_id, wanted, True, transport, app_state)
        self.send_control(reply, source)
        self.stats.transferred_out += 1
        if len(self._given) >= GIVEN_LIMIT:
            del self._given[next(iter(self._given))]
        self._given[query.query_id] = (reply, query.sender, now + self.given_kept, source)

    def _give_again(self, query: control.StateQuery, now: float) -> bool:
        """The state we handed over, again, for the same query asked again: the asker
        has not got our reply (lost, or still on its way). Only for that query: a new
        one, even from the same server, may come after the connection went on from
        there (to it, elsewhere, back), and the copy we kept would turn it back.
        Whether we gave it."""
        given = self._given.get(query.query_id)
        if given is None:
            return False
        reply, asker, until, source = given
        if until < now:
            del self._given[query.query_id]
            return False
        if asker != query.sender:
            return False
        self.send_control(reply, source)
        self.stats.transfer_resent += 1
        return True

    def _on_state_reply(
        self, reply: control.StateReply, now: float, source: Address | None = None
    ) -> None:
        if not reply.found:
            asked = self._query_ids.get(reply.query_id)
            query = self._queries.get(asked) if asked is not None else None
            if query is not None and query.query_id == reply.query_id and reply.held:
                # Its holder serves the client: it answers what reached us instead.
                # Asked again at each resend, in case our views come to agree.
                if source is not None:
                    query.holder = source
                    for item in query.segments:
                        self._pass_on(item, source)
                    query.segments.clear()
            elif query is not None and query.query_id == reply.query_id:
                # The server we asked first has no such state: ask everyone, now.
                query.asked = None
                query.resend = now + QUERY_RESEND
                self.send_control(
                    control.StateQuery(self.name, 0, query.query_id, query.wanted), None
                )
            return
        key = self._query_ids.pop(reply.query_id, None)
        if key is None:
            # Its query ran out as the holder gave the state (seed 13 of docs/soak.md,
            # finding 27): the connection's only copy, taken once.
            late = self._ended.pop(reply.query_id, None)
            key = late[0] if late is not None else None
            query = None
        else:
            query = self._queries.pop(key, None)
            if query is None:
                return
        if key is None or key in self.endpoint:
            return
        try:
            conn = Connection.import_state(reply.transport_state, now, self.rng, self.session)
            if conn.key != key:
                return
            self.endpoint.adopt(conn)
            if reply.app_state:
                self.app.restore(key, reply.app_state)
            else:
                self.app.open(key)
        except (WireError, SessionError):
            return
        self.stats.transferred_in += 1
        for src, dst, segment in query.segments if query is not None else ():
            self.endpoint.receive(src, dst, segment, now)

    # -- housekeeping --------------------------------------------------------------------
    def on_answer(self, key: ConnKey, conn: Connection, now: float) -> None:
        """An answer went out on `key`: R2 with close closes moved connections now."""
        if self.close_after_transaction and key in self.moved:
            conn.close(now)
            self.stats.closed_after_transaction += 1

    def forget_servers(self, addresses: set[ipaddress.IPv4Address] | set[Address]) -> None:
        """Servers that died: connections we forwarded to them are gone; their next
        packet is forwarded afresh and, unclaimed, reset (R2)."""
        for flow, entry in list(self._forwards.items()):
            if entry.target in addresses:
                del self._forwards[flow]

    def on_closed(self, key: ConnKey) -> None:
        self.moved.discard(key)
        if self.redirector is not None:
            self.redirector.on_closed(key)
        edge = self._tagged.pop(key, None)
        if edge is not None:
            # Fig 16, 1630: the connection ended; its tagged path is broken down.
            (group, port), (client, client_port) = key
            flow = control.FlowKey(IPPROTO_TCP, client, client_port, group, port)
            self.send_control(control.FlowUntag(self.name, 0, (flow,)), edge)
            self.stats.unpinned += 1

    def next_deadline(self) -> float | None:
        mine = min((min(q.deadline, q.resend) for q in self._queries.values()), default=None)
        theirs = self.redirector.next_deadline() if self.redirector is not None else None
        if mine is None:
            return theirs
        return mine if theirs is None else min(mine, theirs)

    def on_timer(self, now: float) -> None:
        if self.redirector is not None:
            self.redirector.on_timer(now)
        for key, query in list(self._queries.items()):
            if query.deadline <= now and self._answer_may_come(query, now):
                query.deadline = min(now + QUERY_RESEND, query.started + QUERY_PATIENCE)
            if query.resend <= now < query.deadline:
                # The query or its answer may be lost on a busy network: ask again
                # (a connection's holder alone: it gives it once our views agree).
                query.resend = now + QUERY_RESEND
                self.send_control(
                    control.StateQuery(self.name, 0, query.query_id, query.wanted),
                    query.holder,
                )
            if query.deadline <= now:
                # No server had the state: the connection cannot continue (R1 fallback),
                # unless a server keeps it (`holder`), or its client is no longer ours
                # (our view moved on while we asked: its owner answers it, or resets it).
                del self._queries[key]
                self._query_ids.pop(query.query_id, None)
                client = key[1][0]
                if query.holder is None and (self.serves is None or self.serves(client)):
                    for item in query.segments[-1:]:
                        self._reset(item)
                else:  # nothing reset: a state given as it ran out is still taken
                    self._ended[query.query_id] = (key, now + self.given_kept)
        stale = [f for f, e in self._forwards.items() if now - e.last_used > self.idle_timeout]
        for flow in stale:
            del self._forwards[flow]
        for query_id in [q for q, (_, _, until, _) in self._given.items() if until < now]:
            del self._given[query_id]
        for query_id in [q for q, (_, until) in self._ended.items() if until < now]:
            del self._ended[query_id]
        if now >= self._next_sweep:
            self._next_sweep = now + MOVED_SWEEP_S
            self._expire_moved(now)

    def _answer_may_come(self, query: _Query, now: float) -> bool:
        """Whether the state may yet come from the server that said it holds the
        connection (`holder`: once its view agrees with ours it gives it, and a reply
        lost on the way is given again only for this query) or, until a server says
        it has none, from the one we asked first: that server is alive by our view
        and the query is younger than `QUERY_PATIENCE`. A dead one is held dead within
        the pool's detection time, and its clients' connections are reset as before."""
        waited_on = query.holder if query.holder is not None else query.asked
        return (
            waited_on is not None
            and self.alive is not None
            and now < query.started + QUERY_PATIENCE
            and self.alive(waited_on, now)
        )

    def _expire_moved(self, now: float) -> None:
        """Reset the connections we keep although their portion left us that no segment
        has reached for `idle_timeout`. We keep them for a new owner to ask for (R3), or
        for their packets to keep coming here (R2, R4); a client that gave its connection
        up (reset by a new owner no state reached, or timed out while its reset could not
        reach us) never sends on it again, and an established connection with nothing to
        send has no timer: nothing else ever ended it. Under churn such connections piled
        up for as long as a server ran (docs/soak.md finding 11)."""
        for key in list(self.moved):
            conn = self.endpoint.connection(key)
            if conn is None:
                self.moved.discard(key)
            elif now - conn.last_received > self.idle_timeout:
                self.moved.discard(key)
                conn.abort(now)  # its ConnectionReset closes the session (`Server._drain`)
                self.stats.expired_moved += 1


def _owned(portions: Held | None, key: ConnKey) -> bool:
    return portions is not None and portions.owns(key[1][0])
