"""Run a pool from a topology on a driver, and measure what its users see.

`PoolRun` builds the nodes, schedules the scenario, and reports, while it runs,
each server's share, sessions and request rate, and at the end the clients'
outcomes: requests answered and failed, resets, and how long after each
disruption every affected client was served again.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from manycast.dnsserver import EmbeddedServer
from manycast.drivers.memory import MemoryNetwork
from manycast.drivers.overlay import OverlayNetwork
from manycast.naming import NamingError, PoolRecord, lookup_group_async
from manycast.pool import Nodes, Scenario, build
from manycast.protocol.client import Client
from manycast.protocol.router import Router
from manycast.topology import Topology

DriverName = Literal["memory", "overlay"]
DISRUPTIVE = ("set_share", "kill", "add", "rebalance")
KEY_TTL = 300.0
LOOKUP_DELAY = 0.002


@dataclass(frozen=True)
class ServerView:
    name: str
    status: str  # up, dead, standby
    share: float
    sessions: int
    requests_per_s: float
    epoch: int


@dataclass(frozen=True)
class Snapshot:
    """What the live table shows."""

    now: float
    servers: tuple[ServerView, ...]
    clients: int
    served_recently: int
    requests_ok: int
    requests_failed: int
    resets: int
    events: tuple[tuple[float, str], ...]


@dataclass
class PoolRun:
    topology: Topology
    driver: DriverName = "memory"
    seed: int = 0
    base_port: int = 47000
    local: set[str] | None = None  # the nodes this process hosts (None: all)
    nodes: Nodes = field(init=False)
    scenario: Scenario = field(init=False)
    _net: MemoryNetwork | OverlayNetwork = field(init=False)
    _last_requests: dict[str, tuple[float, int]] = field(default_factory=dict, init=False)
    _tasks: set[asyncio.Future[None]] = field(default_factory=set, init=False)
    _rates: dict[str, float] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.nodes = build(self.topology, seed=self.seed, wall_base=time.time(), only=self.local)
        if self.driver == "memory":
            self._net = MemoryNetwork.build(self.nodes.links, self.nodes.running(), seed=self.seed)
        else:
            endpoints = self.topology.endpoints(self.base_port)
            self._net = OverlayNetwork(
                self.nodes.links, endpoints, self.nodes.running(), seed=self.seed
            )
        self.scenario = Scenario(self.topology, self.nodes, self._net)
        self._dns: EmbeddedServer | None = None
        self.dns_address: tuple[str, int] | None = self.topology.pool.dns
        for router in self.nodes.routers.values():
            router.on_key_request = self._key_lookup(router)
        for step in self.topology.scenario:
            self._net.call_at(step.at, lambda step=step: self.scenario.step(step))  # type: ignore[misc]

    def pool_records(self) -> list[PoolRecord]:
        """What a private pool publishes in DNS: its group and its control channel."""
        pool = self.topology.pool
        return [
            PoolRecord.create(alias, group, f"pool@{pool.name}", raw)
            for alias, group, raw in (
                (pool.name, pool.group, self.nodes.directory.get(int(pool.group))),
                (
                    f"control.{pool.name}",
                    pool.control_group,
                    self.nodes.directory.get(int(pool.control_group)),
                ),
            )
            if raw is not None
        ]

    def _key_lookup(self, router: Router) -> Callable[[int], None]:
        """How a router's question for a group's key is answered. On the overlay: a DNS
        query (the embedded server the run starts, or `[pool] dns`). On the memory
        driver's virtual clock: the pool's directory, after a lookup delay."""

        def lookup(group: int) -> None:
            if self.dns_address is not None:
                task = asyncio.ensure_future(self._dns_lookup(router, group))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                return

            def answer() -> None:
                raw = self.nodes.directory.get(group)
                router.provide_key(group, raw, KEY_TTL, self._net.now, None if raw else "no key")

            self._net.call_at(self._net.now + LOOKUP_DELAY, answer)

        return lookup

    async def _dns_lookup(self, router: Router, group: int) -> None:
        assert self.dns_address is not None
        raw: bytes | None = None
        ttl, reason = 0.0, None
        try:
            record = await lookup_group_async(ipaddress.IPv4Address(group), self.dns_address)
            raw, ttl = record.public_key, float(record.ttl)
        except NamingError as exc:
            # A record that is there but does not validate is "bad"; no answer at all
            # (NXDOMAIN, nothing there, a server that never answers) is "no key".
            text = str(exc)
            bad = text.startswith(("bad ", "record mismatch", "conflict"))
            reason = "bad key record" if bad else "no key"
        self._net.call_at(
            self._net.now, lambda: router.provide_key(group, raw, ttl, self._net.now, reason)
        )

    @property
    def network(self) -> MemoryNetwork | OverlayNetwork:
        return self._net

    @property
    def now(self) -> float:
        return self._net.now

    async def run(
        self,
        duration: float,
        on_tick: Callable[[Snapshot], None] | None = None,
        tick: float = 0.5,
        realtime: bool = False,
    ) -> None:
        """Run for `duration` seconds of pool time, calling `on_tick` every `tick`."""
        start_wall = time.monotonic()
        t = 0.0
        if (
            self.topology.pool.private
            and isinstance(self._net, OverlayNetwork)
            and self.dns_address is None
        ):
            # The pool's records on a DNS server of our own, for the routers to query.
            self._dns = EmbeddedServer.for_pool(
                _zone_of(self.topology.pool.name), self.pool_records(), None
            )
            await self._dns.start()
            self.dns_address = self._dns.address
        try:
            while t < duration:
                t = min(duration, t + tick)
                if isinstance(self._net, MemoryNetwork):
                    self._net.run_until(t)
                    if realtime:
                        await asyncio.sleep(max(0.0, start_wall + t - time.monotonic()))
                    else:
                        await asyncio.sleep(0)
                else:
                    await self._net.run_until(t)
                if on_tick is not None:
                    on_tick(self.snapshot())
        finally:
            if isinstance(self._net, OverlayNetwork):
                self._net.close()
            if self._dns is not None:
                await self._dns.close()

    def run_sync(
        self,
        duration: float,
        on_tick: Callable[[Snapshot], None] | None = None,
        realtime: bool = False,
    ) -> None:
        asyncio.run(self.run(duration, on_tick, realtime=realtime))

    # -- views -----------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        now = self.now
        servers = []
        all_servers = {**self.nodes.servers, **self.nodes.standby}
        for name in sorted(all_servers):
            server = all_servers[name]
            status = self._status(name)
            allocation = server.coordinator.allocation
            share = (
                float(allocation.share(name))
                if allocation is not None and name in allocation.servers
                else 0.0
            )
            then, count = self._last_requests.get(name, (0.0, 0))
            if now > then:
                self._rates[name] = (server.app.requests - count) / (now - then)
                self._last_requests[name] = (now, server.app.requests)
            servers.append(
                ServerView(
                    name,
                    status,
                    share if status == "up" else 0.0,
                    server.sessions if status == "up" else 0,
                    self._rates.get(name, 0.0) if status == "up" else 0.0,
                    server.coordinator.epoch,
                )
            )
        clients = self._participants()
        window = self._served_window()
        return Snapshot(
            now,
            tuple(servers),
            len(clients),
            sum(1 for c in clients if c.stats.ok_times and c.stats.ok_times[-1] >= now - window),
            sum(c.stats.requests_ok for c in clients),
            sum(c.stats.requests_failed for c in clients),
            sum(c.stats.resets for c in clients),
            tuple((e.at, e.what) for e in self.scenario.events),
        )

    def _status(self, server: str) -> str:
        """up, dead, standby, or outsider (a server without the private pool's key)."""
        if not self.topology.servers[server].authorized:
            return "outsider"
        if server in self.scenario.dead:
            return "dead"
        return "standby" if server in self.nodes.standby else "up"

    def _participants(self) -> list[Client]:
        """The clients that hold the pool's key (all of them, in a public pool)."""
        return [c for c in self.nodes.clients.values() if self.topology.clients[c.name].authorized]

    def _outsiders(self) -> list[Client]:
        return [
            c for c in self.nodes.clients.values() if not self.topology.clients[c.name].authorized
        ]

    def _served_window(self) -> float:
        rates = [c.rate for c in self.nodes.clients.values() if c.rate > 0]
        return max(1.5, 3.0 / min(rates)) if rates else 1.5

    def summary(self) -> dict[str, Any]:
        """The run's outcome as plain data (the `--json` line)."""
        now = self.now
        clients = self._participants()
        window = self._served_window()
        served = [
            c
            for c in clients
            if c.rate <= 0 or (c.stats.ok_times and c.stats.ok_times[-1] >= now - window)
        ]
        latencies = sorted(x for c in clients for x in c.stats.latencies)
        events = [e for e in self.scenario.events if e.what.split()[0] in DISRUPTIVE]
        event_rows = []
        for index, event in enumerate(events):
            until = events[index + 1].at if index + 1 < len(events) else now
            recovery, affected = _recovery(clients, event.at, until)
            event_rows.append(
                {
                    "at": round(event.at, 3),
                    "what": event.what,
                    "affected_clients": affected,
                    "recovery_s": recovery,
                }
            )
        recoveries: list[float | None] = [row["recovery_s"] for row in event_rows]  # type: ignore[misc]
        finite = [r for r in recoveries if r is not None]
        recovery_s: float | None
        if any(r is None for r in recoveries):
            recovery_s = None
        else:
            recovery_s = round(max(finite, default=0.0), 3)
        servers = {}
        all_servers = {**self.nodes.servers, **self.nodes.standby}
        for name, server in sorted(all_servers.items()):
            allocation = server.coordinator.allocation
            status = self._status(name)
            servers[name] = {
                "status": status,
                "share": float(allocation.share(name))
                if allocation is not None and name in allocation.servers and status == "up"
                else 0.0,
                "requests": server.app.requests,
                "sessions_reset": server.handover.stats.reset_moved,
                "epoch": server.coordinator.epoch,
            }
        outsiders = self._outsiders()
        return {
            "outsiders": len(outsiders),
            "outsider_answers": sum(c.stats.requests_ok for c in outsiders),
            "driver": self.driver,
            "duration_s": round(now, 3),
            "clients": len(clients),
            "clients_served_at_end": len(served),
            "requests_ok": sum(c.stats.requests_ok for c in clients),
            "requests_failed": sum(c.stats.requests_failed for c in clients),
            "resets": sum(c.stats.resets for c in clients),
            "reconnects": sum(c.stats.reconnects for c in clients),
            "state_lost": sum(c.stats.state_lost for c in clients),
            "recovery_s": recovery_s,
            "latency_ms": {"p50": _percentile(latencies, 50), "p99": _percentile(latencies, 99)},
            "events": event_rows,
            "servers": servers,
        }


def _zone_of(name: str) -> str:
    """The zone a pool's records live in: its name's parent (`svc.example.` -> `example.`)."""
    labels = name.rstrip(".").split(".")
    return ".".join(labels[1:]) + "." if len(labels) > 2 else name.rstrip(".") + "."


def _percentile(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    index = min(len(values) - 1, max(0, math.ceil(pct / 100 * len(values)) - 1))
    return round(values[index] * 1000, 3)


def _recovery(clients: Iterable[Any], start: float, until: float) -> tuple[float | None, int]:
    """How long after `start` the last client disrupted in [start, until) was served
    again (None if one never was), and how many clients were disrupted."""
    worst = 0.0
    affected = 0
    for client in clients:
        hits = [t for t in client.stats.disruptions if start <= t < until]
        if not hits:
            continue
        affected += 1
        back = client.stats.first_ok_after(hits[-1])
        if back is None:
            return None, affected
        worst = max(worst, back - start)
    return round(worst, 3), affected
