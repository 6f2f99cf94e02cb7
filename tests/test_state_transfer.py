"""R3 (state transfer on demand, Fig 15) when the state's one message is lost or late.

The old owner lets a connection go when it answers the new owner's query: its
reply is the connection's only copy. The soak (docs/soak.md, findings; seed
20261201, the overlay under load) lost sessions this way: replies that came after
the asker had given up, or never, and the asker reset the connection. The old
owner now keeps the reply and sends it again when the same server asks again.
On the memory driver, with the first copy of every state reply lost, no session
may be lost.
"""

from __future__ import annotations

from manycast.protocol.handover import QUERY_PATIENCE
from manycast.protocol.server import Server
from manycast.protocol.tcp import ConnKey
from manycast.wire import control
from manycast.wire.transport import TcpFlags, TcpSegment
from pooltools import pool_toml, run_to, start

CHANGE_AT = 3.0


def _pool(clients: int = 48) -> str:
    return pool_toml(
        clients=clients,
        pool={"technique": "R3"},
        scenario=[(CHANGE_AT, "set_share", {"server": "s1", "share": 0.1})],
        duration=8.0,
    )


def _lose_first_reply_copies() -> tuple[list[int], object]:
    """A drop rule: every server loses the first copy of every state reply."""
    seen: set[tuple[str, int]] = set()
    lost: list[int] = []

    def rule(to: str, sender: str, message: control.ControlMessage, now: float) -> bool:
        if not isinstance(message, control.StateReply) or (to, message.query_id) in seen:
            return False
        seen.add((to, message.query_id))
        lost.append(message.query_id)
        return True

    return lost, rule


def test_a_lost_state_reply_is_sent_again_and_no_session_is_lost() -> None:
    run, trace = start(_pool(), seed=20261201)
    lost, rule = _lose_first_reply_copies()
    trace.drop(rule)  # type: ignore[arg-type]
    run_to(run, 8.0)
    servers = run.nodes.servers.values()
    clients = run.nodes.clients.values()
    transferred_in = sum(s.handover.stats.transferred_in for s in servers)
    transferred_out = sum(s.handover.stats.transferred_out for s in servers)
    assert lost and transferred_out > 0  # states moved, and their first replies were lost
    assert transferred_in == transferred_out  # every state handed over arrived
    assert sum(c.stats.resets for c in clients) == 0
    assert sum(c.stats.state_lost for c in clients) == 0
    assert sum(c.stats.requests_failed for c in clients) == 0
    late = [c.name for c in clients if c.stats.first_ok_after(CHANGE_AT + 2.0) is None]
    assert late == []
    assert sum(s.handover.stats.transfer_resent for s in servers) >= transferred_out


def test_a_state_is_given_again_only_for_the_same_query() -> None:
    """The kept copy answers the asker's own query asked again, nothing else: a new
    query, even from the same server, may come after the connection went on (to it,
    elsewhere, back), and the old copy would turn the connection back; another server
    must never get it either (two servers would hold the connection)."""
    run, _ = start(_pool(clients=16), seed=20261201)
    run_to(run, 6.0)
    giver = next(s for s in run.nodes.servers.values() if s.handover.stats.transferred_out)
    assert giver.handover._given, "it keeps what it gave"
    query_id, (reply, asker, _, _) = next(iter(giver.handover._given.items()))
    other = next(n for n in run.nodes.servers if n not in (asker, giver.name))
    sent = giver.handover.stats.transfer_resent
    for sender, asked in ((other, query_id), (asker, query_id + 1)):
        giver.handover.on_message(control.StateQuery(sender, 0, asked, reply.key), run.now)
        assert giver.handover.stats.transfer_resent == sent, (sender, asked)
    giver.handover.on_message(control.StateQuery(asker, 0, query_id, reply.key), run.now)
    assert giver.handover.stats.transfer_resent == sent + 1  # the same query, again


def _unknown_segment_reaches(server: Server, key: ConnKey, now: float) -> None:
    """A segment of connection `key`, which `server` does not hold, reaches it."""
    (group, port), (client, client_port) = key
    segment = TcpSegment(client_port, port, 0, 0, TcpFlags.ACK, 1024)
    server.handover.on_unknown(client, group, segment, now)
    server._act(now)


def _record(into: list[tuple[str, str, control.ControlMessage]]) -> object:
    """A drop rule that loses nothing: it records every control message into a server."""

    def rule(to: str, sender: str, message: control.ControlMessage, now: float) -> bool:
        into.append((to, sender, message))
        return False

    return rule


def test_a_state_goes_to_its_asker_alone_from_the_server_asked_first() -> None:
    """A state moves between two servers, and only they read of it. The asker asks the
    client's owner before the change, point to point, and the reply comes back the
    same way: before, both went to the whole control group, every server decoding
    every question and every state (a merge after a router's outage moves hundreds of
    connections at once; on the soak's pool, 1000 clients, the servers received 8072
    control messages in the 5 s after a 1.46 s outage of rb, 4994 now)."""
    run, trace = start(_pool(), seed=20261201)
    seen: list[tuple[str, str, control.ControlMessage]] = []
    trace.drop(_record(seen))  # type: ignore[arg-type]
    run_to(run, 8.0)
    servers = run.nodes.servers.values()
    moved = sum(s.handover.stats.transferred_in for s in servers)
    assert moved > 0 and moved == sum(s.handover.stats.transferred_out for s in servers)
    replies = [(to, m) for to, _, m in seen if isinstance(m, control.StateReply)]
    asker_of = {m.query_id: sender for _, sender, m in seen if isinstance(m, control.StateQuery)}
    assert len(replies) == moved  # one delivery each, none lost here
    assert all(to == asker_of[m.query_id] for to, m in replies)
    # Each question read once: the old owner held every state the share change moved.
    queries = [m.query_id for _, _, m in seen if isinstance(m, control.StateQuery)]
    assert len(queries) == len(set(queries)) == moved
    assert sum(c.stats.requests_failed for c in run.nodes.clients.values()) == 0


def test_a_server_asked_for_a_state_it_does_not_hold_says_so_and_the_asker_asks_everyone() -> None:
    """The first question goes to the client's owner before the latest change; the
    state may have moved on since (two changes the client sent nothing through). That
    server says it does not hold it, and the asker asks the whole group at once rather
    than at its next resend (0.3 s later)."""
    run, trace = start(_pool(clients=16), seed=20261201)
    run_to(run, 6.0)
    seen: list[tuple[str, str, control.ControlMessage]] = []
    trace.drop(_record(seen))  # type: ignore[arg-type]
    holder = next(s for s in run.nodes.servers.values() if s.endpoint.keys())
    asker, wrong = [s for s in run.nodes.servers.values() if s is not holder][:2]
    key = next(iter(holder.endpoint.keys()))
    asker.handover.previous_owner = lambda _: wrong.address
    # The holder's view has moved the client on: it gives the state (a holder that
    # still serves the client keeps it, `test_router_restart`).
    holder.handover.keeps = lambda _client, _now: False
    _unknown_segment_reaches(asker, key, run.now)
    asked = run.now
    run_to(run, asked + 0.05)
    said = [m for _, s, m in seen if s == wrong.name and isinstance(m, control.StateReply)]
    assert [m.found for m in said] == [False]
    assert holder.handover.stats.transferred_out >= 1 and key not in holder.endpoint
    assert key in asker.endpoint  # the state reached the asker within 50 ms


def test_a_server_keeps_a_connection_whose_client_it_serves_and_the_asker_passes_it_on() -> None:
    """Asked for a connection whose client it serves by its own view, a server keeps
    it and answers "held": the asker's view is behind or ahead (docs/soak.md, finding
    13). The asker passes the client's segments on to it instead, asks it alone again
    until its query runs out (`QUERY_PATIENCE`, while the holder is alive: it gives the
    state once our views agree, and a reply of it lost is given again only to this
    query), and then resets nothing: the connection lives on where its client
    reaches."""
    run, trace = start(_pool(clients=16), seed=20261201)
    run_to(run, 6.0)
    seen: list[tuple[str, str, control.ControlMessage]] = []
    trace.drop(_record(seen))  # type: ignore[arg-type]
    servers = list(run.nodes.servers.values())
    holder = next(s for s in servers if s.endpoint.keys())
    asker = next(s for s in servers if s is not holder)
    key = next(iter(holder.endpoint.keys()))
    assert holder._serves(key[1][0])  # the connection's client
    resets = asker.handover.stats.reset_unknown
    _unknown_segment_reaches(asker, key, run.now)
    asked = run.now
    run_to(run, asked + 0.05)
    said = [m for _, s, m in seen if s == holder.name and isinstance(m, control.StateReply)]
    assert [(m.found, m.held) for m in said] == [(False, True)]
    passed = [m for _, s, m in seen if s == asker.name and isinstance(m, control.Forwarded)]
    assert len(passed) == 1 and holder.handover.stats.forwarded_in == 1
    # A third server is held dead by the asker for a moment and heard again.
    third = next(s for s in servers if s not in (holder, asker))
    trace.cut({third.name}, {asker.name}, run.now, run.now + 0.5)
    run_to(run, asked + asker.handover.query_timeout + 0.1)
    assert key in holder.endpoint and key not in asker.endpoint
    # The asker asked again while the query lived, the holder alone: before, each
    # resend went to every server, and so did every query at a peer's return (a
    # storm under loss bursts, docs/soak.md finding 14).
    again = [to for to, s, m in seen if s == asker.name and isinstance(m, control.StateQuery)]
    assert len(again) >= 3 and set(again) == {holder.name}, again
    assert asker.handover.stats.reset_unknown == resets  # no reset for the held connection
    assert asker.handover._queries  # still asking the holder, alive
    run_to(run, asked + QUERY_PATIENCE + 0.1)
    assert key in holder.endpoint and not asker.handover._queries
    assert asker.handover.stats.reset_unknown == resets
    assert sum(c.stats.requests_failed for c in run.nodes.clients.values()) == 0
