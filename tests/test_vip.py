"""The virtual-IP pool (seed Fig 17-19) end to end on the memory driver: each test is
named after the claim it shows and checks what a client sees. Each runs on an IPv4
and on an IPv6 network (an IPv6 VIP; labelled packets in MPLS-in-UDP over IPv6), and
most on a dual-stack one too (a VIP of each family, half the clients on an IPv4 LAN,
half on an IPv6 LAN, one allocation placing both families' flows)."""

from __future__ import annotations

import ipaddress
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import pytest

from manycast.protocol.client import Client
from manycast.protocol.dualstack import DualStackRouter, in_space
from manycast.protocol.router import Router
from manycast.protocol.server import Server
from manycast.protocol.vip import VipRouter
from manycast.protocol.vipdual import DualStackVipRouter
from manycast.runtime import PoolRun
from manycast.steps import Add, Kill, KillVipRouter, Rebalance, SetShare, Step
from manycast.topology import TopologyError, loads
from manycast.wire import control
from manycast.wire.ip import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    Address,
    UDPDatagram,
    make_packet,
    parse_packet,
)
from pooltools import table

DUAL = 46  # `family` of a dual-stack pool: a VIP of each family, a client LAN of each
FAMILIES = (4, 6)
family = pytest.mark.parametrize("family", FAMILIES)
# The tests a dual-stack pool runs too.
families = pytest.mark.parametrize("family", [4, 6, DUAL], ids=["4", "6", "dual"])
VIPS: dict[int, Address] = {
    4: ipaddress.IPv4Address("203.0.113.80"),
    6: ipaddress.IPv6Address("2001:db8:80::80"),
}
VIP = VIPS[4]
# The clients' LAN (None: the address plan gives an IPv6 one, a /64 of 2001:db8::/32).
LANS = {4: "10.1.0.0/24", 6: None}


def vip_toml(
    family: int = 4,
    *,
    servers: int = 4,
    standby: int = 0,
    clients: int = 24,
    rate: float = 4.0,
    per_connection: int = 3,
    vip_routers: Sequence[str] = ("core", "rs1"),
    pool: dict[str, Any] | None = None,
) -> str:
    """clients a1.. -- ra -- core -- rs1 (odd servers) / rs2 (even servers), with a VIP
    router on each router named in `vip_routers`; every address of `family` (DUAL: a
    dual-stack network, clients a1.. on an IPv4 LAN and b1.. on an IPv6 one, half each)."""
    settings: dict[str, Any] = {
        "approach": "vip",
        "vip": str(VIPS[family]) if family != DUAL else [str(VIPS[4]), str(VIPS[6])],
        "heartbeat_ms": 100,
        "heartbeat_misses": 3,
        "report_interval_ms": 500,
    }
    if family == DUAL:
        settings["space"] = ["0.0.0.0/0", "2001:db8::/32"]
    settings.update(pool or {})
    body = "".join(
        f"{k} = {v!r}\n".replace("'", '"') if isinstance(v, str) else f"{k} = {v}\n"
        for k, v in settings.items()
    )
    parts = ["[pool]\n" + body]
    parts += [table("router", name=n) for n in ("ra", "core", "rs1", "rs2")]
    for a, b, delay in (("ra", "core", 2), ("core", "rs1", 1), ("core", "rs2", 3)):
        parts.append(table("link", between=[a, b], delay_ms=delay))
    for index in range(1, servers + standby + 1):
        keys: dict[str, Any] = {"name": f"s{index}", "router": "rs1" if index % 2 else "rs2"}
        if index > servers:
            keys["standby"] = True
        parts.append(table("server", **keys))
    for index, router in enumerate(vip_routers, start=1):
        parts.append(table("vip_router", name=f"vr{index}", router=router))
    lans = [("a", LANS[4 if family == DUAL else family], clients)]
    if family == DUAL:  # the second half on an IPv6 LAN (the plan gives it a /64)
        lans = [("a", LANS[4], clients // 2), ("b", None, clients - clients // 2)]
    for name, subnet, count in lans:
        parts.append(
            table(
                "clients",
                name=name,
                count=count,
                router="ra",
                **({} if subnet is None else {"subnet": subnet}),
                rate=rate,
                requests_per_connection=per_connection,
            )
        )
    parts.append("[run]\nduration = 10\n")
    return "\n".join(parts)


@dataclass
class FlowLog:
    """Which server received each client flow's packets, and when."""

    servers: dict[tuple[str, int], set[str]] = field(default_factory=lambda: defaultdict(set))
    first_seen: dict[tuple[str, int], float] = field(default_factory=dict)

    def hook(self, run: PoolRun) -> None:
        names = {int(c.address): n for n, c in run.nodes.clients.items()}
        pool = run.topology.pool
        assert pool.vip is not None
        vips = {pool.vip} if pool.group6 is None else {pool.vip, pool.group6}
        for server in [*run.nodes.servers.values(), *run.nodes.standby.values()]:
            server.receive = self._server_hook(server, names, vips)  # type: ignore[method-assign]

    def _server_hook(
        self, server: Server, names: dict[int, str], vips: set[Address]
    ) -> Callable[..., None]:
        original = server.receive

        def receive(iface: str, packet: bytes, now: float) -> None:
            ip = parse_packet(packet)
            if ip.protocol == IPPROTO_TCP and ip.header.dst in vips:
                key = (names[int(ip.header.src)], int.from_bytes(ip.payload[:2], "big"))
                self.servers[key].add(server.name)
                self.first_seen.setdefault(key, now)
            original(iface, packet, now)

        return receive

    def split_flows(self) -> list[tuple[str, int]]:
        """Flows whose packets reached more than one server (goal: none)."""
        return [key for key, servers in self.servers.items() if len(servers) > 1]

    def since(self, t: float) -> dict[tuple[str, int], str]:
        return {k: next(iter(s)) for k, s in self.servers.items() if self.first_seen[k] >= t}


def start(text: str, seed: int = 1) -> tuple[PoolRun, FlowLog]:
    run = PoolRun(loads(text), "memory", seed=seed)
    log = FlowLog()
    log.hook(run)
    return run, log


def act(run: PoolRun, step: Step) -> None:
    run.network.call_at(run.now, lambda: run.engine.carry_out(step, run.now))


def failures(run: PoolRun) -> int:
    return sum(c.stats.requests_failed + c.stats.resets for c in run.nodes.clients.values())


def vip_router_repeats(run: PoolRun) -> int:
    return sum(v.stats.repeat_packets for v in run.nodes.vip_routers.values())


def owner_of(run: PoolRun, client: Client) -> str | None:
    """The client's owner in the pool's allocation (a dual-stack pool's IPv6 client: by
    the same buckets of the IPv6 space)."""
    server = next(s for n, s in run.nodes.servers.items() if n not in run.engine.dead)
    allocation = server.coordinator.allocation
    assert allocation is not None
    space6 = run.topology.pool.space6
    if space6 is not None and client.address.version == 6:
        allocation = in_space(allocation, space6)
    return allocation.owner(client.address)


def logics(router: Router) -> list[Router]:
    """A router's logic of each family (a dual-stack router's IPv4 and IPv6 ones)."""
    return [router, router.six] if isinstance(router, DualStackRouter) else [router]


def logic_for(router: Router, address: Address) -> Router:
    """The router's logic of `address`'s family."""
    if isinstance(router, DualStackRouter) and address.version == 6:
        return router.six
    return router


def server_addresses(server: Server) -> list[Address]:
    """A server's addresses, each the root of one of its trees (a dual-stack pool's
    server roots one in each family)."""
    return [server.address] if server.address6 is None else [server.address, server.address6]


def assert_every_family_served(run: PoolRun, summary: dict[str, Any]) -> None:
    """Every client answered at the end, clients of each of the pool's families among
    them, and each client answered during the run."""
    assert summary["clients_served_at_end"] == summary["clients"] == len(run.nodes.clients)
    by_family: dict[int, list[Client]] = defaultdict(list)
    for client in run.nodes.clients.values():
        by_family[client.address.version].append(client)
    assert sorted(by_family) == sorted(run.topology.pool.families)
    for clients in by_family.values():
        assert all(c.stats.requests_ok > 0 for c in clients)


# -- Fig 17: a tag-switched tree to each server ------------------------------------------


@families
def test_claim_15a_31_a_tag_switched_tree_reaches_each_server_from_every_router(
    family: int,
) -> None:
    run, _ = start(vip_toml(family))
    run.network.run_until(2.0)
    # A dual-stack pool's servers root a tree in each family, in its routers' logic of it.
    servers = {a: n for n, s in run.nodes.servers.items() for a in server_addresses(s)}
    assert len(servers) == len(run.nodes.servers) * (2 if family == DUAL else 1)
    for router in run.nodes.routers.values():
        for address, name in servers.items():
            # Follow the labels hop by hop: every tree ends at its server, loop-free.
            at, seen = logic_for(router, address), set()
            hop = at.vip.table.toward(int(address))  # type: ignore[union-attr]
            while hop is not None and hop.label is not None:
                assert at.name not in seen, f"a loop on {name}'s tree"
                seen.add(at.name)
                at = next(
                    logic
                    for r in run.nodes.routers.values()
                    for logic in logics(r)
                    if hop.neighbor in logic._own
                )
                hop = at.vip.table.switch(hop.label)  # type: ignore[union-attr]
            assert hop is not None and hop.neighbor == int(address), f"{router.name} -> {name}"


@families
def test_claim_15c_27_32_the_edge_tags_a_flow_and_the_vip_router_sees_only_its_first_packet(
    family: int,
) -> None:
    run, log = start(vip_toml(family, per_connection=3))
    run.network.run_until(8.0)
    summary = run.summary()
    assert summary["clients_served_at_end"] == 24 and failures(run) == 0
    assert_every_family_served(run, summary)
    vip = summary["vip"]
    assert vip["flows"] >= 24 * 3  # every client opened several connections
    assert vip["packets_after_first"] == 0
    assert vip["flows_tagged_at_edges"] >= vip["flows"] - 24  # the last may still be new
    assert vip["packets_labelled_at_edges"] > 5 * vip["flows"]
    assert log.split_flows() == []  # each flow served by one server, first to last packet


@families
def test_claim_26_40_the_vip_router_assigns_each_new_flow_by_the_allocation(family: int) -> None:
    run, log = start(vip_toml(family))
    run.network.run_until(6.0)
    by_name = run.nodes.clients
    placed = log.since(1.5)
    assert placed
    for (client, _), server in placed.items():
        assert server == owner_of(run, by_name[client])


@families
def test_claim_16_a_policy_change_moves_new_flows_and_keeps_tagged_ones(family: int) -> None:
    run, log = start(vip_toml(family, per_connection=4, rate=4.0))
    run.network.run_until(3.0)
    before = {c.name: owner_of(run, c) for c in run.nodes.clients.values()}
    act(run, SetShare(at=run.now, server="s1", share=Fraction(1, 10)))
    run.network.run_until(8.0)
    after = {c.name: owner_of(run, c) for c in run.nodes.clients.values()}
    moved = {n for n in before if before[n] != after[n]}
    assert moved, "the change moved no client's part of the space: it shows nothing"
    assert failures(run) == 0 and log.split_flows() == []
    # New flows of moved clients (opened well after the change) go to the new owner.
    late = log.since(5.0)
    assert any(client in moved for client, _ in late)
    for (client, _), server in late.items():
        assert server == after[client]


@families
def test_claim_17_41_load_reported_by_the_servers_shifts_new_flows(family: int) -> None:
    text = vip_toml(family, clients=24, rate=2.0, per_connection=4)
    run, log = start(text)
    heavy = sorted(run.nodes.clients.values(), key=lambda c: int(c.address))[:6]
    for client in heavy:
        client.rate = 20.0  # six clients, all in few servers' parts, send ten times more
    run.network.run_until(6.0)
    first = next(iter(run.nodes.servers.values())).coordinator
    epoch = first.epoch
    act(run, Rebalance(at=run.now, target=1.1))
    run.network.run_until(12.0)
    assert first.epoch > epoch, "the rebalance committed nothing"
    after = {c.name: owner_of(run, c) for c in heavy}
    spread_after = len(set(after.values()))
    assert failures(run) == 0 and log.split_flows() == []
    # The heavy clients' new flows now spread over more servers than their count before.
    placed = {client: server for (client, _), server in log.since(9.0).items()}
    assert {placed[c.name] for c in heavy if c.name in placed} == set(after.values())
    assert spread_after >= 2


@families
def test_a_vip_router_dies_tagged_flows_go_on_and_new_flows_are_served_by_the_other(
    family: int,
) -> None:
    run, log = start(vip_toml(family, per_connection=0))  # long connections: all tagged early
    run.network.run_until(3.0)
    assert failures(run) == 0
    busy = max(run.nodes.vip_routers.values(), key=lambda v: v.stats.flows)
    other = next(v for v in run.nodes.vip_routers.values() if v is not busy)
    act(run, KillVipRouter(at=run.now, vip_router=busy.name))
    killed = run.now
    run.network.run_until(8.0)
    assert failures(run) == 0  # tagged flows never touch a VIP router
    # New connections (clients now open short ones) reach the other VIP router.
    for client in run.nodes.clients.values():
        client.requests_per_connection = 2
    run.network.run_until(14.0)
    assert other.stats.flows > 0 and failures(run) == 0
    detection = run.topology.pool.report_interval_s * 3.5
    first_new = min(t for k, t in log.first_seen.items() if t > killed + 5.0)
    assert first_new - (killed + 5.0) <= detection + 0.1 + 1.0  # + a client's think time


@families
def test_a_server_that_dies_loses_its_tree_and_new_flows_go_to_the_others(family: int) -> None:
    run, log = start(vip_toml(family, per_connection=2))
    run.network.run_until(3.0)
    dead = run.nodes.servers["s2"]
    act(run, Kill(at=run.now, server="s2"))
    run.network.run_until(8.0)
    for router in run.nodes.routers.values():
        for address in server_addresses(dead):  # a dual-stack server's trees in both families
            plane = logic_for(router, address).vip
            assert plane is not None and plane.table.toward(int(address)) is None, router.name
    assert all(server != "s2" for server in log.since(5.0).values())
    summary = run.summary()
    assert summary["clients_served_at_end"] == 24
    assert_every_family_served(run, summary)


@families
def test_a_server_added_gets_a_tree_and_new_flows(family: int) -> None:
    run, log = start(vip_toml(family, servers=3, standby=1, per_connection=2))
    run.network.run_until(3.0)
    act(run, Add(at=run.now, server="s4"))
    run.network.run_until(9.0)
    assert "s4" in set(log.since(5.0).values())
    assert failures(run) == 0 and log.split_flows() == []


# -- a dual-stack VIP pool's configuration ---------------------------------------------------

DUAL_VIPS = ["203.0.113.80", "2001:db8:80::80"]
BAD_DUAL = {
    "two ipv4 vips": ({"vip": ["203.0.113.80", "203.0.113.81"]}, "lists two IPv4 VIPs"),
    "two ipv6 vips": ({"vip": [*DUAL_VIPS, "2001:db8:80::81"]}, "lists two IPv6 VIPs"),
    "no ipv6 vip": ({"vip": ["203.0.113.80"]}, "has no IPv6 VIP"),
    "no ipv4 vip": ({"vip": ["2001:db8:80::80"]}, "has no IPv4 VIP"),
    "one vip": ({"vip": "203.0.113.80"}, "'vip' lists one VIP of each family"),
    "vips, one space": ({"space": "10.0.0.0/8"}, "lists one VIP per family only in a dual"),
    "not an address": ({"vip": ["203.0.113.80", "vip6"]}, "'vip': 'vip6' is not an IP address"),
    "multicast": ({"vip": ["203.0.113.80", "ff3e::80"]}, "vip ff3e::80 is multicast"),
    "link-local": ({"vip": ["203.0.113.80", "fe80::80"]}, "vip fe80::80 is link-local"),
    "a link's": ({"vip": ["203.0.113.80", "2001:db8:ffff::80"]}, "is inside subnet"),
    "a group": ({"group": ["232.1.1.1", "ff3e::8000:1"]}, "leave out 'group'"),
}


@pytest.mark.parametrize(("keys", "error"), BAD_DUAL.values(), ids=BAD_DUAL.keys())
def test_a_dual_stack_vip_pool_needs_one_vip_of_each_family(
    keys: dict[str, Any], error: str
) -> None:
    with pytest.raises(TopologyError, match=r"vip-dual\.toml:\d+: ") as info:
        loads(vip_toml(DUAL, pool=keys), "vip-dual.toml")
    assert error in str(info.value)


def test_a_vip_list_without_a_space_is_a_dual_stack_pool_over_both_whole_spaces() -> None:
    text = "".join(line for line in vip_toml(DUAL).splitlines(True) if "space =" not in line)
    pool = loads(text).pool
    assert pool.families == (4, 6) and pool.space6 is not None
    assert (pool.space.prefix.mask, pool.space6.prefix.mask) == (0, 0)  # every address
    assert [str(pool.group_of(4)), str(pool.group_of(6))] == DUAL_VIPS


def test_a_dual_stack_vip_routers_metrics_count_both_families_flows() -> None:
    import re

    from manycast.observe.metrics import PoolCollector, exposition, registry

    run, _ = start(vip_toml(DUAL, per_connection=0))  # long connections: flows held
    run.network.run_until(3.0)
    text = exposition(registry(PoolCollector.for_pool(run), process=False))
    held = {
        name: float(value)
        for name, value in re.findall(r'^manycast_vip_router_flows\{vip_router="(\w+)"\} (\S+)$',
                                      text, re.MULTILINE)
    }  # fmt: skip
    assert held and sum(held.values()) == 24  # one flow for each client, of both families
    for name, router in run.nodes.vip_routers.items():
        assert isinstance(router, DualStackVipRouter)
        assert held[name] == len(router.flows) + len(router.six.flows)


# -- what may not come from anywhere --------------------------------------------------------


def control_packet(src: Address, dst: Address, message: Any) -> bytes:
    payload = control.encode(message)
    udp = UDPDatagram(7946, 7946, payload).to_wire(src, dst)
    return make_packet(src, dst, IPPROTO_UDP, udp, ttl=8).to_wire()


@families
def test_a_flow_tag_from_anyone_but_a_vip_router_is_refused(family: int) -> None:
    run, _ = start(vip_toml(family))
    run.network.run_until(1.0)
    router = run.nodes.routers["ra"]
    # The last client: in a dual-stack pool an IPv6 one, whose edge is ra's IPv6 logic.
    client = list(run.nodes.clients.values())[-1]
    edge = logic_for(router, client.address)
    assert edge.vip is not None
    vip = VIPS[client.address.version]
    flow = control.FlowKey(IPPROTO_TCP, client.address, 1234, vip, 7946)
    server = next(iter(run.nodes.servers.values()))
    address = server_addresses(server)[-1]
    iface = next(i for i in edge.interfaces.values() if client.address in i.network)
    forged = control.FlowTag("evil", 1, flow, address, 10_000)
    tagged = dict(edge.vip.flows)
    router.receive(iface.name, control_packet(client.address, iface.address, forged), run.now)
    assert edge.vip.stats.refused == 1 and edge.vip.flows == tagged
    # Nor may a client claim to be a server and root a tree of its own.
    hello = control.ServerHello("evil", 1, client.address, vip, 10_000)
    router.receive(iface.name, control_packet(client.address, iface.address, hello), run.now)
    assert edge.vip.stats.refused == 2
    assert edge.vip.table.toward(int(client.address)) is None
    assert int(client.address) not in dict(edge.vip.table.bindings())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vip", "vip6", "vip-dual"])
def test_the_bundled_vip_demo_serves_every_client_through_its_scenario(name: str) -> None:
    from manycast.topology import builtin, bundled

    topology = builtin(name)
    families = {"vip": (4,), "vip6": (6,), "vip-dual": (4, 6)}[name]
    assert topology.pool.vip is not None and topology.pool.families == families
    # Bundled beside vip.toml, with its scenario.
    assert name in bundled()
    assert [s.describe() for s in topology.scenario] == [
        s.describe() for s in builtin("vip").scenario
    ]
    run = PoolRun(topology, "memory", seed=1)
    log = FlowLog()
    log.hook(run)
    run.run(20.0)
    summary = run.summary()
    assert summary["clients_served_at_end"] == summary["clients"] == 120 * len(families)
    assert_every_family_served(run, summary)
    assert log.split_flows() == []
    assert summary["requests_failed"] == 0 and summary["resets"] == 0
    assert summary["vip"]["packets_after_first"] == 0
    assert summary["servers"]["s5"]["requests"] > 0  # the added server got new flows
    assert summary["vip"]["vip_routers"]["vr2"]["flows"] > 0  # the survivor took over


@family
def test_vip_traffic_reaches_the_nearest_live_vip_router_without_a_loop(family: int) -> None:
    # A topology with a ring, so that routed paths and hop counts could disagree.
    text = vip_toml(family, vip_routers=("ra", "rs2"))
    text = text.replace(
        '[[link]]\nbetween = ["core", "rs2"]',
        '[[link]]\nbetween = ["ra", "rs2"]\ndelay_ms = 9\n[[link]]\nbetween = ["core", "rs2"]',
    )
    run = PoolRun(loads(text), "memory", seed=1)
    routers = run.nodes.routers
    owner = {a: r for r in routers.values() for a in r._own}
    addresses = [int(v.address) for v in run.nodes.vip_routers.values()]
    for live in ([addresses[0]], [addresses[1]], addresses):
        for start_router in routers.values():
            at, seen = start_router, set()
            assert at.vip is not None
            target = at.vip.nearest_vip_router_among(live)
            while True:
                assert at.name not in seen, f"a loop toward a VIP router from {start_router.name}"
                seen.add(at.name)
                assert at.vip is not None and at.vip.nearest_vip_router_among(live) == target
                hop = at.route(target)
                assert hop is not None
                if hop[1] == target:
                    break
                at = owner[hop[1]]


# -- the label-switching data plane ---------------------------------------------------------


# One router's networks for the data-plane test, by family: upstream, downstream, the
# clients' LAN, a server's link, and the network behind the next router.
NETWORKS = {
    4: ("10.0.0.0/24", "10.0.1.0/24", "198.18.0.0/24", "10.9.0.0/24", "10.8.0.0/24"),
    6: ("2001:db8:0:1::/64", "2001:db8:0:2::/64", "2001:db8:a::/64", "2001:db8:9::/64",
        "2001:db8:8::/64"),
}  # fmt: skip


@family
def test_switched_and_pushed_packets_follow_the_label_table_as_it_changes(family: int) -> None:
    """A router keeps the outer headers it computed for each label and each hop; none of
    them may outlive a change of the table: a new label from the next router, a binding
    withdrawn, a server that says hello on our own link (we pop)."""
    from manycast.protocol.node import Interface
    from manycast.protocol.router import Router
    from manycast.protocol.router6 import Router6
    from manycast.wire.label import LabelStack, decapsulate, encapsulate

    up, down, lan, link, behind = (ipaddress.ip_network(n) for n in NETWORKS[family])
    upstream, next_router, vip_router = up[1], down[1], up[2]
    far, near = behind[1], link[1]  # behind next_router; on our link
    VIP = VIPS[family]
    router = (Router6 if family == 6 else Router)(
        "r",
        {
            "up": Interface("up", "upstream", up[254], up),
            "down": Interface("down", "downstream", down[254], down),
            "lan": Interface("lan", "clients", lan[254], lan),
            "srv": Interface("srv", "servers", link[254], link),
        },
        [(behind, "down", next_router)],
        router_ifaces=("up", "down"),
        hold_time=60.0,
        neighbors={"up": (int(upstream),), "down": (int(next_router),)},
        vip=VIP,
        vip_routers={int(vip_router): 1.0},
        vip_servers=[int(far), int(near)],
    )
    plane = router.vip
    assert plane is not None
    router.start(0.0)
    seq = iter(range(1, 100))

    def control_in(iface: str, src: Address, message: Any) -> None:
        dst = router.address_on(iface)
        udp = UDPDatagram(7946, 7946, control.encode(message)).to_wire(src, dst)
        router.receive(iface, make_packet(src, dst, IPPROTO_UDP, udp, ttl=1).to_wire(), 1.0)

    def next_router_binds(label: int | None) -> None:
        table: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, int] = {}
        if label is not None:
            table[far] = label
        mapping = control.LabelMapping.of("n", next(seq), next_router, 60_000, table)
        control_in("down", next_router, mapping)

    client = lan[7]
    datagram = UDPDatagram(40000, 80, b"hello, world").to_wire(client, VIP)
    inner = make_packet(client, VIP, IPPROTO_UDP, datagram, ttl=64).to_wire()

    def sent(inbound: str, packet: bytes) -> list[tuple[str, bytes]]:
        router.outbox.clear()
        router.receive(inbound, packet, 1.0)
        return [(f.iface, f.packet) for f in router.take_frames() if f.iface != "up"]

    def labelled_with(label: int) -> bytes:
        # IPv4 without a UDP checksum (RFC 7510 allows it); IPv6 must carry one.
        stack = LabelStack.of(label, ttl=9)
        return encapsulate(upstream, up[254], stack, inner, 1, checksum=family == 6)

    def out_label(frames: list[tuple[str, bytes]]) -> int:
        [(iface, packet)] = frames  # decapsulate checks every checksum
        header, stack, carried = decapsulate(packet)
        # The client's packet (from its addresses on: its TTL, or hop limit, may drop).
        skip = 12 if family == 4 else 8
        assert iface == "down" and header.dst == next_router and carried[skip:] == inner[skip:]
        return stack.top.label

    next_router_binds(1000)
    ours = plane.table.label_for(int(far))
    assert ours is not None
    assert out_label(sent("up", labelled_with(ours))) == 1000
    next_router_binds(2000)
    assert out_label(sent("up", labelled_with(ours))) == 2000
    # The edge pushes a tagged flow's label, and follows the table too.
    key = control.FlowKey(IPPROTO_UDP, client, 40000, VIP, 80)
    control_in("up", vip_router, control.FlowTag("vr", next(seq), key, far, 60_000))
    assert out_label(sent("lan", inner)) == 2000
    next_router_binds(3000)
    assert out_label(sent("lan", inner)) == 3000
    assert out_label(sent("up", labelled_with(ours))) == 3000
    # Withdrawn: a labelled packet has nowhere to go, and nothing leaves labelled.
    next_router_binds(None)
    unknown = plane.stats.label_unknown
    assert sent("up", labelled_with(ours)) == []
    assert plane.stats.label_unknown == unknown + 1
    # A server on our own link: we are its tree's last hop and pop.
    control_in("srv", near, control.ServerHello("s", next(seq), near, VIP, 60_000))
    local = plane.table.label_for(int(near))
    assert local is not None
    [(iface, delivered)] = sent("up", labelled_with(local))
    assert iface == "srv" and delivered == inner
    # Malformed labelled packets are counted, never raised.
    broken = bytearray(labelled_with(local))
    broken[10 if family == 4 else 46] ^= 0xFF  # the outer IPv4 header's, or UDP's, checksum
    assert sent("up", bytes(broken)) == []
    assert plane.stats.malformed == 1


@dataclass
class Openings:
    """Each connection the clients open, and how many SYNs each sent: as the clients see
    it, a new flow is served when its connection is answered on its first SYN."""

    opened: list[tuple[float, Client, int]] = field(default_factory=list)
    syns: dict[tuple[str, int], int] = field(default_factory=lambda: defaultdict(int))

    def hook(self, run: PoolRun) -> None:
        for client in run.nodes.clients.values():
            self._hook(client)

    def _hook(self, client: Client) -> None:
        connect, take_frames = client._connect, client.take_frames

        def _connect(now: float) -> None:
            connect(now)
            self.opened.append((now, client, client._port))

        def _take_frames() -> list[Any]:
            frames = take_frames()
            for frame in frames:
                ip = parse_packet(frame.packet)
                if ip.protocol == IPPROTO_TCP and ip.payload[13] & 0x12 == 0x02:
                    self.syns[(client.name, int.from_bytes(ip.payload[:2], "big"))] += 1
            return frames

        client._connect = _connect  # type: ignore[method-assign]
        client.take_frames = _take_frames  # type: ignore[method-assign]

    def served_on_first_syn(self, at: float, client: Client, port: int) -> bool:
        later = [t for t, c, _ in self.opened if c is client and t > at]
        answered = any(
            at <= ok - latency and (not later or ok - latency < min(later))
            for ok, latency in zip(client.stats.ok_times, client.stats.latencies, strict=True)
        )
        return answered and self.syns[(client.name, port)] == 1

    def between(self, since: float, until: float) -> tuple[list[float], list[float]]:
        """(when each connection opened in (since, until] was, that was served on its
        first SYN; when each was that was not), as times after `since`."""
        served: list[float] = []
        hurt: list[float] = []
        for at, client, port in self.opened:
            if since < at <= until:
                good = self.served_on_first_syn(at, client, port)
                (served if good else hurt).append(at - since)
        return served, hurt


@families
def test_new_flows_are_served_again_within_the_detection_time_of_a_vip_router_death(
    family: int,
) -> None:
    """As the clients see it: after the VIP router their first packets go to dies, new
    connections lose their SYN only until the routers stop hearing its adverts (the
    pool's failure-detection time, heartbeat x misses); every connection opened after
    that is answered on its first SYN."""
    run, _ = start(vip_toml(family, per_connection=2))
    openings = Openings()
    openings.hook(run)
    run.network.run_until(3.0)
    edge = run.nodes.routers["ra"].vip
    assert edge is not None
    nearest = edge.nearest_vip_router(run.now)
    victim = next(v for v in run.nodes.vip_routers.values() if int(v.address) == nearest)
    act(run, KillVipRouter(at=run.now, vip_router=victim.name))
    killed = run.now
    run.network.run_until(killed + 3.0)
    detection = run.topology.pool.heartbeat_s * run.topology.pool.heartbeat_misses
    served, hurt = openings.between(killed, killed + 2.0)
    assert hurt, "no new connection lost its SYN at the dead VIP router: the test shows nothing"
    assert max(hurt) <= detection + 0.1, hurt
    assert min(served) <= detection + 0.1
    assert failures(run) == 0


@families
def test_a_vip_router_that_starts_late_takes_new_flows_only_when_it_can_place_them(
    family: int,
) -> None:
    """The nearest VIP router starts (or restarts) while the other serves: the routers
    turn to it only once it knows the servers and has their trees, so no new flow's
    first packet is lost on a VIP router not yet able to place it."""
    run, _ = start(vip_toml(family, per_connection=2))
    nearest = run.nodes.vip_routers["vr1"]  # on core, the clients' way in
    other = run.nodes.vip_routers["vr2"]
    run.network.kill("vr1")
    openings = Openings()
    openings.hook(run)
    run.network.run_until(3.0)
    assert other.stats.flows > 0
    late = restarted(nearest, other.observer.allocation)
    began = run.now
    run.network.add(late)
    run.network.run_until(began + 3.0)
    assert late.stats.flows > 0, "the nearest VIP router never took new flows"
    assert late.stats.no_server + late.stats.no_tree == 0
    served, hurt = openings.between(began, began + 2.0)
    assert served and not hurt, hurt
    assert failures(run) == 0


def restarted(vip_router: VipRouter, initial: Any) -> VipRouter:
    """A new VIP router in `vip_router`'s place (a dual-stack one's: both logics)."""
    args = (
        vip_router.name,
        vip_router.interfaces,
        (vip_router.iface, ipaddress.ip_address(vip_router.gateway)),
        vip_router.settings,
        random.Random(7),
    )
    edges = [(net, router) for net, router in vip_router.edges]
    if not isinstance(vip_router, DualStackVipRouter):
        return VipRouter(*args, vip=vip_router.vip, initial=initial, edges=edges)
    six = vip_router.six
    settings = vip_router.settings
    assert six.server_addresses is not None and settings.space6 is not None
    return DualStackVipRouter(
        args[0],
        vip_router.all_interfaces,
        *args[2:],
        vip=vip_router.vip,
        initial=initial,
        edges=edges,
        gateway6=ipaddress.ip_address(six.gateway),
        vip6=six.vip,
        space6=settings.space6,
        server_addresses6=six.server_addresses,
    )


# -- on real sockets -----------------------------------------------------------------------


@families
def test_on_real_sockets_flows_are_tagged_and_kept_through_a_share_change(family: int) -> None:
    """The overlay (UDP sockets on loopback, wall-clock time): every client is served
    through a change of s1's share, each flow by one server from its first packet to its
    last, the VIP router seeing only first packets, and flows opened after the change
    placed by the new allocation."""
    from manycast.ports import free_base_port
    from pooltools import DEADLINE, every, patient, requests_ok, run_pool_until, served_now

    change = '[[scenario]]\nat = 1.5\naction = "set_share"\nserver = "s1"\nshare = 0.1\n'
    # Failure detection is not under test: a generous timeout (3 s) keeps a busy host's
    # stalls from passing for deaths.
    text = vip_toml(family, clients=16, per_connection=3, pool={"heartbeat_misses": 30})
    topology = loads(text.replace("[run]\n", change + "[run]\n"))
    port = free_base_port(topology.attachment_count)
    run = patient(PoolRun(topology, "overlay", seed=7, base_port=port))
    log = FlowLog()
    log.hook(run)

    def shrunk() -> bool:
        return owner_share(run, "s1") < 0.2

    done, summary = run_pool_until(
        run,
        every(
            run,
            0.05,
            lambda: run.now >= 4.5 and shrunk() and served_now(run) and requests_ok(run) > 16 * 6,
        ),
    )
    assert done, f"not settled after {DEADLINE} s: {summary}"
    assert summary["clients_served_at_end"] == 16 and failures(run) == 0
    assert log.split_flows() == []
    vip = summary["vip"]
    # On the wall clock a flow's next packet can reach its edge before the edge has the
    # VIP router's binding (they come on different sockets; a busy host stalls one),
    # and so reach the VIP router again, which keeps it on the server it picked. The
    # memory driver's tests above hold it to 0; here the VIP router must stay off
    # the data path. A stall of this one process gives a burst of such repeats
    # (12-14 of 89 flows seen under load); untagged, every flow would repeat several.
    assert vip["flows_tagged_at_edges"] > 0, vip
    assert vip["packets_after_first"] * 4 <= vip["flows"], vip
    assert vip["packets_labelled_at_edges"] > vip["flows"]
    late = log.since(3.5)
    assert late
    for (client, _), server in late.items():
        assert server == owner_of(run, run.nodes.clients[client])


def owner_share(run: PoolRun, server: str) -> float:
    live = next(s for n, s in run.nodes.servers.items() if n not in run.engine.dead)
    allocation = live.coordinator.allocation
    return 1.0 if allocation is None else float(allocation.share(server))
