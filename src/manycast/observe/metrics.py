"""Prometheus metrics of a pool: collectors that read the live nodes' own stats at scrape time.

Nothing is counted twice: every sample is read, when Prometheus scrapes, from
the counters the sans-I/O nodes already keep (`RouterStats`, `ServerStats`,
`HandoverStats`, `VipRouterStats`, `VipPlaneStats`, `ClientStats`, the
coordinator's epoch). `PoolCollector` turns whatever nodes a host has into
metric families (prometheus_client writes the exposition format):

* an in-process pool (`manycast demo`, `manycast run`): `PoolCollector.for_pool`
  reads a `PoolRun`'s nodes;
* a kernel lab daemon: it builds a `PoolCollector` over its one node and answers
  `{"op": "metrics"}` with `exposition(registry)`; `federate` merges the
  daemons' texts, with a `node` label, into the host's one scrape target.

Scrapes run on the HTTP server's thread while the pool's thread changes the
nodes: every read copies a dict in one C-level call, and a scrape that still
meets a dict changing size is retried.

Registries, the text format, federation and the HTTP server: `observe/scrape.py`.
docs/metrics.md lists every metric.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

# Serving them (observe/scrape.py), re-exported: hosts import everything metrics from here.
from manycast.observe.scrape import (
    DEFAULT_HOST,
    FederatedCollector,
    MetricsError,
    MetricsServer,
    exposition,
    federate,
    parse_address,
    registry,
)
from manycast.protocol.dualstack import DualStackRouter
from manycast.protocol.refusal import Refusal
from manycast.protocol.technique import Technique
from manycast.summary import served_window

if TYPE_CHECKING:
    from manycast.pool import Nodes
    from manycast.protocol.client import Client
    from manycast.protocol.router import Router
    from manycast.protocol.server import Server
    from manycast.protocol.vip import VipRouter
    from manycast.scenario import ScenarioEngine
    from manycast.topology import Topology

__all__ = [
    "DEFAULT_HOST",
    "FederatedCollector",
    "MetricsError",
    "MetricsServer",
    "PoolCollector",
    "PoolInfo",
    "PoolSource",
    "Population",
    "RouterItem",
    "ServerItem",
    "VipRouterItem",
    "exposition",
    "federate",
    "parse_address",
    "registry",
]

SERVER_STATES = ("up", "dead", "standby", "outsider")
ROLES = ("coordinator", "member")
# Refusals of joins; an unauthorized sender is a dropped packet, not a refused join.
JOIN_REFUSALS = tuple(r for r in Refusal if r is not Refusal.UNAUTHORIZED_SENDER)
_RETRIES = 5


# -- what a host hands the collector ---------------------------------------------------


@dataclass(frozen=True)
class ServerItem:
    """A server and its status (up, dead, standby, outsider). In the kernel lab the
    service is another program: `own_service` False, its answered requests given."""

    server: Server
    status: str = "up"
    own_service: bool = True
    requests: int | None = None  # with own_service False: the service's count, if known


@dataclass(frozen=True)
class RouterItem:
    """A router; `entries`: the forwarding entries of a data plane of its own (the
    kernel's multicast table in the lab), None for the router's own cache."""

    router: Router
    entries: int | None = None


@dataclass(frozen=True)
class VipRouterItem:
    router: VipRouter
    status: str = "up"  # up or dead


@dataclass(frozen=True)
class Population:
    """One client group of the topology (`[[clients]] name`)."""

    name: str
    clients: Sequence[Client]


@dataclass(frozen=True)
class PoolInfo:
    name: str
    group: str
    technique: str
    policy: str
    private: bool
    group6: str = ""  # a dual-stack pool's IPv6 group ("": none)


@dataclass(eq=False)  # registries keep collectors in dicts: hashed by identity
class PoolCollector(Collector):
    """Metric families of the nodes the callables return at each scrape."""

    now: Callable[[], float]
    servers: Callable[[], Iterable[ServerItem]] = tuple
    routers: Callable[[], Iterable[RouterItem]] = tuple
    vip_routers: Callable[[], Iterable[VipRouterItem]] = tuple
    populations: Callable[[], Iterable[Population]] = tuple
    pool: PoolInfo | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @classmethod
    def for_pool(cls, run: PoolSource) -> PoolCollector:
        """The collector of an in-process pool (a `runtime.PoolRun`)."""
        topo = run.topology
        pool = topo.pool

        def servers() -> list[ServerItem]:
            nodes = run.nodes
            hosted = {**nodes.servers, **nodes.standby}
            return [ServerItem(s, run.engine.status(n)) for n, s in sorted(hosted.items())]

        def vip_routers() -> list[VipRouterItem]:
            dead = set(run.engine.dead)
            return [
                VipRouterItem(r, "dead" if n in dead else "up")
                for n, r in sorted(run.nodes.vip_routers.items())
            ]

        def populations() -> list[Population]:
            groups: dict[str, list[Client]] = {}
            for name, client in sorted(run.nodes.clients.items()):
                groups.setdefault(topo.clients[name].group, []).append(client)
            return [Population(g, tuple(c)) for g, c in sorted(groups.items())]

        return cls(
            now=lambda: run.now,
            servers=servers,
            routers=lambda: [RouterItem(r) for _, r in sorted(run.nodes.routers.items())],
            vip_routers=vip_routers,
            populations=populations,
            pool=PoolInfo(
                pool.name,
                str(pool.group),
                str(pool.technique),
                str(pool.policy),
                pool.private,
                str(pool.group6 or ""),
            ),
        )

    def collect(self) -> Iterator[Metric]:
        # One scrape at a time; a dict the pool's thread resized meanwhile: read again.
        with self._lock:
            for attempt in range(_RETRIES):
                try:
                    families = self._families()
                except RuntimeError:
                    if attempt == _RETRIES - 1:
                        raise
                else:
                    break
        yield from families

    def _families(self) -> list[Metric]:
        now = self.now()
        servers = list(self.servers())
        families: list[Metric] = []
        if self.pool is not None:
            families += pool_families(self.pool, servers)
        families += server_families(servers, now)
        families += router_families(list(self.routers()))
        families += vip_router_families(list(self.vip_routers()))
        families += population_families(list(self.populations()), now)
        return [f for f in families if f.samples]


class PoolSource(Protocol):
    """What `PoolCollector.for_pool` reads of a pool (`runtime.PoolRun` has it)."""

    topology: Topology
    nodes: Nodes
    engine: ScenarioEngine

    @property
    def now(self) -> float: ...


# -- the families ------------------------------------------------------------------------


def _counter(name: str, doc: str, labels: Sequence[str]) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels)


def _gauge(name: str, doc: str, labels: Sequence[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


def _share(server: Server) -> float:
    allocation = server.coordinator.allocation
    if allocation is None or server.name not in allocation.servers:
        return 0.0
    return float(allocation.share(server.name))


def pool_families(pool: PoolInfo, servers: Sequence[ServerItem]) -> list[Metric]:
    info = InfoMetricFamily("manycast_pool", "The pool: its name, group, technique and policy.")
    info.add_metric(
        [],
        {
            "pool": pool.name,
            "group": pool.group,
            "technique": pool.technique,
            "policy": pool.policy,
            "private": str(pool.private).lower(),
            **({"group6": pool.group6} if pool.group6 else {}),
        },
    )
    epoch = _gauge(
        "manycast_pool_allocation_epoch",
        "The newest allocation epoch among the live servers hosted here.",
        ["pool"],
    )
    live = [s.server.coordinator.epoch for s in servers if s.status == "up"]
    epoch.add_metric([pool.name], max(live, default=0))
    count = _gauge("manycast_pool_servers", "The pool's servers by status.", ["pool", "status"])
    for state in SERVER_STATES:
        count.add_metric([pool.name, state], sum(1 for s in servers if s.status == state))
    return [info, epoch, count]


def server_families(items: Sequence[ServerItem], now: float) -> list[Metric]:
    status = _gauge(
        "manycast_server_status",
        "1 for the server's status (up, dead, standby, outsider), 0 for the others.",
        ["server", "status"],
    )
    role = _gauge(
        "manycast_server_role",
        "1 for the live server's role in coordination (coordinator, member).",
        ["server", "role"],
    )
    share = _gauge(
        "manycast_server_share_ratio",
        "The server's share of the client address space by its allocation (0 unless up).",
        ["server"],
    )
    epoch = _gauge(
        "manycast_server_allocation_epoch", "The epoch of the server's allocation.", ["server"]
    )
    sessions = _gauge("manycast_server_sessions", "Open sessions (connections).", ["server"])
    requests = _counter(
        "manycast_server_requests", "Requests the server's service answered.", ["server"]
    )
    opened = _counter("manycast_server_sessions_opened", "Sessions accepted.", ["server"])
    misrouted = _counter(
        "manycast_server_packets_misrouted",
        "Packets of clients the server does not own nor keep a connection of (dropped).",
        ["server"],
    )
    moved = _counter(
        "manycast_server_connections_moved",
        "Connections moved when their portion changed owner, by technique and direction: "
        "R1 out (reset), R3 out/in (state transferred), R4 out (pinned on the tree), "
        "D out/in (moved by a change-destination).",
        ["server", "technique", "direction"],
    )
    forwarded = _counter(
        "manycast_server_forwarded_packets",
        "R2: packets forwarded to an old owner (out) and forwarded packets processed "
        "as the old owner (in).",
        ["server", "direction"],
    )
    reset_unknown = _counter(
        "manycast_server_resets_unknown",
        "Segments of connections the server does not know, answered with a reset.",
        ["server"],
    )
    queries = _counter(
        "manycast_server_state_queries", "R3: state queries the server sent.", ["server"]
    )
    control = _counter(
        "manycast_server_control_messages",
        "Control channel messages sent and received.",
        ["server", "direction"],
    )
    reports = _counter(
        "manycast_server_membership_reports", "Membership reports (joins) sent.", ["server"]
    )
    commits = _counter(
        "manycast_server_allocation_commits",
        "Allocation changes this server committed as coordinator.",
        ["server"],
    )
    for item in items:
        server = item.server
        name = server.name
        up = item.status == "up"
        for state in SERVER_STATES:
            status.add_metric([name, state], 1.0 if item.status == state else 0.0)
        leads = up and server.coordinator.is_coordinator(now)
        role.add_metric([name, "coordinator"], 1.0 if leads else 0.0)
        role.add_metric([name, "member"], 1.0 if up and not leads else 0.0)
        share.add_metric([name], _share(server) if up else 0.0)
        epoch.add_metric([name], server.coordinator.epoch)
        if item.own_service:
            sessions.add_metric([name], server.sessions if up else 0)
            requests.add_metric([name], server.app.requests)
        elif item.requests is not None:
            requests.add_metric([name], item.requests)
        stats = server.stats
        opened.add_metric([name], stats.sessions_opened)
        misrouted.add_metric([name], stats.misrouted)
        h = server.handover.stats
        for technique, direction, value in (
            (str(Technique.R1), "out", h.reset_moved),
            (str(Technique.R3), "out", h.transferred_out),
            (str(Technique.R3), "in", h.transferred_in),
            (str(Technique.R4), "out", h.pinned),
            *_moves_d(server),
        ):
            moved.add_metric([name, technique, direction], value)
        forwarded.add_metric([name, "out"], h.forwarded_out)
        forwarded.add_metric([name, "in"], h.forwarded_in)
        reset_unknown.add_metric([name], h.reset_unknown)
        queries.add_metric([name], h.queries)
        control.add_metric([name, "sent"], stats.control_sent)
        control.add_metric([name, "received"], stats.control_received)
        reports.add_metric([name], stats.reports_sent)
        commits.add_metric([name], server.coordinator.stats.commits)
    return [
        status,
        role,
        share,
        epoch,
        sessions,
        requests,
        opened,
        misrouted,
        moved,
        forwarded,
        reset_unknown,
        queries,
        control,
        reports,
        commits,
    ]


def _moves_d(server: Server) -> list[tuple[str, str, int]]:
    """Technique D's moves, for a server that has a redirector (Fig 20-21)."""
    redirector = getattr(server, "redirector", None)
    if redirector is None:
        return []
    stats = redirector.stats
    return [("D", "out", int(stats.moved_out)), ("D", "in", int(stats.moved_in))]


def _cache_entries(router: Router) -> int:
    # The router keeps its (S, G) forwarding cache privately: group -> source -> outs.
    return sum(len(sources) for r in _families_of(router) for sources in list(r._mfc.values()))


def _memberships(router: Router) -> int:
    return sum(len(m) for r in _families_of(router) for m in list(r.members.values()))


def _families_of(router: Router) -> tuple[Router, ...]:
    """The router's logic of each family: a dual-stack router's IPv6 one too."""
    return (router, router.six) if isinstance(router, DualStackRouter) else (router,)


def router_families(items: Sequence[RouterItem]) -> list[Metric]:
    forwarded = _counter(
        "manycast_router_packets_forwarded",
        "Packets forwarded, by kind: multicast, unicast, label_push (a tagged flow's "
        "packet labelled at its edge), label_swap, label_pop (handed to the tree's "
        "server), to_vip_router (a new flow's packet routed to a VIP router).",
        ["router", "kind"],
    )
    dropped = _counter(
        "manycast_router_packets_dropped",
        "Packets dropped, by reason.",
        ["router", "reason"],
    )
    local = _counter(
        "manycast_router_packets_local", "Packets addressed to the router itself.", ["router"]
    )
    admitted = _counter(
        "manycast_router_joins_admitted", "Joins (membership reports) admitted.", ["router"]
    )
    relayed = _counter(
        "manycast_router_joins_relayed", "Admitted joins relayed to neighbour routers.", ["router"]
    )
    refused = _counter(
        "manycast_router_joins_refused",
        "Joins refused, by reason (the router's admission checks).",
        ["router", "reason"],
    )
    entries = _gauge(
        "manycast_router_forwarding_entries",
        "Forwarding entries: the router's cache (one per group and cell of its members'"
        " masks), or the kernel's (source, group) table in the lab.",
        ["router"],
    )
    members = _gauge(
        "manycast_router_group_members",
        "Memberships the router holds: (group, requester) pairs.",
        ["router"],
    )
    flows = _gauge(
        "manycast_router_labelled_flows",
        "Flows tagged at this edge router whose packets it labels onto a server's tree.",
        ["router"],
    )
    tagged = _counter("manycast_router_flows_tagged", "Flow tags accepted.", ["router"])
    ended = _counter(
        "manycast_router_flows_ended",
        "Tagged flows forgotten, by reason: closed (FIN or RST), idle.",
        ["router", "reason"],
    )
    tags_refused = _counter(
        "manycast_router_flow_tags_refused",
        "Flow tags refused: retag (another server for a flow whose server lives), "
        "not_allowed (from where tags may not come).",
        ["router", "reason"],
    )
    for item in items:
        router = item.router
        name = router.name
        s = router.stats
        plane = router.vip.stats if router.vip is not None else None
        for kind, value in (
            ("multicast", s.multicast_forwarded),
            ("unicast", s.unicast_forwarded),
            ("label_push", plane.pushed if plane else 0),
            ("label_swap", plane.labelled_switched if plane else 0),
            ("label_pop", plane.labelled_delivered if plane else 0),
            ("to_vip_router", plane.to_vip_router if plane else 0),
        ):
            forwarded.add_metric([name, kind], value)
        rejected = dict(s.rejected)
        for reason, value in (
            ("no member", s.no_member),
            ("no route", s.no_route),
            ("ttl expired", s.ttl_expired),
            ("malformed", s.malformed),
            (str(Refusal.UNAUTHORIZED_SENDER), rejected.get(Refusal.UNAUTHORIZED_SENDER, 0)),
            ("label unknown", plane.label_unknown if plane else 0),
            ("label ttl expired", plane.label_ttl_expired if plane else 0),
            ("label malformed", plane.malformed if plane else 0),
            ("no vip router", plane.no_vip_router if plane else 0),
        ):
            dropped.add_metric([name, reason], value)
        local.add_metric([name], s.local)
        admitted.add_metric([name], s.joins_accepted)
        relayed.add_metric([name], s.joins_relayed)
        for refusal in JOIN_REFUSALS:
            refused.add_metric([name, str(refusal)], rejected.get(refusal, 0))
        entries.add_metric([name], _cache_entries(router) if item.entries is None else item.entries)
        members.add_metric([name], _memberships(router))
        if router.vip is not None and plane is not None:
            flows.add_metric([name], len(router.vip.flows))
            tagged.add_metric([name], plane.flows_tagged)
            ended.add_metric([name, "closed"], plane.flows_ended)
            ended.add_metric([name, "idle"], plane.flows_idle)
            tags_refused.add_metric([name, "retag"], plane.retags_refused)
            tags_refused.add_metric([name, "not_allowed"], plane.refused)
    return [
        forwarded,
        dropped,
        local,
        admitted,
        relayed,
        refused,
        entries,
        members,
        flows,
        tagged,
        ended,
        tags_refused,
    ]


def vip_router_families(items: Sequence[VipRouterItem]) -> list[Metric]:
    up = _gauge("manycast_vip_router_up", "1 while the VIP router runs.", ["vip_router"])
    packets = _counter(
        "manycast_vip_router_packets",
        "Packets of flows that reached the VIP router (goal: only each flow's first).",
        ["vip_router"],
    )
    repeat = _counter(
        "manycast_vip_router_repeat_packets",
        "Packets of flows the VIP router had already placed (goal: 0; the edge labels them).",
        ["vip_router"],
    )
    placed = _counter(
        "manycast_vip_router_flows_placed",
        "New flows the VIP router gave a server, by server.",
        ["vip_router", "server"],
    )
    flows = _gauge(
        "manycast_vip_router_flows", "Flows the VIP router remembers now.", ["vip_router"]
    )
    tags = _counter(
        "manycast_vip_router_tags_sent",
        "Flow tags sent to edge routers (first packets).",
        ["vip_router"],
    )
    repicked = _counter(
        "manycast_vip_router_flows_repicked",
        "Flows placed again because their server's tree went away.",
        ["vip_router"],
    )
    errors = _counter(
        "manycast_vip_router_errors",
        "Packets the VIP router could not place or tag, by reason: no server, no tree, "
        "no edge, malformed.",
        ["vip_router", "reason"],
    )
    epoch = _gauge(
        "manycast_vip_router_allocation_epoch",
        "The epoch of the allocation the VIP router follows.",
        ["vip_router"],
    )
    for item in items:
        router = item.router
        name = router.name
        s = router.stats
        up.add_metric([name], 1.0 if item.status == "up" else 0.0)
        packets.add_metric([name], s.first_packets)
        repeat.add_metric([name], s.repeat_packets)
        for server, count in sorted(dict(s.picks).items()):
            placed.add_metric([name, server], count)
        flows.add_metric([name], router.flows_held())
        tags.add_metric([name], s.tags_sent)
        repicked.add_metric([name], s.repicked)
        for reason, value in (
            ("no server", s.no_server),
            ("no tree", s.no_tree),
            ("no edge", s.no_edge),
            ("malformed", s.malformed),
        ):
            errors.add_metric([name, reason], value)
        epoch.add_metric([name], router.observer.epoch)
    return [up, packets, repeat, placed, flows, tags, repicked, errors, epoch]


def population_families(populations: Sequence[Population], now: float) -> list[Metric]:
    clients = _gauge("manycast_clients", "Clients of the population.", ["population"])
    answered = _gauge(
        "manycast_clients_answered",
        "Clients answered recently: within three of the slowest client's request "
        "intervals, at least 1.5 s (the summary's rule).",
        ["population"],
    )
    requests = _counter(
        "manycast_client_requests",
        "Requests by outcome: ok (answered), failed (unanswered in time, reset, wrong answer).",
        ["population", "outcome"],
    )
    resets = _counter("manycast_client_resets", "Connections reset by a server.", ["population"])
    reconnects = _counter(
        "manycast_client_reconnects", "New connections after a loss.", ["population"]
    )
    state_lost = _counter(
        "manycast_client_state_lost",
        "Answers showing the server had lost the connection's state.",
        ["population"],
    )
    window = served_window(c.rate for p in populations for c in p.clients)
    for population in populations:
        name = population.name
        members = population.clients
        clients.add_metric([name], len(members))
        recent = 0
        for c in members:
            times = c.stats.ok_times
            if times and times[-1] >= now - window:
                recent += 1
        answered.add_metric([name], recent)
        requests.add_metric([name, "ok"], sum(c.stats.requests_ok for c in members))
        requests.add_metric([name, "failed"], sum(c.stats.requests_failed for c in members))
        resets.add_metric([name], sum(c.stats.resets for c in members))
        reconnects.add_metric([name], sum(c.stats.reconnects for c in members))
        state_lost.add_metric([name], sum(c.stats.state_lost for c in members))
    return [clients, answered, requests, resets, reconnects, state_lost]
