"""bench/reallocation.py's hooks into the pools it runs: what the process hosting the
routers and servers samples and counts (allocations as they change, the servers'
control messages by type), what the clients' process samples (which clients hold a
session), what each hands back, and their progress lines.

Run alone, it prints one json object, its last line on stdout, naming the bench
to run (`_common.not_a_bench`).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from _pool import Transitions, every, servers_line
from manycast.runtime import PoolRun

SAMPLE_S = 0.02  # how often session state and allocations are sampled

Setup = Callable[[PoolRun, asyncio.AbstractEventLoop, float], None]
Collect = Callable[[PoolRun, float], Any]


def infra_setup(
    state: dict[str, Any], quiet: tuple[float, float], window: tuple[float, float]
) -> Setup:
    """Sample allocations as they change, and the servers' control counters at the
    edges of the quiet window and of the measured window."""

    def setup(run: PoolRun, loop: asyncio.AbstractEventLoop, offset: float) -> None:
        servers = run.nodes.servers
        seen = {name: 0 for name in servers}
        epochs: dict[int, list[str]] = state["epochs"]  # epoch -> each client's owner
        clients = state["client_addresses"]

        def sample() -> None:
            for name, server in servers.items():
                coordinator = server.coordinator
                changes = coordinator.changes
                for at, epoch, why in itertools.islice(changes, seen[name], None):
                    state["changes"].append((at - offset, name, epoch, why))
                seen[name] = len(changes)
                allocation = coordinator.allocation
                if allocation is not None and coordinator.epoch not in epochs:
                    owners = allocation.owner_many(clients)
                    epochs[coordinator.epoch] = [allocation.servers[i] for i in owners]

        every(loop, SAMPLE_S, sample)

        sent: dict[str, int] = defaultdict(int)  # control messages by type, all servers
        for server in servers.values():
            count_control(server, sent)

        def counters(label: str) -> None:
            state["counters"][label] = {
                "t": run.now - offset,
                "sent": dict(sent),
                "sessions": sum(s.sessions for s in servers.values()),
            }

        for label, at in (("quiet_start", quiet[0]), ("quiet_end", quiet[1])):
            run.network.call_at(at + offset, lambda label=label: counters(label))
        run.network.call_at(window[0] + offset, lambda: counters("window_start"))
        run.network.call_at(window[1] + offset, lambda: counters("window_end"))

    return setup


def count_control(server: Any, sent: dict[str, int]) -> None:
    """Count what the server sends on the control channel, by message type: its agent
    sends the coordinator's messages and hands the same sender to its technique."""
    send = server._send_control
    if server.handover.send_control != send:
        raise RuntimeError("the technique no longer sends through the server's sender")

    def counted(message: Any, to: Any) -> None:
        sent[type(message).__name__] += 1
        send(message, to)

    server._send_control = counted
    server.handover.send_control = counted


def infra_collect(state: dict[str, Any]) -> Collect:
    def collect(run: PoolRun, offset: float) -> dict[str, Any]:
        handover: dict[str, int] = defaultdict(int)
        for server in run.nodes.servers.values():
            for key, value in vars(server.handover.stats).items():
                handover[key] += value
        kept = {k: v for k, v in state.items() if k != "client_addresses"}
        return {**kept, "offset": offset, "handover": dict(handover)}

    return collect


def client_setup(state: dict[str, Any]) -> Setup:
    """Track which clients have a session (sampled every SAMPLE_S): established, and
    open at all (established or still in its handshake; a server holds it either way,
    and R1 resets it either way)."""

    def setup(run: PoolRun, loop: asyncio.AbstractEventLoop, offset: float) -> None:
        clients = [run.nodes.clients[name] for name in state["names"]]
        established = state["connected"] = Transitions(len(clients))
        opened = state["open"] = Transitions(len(clients))

        def sample() -> None:
            now = run.now
            for index, client in enumerate(clients):
                established.record(index, now, client.connected)
                opened.record(index, now, client.conn_key is not None)

        every(loop, SAMPLE_S, sample)

    return setup


def client_collect(state: dict[str, Any]) -> Collect:
    def collect(run: PoolRun, offset: float) -> dict[str, Any]:
        out = []
        for name in state["names"]:
            stats = run.nodes.clients[name].stats
            out.append(
                {
                    "ok_times": [t - offset for t in stats.ok_times],
                    "latencies": list(stats.latencies),
                    "disruptions": [t - offset for t in stats.disruptions],
                    "failures": [(t - offset, why) for t, why in stats.failures],
                    "resets": stats.resets,
                    "timeouts": stats.timeouts,
                    "reconnects": stats.reconnects,
                    "state_lost": stats.state_lost,
                }
            )
        return {
            "offset": offset,
            "clients": out,
            "connected": state["connected"].shifted(-offset),
            "open": state["open"].shifted(-offset),
        }

    return collect


def client_line(run: PoolRun) -> str:
    clients = run.nodes.clients.values()
    now = run.now
    served = sum(1 for c in clients if c.stats.ok_times and c.stats.ok_times[-1] >= now - 3.0)
    ok = sum(c.stats.requests_ok for c in clients)
    failed = sum(c.stats.requests_failed for c in clients)
    open_ = sum(1 for c in clients if c.connected)
    return f"clients: served in 3 s {served}/{len(clients)} open {open_} ok {ok} failed {failed}"


def infra_line(run: PoolRun) -> str:
    return "servers: " + servers_line(run)


if __name__ == "__main__":
    from _common import not_a_bench

    not_a_bench(__file__, "bench/reallocation.py")
