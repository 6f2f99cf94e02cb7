"""The soak's two long-lived pool processes (bench/soak.py starts them):

- the infrastructure: routers ra, rb, servers s1, s2 and the standbys; it carries out
  the faults that act inside a pool (share changes, rebalances, standby joins, loss
  bursts and delay spikes on the core link) and records every allocation it adopts;
- the clients: all of them; it keeps compact figures (answers and failures per
  second, each session loss with the first answer after it) and drops the clients'
  per-request lists as it goes, so that its memory measures the pool, not the bench.

Each tees its stderr into a log file the bench scans for tracebacks.
"""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
import asyncio
import functools
import sys
from collections import defaultdict
from fractions import Fraction
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from _pool import every, host_pool, servers_line
from _soak_plan import CORE_LINK, LOCAL_SERVERS, Fault
from manycast.drivers.overlay_network import OverlayNetwork
from manycast.runtime import PoolRun
from manycast.topology import loads
from manycast.wire import control

HARVEST_S = 1.0
SAMPLE_S = 0.05
WRONG = ("state lost", "answer to no request")


class _Tee:
    """stderr for a child: the terminal and a log file."""

    def __init__(self, out: TextIO, log: Path) -> None:
        self.out, self.log = out, log.open("a", buffering=1)

    def write(self, text: str) -> int:
        self.out.write(text)
        self.log.write(text)
        return len(text)

    def flush(self) -> None:
        self.out.flush()
        self.log.flush()


def _tee(log: Path) -> None:
    sys.stderr = _Tee(sys.stderr, log)


# -- the infrastructure ---------------------------------------------------------------


def _core_ports(run: PoolRun) -> list[Any]:
    """The overlay's ports on the core link. The overlay has no public call to change
    a link at run time; its ports keep delay and loss as plain attributes read on each
    send, and the core link already takes the emulated path (it has a delay)."""
    network = run.network
    assert isinstance(network, OverlayNetwork)
    hosts = network.overlay._hosts
    ports = []
    for attachment in run.topology.links[CORE_LINK].members:
        host = hosts.get(attachment.node)
        if host is not None:
            port = host.ports[attachment.iface]
            if not port.emulated:
                raise RuntimeError(f"{CORE_LINK} is not emulated: its loss cannot change")
            ports.append(port)
    return ports


def _infra_setup(faults: list[Fault], state: dict[str, Any]) -> Any:
    def setup(run: PoolRun, loop: asyncio.AbstractEventLoop, offset: float) -> None:
        servers = run.nodes.servers
        names = sorted(run.topology.clients)
        addresses = np.array([int(run.topology.address(n)) for n in names], dtype=np.uint32)
        epochs: dict[int, tuple[float, list[int]]] = state["epochs"]
        order: list[str] = state["servers"]
        ports = _core_ports(run)
        normal = [(p.loss, p.delay) for p in ports]

        def sample() -> None:
            for server in list(servers.values()):
                coordinator = server.coordinator
                allocation = coordinator.allocation
                if allocation is None or coordinator.epoch in epochs:
                    continue
                for name in allocation.servers:
                    if name not in order:
                        order.append(name)
                index = [order.index(n) for n in allocation.servers]
                owners = allocation.owner_many(addresses)
                epochs[coordinator.epoch] = (
                    run.now - offset,
                    [index[i] for i in owners.tolist()],
                )

        every(loop, SAMPLE_S, sample)

        def receiver() -> str:
            return next(n for n in LOCAL_SERVERS if n in servers)

        def act(fault: Fault) -> None:
            now = run.now
            state["done"].append((fault.kind, round(now - offset, 3)))
            if fault.kind == "set_share":
                op: Any = control.SetShareOp(
                    fault.args["server"], Fraction(fault.args["share"]).limit_denominator(1000)
                )
                run.command(receiver(), op)
            elif fault.kind == "rebalance":
                run.command(receiver(), control.RebalanceOp(float(fault.args["target"]), ()))
            elif fault.kind == "join":
                run.engine.added.add(fault.args["server"])
                run.start_server(fault.args["server"])
            elif fault.kind == "loss_burst":
                for port in ports:
                    port.loss = float(fault.args["loss"])
            elif fault.kind == "delay_spike":
                for port in ports:
                    port.delay = float(fault.args["delay_s"])

        def restore(fault: Fault) -> None:
            for port, (loss, delay) in zip(ports, normal, strict=True):
                if fault.kind == "loss_burst":
                    port.loss = loss
                else:
                    port.delay = delay

        for fault in faults:
            run.network.call_at(fault.at + offset, functools.partial(act, fault))
            if fault.kind in ("loss_burst", "delay_spike") and fault.until is not None:
                run.network.call_at(fault.until + offset, functools.partial(restore, fault))

    return setup


def infra_child(
    conn: Connection,
    text: str,
    local: set[str],
    base: int,
    seed: int,
    duration: float,
    faults: list[Fault],
    log: Path,
    progress_every: float,
) -> None:
    _tee(log)
    state: dict[str, Any] = {"epochs": {}, "servers": [], "done": []}

    def collect(run: PoolRun, offset: float) -> dict[str, Any]:
        return {**state, "offset": offset}

    host_pool(
        conn,
        text,
        local,
        base,
        seed,
        duration,
        "infra",
        _infra_setup(faults, state),
        collect,
        progress_every=progress_every,
        progress_line=servers_line,
    )


# -- the clients ----------------------------------------------------------------------


def _clients_setup(state: dict[str, Any]) -> Any:
    """Every HARVEST_S: per-second answer and failure counts, latencies per minute (at
    most 2000 kept), each session loss (the client's `_lost`) with its cause and the
    first answer after it; then the clients' own lists are emptied."""

    def setup(run: PoolRun, loop: asyncio.AbstractEventLoop, offset: float) -> None:
        clients = [run.nodes.clients[n] for n in state["names"]]
        ok: dict[int, int] = state["ok_per_s"]
        failed: dict[int, int] = state["failed_per_s"]
        latency: dict[int, list[float]] = state["latency_per_min"]
        losses: list[list[Any]] = state["losses"]  # [client, t, cause, first ok after]
        waiting: dict[int, list[list[Any]]] = defaultdict(list)

        for index, client in enumerate(clients):
            original = client._lost

            def lost(
                now: float, reset: bool = False, i: int = index, c: Any = client, f: Any = original
            ) -> None:
                fails = c.stats.failures
                cause = (
                    "reset"
                    if reset
                    else (fails[-1][1] if fails and fails[-1][0] == now else "closed")
                )
                record = [i, round(now - offset, 4), cause, None]
                losses.append(record)
                waiting[i].append(record)
                f(now, reset)

            client._lost = lost  # type: ignore[method-assign]

        carried = [0] * len(clients)  # each client's last answer stays in its list

        def harvest() -> None:
            for index, client in enumerate(clients):
                stats = client.stats
                fresh = stats.ok_times[carried[index] :]
                if fresh:
                    for t, lat in zip(fresh, stats.latencies, strict=False):
                        b = int(t - offset)
                        ok[b] = ok.get(b, 0) + 1
                        kept = latency.setdefault(b // 60, [])
                        if len(kept) < 2000:
                            kept.append(lat)
                    pending = waiting.get(index)
                    if pending:
                        for record in pending:
                            after = next(
                                (t - offset for t in fresh if t - offset > record[1]), None
                            )
                            if after is not None:
                                record[3] = round(after, 4)
                        waiting[index] = [r for r in pending if r[3] is None]
                    # The last answer stays: "served lately" reads it.
                    del stats.ok_times[:-1]
                    stats.latencies.clear()
                    carried[index] = 1
                if stats.failures:
                    for t, why in stats.failures:
                        b = int(t - offset)
                        failed[b] = failed.get(b, 0) + 1
                        if why.startswith(WRONG):
                            state["wrong"].append([index, round(t - offset, 4), why])
                    stats.failures.clear()
                    stats.disruptions.clear()

        every(loop, HARVEST_S, harvest)
        state["harvest"] = harvest

    return setup


def client_line(run: PoolRun) -> str:
    clients = run.nodes.clients.values()
    now = run.now
    served = sum(1 for c in clients if c.stats.ok_times and c.stats.ok_times[-1] >= now - 3.0)
    open_ = sum(1 for c in clients if c.connected)
    return f"served in 3 s {served}/{len(clients)} open {open_}"


def clients_child(
    conn: Connection,
    text: str,
    base: int,
    seed: int,
    duration: float,
    log: Path,
    progress_every: float,
) -> None:
    _tee(log)
    names = sorted(loads(text).clients)
    state: dict[str, Any] = {
        "names": names,
        "ok_per_s": {},
        "failed_per_s": {},
        "latency_per_min": {},
        "losses": [],
        "wrong": [],
    }

    def collect(run: PoolRun, offset: float) -> dict[str, Any]:
        state["harvest"]()
        kept = {k: v for k, v in state.items() if k != "harvest"}
        kept["reconnects"] = sum(c.stats.reconnects for c in run.nodes.clients.values())
        kept["connected_at_end"] = sum(1 for c in run.nodes.clients.values() if c.connected)
        return {**kept, "offset": offset}

    host_pool(
        conn,
        text,
        set(names),
        base,
        seed,
        duration,
        "clients",
        _clients_setup(state),
        collect,
        progress_every=progress_every,
        progress_line=client_line,
    )


if __name__ == "__main__":
    from _common import not_a_bench

    not_a_bench(__file__, "bench/soak.py")
