"""Technique D: a connection moved to a server that holds a half-open one of the
same flow (docs/soak.md, finding 25).

A server restarted on an allocation out of date answers, for a moment, SYNs of
clients that are another server's now: both answer, the client follows the first
SYN-ACK, and the other server keeps a half-open connection (SYN_RCVD) while it
retransmits its SYN-ACK. When the live connection was later moved to that server
(Fig 21), the half-open one made it refuse the move as stale, every retry of it,
while the client's segments, forwarded to it by the old server, reached nothing:
the client's connection timed out. Servers now give a SYN-ACK up after 5 timeouts
(`SessionConfig.syn_retries`, as Linux's tcp_synack_retries) and let such a
half-open connection go when a move of its flow comes. The soak's pool on the
memory driver, with server kills, restarts and a rebalance a second after each
restart."""

from __future__ import annotations

import dataclasses
import random
import sys
from pathlib import Path

import pytest

from manycast.pool import build
from manycast.protocol import server
from manycast.protocol.redirect import Redirector
from manycast.runtime import PoolRun
from pooltools import run_to, start, table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from _soak_plan import pool_text

# The soak's clients (bench/soak.py's defaults) and failure detection (2 s).
CLIENTS = {"rto_max_ms": 200, "max_retries": 15, "abandon_after_ms": 10000}
KILLS, GAP = 4, 15.0


def _pool(seed: int, down: float) -> tuple[PoolRun, list[tuple[float, str]]]:
    """The soak's D pool, 300 clients, standbys s5 and s6 joined; `KILLS` kills of s3
    or s4 `GAP` s apart, each a rebalance 1 s after its restart."""
    text = pool_text("D", 150, 0.5, 400.0, heartbeat_misses=20, client_options=CLIENTS)
    head, run_table = text.rsplit("[run]", 1)
    steps = [
        table("scenario", at=at, action="add", server=s) for at, s in ((5.0, "s5"), (8.0, "s6"))
    ]
    rng = random.Random(seed)
    kills = [(20.0 + i * GAP, rng.choice(["s3", "s4"])) for i in range(KILLS)]
    steps += [
        table("scenario", at=round(at + down + 1.0, 3), action="rebalance") for at, _ in kills
    ]
    run, _ = start(head + "\n".join(steps) + "\n[run]" + run_table, seed=seed)
    return run, kills


def _sessions_lost_beside_crashes(seed: int) -> tuple[list[str], list[Redirector]]:
    """Clients that lost a session whose connection was not on the killed server;
    and every server's technique-D state."""
    down = random.Random(seed).uniform(2.0, 5.0)
    run, kills = _pool(seed, down)
    redirectors: dict[int, Redirector] = {}
    lost = []
    for at, victim in kills:
        run_to(run, at)
        killed = run.nodes.servers[victim]
        redirectors |= {
            id(s.redirector): s.redirector for s in run.nodes.servers.values() if s.redirector
        }
        elsewhere = {
            name
            for name, client in run.nodes.clients.items()
            if client.conn_key is not None and client.conn_key[1][0] != killed.address
        }
        before = {name: c.stats.reconnects for name, c in run.nodes.clients.items()}
        run.network.kill(victim)
        run_to(run, at + down)  # a new process: the pool's key, an empty state
        fresh = build(run.topology, seed=seed, wall_base=run.network.wall_base, only={victim})
        run.nodes.servers[victim] = fresh.servers[victim]
        run.network.add(fresh.servers[victim])
        run_to(run, at + GAP)
        clients = run.nodes.clients.items()
        lost += [n for n, c in clients if n in elsewhere and c.stats.reconnects > before[n]]
    redirectors |= {
        id(s.redirector): s.redirector for s in run.nodes.servers.values() if s.redirector
    }
    return lost, list(redirectors.values())


def test_seed_34_a_connection_moved_to_a_server_with_a_half_open_one_of_its_flow_lives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Soak seed 20261201, D, 30 minutes: a198's connection timed out 5.4 s after the
    rebalance at 1609.0 s (finding 25). Here seed 34. Two changes each end it:
    servers give a SYN-ACK up after 5 timeouts (18.9 s; 8, 153 s, since finding 24),
    and a server a connection is moved to lets its half-open one of the flow go."""
    assert _sessions_lost_beside_crashes(34)[0] == []

    # Half-open connections that live 153 s, as between findings 24 and 25: the
    # moves reach them, and replace them.
    long_lived = dataclasses.replace(server.DEFAULT_SESSION, syn_retries=None)
    monkeypatch.setattr(server, "DEFAULT_SESSION", long_lived)
    lost, redirectors = _sessions_lost_beside_crashes(34)
    assert lost == []
    assert sum(r.stats.half_open_dropped for r in redirectors) >= 1
    assert sum(r.stats.stale_moves for r in redirectors) == 0

    # ... kept, they refuse each move as stale, and a session is lost.
    monkeypatch.setattr(Redirector, "_drop_half_open", lambda self, key: False)
    lost, redirectors = _sessions_lost_beside_crashes(34)
    assert len(lost) >= 1
    assert sum(r.stats.stale_moves for r in redirectors) >= 1
