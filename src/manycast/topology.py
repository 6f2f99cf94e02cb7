"""Topology as data (the Mininet model): one TOML file names the routers, servers,
clients, links, the pool (group, name, service, policy) and a timed scenario.

`load(path)` parses and checks a file, naming the line of every problem, and
compiles it: addresses for every interface, the links a driver needs, and each
router's unicast routes (shortest paths by link delay). The same compiled
topology runs in the memory driver, the overlay and the kernel lab.

Addressing, unless a link or LAN names its own subnet: router-to-router links
get /30s from 10.255.0.0/16, each server a /30 to its router from
10.254.0.0/16, and each client group one LAN whose first address is the router.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import ipaddress
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from manycast.drivers.links import Attachment, LinkSpec
from manycast.drivers.overlay import assign_endpoints
from manycast.protocol.node import Interface
from manycast.space import AddressSpace, SpaceError

TECHNIQUES = ("R1", "R2", "R3", "R4")
POLICIES = ("equal", "weighted", "striped")
ACTIONS = ("set_share", "kill", "add", "client_rate", "rebalance")
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,30}$")


class TopologyError(ValueError):
    """A topology file that cannot be used; the message names the line."""


@dataclass(frozen=True)
class PoolSpec:
    name: str
    group: ipaddress.IPv4Address
    port: int
    control_group: ipaddress.IPv4Address
    control_port: int
    space: AddressSpace
    policy: str
    portions: int
    technique: str
    close_after_transaction: bool
    heartbeat_s: float
    heartbeat_misses: int
    report_interval_s: float
    private: bool
    key_file: str | None = None
    dns: tuple[str, int] | None = None  # a DNS server holding the pool's records
    private_ranges: str = "232.0.0.0/5"  # the private part of the multicast space (Fig 2)
    public_key: bytes | None = None  # a configured key (a certification authority's word)
    rebalance_above: float = 0.0
    rebalance_target: float = 1.1
    rebalance_hold_s: float = 3.0


@dataclass(frozen=True)
class RouterSpec:
    name: str


@dataclass(frozen=True)
class ServerSpec:
    name: str
    router: str
    weight: float
    standby: bool
    authorized: bool = True  # holds the private pool's key (false: an outsider)


@dataclass(frozen=True)
class ClientSpec:
    name: str
    group: str
    router: str
    rate: float
    authorized: bool = True


@dataclass(frozen=True)
class Route:
    network: ipaddress.IPv4Network
    iface: str
    next_hop: ipaddress.IPv4Address | None  # None: the destination is on the link


@dataclass(frozen=True)
class Step:
    at: float
    action: str
    args: Mapping[str, Any]
    line: int

    def describe(self) -> str:
        detail = " ".join(f"{k}={v}" for k, v in self.args.items())
        return f"{self.action} {detail}".strip()


@dataclass
class Topology:
    """A checked and compiled topology."""

    source: str
    pool: PoolSpec
    routers: dict[str, RouterSpec]
    servers: dict[str, ServerSpec]
    clients: dict[str, ClientSpec]
    links: dict[str, LinkSpec]
    interfaces: dict[str, dict[str, Interface]]
    routes: dict[str, list[Route]]
    gateways: dict[str, tuple[str, ipaddress.IPv4Address]]
    router_ifaces: dict[str, set[str]]
    scenario: list[Step]
    duration: float
    hosts: dict[str, str] = field(default_factory=dict)

    def kind(self, node: str) -> str:
        if node in self.routers:
            return "router"
        if node in self.servers:
            return "server"
        if node in self.clients:
            return "client"
        raise KeyError(node)

    @property
    def attachment_count(self) -> int:
        """How many (node, interface) pairs there are: the overlay's UDP endpoints."""
        return sum(len(ifaces) for ifaces in self.interfaces.values())

    def router_neighbors(self, router: str) -> dict[str, tuple[int, ...]]:
        """For each router-facing interface of `router`, the neighbour routers' addresses."""
        out: dict[str, tuple[int, ...]] = {}
        for iface in sorted(self.router_ifaces[router]):
            link = self.links[self.interfaces[router][iface].link]
            out[iface] = tuple(m.address for m in link.members if m.node != router)
        return out

    def address(self, node: str) -> ipaddress.IPv4Address:
        """A node's first interface address (its id on the network)."""
        return next(iter(self.interfaces[node].values())).address

    def endpoints(self, base_port: int = 47000) -> dict[tuple[str, str], tuple[str, int]]:
        """Overlay UDP endpoints: one port per (node, interface), in a fixed order so
        every process that loads this file agrees."""
        return assign_endpoints(self.links.values(), base_port, self.hosts)


# -- parsing -------------------------------------------------------------------


class _Lines:
    """Finds the line of a table or key in the source, for error messages."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()

    def table(self, kind: str, index: int | None = None) -> int:
        pattern = re.compile(
            rf"^\s*\[\[\s*{re.escape(kind)}\s*\]\]"
            if index is not None
            else rf"^\s*\[\s*{re.escape(kind)}\s*\]"
        )
        seen = -1
        for number, line in enumerate(self.lines, 1):
            if pattern.match(line):
                seen += 1
                if index is None or seen == index:
                    return number
        return 0

    def key(self, kind: str, index: int | None, key: str) -> int:
        start = self.table(kind, index)
        pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
        for number in range(start + 1 if start else 1, len(self.lines) + 1):
            line = self.lines[number - 1]
            if start and number > start and re.match(r"^\s*\[", line):
                break
            if pattern.match(line):
                return number
        return start


class _Reader:
    """Typed access to one TOML table, raising TopologyError with a line."""

    def __init__(self, source: str, lines: _Lines, kind: str, index: int | None, table: Any):
        self.source, self.lines, self.kind, self.index = source, lines, kind, index
        where = f"[[{kind}]] #{index + 1}" if index is not None else f"[{kind}]"
        if not isinstance(table, dict):
            self.fail(f"{where} must be a table")
        self.table: dict[str, Any] = table
        self.used: set[str] = set()

    def fail(self, message: str, key: str | None = None) -> Any:
        line = (
            self.lines.key(self.kind, self.index, key)
            if key
            else self.lines.table(self.kind, self.index)
        )
        raise TopologyError(f"{self.source}:{line}: {message}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        self.used.add(key)
        if key not in self.table:
            if default is ...:
                self.fail(f"[{self.kind}] needs '{key}'")
            return default
        value = self.table[key]
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            self.fail(f"'{key}' must be {_kind_name(kind)}, not a boolean", key)
        if not isinstance(value, kind):
            self.fail(f"'{key}' must be {_kind_name(kind)}, not {type(value).__name__}", key)
        return value

    def number(
        self, key: str, default: Any = ..., low: float | None = None, high: float | None = None
    ) -> float:
        value = float(self.get(key, (int, float), default))
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = (
                f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
            )
            self.fail(f"'{key}' = {value} is outside {bounds}", key)
        return value

    def name(self, key: str = "name") -> str:
        value: str = self.get(key, str)
        if not _NAME.match(value):
            self.fail(
                f"'{key}' = {value!r}: use lower-case letters, digits, '-' or '_' (max 31)", key
            )
        return value

    def address(self, key: str, default: Any = ...) -> ipaddress.IPv4Address:
        text = self.get(key, str, default)
        try:
            return ipaddress.IPv4Address(text)
        except ValueError:
            return self.fail(f"'{key}' = {text!r} is not an IPv4 address", key)  # type: ignore[no-any-return]

    def network(self, key: str, default: Any = ...) -> ipaddress.IPv4Network | None:
        text = self.get(key, str, default)
        if text is None:
            return None
        try:
            return ipaddress.IPv4Network(text, strict=True)
        except ValueError as exc:
            return self.fail(f"'{key}' = {text!r}: {exc}", key)  # type: ignore[no-any-return]

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            self.fail(f"unknown key '{unknown[0]}' in [{self.kind}]", unknown[0])


def _private_ranges(reader: _Reader) -> str:
    from manycast.naming import AddressPlan, NamingError

    text: str = reader.get("private_ranges", str, "232.0.0.0/5")
    try:
        AddressPlan.from_text(text)
    except NamingError as exc:
        reader.fail(f"'private_ranges': {exc}", "private_ranges")
    return text


def _public_key(reader: _Reader) -> bytes | None:
    text = reader.get("public_key", str, None)
    if text is None:
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        reader.fail("'public_key' must be the base64 of a 32-byte Ed25519 key", "public_key")
    return raw


def _host_port(reader: _Reader, key: str) -> tuple[str, int] | None:
    text = reader.get(key, str, None)
    if text is None:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        reader.fail(f"'{key}' = {text!r}: expected HOST:PORT", key)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        reader.fail(f"'{key}' = {text!r}: {host!r} is not an IP address", key)
    return host, int(port)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {
        int: "a number",
        float: "a number",
        str: "a string",
        bool: "true or false",
        list: "a list",
        dict: "a table",
    }
    return " or ".join(sorted({names.get(k, k.__name__) for k in kinds}))


def load(path: str | Path) -> Topology:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TopologyError(f"{path}: cannot read: {exc.strerror}") from None
    return loads(text, str(path))


def loads(text: str, source: str = "<topology>") -> Topology:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TopologyError(f"{source}: {exc}") from None
    return _Compiler(source, _Lines(text), data).compile()


class _Compiler:
    def __init__(self, source: str, lines: _Lines, data: dict[str, Any]):
        self.source, self.lines, self.data = source, lines, data

    def fail(self, message: str, line: int = 0) -> Any:
        where = f"{self.source}:{line}" if line else self.source
        raise TopologyError(f"{where}: {message}")

    def tables(self, kind: str) -> Iterator[_Reader]:
        items = self.data.get(kind, [])
        if not isinstance(items, list):
            self.fail(
                f"'{kind}' must be written [[{kind}]] (an array of tables)", self.lines.table(kind)
            )
        for index, item in enumerate(items):
            yield _Reader(self.source, self.lines, kind, index, item)

    def compile(self) -> Topology:
        known = {"pool", "router", "server", "clients", "link", "scenario", "run"}
        for key in self.data:
            if key not in known:
                self.fail(
                    f"unknown section '{key}' (expected one of {', '.join(sorted(known))})",
                    self.lines.table(key) or self.lines.table(key, 0),
                )
        pool = self.pool()
        names: dict[str, str] = {}

        def claim(name: str, reader: _Reader) -> None:
            if name in names:
                reader.fail(f"name {name!r} is already used by a {names[name]}", "name")
            names[name] = reader.kind

        routers: dict[str, RouterSpec] = {}
        for r in self.tables("router"):
            name = r.name()
            claim(name, r)
            routers[name] = RouterSpec(name)
            r.done()
        if not routers:
            self.fail("a topology needs at least one [[router]]")

        servers: dict[str, ServerSpec] = {}
        server_address: dict[str, ipaddress.IPv4Network | None] = {}
        for s in self.tables("server"):
            name = s.name()
            claim(name, s)
            router = s.get("router", str)
            if router not in routers:
                s.fail(f"server {name}: no router named {router!r}", "router")
            servers[name] = ServerSpec(
                name,
                router,
                s.number("weight", 1.0, low=0.0),
                s.get("standby", bool, False),
                s.get("authorized", bool, True),
            )
            server_address[name] = s.network("subnet", None)
            s.done()
        if not any(not s.standby for s in servers.values()):
            self.fail("a topology needs at least one [[server]] that is not on standby")

        clients: dict[str, ClientSpec] = {}
        lans: list[tuple[str, str, ipaddress.IPv4Network, list[str], float, float, int]] = []
        for c in self.tables("clients"):
            group = c.name()
            claim(group, c)
            router = c.get("router", str)
            if router not in routers:
                c.fail(f"clients {group}: no router named {router!r}", "router")
            count_value = c.number("count", 1, low=1, high=65000)
            if count_value != int(count_value):
                c.fail(f"'count' = {count_value} must be a whole number", "count")
            count = int(count_value)
            subnet = c.network("subnet")
            assert subnet is not None
            stride = int(c.number("stride", 1, low=1, high=65536))
            authorized = c.get("authorized", bool, True)
            if subnet.num_addresses - 2 < count * stride + 1:
                c.fail(f"subnet {subnet} is too small for a router and {count} clients", "subnet")
            rate = c.number("rate", 2.0, low=0.0, high=10000.0)
            delay = c.number("delay_ms", 1.0, low=0.0, high=10000.0) / 1000
            loss = c.number("loss", 0.0, low=0.0, high=0.99)
            members = [f"{group}{i}" for i in range(1, count + 1)]
            for member in members:
                if member in names:
                    c.fail(f"client name {member!r} clashes with a {names[member]}", "name")
                names[member] = "client"
                clients[member] = ClientSpec(member, group, router, rate, authorized)
            lans.append((group, router, subnet, members, delay, loss, stride))
            c.done()

        router_links: list[tuple[str, str, float, float, ipaddress.IPv4Network | None, int]] = []
        for link in self.tables("link"):
            between = link.get("between", list)
            if len(between) != 2 or not all(isinstance(n, str) for n in between):
                link.fail("'between' must name two routers", "between")
            a, b = between
            for n in (a, b):
                if n not in routers:
                    link.fail(
                        f"link: {n!r} is not a router (servers and clients attach with 'router')",
                        "between",
                    )
            if a == b:
                link.fail("a link needs two different routers", "between")
            delay = link.number("delay_ms", 1.0, low=0.0, high=10000.0) / 1000
            loss = link.number("loss", 0.0, low=0.0, high=0.99)
            router_links.append(
                (
                    a,
                    b,
                    delay,
                    loss,
                    link.network("subnet", None),
                    self.lines.table("link", len(router_links)),
                )
            )
            link.done()

        scenario = self.scenario(servers, clients, lans)
        run = self.data.get("run", {})
        run_reader = _Reader(self.source, self.lines, "run", None, run)
        duration = run_reader.number("duration", 20.0, low=0.1, high=86400.0)
        hosts_table = run_reader.get("hosts", dict, {})
        run_reader.done()
        hosts = {}
        for node, host in hosts_table.items():
            if node not in names or not isinstance(host, str):
                run_reader.fail(
                    f"[run] hosts: {node!r} must name a node and a host string", "hosts"
                )
            hosts[node] = host

        return self.addresses(
            pool,
            routers,
            servers,
            clients,
            lans,
            router_links,
            server_address,
            scenario,
            duration,
            hosts,
        )

    def pool(self) -> PoolSpec:
        p = _Reader(self.source, self.lines, "pool", None, self.data.get("pool", {}))
        name = p.get("name", str, "service.manycast.test")
        group = p.address("group", "232.1.1.1")
        if not group.is_multicast:
            p.fail(f"group {group} is not a multicast address", "group")
        control = p.address("control_group", "239.255.77.1")
        if not control.is_multicast:
            p.fail(f"control_group {control} is not a multicast address", "control_group")
        if control == group:
            p.fail("control_group must differ from group", "control_group")
        port = int(p.number("port", 7000, low=1, high=65535))
        control_port = int(p.number("control_port", 7946, low=1, high=65535))
        try:
            space = AddressSpace.create(
                p.get("space", str, "0.0.0.0/0"),
                int(p.number("index_bits", 16, low=1, high=24)),
                p.get("index", str, "low"),
            )
        except SpaceError as exc:
            p.fail(str(exc), "space")
        if space.family != 4:
            p.fail("the live pool serves IPv4 clients", "space")
        policy = p.get("policy", str, "equal")
        if policy not in POLICIES:
            p.fail(f"policy {policy!r}: expected one of {', '.join(POLICIES)}", "policy")
        technique = p.get("technique", str, "R1").upper()
        if technique not in TECHNIQUES:
            p.fail(f"technique {technique!r}: expected one of {', '.join(TECHNIQUES)}", "technique")
        pool = PoolSpec(
            name=name,
            group=group,
            port=port,
            control_group=control,
            control_port=control_port,
            space=space,
            policy=policy,
            portions=int(p.number("portions", 30, low=1, high=space.buckets)),
            technique=technique,
            close_after_transaction=p.get("close_after_transaction", bool, False),
            heartbeat_s=p.number("heartbeat_ms", 100, low=1, high=60000) / 1000,
            heartbeat_misses=int(p.number("heartbeat_misses", 3, low=1, high=100)),
            report_interval_s=p.number("report_interval_ms", 1000, low=10, high=600000) / 1000,
            private=p.get("private", bool, False),
            key_file=p.get("key_file", str, None),
            dns=_host_port(p, "dns"),
            private_ranges=_private_ranges(p),
            public_key=_public_key(p),
            rebalance_above=p.number("rebalance_above", 0.0, low=0.0, high=100.0),
            rebalance_target=p.number("rebalance_target", 1.1, low=1.0, high=100.0),
            rebalance_hold_s=p.number("rebalance_hold_ms", 3000, low=0, high=3600000) / 1000,
        )
        if pool.private:
            from manycast.naming import AddressPlan

            plan = AddressPlan.from_text(pool.private_ranges)
            for key, address in (("group", pool.group), ("control_group", pool.control_group)):
                if not plan.is_private(address):
                    p.fail(
                        f"a private pool's {key} {address} is outside the private ranges ({plan})",
                        key,
                    )
        if pool.rebalance_above and pool.rebalance_above <= pool.rebalance_target:
            p.fail("rebalance_above must exceed rebalance_target (hysteresis)", "rebalance_above")
        p.done()
        return pool

    def scenario(
        self, servers: dict[str, ServerSpec], clients: dict[str, ClientSpec], lans: list[Any]
    ) -> list[Step]:
        steps: list[Step] = []
        groups = {lan[0] for lan in lans}
        for index, s in enumerate(self.tables("scenario")):
            at = s.number("at", low=0.0)
            action = s.get("action", str)
            line = self.lines.table("scenario", index)
            args: dict[str, Any] = {}
            if action not in ACTIONS:
                s.fail(f"action {action!r}: expected one of {', '.join(ACTIONS)}", "action")
            if action in ("set_share", "kill", "add"):
                server = s.get("server", str)
                if server not in servers:
                    s.fail(f"no server named {server!r}", "server")
                args["server"] = server
                if action == "set_share":
                    share = s.number("share", low=0.0, high=1.0)
                    args["share"] = Fraction(share).limit_denominator(1_000_000)
                if action == "add" and not servers[server].standby:
                    s.fail(
                        f"server {server} is not on standby (set standby = true to add it later)",
                        "server",
                    )
            elif action == "client_rate":
                group = s.get("clients", str)
                if group not in groups:
                    s.fail(f"no [[clients]] group named {group!r}", "clients")
                args["clients"] = group
                args["rate"] = s.number("rate", low=0.0, high=10000.0)
            elif action == "rebalance":
                args["target"] = s.number("target", 1.1, low=1.0, high=100.0)
            s.done()
            steps.append(Step(at, action, args, line))
        return sorted(steps, key=lambda step: step.at)

    def addresses(
        self,
        pool: PoolSpec,
        routers: dict[str, RouterSpec],
        servers: dict[str, ServerSpec],
        clients: dict[str, ClientSpec],
        lans: list[Any],
        router_links: list[Any],
        server_subnets: dict[str, ipaddress.IPv4Network | None],
        scenario: list[Step],
        duration: float,
        hosts: dict[str, str],
    ) -> Topology:
        interfaces: dict[str, dict[str, Interface]] = {
            n: {} for n in [*routers, *servers, *clients]
        }
        links: dict[str, LinkSpec] = {}
        graph: dict[str, list[tuple[str, float, str]]] = {
            r: [] for r in routers
        }  # router -> (peer, cost, link)
        used: list[ipaddress.IPv4Network] = []
        router_ifaces: dict[str, set[str]] = {r: set() for r in routers}

        def take(network: ipaddress.IPv4Network, line: int) -> ipaddress.IPv4Network:
            if network.num_addresses < 4:
                self.fail(f"subnet {network} is too small: a link needs at least a /30", line)
            if network.is_multicast:
                self.fail(f"subnet {network} is multicast: hosts need unicast addresses", line)
            for other in used:
                if network.overlaps(other):
                    self.fail(f"subnet {network} overlaps {other}", line)
            used.append(network)
            return network

        pool_of = {
            "router": iter(ipaddress.IPv4Network("10.255.0.0/16").subnets(new_prefix=30)),
            "server": iter(ipaddress.IPv4Network("10.254.0.0/16").subnets(new_prefix=30)),
        }

        def next_free(kind: str) -> ipaddress.IPv4Network:
            for candidate in pool_of[kind]:
                if not any(candidate.overlaps(u) for u in used):
                    return candidate
            return self.fail(f"ran out of automatic {kind} link subnets")  # type: ignore[no-any-return]

        def attach(
            node: str, link: str, address: ipaddress.IPv4Address, network: ipaddress.IPv4Network
        ) -> Attachment:
            iface = f"eth{len(interfaces[node])}"
            interfaces[node][iface] = Interface(iface, link, address, network)
            return Attachment(node, iface, int(address))

        for a, b, delay, loss, subnet, line in router_links:
            network = take(subnet, line) if subnet else take(next_free("router"), line)
            hosts_iter = network.hosts()
            name = f"{a}-{b}"
            if name in links or f"{b}-{a}" in links:
                self.fail(f"routers {a} and {b} are linked twice", line)
            att_a = attach(a, name, next(hosts_iter), network)
            att_b = attach(b, name, next(hosts_iter), network)
            router_ifaces[a].add(att_a.iface)
            router_ifaces[b].add(att_b.iface)
            links[name] = LinkSpec(name, (att_a, att_b), delay, loss)
            graph[a].append((b, delay + 1e-6, name))
            graph[b].append((a, delay + 1e-6, name))

        gateways: dict[str, tuple[str, ipaddress.IPv4Address]] = {}
        for server in servers.values():
            subnet = server_subnets[server.name]
            line = self.lines.key("server", list(servers).index(server.name), "subnet")
            network = take(subnet, line) if subnet else take(next_free("server"), line)
            hosts_iter = network.hosts()
            name = f"{server.router}-{server.name}"
            router_address = next(hosts_iter)
            att_r = attach(server.router, name, router_address, network)
            att_s = attach(server.name, name, next(hosts_iter), network)
            links[name] = LinkSpec(name, (att_r, att_s), 0.0005)
            gateways[server.name] = (att_s.iface, router_address)

        for group, router, subnet, members, delay, loss, stride in lans:
            network = take(
                subnet, self.lines.key("clients", [lan[0] for lan in lans].index(group), "subnet")
            )
            router_address = network.network_address + 1
            name = f"{router}-{group}"
            attachments = [attach(router, name, router_address, network)]
            for index, member in enumerate(members):
                attachment = attach(member, name, router_address + 1 + index * stride, network)
                attachments.append(attachment)
                gateways[member] = (attachment.iface, router_address)
            links[name] = LinkSpec(name, tuple(attachments), delay, loss)

        for router in routers:
            reachable = self.reachable(router, graph)
            if len(reachable) != len(routers):
                missing = sorted(set(routers) - reachable)
                self.fail(f"router {router} cannot reach {', '.join(missing)}: add [[link]]s")
        routes = {r: self.routes(r, routers, graph, interfaces, links) for r in routers}
        return Topology(
            self.source,
            pool,
            routers,
            servers,
            clients,
            links,
            interfaces,
            routes,
            gateways,
            router_ifaces,
            scenario,
            duration,
            hosts,
        )

    @staticmethod
    def reachable(start: str, graph: dict[str, list[tuple[str, float, str]]]) -> set[str]:
        seen, stack = {start}, [start]
        while stack:
            for peer, _, _ in graph[stack.pop()]:
                if peer not in seen:
                    seen.add(peer)
                    stack.append(peer)
        return seen

    @staticmethod
    def routes(
        router: str,
        routers: Mapping[str, RouterSpec],
        graph: dict[str, list[tuple[str, float, str]]],
        interfaces: dict[str, dict[str, Interface]],
        links: dict[str, LinkSpec],
    ) -> list[Route]:
        """Dijkstra from `router`; every network gets the first hop of its shortest path."""
        first_hop: dict[str, tuple[str, ipaddress.IPv4Address] | None] = {router: None}
        dist = {router: 0.0}
        heap: list[tuple[float, str]] = [(0.0, router)]
        while heap:
            d, node = heapq.heappop(heap)
            if d > dist[node]:
                continue
            for peer, cost, link in sorted(graph[node]):
                nd = d + cost
                if nd < dist.get(peer, float("inf")):
                    dist[peer] = nd
                    if node == router:
                        mine = next(i for i in interfaces[router].values() if i.link == link)
                        theirs = next(i for i in interfaces[peer].values() if i.link == link)
                        first_hop[peer] = (mine.name, theirs.address)
                    else:
                        first_hop[peer] = first_hop[node]
                    heapq.heappush(heap, (nd, peer))
        table: list[Route] = []
        for other in sorted(routers, key=lambda r: dist[r]):
            for iface in interfaces[other].values():
                hop = first_hop[other]
                if hop is None:
                    table.append(Route(iface.network, iface.name, None))
                else:
                    table.append(Route(iface.network, hop[0], hop[1]))
        # A network seen from several routers keeps its nearest entry (the first).
        unique: dict[ipaddress.IPv4Network, Route] = {}
        for route in table:
            unique.setdefault(route.network, route)
        return sorted(unique.values(), key=lambda r: -r.network.prefixlen)


def builtin(name: str = "demo") -> Topology:
    """A topology shipped with manycast (`demo`)."""
    from importlib.resources import files

    resource = files("manycast").joinpath("topologies", f"{name}.toml")
    try:
        text = resource.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TopologyError(f"no built-in topology named {name!r}") from None
    return loads(text, f"<built-in {name}>")
