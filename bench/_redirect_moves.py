"""bench/redirect.py part 2: connections moved up close, with the clients in one
process and the routers and servers in another, as bench/reallocation.py runs its
pool (both started at the same CLOCK_MONOTONIC instant, bench/_pool.py).

Two processes for two cores: with every node in one process, each move waits
behind the clients' work too; with a process per site (tried: rs1's, rs2's, the
core's and the clients'), four processes share the two cores, and at a change,
when all of them are busy at once, the scheduler's time slices (several ms) add
to every hop.

Timeline (bench seconds): the clients connect; a quiet window (`QUIET`) gives the
steady-state round trip (`rtt_ms`: the median request latency in it); then share
changes `CHANGE_GAP` apart move connections; then every live connection gets one
of each kind of hijack from an attacker's address (`ATTACK`), and the run goes on
for `AFTER_ATTACK` to see that nothing was disturbed.

For every move, `pause` = when the client accepted the signed change-destination
minus when the old server let the connection go, both read on the machine's wall
clock (the servers' and the clients' processes share it).

Not a bench itself: bench/redirect.py runs it and prints the JSON result line.

Run alone, it prints one json object, its last line on stdout, naming the bench
to run (`_common.not_a_bench`).
"""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
import asyncio
import dataclasses
import ipaddress
import random
from collections import Counter
from multiprocessing.connection import Connection
from typing import Any

from _common import not_a_bench
from _pool import PORT_SEARCH, host_pool, percentile, run_together
from manycast.pool import pool_keys
from manycast.ports import free_base_port
from manycast.protocol.destination import sign_change
from manycast.runtime import PoolRun
from manycast.topology import loads
from manycast.wire.ip import IPPROTO_TCP, IPv4Packet
from manycast.wire.transport import ChangeDestination, ChangeDestinationMark, TcpFlags, TcpSegment

PORT = 7000
ATTACKER = ipaddress.IPv4Address("10.1.0.250")
SHARES = (0.10, 0.40, 0.20, 0.35, 0.15, 0.30)
QUIET = (5.0, 8.0)  # every client connected by then; its requests give the round trip
CHANGE_GAP = 1.5
ATTACK = QUIET[1] + CHANGE_GAP * len(SHARES) + 1.0
AFTER_ATTACK = 3.0
DURATION = ATTACK + AFTER_ATTACK + 0.5
# Where each node runs: a process per site, and the clients on their own.
SITES = (frozenset({"ra", "core", "rs1", "rs2", "s1", "s2", "s3", "s4"}),)


def steps(seed: int, servers: list[str]) -> list[tuple[float, str, dict[str, Any]]]:
    """The share changes: a seeded server each, `CHANGE_GAP` apart after the quiet."""
    rng = random.Random(seed)
    return [
        (QUIET[1] + index * CHANGE_GAP, "set_share", {"server": rng.choice(servers), "share": s})
        for index, s in enumerate(SHARES)
    ]


def hijacks(client: Any, key: Any, outsider: Any, wall_ms: int) -> list[tuple[str, Any]]:
    """One change-destination of each kind that must be refused, at `client`'s
    connection: forged, another key, replayed, stale, wrong cookie, unsigned."""
    conn = client.endpoint.connection(client.conn_key)
    serial = client.guard.last_serial + 1
    base = ChangeDestination(conn.tag, conn.cookie, ATTACKER, PORT, serial, wall_ms)
    replace = dataclasses.replace
    return [
        ("forged", replace(base, signature=random.Random(serial).randbytes(64))),
        ("other key", sign_change(base, outsider)),
        ("replayed", sign_change(replace(base, serial=serial - 1), key)),
        ("stale", sign_change(replace(base, timestamp_ms=wall_ms - 120_000), key)),
        ("wrong cookie", sign_change(replace(base, cookie=conn.cookie ^ 1), key)),
        ("unsigned", base),
    ]


def inject(client: Any, message: ChangeDestination, now: float) -> None:
    """`message` as a marked segment of the client's connection, from the attacker."""
    conn = client.endpoint.connection(client.conn_key)
    state = conn.session_state()
    segment = TcpSegment(
        PORT,
        client.conn_key[0][1],
        state.receive.rcv_nxt % 2**32,
        state.snd_nxt % 2**32,
        TcpFlags.ACK,
        65535,
        options=(ChangeDestinationMark(),),
        payload=message.to_wire(),
    )
    wire = IPv4Packet.make(
        ATTACKER, client.address, IPPROTO_TCP, segment.to_wire(ATTACKER, client.address)
    )
    client.receive(client.host.iface, wire.to_wire(), now)


# -- the sites' processes ---------------------------------------------------------------


def _record_moves(run: PoolRun, loop: asyncio.AbstractEventLoop, offset: float) -> None:
    """Each server of the site keeps a record of the moves it begins (`released`)."""
    for server in run.nodes.servers.values():
        if server.redirector is not None:
            server.redirector.record_moves()


def _site_collect(run: PoolRun, offset: float) -> dict[str, Any]:
    """Each move the site's servers began: (bench time, client, client port, serial)."""
    wall = run.network.wall_base
    released = [
        (at - wall - offset, int(client), port, serial)
        for server in run.nodes.servers.values()
        if server.redirector is not None
        for at, client, port, serial in server.redirector.released or ()
    ]
    redirectors = [s.redirector for s in run.nodes.servers.values() if s.redirector is not None]
    return {
        "released": released,
        "moved_out": sum(r.stats.moved_out for r in redirectors),
        "move_failed": sum(r.stats.move_failed for r in redirectors),
    }


# -- the clients' process ---------------------------------------------------------------


def _clients_setup(state: dict[str, Any], seed: int) -> Any:
    def setup(run: PoolRun, loop: asyncio.AbstractEventLoop, offset: float) -> None:
        clients = run.nodes.clients

        def quiet() -> None:
            state["unconnected_at_quiet"] = sorted(n for n, c in clients.items() if not c.connected)

        def attack() -> None:
            key, outsider = pool_keys(run.topology, seed)
            state["before"] = {
                n: (c.conn_key, len(c.stats.disruptions)) for n, c in clients.items()
            }
            state["refused_before"] = sum(
                (c.stats.redirects_refused for c in clients.values()), Counter()
            )
            tried: Counter[str] = Counter()
            wall_ms = int((run.network.wall_base + run.now) * 1000)
            for client in clients.values():
                if client.conn_key is None:
                    continue  # between two connections: nothing to hijack
                for what, message in hijacks(client, key, outsider, wall_ms):
                    inject(client, message, run.now)
                    tried[what] += 1
            state["tried"] = tried

        run.network.call_at(QUIET[0] + offset, quiet)
        run.network.call_at(ATTACK + offset, attack)

    return setup


def _clients_collect(state: dict[str, Any]) -> Any:
    def collect(run: PoolRun, offset: float) -> dict[str, Any]:
        clients = run.nodes.clients
        latencies = [
            lat
            for c in clients.values()
            for t, lat in zip(c.stats.ok_times, c.stats.latencies, strict=True)
            if QUIET[0] <= t - offset < QUIET[1]
        ]
        moves = []
        for client in clients.values():
            if client.conn_key is None:
                continue  # between connections at the end: its disruptions count below
            port = client.conn_key[0][1]  # type: ignore[index]
            for accepted, serial in client.stats.moves:
                moves.append((accepted - offset, int(client.address), port, serial))
        refused = (
            sum((c.stats.redirects_refused for c in clients.values()), Counter())
            - state["refused_before"]
        )
        before = state["before"]
        disturbed = [
            n
            for n, c in clients.items()
            if c.conn_key != before[n][0] or len(c.stats.disruptions) != before[n][1]
        ]
        unserved = [
            n for n, c in clients.items() if not c.stats.first_ok_after(ATTACK + 1.0 + offset)
        ]
        disruptions_while_moving = sum(
            1
            for c in clients.values()
            for t in c.stats.disruptions
            if QUIET[1] <= t - offset < ATTACK
        )
        return {
            "latencies": latencies,
            "moves": moves,
            "unconnected_at_quiet": state.get("unconnected_at_quiet"),
            "tried": dict(state["tried"]),
            "refused": {str(k): v for k, v in refused.items()},
            "disturbed": disturbed,
            "unserved": unserved,
            "disruptions_while_moving": disruptions_while_moving,
        }

    return collect


def _child(
    conn: Connection, local: frozenset[str], with_clients: bool, text: str, base: int, seed: int
) -> None:
    topo = loads(text)
    if with_clients:
        state: dict[str, Any] = {}
        host_pool(
            conn,
            text,
            set(topo.clients),
            base,
            seed,
            DURATION,
            "clients",
            _clients_setup(state, seed),
            _clients_collect(state),
        )
    else:
        label = "+".join(sorted(local))
        host_pool(conn, text, set(local), base, seed, DURATION, label, _record_moves, _site_collect)


# -- the run and its figures --------------------------------------------------------------


def run_split(text: str, seed: int) -> list[dict[str, Any]]:
    """Start the sites and the clients, go at one instant, and return what each
    reported (the clients' last)."""
    topo = loads(text)
    base = free_base_port(topo.attachment_count, PORT_SEARCH)
    children = [("+".join(sorted(site)), _child, (site, False, text, base, seed)) for site in SITES]
    children.append(("clients", _child, (frozenset(), True, text, base, seed)))
    return run_together(children, DURATION + 30)


def measure(text: str, seed: int, clients: int) -> dict[str, Any]:
    *sites, out = run_split(text, seed)
    if out["unconnected_at_quiet"]:
        raise RuntimeError(
            f"part 2: clients not connected by {QUIET[0]} s: {out['unconnected_at_quiet']}"
        )
    rtt = percentile(out["latencies"], 50)
    if rtt is None:
        raise RuntimeError("part 2: no request answered in the quiet window")
    released = {(c, p, s): at for site in sites for at, c, p, s in site["released"]}
    pauses = [
        accepted - released[(c, p, s)]
        for accepted, c, p, s in out["moves"]
        if (c, p, s) in released
    ]

    def ms(seconds: float | None) -> float | None:
        return None if seconds is None else round(seconds * 1000, 2)

    def ratio(seconds: float | None) -> float | None:
        return None if seconds is None else round(seconds / rtt, 3)

    return {
        "clients": clients,
        "processes": len(sites) + 1,
        "share_changes": len(SHARES),
        "rtt_ms": ms(rtt),
        "moves_measured": len(pauses),
        "moves_started": sum(s["moved_out"] for s in sites),
        "moves_failed": sum(s["move_failed"] for s in sites),
        "move_pause_ms": {
            "p50": ms(percentile(pauses, 50)),
            "p99": ms(percentile(pauses, 99)),
            "max": ms(max(pauses, default=None)),
        },
        "move_pause_p50_over_rtt": ratio(percentile(pauses, 50)),
        "move_pause_p99_over_rtt": ratio(percentile(pauses, 99)),
        "move_pauses_over_rtt": sorted(round(p / rtt, 3) for p in pauses),
        "disruptions_while_moving": out["disruptions_while_moving"],
        "hijacks_tried": sum(out["tried"].values()),
        "hijacks_refused": sum(out["refused"].values()),
        "hijacks_tried_by_kind": out["tried"],
        "hijacks_refused_by_reason": out["refused"],
        "connections_disturbed": len(out["disturbed"]),
        "clients_unserved_after_hijacks": len(out["unserved"]),
    }


if __name__ == "__main__":
    not_a_bench(__file__, "bench/redirect.py")
