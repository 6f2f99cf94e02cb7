"""R4 pinned paths on label-switched trees (seed Fig 16, claims 13, 14, 39), end to end.

A manycast pool with technique R4 builds one label-switched tree per server, as a
VIP pool does. Before a reallocation executes, each server tags every connection
it will lose onto its own tree at the client's edge router (`FlowTag`); the edge
pushes the label on that connection's packets to the group, so they reach the
old owner by label switching while the routers' membership sends everything
else, new connections included, to the new owner. Each test is named after the
claim it shows and checks what a client sees as well as the routers' counters; each
runs on an IPv4 and on an IPv6 network (labelled packets in MPLS-in-UDP over IPv6).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import pytest

from manycast.ports import free_base_port
from manycast.protocol.router import Router
from manycast.protocol.vipplane import VipPlane
from manycast.runtime import PoolRun
from manycast.space import Allocation
from manycast.steps import Kill, SetShare
from manycast.topology import loads
from manycast.wire import control
from manycast.wire.ip import IPPROTO_TCP, IPPROTO_UDP, Address, UDPDatagram, make_packet
from pooltools import (
    Trace,
    allocation,
    patient,
    pool_toml,
    routed,
    run_to,
    start,
)
from test_dynamic_destination import GROUPS, in_family
from test_techniques import CLEAN, holders, outcome, overlay_set_share, server_key

R4 = {"technique": "R4", "report_interval_ms": 500}
family = pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])


def r4_pool(family: int = 4, clients: int = 24, **pool: Any) -> str:
    """clients a1.. -- ra -- core -- rs1 (s1, s3) / rs2 (s2, s4), technique R4, on an
    IPv4 network or the same on an IPv6 one (`family`)."""
    return in_family(pool_toml(clients=clients, rate=4.0, pool={**R4, **pool}), family)


@dataclass(frozen=True)
class Sent:
    """A control message a server's technique sent (to None: the control group)."""

    at: float
    server: str
    message: control.ControlMessage
    to: Address | None


def record_technique(run: PoolRun) -> list[Sent]:
    """Every control message the servers' techniques send from now on."""
    sent: list[Sent] = []
    for server in [*run.nodes.servers.values(), *run.nodes.standby.values()]:
        original = server.handover.send_control

        def send(message: Any, to: Any, original: Any = original, name: str = server.name) -> None:
            sent.append(Sent(run.now, name, message, to))
            original(message, to)

        server.handover.send_control = send  # type: ignore[method-assign]
    return sent


def plane(router: Router) -> VipPlane:
    assert router.vip is not None, f"{router.name} builds no label trees"
    return router.vip


def edge_address(run: PoolRun) -> Address:
    """The clients' edge router's address on their network."""
    ra = run.nodes.routers["ra"]
    client = next(iter(run.nodes.clients.values()))
    return next(i.address for i in ra.interfaces.values() if client.address in i.network)


@dataclass
class Change:
    """One operator's change as the pool carried it out."""

    old: Allocation
    new: Allocation
    at: float
    keys: dict[str, Any]  # client -> its connection when the change was asked for
    moved: dict[str, tuple[str, str]]  # client -> (old owner, new owner)


def settled_pool(text: str) -> tuple[PoolRun, Trace, list[Sent]]:
    run, trace = start(text)
    sent = record_technique(run)
    run_to(run, 2.0)
    for name, client in run.nodes.clients.items():
        assert client.connected and client.stats.requests_ok > 0, f"{name} has no session"
    return run, trace, sent


def reallocate(run: PoolRun, server: str = "s1", share: Fraction = Fraction(1, 10)) -> Change:
    """The operator sets `server`'s share; the pool runs on until it is in force."""
    old = allocation(run)
    at = run.now
    keys = {n: c.conn_key for n, c in run.nodes.clients.items()}
    step = SetShare(at=at, server=server, share=share)
    run.network.call_at(at, lambda: run.engine.carry_out(step, at))
    run_to(run, at + 1.5)
    new = allocation(run)
    moved = {
        n: (old_owner, new_owner)
        for n, c in run.nodes.clients.items()
        if (old_owner := old.owner(c.address)) != (new_owner := new.owner(c.address))
        and old_owner is not None
        and new_owner is not None
    }
    assert moved, "the change moved no client: the test would prove nothing"
    return Change(old, new, at, keys, moved)


def label_counts(run: PoolRun) -> dict[str, tuple[int, int, int]]:
    """router -> packets it pushed at an edge, swapped, popped and delivered."""
    counts = {}
    for name, router in run.nodes.routers.items():
        stats = plane(router).stats
        counts[name] = (stats.pushed, stats.labelled_switched, stats.labelled_delivered)
    return counts


def installed_at(run: PoolRun, server: str, allocation_after: Allocation) -> float:
    """When `server` put the allocation in force (stopped serving what it gave up)."""
    coordinator = run.nodes.servers[server].coordinator
    assert coordinator.allocation == allocation_after
    return next(t for t, epoch, _ in coordinator.changes if epoch == coordinator.epoch)


# -- Fig 16, 1600: a tag-switched path per connection, made before the change ------------


@family
def test_claim_13_39_before_a_change_each_server_tags_every_connection_it_will_lose(
    family: int,
) -> None:
    run, _, sent = settled_pool(r4_pool(family))
    routers = run.nodes.routers
    # Each server roots a tree that reaches the clients' edge router.
    for name, server in run.nodes.servers.items():
        assert plane(routers["ra"]).table.toward(int(server.address)) is not None, name
    change = reallocate(run)
    edge = edge_address(run)
    port = run.topology.pool.port
    tags = [s for s in sent if isinstance(s.message, control.FlowTag)]
    by_server: dict[str, set[tuple[int, int]]] = {}
    for item in tags:
        message = item.message
        assert isinstance(message, control.FlowTag)
        flow = message.flow
        # Onto the sender's own tree, at the clients' edge router, for a connection
        # to the group: the old owner's path.
        assert item.to == edge
        assert message.server == run.nodes.servers[item.server].address
        assert (flow.protocol, flow.vip, flow.vip_port) == (IPPROTO_TCP, GROUPS[family], port)
        by_server.setdefault(item.server, set()).add((int(flow.client), flow.client_port))
        # Made before the server ceased serving that part of the space.
        assert item.at < installed_at(run, item.server, change.new), item
    expected: dict[str, set[tuple[int, int]]] = {}
    for name, (old_owner, _) in change.moved.items():
        key = change.keys[name]
        assert key is not None
        (client, client_port), _ = key
        expected.setdefault(old_owner, set()).add((int(client), client_port))
    # Exactly the connections each server was about to lose, each tagged once.
    assert by_server == expected
    assert len(tags) == len(change.moved)
    # The edge holds those tags; no router on the way holds anything per connection
    # (no per-hop pins), and R4 sent nothing but the tags.
    assert {(f.client, f.client_port) for f in plane(routers["ra"]).flows} == set().union(
        *expected.values()
    )
    assert [n for n, r in routers.items() if plane(r).flows] == ["ra"]
    assert {type(s.message).__name__ for s in sent} == {"FlowTag"}


# -- Fig 16, 1620-1630: old connections go on by label, new ones by the allocation ---------


@family
def test_claim_14_moved_connections_reach_their_old_owner_by_label_switching(family: int) -> None:
    run, trace, sent = settled_pool(r4_pool(family))
    change = reallocate(run)
    routers = run.nodes.routers
    clients = run.nodes.clients
    since = max(installed_at(run, s, change.new) for s in run.nodes.servers)
    before = label_counts(run)
    run_to(run, run.now + 2.0)
    # What the clients see: every session goes on, on the same connection.
    assert outcome(run) == CLEAN
    for name, client in clients.items():
        assert client.conn_key == change.keys[name], f"{name} changed connection"
        assert client.stats.first_ok_after(since + 1.0) is not None, name
    # Every router's membership sends the moved clients' (unlabelled) packets to the
    # new owner...
    assert routed(run, change.new)
    # ...yet their connections' packets still reach the old owner, which answers them.
    foreign = trace.foreign(since)
    assert foreign
    addresses = {c.address: n for n, c in clients.items()}
    for delivery in foreign:
        name = addresses[delivery.source]
        assert name in change.moved and delivery.server == change.moved[name][0], delivery
    for name, (old_owner, _) in change.moved.items():
        assert holders(run, server_key(clients[name])) == {old_owner}, name
        assert trace.servers_of(name, since + 1.0) == {old_owner}, name
    # They went by label: pushed at the clients' edge, swapped in the core, popped at
    # the old owner's router and handed to it.
    after = label_counts(run)
    grew = {n: tuple(a - b for a, b in zip(after[n], before[n], strict=True)) for n in routers}
    assert grew["ra"][0] > 0 and grew["core"][1] > 0
    attached = {s: spec.router for s, spec in run.topology.servers.items()}
    for old_owner in {o for o, _ in change.moved.values()}:
        assert grew[attached[old_owner]][2] > 0, old_owner
    assert sum(g[2] for g in grew.values()) <= grew["ra"][0]  # nothing else is labelled
    assert all(plane(r).stats.label_unknown == 0 for r in routers.values())

    # The moved clients now end their connections after their next answer: the old
    # owner breaks each tagged path down (Fig 16, 1630), and their next connections
    # go to the new owner by the allocation.
    moved = [clients[n] for n in sorted(change.moved)]
    for client in moved:
        client.requests_per_connection = 2  # they have had more answers than that
    reopened = run.now
    run_to(run, reopened + 2.0)
    for client in moved:
        client.requests_per_connection = 0  # the connection open now stays
    run_to(run, reopened + 4.0)
    assert outcome(run) == CLEAN
    untags = [s for s in sent if isinstance(s.message, control.FlowUntag)]
    assert len(untags) == len(change.moved)
    assert sum(s.handover.stats.unpinned for s in run.nodes.servers.values()) == len(moved)
    old_flows = {(int(change.keys[c.name][0][0]), change.keys[c.name][0][1]) for c in moved}
    assert not {(f.client, f.client_port) for f in plane(routers["ra"]).flows} & old_flows
    for client in moved:
        _, new_owner = change.moved[client.name]
        assert client.conn_key != change.keys[client.name]
        assert holders(run, server_key(client)) == {new_owner}, client.name
        assert client.stats.first_ok_after(reopened + 3.0) is not None, client.name


@family
def test_a_tag_whose_server_died_falls_back_to_the_allocation_and_black_holes_nothing(
    family: int,
) -> None:
    """The old owner dies holding tagged connections: once its tree is withdrawn the
    edge stops pushing, the packets follow the allocation to the new owner, which
    resets them (R4 keeps no state elsewhere), and the clients reconnect there."""
    run, _, _ = settled_pool(r4_pool(family))
    change = reallocate(run)
    clients = run.nodes.clients
    orphans = {n for n, (old_owner, _) in change.moved.items() if old_owner == "s1"}
    assert orphans
    edge = plane(run.nodes.routers["ra"])
    dead = int(run.nodes.servers["s1"].address)
    assert edge.flows and all(tag.server == dead for tag in edge.flows.values())
    for name in orphans:
        clients[name].request_timeout = 60.0  # only the fallback can save them in time
    resets = {n: c.stats.resets for n, c in clients.items()}
    killed = run.now
    run.network.call_at(killed, lambda: run.engine.carry_out(Kill(at=killed, server="s1"), killed))
    hold = run.topology.pool.report_interval_s * 3.5
    run_to(run, killed + hold + 1.0)
    assert edge.table.toward(dead) is None  # its tree is gone, router by router
    pushed = edge.stats.pushed
    run_to(run, killed + hold + 3.0)
    assert edge.stats.pushed == pushed  # nothing goes down a dead tree
    after = allocation(run)
    for name in orphans:
        client = clients[name]
        assert client.stats.resets > resets[name], f"{name} was not reset by the new owner"
        assert client.stats.timeouts == 0
        assert holders(run, server_key(client)) == {after.owner(client.address)}, name
        assert client.stats.first_ok_after(killed + hold) is not None, name
    assert outcome(run)["state_lost"] == 0


# -- where tags may come from ------------------------------------------------------------


def control_packet(src: Address, dst: Address, message: Any) -> bytes:
    udp = UDPDatagram(7946, 7946, control.encode(message)).to_wire(src, dst)
    return make_packet(src, dst, IPPROTO_UDP, udp, ttl=8).to_wire()


@family
def test_the_edge_takes_r4_tags_only_from_a_pool_server_for_its_own_tree(family: int) -> None:
    run, _, _ = settled_pool(r4_pool(family))
    ra = run.nodes.routers["ra"]
    edge = plane(ra)
    client = next(iter(run.nodes.clients.values()))
    lan = next(i for i in ra.interfaces.values() if client.address in i.network)
    core = next(i for i in ra.interfaces.values() if i.name in ra.router_ifaces)
    s1, s2 = (run.nodes.servers[n].address for n in ("s1", "s2"))
    port = run.topology.pool.port
    group = GROUPS[family]
    flow = control.FlowKey(IPPROTO_TCP, client.address, 1234, group, port)
    elsewhere = control.FlowKey(IPPROTO_TCP, client.address, 1234, group + 1, port)

    def deliver(iface: str, src: Address, message: Any) -> None:
        ra.receive(iface, control_packet(src, lan.address, message), run.now)

    refused = edge.stats.refused
    forged = [
        (lan.name, client.address, control.FlowTag("c", 1, flow, client.address, 10_000)),
        (core.name, s1, control.FlowTag("s1", 1, flow, s2, 10_000)),  # another's tree
        (lan.name, s1, control.FlowTag("s1", 1, flow, s1, 10_000)),  # from the wrong side
        (core.name, s1, control.FlowTag("s1", 1, elsewhere, s1, 10_000)),  # another group
        (lan.name, client.address, control.FlowUntag("c", 1, (flow,))),
    ]
    for iface, src, message in forged:
        deliver(iface, src, message)
    assert edge.stats.refused == refused + len(forged)
    assert not any(f.client_port == 1234 for f in edge.flows)
    # The server itself, from its side of the network, onto its own tree: taken.
    deliver(core.name, s1, control.FlowTag("s1", 2, flow, s1, 10_000))
    assert [t.server for f, t in edge.flows.items() if f.client_port == 1234] == [int(s1)]
    # Another server may not end it; its own server may.
    deliver(core.name, s2, control.FlowUntag("s2", 2, (flow,)))
    assert any(f.client_port == 1234 for f in edge.flows)
    deliver(core.name, s1, control.FlowUntag("s1", 3, (flow,)))
    assert not any(f.client_port == 1234 for f in edge.flows)
    assert edge.stats.refused == refused + len(forged)


@family
def test_only_r4_pools_build_label_trees(family: int) -> None:
    for technique in ("R1", "R2", "R3", "R4"):
        run = PoolRun(loads(r4_pool(family, technique=technique)), "memory", seed=1)
        trees = technique == "R4"
        assert all((r.vip is not None) == trees for r in run.nodes.routers.values()), technique
        assert all(s.roots_tree == trees for s in run.nodes.servers.values()), technique


# -- on real sockets -----------------------------------------------------------------------


@family
def test_claim_14_on_real_sockets_moved_connections_reach_their_old_owner_by_label(
    family: int,
) -> None:
    """The overlay (UDP sockets on loopback, wall-clock time): s1 drops to 10% once
    every client has a session; every session goes on, on the same connection, the
    moved ones by label to their old owner."""
    # Failure detection is not under test: a generous timeout (3 s) keeps a busy
    # host's stalls from passing for deaths.
    topo = loads(r4_pool(family, clients=16, heartbeat_misses=30))
    run = patient(PoolRun(topo, "overlay", seed=7, base_port=free_base_port(topo.attachment_count)))
    clients = run.nodes.clients
    routers = run.nodes.routers
    edge = plane(routers["ra"])

    def trees() -> bool:
        return all(
            edge.table.toward(int(s.address)) is not None for s in run.nodes.servers.values()
        )

    def by_label(old: Allocation) -> bool:
        return edge.stats.pushed > 0

    # Once the routes settle every client is answered on its connection: the moved
    # ones can only be, by label, by their old owner.
    old, keys, _, summary = overlay_set_share(run, trees, by_label)
    new = allocation(run)
    moved = {
        n: (old.owner(c.address), new.owner(c.address))
        for n, c in clients.items()
        if old.owner(c.address) != new.owner(c.address)
    }
    assert moved
    assert summary["clients"] == summary["clients_served_at_end"] == 16
    assert outcome(run) == CLEAN
    for name, client in clients.items():
        assert client.conn_key == keys[name], f"{name} changed connection"
    for name, (old_owner, _) in moved.items():
        assert holders(run, server_key(clients[name])) == {old_owner}, name
    assert {(f.client, f.client_port) for f in edge.flows} >= {
        (int(keys[n][0][0]), keys[n][0][1])  # type: ignore[index]
        for n in moved
    }
    assert [n for n, r in routers.items() if plane(r).flows] == ["ra"]
    assert edge.stats.pushed > 0 and plane(routers["core"]).stats.labelled_switched > 0
    attached = run.topology.servers["s1"].router
    assert plane(routers[attached]).stats.labelled_delivered > 0
