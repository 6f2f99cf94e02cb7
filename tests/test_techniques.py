"""The four ways to keep connections when the allocation changes (seed Fig 12-16).

R1 resets the sessions of portions that move and the clients reconnect to the
new owner; R2 forwards them to the old owner (optionally closing after the
current transaction); R3 transfers their state to the new owner; R4 tags them
onto the old owner's label-switched tree at the clients' edge router. Every
client keeps a running total with the service, so a lost state is visible to the
user (`state_lost`), as are resets and failures. Every test runs on an IPv4 and on
an IPv6 network (the same topology, numbered in either family), and on a dual-stack
one (a dual-stack pool: half the clients on an IPv4 LAN, half on an IPv6 LAN).
"""

from __future__ import annotations

import ipaddress
import struct
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import pytest

from manycast import space
from manycast.drivers.overlay_network import OverlayNetwork
from manycast.ports import free_base_port
from manycast.protocol.client import Client
from manycast.protocol.dualstack import DualStackRouter, in_space
from manycast.protocol.router import Router
from manycast.protocol.server import Server
from manycast.protocol.technique import Technique
from manycast.protocol.vipplane import VipPlane
from manycast.runtime import PoolRun
from manycast.space import Allocation
from manycast.steps import STEP_TYPES, Action, Kill, SetShare
from manycast.topology import loads
from pooltools import DEADLINE, Settled, agreed, every, once, owner, patient, served_now

TECHNIQUES = tuple(t for t in Technique if t is not Technique.D)  # D: test_dynamic_destination
KEEPERS = ("R2", "R3", "R4")  # the techniques that keep every session
DUAL = 46  # `family` of a dual-stack pool: both groups, a client LAN of each family
family = pytest.mark.parametrize("family", [4, 6, DUAL], ids=["ipv4", "ipv6", "dual"])
# Per family: the pool's group and the clients' LAN.
GROUPS = {4: "232.1.1.1", 6: "ff3e::8000:1"}
LANS = {4: "10.1.0.0/16", 6: "2001:db8:c::/64"}


def pool_keys(family: int) -> str:
    """The `[pool]` keys that make it of `family`: its group, and for a dual-stack
    pool its two spaces and groups."""
    if family != DUAL:
        return f'group = "{GROUPS[family]}"'
    return f'space = ["10.0.0.0/8", "2001:db8::/32"]\ngroup = ["{GROUPS[4]}", "{GROUPS[6]}"]'


def client_lans(family: int, clients: int, rate: float) -> str:
    """The clients behind `ra`: one LAN of the pool's family (c1..), or a dual-stack
    pool's half on an IPv4 LAN (c1..) and half on an IPv6 one (d1..). The stride
    spreads the clients over the low-order bits that portions select."""
    lans = [("c", LANS[4]), ("d", LANS[6])] if family == DUAL else [("c", LANS[family])]
    return "".join(
        f'[[clients]]\nname = "{name}"\ncount = {clients // len(lans)}\nrouter = "ra"\n'
        f'subnet = "{subnet}"\nstride = 97\nrate = {rate}\n'
        for name, subnet in lans
    )


ConnKey = tuple[tuple[ipaddress.IPv4Address, int], tuple[ipaddress.IPv4Address, int]]


def topology(
    technique: str,
    *,
    family: int = 4,
    clients: int = 32,
    rate: float = 4.0,
    scenario: Iterable[tuple[float, str, str]] = (),
    close_after_transaction: bool = False,
    misses: int = 3,
    duration: float = 6.0,
) -> str:
    """Clients behind `ra`; s1, s3 behind rs1 and s2, s4 (and standby s5) behind rs2,
    so a moved connection may have to cross a different router than before; every
    address of `family` (the routers' and servers' from the address plan; on a
    dual-stack network they have one of each)."""
    steps = "".join(
        f'[[scenario]]\nat = {at}\naction = "{action}"\nserver = "{server}"\n'
        + ("share = 0.10\n" if action == "set_share" else "")
        for at, action, server in scenario
    )
    return f"""
[pool]
{pool_keys(family)}
heartbeat_ms = 100
heartbeat_misses = {misses}
report_interval_ms = 500
technique = "{technique}"
close_after_transaction = {"true" if close_after_transaction else "false"}

[[router]]
name = "ra"
[[router]]
name = "rs1"
[[router]]
name = "rs2"
[[link]]
between = ["ra", "rs1"]
delay_ms = 1
[[link]]
between = ["ra", "rs2"]
delay_ms = 2

[[server]]
name = "s1"
router = "rs1"
[[server]]
name = "s2"
router = "rs2"
[[server]]
name = "s3"
router = "rs1"
[[server]]
name = "s4"
router = "rs2"
[[server]]
name = "s5"
router = "rs2"
standby = true

{client_lans(family, clients, rate)}
{steps}
[run]
duration = {duration}
"""


def start(text: str, seed: int = 3) -> PoolRun:
    run = PoolRun(loads(text), "memory", seed)
    watch_for_livelock(run)
    return run


def watch_for_livelock(run: PoolRun, limit: int = 1000) -> None:
    """Fail (instead of hanging the virtual clock) when a node's timer keeps firing
    at one instant: its deadline never moves past `now`."""
    nodes = {**run.nodes.routers, **run.nodes.servers, **run.nodes.standby, **run.nodes.clients}
    for node in nodes.values():
        original = node.on_timer
        seen = [-1.0, 0]

        def on_timer(now: float, original=original, seen=seen, name=node.name) -> None:
            if now == seen[0]:
                seen[1] += 1
                if seen[1] > limit:
                    raise AssertionError(f"{name}'s timer fires without end at t={now!r}")
            else:
                seen[:] = [now, 0]
            original(now)

        node.on_timer = on_timer  # type: ignore[method-assign]


def advance(run: PoolRun, until: float) -> None:
    run.network.run_until(until)  # type: ignore[union-attr]


def act(run: PoolRun, action: Callable[[], object]) -> None:
    """Do something to the nodes now, inside the driver, which then collects what
    they send and re-arms their timers (as it does for scenario steps)."""
    run.network.call_at(run.now, action)
    advance(run, run.now)


def step(run: PoolRun, action: str, server: str, share: Fraction = Fraction(1, 10)) -> None:
    """An operator's change, now (as a scenario step would issue it)."""
    args: dict[str, object] = {"server": server}
    if action == "set_share":
        args["share"] = share
    act(run, lambda: run.engine.carry_out(STEP_TYPES[Action(action)](at=run.now, **args), run.now))


def current(run: PoolRun) -> Allocation:
    """The one allocation every live server holds (asserted)."""
    servers = [s for n, s in run.nodes.servers.items() if n not in run.engine.dead]
    views = {s.name: s.coordinator.view for s in servers}
    assert len(set(views.values())) == 1, f"servers disagree: {views}"
    allocation = servers[0].coordinator.allocation
    assert allocation is not None
    return allocation


def server_key(client: Client) -> ConnKey:
    """The server's name for the client's connection: (local, remote) swapped."""
    assert client.conn_key is not None
    local, remote = client.conn_key  # type: ignore[misc]
    return (remote, local)


def total_at(server: Server, key: ConnKey) -> int | None:
    """The running total `server` holds for the connection, None if it holds none."""
    if key not in server.app:
        return None
    _, total, _ = struct.unpack_from("!BQI", server.app.export(key))
    return int(total)


def holders(run: PoolRun, key: ConnKey) -> set[str]:
    return {n for n, s in run.nodes.servers.items() if key in s.endpoint and key in s.app}


def old_key(record: Change, name: str) -> ConnKey:
    """The server's name for the connection the client had before the change."""
    local, remote = record.keys[name]  # type: ignore[misc]
    return (remote, local)


@dataclass
class Change:
    """One reallocation as a user sees it: who owned what before and after, the
    session (connection key, running total) each client had when it happened, and
    the clients whose portions changed hands (client -> (old owner, new owner))."""

    old: Allocation
    new: Allocation
    at: float
    keys: dict[str, object]
    totals: dict[str, int]
    reconnects: dict[str, int]
    moved: dict[str, tuple[str, str]]


def moved_clients(run: PoolRun, old: Allocation, new: Allocation) -> dict[str, tuple[str, str]]:
    """client -> (old owner, new owner), by the portions `space.diff` says changed hands
    (a dual-stack pool's IPv6 client: by the same buckets of the IPv6 space)."""
    space6 = run.topology.pool.space6
    out = {}
    for name, client in run.nodes.clients.items():
        pair = (old, new)
        if space6 is not None and client.address.version == 6:
            pair = (in_space(old, space6), in_space(new, space6))
        for move in space.diff(*pair):
            if move.portions.contains(client.address):
                out[name] = (move.source, move.target)
    return out


def change(
    run: PoolRun, action: str, server: str, settle: float = 1.5, share: Fraction = Fraction(1, 10)
) -> Change:
    """Apply one change to a pool where every client has a session, and run on."""
    clients = run.nodes.clients
    for name, client in clients.items():
        assert client.connected and client.stats.requests_ok > 0, f"{name} has no session yet"
    old = current(run)
    at = run.now
    keys = {n: c.conn_key for n, c in clients.items()}
    totals = {n: c.app.total for n, c in clients.items() if c.app is not None}
    reconnects = {n: c.stats.reconnects for n, c in clients.items()}
    step(run, action, server, share)
    advance(run, at + settle)
    new = current(run)
    assert new != old
    moved = moved_clients(run, old, new)
    assert moved, "the change moved no client: the test would prove nothing"
    if run.topology.pool.dual and action == "set_share":  # then clients of both families
        assert {clients[n].address.version for n in moved} == {4, 6}, moved
    return Change(old, new, at, keys, totals, reconnects, moved)


def outcome(run: PoolRun) -> dict[str, int]:
    clients = run.nodes.clients.values()
    return {
        "resets": sum(c.stats.resets for c in clients),
        "failed": sum(c.stats.requests_failed for c in clients),
        "state_lost": sum(c.stats.state_lost for c in clients),
        "timeouts": sum(c.stats.timeouts for c in clients),
    }


CLEAN = {"resets": 0, "failed": 0, "state_lost": 0, "timeouts": 0}


def assert_all_served_since(run: PoolRun, since: float) -> None:
    missing = [n for n, c in run.nodes.clients.items() if c.stats.first_ok_after(since) is None]
    assert not missing, f"not served after {since:.2f}: {missing}"


def assert_kept(run: PoolRun, record: Change) -> None:
    """Every session open at the change is the same connection (same local port),
    answered since with its running total intact (the client checks every total)."""
    for name, client in run.nodes.clients.items():
        assert client.conn_key == record.keys[name], f"{name} changed connection"
        assert client.stats.reconnects == record.reconnects[name], name
        assert client.app is not None and client.app.total > record.totals[name], (
            f"{name} not served on its connection since the change"
        )
    assert_all_served_since(run, record.at + 0.5)


def count_control(run: PoolRun) -> Counter[tuple[str, str]]:
    """(message type, "group" or "direct") -> how many the servers' techniques sent."""
    counts: Counter[tuple[str, str]] = Counter()
    for server in run.nodes.servers.values():
        original = server.handover.send_control

        def send(message: object, to: object, original=original) -> None:
            counts[(type(message).__name__, "group" if to is None else "direct")] += 1
            original(message, to)  # type: ignore[arg-type]

        server.handover.send_control = send  # type: ignore[assignment]
    return counts


# -- a reallocation while every client has a session ------------------------------


def check_r1(run: PoolRun, record: Change, resets_before: dict[str, int]) -> None:
    servers, clients = run.nodes.servers, run.nodes.clients
    # Exactly the sessions in the moved portions are reset (Fig 12)...
    reset = {n for n, c in clients.items() if c.stats.resets > resets_before[n]}
    assert reset == set(record.moved)
    for name, client in clients.items():
        if name not in record.moved:
            assert client.conn_key == record.keys[name], name
            continue
        source, target = record.moved[name]
        # ...and the client reconnects, to the new owner. Its new session starts from a
        # fresh total: had the server kept the old one, the client would see state lost.
        assert client.conn_key != record.keys[name]
        assert old_key(record, name) not in servers[source].endpoint
        key = server_key(client)
        assert holders(run, key) == {target}, name
        total = total_at(servers[target], key)
        assert client.app is not None and total is not None and total >= client.app.total > 0
    assert_all_served_since(run, record.at + 1.0)
    assert outcome(run)["state_lost"] == 0


def check_kept(
    run: PoolRun, technique: str, record: Change, transferred_before: dict[str, int]
) -> None:
    servers = run.nodes.servers
    assert outcome(run) == CLEAN
    assert_kept(run, record)
    moved = record.moved
    sources = {source for source, _ in moved.values()}
    targets = {target for _, target in moved.values()}
    for name, (source, target) in moved.items():
        key = server_key(run.nodes.clients[name])
        # R3: the new owner continues the connection from the transferred state;
        # R2 and R4: the old owner still holds and serves it.
        holder, other = (target, source) if technique == "R3" else (source, target)
        assert holders(run, key) == {holder}, name
        assert key not in servers[other].endpoint, name
        total = total_at(servers[holder], key)
        client = run.nodes.clients[name]
        assert client.app is not None and total is not None
        assert total >= client.app.total > record.totals[name]
    if technique == "R2":
        assert all(servers[s].handover.stats.forwarded_in > 0 for s in sources)
        assert all(servers[t].handover.stats.forwarded_out > 0 for t in targets)
        assert all(servers[t].handover.stats.redirects > 0 for t in targets)
    elif technique == "R3":
        for target in targets:
            arrived = servers[target].handover.stats.transferred_in - transferred_before.get(
                target, 0
            )
            assert arrived == sum(1 for _, t in moved.values() if t == target), target
    else:
        # The clients' edge pushes the old owner's label on the moved connections (a
        # dual-stack edge: each family's on its own family's trees).
        for edge in planes(run.nodes.routers["ra"]):
            moved_here = [n for n in moved if run.nodes.clients[n].address.version == edge.family]
            assert edge.stats.pushed > 0 or not moved_here, edge.family
        assert sum(p.stats.pushed for p in planes(run.nodes.routers["ra"])) > 0
        for source in sources:
            assert servers[source].handover.stats.pinned >= sum(
                1 for s, _ in moved.values() if s == source
            )


@pytest.mark.parametrize("technique", TECHNIQUES)
@family
def test_reallocation_keeps_or_resets_sessions_as_the_technique_says(
    technique: str, family: int
) -> None:
    """Fig 11's cut (s1 from 25% to 10%), then a standby server joins: each time,
    what the technique promises the clients whose portions moved."""
    run = start(topology(technique, family=family))
    control = count_control(run)
    advance(run, 2.0)
    servers = run.nodes.servers
    for action, server in (("set_share", "s1"), ("add", "s5")):
        resets = {n: c.stats.resets for n, c in run.nodes.clients.items()}
        transferred = {n: s.handover.stats.transferred_in for n, s in servers.items()}
        record = change(run, action, server)
        if technique == "R1":
            check_r1(run, record, resets)
        else:
            check_kept(run, technique, record, transferred)
    if technique == "R2":
        # Fig 14: only a connection's first packets cross the control group; after the
        # old owner's redirect the new owner forwards point to point.
        assert control[("Forwarded", "direct")] > 5 * control[("Forwarded", "group")] > 0


# -- R2 with close after the current transaction -------------------------------------


@family
def test_r2_closes_moved_sessions_after_an_answer_and_they_reopen_on_the_new_owner(
    family: int,
) -> None:
    run = start(topology("R2", family=family, close_after_transaction=True))
    advance(run, 2.0)
    record = change(run, "set_share", "s1")
    servers = run.nodes.servers
    # Closed gracefully after an answer: no reset, no failed request, no lost state.
    assert outcome(run) == CLEAN
    closed = sum(s.handover.stats.closed_after_transaction for s in servers.values())
    assert closed == len(record.moved)
    for name, client in run.nodes.clients.items():
        if name not in record.moved:
            assert client.conn_key == record.keys[name], name
            continue
        source, target = record.moved[name]
        assert client.conn_key != record.keys[name], f"{name} kept its old connection"
        assert client.stats.reconnects == record.reconnects[name] + 1
        assert old_key(record, name) not in servers[source].endpoint
        assert holders(run, server_key(client)) == {target}, name
    assert_all_served_since(run, record.at + 1.0)


# -- two reallocations in quick succession -------------------------------------------


@pytest.mark.parametrize("technique", KEEPERS)
@family
def test_two_reallocations_in_quick_succession_keep_every_session(
    technique: str, family: int
) -> None:
    """s1 drops to 10%, and 0.2 s later s4 gives up everything, so some of s1's
    clients, which went to s4, come straight back to s1 while the first handover
    may still be under way."""
    run = start(topology(technique, family=family))
    advance(run, 2.0)
    first = change(run, "set_share", "s1", settle=0.2)
    second = change(run, "set_share", "s4", settle=1.8, share=Fraction(0))
    back = {n for n, (_, to) in first.moved.items() if to == "s4" and second.moved.get(n)}
    assert back, "no client moved twice: the test would prove nothing"
    assert outcome(run) == CLEAN
    assert_kept(run, first)
    assert_kept(run, second)
    assert current(run).share("s4") == 0


# -- failures ------------------------------------------------------------------------


@pytest.mark.parametrize("technique", TECHNIQUES)
@pytest.mark.parametrize("victim", ["s3", "s1"], ids=["server", "coordinator"])
@family
def test_clients_of_a_dead_server_are_served_again(
    technique: str, victim: str, family: int
) -> None:
    """A crash loses the sessions on the dead server (no technique can save them),
    but its clients are served again by the others, whether it coordinated or not."""
    run = start(topology(technique, family=family, clients=24, scenario=[(2.0, "kill", victim)]))
    advance(run, 1.99)
    before = current(run)
    orphans = {n for n, c in run.nodes.clients.items() if owner(run, before, c) == victim}
    assert orphans
    advance(run, 5.0)
    after = current(run)
    assert victim not in after.servers
    assert sum(after.shares().values()) == 1
    assert_all_served_since(run, 3.5)
    for name, client in run.nodes.clients.items():
        assert holders(run, server_key(client)) == {owner(run, after, client)}, name
    # Nobody else's session is disturbed, and no answer ever carries a wrong total.
    disturbed = {n for n, c in run.nodes.clients.items() if c.stats.disruptions}
    assert disturbed <= orphans
    assert outcome(run)["state_lost"] == 0


@pytest.mark.parametrize(
    "technique",
    ["R2", "R3", "R4"],
)
@family
def test_moved_sessions_whose_holder_dies_are_served_again(technique: str, family: int) -> None:
    """After a reallocation the moved sessions live on one server (R2, R4: the old
    owner; R3: the new one). When it crashes, those clients must still get served:
    by a reset and a reconnect, or at worst after their request times out."""
    run = start(topology(technique, family=family))
    advance(run, 2.0)
    record = change(run, "set_share", "s1", settle=1.0)
    if technique == "R3":
        holder = Counter(target for _, target in record.moved.values()).most_common(1)[0][0]
        kept = {n for n, (_, target) in record.moved.items() if target == holder}
    else:
        holder, kept = "s1", set(record.moved)
    at = run.now
    act(run, lambda: run.engine.carry_out(Kill(at=run.now, server=holder), run.now))
    advance(run, at + 4.0)
    after = current(run)
    assert holder not in after.servers
    assert_all_served_since(run, at + 3.0)
    for name in kept:
        client = run.nodes.clients[name]
        assert holders(run, server_key(client)) == {owner(run, after, client)}, name
    assert outcome(run)["state_lost"] == 0


# -- R4 pins go away -----------------------------------------------------------------


def planes(router: Router) -> list[VipPlane]:
    """A router's label plane, or a dual-stack router's two (its IPv4 and IPv6 logic's)."""
    found = [router.vip, router.six.vip] if isinstance(router, DualStackRouter) else [router.vip]
    assert all(plane is not None for plane in found), router.name
    return [plane for plane in found if plane is not None]


def tagged_clients(run: PoolRun) -> set[str]:
    """The clients whose connections the edge router `ra` holds a tag for, each in the
    plane of its family, onto a tree of its family."""
    tagged = set()
    servers = {int(a) for s in run.nodes.servers.values() for a in (s.address, s.address6) if a}
    for edge in planes(run.nodes.routers["ra"]):
        clients = run.nodes.clients.items()
        names = {int(c.address): n for n, c in clients if c.address.version == edge.family}
        tagged |= {names[flow.client] for flow in edge.flows}
        assert {tag.server for tag in edge.flows.values()} <= edge.servers & servers
    return tagged


@family
def test_r4_pins_go_away_when_the_pinned_connections_close(family: int) -> None:
    """Moved clients close their pinned sessions: the old owner untags them, the edge
    router forgets those tags, and the clients' next connections go to the new owner."""
    run = start(topology("R4", family=family))
    advance(run, 2.0)
    record = change(run, "set_share", "s1")
    routers = run.nodes.routers
    # Each moved connection is tagged once, at the clients' edge router only.
    assert tagged_clients(run) == set(record.moved)
    tagging = {n for n, r in routers.items() for p in planes(r) if p.stats.flows_tagged}
    assert tagging == {"ra"}
    closing = [run.nodes.clients[name] for name in sorted(record.moved)[:2]]
    for client in closing:
        act(run, lambda client=client: client.set_rate(0.0, run.now))
    advance(run, run.now + 0.5)  # the last answers arrive

    def close(client: Client) -> None:
        conn = client.endpoint.connection(client.conn_key)  # type: ignore[arg-type]
        assert conn is not None
        conn.close(run.now)
        client.host.flush()

    for client in closing:
        act(run, lambda client=client: close(client))
    advance(run, run.now + 1.0)
    assert tagged_clients(run) == set(record.moved) - {c.name for c in closing}
    servers = run.nodes.servers
    assert sum(s.handover.stats.unpinned for s in servers.values()) == len(closing)
    for client in closing:
        act(run, lambda client=client: client.set_rate(4.0, run.now))
    resumed = run.now
    advance(run, run.now + 1.0)
    for client in closing:
        source, target = record.moved[client.name]
        assert client.conn_key != record.keys[client.name]
        assert old_key(record, client.name) not in servers[source].endpoint
        assert holders(run, server_key(client)) == {target}, client.name
        assert client.stats.first_ok_after(resumed) is not None
    # The moved clients that did not close are still on their pinned paths.
    for name in set(record.moved) - {c.name for c in closing}:
        source, _ = record.moved[name]
        assert run.nodes.clients[name].conn_key == record.keys[name]
        assert holders(run, old_key(record, name)) == {source}
    assert outcome(run) == CLEAN


# -- the live pool on real sockets ---------------------------------------------------


def overlay_set_share(
    run: PoolRun,
    ready: Callable[[], bool] = lambda: True,
    over: Callable[[Allocation], bool] = lambda old: True,
) -> tuple[Allocation, dict[str, object], float, dict[str, Any]]:
    """On the overlay: as soon as every client has a session (and `ready()`), s1
    drops to 10%; run until the handover is over as the clients see it (and
    `over(old allocation)`), then close the network. Returns the allocation before,
    each client's connection then, when the change was asked for, and the summary
    when it was over."""
    network = run.network
    assert isinstance(network, OverlayNetwork)
    clients = run.nodes.clients
    technique = run.topology.pool.technique
    try:
        started = network.run_until(
            DEADLINE,
            once(
                lambda: (
                    all(c.connected and c.stats.requests_ok for c in clients.values()) and ready()
                )
            ),
        )
        assert started, "the clients never all got a session"
        old = current(run)
        keys = {n: c.conn_key for n, c in clients.items()}
        at = network.now
        step = SetShare(at=at, server="s1", share=Fraction(1, 10))
        network.call_at(at, lambda: run.engine.carry_out(step, at))
        # At least 1.8 s (what an idle host needs), then until the handover is over
        # as the clients see it: the routers send each to its new owner, and every
        # client has been answered since (R1: after its reset).
        settled = Settled(run, lambda new: abs(float(new.share("s1")) - 0.1) < 1e-3, at + 1.0)

        def unreset() -> list[str]:  # R1: moved clients not reset yet
            new = agreed(run)
            if technique != "R1" or new is None:
                return []
            return [n for n in moved_clients(run, old, new) if not clients[n].stats.resets]

        summaries: list[dict[str, Any]] = []

        def done() -> bool:
            if network.now < at + 1.8 or not settled() or not served_now(run):
                return False
            if unreset() or not over(old):
                return False
            # The summary as it is now: "served at the end" would slip with the clock.
            summaries.append(run.summary())
            return True

        network.run_until(at + DEADLINE, every(run, 0.05, once(done)))
        assert summaries, (
            f"the handover was not over after {DEADLINE} s: routes settled at "
            f"{settled.at}, everyone served: {served_now(run)}, not reset: {unreset()}, "
            f"the caller's condition: {over(old)}; {run.summary()}"
        )
        return old, keys, at, summaries[0]
    finally:
        network.close()


@pytest.mark.parametrize("technique", TECHNIQUES)
@family
def test_overlay_set_share_on_loopback(technique: str, family: int) -> None:
    """Real UDP sockets and wall-clock time: s1 drops to 10% as soon as every client
    has a session; R1 resets exactly the moved ones, R2-R4 keep every one with its
    state."""
    # Failure detection is not under test here: a generous timeout (3 s) keeps a busy
    # host's scheduling stalls and backlogs from passing for deaths.
    topo = loads(topology(technique, family=family, clients=20, misses=30))
    ports = sum(len(ifaces) for ifaces in topo.interfaces.values())
    run = patient(PoolRun(topo, "overlay", seed=7, base_port=free_base_port(ports)))
    clients = run.nodes.clients
    old, keys, at, summary = overlay_set_share(run)
    new = current(run)
    assert abs(float(new.share("s1")) - 0.1) < 1e-3
    moved = set(moved_clients(run, old, new))
    assert moved
    assert summary["clients"] == summary["clients_served_at_end"] == 20
    assert summary["state_lost"] == 0
    assert_all_served_since(run, at + 1.0)
    if technique == "R1":
        assert summary["resets"] == len(moved)
        assert {n for n, c in clients.items() if c.stats.resets} == moved
        return
    assert summary["resets"] == 0
    assert summary["requests_failed"] == 0
    for name, client in clients.items():
        assert client.conn_key == keys[name], f"{name} changed connection"
