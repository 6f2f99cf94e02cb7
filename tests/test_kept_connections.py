"""Connections a server keeps although their portion left it (R3), whose clients gave
them up, end (docs/soak.md finding 11, "Memory").

An old owner keeps a moved connection for its new owner to ask for. When the state
does not come (here every state query is lost for a while; in the soak, the pool
split while a router was down), the new owner resets the client, which reconnects
on a new port; the old owner is never asked and never hears from the client again,
and an established connection with nothing to send has no timer. Such connections
piled up in the soak's infrastructure process at every episode of churn, for as
long as it ran. A kept connection that no segment reaches for the handover's
`idle_timeout` is reset now.

The pool is the soak's shape on the memory driver (virtual clock, no sleeping).
"""

from __future__ import annotations

from fractions import Fraction

from manycast.protocol.handover import QUERY_PATIENCE
from manycast.protocol.tcp import ConnKey
from manycast.runtime import PoolRun
from manycast.wire import control
from pooltools import live, run_to, start
from test_router_restart import two_edge_pool

IDLE_TIMEOUT = 30.0  # the handover's default
# Every state query is lost meanwhile: longer than a query waits for an old owner
# that is alive (`QUERY_PATIENCE`), so the new owners reset the clients.
LOST = (5.0, 5.0 + QUERY_PATIENCE + 2.0)


def forsaken(run: PoolRun) -> dict[str, list[ConnKey]]:
    """server -> the connections it keeps outside its portions that are no client's
    current connection."""
    current = {client.conn_key for client in run.nodes.clients.values()}
    out: dict[str, list[ConnKey]] = {}
    for name, server in live(run).items():
        gone = [key for key in server.handover.moved if (key[1], key[0]) not in current]
        if gone:
            out[name] = gone
    return out


def test_kept_connections_whose_clients_left_end_after_the_idle_timeout() -> None:
    run, trace = start(two_edge_pool(duration=100.0), seed=1)
    trace.drop(
        lambda _to, _by, message, now: (
            isinstance(message, control.StateQuery) and LOST[0] <= now < LOST[1]
        )
    )
    run_to(run, LOST[0])
    run.command("s1", control.SetShareOp("s1", Fraction(1, 10)))  # s1's clients move
    run_to(run, LOST[1] + 2.0)
    left = forsaken(run)
    assert sum(len(keys) for keys in left.values()) > 0, "no connection was left behind"
    churned = run.now
    run_to(run, churned + IDLE_TIMEOUT + 2.0)
    assert forsaken(run) == {}
    expired = sum(s.handover.stats.expired_moved for s in live(run).values())
    assert expired >= sum(len(keys) for keys in left.values())
    # What ended them was their silence: every client is still served.
    clients = run.nodes.clients.values()
    assert all(c.stats.first_ok_after(churned + IDLE_TIMEOUT) is not None for c in clients)


def test_kept_connections_still_in_use_stay() -> None:
    """R2 (Fig 14): the old owner goes on serving the connections it gave up, their
    packets forwarded to it, for as long as their clients use them."""
    text = two_edge_pool(duration=100.0).replace('technique = "R3"', 'technique = "R2"')
    run, _ = start(text, seed=1)
    run_to(run, 5.0)
    run.command("s1", control.SetShareOp("s1", Fraction(1, 10)))
    run_to(run, 8.0)
    s1 = run.nodes.servers["s1"]
    kept = set(s1.handover.moved)
    assert kept, "s1 kept no connection"
    run_to(run, 8.0 + 2 * IDLE_TIMEOUT)
    assert s1.handover.stats.expired_moved == 0
    assert set(s1.handover.moved) == kept
    clients = run.nodes.clients.values()
    assert sum(c.stats.resets + c.stats.timeouts for c in clients) == 0
