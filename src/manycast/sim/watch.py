"""What the simulator samples of a running pool, at one instant.

Who serves what is read from the servers themselves: a live server serves the
buckets of the allocation it has applied (`coordinator.allocation`; a server
applies what it adopts before its next event), so an address is served by every
live server whose applied allocation gives it that address's bucket. Views can
disagree during a change: an address may then have no live server (its owner died
and the pool has not yet moved it) or two (two servers on different epochs).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from manycast.policy import SCALE
from manycast.protocol.client import Client
from manycast.protocol.server import Server
from manycast.sim.population import Population
from manycast.space import Allocation


@dataclass(frozen=True)
class Sample:
    """The pool at time `t` (seconds of simulated time)."""

    t: float
    live_servers: int
    epoch: int  # the newest epoch a live server holds
    share_error_buckets: float  # max over members |buckets served - share agreed|
    unserved: float  # fraction of the population's addresses no live server serves
    served_twice: float  # fraction served by more than one live server
    load_max_over_mean: float  # requests/s of the busiest serving server over the mean
    load_max: float
    load_mean: float
    control_per_server_per_s: float  # control datagrams sent + received, per live server
    reports_per_server_per_s: float  # membership report packets sent, per live server
    sessions_broken: int  # sample sessions lost or reset so far (cumulative)
    requests_ok: int  # sample requests answered so far (cumulative)
    requests_failed: int


@dataclass
class Claims:
    """Per bucket, how many live servers serve it; per live server, its buckets, the
    load the population puts on them, and the shares the pool agreed on."""

    per_bucket: npt.NDArray[np.int32]
    buckets: dict[str, int]
    load: dict[str, float]
    desired: dict[str, float]  # buckets each member should hold (its agreed share)
    epoch: int


@dataclass
class Watcher:
    """Samples a pool: `servers` (every server ever run, by name), the sample
    `clients`, the modelled `population`."""

    servers: Mapping[str, Server]
    clients: Iterable[Client]
    population: Population
    _positions: dict[str, dict[str, int]] = field(default_factory=dict)
    _last: tuple[float, int, int] | None = None

    def claims(self, live: Iterable[str]) -> Claims:
        space = self.population.space
        per_bucket = np.zeros(space.buckets, dtype=np.int32)
        # Servers that computed the same allocation each hold their own copy: grouped by
        # digest, each distinct allocation is looked at once.
        groups: dict[str, tuple[Allocation, list[str]]] = {}
        newest: Server | None = None
        for name in live:
            server = self.servers[name]
            coordinator = server.coordinator
            if newest is None or coordinator.epoch > newest.coordinator.epoch:
                newest = server
            allocation = coordinator.allocation
            if allocation is None:
                continue
            groups.setdefault(allocation.digest(), (allocation, []))[1].append(name)
        buckets: dict[str, int] = {}
        load: dict[str, float] = {}
        for allocation, names in groups.values():
            position = self._position(allocation)
            counts = allocation.counts()
            loads = self.population.loads(allocation)
            holders = [position[n] for n in names if n in position]
            if not holders:
                continue
            held = np.zeros(len(allocation.servers), dtype=np.int32)
            held[holders] = 1
            per_bucket += held[allocation.owners]
            for name in names:
                if name in position:
                    buckets[name] = counts[name]
                    load[name] = float(loads[position[name]])
        desired: dict[str, float] = {}
        epoch = 0
        if newest is not None and newest.coordinator.apportionment is not None:
            epoch = newest.coordinator.epoch
            weights = newest.coordinator.apportionment.weights
            desired = {s: w * space.buckets / SCALE for s, w in weights.items()}
        return Claims(per_bucket, buckets, load, desired, epoch)

    def _position(self, allocation: Allocation) -> dict[str, int]:
        found = self._positions.get(allocation.digest())
        if found is not None:
            return found
        if len(self._positions) >= 64:
            self._positions.clear()
        position = {s: i for i, s in enumerate(allocation.servers)}
        self._positions[allocation.digest()] = position
        return position

    def sample(self, now: float, live: list[str]) -> Sample:
        claims = self.claims(live)
        population = self.population
        total = max(1, len(population.addresses))
        per_address = population.addresses_per_bucket
        unserved = float(per_address[claims.per_bucket == 0].sum()) / total
        twice = float(per_address[claims.per_bucket > 1].sum()) / total
        members = set(claims.desired) | {s for s, n in claims.buckets.items() if n}
        error = max(
            (abs(claims.buckets.get(s, 0) - claims.desired.get(s, 0.0)) for s in members),
            default=0.0,
        )
        serving = [claims.load[s] for s, n in claims.buckets.items() if n]
        mean = sum(serving) / len(serving) if serving else 0.0
        top = max(serving, default=0.0)
        control = sum(
            s.stats.control_sent + s.stats.control_received for s in self.servers.values()
        )
        reports = sum(s.stats.reports_sent for s in self.servers.values())
        control_rate = reports_rate = 0.0
        if self._last is not None and now > self._last[0] and live:
            elapsed = now - self._last[0]
            control_rate = (control - self._last[1]) / elapsed / len(live)
            reports_rate = (reports - self._last[2]) / elapsed / len(live)
        self._last = (now, control, reports)
        broken = ok = failed = 0
        for client in self.clients:
            stats = client.stats
            broken += stats.reconnects + stats.state_lost
            ok += stats.requests_ok
            failed += stats.requests_failed
        return Sample(
            t=round(now, 6),
            live_servers=len(live),
            epoch=claims.epoch,
            share_error_buckets=round(float(error), 3),
            unserved=unserved,
            served_twice=twice,
            load_max_over_mean=round(top / mean, 4) if mean > 0 else 0.0,
            load_max=round(top, 3),
            load_mean=round(mean, 3),
            control_per_server_per_s=round(control_rate, 3),
            reports_per_server_per_s=round(reports_rate, 3),
            sessions_broken=broken,
            requests_ok=ok,
            requests_failed=failed,
        )
