"""Checking a parsed topology file, section by section, and compiling it into a Topology."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import itertools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, NoReturn

from manycast.addressplan import DEFAULT_PRIVATE_RANGES, AddressPlan, NamingError
from manycast.policy import PolicyName
from manycast.protocol.tcp.config import CLIENT_REQUEST_TIMEOUT_S, CLIENT_RTO_MIN_S
from manycast.protocol.technique import Technique
from manycast.space import AddressSpace, SpaceError
from manycast.steps import (
    Action,
    Add,
    ClientRate,
    Drain,
    Kill,
    KillVipRouter,
    Move,
    Rebalance,
    SetShare,
    Step,
)
from manycast.topology.addressing import HostLink, Lan, RouterLink, Wiring, assign_addresses
from manycast.topology.coordination import Coordination, read_coordination, read_endpoints
from manycast.topology.families import (
    dual_groups,
    dual_vips,
    is_dual_stack,
    read_dual_spaces,
    refuse_for_dual_stack,
)
from manycast.topology.reader import Lines, TableReader, fail_at
from manycast.topology.routing import costs, hop_counts, reachable, routes
from manycast.topology.spec import (
    Approach,
    ClientSpec,
    PoolSpec,
    RouterSpec,
    ServerSpec,
    Topology,
    VipRouterSpec,
)

SECTIONS = ("pool", "router", "server", "vip_router", "clients", "link", "scenario", "run")


def compile_topology(source: str, text: str, data: dict[str, Any]) -> Topology:
    """Check `data` (parsed from `text`) and compile it; errors name `source` and a line."""
    return _Compiler(source, Lines(text), data).compile()


class _Compiler:
    def __init__(self, source: str, lines: Lines, data: dict[str, Any]):
        self.source, self.lines, self.data = source, lines, data
        self.names: dict[str, str] = {}  # every node or group name -> the table that made it

    def fail(self, message: str, line: int = 0) -> NoReturn:
        fail_at(self.source, line, message)

    def tables(self, kind: str) -> Iterator[TableReader]:
        items = self.data.get(kind, [])
        if not isinstance(items, list):
            self.fail(
                f"'{kind}' must be written [[{kind}]] (an array of tables)", self.lines.table(kind)
            )
        for index, item in enumerate(items):
            yield TableReader(self.source, self.lines, kind, index, item)

    def claim(self, name: str, reader: TableReader) -> None:
        if name in self.names:
            reader.fail(f"name {name!r} is already used by a {self.names[name]}", "name")
        self.names[name] = reader.kind

    def compile(self) -> Topology:
        for key in self.data:
            if key not in SECTIONS:
                self.fail(
                    f"unknown section '{key}' (expected one of {', '.join(sorted(SECTIONS))})",
                    self.lines.table(key) or self.lines.table(key, 0),
                )
        pool = read_pool(
            TableReader(self.source, self.lines, "pool", None, self.data.get("pool", {}))
        )
        self.family = pool.space.family
        # A dual-stack topology's links may name a subnet of either family.
        self.subnet_family = 0 if pool.dual else self.family
        routers = self.routers()
        servers, server_links = self.servers(routers, pool)
        vip_routers, vip_links = self.vip_routers(routers, pool)
        clients, lans = self.clients(routers)
        router_links = self.router_links(routers)
        scenario = read_scenario(
            self.tables("scenario"),
            servers,
            {lan.group for lan in lans},
            vip_routers,
            manycast=pool.vip is None,
        )
        duration, hosts, tcp_moves = self.run()
        # (A dual-stack manycast pool's connections move, each in its own family.)
        moves = tcp_moves or any(_moves_connections(s) for s in scenario)
        if pool.dual and pool.vip is not None and moves:
            self.fail(
                "live TCP connections that move (the kernel lab's tcp_moves, 'move' steps,"
                " move = true) are not supported yet for dual-stack VIP pools",
                self.lines.table("run"),
            )
        wiring = assign_addresses(
            list(routers),
            router_links,
            [*server_links, *vip_links],
            lans,
            self.fail,
            self.family,
            dual=pool.dual,
        )
        for router in routers:
            seen = reachable(router, wiring.graph)
            if len(seen) != len(routers):
                missing = sorted(set(routers) - seen)
                self.fail(f"router {router} cannot reach {', '.join(missing)}: add [[link]]s")
        self.check_vip(pool, wiring)
        return Topology(
            source=self.source,
            pool=pool,
            routers=routers,
            servers=servers,
            clients=clients,
            links=wiring.links,
            interfaces=wiring.interfaces,
            routes={r: routes(r, routers, wiring.graph, wiring.interfaces) for r in routers},
            gateways=wiring.gateways,
            gateways6=wiring.gateways6,
            router_ifaces=wiring.router_ifaces,
            scenario=scenario,
            duration=duration,
            hosts=hosts,
            tcp_moves=tcp_moves or any(_moves_connections(step) for step in scenario),
            vip_routers=vip_routers,
            router_hops={r: hop_counts(r, wiring.graph) for r in routers},
            router_costs={r: costs(r, wiring.graph) for r in routers},
        )

    def routers(self) -> dict[str, RouterSpec]:
        routers: dict[str, RouterSpec] = {}
        for r in self.tables("router"):
            name = r.name()
            self.claim(name, r)
            routers[name] = RouterSpec(name)
            r.done()
        if not routers:
            self.fail("a topology needs at least one [[router]]")
        return routers

    def attached(self, t: TableReader, routers: Mapping[str, RouterSpec]) -> HostLink:
        """A server's or VIP router's name, router and own link (the table's `name`,
        `router` and optional `subnet`)."""
        name = t.name()
        self.claim(name, t)
        router = t.get("router", str)
        if router not in routers:
            t.fail(f"{t.kind} {name}: no router named {router!r}", "router")
        subnet = t.network("subnet", None, self.subnet_family)
        return HostLink(name, router, subnet, t.line("subnet"))

    def servers(
        self, routers: Mapping[str, RouterSpec], pool: PoolSpec
    ) -> tuple[dict[str, ServerSpec], list[HostLink]]:
        servers: dict[str, ServerSpec] = {}
        links: list[HostLink] = []
        for s in self.tables("server"):
            link = self.attached(s, routers)
            servers[link.node] = ServerSpec(
                link.node,
                link.router,
                s.number("weight", 1.0, low=0.0),
                s.get("standby", bool, False),
                s.get("authorized", bool, True),
                self.server_etcd(s, pool),
            )
            links.append(link)
            s.done()
        if not any(not s.standby for s in servers.values()):
            self.fail("a topology needs at least one [[server]] that is not on standby")
        return servers, links

    def server_etcd(self, s: TableReader, pool: PoolSpec) -> tuple[str, ...]:
        """A server's own etcd client URLs (the members near it), if it names them."""
        if "etcd" not in s.table:
            return ()
        if pool.coordination is not Coordination.ETCD:
            s.fail("a server's 'etcd' is for [pool] coordination = \"etcd\"", "etcd")
        return read_endpoints(s)

    def vip_routers(
        self, routers: Mapping[str, RouterSpec], pool: PoolSpec
    ) -> tuple[dict[str, VipRouterSpec], list[HostLink]]:
        """The `[[vip_router]]` tables: only in a VIP pool, and at least one there."""
        vip_routers: dict[str, VipRouterSpec] = {}
        links: list[HostLink] = []
        for v in self.tables("vip_router"):
            if pool.approach is not Approach.VIP:
                v.fail('[[vip_router]] needs [pool] approach = "vip" (this pool is manycast)')
            link = self.attached(v, routers)
            vip_routers[link.node] = VipRouterSpec(link.node, link.router)
            links.append(link)
            v.done()
        if pool.approach is Approach.VIP and not vip_routers:
            self.fail(
                "a VIP pool needs at least one [[vip_router]] (two to survive one's death)",
                self.lines.key("pool", None, "approach"),
            )
        return vip_routers, links

    def check_vip(self, pool: PoolSpec, wiring: Wiring) -> None:
        """A VIP is nobody's interface address: it must lie outside every link's subnet."""
        if pool.vip is None:
            return
        vips = (pool.vip,) if pool.group6 is None else (pool.vip, pool.group6)
        for interfaces in wiring.interfaces.values():
            for iface in interfaces.values():
                for vip, network in itertools.product(vips, (iface.network, iface.network6)):
                    if network is not None and vip in network:
                        self.fail(
                            f"vip {vip} is inside subnet {network} (link {iface.link}):"
                            " the VIP must be no interface's address",
                            self.lines.key("pool", None, "vip"),
                        )

    def clients(self, routers: Mapping[str, RouterSpec]) -> tuple[dict[str, ClientSpec], list[Lan]]:
        clients: dict[str, ClientSpec] = {}
        lans: list[Lan] = []
        for c in self.tables("clients"):
            group = c.name()
            self.claim(group, c)
            router = c.get("router", str)
            if router not in routers:
                c.fail(f"clients {group}: no router named {router!r}", "router")
            count = c.whole("count", 1, low=1, high=65000)
            # An IPv6 LAN may be left to the address plan (a /64 of 2001:db8::/32); a
            # dual-stack topology's LAN is of its subnet's family.
            automatic = self.family == 6 or self.subnet_family == 0
            subnet = c.network("subnet", None if automatic else ..., self.subnet_family)
            stride = int(c.number("stride", 1, low=1, high=65536))
            authorized = c.get("authorized", bool, True)
            if subnet is not None and subnet.num_addresses - 2 < count * stride + 1:
                c.fail(f"subnet {subnet} is too small for a router and {count} clients", "subnet")
            rate = c.number("rate", 2.0, low=0.0, high=10000.0)
            per_connection = c.whole("requests_per_connection", 0, low=0, high=1_000_000)
            delay = c.number("delay_ms", 1.0, low=0.0, high=10000.0) / 1000
            loss = c.number("loss", 0.0, low=0.0, high=0.99)
            # false: clients without the extension (plain SYNs; never redirected, Fig 20)
            dynamic = c.get("dynamic_destination", bool, True)
            thin = c.get("thin_stream", bool, False)
            # Linux's bounds on TCP_RTO_MAX_MS end at 120 s; a cap below the clients'
            # RTO floor could not be kept.
            rto_max = None
            if "rto_max_ms" in c.table:
                rto_max = c.number("rto_max_ms", low=CLIENT_RTO_MIN_S * 1000, high=120_000) / 1000
            retries = c.whole("max_retries", low=1, high=100) if "max_retries" in c.table else None
            deadline_default = CLIENT_REQUEST_TIMEOUT_S * 1000
            deadline = c.number("deadline_ms", deadline_default, low=10, high=600_000)
            abandon = None
            if "abandon_after_ms" in c.table:
                abandon = c.number("abandon_after_ms", low=10, high=600_000)
                if abandon < deadline:
                    c.fail(
                        f"abandon_after_ms {abandon:g} is shorter than deadline_ms {deadline:g}:"
                        " a connection cannot be given up before its request fails",
                        "abandon_after_ms",
                    )
            members = tuple(f"{group}{i}" for i in range(1, count + 1))
            for member in members:
                if member in self.names:
                    c.fail(f"client name {member!r} clashes with a {self.names[member]}", "name")
                self.names[member] = "client"
                clients[member] = ClientSpec(
                    member,
                    group,
                    router,
                    rate,
                    authorized,
                    per_connection,
                    dynamic,
                    thin,
                    rto_max,
                    retries,
                    deadline / 1000,
                    None if abandon is None else abandon / 1000,
                )
            lans.append(Lan(group, router, subnet, members, delay, loss, stride, c.line("subnet")))
            c.done()
        return clients, lans

    def router_links(self, routers: Mapping[str, RouterSpec]) -> list[RouterLink]:
        links: list[RouterLink] = []
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
            subnet = link.network("subnet", None, self.subnet_family)
            links.append(RouterLink(a, b, delay, loss, subnet, link.line()))
            link.done()
        return links

    def run(self) -> tuple[float, dict[str, str], bool]:
        """The `[run]` table: how long, which nodes run on other hosts, and whether the
        kernel lab runs live TCP connections that `move` and `drain` steps move."""
        run = TableReader(self.source, self.lines, "run", None, self.data.get("run", {}))
        duration = run.number("duration", 20.0, low=0.1, high=86400.0)
        hosts_table = run.get("hosts", dict, {})
        tcp_moves: bool = run.get("tcp_moves", bool, False)
        run.done()
        hosts = {}
        for node, host in hosts_table.items():
            if node not in self.names or not isinstance(host, str):
                run.fail(f"[run] hosts: {node!r} must name a node and a host string", "hosts")
            hosts[node] = host
        return duration, hosts, tcp_moves


# -- [pool] --------------------------------------------------------------------


def read_pool(p: TableReader) -> PoolSpec:
    """The `[pool]` table, every key checked (group and control group multicast and
    distinct, a private pool's groups inside its private ranges, hysteresis; a VIP
    pool's vip unicast, its group the vip)."""
    name = p.get("name", str, "service.manycast.test")
    # A dual-stack pool: `space` and `group` list one of each family (families.py).
    dual = is_dual_stack(p)
    space, space6 = read_dual_spaces(p) if dual else (_space(p), None)
    family = space.family
    if dual:
        refuse_for_dual_stack(p)
    elif family == 6:
        _refuse_for_ipv6(p)
    approach, vip, vip6 = _approach(p, family, dual)
    group: ipaddress.IPv4Address | ipaddress.IPv6Address
    group6 = None
    if space6 is not None and vip is None:
        group, group6 = dual_groups(p)
    elif vip is None:
        group = p.address("group", DEFAULT_GROUP[family], family)
        if not group.is_multicast:
            p.fail(f"group {group} is not a multicast address", "group")
        if family == 6 and int(group) >> 96 & 0xFFF0FFFF != 0xFF300000:
            p.fail(
                f"group {group} is not in ff3x::/32, IPv6's source-specific range"
                " (RFC 4607): the servers' masked joins are source-specific",
                "group",
            )
    else:
        if "group" in p.table:
            p.fail("a VIP pool's clients send to its vip: leave out 'group'", "group")
        group, group6 = vip, vip6  # the service address(es), for code that reads pool.group
    control = p.address("control_group", DEFAULT_CONTROL_GROUP[family], family)
    if not control.is_multicast:
        p.fail(f"control_group {control} is not a multicast address", "control_group")
    if family == 6 and int(control) >> 112 & 0xF <= 2:
        p.fail(
            f"control_group {control} is link-local: the servers' channel crosses routers",
            "control_group",
        )
    if control in (group, group6):
        p.fail("control_group must differ from group", "control_group")
    port = int(p.number("port", 7000, low=1, high=65535))
    control_port = int(p.number("control_port", 7946, low=1, high=65535))
    policy_text = p.get("policy", str, "equal")
    try:
        policy = PolicyName(policy_text)
    except ValueError:
        p.fail(f"policy {policy_text!r}: expected one of {', '.join(PolicyName)}", "policy")
    technique_text = p.get("technique", str, "R1").upper()
    try:
        technique = Technique(technique_text)
    except ValueError:
        p.fail(f"technique {technique_text!r}: expected one of {', '.join(Technique)}", "technique")
    coordination = read_coordination(p, vip is not None)
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
        startup_grace=p.number("startup_grace_ms", 1000, low=0, high=600000) / 1000,
        report_interval_s=p.number("report_interval_ms", 1000, low=10, high=600000) / 1000,
        register_interval_s=p.number("register_interval_ms", 10000, low=10, high=600000) / 1000,
        private=p.get("private", bool, False),
        key_file=p.get("key_file", str, None),
        dns=_host_port(p, "dns"),
        private_ranges=_private_ranges(p),
        public_key=_public_key(p),
        rebalance_above=p.number("rebalance_above", 0.0, low=0.0, high=100.0),
        rebalance_target=p.number("rebalance_target", 1.1, low=1.0, high=100.0),
        rebalance_hold_s=p.number("rebalance_hold_ms", 3000, low=0, high=3600000) / 1000,
        approach=approach,
        vip=vip,
        redirect_above=_redirect_above(p, technique, approach),
        coordination=coordination.kind,
        etcd=coordination.etcd,
        lease_s=coordination.lease_s,
        membership=coordination.membership.value,
        group6=group6,
        space6=space6,
    )
    if pool.private:
        plan = AddressPlan.from_text(pool.private_ranges)
        groups = [("control_group", pool.control_group)]
        if vip is None:  # a VIP pool's only group is its control channel
            groups.insert(0, ("group", pool.group))
        if pool.group6 is not None:  # a dual-stack pool's IPv6 group
            groups.insert(1, ("group", pool.group6))
        for key, address in groups:
            if not plan.is_private(address):
                p.fail(
                    f"a private pool's {key} {address} is outside the private ranges ({plan})",
                    key,
                )
    if pool.rebalance_above and pool.rebalance_above <= pool.rebalance_target:
        p.fail("rebalance_above must exceed rebalance_target (hysteresis)", "rebalance_above")
    p.done()
    return pool


# The pool's groups unless given, by family: the seed's private-range group and an
# administratively scoped control channel; for IPv6, a group in the source-specific
# range ff3e::/32 (global scope) and a site-local control channel.
DEFAULT_GROUP = {4: "232.1.1.1", 6: "ff3e::8000:1"}
DEFAULT_CONTROL_GROUP = {4: "239.255.77.1", 6: "ff15::77:1"}


def _space(p: TableReader) -> AddressSpace:
    """The clients' address space: `space` (a prefix; IPv6 when it is, or when it is
    left out and `group`, or a VIP pool's `vip`, is IPv6), `index_bits` and `index`."""
    service = p.table.get("group", p.table.get("vip"))
    default = "::/0" if isinstance(service, str) and ":" in service else "0.0.0.0/0"
    try:
        return AddressSpace.create(
            p.get("space", str, default),
            int(p.number("index_bits", 16, low=1, high=24)),
            p.get("index", str, "low"),
        )
    except SpaceError as exc:
        p.fail(str(exc), "space")


# What an IPv6 pool cannot have yet: (key, the value that asks for it, what it is).
_NOT_YET_FOR_IPV6: tuple[tuple[str, str, str], ...] = ()


def _refuse_for_ipv6(p: TableReader) -> None:
    """Fail on the first key of an IPv6 pool that asks for what IPv6 pools lack."""
    for key, value, what in _NOT_YET_FOR_IPV6:
        if key not in p.table:
            continue
        given = p.table[key]
        if isinstance(given, str) and given.upper() == value.upper():
            p.fail(f"{what} is not supported yet for IPv6 (the pool's space is IPv6)", key)


def _redirect_above(p: TableReader, technique: Technique, approach: Approach) -> float:
    """Technique D (Fig 20-21) is a manycast pool's; its servers pass new connections
    on above `redirect_above` times the mean load (1.5 unless given; 0: never)."""
    if technique is not Technique.D:
        if "redirect_above" in p.table:
            p.fail("'redirect_above' is for technique D", "redirect_above")
        return 0.0
    if approach is not Approach.MANYCAST:
        p.fail("technique D moves a manycast pool's connections, not a VIP pool's", "technique")
    above = p.number("redirect_above", 1.5, low=0.0, high=100.0)
    if 0 < above <= 1:
        p.fail("'redirect_above' must exceed 1 (the mean itself), or be 0", "redirect_above")
    return above


def _approach(
    p: TableReader, family: int, dual: bool
) -> tuple[
    Approach, ipaddress.IPv4Address | ipaddress.IPv6Address | None, ipaddress.IPv6Address | None
]:
    """`approach`, `vip` and a dual-stack VIP pool's IPv6 VIP: a VIP pool needs a
    unicast vip of the pool's `family` (a dual-stack one, one of each family), a
    manycast pool has none."""
    text = p.get("approach", str, Approach.MANYCAST.value)
    try:
        approach = Approach(text)
    except ValueError:
        p.fail(f"approach {text!r}: expected one of {', '.join(Approach)}", "approach")
    if approach is Approach.MANYCAST:
        if "vip" in p.table:
            p.fail("'vip' is for a VIP pool: set approach = \"vip\"", "vip")
        return approach, None, None
    if "vip" not in p.table:
        p.fail(
            "approach = \"vip\" needs 'vip', the pool's well-published unicast address",
            "approach",
        )
    vip, vip6 = dual_vips(p) if dual else (p.address("vip", ..., family), None)
    for address in (vip, vip6):
        if address is not None:
            _check_unicast_vip(p, address)
    return approach, vip, vip6


def _check_unicast_vip(p: TableReader, vip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    if vip.is_multicast:
        p.fail(f"vip {vip} is multicast: the VIP is a unicast address", "vip")
    if vip.is_unspecified or vip.is_loopback or vip == ipaddress.IPv4Address("255.255.255.255"):
        p.fail(f"vip {vip} cannot be a host's address", "vip")
    if vip.version == 6 and vip.is_link_local:
        p.fail(f"vip {vip} is link-local: the VIP is routed across the network", "vip")


def _private_ranges(reader: TableReader) -> str:
    text: str = reader.get("private_ranges", str, DEFAULT_PRIVATE_RANGES)
    try:
        AddressPlan.from_text(text)
    except NamingError as exc:
        reader.fail(f"'private_ranges': {exc}", "private_ranges")
    return text


def _public_key(reader: TableReader) -> bytes | None:
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


def _host_port(reader: TableReader, key: str) -> tuple[str, int] | None:
    """`HOST:PORT`, an IPv6 host in brackets (`[::1]:5353`) as in a URL."""
    text = reader.get(key, str, None)
    if text is None:
        return None
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        reader.fail(f"'{key}' = {text!r}: expected HOST:PORT or [IPv6]:PORT", key)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        reader.fail(f"'{key}' = {text!r}: {host!r} is not an IP address", key)
    return host, int(port)


# -- [[scenario]] ----------------------------------------------------------------


@dataclass(frozen=True)
class _Known:
    """What a step may name: the servers, the [[clients]] groups and the VIP routers;
    and whether the pool is a manycast pool (steps that move connections differ)."""

    servers: Mapping[str, ServerSpec]
    groups: set[str]
    vip_routers: Mapping[str, VipRouterSpec]
    manycast: bool = True


def _moves_connections(step: Step) -> bool:
    """Whether `step` moves live kernel TCP connections (the lab then runs them)."""
    return isinstance(step, Move) or bool(getattr(step, "move", False))


def _move_flag(s: TableReader, known: _Known) -> bool:
    """`move = true` on a set_share or rebalance: a manycast pool's clients whose
    portions change owner take their live TCP connections along."""
    move: bool = s.get("move", bool, False)
    if move and not known.manycast:
        s.fail(
            "move = true moves a manycast pool's clients with their portions; a VIP"
            " pool's flows keep their server when shares change: use a 'move' step",
            "move",
        )
    return move


def _server(s: TableReader, known: _Known) -> str:
    server: str = s.get("server", str)
    if server not in known.servers:
        s.fail(f"no server named {server!r}", "server")
    return server


def _set_share(s: TableReader, known: _Known, at: float, line: int) -> Step:
    server = _server(s, known)
    share = s.number("share", low=0.0, high=1.0)
    return SetShare(
        at=at,
        line=line,
        server=server,
        share=Fraction(share).limit_denominator(1_000_000),
        move=_move_flag(s, known),
    )


def _kill(s: TableReader, known: _Known, at: float, line: int) -> Step:
    return Kill(at=at, line=line, server=_server(s, known))


def _add(s: TableReader, known: _Known, at: float, line: int) -> Step:
    server = _server(s, known)
    if not known.servers[server].standby:
        s.fail(f"server {server} is not on standby (set standby = true to add it later)", "server")
    return Add(at=at, line=line, server=server)


def _client_rate(s: TableReader, known: _Known, at: float, line: int) -> Step:
    group: str = s.get("clients", str)
    if group not in known.groups:
        s.fail(f"no [[clients]] group named {group!r}", "clients")
    return ClientRate(at=at, line=line, clients=group, rate=s.number("rate", low=0.0, high=10000.0))


def _rebalance(s: TableReader, known: _Known, at: float, line: int) -> Step:
    target = s.number("target", 1.1, low=1.0, high=100.0)
    return Rebalance(at=at, line=line, target=target, move=_move_flag(s, known))


def _drain(s: TableReader, known: _Known, at: float, line: int) -> Step:
    server = _server(s, known)
    grace = s.number("grace", 2.0, low=0.0, high=3600.0)
    return Drain(at=at, line=line, server=server, grace=grace)


def _move(s: TableReader, known: _Known, at: float, line: int) -> Step:
    if known.manycast:
        s.fail(
            "a 'move' step is for a VIP pool: in a manycast pool a client's server is"
            " the owner of its portion, so its connections move when the allocation"
            " does: use a 'set_share' (or 'rebalance') step with move = true, or 'drain'",
            "action",
        )
    server = _server(s, known)
    to: str = s.get("to", str, "")
    if to and to not in known.servers:
        s.fail(f"no server named {to!r}", "to")
    if to == server:
        s.fail(f"a move goes from {server} to another server", "to")
    count = s.whole("count", 0, low=0, high=1_000_000)
    return Move(at=at, line=line, server=server, to=to, count=count)


def _kill_vip_router(s: TableReader, known: _Known, at: float, line: int) -> Step:
    vip_router: str = s.get("vip_router", str)
    if vip_router not in known.vip_routers:
        s.fail(f"no [[vip_router]] named {vip_router!r}", "vip_router")
    return KillVipRouter(at=at, line=line, vip_router=vip_router)


# How each action's table is read: a new kind of step adds one entry here.
STEP_READERS: dict[Action, Callable[[TableReader, _Known, float, int], Step]] = {
    Action.SET_SHARE: _set_share,
    Action.KILL: _kill,
    Action.ADD: _add,
    Action.REBALANCE: _rebalance,
    Action.CLIENT_RATE: _client_rate,
    Action.KILL_VIP_ROUTER: _kill_vip_router,
    Action.DRAIN: _drain,
    Action.MOVE: _move,
}


def read_scenario(
    tables: Iterator[TableReader],
    servers: Mapping[str, ServerSpec],
    groups: set[str],
    vip_routers: Mapping[str, VipRouterSpec],
    manycast: bool = True,
) -> list[Step]:
    """The `[[scenario]]` tables as typed steps, in time order (stable for equal times)."""
    known = _Known(servers, groups, vip_routers, manycast)
    steps: list[Step] = []
    for s in tables:
        at = s.number("at", low=0.0)
        action = s.get("action", str)
        try:
            reader = STEP_READERS[Action(action)]
        except ValueError:
            s.fail(f"action {action!r}: expected one of {', '.join(Action)}", "action")
        steps.append(reader(s, known, at, s.line()))
        s.done()
    return sorted(steps, key=lambda step: step.at)
