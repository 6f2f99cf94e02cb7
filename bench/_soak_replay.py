"""The soak's seeded fault schedule replayed on the memory driver, in virtual time.

`bench/soak.py` runs the pool over processes and real sockets; a finding it makes
needs a test that reproduces it in seconds (issue 17). `replay` runs the same pool
(`_soak_plan.pool_text`, the soak's clients and 2 s failure detection) and the
same schedule (`_soak_plan.schedule`) on one virtual clock: a killed server's node
is dropped and built afresh at its restart, as its new process would be (same
seed, knowing nothing); rb likewise (`PoolRun.start_router`); loss bursts and
delay spikes change the core link ra-rb; share changes, rebalances and joins go
to s1 or s2 as the infrastructure process sends them. Floods, DNS restarts and the
VIP pool need their processes and are not replayed.

Losses are judged by the soak's own rule (`_soak_analysis._crash`): a loss within
a kill's window of a client the killed server owned, or whose connection was sent
to it (`via`: D's guests live on a server that does not own them), is the crash's;
any other counts in `lost`. 200 clients over 120 s take about 10 s.

Run alone, it prints one json object, its last line on stdout, naming the bench
to run (`_common.not_a_bench`).
"""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
import dataclasses
import functools
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from _soak_analysis import Owners, _crash, on_losses, owners_bytes
from _soak_plan import CORE_LINK, LOCAL_SERVERS, ROUTER, WARMUP_S, Fault, pool_text, schedule
from manycast.drivers.memory import MemoryNetwork
from manycast.pool import build
from manycast.protocol.client import Client
from manycast.runtime import PoolRun
from manycast.topology import loads
from manycast.wire import control

# The kinds the memory driver can replay (see the module's docstring).
REPLAYED = ("kill", "router_restart", "loss_burst", "delay_spike", "set_share", "rebalance", "join")
# The soak's clients (bench/soak.py's defaults) and its failure detection (2 s).
CLIENTS = {"rto_max_ms": 200, "max_retries": 15, "abandon_after_ms": 10000}
HEARTBEAT_MISSES = 20
RATE = 0.5
SAMPLE_S = 0.05  # how often each server's allocation is looked at (as the soak's)


@dataclass
class Loss:
    client: str
    t: float
    cause: str  # "reset", or the client's cause (ConnectionTimedOut, no answer, ...)
    owners: list[str]  # the client's owners from 1.5/rate + 2 s before the loss to it
    via: str | None  # the server its connection was sent to ("group": not one yet)


@dataclass
class Replay:
    faults: list[Fault]
    lost: list[Loss] = field(default_factory=list)  # not explained by a crash
    crashed: int = 0  # losses the soak's rule gives to a kill
    answered: int = 0


def replay(
    seed: int,
    seconds: float,
    clients_per_lan: int = 100,
    technique: str = "R3",
    kinds: tuple[str, ...] = REPLAYED,
    until: float | None = None,
    faults: list[Fault] | None = None,
) -> Replay:
    """Run the schedule `seed` draws for a `seconds` soak, to its end or to `until`
    (a test stops after the loss it reproduces), or the `faults` given instead (a
    test that sets up one moment of a schedule); see the module's docstring."""
    run, faults = scheduled_pool(seed, seconds, clients_per_lan, technique, kinds, faults)
    network = run.network
    assert isinstance(network, MemoryNetwork)
    names = sorted(run.topology.clients)
    losses = _watch_losses(run, names)
    infra = _watch_owners(run, network, names)
    network.run_until(seconds + 10 if until is None else until)
    owners = Owners(infra)
    lookback = 1.5 / RATE + 2.0
    result = Replay(faults, answered=sum(c.stats.requests_ok for c in run.nodes.clients.values()))
    index = {name: i for i, name in enumerate(names)}
    for name, t, cause, via in losses:
        if t < WARMUP_S:
            continue
        if _crash(faults, owners, index[name], t, lookback, via) is not None:
            result.crashed += 1
        else:
            sequence = owners.sequence(index[name], t - lookback, t)
            result.lost.append(Loss(name, round(t, 3), cause, sequence, via))
    return result


def scheduled_pool(
    seed: int,
    seconds: float,
    clients_per_lan: int = 100,
    technique: str = "R3",
    kinds: tuple[str, ...] = REPLAYED,
    faults: list[Fault] | None = None,
) -> tuple[PoolRun, list[Fault]]:
    """The soak's pool on the memory driver with the faults `seed` draws for a
    `seconds` soak (or `faults`) scheduled on its clock, not yet run (`replay`,
    bench/allocator.py)."""
    unknown = {f.kind for f in faults} if faults is not None else set(kinds)
    unknown -= set(REPLAYED)
    if unknown:
        raise ValueError(f"not replayed on the memory driver: {', '.join(sorted(unknown))}")
    text = pool_text(
        technique,
        clients_per_lan,
        RATE,
        seconds + 30,
        heartbeat_misses=HEARTBEAT_MISSES,
        client_options=CLIENTS,
    )
    run = PoolRun(loads(text), "memory", seed=seed)
    network = run.network
    assert isinstance(network, MemoryNetwork)
    if faults is None:
        faults = schedule(seed, seconds, kinds)
    for fault in faults:
        _schedule(run, network, fault, seed)
    return run, faults


def _watch_losses(run: PoolRun, names: list[str]) -> list[tuple[str, float, str, str | None]]:
    """Each client's session losses as (client, time, cause, via), as the soak's
    clients' process records them (`_soak_analysis.on_losses`): via is the server its
    connection was sent to, which under D holds it whether or not it owns the client."""
    losses: list[tuple[str, float, str, str | None]] = []
    clients: list[Client] = [run.nodes.clients[name] for name in names]
    on_losses(
        clients, run.topology, lambda i, now, why, via: losses.append((names[i], now, why, via))
    )
    return losses


def _watch_owners(run: PoolRun, network: MemoryNetwork, names: list[str]) -> dict[str, Any]:
    """Each epoch's owner of every client, when a running server first holds it: the
    infrastructure process's record in the soak (`_soak_hosts._infra_setup`)."""
    addresses = np.array([int(run.topology.address(n)) for n in names], dtype=np.uint32)
    infra: dict[str, Any] = {"epochs": {}, "servers": []}
    epochs: dict[int, tuple[float, bytes]] = infra["epochs"]
    order: list[str] = infra["servers"]

    def sample() -> None:
        for server in list(run.nodes.servers.values()):
            coordinator = server.coordinator
            allocation = coordinator.allocation
            if server.name not in network.nodes or allocation is None:
                continue
            if coordinator.epoch in epochs:
                continue
            epochs[coordinator.epoch] = (network.now, owners_bytes(allocation, order, addresses))
        network.call_at(network.now + SAMPLE_S, sample)

    network.call_at(0.0, sample)
    return infra


def _schedule(run: PoolRun, network: MemoryNetwork, fault: Fault, seed: int) -> None:
    at, until, args = fault.at, fault.until, fault.args
    if fault.kind == "kill":
        network.call_at(at, functools.partial(run.kill_server, args["server"]))
        network.call_at(
            until or at, functools.partial(_restart_server, run, network, args["server"], seed)
        )
    elif fault.kind == "router_restart":
        # A restart drawn while the last one's router is still down waits for it.
        network.call_at(at, lambda: ROUTER in network.nodes and run.kill_node(ROUTER))
        network.call_at(
            until or at, lambda: ROUTER not in network.nodes and run.start_router(ROUTER)
        )
    elif fault.kind in ("loss_burst", "delay_spike"):
        key = "loss" if fault.kind == "loss_burst" else "delay"
        normal = getattr(network.links[CORE_LINK], key)
        value = args["loss"] if fault.kind == "loss_burst" else args["delay_s"]
        network.call_at(at, functools.partial(_set_link, network, key, value))
        network.call_at(until or at, functools.partial(_set_link, network, key, normal))
    elif fault.kind == "join":
        network.call_at(at, functools.partial(_join, run, args["server"]))
    else:
        if fault.kind == "set_share":
            share = Fraction(args["share"]).limit_denominator(1000)
            op: control.PolicyOp = control.SetShareOp(args["server"], share)
        else:
            op = control.RebalanceOp(float(args["target"]), ())
        network.call_at(at, functools.partial(_command, run, network, op))


def _restart_server(run: PoolRun, network: MemoryNetwork, name: str, seed: int) -> None:
    fresh = build(run.topology, seed=seed, wall_base=network.wall_base, only={name})
    run.nodes.servers[name] = fresh.servers[name]
    network.add(fresh.servers[name])


def _set_link(network: MemoryNetwork, key: str, value: float) -> None:
    network.links[CORE_LINK] = dataclasses.replace(network.links[CORE_LINK], **{key: value})


def _join(run: PoolRun, server: str) -> None:
    run.engine.added.add(server)
    run.start_server(server)


def _command(run: PoolRun, network: MemoryNetwork, op: control.PolicyOp) -> None:
    """To the first of s1 and s2 that runs (the infrastructure process's receiver)."""
    name = next(n for n in LOCAL_SERVERS if n in network.nodes)
    run.nodes.servers[name].command(op, network.now)


if __name__ == "__main__":
    from _common import not_a_bench

    not_a_bench(__file__, "bench/soak.py")
