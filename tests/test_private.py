"""Private pools (Fig 2-8): routers admit only joins signed with the pool's key.

Three levels, each checked by what a member or an outsider gets, on either
address family where the logic is the same (IGMPv3 on IPv4, MLDv2 on IPv6):

* one router fed real membership reports (IGMPv3 or MLDv2 with the signed-join
  TLV), its key requests answered by hand or from a DNS server on loopback;
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
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from manycast.auth import public_bytes, save_private, sign_join
from manycast.dns import EmbeddedServer, KnotServer, knot_available
from manycast.naming import PoolRecord, TsigKey, lookup_key, pool_zones
from manycast.ports import free_base_port
from manycast.protocol.admission import Admission
from manycast.protocol.membership import record_for
from manycast.protocol.node import Frame, Interface
from manycast.protocol.router import GroupChanged, KeyNeeded, Router
from manycast.protocol.router6 import Router6
from manycast.runtime import PoolRun
from manycast.space import Portion, PortionSet
from manycast.topology import loads
from manycast.wire.errors import WireError
from manycast.wire.ip import (
    IPPROTO_HOPOPTS,
    IPPROTO_ICMPV6,
    IPPROTO_IGMP,
    IPPROTO_UDP,
    Address,
    HopByHop,
    InnerPacket,
    IPv4Packet,
    IPv6Packet,
    make_packet,
    parse_packet,
)
from manycast.wire.membership import (
    IGMP_V3_REPORT,
    MLD_V2_REPORT,
    MLD_V2_ROUTERS,
    GroupRecord,
    IGMPv3Report,
    MLDv2Report,
    RecordType,
    SignedJoin,
    igmp_packet,
)
from pooltools import DEADLINE, patient, requests_ok, run_pool_until, served_now

WALL = 1.7e9  # the routers' wall clock at time 0 (seconds since the Unix epoch)
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
PUB = public_bytes(KEY)

Report = IGMPv3Report | MLDv2Report


@dataclass(frozen=True)
class Family:
    """One address family's side of the one-router tests: the addresses, the router,
    and the reports and packets as a host of the family sends them (IGMPv3 to
    224.0.0.22, or MLDv2 to ff02::16 behind a Hop-by-Hop Router Alert).

    The router: clients on eth0, s1 on eth2, s2 on eth3, upstream on eth1."""

    version: int
    group: Address  # private under the default plan
    public: Address  # public, and not link-local
    control: Address  # the default control channel, private
    lan: str  # the clients' LAN; the router is its first address
    links: tuple[str, str, str]  # upstream, s1's and s2's links, the router first
    upstream: str  # what the router's default route covers

    def host(self, network: str, index: int) -> Address:
        return ip_network(network)[index]

    @property
    def s1(self) -> Address:
        return self.host(self.links[1], 2)

    @property
    def s2(self) -> Address:
        return self.host(self.links[2], 2)

    @property
    def c1(self) -> Address:
        return self.host(self.lan, 2)

    @property
    def c2(self) -> Address:
        return self.host(self.lan, 3)

    def portions(self, value: int, mask: int) -> PortionSet:
        return PortionSet((Portion(self.version, value, mask),))

    @property
    def even(self) -> PortionSet:
        return self.portions(0, 1)

    @property
    def odd(self) -> PortionSet:
        return self.portions(1, 1)

    @property
    def everyone(self) -> PortionSet:
        return self.portions(0, 0)

    def make_router(self, *, key: bytes | None = PUB) -> Router:
        """The first-hop router; with `key`, the group's key is already known (as
        after an earlier lookup)."""
        interfaces = {
            name: _iface(name, link, network)
            for name, link, network in (
                ("eth0", "lan", self.lan),
                ("eth1", "up", self.links[0]),
                ("eth2", "r-s1", self.links[1]),
                ("eth3", "r-s2", self.links[2]),
            )
        }
        routes = [(ip_network(self.upstream), "eth1", self.host(self.links[0], 2))]
        kind = Router if self.version == 4 else Router6
        router = kind(
            "r", interfaces, routes, {"eth1"}, hold_time=30.0, admission=Admission(wall_base=WALL)
        )
        if key is not None:
            router.provide_key(int(self.group), key, 300.0, 0.0)
        return router

    def report(
        self,
        requester: Address,
        *,
        portions: PortionSet | None = None,
        group: Address | None = None,
        at: float = 0.0,
        key: Ed25519PrivateKey | None = KEY,
        nonce: bytes = b"\x01" * 8,
        record_type: RecordType = RecordType.MODE_IS_INCLUDE,
    ) -> Report:
        """A join as a participant builds it: timestamp, own address, random key,
        signature (the even sources and the private group unless told)."""
        record = record_for(group or self.group, portions or self.even, record_type)
        signed = SignedJoin(int((WALL + at) * 1000), requester, nonce)
        return self.signed(self.unsigned(record, signed), key)

    def unsigned(self, record: GroupRecord, signed: SignedJoin | None = None) -> Report:
        return (IGMPv3Report if self.version == 4 else MLDv2Report)((record,), signed)

    def signed(self, rep: Report, key: Ed25519PrivateKey | None) -> Report:
        return sign_join(rep, key) if key is not None else rep

    def encode(self, rep: Report, src: Address) -> bytes:
        """The report's bytes from `src` (MLDv2's checksum covers the source address)."""
        return rep.to_wire() if isinstance(rep, IGMPv3Report) else rep.to_wire(src)

    def wire(self, rep: Report, src: Address) -> bytes:
        return self.report_packet_with(self.encode(rep, src), src)

    def join(self, requester: Address, **kw: Any) -> bytes:
        return self.wire(self.report(requester, **kw), requester)

    def registration(self, client: Address, **kw: Any) -> bytes:
        """A client's signed join naming only itself: it may send to the group."""
        return self.join(client, portions=self.portions(int(client), _full(client)), **kw)

    def report_packet_with(self, payload: bytes, src: Address) -> bytes:
        """Any bytes as a membership report's payload, in the packet a host sends."""
        if isinstance(src, IPv4Address):
            ip = igmp_packet(IGMPv3Report(), src)
            header = replace(ip.header, total_length=ip.header.header_length + len(payload))
            return IPv4Packet(header, payload).to_wire()
        return IPv6Packet.make(
            src,
            MLD_V2_ROUTERS,
            IPPROTO_ICMPV6,
            payload,
            hop_limit=1,
            hop_by_hop=HopByHop.with_router_alert(IPPROTO_ICMPV6),
        ).to_wire()

    def decode(self, packet: bytes) -> tuple[InnerPacket, Report]:
        """A report packet and the report it carries."""
        ip = parse_packet(packet)
        if isinstance(ip, IPv4Packet):
            return ip, IGMPv3Report.from_wire(ip.payload)
        return ip, MLDv2Report.from_wire(ip.payload, ip.header.src, ip.header.dst)

    def decodes(self, payload: bytes, src: Address) -> bool:
        """Whether `payload` is a well-formed report (from `src`)."""
        try:
            self.decode(self.report_packet_with(payload, src))
        except WireError:
            return False
        return True

    @property
    def report_type(self) -> int:
        return IGMP_V3_REPORT if self.version == 4 else MLD_V2_REPORT

    def truncated(self, packet: bytes, keep: int) -> bytes:
        """The report cut to `keep` bytes, in a well-formed IP packet."""
        ip = parse_packet(packet)
        return self.report_packet_with(ip.payload[:keep], ip.header.src)

    def datagram(self, src: Address, dst: Address | None = None) -> bytes:
        return make_packet(src, dst or self.group, IPPROTO_UDP, b"\x00" * 16, ttl=16).to_wire()

    def data_hops_of(
        self, router: Router, src: Address, group: Address | None = None
    ) -> list[tuple[str, Address | None]]:
        """Where the router sends a packet from `src` to `group` arriving on the LAN."""
        router.receive("eth0", self.datagram(src, group), 0.1)
        frames: list[Frame] = router.take_frames()
        return [
            (f.iface, None if f.next_hop is None else ip_address(f.next_hop))
            for f in frames
            if not is_report(f.packet)
        ]

    def __str__(self) -> str:
        return f"ipv{self.version}"


def _full(address: Address) -> int:
    return (1 << address.max_prefixlen) - 1


def _iface(name: str, link: str, network: str) -> Interface:
    net = ip_network(network)
    return Interface(name, link, net[1], net)


def is_report(packet: bytes) -> bool:
    """An IGMP packet, or an IPv6 one behind a Hop-by-Hop header (MLD: data has none)."""
    return packet[9] == IPPROTO_IGMP if packet[0] >> 4 == 4 else packet[6] == IPPROTO_HOPOPTS


V4 = Family(
    4,
    IPv4Address("232.5.5.5"),
    IPv4Address("224.9.9.9"),
    IPv4Address("239.255.77.1"),
    "10.1.0.0/24",
    ("10.255.0.0/30", "10.254.0.0/30", "10.254.0.4/30"),
    "0.0.0.0/0",
)
V6 = Family(
    6,
    IPv6Address("ff3e::8005:505"),  # a group ID of the dynamic half: private
    IPv6Address("ff3e::9:9"),  # a permanently assigned group ID: public
    IPv6Address("ff15::77:1"),
    "2001:db8:1::/64",
    ("2001:db8:ffff::/64", "2001:db8:fffe::/64", "2001:db8:fffe:1::/64"),
    "::/0",
)
FAMILIES = [pytest.param(V4, id="ipv4"), pytest.param(V6, id="ipv6")]
family = pytest.mark.parametrize("net", FAMILIES)

# The IPv4 side by its old names, for the tests of other modules that import them.
GROUP, PUBLIC = V4.group, V4.public
S1, S2, C1, C2 = V4.s1, V4.s2, V4.c1, V4.c2
EVEN, ODD, EVERYONE = V4.even, V4.odd, V4.everyone
make_router, join, registration = V4.make_router, V4.join, V4.registration
datagram, data_hops_of = V4.datagram, V4.data_hops_of


def relayed(router: Router) -> list[bytes]:
    return [f.packet for f in router.take_frames() if is_report(f.packet)]


def rejected(router: Router) -> dict[str, int]:
    return {reason: n for reason, n in router.stats.rejected.items() if n}


# -- one router: each kind of bad join refused with its reason ------------------------


@family
def test_join_waits_for_the_key_and_is_decided_when_it_arrives(net: Family) -> None:
    r = net.make_router(key=None)
    group = int(net.group)
    r.receive("eth2", net.join(net.s1), 0.0)
    r.receive("eth3", net.join(net.s2, portions=net.odd), 0.001)
    # Nothing is decided before the key is in: no member, nothing relayed, one question.
    assert keys_asked(r) == [group]
    assert r.members.get(group, {}) == {}
    assert relayed(r) == [] and r.stats.joins_accepted == 0 and rejected(r) == {}
    r.provide_key(group, PUB, 300.0, 0.01)
    assert set(r.members[group]) == {int(net.s1), int(net.s2)}
    assert r.stats.joins_accepted == 2
    assert len(relayed(r)) == 2  # both relayed upstream once admitted
    # With the key cached, the next join is decided at once without asking again.
    r.receive("eth2", net.join(net.s1, at=1.0, nonce=b"\x02" * 8), 1.0)
    assert keys_asked(r) == [group] and r.stats.joins_accepted == 3


@family
def test_joins_waiting_for_a_missing_key_are_refused_with_no_key(net: Family) -> None:
    r = net.make_router(key=None)
    group = int(net.group)
    r.receive("eth2", net.join(net.s1), 0.0)
    r.provide_key(group, None, 0.0, 0.01, error="no key")
    assert rejected(r) == {"no key": 1}
    assert r.members.get(group, {}) == {} and relayed(r) == []
    # The negative answer is cached for a while, then the router asks again.
    r.receive("eth2", net.join(net.s1, at=1.0, nonce=b"\x02" * 8), 1.0)
    assert rejected(r) == {"no key": 2} and keys_asked(r) == [group]
    r.receive("eth2", net.join(net.s1, at=10.0, nonce=b"\x03" * 8), 10.0)
    assert keys_asked(r) == [group, group]
    r.provide_key(group, PUB, 300.0, 10.01)
    assert int(net.s1) in r.members[group]


@pytest.mark.parametrize("raw", [PUB[:31], PUB + b"\x00", b""])
def test_a_key_record_of_the_wrong_length_refuses_the_join(raw: bytes) -> None:
    r = make_router(key=None)
    r.receive("eth2", join(S1), 0.0)
    r.provide_key(int(GROUP), raw, 300.0, 0.01)
    assert rejected(r) == {"bad key record": 1}
    assert "32 bytes" in r.admission.key_errors[int(GROUP)]
    assert r.members.get(int(GROUP), {}) == {}


@family
def test_a_replayed_join_is_a_duplicate(net: Family) -> None:
    r = net.make_router()
    packet = net.join(net.s1)
    r.receive("eth2", packet, 0.0)
    r.receive("eth2", packet, 0.5)
    assert rejected(r) == {"duplicate": 1}
    assert r.stats.joins_accepted == 1 and len(relayed(r)) == 1


@family
def test_a_copy_that_waited_with_the_original_is_still_a_duplicate(net: Family) -> None:
    r = net.make_router(key=None)
    packet = net.join(net.s1)
    r.receive("eth2", packet, 0.0)
    r.receive("eth2", packet, 0.001)
    r.provide_key(int(net.group), PUB, 300.0, 0.01)
    assert r.stats.joins_accepted == 1 and rejected(r) == {"duplicate": 1}


@family
def test_a_join_outside_the_time_window_is_stale(net: Family) -> None:
    r = net.make_router()
    r.receive("eth2", net.join(net.s1, at=-31.0), 0.0)  # captured long ago
    r.receive("eth2", net.join(net.s1, at=31.0, nonce=b"\x02" * 8), 0.0)  # from the future
    assert rejected(r) == {"stale": 2} and r.stats.joins_accepted == 0
    r.receive("eth2", net.join(net.s1, at=-29.0, nonce=b"\x03" * 8), 0.0)  # late but timely
    assert r.stats.joins_accepted == 1


@family
def test_a_join_from_the_wrong_link_is_refused(net: Family) -> None:
    r = net.make_router()
    r.receive("eth3", net.join(net.s1), 0.0)  # s1's join, on s2's link
    r.receive("eth0", net.join(net.s1, nonce=b"\x02" * 8), 0.0)  # on the clients' LAN
    r.receive("eth1", net.join(net.c1, nonce=b"\x03" * 8), 0.0)  # a LAN host's, from upstream
    assert rejected(r) == {"wrong link": 3}
    assert r.members.get(int(net.group), {}) == {} and relayed(r) == []


@family
def test_a_forged_signature_is_refused(net: Family) -> None:
    r = net.make_router()
    good = net.report(net.s1)
    assert good.signed is not None
    flipped = bytes(b ^ 0xFF for b in good.signed.signature[:8]) + good.signed.signature[8:]
    # The forger fixes the checksum, so only the signature gives it away.
    forged = replace(good, signed=replace(good.signed, signature=flipped))
    r.receive("eth2", net.wire(forged, net.s1), 0.0)
    # A member's genuine signature on a report changed to claim every source.
    greedy = net.report(net.s1, portions=net.everyone, key=None, nonce=b"\x02" * 8)
    stolen = net.report(net.s1, nonce=b"\x02" * 8).signed
    r.receive("eth2", net.wire(replace(greedy, signed=stolen), net.s1), 0.0)
    assert rejected(r) == {"bad signature": 2}
    assert r.members.get(int(net.group), {}) == {}


@family
def test_a_join_signed_with_another_key_is_refused(net: Family) -> None:
    r = net.make_router()
    r.receive("eth2", net.join(net.s1, key=OTHER), 0.0)
    assert rejected(r) == {"bad signature": 1} and r.members.get(int(net.group), {}) == {}
    # The refusal does not enter the replay cache: the member's own join still counts.
    r.receive("eth2", net.join(net.s1), 0.0)
    assert int(net.s1) in r.members[int(net.group)]


@family
def test_an_unsigned_join_to_a_private_group_is_refused(net: Family) -> None:
    r = net.make_router()
    record = record_for(net.group, net.even, RecordType.MODE_IS_INCLUDE)
    r.receive("eth2", net.wire(net.unsigned(record), net.s1), 0.0)
    r.receive("eth2", net.join(net.s1, key=None), 0.0)  # the fields, but no signature
    assert rejected(r) == {"unsigned": 2} and r.members.get(int(net.group), {}) == {}


@family
def test_a_public_group_is_admitted_without_a_signature(net: Family) -> None:
    r = net.make_router(key=None)
    record = record_for(net.public, net.even, RecordType.MODE_IS_INCLUDE)
    r.receive("eth2", net.wire(net.unsigned(record), net.s1), 0.0)
    assert keys_asked(r) == [] and rejected(r) == {} and r.stats.joins_accepted == 1
    relayed(r)
    # Anyone may send to a public group: no registration needed.
    assert net.data_hops_of(r, net.c1, net.public) == [("eth2", net.s1)]
    # The link is still checked.
    r.receive("eth3", net.wire(net.unsigned(record), net.s1), 0.0)
    assert rejected(r) == {"wrong link": 1}


@family
def test_truncated_and_garbage_reports_are_malformed(net: Family) -> None:
    r = net.make_router()
    good = net.join(net.s1)
    length = len(parse_packet(good).payload)
    bad = [
        net.truncated(good, length - 1),  # the signature's last byte gone
        net.truncated(good, 6),
        net.truncated(good, 0),
        # garbage behind the report type
        net.report_packet_with(bytes([net.report_type]) + b"\xff" * 40, net.s1),
        good[:-10],  # the IP header's length no longer matches
        good[:-1] + bytes([good[-1] ^ 1]),  # one bit flipped: bad checksum
    ]
    for packet in bad:
        r.receive("eth2", packet, 0.0)
    assert rejected(r) == {"malformed": len(bad)}
    assert r.stats.malformed == len(bad) and r.stats.joins_accepted == 0
    r.receive("eth2", bytes([net.version << 4 | 5, 0]), 0.0)  # not even an IP header: counted
    assert r.stats.malformed == len(bad) + 1
    # The member's real join is unaffected by what came before it.
    r.receive("eth2", good, 0.0)
    assert int(net.s1) in r.members[int(net.group)]


@family
@given(
    st.one_of(
        st.binary(max_size=200),
        st.tuples(st.integers(0, 200), st.binary(max_size=20)),  # a cut join and noise
    )
)
def test_garbage_never_raises(net: Family, drawn: bytes | tuple[int, bytes]) -> None:
    good = net.join(net.s1)
    genuine = parse_packet(good).payload
    data = drawn if isinstance(drawn, bytes) else good[: drawn[0]] + drawn[1]
    # As the payload of a report, anything but the member's own join is refused, counted.
    r = net.make_router()
    r.receive("eth2", net.report_packet_with(data, net.s1), 0.0)
    if not net.decodes(data, net.s1):
        assert r.stats.joins_accepted == 0 and r.stats.rejected["malformed"] == 1
    else:  # a well-formed report is judged on its merits
        assert r.stats.joins_accepted + sum(r.stats.rejected.values()) == 1
        assert (int(net.s1) in r.members.get(int(net.group), {})) == (data == genuine)
    # As a whole packet it may be anything (unicast, data); it never raises nor joins.
    r = net.make_router()
    r.receive("eth2", data, 0.0)
    assert r.stats.joins_accepted == (1 if data == good else 0)


@family
def test_every_refusal_is_counted_and_members_are_still_served(net: Family) -> None:
    """One router under every attack at once; its members keep being served."""
    r = net.make_router()
    outsider, stranger = net.host(net.lan, 0x66), net.host(net.lan, 4)
    r.receive("eth2", net.join(net.s1), 0.0)
    r.receive("eth3", net.join(net.s2, portions=net.odd), 0.0)
    r.receive("eth0", net.registration(net.c1), 0.0)
    r.receive("eth0", net.registration(net.c2), 0.0)
    relayed(r)
    good = net.join(net.s1, at=1.0, nonce=b"\x09" * 8)
    attacks = [
        ("eth2", good),
        ("eth2", good),  # duplicate
        ("eth2", net.join(net.s1, at=-40.0, nonce=b"\x0a" * 8)),  # stale
        ("eth3", net.join(net.s1, at=1.0, nonce=b"\x0b" * 8)),  # wrong link
        # bad signature
        ("eth2", net.join(net.s1, portions=net.everyone, key=OTHER, nonce=b"\x0c" * 8)),
        ("eth2", net.join(net.s1, key=None, nonce=b"\x0d" * 8)),  # unsigned
        ("eth2", net.truncated(good, 20)),  # malformed
        ("eth0", net.registration(outsider, key=OTHER)),  # outsider: bad signature
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
    assert net.data_hops_of(r, net.c1) == [("eth2", net.s1)]
    assert net.data_hops_of(r, net.c2) == [("eth3", net.s2)]
    # The outsider, and any host that never registered, is dropped at the first hop.
    assert net.data_hops_of(r, outsider) == []
    assert net.data_hops_of(r, stranger) == []
    assert rejected(r)["unauthorized sender"] == 2


@family
def test_every_router_on_the_way_checks_the_relayed_join(net: Family) -> None:
    """An admitted join travels upstream unchanged (an MLDv2 one with the checksum
    the relaying router's address gives it); a hop that alters it is caught."""
    edge = net.make_router()
    edge.receive("eth2", net.join(net.s1), 0.0)
    [up] = relayed(edge)
    upstream = net.links[0]
    sites = "10.0.0.0/8" if net.version == 4 else "2001:db8::/32"
    core = (Router if net.version == 4 else Router6)(
        "core",
        {"down": Interface("down", "up", net.host(upstream, 2), ip_network(upstream))},
        [(ip_network(sites), "down", net.host(upstream, 1))],
        {"down"},
        admission=Admission(wall_base=WALL),
    )
    core.provide_key(int(net.group), PUB, 300.0, 0.0)
    core.receive("down", up, 0.01)
    assert int(net.s1) in core.members[int(net.group)]
    # The same join, with its masks widened on the way (checksum fixed up).
    ip, original = net.decode(up)
    assert original.signed is not None
    widened = replace(
        original,
        records=(record_for(net.group, net.everyone, RecordType.MODE_IS_INCLUDE),),
        # A new random key too, so that it is not taken for a copy of the first.
        signed=replace(original.signed, random_key=b"\x07" * 8),
    )
    core.receive("down", net.wire(widened, ip.header.src), 0.02)
    assert rejected(core) == {"bad signature": 1}


# -- the key from a DNS server on loopback --------------------------------------------

ZONE = "pool.test."
ALIAS = "vault.pool.test."


def keys_asked(router: Router) -> list[int]:
    """Every group whose key the router has asked for so far (its KeyNeeded effects)."""
    return [e.group for e in router.effects if isinstance(e, KeyNeeded)]


def genuine_record(net: Family = V4, key: bytes = PUB) -> PoolRecord:
    return PoolRecord.create(ALIAS, net.group, "ops@pool.test", key)


def tampered_zones(net: Family, replacement: str) -> dict[str, str]:
    """The pool's zones with the key (`p=`) replaced in every TXT record that holds it."""
    good = base64.b64encode(PUB).decode()
    zones = pool_zones(ZONE, [genuine_record(net)])
    edited = {name: text.replace(f"p={good}", f"p={replacement}") for name, text in zones.items()}
    assert sum(text.count(f"p={replacement}") for text in edited.values()) == 2
    return edited


class DnsRouter:
    """A router whose key requests are answered as the runtime answers them: each
    `KeyNeeded` effect a DNS lookup (`lookup_key`) on `server`; `errors` keeps what
    the failed lookups found."""

    def __init__(self, net: Family, server: tuple[str, int]) -> None:
        self.router = net.make_router(key=None)
        self.errors: list[str] = []
        self.server = server

    def questions(self) -> list[int]:
        return [e.group for e in self.router.take_effects() if isinstance(e, KeyNeeded)]

    def answer(self, group: int) -> None:
        reply = lookup_key(group, self.server, timeout=5.0)
        if reply.detail is not None and reply.reason is not None:
            self.errors.append(reply.detail)
        self.router.provide_key(group, reply.public_key, reply.ttl, 0.05, reply.reason)


def join_through_dns(
    net: Family, zones: dict[str, str] | None, key: Ed25519PrivateKey = KEY
) -> DnsRouter:
    with EmbeddedServer(zones or pool_zones(ZONE, []), None) as server:
        asker = DnsRouter(net, server.address)
        asker.router.receive("eth2", net.join(net.s1, key=key), 0.0)
        questions = asker.questions()
        assert questions == [int(net.group)]  # one lookup, then the join waits for its answer
        assert asker.router.stats.joins_accepted == 0 and rejected(asker.router) == {}
        asker.answer(questions[0])
        return asker


@family
def test_key_looked_up_in_dns_admits_the_join(net: Family) -> None:
    asker = join_through_dns(net, pool_zones(ZONE, [genuine_record(net)]))
    assert asker.errors == [] and rejected(asker.router) == {}
    assert int(net.s1) in asker.router.members[int(net.group)]
    assert len(relayed(asker.router)) == 1


@family
def test_a_record_holding_another_key_refuses_the_join(net: Family) -> None:
    other = base64.b64encode(public_bytes(OTHER)).decode()
    asker = join_through_dns(net, tampered_zones(net, other))
    assert asker.errors == []  # a well-formed record: only the signature check can tell
    assert rejected(asker.router) == {"bad signature": 1}
    assert asker.router.members.get(int(net.group), {}) == {}
    # Whoever holds the substituted key gets in: the record is what routers trust.
    asker = join_through_dns(net, tampered_zones(net, other), key=OTHER)
    assert int(net.s1) in asker.router.members[int(net.group)]


@pytest.mark.parametrize("garbage", ["AAAA", "not-base64!", base64.b64encode(b"x" * 31).decode()])
def test_a_garbage_key_record_refuses_the_join(garbage: str) -> None:
    asker = join_through_dns(V4, tampered_zones(V4, garbage))
    [error] = asker.errors
    assert error.startswith("bad key record at ")
    assert rejected(asker.router) == {"bad key record": 1}
    assert asker.router.members.get(int(GROUP), {}) == {}


NXDOMAIN = {
    4: "5.5.5.232.in-addr.arpa.",
    6: "5.0.5.0.5.0.0.8.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.e.3.f.f.ip6.arpa.",
}


@family
def test_no_record_refuses_the_join_with_no_key(net: Family) -> None:
    asker = join_through_dns(net, None)
    [error] = asker.errors
    assert error.startswith(f"not found: {NXDOMAIN[net.version]} does not exist (NXDOMAIN)")
    assert rejected(asker.router) == {"no key": 1}
    assert asker.router.members.get(int(net.group), {}) == {}


# -- a private pool with outsiders (memory driver) --------------------------------------

POOL_GROUP = "232.5.5.5"
# Per family: the pool's group, and the members' and the outsiders' LANs.
POOL = {
    4: (POOL_GROUP, "10.1.0.0/24", "10.6.0.0/24"),
    6: (str(V6.group), "2001:db8:1::/64", "2001:db8:6::/64"),
}


def private_pool(*, extra: str = "", duration: float = 6.0, version: int = 4) -> str:
    """Members s1, s2 and a1..a12; an outsider server on the core and outsiders x1..x4
    on the members' edge router, all of whom know the group address."""
    group, members, outsiders = POOL[version]
    return f"""
[pool]
name = "vault.pool.test"
group = "{group}"
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
subnet = "{members}"
rate = 4.0
[[clients]]
name = "x"
count = 4
router = "ra"
subnet = "{outsiders}"
rate = 4.0
authorized = false

[run]
duration = {duration}
"""


class Watch:
    """Every packet the outsider server receives, and every report s1 sends."""

    def __init__(self, run: PoolRun) -> None:
        self.outsider: list[InnerPacket] = []
        self.s1_reports: list[bytes] = []
        evil = run.nodes.servers["evil"]
        s1 = run.nodes.servers["s1"]
        deliver, send = evil.receive, s1.send

        def evil_receive(iface: str, packet: bytes, now: float) -> None:
            self.outsider.append(parse_packet(packet))
            deliver(iface, packet, now)

        def s1_send(iface: str, packet: bytes, next_hop: int | None) -> None:
            if is_report(packet):
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


@family
def test_private_pool_serves_members_and_gives_outsiders_nothing(net: Family) -> None:
    run = PoolRun(loads(private_pool(version=net.version)), "memory", seed=3)
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
    # Every router delivers the group to the members alone: a client's registration
    # lets it send, and brings it nothing.
    members = {int(run.nodes.servers[name].address) for name in ("s1", "s2")}
    assert all(set(r.members[int(run.topology.pool.group)]) == members for r in routers.values())
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


@family
def test_attacks_on_a_running_pool_are_refused_while_it_serves(net: Family) -> None:
    """The outsider server replays, misroutes, forges and garbles joins at the core."""
    run = PoolRun(loads(private_pool(version=net.version)), "memory", seed=4)
    watch = Watch(run)
    evil = run.nodes.servers["evil"]
    core = run.nodes.routers["core"]
    clock = run.network
    baseline: dict[str, Counter[str]] = {}
    group = ip_address(POOL[net.version][0])

    def attack() -> None:
        baseline["core"] = Counter(core.stats.rejected)
        # One of s1's recent joins as it went on the wire (not the very last: that one
        # may still be on its way to the core).
        ip, captured = net.decode(watch.s1_reports[-2])
        assert captured.signed is not None
        me = evil.address
        stamp = int((evil.settings.wall_base + clock.now) * 1000)  # the pool's wall clock

        def own(rep: Report) -> bytes:
            return net.wire(rep, me)

        fresh = replace(captured.signed, timestamp=stamp)
        claim_all = record_for(group, net.everyone, RecordType.MODE_IS_INCLUDE)
        packets = [
            # The core saw this join relayed from rs: a copy is a duplicate (its
            # checksum made good for the sender's address, as MLDv2's must be).
            own(captured),
            # s1's join with fresh fields: the link is checked before the signature,
            # which no longer matches anyway.
            own(replace(captured, signed=replace(fresh, random_key=b"\x01" * 8))),
            # A join for itself, signed with its own (wrong) key, claiming every source.
            own(
                net.signed(
                    net.unsigned(
                        record_for(group, net.everyone, RecordType.MODE_IS_EXCLUDE),
                        SignedJoin(stamp, me, b"\x02" * 8),
                    ),
                    OTHER,
                )
            ),
            # The same without a signature.
            own(net.unsigned(claim_all, SignedJoin(stamp, me, b"\x03" * 8))),
            net.report_packet_with(ip.payload[:-7], me),  # truncated
            net.report_packet_with(bytes([net.report_type, 0]) + b"\xa5" * 30, me),  # garbage
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


@family
def test_private_pool_on_the_overlay_with_its_own_dns_server(net: Family) -> None:
    """The run publishes the pool's records (A or AAAA, in-addr.arpa or ip6.arpa) on
    its own DNS server, and its routers fetch the key by the group's reverse name."""
    # Deaths are not under test: 20 missed heartbeats (2 s) outlast a busy host's stalls.
    topo = loads(private_pool(extra="heartbeat_misses = 20", duration=4.0, version=net.version))
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
    assert not any(r.stats.rejected["no key"] for r in routers.values())


@pytest.fixture
def key_file(tmp_path: Path) -> Iterator[tuple[Path, Ed25519PrivateKey]]:
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "vault.key"
    save_private(key, path)
    yield path, key


def pool_records(key: bytes, net: Family = V4) -> list[PoolRecord]:
    """What `manycast private create` publishes for the pool and its control channel."""
    return [
        PoolRecord.create(ALIAS, POOL[net.version][0], "ops@pool.test", key),
        PoolRecord.create("control." + ALIAS, net.control, "ops@pool.test", key),
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
    ("net", "tamper", "reason"),
    [
        (V4, _as_is, None),
        (V4, _swap_key(base64.b64encode(public_bytes(OTHER)).decode()), "bad signature"),
        (V4, _swap_key("AAAA"), "bad key record"),
        (V4, _no_records, "no key"),
        # An IPv6 pool's `key_file` and `dns`: its AAAA record, the key at ip6.arpa
        # (the refusals are the same code as IPv4's, checked on one router above).
        (V6, _as_is, None),
    ],
    ids=["genuine", "another-key", "garbage-key", "no-record", "ipv6-genuine"],
)
def test_pool_reading_keys_from_a_dns_server(
    key_file: tuple[Path, Ed25519PrivateKey], net: Family, tamper: Tamper, reason: str | None
) -> None:
    """`[pool] key_file` and `[pool] dns`: the routers trust only what DNS serves."""
    path, key = key_file
    raw = public_bytes(key)
    zones = tamper(pool_zones(ZONE, pool_records(raw, net)), raw)
    with EmbeddedServer(zones, None) as dns_server:
        host, port = dns_server.address
        extra = f'key_file = "{path}"\ndns = "{host}:{port}"'
        text = private_pool(extra=extra, duration=2.5, version=net.version)
        run = PoolRun(loads(text), "memory", seed=6)
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
subnet = "{lan}"
"""


def plan_pool(net: Family, group: str, control: str | None = None, extra: str = "") -> str:
    return PLAN_POOL.format(
        group=group, control=control or net.control, extra=extra, lan=POOL[net.version][1]
    )


# Per family: a public group (outside the default private ranges), a custom private
# range holding it, and a control group in that range.
PUBLIC_GROUPS = {
    4: ("224.5.1.1", "224.5.0.0/16", "224.5.9.9"),
    6: ("ff3e::5:101", "ff3e::5:0/112", "ff3e::5:909"),
}


@family
def test_a_private_pool_must_use_the_private_range(net: Family) -> None:
    from manycast.topology import TopologyError

    public = PUBLIC_GROUPS[net.version][0]
    with pytest.raises(TopologyError, match=rf":4: .*group {public} is outside the private"):
        loads(plan_pool(net, public))
    # The default ranges cover both families; ranges given for one leave the other none.
    if net.version == 6:
        text = plan_pool(net, str(V6.group), extra='private_ranges = "232.0.0.0/5"')
        with pytest.raises(TopologyError, match=r"outside the private ranges \(232.0.0.0/5\)"):
            loads(text)


@family
def test_a_custom_private_range_is_enforced_by_the_routers(net: Family) -> None:
    group, ranges, control = PUBLIC_GROUPS[net.version]
    text = plan_pool(net, group, control, extra=f'private_ranges = "{ranges}"')
    run = PoolRun(loads(text), "memory", seed=3)
    run.run(4.0)
    summary = run.summary()
    assert summary["clients_served_at_end"] == 8
    refused = sum(r.stats.rejected["bad signature"] for r in run.nodes.routers.values())
    assert refused > 0  # the outsider's joins, in a range the plan makes private
    assert run.nodes.servers["evil"].host.counters.received == 0


@family
def test_a_configured_key_replaces_dns_and_a_wrong_one_admits_no_one(net: Family) -> None:
    from manycast.auth import generate
    from manycast.pool import pool_keys

    group = str(net.group)
    probe = loads(plan_pool(net, group))
    right = base64.b64encode(public_bytes(pool_keys(probe, 3)[0])).decode()
    wrong = base64.b64encode(public_bytes(generate())).decode()
    for key, served in ((right, 8), (wrong, 0)):
        text = plan_pool(net, group, extra=f'public_key = "{key}"')
        run = PoolRun(loads(text), "memory", seed=3)
        run.run(3.0)
        assert run.summary()["clients_served_at_end"] == served


@family
def test_a_sender_that_stops_registering_is_refused_after_the_hold_time(net: Family) -> None:
    router = net.make_router()
    router.receive("eth0", net.registration(net.c1), 0.0)
    router.take_frames()
    router.receive("eth0", net.datagram(net.c1), 1.0)
    router.take_frames()
    assert rejected(router).get("unauthorized sender", 0) == 0
    # No refresh: when the hold time passes the registration lapses, and the group's
    # forwarding entries are invalidated so a kernel drops them too.
    router.take_effects()
    deadline = router.next_deadline()
    assert deadline is not None and deadline <= 30.0
    router.on_timer(deadline)
    # what a kernel data plane listens to
    assert router.take_effects() == [GroupChanged(int(net.group))]
    router.receive("eth0", net.datagram(net.c1), deadline + 0.1)
    assert rejected(router).get("unauthorized sender", 0) == 1


@pytest.mark.parametrize("server_kind", ["embedded", "knot"])
@family
def test_a_pools_own_records_give_its_routers_the_key_of_each_group(
    net: Family, server_kind: str
) -> None:
    """What the runtime publishes for a private pool (A or AAAA records, the key at
    each group's in-addr.arpa or ip6.arpa name), served by the embedded server or
    knot, answers a router's question for each of its groups with the pool's key."""
    run = PoolRun(loads(private_pool(version=net.version)), "memory", seed=3)
    records = run.pool_records()
    pool = run.topology.pool
    assert [r.groups for r in records] == [(pool.group,), (pool.control_group,)]
    if server_kind == "knot":
        if not knot_available():
            pytest.skip("knot is not installed; `make dns-deps` installs it (root)")
        server: Any = KnotServer.for_pool(ZONE, records, TsigKey.generate("manycast-update."))
    else:
        server = EmbeddedServer.for_pool(ZONE, records, None)
    with server:
        for group in (int(pool.group), int(pool.control_group)):
            answer = lookup_key(group, server.address, timeout=5.0)
            assert answer.reason is None, answer.detail
            assert answer.public_key == run.nodes.directory[group]
    run.close()


@pytest.mark.parametrize(
    ("given", "found"),
    [
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("[::1]:5353", ("::1", 5353)),
        ("[2001:db8::53]:53", ("2001:db8::53", 53)),
        ("[::1]", None),
        ("[::1]:0", None),
        ("[dns.example]:53", None),
        ("127.0.0.1", None),
    ],
)
def test_a_pools_dns_server_is_named_by_an_ipv4_or_ipv6_address(
    given: str, found: tuple[str, int] | None
) -> None:
    from manycast.topology import TopologyError

    text = private_pool(extra=f'dns = "{given}"', version=6)
    if found is not None:
        assert loads(text).pool.dns == found
        return
    with pytest.raises(TopologyError, match=r"'dns' = .*(HOST:PORT|is not an IP address)"):
        loads(text)
