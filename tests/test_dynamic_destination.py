"""Technique D, the dynamic destination (seed Fig 20-21; claims 18-21, 28, 33, 34, 42, 43).

A client opens its connection to the pool's group with a tag and a cookie on
its SYN; the server that answers echoes them on its SYN-ACK with its own unicast
address as the destination, and the rest of the connection goes there point to
point. An overloaded server passes a new connection's SYN to a less loaded one,
which answers with its own destination. When the allocation changes (or a server
is drained), every connection whose client moved goes to its new owner with its
state, and the new owner tells the client where to send with a change-destination
signed with the pool's key, which the client checks against the key the pool
publishes in DNS. Each test is named after the claim it shows and checks what a
client sees, byte for byte where it matters; those that run a pool run it on an
IPv4 and on an IPv6 network (the same topology, numbered in either family), and
those of claims 18, 19 and 43 on a dual-stack one too (half the clients IPv4, half
IPv6: each connection moves within its client's family).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from manycast.apps.counter import RESPONSE
from manycast.auth import public_bytes, public_key
from manycast.pool import pool_keys
from manycast.ports import free_base_port
from manycast.protocol.client import Client
from manycast.protocol.destination import Verdict, sign_change, verify_change
from manycast.protocol.redirect import DRAIN_WINDOW, MOVE_WINDOW
from manycast.protocol.refusal import RedirectRefusal
from manycast.protocol.server import Server
from manycast.protocol.tcp import Demultiplexer, SessionConfig, State
from manycast.runtime import PoolRun
from manycast.space import Allocation
from manycast.steps import Drain, Kill, SetShare, Step
from manycast.topology import builtin, bundled, loads
from manycast.wire.ip import IPPROTO_TCP, Address, make_packet, parse_packet
from manycast.wire.transport import (
    ChangeDestination,
    ChangeDestinationMark,
    Destination,
    TagCookie,
    TcpFlags,
    TcpSegment,
    encode_options,
)
from pooltools import (
    GROUP,
    Trace,
    agreed,
    allocation,
    assert_all_served_since,
    owner,
    patient,
    pool_toml,
    run_pool_until,
    run_to,
    table,
)
from pooltools import start as start_traced
from test_techniques import CLEAN, outcome

PORT = 7000
D = {"technique": "D", "report_interval_ms": 500}
Key = tuple[tuple[Any, int], tuple[Any, int]]
family = pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
DUAL = 46  # `family` of a dual-stack pool: both groups, a client LAN of each family
any_family = pytest.mark.parametrize("family", [4, 6, DUAL], ids=["ipv4", "ipv6", "dual"])
# Per family: the pool's group; an address on the clients' LAN that is no server's;
# a multicast address no move may name.
GROUPS: dict[int, Address] = {4: GROUP, 6: ipaddress.IPv6Address("ff3e::8000:1")}
ATTACKERS: dict[int, Address] = {
    4: ipaddress.IPv4Address("10.1.0.250"),
    6: ipaddress.IPv6Address("2001:db8:a::fa"),
}
MULTICAST: dict[int, Address] = {
    4: ipaddress.IPv4Address("239.1.2.3"),
    6: ipaddress.IPv6Address("ff0e::1:2:3"),
}
ATTACKER = ATTACKERS[4]  # the IPv4 pool's (test_fuzz_change_destination.py)


def in_family(text: str, family: int) -> str:
    """pooltools' IPv4 topology, or the same on an IPv6 network: the group and the
    clients' LANs IPv6, the servers' links numbered from 2001:db8::/32; or (DUAL) a
    dual-stack pool's, its a clients on their IPv4 LAN and as many (b1..) on an IPv6
    one."""
    if family == 4:
        return text
    if family == DUAL:
        return dual_stack(text)
    for old, new in (
        (f'group = "{GROUP}"', f'group = "{GROUPS[6]}"'),
        ('subnet = "10.1.0.0/24"', 'subnet = "2001:db8:a::/64"'),
        ('subnet = "10.2.0.0/24"', 'subnet = "2001:db8:b::/64"'),
    ):
        text = text.replace(old, new)
    return re.sub(r'^subnet = "[0-9./]+"\n', "", text, flags=re.MULTILINE)


def dual_stack(text: str) -> str:
    """pooltools' IPv4 topology as a dual-stack pool's: both spaces and groups, and
    beside the a clients on their IPv4 LAN as many b1.. on 2001:db8:a::/64 (the same
    low-order bits, so the same buckets: each change moves clients of both families)."""
    text = text.replace(
        f'group = "{GROUP}"',
        f'space = ["10.0.0.0/8", "2001:db8::/32"]\ngroup = ["{GROUP}", "{GROUPS[6]}"]',
    )
    block = re.search(r'\[\[clients\]\]\nname = "a"\n(?:[^\[\n][^\n]*\n)+', text)
    assert block is not None
    six = block[0].replace('name = "a"', 'name = "b"').replace("10.1.0.0/24", "2001:db8:a::/64")
    return text.replace(block[0], block[0] + "\n" + six)


def address_at(server: Server, client: Client) -> Address:
    """The server's address of the client's family (a dual-stack pool's has two)."""
    if client.address.version == 6 and server.address6 is not None:
        return server.address6
    return server.address


def group_for(run: PoolRun, client: Client) -> Address:
    """The pool's group of the client's family."""
    return run.topology.pool.group_of(client.address.version)


def d_pool(
    clients: int = 24,
    plain: int = 0,
    rate: float = 4.0,
    scenario: Any = (),
    per_connection: int = 0,
    family: int = 4,
    **pool: Any,
) -> str:
    """clients a1.. -- ra -- core -- rs1 (s1, s3) / rs2 (s2, s4), technique D; `plain`
    clients p1.. without the extension on a LAN of their own behind ra; with
    `per_connection`, the a clients open a new connection after so many answers.
    On an IPv4 network, or the same on an IPv6 one (`family`)."""
    text = pool_toml(clients=clients, rate=rate, pool={**D, **pool}, scenario=scenario)
    if per_connection:
        text = text.replace(
            '[[clients]]\nname = "a"\n',
            f'[[clients]]\nname = "a"\nrequests_per_connection = {per_connection}\n',
        )
    if plain:
        text += "\n" + table(
            "clients",
            name="p",
            count=plain,
            router="ra",
            subnet="10.2.0.0/24",
            rate=rate,
            dynamic_destination=False,
        )
    return in_family(text, family)


# -- what the clients see on the wire ------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """A TCP segment a client sent (out) or received."""

    at: float
    client: str
    out: bool
    src: Address
    dst: Address
    segment: TcpSegment


def watch_wire(run: PoolRun) -> list[Seen]:
    """Every TCP segment the clients send and receive from now on."""
    seen: list[Seen] = []

    def record(name: str, out: bool, packet: bytes, now: float) -> None:
        ip = parse_packet(packet)
        if ip.protocol == IPPROTO_TCP:
            src, dst = ip.header.src, ip.header.dst
            segment = TcpSegment.from_wire(ip.payload, src, dst)
            seen.append(Seen(now, name, out, src, dst, segment))

    for client in run.nodes.clients.values():
        receive = client.receive

        def hooked(
            iface: str, packet: bytes, now: float, name: str = client.name, original: Any = receive
        ) -> None:
            record(name, False, packet, now)
            original(iface, packet, now)

        client.receive = hooked  # type: ignore[method-assign]
        send_ip = client.host.send_ip

        def sent(*args: Any, name: str = client.name, original: Any = send_ip, **kw: Any) -> bytes:
            wire: bytes = original(*args, **kw)
            record(name, True, wire, run.now)
            return wire

        client.host.send_ip = sent  # type: ignore[method-assign]
    return seen


def syns(seen: list[Seen], name: str) -> list[Seen]:
    flags = TcpFlags.SYN | TcpFlags.ACK | TcpFlags.RST
    return [
        s for s in seen if s.client == name and s.out and s.segment.flags & flags == TcpFlags.SYN
    ]


def syn_acks(seen: list[Seen], name: str) -> list[Seen]:
    both = TcpFlags.SYN | TcpFlags.ACK
    return [s for s in seen if s.client == name and not s.out and s.segment.flags & both == both]


def changes(seen: list[Seen], name: str) -> list[Seen]:
    return [
        s
        for s in seen
        if s.client == name and not s.out and s.segment.option(ChangeDestinationMark) is not None
    ]


def address_of(run: PoolRun) -> dict[Address, str]:
    """Every server's name by its addresses (a dual-stack pool's have two)."""
    nodes = run.nodes
    return {
        address: name
        for name, s in {**nodes.servers, **nodes.standby}.items()
        for address in (s.address, s.address6)
        if address is not None
    }


def remote(client: Client) -> tuple[Any, int]:
    assert client.conn_key is not None
    return client.conn_key[1]  # type: ignore[index, no-any-return]


def server_key(client: Client) -> Key:
    assert client.conn_key is not None
    local, far = client.conn_key  # type: ignore[misc]
    return (far, local)


def holders(run: PoolRun, key: Key) -> set[str]:
    return {n for n, s in run.nodes.servers.items() if key in s.endpoint and key in s.app}


def total_at(server: Server, key: Key) -> int:
    _, total, _ = struct.unpack_from("!BQI", server.app.export(key))
    return int(total)


def act(run: PoolRun, action: Callable[[], object]) -> None:
    """Do something to the nodes now, inside the driver (it carries out what they send)."""
    run.network.call_at(run.now, action)
    run_to(run, run.now)


def carry_out(run: PoolRun, step: Step) -> None:
    act(run, lambda: run.engine.carry_out(step, run.now))


def settled(text: str, seed: int = 1) -> tuple[PoolRun, Trace, list[Seen]]:
    run, trace = start_traced(text, seed)
    seen = watch_wire(run)
    run_to(run, 2.0)
    for name, client in run.nodes.clients.items():
        assert client.connected and client.stats.requests_ok > 0, f"{name} has no session"
    return run, trace, seen


@dataclass
class Change:
    old: Allocation
    new: Allocation
    at: float
    keys: dict[str, Any]
    totals: dict[str, int]
    moved: dict[str, tuple[str, str]]  # client -> (old owner, new owner)


def reallocate(run: PoolRun, step: Step, settle: float = 1.5) -> Change:
    """Carry out `step` now and run on `settle` seconds; the clients it moved."""
    clients = run.nodes.clients
    old = allocation(run)
    at = run.now
    keys = {n: c.conn_key for n, c in clients.items()}
    totals = {n: c.app.total for n, c in clients.items() if c.app is not None}  # type: ignore[attr-defined]
    carry_out(run, step)
    run_to(run, at + settle)
    new = allocation(run)
    moved = {
        n: (before, after)
        for n, c in clients.items()
        if (before := owner(run, old, c)) != (after := owner(run, new, c))
        and before is not None
        and after is not None
    }
    assert moved, "the change moved no client: the test would prove nothing"
    if run.topology.pool.dual:  # then clients of both families moved
        assert {clients[n].address.version for n in moved} == {4, 6}, moved
    return Change(old, new, at, keys, totals, moved)


def record_answers(run: PoolRun) -> dict[str, bytearray]:
    """The bytes each client's connection delivers to its session from now on."""
    streams: dict[str, bytearray] = {}
    for name, client in run.nodes.clients.items():
        app = client.app
        assert app is not None
        stream = streams[name] = bytearray()
        on_data = app.on_data

        def recorded(data: bytes, now: float, on_data: Any = on_data, stream: Any = stream) -> Any:
            stream.extend(data)
            return on_data(data, now)

        app.on_data = recorded  # type: ignore[method-assign]
    return streams


# -- claim 18: SYN with tag and cookie, SYN-ACK with tag, cookie and destination ----------


@any_family
def test_claim_18_the_first_server_answers_with_its_destination_then_all_is_point_to_point(
    family: int,
) -> None:
    run, trace, seen = settled(d_pool(family=family))
    by_address = address_of(run)
    owners = allocation(run)
    for name, client in run.nodes.clients.items():
        [syn] = syns(seen, name)
        offered = syn.segment.option(TagCookie)
        assert syn.dst == group_for(run, client) and offered is not None
        [answer] = syn_acks(seen, name)
        # Fig 20, 2040: the same tag and cookie, and the answering server's destination
        # (its address of the client's family).
        assert answer.src == group_for(run, client)
        assert answer.segment.option(TagCookie) == offered
        destination = answer.segment.option(Destination)
        assert destination is not None and destination.port == PORT
        assert destination.address.version == client.address.version
        assert by_address[destination.address] == owner(run, owners, client), name
        # The rest of the connection goes there, point to point, both ways.
        rest = [s for s in seen if s.client == name and s.at >= answer.at and s is not answer]
        assert rest and all((s.dst if s.out else s.src) == destination.address for s in rest), name
        assert remote(client) == (destination.address, PORT)
        assert client.stats.destinations_followed == 1
    # The routers carried each connection to the group once: its SYN.
    assert len(trace.deliveries) == sum(len(syns(seen, n)) for n in run.nodes.clients)
    assert all(s.redirector is not None for s in run.nodes.servers.values())
    followed = sum(s.redirector.stats.followed for s in run.nodes.servers.values())  # type: ignore[union-attr]
    assert followed == len(run.nodes.clients)
    assert outcome(run) == CLEAN


def loads_spread(run: PoolRun, since: dict[str, int], seconds: float) -> float:
    """max/mean of the servers' request rates over the last `seconds` (counts since)."""
    rates = [(s.app.requests - since[n]) / seconds for n, s in run.nodes.servers.items()]
    return max(rates) / (sum(rates) / len(rates))


@any_family
def test_claim_18_an_overloaded_first_server_passes_the_syn_to_a_second_which_answers_it(
    family: int,
) -> None:
    """Fig 20's second server: s1 holds 70% of the clients; over 1.3 times the mean
    load it passes new connections to less loaded servers, which answer each with
    their own destination in the same handshake."""
    text = d_pool(
        clients=40,
        family=family,
        per_connection=4,
        redirect_above=1.3,
        scenario=[(0.05, "set_share", {"server": "s1", "share": 0.7})],
    )
    run, _ = start_traced(text)
    seen = watch_wire(run)
    servers = run.nodes.servers
    run_to(run, 2.0)
    assert abs(float(allocation(run).share("s1")) - 0.7) < 1e-3
    counts = {n: s.app.requests for n, s in servers.items()}
    run_to(run, 3.0)  # loads settle (3 s): nothing passed yet
    before = loads_spread(run, counts, 1.0)
    s1 = servers["s1"].redirector
    assert s1 is not None and s1.stats.passed == 0
    run_to(run, 6.0)
    counts = {n: s.app.requests for n, s in servers.items()}
    run_to(run, 8.0)
    after = loads_spread(run, counts, 2.0)
    assert s1.stats.passed > 10
    taken = sum(s.redirector.stats.taken for s in servers.values())  # type: ignore[union-attr]
    assert taken == s1.stats.passed  # no SYN was sent again, each answered once
    assert after < before * 0.8, (before, after)
    by_address = address_of(run)
    owners = allocation(run)
    handed = 0
    for name, client in run.nodes.clients.items():
        for answer in syn_acks(seen, name):
            destination = answer.segment.option(Destination)
            assert destination is not None
            assert destination.address.version == client.address.version
            server = by_address[destination.address]
            if owner(run, owners, client) == "s1" and server != "s1":
                handed += 1
                # the second server answers the SYN itself
                assert answer.src == group_for(run, client)
    assert handed >= s1.stats.passed  # (and a few answered by s1's owner before the cut)
    # One handshake per connection, never a second round trip from scratch.
    for name, client in run.nodes.clients.items():
        assert len(syns(seen, name)) == client.stats.connects, name
    assert outcome(run) == CLEAN


# -- claim 19: a second server sends the tag, the cookie and the new destination ----------


@any_family
def test_claim_19_a_moved_connection_follows_its_new_owner_with_nothing_lost(family: int) -> None:
    run, _, seen = settled(d_pool(family=family))
    streams = record_answers(run)
    key, _ = pool_keys(run.topology, 1)
    by_address = address_of(run)
    servers = run.nodes.servers
    for step in (
        SetShare(at=0, server="s1", share=Fraction(1, 10)),  # Fig 11's cut
        SetShare(at=0, server="s4", share=Fraction(1, 2)),
    ):
        mark = len(seen)
        record = reallocate(run, dataclasses.replace(step, at=run.now))
        run_to(run, run.now + 1.0)
        assert outcome(run) == CLEAN
        for name, client in run.nodes.clients.items():
            # The same connection (same local port, no reconnect), served since.
            assert client.conn_key[0] == record.keys[name][0], name  # type: ignore[index]
            assert client.stats.reconnects == 0
            assert client.app is not None and client.app.total > record.totals[name]
            new = owner(run, record.new, client)
            assert new is not None
            assert remote(client) == (address_at(servers[new], client), PORT), name
            assert holders(run, server_key(client)) == {new}, name
            assert total_at(servers[new], server_key(client)) >= client.app.total
            moves = changes(seen[mark:], name)
            if name not in record.moved:
                assert not moves, f"{name} did not move and was told to"
                continue
            _, target = record.moved[name]
            # Fig 20, 2050: from the second server, with the connection's tag and
            # cookie and the new destination, signed with the pool's key (Fig 21).
            message = ChangeDestination.from_wire(moves[0].segment.payload)
            conn = client.endpoint.connection(client.conn_key)  # type: ignore[arg-type]
            assert conn is not None
            assert by_address[moves[0].src] == target
            assert (message.tag, message.cookie) == (conn.tag, conn.cookie)
            assert (message.address, message.port) == (address_at(servers[target], client), PORT)
            # The key the pool publishes under its group of the client's family.
            published = public_key(run.nodes.directory[int(group_for(run, client))])
            assert verify_change(message, published)
            assert verify_change(message, key.public_key())
            assert {ChangeDestination.from_wire(m.segment.payload) for m in moves} == {message}
            assert client.stats.moves[-1][1] == message.serial
    # No byte lost, duplicated or reordered: each connection's answers, one after the
    # other, with the running total of every increment it sent.
    for name, stream in streams.items():
        assert len(stream) % RESPONSE.size == 0, name
        sequences = [sequence for sequence, _ in RESPONSE.iter_unpack(bytes(stream))]
        assert sequences == list(range(sequences[0], sequences[0] + len(sequences))), name
    moved_out = sum(s.redirector.stats.moved_out for s in servers.values())  # type: ignore[union-attr]
    assert moved_out == sum(c.stats.destination_changes for c in run.nodes.clients.values())


def test_a_server_keeps_a_record_of_its_moves_only_when_a_measurement_asks() -> None:
    """A long-running server kept its last 10 000 moves for measurements, some 2 MB a
    server, which grew the soak's infrastructure process until they filled (docs/soak.md,
    finding 30, seed 20261201 with D). Now only a server asked (`record_moves`, as
    bench/redirect.py asks) keeps them."""
    run, _, _ = settled(d_pool())
    servers = run.nodes.servers
    asked = servers["s1"].redirector
    assert asked is not None
    asked.record_moves(kept=3)
    for step in (
        SetShare(at=0, server="s1", share=Fraction(1, 10)),
        SetShare(at=0, server="s4", share=Fraction(1, 2)),
    ):
        reallocate(run, dataclasses.replace(step, at=run.now))
        run_to(run, run.now + 1.0)
    assert outcome(run) == CLEAN
    assert asked.stats.moved_out > 3 and asked.released is not None
    assert len(asked.released) == 3
    wall = run.network.wall_base
    assert all(wall <= at <= wall + run.now for at, _, _, _ in asked.released)
    others = [s.redirector for name, s in servers.items() if name != "s1"]
    assert sum(r.stats.moved_out for r in others if r is not None) > 0
    assert all(r is not None and r.released is None for r in others)


@family
def test_a_server_lets_go_one_connection_per_new_owner_at_a_time_until_it_drains(
    family: int,
) -> None:
    """While it serves, a server hands a new owner the next connection when that one
    acknowledged the last (`MOVE_WINDOW`): a burst would make each wait for all before
    it. A draining server, which must be empty within its grace, sends more at once."""
    run, _, _ = settled(d_pool(clients=96, family=family))
    servers = run.nodes.servers
    most: dict[str, Counter[str]] = {"serving": Counter(), "draining": Counter()}
    for server in servers.values():
        redirector = server.redirector
        assert redirector is not None

        def counted(key: Any, target: Any, now: float, r: Any = redirector) -> bool:
            moved = type(r).move(r, key, target, now)
            if moved:
                flight = sum(1 for m in r._outgoing.values() if m.target == target)
                mode = "serving" if r.serving() else "draining"
                most[mode][r.name] = max(most[mode][r.name], flight)
            return moved

        redirector.move = counted  # type: ignore[method-assign]
    record = reallocate(run, SetShare(at=run.now, server="s1", share=Fraction(1, 20)))
    run_to(run, run.now + 1.0)
    assert outcome(run) == CLEAN
    assert len(record.moved) > 8 and most["serving"]["s1"] == MOVE_WINDOW
    for name in record.moved:
        client = run.nodes.clients[name]
        assert holders(run, server_key(client)) == {record.new.owner(client.address)}
    drain = Drain(at=run.now, server="s2", grace=1.5)
    carry_out(run, drain)
    run_to(run, drain.at + drain.grace - 0.01)
    assert servers["s2"].sessions == 0
    assert MOVE_WINDOW < most["draining"]["s2"] <= DRAIN_WINDOW


@family
def test_moving_connections_formats_no_address_whatever_the_family(
    family: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server with many connections to move goes over those still waiting at every
    acknowledgment: the cost of each pass must not grow with the family. Writing an
    address as text (to order the waiting ones, to find a client's owner) costs ten
    times more for an IPv6 address than for an IPv4 one, and made technique D's IPv6
    servers spend a third more CPU than IPv4's in bench/reallocation.py (their
    unmoved sessions' p99 three times IPv4's). Addresses are worked on as numbers."""
    run, _, _ = settled(d_pool(clients=96, family=family))
    formatted = Counter[int]()
    for cls in (ipaddress.IPv4Address, ipaddress.IPv6Address):

        def counted(address: Any, text: Callable[[Any], str] = cls.__str__) -> str:
            formatted[address.version] += 1
            return text(address)

        monkeypatch.setattr(cls, "__str__", counted)
    record = reallocate(run, SetShare(at=run.now, server="s1", share=Fraction(1, 20)))
    run_to(run, run.now + 1.0)
    monkeypatch.undo()
    assert outcome(run) == CLEAN
    moved = sum(s.redirector.stats.moved_out for s in run.nodes.servers.values())  # type: ignore[union-attr]
    assert moved == len(record.moved) > 8
    # Before: 972 on IPv4 and 1648 on IPv6 for these 18 moves, some 54-92 a move.
    assert sum(formatted.values()) < moved, formatted


@any_family
def test_claim_19_two_changes_in_quick_succession_leave_every_client_with_its_owner(
    family: int,
) -> None:
    """s1 drops to 10% and 0.2 s later s3 gives up everything: some of s1's clients go to
    s3 and straight back to s1, the second time perhaps before they heard of the first."""
    run, _, _ = settled(d_pool(family=family))
    first = reallocate(run, SetShare(at=run.now, server="s1", share=Fraction(1, 10)), settle=0.2)
    second = reallocate(run, SetShare(at=run.now, server="s3", share=Fraction(0)), settle=1.8)
    twice = {n for n, (_, to) in first.moved.items() if to == "s3" and n in second.moved}
    assert twice, "no client moved twice: the test would prove nothing"
    assert outcome(run) == CLEAN
    servers = run.nodes.servers
    for name, client in run.nodes.clients.items():
        new = owner(run, second.new, client)
        assert new is not None
        assert remote(client) == (address_at(servers[new], client), PORT), name
        assert holders(run, server_key(client)) == {new}
        serials = [serial for _, serial in client.stats.moves]
        assert serials == sorted(set(serials)), name
        assert client.app is not None and client.app.total > second.totals[name]
    for name in twice:
        assert [s for _, s in run.nodes.clients[name].stats.moves] == [1, 2], name
    assert servers["s3"].sessions == 0


@any_family
def test_claim_19_a_drained_server_hands_every_connection_on_before_it_leaves(family: int) -> None:
    run, _, _ = settled(d_pool(family=family))
    servers = run.nodes.servers
    held = {n for n, c in run.nodes.clients.items() if holders(run, server_key(c)) == {"s2"}}
    assert held
    drain = Drain(at=run.now, server="s2", grace=1.5)
    carry_out(run, drain)
    run.network.call_at(drain.at + drain.grace, lambda: run.engine.carry_out(drain.then(), run.now))
    run_to(run, drain.at + drain.grace - 0.01)
    # Before it leaves: nothing of the pool is left on s2.
    assert servers["s2"].sessions == 0
    own = {servers["s2"].address, servers["s2"].address6}
    assert not [k for k in servers["s2"].endpoint.keys() if k[1][0] not in own]
    run_to(run, drain.at + drain.grace + 2.0)
    assert run.engine.status("s2") == "dead"
    assert outcome(run) == CLEAN
    assert_all_served_since(run, drain.at + drain.grace + 0.5)
    for name in held:
        client = run.nodes.clients[name]
        assert client.stats.destination_changes == 1
        assert holders(run, server_key(client)) == {owner(run, allocation(run), client)}
    events = [e.what for e in run.engine.events]
    assert events == ["drain server=s2 grace=1.5", "leave server=s2"]


# -- claims 20, 21: the SYN's tag and cookie, echoed by the SYN-ACK -------------------------


@family
def test_claim_20_every_syn_carries_a_fresh_tag_and_cookie_in_the_shared_experimental_option(
    family: int,
) -> None:
    run, _, seen = settled(d_pool(clients=16, plain=4, family=family))
    # A crash makes the crashed server's clients open new connections.
    carry_out(run, Kill(at=run.now, server="s3"))
    run_to(run, run.now + 5.0)
    offered: list[tuple[int, int]] = []
    for name, spec in run.topology.clients.items():
        for syn in syns(seen, name):
            area = encode_options(syn.segment.options)
            option = syn.segment.option(TagCookie)
            if not spec.dynamic_destination:
                assert option is None and b"\x4d\x43" not in area, name
                continue
            # RFC 6994: kind 253, length 17, ExID "MC", subtype 1, tag u32, cookie u64.
            assert option is not None
            exact = bytes([253, 17]) + b"MC\x01" + struct.pack("!IQ", option.tag, option.cookie)
            assert exact in area, name
            offered.append((option.tag, option.cookie))
    reconnected = [n for n, c in run.nodes.clients.items() if c.stats.connects > 1]
    assert reconnected and len(offered) > len(run.nodes.clients) - 4
    # A SYN sent again keeps its pair; every connection has its own.
    by_connection: dict[tuple[str, int], set[TagCookie]] = {}
    for item in seen:
        option = item.segment.option(TagCookie) if item.out else None
        if option is not None:
            by_connection.setdefault((item.client, item.segment.src_port), set()).add(option)
    assert all(len(pairs) == 1 for pairs in by_connection.values())
    pairs = [next(iter(p)) for p in by_connection.values()]
    assert len(set(pairs)) == len(pairs) == len(offered) - resent(seen)
    assert_all_served_since(run, run.now - 1.5)


def resent(seen: list[Seen]) -> int:
    """SYNs the clients sent again (the same connection, the same sequence number)."""
    first = {
        (s.client, s.segment.src_port, s.segment.seq)
        for s in seen
        if s.out and s.segment.flags & TcpFlags.SYN
    }
    return sum(1 for s in seen if s.out and s.segment.flags & TcpFlags.SYN) - len(first)


@family
def test_claim_21_the_syn_ack_echoes_the_pair_and_a_forged_one_is_not_followed(family: int) -> None:
    attacker = ATTACKERS[family]
    run, _ = start_traced(d_pool(clients=8, family=family))
    seen = watch_wire(run)
    forged: list[str] = []
    for client in run.nodes.clients.values():
        receive = client.receive

        def tampering(
            iface: str, packet: bytes, now: float, client: Client = client, original: Any = receive
        ) -> None:
            ip = parse_packet(packet)
            if ip.protocol != IPPROTO_TCP:  # the router's General Query
                original(iface, packet, now)
                return
            segment = TcpSegment.from_wire(ip.payload, ip.header.src, ip.header.dst)
            echo = segment.option(TagCookie)
            if echo is not None and segment.flags & TcpFlags.SYN and client.name not in forged:
                # An attacker's copy first: the wrong cookie, and its own destination.
                forged.append(client.name)
                options = (TagCookie(echo.tag, echo.cookie ^ 1), Destination(attacker, PORT))
                fake = dataclasses.replace(segment, options=options)
                wire = make_packet(
                    ip.header.src,
                    ip.header.dst,
                    IPPROTO_TCP,
                    fake.to_wire(ip.header.src, ip.header.dst),
                ).to_wire()
                original(iface, wire, now)
            original(iface, packet, now)

        client.receive = tampering  # type: ignore[method-assign]
    run_to(run, 2.0)
    assert sorted(forged) == sorted(run.nodes.clients)
    by_address = address_of(run)
    for name, client in run.nodes.clients.items():
        [syn] = syns(seen, name)
        real = [
            a
            for a in syn_acks(seen, name)
            if a.segment.option(TagCookie) == syn.segment.option(TagCookie)
        ]
        assert real, name
        assert remote(client)[0] != attacker and remote(client)[0] in by_address
        assert client.connected and client.stats.requests_ok > 0
        assert all(s.dst != attacker for s in seen if s.client == name and s.out)
    assert outcome(run) == CLEAN


# -- claim 28: the network, on real sockets, with the key from a real DNS server -----------


@any_family
def test_claim_28_on_real_sockets_requests_carry_tag_and_cookie_and_moves_check_dns(
    family: int,
) -> None:
    topo = loads(d_pool(clients=16, report_interval_ms=500, heartbeat_misses=30, family=family))
    ports = topo.attachment_count
    run = patient(PoolRun(topo, "overlay", seed=5, base_port=free_base_port(ports)))
    clients = run.nodes.clients
    asked: list[float] = []
    state: dict[str, Any] = {}

    def ready() -> bool:
        return all(c.connected and c.stats.requests_ok for c in clients.values())

    def condition() -> bool:
        if not asked:
            old = agreed(run)
            if ready() and old is not None:
                asked.append(run.now)
                state["old"] = old
                state["keys"] = {n: c.conn_key for n, c in clients.items()}
                step = SetShare(at=run.now, server="s1", share=Fraction(1, 10))
                run.network.call_at(run.now, lambda: run.engine.carry_out(step, run.now))
            return False
        new = agreed(run)
        if new is None or abs(float(new.share("s1")) - 0.1) > 1e-3:
            return False
        moved = [n for n, c in clients.items() if owner(run, state["old"], c) != owner(run, new, c)]
        state["moved"] = moved
        servers = run.nodes.servers
        return all(
            remote(clients[n])
            == (address_at(servers[owner(run, new, clients[n])], clients[n]), PORT)  # type: ignore[index]
            for n in moved
        ) and all(c.stats.first_ok_after(asked[0] + 0.5) for c in clients.values())

    held, summary = run_pool_until(run, condition)
    assert held, f"the moves were not over in time: {summary}"
    assert run.dns_address is not None  # the clients asked a real DNS server for the key
    moved = state["moved"]
    assert moved
    # (a dual-stack pool's: clients of both families, each checking its move with the
    # key published under the reverse name of its family's group)
    assert {clients[n].address.version for n in moved} == {
        c.address.version for c in clients.values()
    }
    assert summary["requests_failed"] == 0 and summary["resets"] == 0 and summary["state_lost"] == 0
    for name, client in clients.items():
        assert client.conn_key[0] == state["keys"][name][0]  # type: ignore[index]
        assert client.stats.destinations_followed >= 1
        assert client.guard.stats.key_lookups >= 1
    assert sum(clients[n].stats.destination_changes for n in moved) == len(moved)
    assert not sum((c.stats.redirects_refused for c in clients.values()), Counter())


# -- claims 33, 34: the client and the server programs ------------------------------------


@family
def test_claim_33_clients_without_the_extension_are_never_redirected(family: int) -> None:
    """The client program offers the extension; a plain client (its SYN without the
    option) stays on the group address and its technique, R3, keeps it."""
    group = GROUPS[family]
    run, _, seen = settled(d_pool(clients=16, plain=16, family=family))
    plain = {n for n, spec in run.topology.clients.items() if not spec.dynamic_destination}
    record = reallocate(run, SetShare(at=run.now, server="s1", share=Fraction(1, 10)))
    run_to(run, run.now + 1.0)
    assert outcome(run) == CLEAN
    assert record.moved.keys() & plain and record.moved.keys() - plain
    servers = run.nodes.servers
    for name in plain:
        client = run.nodes.clients[name]
        assert client.conn_key == record.keys[name], name
        assert remote(client) == (group, PORT)
        assert not changes(seen, name) and client.stats.destinations_followed == 0
        for answer in syn_acks(seen, name):
            assert answer.segment.option(TagCookie) is None
            assert answer.segment.option(Destination) is None
        owner = record.new.owner(client.address)
        assert holders(run, server_key(client)) == {owner}
    transferred = sum(s.handover.stats.transferred_in for s in servers.values())
    assert transferred == len(record.moved.keys() & plain)
    extended = record.moved.keys() - plain
    assert sum(run.nodes.clients[n].stats.destination_changes for n in extended) == len(extended)
    # An overloaded server passes on only SYNs that offer the extension.
    s1 = servers["s1"]
    assert s1.redirector is not None
    s1.redirector.less_loaded = lambda now: servers["s2"].address
    client = run.nodes.clients[sorted(plain)[0]]
    syn = TcpSegment(40001, PORT, 1, 0, TcpFlags.SYN, 1000)
    ip = make_packet(client.address, group, IPPROTO_TCP, syn.to_wire(client.address, group))
    assert not s1.redirector.pass_syn(ip, ip.to_wire(), run.now)
    offered = dataclasses.replace(syn, options=(TagCookie(1, 2),))
    ip = make_packet(client.address, group, IPPROTO_TCP, offered.to_wire(client.address, group))
    assert s1.redirector.pass_syn(ip, ip.to_wire(), run.now)


@family
def test_claim_34_every_server_signs_its_moves_with_the_key_the_pool_publishes(family: int) -> None:
    run, _, seen = settled(d_pool(family=family))
    [record] = [r for r in run.pool_records() if r.group == GROUPS[family]]
    published = record.public_key
    key, outsider = pool_keys(run.topology, 1)
    assert published == public_bytes(key)
    wall = run.network.wall_base
    reallocate(run, SetShare(at=run.now, server="s1", share=Fraction(1, 10)))
    reallocate(run, SetShare(at=run.now, server="s1", share=Fraction(1, 2)))
    by_address = address_of(run)
    checked = 0
    for name in run.nodes.clients:
        for answer in syn_acks(seen, name):
            destination = answer.segment.option(Destination)
            assert destination is not None and destination.address in by_address
        messages: list[ChangeDestination] = []
        for item in changes(seen, name):
            message = ChangeDestination.from_wire(item.segment.payload)
            # Sent by the server it names, signed with the published key, fresh.
            assert item.src == message.address
            assert verify_change(message, public_key(published))
            assert not verify_change(message, outsider.public_key())
            if message not in messages:
                assert 0 <= wall + item.at - message.timestamp_ms / 1000 < 0.05
                messages.append(message)
        assert [m.serial for m in messages] == list(range(1, len(messages) + 1)), name
        checked += len(messages)
    assert checked >= 2
    for server in run.nodes.servers.values():
        assert server.redirector is not None and server.redirector.stats.move_failed == 0


# -- claim 42: a client takes a change of destination only from the pool ------------------


def hijack_segment(
    client: Client, message: ChangeDestination | bytes, seq_shift: int = 0
) -> TcpSegment:
    conn = client.endpoint.connection(client.conn_key)  # type: ignore[arg-type]
    assert conn is not None
    state = conn.session_state()
    assert state.receive is not None
    payload = message if isinstance(message, bytes) else message.to_wire()
    return TcpSegment(
        PORT,
        client.conn_key[0][1],  # type: ignore[index]
        (state.receive.rcv_nxt + seq_shift) % 2**32,
        state.snd_nxt % 2**32,
        TcpFlags.ACK,
        65535,
        options=(ChangeDestinationMark(),),
        payload=payload,
    )


def inject(run: PoolRun, client: Client, src: Address, segment: TcpSegment) -> None:
    wire = make_packet(src, client.address, IPPROTO_TCP, segment.to_wire(src, client.address))
    act(run, lambda: client.receive(client.host.iface, wire.to_wire(), run.now))


def attempts(
    client: Client, key: Ed25519PrivateKey, outsider: Ed25519PrivateKey, wall_ms: int, family: int
) -> list[tuple[str, ChangeDestination | bytes, int, RedirectRefusal]]:
    """(what, message, sequence shift, the reason it must be refused) of every kind of
    hijack: each names the attacker's address as the new destination."""
    conn = client.endpoint.connection(client.conn_key)  # type: ignore[arg-type]
    assert conn is not None and conn.tag is not None and conn.cookie is not None
    serial = client.guard.last_serial + 1
    base = ChangeDestination(conn.tag, conn.cookie, ATTACKERS[family], PORT, serial, wall_ms)
    signed = sign_change(base, key)
    replace = dataclasses.replace
    return [
        ("forged", replace(base, signature=bytes(64)), 0, RedirectRefusal.BAD_SIGNATURE),
        ("other key", sign_change(base, outsider), 0, RedirectRefusal.BAD_SIGNATURE),
        ("tampered", replace(signed, port=PORT + 1), 0, RedirectRefusal.BAD_SIGNATURE),
        (
            "replayed",
            sign_change(replace(base, serial=serial - 1), key),
            0,
            RedirectRefusal.REPLAYED,
        ),
        (
            "stale",
            sign_change(replace(base, timestamp_ms=wall_ms - 60_000), key),
            0,
            RedirectRefusal.STALE,
        ),
        (
            "wrong cookie",
            sign_change(replace(base, cookie=conn.cookie ^ 1), key),
            0,
            RedirectRefusal.WRONG_COOKIE,
        ),
        (
            "wrong tag",
            sign_change(replace(base, tag=conn.tag ^ 1), key),
            0,
            RedirectRefusal.WRONG_COOKIE,
        ),
        ("unsigned", base, 0, RedirectRefusal.UNSIGNED),
        ("garbage", b"\x01garbage", 0, RedirectRefusal.MALFORMED),
        ("blind", signed, 1 << 30, RedirectRefusal.OUT_OF_WINDOW),
        (
            "multicast",
            sign_change(replace(base, address=MULTICAST[family]), key),
            0,
            RedirectRefusal.BAD_DESTINATION,
        ),
    ]


@family
def test_claim_42_every_hijack_is_refused_counted_and_changes_nothing(family: int) -> None:
    run, _, seen = settled(d_pool(clients=8, family=family))
    # One real move first, so that replays have a serial to come below.
    record = reallocate(run, SetShare(at=run.now, server="s1", share=Fraction(1, 10)))
    key, outsider = pool_keys(run.topology, 1)
    wall = run.network.wall_base
    victims = [run.nodes.clients[n] for n in sorted(record.moved)] + [
        c for n, c in sorted(run.nodes.clients.items()) if n not in record.moved
    ]
    expected: Counter[RedirectRefusal] = Counter()
    tried = 0
    for client in victims:
        before = (client.conn_key, client.stats.destination_changes)
        server = remote(client)[0]
        for index, (what, message, shift, reason) in enumerate(
            attempts(client, key, outsider, int((wall + run.now) * 1000), family)
        ):
            # From the attacker's own address, and spoofing the client's server.
            source = ATTACKERS[family] if index % 2 else server
            inject(run, client, source, hijack_segment(client, message, shift))
            expected[reason] += 1
            tried += 1
            assert client.conn_key == before[0], (client.name, what)
        assert client.stats.destination_changes == before[1]
        if client.name in record.moved:
            # A copy of the real, last instruction changes nothing and is no hijack.
            last = client.guard.last
            assert last is not None
            inject(run, client, server, hijack_segment(client, last))
            assert client.conn_key == before[0]
    refused = sum((c.stats.redirects_refused for c in victims), Counter())
    assert refused == expected and sum(refused.values()) == tried
    # Nobody was disturbed: every client goes on with its server.
    at = run.now
    run_to(run, at + 1.5)
    assert outcome(run) == CLEAN
    assert_all_served_since(run, at + 0.5)
    assert not [s for s in seen if s.out and s.dst == ATTACKERS[family]]


@family
def test_claim_42_a_key_that_cannot_be_fetched_means_refuse(family: int) -> None:
    run, _ = start_traced(d_pool(clients=8, family=family))
    run.nodes.directory.clear()  # DNS has no key for the pool
    run_to(run, 2.0)
    record = reallocate(run, SetShare(at=run.now, server="s1", share=Fraction(1, 10)), settle=0.5)
    clients = run.nodes.clients
    for name in record.moved:
        client = clients[name]
        assert client.stats.destination_changes == 0
        assert client.stats.redirects_refused[RedirectRefusal.NO_KEY] >= 1
    # Their connections went to servers they never accepted: they end, the clients
    # open new ones (to their new owners) and are served again. Nobody else notices.
    at = run.now
    run_to(run, at + 5.0)
    assert_all_served_since(run, at + 4.0)
    for name, client in clients.items():
        if name not in record.moved:
            assert not client.stats.disruptions, name
        else:
            assert client.stats.reconnects >= 1
        owner = allocation(run).owner(client.address)
        assert holders(run, server_key(client)) == {owner}


# -- claim 43: a server that answers with its destination, in a pool that changes ---------


def test_redirect6_is_bundled_beside_redirect_with_the_same_pool_and_scenario() -> None:
    four, six = builtin("redirect"), builtin("redirect6")
    assert "redirect6" in bundled() and six.pool.space.family == 6
    assert [(s.at, s.action) for s in six.scenario] == [(s.at, s.action) for s in four.scenario]
    same = ("technique", "redirect_above", "port", "policy", "heartbeat_s", "name")
    assert {k: getattr(six.pool, k) for k in same} == {k: getattr(four.pool, k) for k in same}
    assert six.clients.keys() == four.clients.keys()
    assert all(a.version == 6 for a in (six.address(n) for n in [*six.clients, *six.servers]))


@pytest.mark.parametrize("name", ["redirect", "redirect6"])
def test_claim_43_the_redirect_demo_serves_every_client_through_a_move_a_drain_and_a_kill(
    name: str,
) -> None:
    """The bundled redirect.toml, and redirect6.toml: its pool and scenario on IPv6."""
    topology = builtin(name)
    assert topology.pool.technique == "D"
    assert topology.pool.space.family == (6 if name.endswith("6") else 4)
    actions = [step.action for step in topology.scenario]
    assert {"set_share", "drain", "kill"} <= set(actions)
    run = PoolRun(topology, "memory", seed=1)
    seen = watch_wire(run)
    run.run(topology.duration)
    summary = run.summary()
    assert summary["clients_served_at_end"] == summary["clients"] == len(topology.clients)
    assert summary["state_lost"] == 0
    clients = run.nodes.clients
    plain = {n for n, spec in topology.clients.items() if not spec.dynamic_destination}
    assert plain
    by_address = address_of(run)
    for name in clients:
        for answer in syn_acks(seen, name):
            destination = answer.segment.option(Destination)
            if name in plain:
                assert destination is None
            else:
                assert destination is not None and destination.address in by_address
    assert sum(clients[n].stats.destination_changes for n in clients if n not in plain) > 10
    assert not sum((c.stats.redirects_refused for c in clients.values()), Counter())
    # Only the killed server's clients were disturbed (their connections died with it).
    killed = next(s.server for s in topology.scenario if isinstance(s, Kill))
    events = {e["what"].split()[0]: e for e in summary["events"]}
    assert events["set_share"]["affected_clients"] == 0
    assert events["drain"]["affected_clients"] == 0
    assert run.engine.status(killed) == "dead"


@pytest.mark.parametrize("victim", ["s3", "s1"], ids=["server", "coordinator"])
@any_family
def test_claim_43_clients_of_a_dead_server_reconnect_and_their_new_owners_answer(
    victim: str, family: int
) -> None:
    """A crash loses the connections on the dead server (no technique saves them): its
    clients open new ones, whose SYN-ACKs give their new owners' destinations; the
    moved sessions a dead server had taken in are served again the same way."""
    run, _, seen = settled(d_pool(family=family))
    record = reallocate(run, SetShare(at=run.now, server="s2", share=Fraction(1, 10)))
    before = allocation(run)
    clients = run.nodes.clients
    orphans = {n for n, c in clients.items() if owner(run, before, c) == victim}
    assert orphans & set(record.moved), "no moved session on the victim"
    at = run.now
    carry_out(run, Kill(at=at, server=victim))
    run_to(run, at + 5.0)
    after = allocation(run)
    assert victim not in after.servers
    assert_all_served_since(run, at + 4.0)
    servers = run.nodes.servers
    for name, client in clients.items():
        new = owner(run, after, client)
        assert new is not None
        assert remote(client) == (address_at(servers[new], client), PORT), name
        assert holders(run, server_key(client)) == {new}, name
    disturbed = {n for n, c in clients.items() if c.stats.disruptions}
    assert disturbed == orphans
    for name in orphans:
        last = syn_acks(seen, name)[-1].segment.option(Destination)
        new = owner(run, after, clients[name])
        assert new is not None and last is not None
        assert last.address == address_at(servers[new], clients[name])
    assert outcome(run)["state_lost"] == 0


# -- the transport's part ----------------------------------------------------------------


@family
def test_a_following_connection_that_would_take_a_used_4_tuple_stays_where_it_was(
    family: int,
) -> None:
    import random

    client = Demultiplexer(random.Random(1), SessionConfig())
    first, other = {4: ("10.0.0.1", "192.0.2.1"), 6: ("2001:db8::1", "2001:db8:1::1")}[family]
    local = (ipaddress.ip_address(first), 4000)
    server = (ipaddress.ip_address(other), PORT)
    GROUP = GROUPS[family]
    taken = client.connect(local, server, 0.0, offer=False)
    conn = client.connect(local, (GROUP, PORT), 0.0, follow=True)
    [(_, _, syn)] = [s for s in client.segments_to_send() if s[1] == GROUP]
    echo = syn.option(TagCookie)
    assert echo is not None
    syn_ack = TcpSegment(
        PORT,
        4000,
        99,
        syn.seq + 1,
        TcpFlags.SYN | TcpFlags.ACK,
        1000,
        options=(echo, Destination(*server)),
    )
    client.receive(GROUP, local[0], syn_ack, 0.1)
    assert conn.key == (local, (GROUP, PORT)) and conn.state is State.ESTABLISHED
    assert client.connection(taken.key) is taken


def test_verdicts_of_the_guard_for_a_repeat_and_a_missing_key() -> None:
    from manycast.protocol.destination import DestinationGuard

    key = Ed25519PrivateKey.generate()
    guard = DestinationGuard(wall_base=1000.0)
    message = sign_change(ChangeDestination(1, 2, ATTACKER, PORT, 1, 1_000_000), key)
    assert guard.check(message, GROUP, 0.0) is Verdict.WAIT and guard.take_lookup()
    assert not guard.take_lookup()  # asked once
    guard.provide_key(public_bytes(key), 60.0, 0.0, None)
    assert guard.release(GROUP, 0.0) == [message]
    assert guard.check(message, ATTACKER, 0.1) is Verdict.SAME
    assert guard.stats.accepted == 1 and guard.stats.repeated == 1
    guard.begin()
    guard.provide_key(None, 0.0, 100.0, "no key")
    assert guard.check(dataclasses.replace(message, timestamp_ms=1_100_000), GROUP, 100.0) is (
        RedirectRefusal.NO_KEY
    )


def test_technique_d_is_refused_where_it_cannot_work() -> None:
    from manycast.topology import TopologyError

    with pytest.raises(TopologyError, match="redirect_above' is for technique D"):
        loads(pool_toml(pool={"redirect_above": 2.0}))
    with pytest.raises(TopologyError, match="must exceed 1"):
        loads(d_pool(redirect_above=0.5))
    assert loads(d_pool()).pool.redirect_above == 1.5
    assert loads(d_pool(redirect_above=0)).pool.redirect_above == 0
    drain = loads(d_pool(scenario=[(3.0, "drain", {"server": "s2"})])).scenario
    assert drain == [Drain(at=3.0, line=drain[0].line, server="s2", grace=2.0)]
    with pytest.raises(TopologyError, match="no server named"):
        loads(d_pool(scenario=[(3.0, "drain", {"server": "s9"})]))
