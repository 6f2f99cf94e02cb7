"""A pool from a topology running on a driver, and what its users see of it.

`PoolRun` builds the nodes on a network of the chosen driver, carries out the
topology's scenario with the one engine (it is the engine's `PoolControl` for
an in-process pool), answers the routers' key lookups, and reports: a live view
while it runs, and the one summary schema at the end.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from manycast.drivers import heap
from manycast.drivers.contract import Network
from manycast.drivers.etcd import EtcdSessions
from manycast.drivers.factory import open_network
from manycast.naming import (
    KeyAnswer,
    KeyCache,
    PoolRecord,
    key_from_directory,
    lookup_key,
)
from manycast.pool import Nodes, build
from manycast.protocol.client import Client
from manycast.protocol.destination import PoolKeyNeeded
from manycast.protocol.dualstack import DualStackRouter, in_space
from manycast.protocol.node import Node
from manycast.protocol.router import KeyNeeded, Router
from manycast.protocol.technique import Technique
from manycast.scenario import ScenarioEngine
from manycast.space import address_array
from manycast.summary import ClientRecord, ServerRecord, served_window, summarize
from manycast.topology import Topology
from manycast.topology.coordination import Coordination
from manycast.wire import control

# How long a key lookup takes on the virtual clock (answered from the pool's directory).
LOOKUP_DELAY = 0.002
DNS_TIMEOUT = 2.0


@dataclass(frozen=True)
class ServerView:
    name: str
    status: str  # up, dead, standby, outsider
    share: float
    sessions: int
    requests_per_s: float
    epoch: int


@dataclass(frozen=True)
class LiveView:
    """What the live table shows at one instant."""

    now: float
    servers: tuple[ServerView, ...]
    clients: int
    served_recently: int
    requests_ok: int
    requests_failed: int
    resets: int
    events: tuple[tuple[float, str], ...]
    vip_routers: tuple[VipRouterView, ...] = ()
    # For the web dashboard: the pool's technique; each client with the server whose
    # portion holds its address now (by the newest allocation a hosted server has);
    # connections the servers carried across moves, by how (reset, forwarded,
    # transferred, pinned); joins the routers refused, by reason.
    technique: str = ""
    owners: tuple[tuple[str, str], ...] = ()
    carried: tuple[tuple[str, int], ...] = ()
    refusals: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class VipRouterView:
    """A VIP router in the live table: the packets that still reach it (first packets
    of new flows, ideally nothing else) and the flows it placed."""

    name: str
    status: str
    packets_per_s: float
    flows: int


@dataclass
class PoolRun:
    """A pool on a driver ("memory" or "overlay"); `local` names the nodes this
    process hosts when a pool is split over processes (None: all of them)."""

    topology: Topology
    driver: str = "memory"
    seed: int = 0
    base_port: int = 47000
    local: set[str] | None = None
    # A directory where each hosted router keeps the pool keys it got from DNS, to
    # start with them after a restart (`naming/keycache.py`); None: no cache.
    key_cache: Path | None = None
    nodes: Nodes = field(init=False)
    engine: ScenarioEngine = field(init=False)
    _net: Network = field(init=False)
    _last_requests: dict[str, tuple[float, int]] = field(default_factory=dict, init=False)
    _rates: dict[str, float] = field(default_factory=dict, init=False)
    # each family's client addresses, for `_owners`
    _client_addresses: dict[int, npt.NDArray[np.integer]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self._net = open_network(
            self.driver,
            self.topology.links.values(),
            seed=self.seed,
            endpoints=self.topology.endpoints(self.base_port),
        )
        self.nodes = build(
            self.topology, seed=self.seed, wall_base=self._net.wall_base, only=self.local
        )
        self._key_caches: dict[str, KeyCache] = {}
        for router in self.nodes.routers.values():
            self._restore_keys(router)
        for node in self.nodes.running():
            self._net.add(node)
        self._net.on_effect = self._on_effect
        if self._net.realtime:
            heap.trim_every(self._net)  # a long run keeps no freed bursts (drivers/heap.py)
        self.engine = ScenarioEngine(self.topology, self)
        self.engine.schedule(self._net.call_at)
        self._etcd: EtcdSessions | None = None
        pool = self.topology.pool
        if pool.coordination is Coordination.ETCD:
            self._etcd = EtcdSessions(
                self._net, pool_name=pool.name, space=pool.space, ttl=pool.lease_s
            )
            for server in self.nodes.servers.values():
                self._etcd.start(server, self._etcd_endpoints(server.name))
        self._dns: Any = None
        self.dns_address: tuple[str, int] | None = self.topology.pool.dns
        # the clients' resolver: group -> (answer, when it expires); who waits for one
        self._client_keys: dict[int, tuple[KeyAnswer, float]] = {}
        self._client_asking: dict[int, list[Client]] = {}

    # -- the engine's PoolControl ----------------------------------------------------
    def hosts(self, server: str) -> bool:
        return server in self.nodes.servers or server in self.nodes.standby

    def kill_server(self, server: str) -> None:
        if server in self.nodes.servers:
            self._net.kill(server)
            if self._etcd is not None:
                self._etcd.crash(server)  # no more renewals: its lease runs out

    def start_server(self, server: str) -> None:
        node = self.nodes.standby.pop(server, None)
        if node is not None:
            self.nodes.servers[server] = node
            self._net.add(node)
            if self._etcd is not None:
                self._etcd.start(node, self._etcd_endpoints(server))

    def _etcd_endpoints(self, server: str) -> tuple[str, ...]:
        """The etcd members `server` talks to: its own list, or the pool's."""
        return self.topology.servers[server].etcd or self.topology.pool.etcd

    def hosts_node(self, name: str) -> bool:
        return name in self.nodes.vip_routers

    def kill_node(self, name: str) -> None:
        self._net.kill(name)

    def start_router(self, name: str) -> Router:
        """A fresh router `name` in place of one killed, as a new process would start
        it: knowing nothing but what its key cache kept."""
        fresh = build(
            self.topology, seed=self.seed, wall_base=self._net.wall_base, only={name}
        ).routers[name]
        self.nodes.routers[name] = fresh
        self._restore_keys(fresh)
        self._net.add(fresh)
        return fresh

    def _restore_keys(self, router: Router) -> None:
        if self.key_cache is None or router.admission is None:
            return
        cache = KeyCache(self.key_cache / f"{router.name}.keys.json", router.admission.max_stale)
        self._key_caches[router.name] = cache
        wall = time.time()
        for kept in cache.load():
            router.restore_key(kept.group, kept.public_key, kept.stale_until - wall, self._net.now)

    def command(self, server: str, op: control.PolicyOp) -> None:
        self.nodes.servers[server].command(op, self._net.now)

    def set_client_rate(self, group: str, rate: float) -> None:
        for client in self.nodes.clients.values():
            if self.topology.clients[client.name].group == group:
                client.set_rate(rate, self._net.now)

    # -- what the nodes ask of their host --------------------------------------------
    def _on_effect(self, node: Node, effect: object) -> None:
        if isinstance(effect, KeyNeeded) and isinstance(node, Router):
            router, group = node, effect.group

            def answer(reply: KeyAnswer) -> None:
                cache = self._key_caches.get(router.name)
                if cache is not None and reply.public_key is not None:
                    cache.remember(group, reply.public_key, reply.ttl)
                elif cache is not None and not reply.unanswered:
                    cache.forget(group)  # gone or bad: not to be served after a restart
                router.provide_key(
                    group,
                    reply.public_key,
                    reply.ttl,
                    self._net.now,
                    reply.reason,
                    reply.unanswered,
                )

            self._look_up_key(group, answer)
        elif isinstance(effect, PoolKeyNeeded) and isinstance(node, Client):
            self._client_key(node, effect.group)  # to check a change-destination (Fig 21)

    def _look_up_key(self, group: int, then: Callable[[KeyAnswer], object]) -> None:
        """A question for a group's key. With a DNS server (`[pool] dns`, or the one a
        real-time run starts): a DNS query off the clock. On a virtual clock without
        one: the pool's directory, after a lookup delay."""
        address = self.dns_address
        if address is not None:
            self._net.defer(lambda: lookup_key(group, address, DNS_TIMEOUT), then)
        else:
            reply = key_from_directory(self.nodes.directory, group)
            self._net.call_at(self._net.now + LOOKUP_DELAY, lambda: then(reply))

    def _client_key(self, client: Client, group: int) -> None:
        """A client's question, through one caching resolver for the clients hosted
        here (a site's resolver): one lookup per group and TTL, however many ask."""
        now = self._net.now
        cached = self._client_keys.get(group)
        if cached is not None and cached[1] > now:
            reply, expires = cached
            self._net.call_at(
                now,
                lambda: client.provide_key(
                    group, reply.public_key, expires - self._net.now, self._net.now, reply.reason
                ),
            )
            return
        asking = self._client_asking.setdefault(group, [])
        asking.append(client)
        if len(asking) > 1:
            return  # a lookup is on its way

        def answer(reply: KeyAnswer) -> None:
            at = self._net.now
            if reply.public_key is not None:
                self._client_keys[group] = (reply, at + reply.ttl)
            for asker in self._client_asking.pop(group, []):
                asker.provide_key(group, reply.public_key, reply.ttl, at, reply.reason)

        self._look_up_key(group, answer)

    def pool_records(self) -> list[PoolRecord]:
        """What a private pool publishes in DNS: its group and its control channel (A
        and in-addr.arpa names, or in an IPv6 pool AAAA and ip6.arpa names)."""
        pool = self.topology.pool
        # A dual-stack pool's name: one record set with its A and its AAAA.
        groups = (pool.group,) if pool.group6 is None else (pool.group, pool.group6)
        return [
            PoolRecord.create(alias, group, f"pool@{pool.name}", raw)
            for alias, group, raw in (
                (pool.name, groups, self.nodes.directory.get(int(pool.group))),
                (
                    f"control.{pool.name}",
                    pool.control_group,
                    self.nodes.directory.get(int(pool.control_group)),
                ),
            )
            if raw is not None
        ]

    # -- running -------------------------------------------------------------------------
    @property
    def network(self) -> Network:
        return self._net

    @property
    def now(self) -> float:
        return self._net.now

    def run(
        self,
        duration: float,
        on_tick: Callable[[LiveView], None] | None = None,
        tick: float = 0.5,
        realtime: bool = False,
    ) -> None:
        """Run until `duration` seconds of pool time, calling `on_tick` every `tick`.
        `realtime` paces a virtual clock to the wall clock (for a person watching)."""
        from manycast.dns import EmbeddedServer

        start_wall = time.monotonic()
        keyed = self.topology.pool.private or self.topology.pool.technique is Technique.D
        if keyed and self._net.realtime and self.dns_address is None:
            # The pool's records on a DNS server of our own, for the routers to query.
            self._dns = EmbeddedServer.for_pool(
                _zone_of(self.topology.pool.name), self.pool_records(), None
            )
            self._dns.__enter__()
            self.dns_address = self._dns.address
        try:
            while self.now < duration:
                # Step from where the clock is, not from the last target: a run that
                # falls behind (a busy host) catches up instead of overshooting.
                t = min(duration, self.now + tick)
                self._net.run_until(t)
                if realtime and not self._net.realtime:
                    time.sleep(max(0.0, start_wall + t - time.monotonic()))
                if on_tick is not None:
                    on_tick(self.live_view())
        finally:
            self.close()

    def close(self) -> None:
        if self._etcd is not None:
            self._etcd.close()  # on the network's loop, before it closes
            self._etcd = None
        self._net.close()
        if self._dns is not None:
            self._dns.__exit__(None, None, None)
            self._dns = None

    # -- views -----------------------------------------------------------------------
    def _all_servers(self) -> dict[str, Any]:
        return {**self.nodes.servers, **self.nodes.standby}

    def _share(self, name: str) -> float:
        server = self._all_servers()[name]
        allocation = server.coordinator.allocation
        if allocation is None or name not in allocation.servers:
            return 0.0
        return float(allocation.share(name))

    def live_view(self) -> LiveView:
        now = self.now
        views = []
        for name, server in sorted(self._all_servers().items()):
            status = self.engine.status(name)
            then, count = self._last_requests.get(name, (0.0, 0))
            if now > then:
                self._rates[name] = (server.app.requests - count) / (now - then)
                self._last_requests[name] = (now, server.app.requests)
            up = status == "up"
            views.append(
                ServerView(
                    name,
                    status,
                    self._share(name) if up else 0.0,
                    server.sessions if up else 0,
                    self._rates.get(name, 0.0) if up else 0.0,
                    server.coordinator.epoch,
                )
            )
        clients = [c for c in self.client_records() if c.authorized]
        window = served_window(c.rate for c in clients)
        return LiveView(
            now,
            tuple(views),
            len(clients),
            sum(1 for c in clients if c.stats.ok_times and c.stats.ok_times[-1] >= now - window),
            sum(c.stats.requests_ok for c in clients),
            sum(c.stats.requests_failed for c in clients),
            sum(c.stats.resets for c in clients),
            tuple((e.at, e.what) for e in self.engine.events),
            tuple(self._vip_router_views(now)),
            str(self.topology.pool.technique),
            self._owners(),
            self._carried(),
            self._refusals(),
        )

    def _owners(self) -> tuple[tuple[str, str], ...]:
        """Each of the pool's clients and the owner of its address by the newest
        allocation among the live servers hosted here (none hosted: nothing)."""
        newest = max(
            (
                s.coordinator
                for name, s in self.nodes.servers.items()
                if self.engine.status(name) == "up" and s.coordinator.allocation is not None
            ),
            key=lambda c: c.epoch,
            default=None,
        )
        if newest is None or newest.allocation is None:
            return ()
        owned: list[tuple[str, str]] = []
        # A dual-stack pool's clients of each family, by the same allocation over the
        # family's space.
        spaces = [self.topology.pool.space, self.topology.pool.space6]
        for space in (s for s in spaces if s is not None):
            allocation = in_space(newest.allocation, space)
            # The pool's clients only: an outsider's address has an owner but no server.
            names = sorted(
                n
                for n in self.nodes.clients
                if self.topology.clients[n].authorized
                and self.topology.address(n).version == space.family
            )
            addresses = self._client_addresses.get(space.family)
            if addresses is None:
                addresses = self._client_addresses[space.family] = address_array(
                    [int(self.topology.address(n)) for n in names], space.family
                )
            found = allocation.owner_many(addresses)
            owned += [
                (n, allocation.servers[i])
                for n, i in zip(names, found.tolist(), strict=True)
                if i >= 0
            ]
        return tuple(sorted(owned))

    def _carried(self) -> tuple[tuple[str, int], ...]:
        stats = [s.handover.stats for s in self.nodes.servers.values()]
        return (
            ("reset", sum(s.reset_moved for s in stats)),
            # a new owner's resets of connections it does not know (a dead owner's)
            ("reset_unknown", sum(s.reset_unknown for s in stats)),
            ("forwarded", sum(s.forwarded_in for s in stats)),
            ("transferred", sum(s.transferred_in for s in stats)),
            ("pinned", sum(s.pinned for s in stats)),
        )

    def _refusals(self) -> tuple[tuple[str, int], ...]:
        total: Counter[str] = Counter()
        for router in self.nodes.routers.values():
            total.update({str(reason): n for reason, n in router.stats.rejected.items()})
        return tuple(sorted(total.items()))

    def _vip_router_views(self, now: float) -> list[VipRouterView]:
        views = []
        for name, router in sorted(self.nodes.vip_routers.items()):
            key = f"vip:{name}"
            then, count = self._last_requests.get(key, (0.0, 0))
            if now > then:
                self._rates[key] = (router.stats.first_packets - count) / (now - then)
                self._last_requests[key] = (now, router.stats.first_packets)
            dead = name in self.engine.dead
            rate = 0.0 if dead else self._rates.get(key, 0.0)
            views.append(VipRouterView(name, "dead" if dead else "up", rate, router.stats.flows))
        return views

    def client_records(self) -> list[ClientRecord]:
        return [_record(c, self.topology.clients[c.name].authorized) for c in self._clients()]

    def _clients(self) -> list[Client]:
        return list(self.nodes.clients.values())

    def summary(self) -> dict[str, Any]:
        """The run's outcome in the one summary schema (the `--json` line)."""
        servers = {
            name: ServerRecord(
                status=self.engine.status(name),
                share=self._share(name),
                requests=server.app.requests,
                sessions_reset=server.handover.stats.reset_moved,
                epoch=server.coordinator.epoch,
            )
            for name, server in self._all_servers().items()
        }
        return summarize(
            self.driver,
            self.now,
            self.client_records(),
            servers,
            self.engine.events,
            vip=self.vip_summary(),
        )

    def vip_summary(self) -> dict[str, Any] | None:
        """A VIP pool's own figures: what its VIP routers saw and the edges tagged."""
        if not self.topology.vip_routers:
            return None
        vip_routers = {
            name: {
                "status": "dead" if name in self.engine.dead else "up",
                "packets": router.stats.first_packets,
                "flows": router.stats.flows,
                "flows_by_server": dict(sorted(router.stats.picks.items())),
            }
            for name, router in sorted(self.nodes.vip_routers.items())
        }
        # A dual-stack router's IPv6 logic has a plane of its own (its IPv6 flows' tags).
        logics = [*self.nodes.routers.values()]
        logics += [r.six for r in self.nodes.routers.values() if isinstance(r, DualStackRouter)]
        planes = [r.vip for r in logics if r.vip is not None]
        routers = self.nodes.vip_routers.values()
        return {
            "vip_routers": vip_routers,
            "flows": sum(r.stats.flows for r in routers),
            # packets of flows a VIP router had already placed: the edge should have
            # labelled them (goal: 0)
            "packets_after_first": sum(r.stats.repeat_packets for r in routers),
            "flows_tagged_at_edges": sum(p.stats.flows_tagged for p in planes),
            "packets_labelled_at_edges": sum(p.stats.pushed for p in planes),
        }


def _record(client: Client, authorized: bool) -> ClientRecord:
    return ClientRecord(client.name, authorized, client.rate, client.stats)


def _zone_of(name: str) -> str:
    """The zone a pool's records live in: its name's parent (`svc.example.` -> `example.`)."""
    labels = name.rstrip(".").split(".")
    return ".".join(labels[1:]) + "." if len(labels) > 2 else name.rstrip(".") + "."
