"""Run a pool on the memory driver's virtual clock and sample it: `simulate`.

The routers, servers, coordination and sample clients are the real nodes of
`PoolRun`; the scenario is the topology's. The modelled population adds no node:
the watcher reads who serves its addresses at every sample.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from manycast.drivers.memory import MemoryNetwork
from manycast.runtime import PoolRun
from manycast.sim.memo import memoized_decoders
from manycast.sim.population import Population
from manycast.sim.watch import Sample, Watcher
from manycast.topology import Topology

PROGRESS_EVERY_S = 5.0  # wall seconds between progress lines


@dataclass(frozen=True)
class SimSettings:
    """How long to simulate, the modelled population, how often to sample."""

    duration: float
    addresses: int = 10_000
    mean_rate: float = 0.1  # requests per second per modelled address, on average
    sample_every: float = 0.5
    seed: int = 0
    wall_limit_s: float | None = None  # stop (and say so) after this many wall seconds


@dataclass
class SimResult:
    topology: Topology
    settings: SimSettings
    population: Population
    samples: list[Sample]
    events: list[tuple[float, str, bool]]  # (at, what, disruptive) of the scenario
    network_events: int
    wall_s: float
    build_s: float
    cpu_s: float
    load_average: tuple[float, float, float]
    membership: str
    extra: dict[str, Any] = field(default_factory=dict)


def simulate(
    topology: Topology,
    settings: SimSettings,
    progress: Callable[[str], None] | None = None,
) -> SimResult:
    """Run `topology` for `settings.duration` simulated seconds; a sample every
    `settings.sample_every` seconds (and one at the end)."""
    began, cpu = time.perf_counter(), time.process_time()
    population = Population.generate(
        topology.pool.space, settings.addresses, settings.mean_rate, settings.seed
    )
    with memoized_decoders():
        run = PoolRun(topology, "memory", settings.seed)
        network = run.network
        assert isinstance(network, MemoryNetwork)
        servers = {**run.nodes.servers, **run.nodes.standby}
        watcher = Watcher(servers, list(run.nodes.clients.values()), population)
        built = time.perf_counter() - began
        samples: list[Sample] = []
        next_progress = time.perf_counter() + PROGRESS_EVERY_S
        t = 0.0
        stopped: str | None = None
        limit = None if settings.wall_limit_s is None else began + settings.wall_limit_s

        def out_of_time() -> bool:
            return limit is not None and time.perf_counter() > limit

        while True:
            live = sorted(name for name in servers if name in network.nodes)
            samples.append(watcher.sample(network.now, live))
            if t >= settings.duration or stopped is not None:
                break
            t = min(settings.duration, round(t + settings.sample_every, 9))
            if network.run_until(t, out_of_time if limit is not None else None):
                stopped = (
                    f"the wall limit ({settings.wall_limit_s:g} s) at {network.now:.3f}"
                    f" simulated seconds of {settings.duration:g}"
                )
            if progress is not None and time.perf_counter() >= next_progress:
                next_progress = time.perf_counter() + PROGRESS_EVERY_S
                last = samples[-1]
                wall = time.perf_counter() - began
                progress(
                    f"t = {t:6.1f} / {settings.duration:g} s   wall {wall:6.1f} s"
                    f"   events {network.events_processed}   live servers {last.live_servers}"
                    f"   epoch {last.epoch}"
                )
        run.close()
    clients = list(run.nodes.clients.values())
    broken = sum(1 for c in clients if c.stats.reconnects or c.stats.state_lost)
    return SimResult(
        topology=topology,
        settings=settings,
        population=population,
        samples=samples,
        events=[(e.at, e.what, e.disruptive) for e in run.engine.events],
        network_events=network.events_processed,
        wall_s=time.perf_counter() - began,
        build_s=built,
        cpu_s=time.process_time() - cpu,
        load_average=os.getloadavg(),
        membership=str(getattr(topology.pool, "membership", "heartbeat")),
        extra={"sample_clients": len(clients), "clients_broken": broken, "stopped": stopped},
    )
