"""Private pools (Fig 2-8): routers admit only joins signed with the pool's key.

Three levels, each checked by what a member or an outsider gets:

* one router fed real membership reports (IGMPv3 with the signed-join TLV),
  its key requests answered by hand or from a DNS server on loopback;
* a whole private pool on the memory driver, with an outsider server and
  outsider clients that know the group address, and an attacker injecting
  replayed, misrouted, forged and garbage joins while the members are served;
* the same pool on real UDP sockets, with the run's own DNS server, and pools
  whose routers read keys from a DNS server serving genuine, tampered or no
  records.
"""

from __future__ import annotations

import base64
import socket
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from manycast.auth import public_bytes, save_private, sign_join
from manycast.dns import EmbeddedServer
from manycast.naming import PoolRecord, lookup_key, pool_zones
from manycast.ports import free_base_port
from manycast.protocol.admission import Admission
from manycast.protocol.membership import record_for
from manycast.protocol.node import Frame, Interface
from manycast.protocol.router import GroupChanged, KeyNeeded, Router
from manycast.runtime import PoolRun
from manycast.space import Portion, PortionSet
from manycast.topology import loads
from manycast.wire.errors import WireError
from manycast.wire.ip import IPPROTO_IGMP, IPPROTO_UDP, IPv4Packet
from manycast.wire.membership import (
    IGMPv3Report,
    RecordType,
    SignedJoin,
    igmp_packet,
)
from pooltools import DEADLINE, patient, requests_ok, run_pool_until, served_now

WALL = 1.7e9  # the routers' wall clock at time 0 (seconds since the Unix epoch)
GROUP = IPv4Address("232.5.5.5")  # private under the seed's split
PUBLIC = IPv4Address("224.9.9.9")  # public, and not link-local
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
PUB = public_bytes(KEY)

S1, S2 = IPv4Address("10.254.0.2"), IPv4Address("10.254.0.6")
C1, C2 = IPv4Address("10.1.0.2"), IPv4Address("10.1.0.3")
EVEN = PortionSet((Portion.parse("0.0.0.0/0.0.0.1"),))
ODD = PortionSet((Portion.parse("0.0.0.1/0.0.0.1"),))
EVERYONE = PortionSet((Portion.parse("0.0.0.0/0"),))


def _iface(name: str, link: str, address: str, network: str) -> Interface:
    return Interface(name, link, IPv4Address(address), IPv4Network(network))


def make_router(*, key: bytes | None = PUB) -> Router:
    """A first-hop router: clients on eth0, s1 on eth2, s2 on eth3, upstream on eth1.

    With `key`, the group's key is already known (as after an earlier lookup).
    """
    interfaces = {
        "eth0": _iface("eth0", "lan", "10.1.0.1", "10.1.0.0/24"),
        "eth1": _iface("eth1", "up", "10.255.0.1", "10.255.0.0/30"),
        "eth2": _iface("eth2", "r-s1", "10.254.0.1", "10.254.0.0/30"),
        "eth3": _iface("eth3", "r-s2", "10.254.0.5", "10.254.0.4/30"),
    }
    routes = [(IPv4Network("0.0.0.0/0"), "eth1", IPv4Address("10.255.0.2"))]
    router = Router(
        "r", interfaces, routes, {"eth1"}, hold_time=30.0, admission=Admission(wall_base=WALL)
    )
    if key is not None:
        router.provide_key(int(GROUP), key, 300.0, 0.0)
    return router


def report(
    requester: IPv4Address,
    *,
    portions: PortionSet = EVEN,
    group: IPv4Address = GROUP,
    at: float = 0.0,
    key: Ed25519PrivateKey | None = KEY,
    nonce: bytes = b"\x01" * 8,
) -> IGMPv3Report:
    """A join as a participant builds it: timestamp, own address, random key, signature."""
    record = record_for(group, portions, RecordType.MODE_IS_INCLUDE)
    signed = SignedJoin(int((WALL + at) * 1000), requester, nonce)
    out = IGMPv3Report((record,), signed)
    return sign_join(out, key) if key is not None else out


def wire(rep: IGMPv3Report, src: IPv4Address) -> bytes:
    return igmp_packet(rep, src).to_wire()


def join(requester: IPv4Address, **kw: object) -> bytes:
    return wire(report(requester, **kw), requester)  # type: ignore[arg-type]


def registration(client: IPv4Address, **kw: object) -> bytes:
    """A client's signed join naming only itself: it may send to the group."""
    me = PortionSet((Portion(4, int(client), 0xFFFFFFFF),))
    return join(client, portions=me, **kw)


def datagram(src: IPv4Address, dst: IPv4Address = GROUP) -> bytes:
    return IPv4Packet.make(src, dst, IPPROTO_UDP, b"\x00" * 16, ttl=16).to_wire()


def data_hops_of(
    router: Router, src: IPv4Address, group: IPv4Address = GROUP
) -> list[tuple[str, IPv4Address | None]]:
    """Where the router sends a packet from `src` to `group` arriving on the clients' LAN."""
    router.receive("eth0", datagram(src, group), 0.1)
    frames: list[Frame] = router.take_frames()
    return [
        (f.iface, None if f.next_hop is None else IPv4Address(f.next_hop))
        for f in frames
        if f.packet[9] != IPPROTO_IGMP
    ]


def _truncated(packet: bytes, keep: int) -> bytes:
    """The report cut to `keep` bytes of IGMP, in a well-formed IP packet."""
    ip = IPv4Packet.from_wire(packet)
    return IPv4Packet(
        replace(ip.header, total_length=ip.header.header_length + keep), ip.payload[:keep]
    ).to_wire()


def igmp_packet_with(payload: bytes, src: IPv4Address = S1) -> bytes:
    """Any bytes as the payload of an IGMP packet to 224.0.0.22, as a host would send it."""
    ip = igmp_packet(IGMPv3Report(), src)
    header = replace(ip.header, total_length=ip.header.header_length + len(payload))
    return IPv4Packet(header, payload).to_wire()


def relayed(router: Router) -> list[bytes]:
    return [f.packet for f in router.take_frames() if f.packet[9] == IPPROTO_IGMP]


def rejected(router: Router) -> dict[str, int]:
    return {reason: n for reason, n in router.stats.rejected.items() if n}


# -- one router: each kind of bad join refused with its reason ------------------------


def test_join_waits_for_the_key_and_is_decided_when_it_arrives() -> None:
    r = make_router(key=None)
    r.receive("eth2", join(S1), 0.0)
    r.receive("eth3", join(S2, portions=ODD), 0.001)
    # Nothing is decided before the key is in: no member, nothing relayed, one question.
    assert keys_asked(r) == [int(GROUP)]
    assert r.members.get(int(GROUP), {}) == {}
    assert relayed(r) == [] and r.stats.joins_accepted == 0 and rejected(r) == {}
    r.provide_key(int(GROUP), PUB, 300.0, 0.01)
    assert set(r.members[int(GROUP)]) == {int(S1), int(S2)}
    assert r.stats.joins_accepted == 2
    assert len(relayed(r)) == 2  # both relayed upstream once admitted
    # With the key cached, the next join is decided at once without asking again.
    r.receive("eth2", join(S1, at=1.0, nonce=b"\x02" * 8), 1.0)
    assert keys_asked(r) == [int(GROUP)] and r.stats.joins_accepted == 3


def test_joins_waiting_for_a_missing_key_are_refused_with_no_key() -> None:
    r = make_router(key=None)
    r.receive("eth2", join(S1), 0.0)
    r.provide_key(int(GROUP), None, 0.0, 0.01, error="no key")
    assert rejected(r) == {"no key": 1}
    assert r.members.get(int(GROUP), {}) == {} and relayed(r) == []
    # The negative answer is cached for a while, then the router asks again.
    r.receive("eth2", join(S1, at=1.0, nonce=b"\x02" * 8), 1.0)
    assert rejected(r) == {"no key": 2} and keys_asked(r) == [int(GROUP)]
    r.receive("eth2", join(S1, at=10.0, nonce=b"\x03" * 8), 10.0)
    assert keys_asked(r) == [int(GROUP), int(GROUP)]
    r.provide_key(int(GROUP), PUB, 300.0, 10.01)
    assert int(S1) in r.members[int(GROUP)]


@pytest.mark.parametrize("raw", [PUB[:31], PUB + b"\x00", b""])
def test_a_key_record_of_the_wrong_length_refuses_the_join(raw: bytes) -> None:
    r = make_router(key=None)
    r.receive("eth2", join(S1), 0.0)
    r.provide_key(int(GROUP), raw, 300.0, 0.01)
    assert rejected(r) == {"bad key record": 1}
    assert "32 bytes" in r.admission.key_errors[int(GROUP)]
    assert r.members.get(int(GROUP), {}) == {}


def test_a_replayed_join_is_a_duplicate() -> None:
    r = make_router()
    packet = join(S1)
    r.receive("eth2", packet, 0.0)
    r.receive("eth2", packet, 0.5)
    assert rejected(r) == {"duplicate": 1}
    assert r.stats.joins_accepted == 1 and len(relayed(r)) == 1


def test_a_copy_that_waited_with_the_original_is_still_a_duplicate() -> None:
    r = make_router(key=None)
    packet = join(S1)
    r.receive("eth2", packet, 0.0)
    r.receive("eth2", packet, 0.001)
    r.provide_key(int(GROUP), PUB, 300.0, 0.01)
    assert r.stats.joins_accepted == 1 and rejected(r) == {"duplicate": 1}


def test_a_join_outside_the_time_window_is_stale() -> None:
    r = make_router()
    r.receive("eth2", join(S1, at=-31.0), 0.0)  # captured long ago
    r.receive("eth2", join(S1, at=31.0, nonce=b"\x02" * 8), 0.0)  # from the future
    assert rejected(r) == {"stale": 2} and r.stats.joins_accepted == 0
    r.receive("eth2", join(S1, at=-29.0, nonce=b"\x03" * 8), 0.0)  # late but timely
    assert r.stats.joins_accepted == 1


def test_a_join_from_the_wrong_link_is_refused() -> None:
    r = make_router()
    r.receive("eth3", join(S1), 0.0)  # s1's join, on s2's link
    r.receive("eth0", join(S1, nonce=b"\x02" * 8), 0.0)  # on the clients' LAN
    r.receive("eth1", join(C1, nonce=b"\x03" * 8), 0.0)  # a LAN host's, from upstream
    assert rejected(r) == {"wrong link": 3}
    assert r.members.get(int(GROUP), {}) == {} and relayed(r) == []


def test_a_forged_signature_is_refused() -> None:
    r = make_router()
    good = report(S1)
    assert good.signed is not None
    flipped = bytes(b ^ 0xFF for b in good.signed.signature[:8]) + good.signed.signature[8:]
    # The forger fixes the checksum, so only the signature gives it away.
    r.receive("eth2", wire(replace(good, signed=replace(good.signed, signature=flipped)), S1), 0.0)
    # A member's genuine signature on a report changed to claim every source.
    greedy = report(S1, portions=EVERYONE, key=None, nonce=b"\x02" * 8)
    stolen = report(S1, nonce=b"\x02" * 8).signed
    r.receive("eth2", wire(replace(greedy, signed=stolen), S1), 0.0)
    assert rejected(r) == {"bad signature": 2}
    assert r.members.get(int(GROUP), {}) == {}


def test_a_join_signed_with_another_key_is_refused() -> None:
    r = make_router()
    r.receive("eth2", join(S1, key=OTHER), 0.0)
    assert rejected(r) == {"bad signature": 1} and r.members.get(int(GROUP), {}) == {}
    # The refusal does not enter the replay cache: the member's own join still counts.
    r.receive("eth2", join(S1), 0.0)
    assert int(S1) in r.members[int(GROUP)]


def test_an_unsigned_join_to_a_private_group_is_refused() -> None:
    r = make_router()
    record = record_for(GROUP, EVEN, RecordType.MODE_IS_INCLUDE)
    r.receive("eth2", wire(IGMPv3Report((record,)), S1), 0.0)
    r.receive("eth2", join(S1, key=None), 0.0)  # the fields, but no signature
    assert rejected(r) == {"unsigned": 2} and r.members.get(int(GROUP), {}) == {}


def test_a_public_group_is_admitted_without_a_signature() -> None:
    r = make_router(key=None)
    record = record_for(PUBLIC, EVEN, RecordType.MODE_IS_INCLUDE)
    r.receive("eth2", wire(IGMPv3Report((record,)), S1), 0.0)
    assert keys_asked(r) == [] and rejected(r) == {} and r.stats.joins_accepted == 1
    relayed(r)
    # Anyone may send to a public group: no registration needed.
    assert data_hops_of(r, C1, PUBLIC) == [("eth2", S1)]
    # The link is still checked.
    r.receive("eth3", wire(IGMPv3Report((record,)), S1), 0.0)
    assert rejected(r) == {"wrong link": 1}


def test_truncated_and_garbage_reports_are_malformed() -> None:
    r = make_router()
    good = join(S1)
    ip = IPv4Packet.from_wire(good)
    bad = [
        _truncated(good, len(ip.payload) - 1),  # the signature's last byte gone
        _truncated(good, 6),
        _truncated(good, 0),
        igmp_packet_with(b"\x22" + b"\xff" * 40),  # garbage behind the report type
        good[:-10],  # IP total length no longer matches
        good[:-1] + bytes([good[-1] ^ 1]),  # one bit flipped: bad checksum
    ]
    for packet in bad:
        r.receive("eth2", packet, 0.0)
    assert rejected(r) == {"malformed": len(bad)}
    assert r.stats.malformed == len(bad) and r.stats.joins_accepted == 0
    r.receive("eth2", b"\x45\x00", 0.0)  # not even an IP header: dropped, counted
    assert r.stats.malformed == len(bad) + 1
    # The member's real join is unaffected by what came before it.
    r.receive("eth2", good, 0.0)
    assert int(S1) in r.members[int(GROUP)]


@given(
    st.one_of(
        st.binary(max_size=200),
        st.builds(
            lambda cut, noise: join(S1)[:cut] + noise,
            st.integers(0, 200),
            st.binary(max_size=20),
        ),
    )
)
def test_garbage_never_raises(data: bytes) -> None:
    good = join(S1)
    genuine = IPv4Packet.from_wire(good).payload
    # As the payload of a report, anything but the member's own join is refused, counted.
    r = make_router()
    r.receive("eth2", igmp_packet_with(data), 0.0)
    try:
        IGMPv3Report.from_wire(data)
    except WireError:
        assert r.stats.joins_accepted == 0 and r.stats.rejected["malformed"] == 1
    else:  # a well-formed report is judged on its merits
        assert r.stats.joins_accepted + sum(r.stats.rejected.values()) == 1
        assert (int(S1) in r.members.get(int(GROUP), {})) == (data == genuine)
    # As a whole packet it may be anything (unicast, data); it never raises nor joins.
    r = make_router()
    r.receive("eth2", data, 0.0)
    assert r.stats.joins_accepted == (1 if data == good else 0)


def test_every_refusal_is_counted_and_members_are_still_served() -> None:
    """One router under every attack at once; its members keep being served."""
    r = make_router()
    r.receive("eth2", join(S1), 0.0)
    r.receive("eth3", join(S2, portions=ODD), 0.0)
    r.receive("eth0", registration(C1), 0.0)
    r.receive("eth0", registration(C2), 0.0)
    relayed(r)
    good = join(S1, at=1.0, nonce=b"\x09" * 8)
    attacks = [
        ("eth2", good),
        ("eth2", good),  # duplicate
        ("eth2", join(S1, at=-40.0, nonce=b"\x0a" * 8)),  # stale
        ("eth3", join(S1, at=1.0, nonce=b"\x0b" * 8)),  # wrong link
        ("eth2", join(S1, portions=EVERYONE, key=OTHER, nonce=b"\x0c" * 8)),  # bad signature
        ("eth2", join(S1, key=None, nonce=b"\x0d" * 8)),  # unsigned
        ("eth2", _truncated(good, 20)),  # malformed
        ("eth0", registration(IPv4Address("10.1.0.66"), key=OTHER)),  # outsider: bad signature
    ]
    for iface, packet in attacks:
        r.receive(iface, packet, 1.0)
    relayed(r)
    assert rejected(r) == {
        "duplicate": 1,
        "stale": 1,
        "wrong link": 1,
        "bad signature": 2,
        "unsigned": 1,
        "malformed": 1,
    }
    # The members' portions are as they joined: each client reaches its own server.
    assert data_hops_of(r, C1) == [("eth2", S1)]
    assert data_hops_of(r, C2) == [("eth3", S2)]
    # The outsider, and any host that never registered, is dropped at the first hop.
    assert data_hops_of(r, IPv4Address("10.1.0.66")) == []
    assert data_hops_of(r, IPv4Address("10.1.0.4")) == []
    assert rejected(r)["unauthorized sender"] == 2


def test_every_router_on_the_way_checks_the_relayed_join() -> None:
    """An admitted join travels upstream unchanged; a hop that alters it is caught."""
    edge = make_router()
    edge.receive("eth2", join(S1), 0.0)
    [up] = relayed(edge)
    core = Router(
        "core",
        {"down": _iface("down", "up", "10.255.0.2", "10.255.0.0/30")},
        [(IPv4Network("10.0.0.0/8"), "down", IPv4Address("10.255.0.1"))],
        {"down"},
        admission=Admission(wall_base=WALL),
    )
    core.provide_key(int(GROUP), PUB, 300.0, 0.0)
    core.receive("down", up, 0.01)
    assert int(S1) in core.members[int(GROUP)]
    # The same join, with its masks widened on the way (checksum fixed up).
    ip = IPv4Packet.from_wire(up)
    original = IGMPv3Report.from_wire(ip.payload)
    assert original.signed is not None
    widened = replace(
        original,
        records=(record_for(GROUP, EVERYONE, RecordType.MODE_IS_INCLUDE),),
        # A new random key too, so that it is not taken for a copy of the first.
        signed=replace(original.signed, random_key=b"\x07" * 8),
    )
    core.receive(
        "down",
        IPv4Packet(
            replace(ip.header, total_length=ip.header.header_length + len(widened.to_wire())),
            widened.to_wire(),
        ).to_wire(),
        0.02,
    )
    assert rejected(core) == {"bad signature": 1}


# -- the key from a DNS server on loopback --------------------------------------------

ZONE = "pool.test."
ALIAS = "vault.pool.test."


def keys_asked(router: Router) -> list[int]:
    """Every group whose key the router has asked for so far (its KeyNeeded effects)."""
    return [e.group for e in router.effects if isinstance(e, KeyNeeded)]


def genuine_record(key: bytes = PUB) -> PoolRecord:
    return PoolRecord.create(ALIAS, GROUP, "ops@pool.test", key)


def tampered_zones(replacement: str) -> dict[str, str]:
    """The pool's zones with the key (`p=`) replaced in every TXT record that holds it."""
    good = base64.b64encode(PUB).decode()
    zones = pool_zones(ZONE, [genuine_record()])
    edited = {name: text.replace(f"p={good}", f"p={replacement}") for name, text in zones.items()}
    assert sum(text.count(f"p={replacement}") for text in edited.values()) == 2
    return edited


class DnsRouter:
    """A router whose key requests are answered as the runtime answers them: each
    `KeyNeeded` effect a DNS lookup (`lookup_key`) on `server`; `errors` keeps what
    the failed lookups found."""

    def __init__(self, server: tuple[str, int]) -> None:
        self.router = make_router(key=None)
        self.errors: list[str] = []
        self.server = server

    def questions(self) -> list[int]:
        return [e.group for e in self.router.take_effects() if isinstance(e, KeyNeeded)]

    def answer(self, group: int) -> None:
        reply = lookup_key(group, self.server, timeout=5.0)
        if reply.detail is not None and reply.reason is not None:
            self.errors.append(reply.detail)
        self.router.provide_key(group, reply.public_key, reply.ttl, 0.05, reply.reason)


def join_through_dns(zones: dict[str, str] | None, key: Ed25519PrivateKey = KEY) -> DnsRouter:
    with EmbeddedServer(zones or pool_zones(ZONE, []), None) as server:
        asker = DnsRouter(server.address)
        asker.router.receive("eth2", join(S1, key=key), 0.0)
        questions = asker.questions()
        assert questions == [int(GROUP)]  # one lookup, then the join waits for its answer
        assert asker.router.stats.joins_accepted == 0 and rejected(asker.router) == {}
        asker.answer(questions[0])
        return asker


def test_key_looked_up_in_dns_admits_the_join() -> None:
    asker = join_through_dns(pool_zones(ZONE, [genuine_record()]))
    assert asker.errors == [] and rejected(asker.router) == {}
    assert int(S1) in asker.router.members[int(GROUP)]
    assert len(relayed(asker.router)) == 1


def test_a_record_holding_another_key_refuses_the_join() -> None:
    other = base64.b64encode(public_bytes(OTHER)).decode()
    asker = join_through_dns(tampered_zones(other))
    assert asker.errors == []  # a well-formed record: only the signature check can tell
    assert rejected(asker.router) == {"bad signature": 1}
    assert asker.router.members.get(int(GROUP), {}) == {}
    # Whoever holds the substituted key gets in: the record is what routers trust.
    asker = join_through_dns(tampered_zones(other), key=OTHER)
    assert int(S1) in asker.router.members[int(GROUP)]


@pytest.mark.parametrize("garbage", ["AAAA", "not-base64!", base64.b64encode(b"x" * 31).decode()])
def test_a_garbage_key_record_refuses_the_join(garbage: str) -> None:
    asker = join_through_dns(tampered_zones(garbage))
    [error] = asker.errors
    assert error.startswith("bad key record at ")
    assert rejected(asker.router) == {"bad key record": 1}
    assert asker.router.members.get(int(GROUP), {}) == {}


def test_no_record_refuses_the_join_with_no_key() -> None:
    asker = join_through_dns(None)
    [error] = asker.errors
    assert error.startswith("not found: 5.5.5.232.in-addr.arpa. does not exist (NXDOMAIN)")
    assert rejected(asker.router) == {"no key": 1}
    assert asker.router.members.get(int(GROUP), {}) == {}


# -- a private pool with outsiders (memory driver) --------------------------------------

POOL_GROUP = "232.5.5.5"


def private_pool(*, extra: str = "", duration: float = 6.0) -> str:
    """Members s1, s2 and a1..a12; an outsider server on the core and outsiders x1..x4
    on the members' edge router, all of whom know the group address."""
    return f"""
[pool]
name = "vault.pool.test"
group = "{POOL_GROUP}"
private = true
heartbeat_ms = 100
report_interval_ms = 500
index_bits = 10
{extra}

[[router]]
name = "ra"
[[router]]
name = "core"
[[router]]
name = "rs"

[[link]]
between = ["ra", "core"]
delay_ms = 2
[[link]]
between = ["core", "rs"]
delay_ms = 1

[[server]]
name = "s1"
router = "rs"
[[server]]
name = "s2"
router = "rs"
[[server]]
name = "evil"
router = "core"
authorized = false

[[clients]]
name = "a"
count = 12
router = "ra"
subnet = "10.1.0.0/24"
rate = 4.0
[[clients]]
name = "x"
count = 4
router = "ra"
subnet = "10.6.0.0/24"
rate = 4.0
authorized = false

[run]
duration = {duration}
"""


class Watch:
    """Every packet the outsider server receives, and every report s1 sends."""

    def __init__(self, run: PoolRun) -> None:
        self.outsider: list[IPv4Packet] = []
        self.s1_reports: list[bytes] = []
        evil = run.nodes.servers["evil"]
        s1 = run.nodes.servers["s1"]
        deliver, send = evil.receive, s1.send

        def evil_receive(iface: str, packet: bytes, now: float) -> None:
            self.outsider.append(IPv4Packet.from_wire(packet))
            deliver(iface, packet, now)

        def s1_send(iface: str, packet: bytes, next_hop: int | None) -> None:
            if packet[9] == IPPROTO_IGMP:
                self.s1_reports.append(packet)
            send(iface, packet, next_hop)

        evil.receive = evil_receive  # type: ignore[method-assign]
        s1.send = s1_send  # type: ignore[method-assign]


def assert_outsiders_got_nothing(run: PoolRun, watch: Watch) -> None:
    summary = run.summary()
    evil = run.nodes.servers["evil"]
    clients = {c.address for c in run.nodes.clients.values()}
    assert [p for p in watch.outsider if p.header.src in clients] == []
    assert evil.host.counters.received == 0 and evil.app.requests == 0
    assert evil.stats.sessions_opened == 0 and summary["servers"]["evil"]["requests"] == 0
    assert summary["outsiders"] == 4 and summary["outsider_answers"] == 0
    for name, client in run.nodes.clients.items():
        if name.startswith("x"):
            assert client.stats.requests_ok == 0 and client.stats.ok_times == []


def test_private_pool_serves_members_and_gives_outsiders_nothing() -> None:
    run = PoolRun(loads(private_pool()), "memory", seed=3)
    watch = Watch(run)
    run.run(6.0)
    summary = run.summary()
    assert summary["clients"] == 12 and summary["clients_served_at_end"] == 12
    assert summary["requests_failed"] == 0 and summary["resets"] == 0
    assert summary["servers"]["s1"]["requests"] > 0 and summary["servers"]["s2"]["requests"] > 0
    assert summary["servers"]["s1"]["share"] + summary["servers"]["s2"]["share"] == 1.0
    assert_outsiders_got_nothing(run, watch)
    routers = run.nodes.routers
    # The outsider server's joins die at its own router; its control traffic too.
    assert routers["core"].stats.rejected["bad signature"] > 0
    assert routers["core"].stats.rejected["unauthorized sender"] > 0
    assert not any(
        int(run.nodes.servers["evil"].address) in members
        for router in routers.values()
        for members in router.members.values()
    )
    # The outsider clients' registrations and packets die at their edge router.
    assert routers["ra"].stats.rejected["bad signature"] >= 4
    assert routers["ra"].stats.rejected["unauthorized sender"] >= 4
    # Served throughout: after the first second, no member waits long for an answer.
    for name, client in run.nodes.clients.items():
        if name.startswith("a"):
            times = [t for t in client.stats.ok_times if t > 1.5]
            assert times and max(b - a for a, b in zip([1.5, *times], times, strict=False)) < 1.0, (
                name
            )


def test_attacks_on_a_running_pool_are_refused_while_it_serves() -> None:
    """The outsider server replays, misroutes, forges and garbles joins at the core."""
    run = PoolRun(loads(private_pool()), "memory", seed=4)
    watch = Watch(run)
    evil = run.nodes.servers["evil"]
    core = run.nodes.routers["core"]
    net = run.network
    baseline: dict[str, Counter[str]] = {}

    def attack() -> None:
        baseline["core"] = Counter(core.stats.rejected)
        # One of s1's recent joins as it went on the wire (not the very last: that one
        # may still be on its way to the core).
        captured = watch.s1_reports[-2]
        ip = IPv4Packet.from_wire(captured)
        captured_report = IGMPv3Report.from_wire(ip.payload)
        assert captured_report.signed is not None
        me = evil.address
        stamp = int((evil.settings.wall_base + net.now) * 1000)  # the pool's wall clock

        def own(rep: IGMPv3Report) -> bytes:
            return wire(rep, me)

        fresh = replace(captured_report.signed, timestamp=stamp)
        packets = [
            # The core saw this join relayed from rs: a copy is a duplicate.
            igmp_packet_with(ip.payload, me),
            # s1's join with fresh fields: the link is checked before the signature,
            # which no longer matches anyway.
            own(replace(captured_report, signed=replace(fresh, random_key=b"\x01" * 8))),
            # A join for itself, signed with its own (wrong) key, claiming every source.
            own(
                sign_join(
                    IGMPv3Report(
                        (
                            record_for(
                                IPv4Address(POOL_GROUP), EVERYONE, RecordType.MODE_IS_EXCLUDE
                            ),
                        ),
                        SignedJoin(stamp, me, b"\x02" * 8),
                    ),
                    OTHER,
                )
            ),
            # The same without a signature.
            own(
                IGMPv3Report(
                    (record_for(IPv4Address(POOL_GROUP), EVERYONE, RecordType.MODE_IS_INCLUDE),),
                    SignedJoin(stamp, me, b"\x03" * 8),
                )
            ),
            igmp_packet_with(ip.payload[:-7], me),  # truncated
            igmp_packet_with(b"\x22\x00" + b"\xa5" * 30, me),  # garbage
        ]
        for packet in packets:
            evil.send(evil.host.iface, packet, evil.host.gateway)

    run.network.call_at(3.0, attack)
    run.run(6.0)
    after = Counter(core.stats.rejected)
    after.subtract(baseline["core"])
    # Each attack counted once under its reason (the outsider's own joins and control
    # traffic keep adding bad signatures and unauthorized senders meanwhile).
    assert {k: after[k] for k in ("duplicate", "wrong link", "unsigned", "malformed", "stale")} == {
        "duplicate": 1,
        "wrong link": 1,
        "unsigned": 1,
        "malformed": 2,
        "stale": 0,
    }
    assert after["bad signature"] >= 1
    summary = run.summary()
    assert summary["clients_served_at_end"] == 12 and summary["requests_failed"] == 0
    assert_outsiders_got_nothing(run, watch)


# -- on real sockets, with keys from DNS ----------------------------------------------


def test_private_pool_on_the_overlay_with_its_own_dns_server() -> None:
    # Deaths are not under test: 20 missed heartbeats (2 s) outlast a busy host's stalls.
    topo = loads(private_pool(extra="heartbeat_misses = 20", duration=4.0))
    ports = sum(len(ifaces) for ifaces in topo.interfaces.values())
    run = patient(PoolRun(topo, "overlay", seed=5, base_port=free_base_port(ports)))
    watch = Watch(run)
    assert topo.pool.dns is None  # no DNS server named: the run starts its own
    routers = run.nodes.routers
    # At least the topology's 4 s; then until every member has been served most of the
    # time and both kinds of outsider have been refused (a busy host gets there later).
    done, summary = run_pool_until(
        run,
        lambda: (
            run.now >= 4.0
            and served_now(run)
            and requests_ok(run) > 12 * 4 * 2
            and routers["core"].stats.rejected["bad signature"] > 0
            and routers["ra"].stats.rejected["unauthorized sender"] > 0
        ),
    )
    assert run.dns_address is not None  # the run served its records and routers asked it
    assert done, f"not there after {DEADLINE} s: {summary}"
    assert summary["clients"] == 12 and summary["clients_served_at_end"] == 12
    assert summary["requests_ok"] > 12 * 4 * 2
    assert_outsiders_got_nothing(run, watch)
    assert routers["core"].stats.rejected["bad signature"] > 0
    assert routers["ra"].stats.rejected["unauthorized sender"] > 0


@pytest.fixture
def key_file(tmp_path: Path) -> Iterator[tuple[Path, Ed25519PrivateKey]]:
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "vault.key"
    save_private(key, path)
    yield path, key


def pool_records(key: bytes) -> list[PoolRecord]:
    """What `manycast private create` publishes for the pool and its control channel."""
    return [
        PoolRecord.create(ALIAS, POOL_GROUP, "ops@pool.test", key),
        PoolRecord.create("control." + ALIAS, "239.255.77.1", "ops@pool.test", key),
    ]


Tamper = Callable[[dict[str, str], bytes], dict[str, str]]


def _as_is(zones: dict[str, str], key: bytes) -> dict[str, str]:
    return zones


def _swap_key(replacement: str) -> Tamper:
    def tamper(zones: dict[str, str], key: bytes) -> dict[str, str]:
        good = f"p={base64.b64encode(key).decode()}"
        return {name: text.replace(good, f"p={replacement}") for name, text in zones.items()}

    return tamper


def _no_records(zones: dict[str, str], key: bytes) -> dict[str, str]:
    return pool_zones(ZONE, [])


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (_as_is, None),
        (_swap_key(base64.b64encode(public_bytes(OTHER)).decode()), "bad signature"),
        (_swap_key("AAAA"), "bad key record"),
        (_no_records, "no key"),
    ],
    ids=["genuine", "another-key", "garbage-key", "no-record"],
)
def test_pool_reading_keys_from_a_dns_server(
    key_file: tuple[Path, Ed25519PrivateKey], tamper: Tamper, reason: str | None
) -> None:
    """`[pool] key_file` and `[pool] dns`: the routers trust only what DNS serves."""
    path, key = key_file
    raw = public_bytes(key)
    zones = tamper(pool_zones(ZONE, pool_records(raw)), raw)
    with EmbeddedServer(zones, None) as dns_server:
        host, port = dns_server.address
        extra = f'key_file = "{path}"\ndns = "{host}:{port}"'
        run = PoolRun(loads(private_pool(extra=extra, duration=2.5)), "memory", seed=6)
        # On the virtual clock, in step with the wall clock the DNS answers come on.
        run.run(2.5, realtime=True)
    summary = run.summary()
    routers = run.nodes.routers
    if reason is None:  # the genuine records: everyone served
        assert summary["clients_served_at_end"] == 12
        assert all(not r.stats.rejected["no key"] for r in routers.values())
    else:
        assert summary["requests_ok"] == 0 and summary["clients_served_at_end"] == 0
        # Every member's join refused at its first hop, for the reason the record gives.
        assert routers["rs"].stats.rejected[reason] >= 2
        assert routers["ra"].stats.rejected[reason] >= 12
        assert routers["rs"].stats.joins_accepted == 0
    assert summary["outsider_answers"] == 0


def test_a_dns_server_that_never_answers_refuses_joins_with_no_key(
    key_file: tuple[Path, Ed25519PrivateKey],
) -> None:
    """No answer at all is a missing key, not a bad record (docs/private.md: "when the
    key cannot be had ... the join is refused with that reason")."""
    path, _ = key_file
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        host, port = silent.getsockname()
        extra = f'key_file = "{path}"\ndns = "{host}:{port}"'
        run = PoolRun(loads(private_pool(extra=extra, duration=2.6)), "memory", seed=6)
        run.run(2.6, realtime=True)  # lookups give up after 2 s
    rs = run.nodes.routers["rs"]
    assert rs.stats.joins_accepted == 0 and run.summary()["requests_ok"] == 0
    assert rs.stats.rejected["no key"] >= 2, dict(rs.stats.rejected)


# -- the address plan and a configured key --------------------------------------------------

PLAN_POOL = """
[pool]
private = true
group = "{group}"
control_group = "{control}"
{extra}

[[router]]
name = "ra"
[[router]]
name = "rs"
[[link]]
between = ["ra", "rs"]

[[server]]
name = "s1"
router = "rs"
[[server]]
name = "s2"
router = "rs"
[[server]]
name = "evil"
router = "rs"
authorized = false

[[clients]]
name = "c"
count = 8
router = "ra"
subnet = "10.1.0.0/24"
"""


def test_a_private_pool_must_use_the_private_range() -> None:
    from manycast.topology import TopologyError

    text = PLAN_POOL.format(group="224.5.1.1", control="239.255.77.1", extra="")
    with pytest.raises(TopologyError, match=r":4: .*outside the private ranges"):
        loads(text)


def test_a_custom_private_range_is_enforced_by_the_routers() -> None:
    text = PLAN_POOL.format(
        group="224.5.1.1", control="224.5.9.9", extra='private_ranges = "224.5.0.0/16"'
    )
    run = PoolRun(loads(text), "memory", seed=3)
    run.run(4.0)
    summary = run.summary()
    assert summary["clients_served_at_end"] == 8
    refused = sum(r.stats.rejected["bad signature"] for r in run.nodes.routers.values())
    assert refused > 0  # the outsider's joins, in a range the plan makes private
    assert run.nodes.servers["evil"].host.counters.received == 0


def test_a_configured_key_replaces_dns_and_a_wrong_one_admits_no_one() -> None:
    import base64

    from manycast.auth import generate, public_bytes
    from manycast.pool import pool_keys

    group, control = "232.1.1.1", "239.255.77.1"
    probe = loads(PLAN_POOL.format(group=group, control=control, extra=""))
    right = base64.b64encode(public_bytes(pool_keys(probe, 3)[0])).decode()
    wrong = base64.b64encode(public_bytes(generate())).decode()
    for key, served in ((right, 8), (wrong, 0)):
        text = PLAN_POOL.format(group=group, control=control, extra=f'public_key = "{key}"')
        run = PoolRun(loads(text), "memory", seed=3)
        run.run(3.0)
        assert run.summary()["clients_served_at_end"] == served


def test_a_sender_that_stops_registering_is_refused_after_the_hold_time() -> None:
    router = make_router()
    router.receive("eth0", registration(C1), 0.0)
    router.take_frames()
    router.receive("eth0", datagram(C1), 1.0)
    router.take_frames()
    assert rejected(router).get("unauthorized sender", 0) == 0
    # No refresh: when the hold time passes the registration lapses, and the group's
    # forwarding entries are invalidated so a kernel drops them too.
    router.take_effects()
    deadline = router.next_deadline()
    assert deadline is not None and deadline <= 30.0
    router.on_timer(deadline)
    # what a kernel data plane listens to
    assert router.take_effects() == [GroupChanged(int(GROUP))]
    router.receive("eth0", datagram(C1), deadline + 0.1)
    assert rejected(router).get("unauthorized sender", 0) == 1
