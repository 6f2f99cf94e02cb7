"""Helpers for tests of the live pool, on the memory driver and on real sockets.

`pool_toml` writes a small topology (the seed's Fig 9 shape: clients behind an
edge router, a core, and servers behind two other edge routers, each on its own
subnet); `start` runs it under a `Trace` that records what each server and
client receives; the `assert_*` helpers check what a user would see. On real
sockets a busy machine runs the pool at any pace, so a test waits for the outcome
it checks (`Settled`, `run_pool_until`) under a generous `DEADLINE` instead of
assuming how long it takes.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from manycast.drivers.memory import MemoryNetwork
from manycast.protocol.client import Client
from manycast.protocol.dualstack import DualStackRouter, in_space
from manycast.protocol.server import Server
from manycast.runtime import PoolRun
from manycast.space import Allocation, PortionSet
from manycast.summary import served_recently, served_window
from manycast.topology import loads
from manycast.wire import control
from manycast.wire.errors import WireError
from manycast.wire.ip import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    Address,
    InnerPacket,
    UDPDatagram,
    parse_packet,
)

GROUP = ipaddress.IPv4Address("232.1.1.1")
SERVER_SUBNETS = ("192.168.10.0/30", "172.16.5.0/30", "10.77.3.0/30", "100.64.9.0/30")

ScenarioStep = tuple[float, str, Mapping[str, Any]]
DropRule = Callable[[str, str, control.ControlMessage, float], bool]


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return repr(value)


def table(kind: str, **keys: Any) -> str:
    """One [[kind]] table as TOML text."""
    body = "".join(f"{k} = {_value(v)}\n" for k, v in keys.items())
    return f"[[{kind}]]\n{body}"


def pool_toml(
    *,
    servers: int = 4,
    standby: int = 0,
    clients: int = 24,
    subnet: str = "10.1.0.0/24",
    rate: float = 2.0,
    loss: Mapping[str, float] | None = None,
    scenario: Sequence[ScenarioStep] = (),
    duration: float = 6.0,
    pool: Mapping[str, Any] | None = None,
) -> str:
    """clients a1.. -- ra -- core -- rs1 (odd servers) / rs2 (even servers).

    Servers are s1.. (the last `standby` of them on standby), each on its own
    unrelated subnet, so nothing about the pool relies on one LAN. `loss` maps a
    link name ("ra-core", "core-rs1", "core-rs2") to its loss probability.
    """
    settings: dict[str, Any] = {"group": str(GROUP), "heartbeat_ms": 100, "heartbeat_misses": 3}
    settings.update(pool or {})
    parts = ["[pool]\n" + "".join(f"{k} = {_value(v)}\n" for k, v in settings.items())]
    parts += [table("router", name=n) for n in ("ra", "core", "rs1", "rs2")]
    lossy = loss or {}
    for a, b, delay in (("ra", "core", 2), ("core", "rs1", 1), ("core", "rs2", 3)):
        link_loss = lossy.get(f"{a}-{b}", 0.0)
        parts.append(table("link", between=[a, b], delay_ms=delay, loss=link_loss))
    total = servers + standby
    for index in range(1, total + 1):
        keys: dict[str, Any] = {"name": f"s{index}", "router": "rs1" if index % 2 else "rs2"}
        if index <= len(SERVER_SUBNETS):
            keys["subnet"] = SERVER_SUBNETS[index - 1]
        if index > servers:
            keys["standby"] = True
        parts.append(table("server", **keys))
    parts.append(table("clients", name="a", count=clients, router="ra", subnet=subnet, rate=rate))
    for at, action, args in scenario:
        parts.append(table("scenario", at=at, action=action, **args))
    parts.append(f"[run]\nduration = {duration}\n")
    return "\n".join(parts)


# -- a traced run --------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    """A client's TCP packet to the group, as it reached a server."""

    at: float
    server: str
    source: Address
    owned: bool  # inside the server's portions when it arrived


@dataclass
class Trace:
    """Records what servers and clients receive, and loses chosen control messages
    on their way into a server (one lost datagram, or a split pool)."""

    run: PoolRun
    deliveries: list[Delivery] = field(default_factory=list)
    client_sources: dict[str, set[Address]] = field(default_factory=lambda: defaultdict(set))
    control_dropped: list[tuple[float, str, control.ControlMessage]] = field(default_factory=list)
    _drops: list[DropRule] = field(default_factory=list)

    def __post_init__(self) -> None:
        nodes = self.run.nodes
        self.address_of = {
            name: server.address for name, server in {**nodes.servers, **nodes.standby}.items()
        }
        self.name_of = {address: name for name, address in self.address_of.items()}
        for server in [*nodes.servers.values(), *nodes.standby.values()]:
            server.receive = self._server_hook(server)  # type: ignore[method-assign]
        for client in nodes.clients.values():
            client.receive = self._client_hook(client)  # type: ignore[method-assign]

    def drop(self, rule: DropRule) -> None:
        """Lose every control message to a server for which
        `rule(receiver, sender, message, now)` is true."""
        self._drops.append(rule)

    def cut(self, side_a: Iterable[str], side_b: Iterable[str], start: float, end: float) -> None:
        """Lose every control message between the two sides in [start, end): a split pool
        (the routers still reach both sides)."""
        a, b = frozenset(side_a), frozenset(side_b)

        def across(receiver: str, sender: str, message: object, now: float) -> bool:
            pair = {receiver, sender}
            return start <= now < end and bool(pair & a) and bool(pair & b)

        self.drop(across)

    def _dropped(self, receiver: str, ip: InnerPacket, now: float) -> bool:
        sender = self.name_of.get(ip.header.src)
        if not self._drops or sender is None:
            return False
        try:
            datagram = UDPDatagram.from_wire(ip.payload, ip.header.src, ip.header.dst)
            message = control.decode(datagram.payload)
        except WireError:
            return False
        if any(rule(receiver, sender, message, now) for rule in self._drops):
            self.control_dropped.append((now, receiver, message))
            return True
        return False

    def _server_hook(self, server: Server) -> Any:
        original = server.receive
        # the pool's group, and a dual-stack pool's IPv6 group (owned by its portions6)
        groups = {server.settings.group, server.settings.group6}

        def receive(iface: str, packet: bytes, now: float) -> None:
            try:
                ip = parse_packet(packet)
            except WireError:
                original(iface, packet, now)
                return
            header = ip.header
            if ip.protocol == IPPROTO_TCP and header.dst in groups:
                portions = server.portions
                if header.dst == server.settings.group6:
                    portions = server.portions6
                owned = portions is not None and portions.contains(header.src)
                self.deliveries.append(Delivery(now, server.name, header.src, owned))
            elif ip.protocol == IPPROTO_UDP and self._dropped(server.name, ip, now):
                return
            original(iface, packet, now)

        return receive

    def _client_hook(self, client: Client) -> Any:
        original = client.receive

        def receive(iface: str, packet: bytes, now: float) -> None:
            try:
                ip = parse_packet(packet)
            except WireError:
                ip = None
            if ip is not None and ip.protocol == IPPROTO_TCP:
                self.client_sources[client.name].add(ip.header.src)
            original(iface, packet, now)

        return receive

    # -- views -----------------------------------------------------------------------------
    def servers_of(self, client: str, start: float = 0.0, end: float = float("inf")) -> set[str]:
        """The servers that received this client's packets in [start, end)."""
        address = self.run.nodes.clients[client].address
        return {d.server for d in self.deliveries if d.source == address and start <= d.at < end}

    def foreign(self, start: float = 0.0, end: float = float("inf")) -> list[Delivery]:
        """Deliveries outside the receiving server's portions in [start, end)."""
        return [d for d in self.deliveries if not d.owned and start <= d.at < end]


def start(text: str, seed: int = 1) -> tuple[PoolRun, Trace]:
    run = PoolRun(loads(text), "memory", seed)
    return run, Trace(run)


def run_to(run: PoolRun, until: float) -> None:
    """Advance the virtual clock to `until` (the memory driver: no sleeping)."""
    network = run.network
    assert isinstance(network, MemoryNetwork)
    network.run_until(until)


# -- what a user checks ----------------------------------------------------------------


def live(run: PoolRun) -> dict[str, Server]:
    """The running servers (killed ones stay in `run.nodes.servers`)."""
    return {n: s for n, s in run.nodes.servers.items() if n not in run.engine.dead}


def allocation(run: PoolRun) -> Allocation:
    """The one allocation every live server holds (asserted)."""
    servers = live(run)
    views = {name: s.coordinator.view for name, s in servers.items()}
    assert len(set(views.values())) == 1, f"servers disagree: {views}"
    current = next(iter(servers.values())).coordinator.allocation
    assert current is not None
    return current


def assert_one_allocation(run: PoolRun) -> Allocation:
    """Every live server holds the same epoch and digest; the portions they joined
    for are disjoint and cover the space (no source owned twice or by nobody); the
    allocation names exactly the live servers; and every router sends each client
    address to exactly one live server, its owner."""
    current = allocation(run)
    servers = live(run)
    assert current.servers == tuple(sorted(servers)), (current.servers, sorted(servers))
    joined = {name: s.portions or PortionSet() for name, s in servers.items()}
    union = Allocation.from_portions(current.space, joined)  # raises on overlap or gap
    assert union == current
    for router, client, toward in _routes(run):
        assert toward == {owner(run, current, client)}, (router, client.name, toward)
    return current


def _routes(run: PoolRun) -> Iterable[tuple[str, Client, set[str]]]:
    """(router, client, the live servers the router sends the client's packets to); in
    a dual-stack pool, by the router's and servers' logic of the client's family."""
    pool = run.topology.pool
    for router in run.nodes.routers.values():
        for client in run.nodes.clients.values():
            six = pool.dual and client.address.version == 6
            plane = router.six if isinstance(router, DualStackRouter) and six else router
            by_address = {
                int(s.address6 if six and s.address6 else s.address): name
                for name, s in live(run).items()
            }
            members = plane.members.get(int(pool.group_of(client.address.version)), {})
            src = int(client.address)
            toward = {
                by_address[o]
                for o, m in members.items()
                if o in by_address and m.filter.matches(src)
            }
            yield router.name, client, toward


def back_at(client: Client, since: float) -> float | None:
    """When the client was answered again after its last disruption since `since`
    (a change takes effect at its commit, a little after the operator asked)."""
    hits = [t for t in client.stats.disruptions if t >= since]
    return client.stats.first_ok_after(max(hits, default=since))


def served_since(run: PoolRun, since: float) -> list[str]:
    """Clients with an answered request after `since`."""
    return [c.name for c in run.nodes.clients.values() if c.stats.first_ok_after(since) is not None]


def assert_all_served_since(run: PoolRun, since: float) -> None:
    clients = run.nodes.clients
    missing = sorted(set(clients) - set(served_since(run, since)))
    assert not missing, f"not served after {since}: {missing}"


def owners(alloc: Allocation, run: PoolRun) -> dict[str, str | None]:
    """client -> owning server under `alloc`."""
    return {name: alloc.owner(c.address) for name, c in run.nodes.clients.items()}


# -- waiting for an outcome on real time (the overlay) ----------------------------------------

# Seconds a test on real sockets waits for an outcome before it gives up. An idle
# machine gets there in a second or two; a busy one may take many times longer.
DEADLINE = 30.0


# The pool's own waits are sized for a host that keeps up: a client gives up on a
# request after 2 s, an R2 server resets a forwarded connection nobody claims within
# 0.3 s, an R3 server one whose state nobody offers within 0.9 s. A busy host may take
# that long to pass a packet along without anything being lost, so tests on real
# sockets make them PATIENCE times longer (no topology key sets them yet). That stays
# well inside DEADLINE: a request or a connection really lost still fails, and the
# test sees it, before it stops waiting.
PATIENCE = 5.0


def patient(run: PoolRun) -> PoolRun:
    """Make the clients and servers of `run` wait PATIENCE times longer before they
    give a request or a moved connection up; call before running."""
    for client in run.nodes.clients.values():
        client.request_timeout *= PATIENCE
    for server in [*run.nodes.servers.values(), *run.nodes.standby.values()]:
        server.handover.forward_timeout *= PATIENCE
        server.handover.query_timeout *= PATIENCE
    return run


def agreed(run: PoolRun) -> Allocation | None:
    """The allocation every live server holds; None while they disagree or hold none."""
    servers = live(run)
    if len({s.coordinator.view for s in servers.values()}) != 1:
        return None
    return next(iter(servers.values())).coordinator.allocation


def routed(run: PoolRun, alloc: Allocation) -> bool:
    """Every router sends each client's packets to its owner under `alloc`, and only there."""
    return all(toward == {owner(run, alloc, client)} for _, client, toward in _routes(run))


def owner(run: PoolRun, alloc: Allocation, client: Client) -> str | None:
    """The client's owner under `alloc` (a dual-stack pool's IPv6 client: by the same
    buckets of the IPv6 space)."""
    space6 = run.topology.pool.space6
    if space6 is not None and client.address.version == 6:
        return in_space(alloc, space6).owner(client.address)
    return alloc.owner(client.address)


def _members(run: PoolRun) -> list[Client]:
    authorized = {name for name, spec in run.topology.clients.items() if spec.authorized}
    return [c for name, c in run.nodes.clients.items() if name in authorized]


def served_now(run: PoolRun) -> bool:
    """Every member client counts as served now (the summary's `clients_served_at_end`)."""
    records = run.client_records()
    members = [r for r in records if r.authorized]
    window = served_window(r.rate for r in records)
    return served_recently(members, run.now, window) == len(members)


def requests_ok(run: PoolRun) -> int:
    """Requests the member clients had answered (the summary's `requests_ok`)."""
    return sum(c.stats.requests_ok for c in _members(run))


@dataclass
class Settled:
    """A condition: true once a change is complete as the clients see it. Every live
    server holds one allocation that `accept`s, every router sends each client to its
    owner under it, and since then (and since `since`, and since its own last
    disruption) every member client has been answered. If the pool unsettles
    meanwhile, the wait starts over."""

    run: PoolRun
    accept: Callable[[Allocation], bool]
    since: float = 0.0
    at: float | None = None  # when the routes were first seen settled

    def __call__(self) -> bool:
        alloc = agreed(self.run)
        if alloc is None or not self.accept(alloc) or not routed(self.run, alloc):
            self.at = None
            return False
        if self.at is None:
            self.at = self.run.now
        start = max(self.at, self.since)
        return all(back_at(c, start) is not None for c in _members(self.run))


def every(run: PoolRun, seconds: float, condition: Callable[[], bool]) -> Callable[[], bool]:
    """`condition`, asked at most once every `seconds` of the run's clock (the driver
    asks every few milliseconds, and the pool should not spend its time answering);
    meanwhile its last answer stands."""
    last: list[float] = [float("-inf")]
    answer = [False]

    def ask() -> bool:
        if run.now - last[0] >= seconds:
            last[0] = run.now
            answer[0] = condition()
        return answer[0]

    return ask


def once(condition: Callable[[], bool]) -> Callable[[], bool]:
    """`condition`, true from the first time it holds. `run_until` asks again after it
    wakes, and an outcome that held (every client served within the last 1.5 s) may
    have lapsed by then on a busy host."""
    held = [False]

    def ask() -> bool:
        held[0] = held[0] or condition()
        return held[0]

    return ask


class _Enough(Exception):
    """Ends `PoolRun.run` from its tick once the outcome a test waits for holds."""


def run_pool_until(
    run: PoolRun, condition: Callable[[], bool], deadline: float = DEADLINE, tick: float = 0.25
) -> tuple[bool, dict[str, Any]]:
    """`run.run(...)` (which also serves a private pool's records in DNS) until
    `condition()` holds, checked every `tick`, or `deadline` on the run's clock.
    Returns whether it held, and the summary at that moment (a real-time clock goes
    on after the run, and "served at the end" would slip with it). The network is
    closed either way."""
    summary: list[dict[str, Any]] = []

    def check(_: object) -> None:
        if condition():
            summary.append(run.summary())
            raise _Enough

    try:
        run.run(deadline, check, tick=tick)
    except _Enough:
        return True, summary[0]
    return False, run.summary()
