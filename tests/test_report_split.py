"""Membership reports cut to fit a link's MTU, and routers acting on them whole.

Regression for docs/soak.md finding 1 (soak seed 20261201, R3, overlay): after a
few hundred reallocations a server's portions ran to thousands of value/mask
pairs; its Claim 3 report (the old portions blocked, the new ones allowed) no
longer fit one IP packet, `igmp_packet` raised `ValueError: total_length 86106
does not fit in 16 bits`, and the overlay's loop stopped every node of that
process. Here a report goes out as parts that each fit a 1500-byte packet, each
signed on its own, and a router acts on a split report once it has every part.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace
from ipaddress import IPv4Address

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from manycast.protocol.membership import (
    SourceFilter,
    any_source_record,
    changes,
    report_packets,
    whole_record_for,
)
from manycast.protocol.refusal import Refusal
from manycast.protocol.router import Router
from manycast.runtime import PoolRun
from manycast.space import AddressSpace, PortionSet
from manycast.topology import loads
from manycast.wire.ip import IPPROTO_IGMP, IPv4Packet
from manycast.wire.membership import (
    GroupRecord,
    IGMPv3Report,
    MaskPair,
    RecordType,
    SignedJoin,
    igmp_packet,
    signed_join_length,
)
from manycast.wire.report_split import (
    IGMP_BUDGET,
    LINK_MTU,
    WholeRecord,
    piece_length,
    split_records,
)
from pooltools import assert_all_served_since, assert_one_allocation, pool_toml
from test_private import GROUP, KEY, PUB, S1, V4, WALL, Family, family

SEED = 20261201
CONTROL = IPv4Address("239.255.77.1")
SPACE = AddressSpace.create()  # 65 536 buckets over every IPv4 source, as in the soak
# The same over every IPv6 source, the index the low 16 bits as an IPv6 pool's default.
SPACES = {4: SPACE, 6: AddressSpace.create("::/0")}


# -- the splitter ------------------------------------------------------------------------


@st.composite
def long_records(draw: st.DrawFn) -> WholeRecord:
    def pair(bits: tuple[int, int]) -> MaskPair:
        return MaskPair(bits[0] & bits[1], bits[1])

    masks = st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)), max_size=400)
    return WholeRecord(
        draw(st.sampled_from(RecordType)),
        IPv4Address(draw(st.integers(0xE0000000, 0xEFFFFFFF))),
        tuple(IPv4Address(a) for a in draw(st.lists(st.integers(0, 2**32 - 1), max_size=300))),
        tuple(pair(p) for p in draw(masks)),
        tuple(pair(p) for p in draw(masks)),
        bytes(4 * draw(st.integers(0, 3))),
    )


def _rejoin(records: list[WholeRecord], parts: list[tuple[GroupRecord, ...]], room: int) -> None:
    """Each record is its pieces, in order, joined end to end (asserted)."""
    pieces = [piece for part in parts for piece in part]
    for record in records:
        sources: list[IPv4Address] = []
        includes: list[MaskPair] = []
        excludes: list[MaskPair] = []
        taken = 0
        while True:
            piece = pieces.pop(0)
            taken += 1
            assert (piece.record_type, piece.group, piece.aux) == (
                record.record_type,
                record.group,
                record.aux,
            )
            sources += piece.sources  # type: ignore[arg-type]
            includes += piece.include_masks
            excludes += piece.exclude_masks
            if (len(sources), len(includes), len(excludes)) == (
                len(record.sources),
                len(record.include_masks),
                len(record.exclude_masks),
            ):
                break
        assert (tuple(sources), tuple(includes), tuple(excludes)) == (
            record.sources,
            record.include_masks,
            record.exclude_masks,
        )
        width = piece_length(4, len(record.aux), len(record.sources), len(includes + excludes))
        if width <= room:
            assert taken == 1  # a record that fits an empty report is never cut
    assert pieces == []


@settings(max_examples=60, deadline=None)
@given(st.lists(long_records(), max_size=4), st.integers(300, IGMP_BUDGET))
def test_parts_fit_the_budget_and_join_up_to_the_records(
    records: list[WholeRecord], budget: int
) -> None:
    trailer = 4 + signed_join_length(S1, 8, 64)
    parts = split_records(records, budget, trailer)
    assert parts
    for index, part in enumerate(parts):
        signed = SignedJoin(1, S1, bytes(8), bytes(64), 7, index, len(parts))
        report = IGMPv3Report(part, signed)
        wire = report.to_wire()
        assert len(wire) <= budget
        assert IGMPv3Report.from_wire(wire) == report
    _rejoin(records, parts, budget - 8 - trailer)
    whole = (
        8
        + trailer
        + sum(
            piece_length(4, len(r.aux), len(r.sources), len(r.include_masks + r.exclude_masks))
            for r in records
        )
    )
    assert (len(parts) == 1) == (whole <= budget)


def test_a_report_that_fits_is_one_part_of_the_records_as_they_were() -> None:
    records = [any_source_record(CONTROL, RecordType.MODE_IS_EXCLUDE)]
    assert split_records(records, IGMP_BUDGET) == [tuple(records)]
    assert split_records([], IGMP_BUDGET) == [()]


def test_a_budget_too_small_for_any_piece_is_an_error() -> None:
    record = WholeRecord(RecordType.ALLOW_NEW_SOURCES, GROUP, include_masks=(MaskPair(1, 1),))
    with pytest.raises(ValueError, match="cannot hold a record"):
        split_records([record], 40, 20)


# -- a heavily fragmented allocation ---------------------------------------------------------


def _selection(seed: int, share: float = 0.5) -> np.ndarray:
    """A random selection of the space's buckets: thousands of portions."""
    return np.random.default_rng(seed).random(SPACE.buckets) < share


def _report(
    net: Family, portions: PortionSet, previous: PortionSet | None, generation: int
) -> list[bytes]:
    """s1's report as the server sends it: the control channel, then its portions (a
    current-state record, or Claim 3's block of the old and allow of the new)."""
    records: list[GroupRecord | WholeRecord] = [
        any_source_record(net.control, RecordType.MODE_IS_EXCLUDE)
    ]
    if previous is None:
        records.append(whole_record_for(net.group, portions, RecordType.MODE_IS_INCLUDE))
    else:
        records.append(whole_record_for(net.group, previous, RecordType.BLOCK_OLD_SOURCES))
        records.append(whole_record_for(net.group, portions, RecordType.ALLOW_NEW_SOURCES))
    wall_ms = int((WALL + 1.0) * 1000)
    return report_packets(records, net.s1, wall_ms, generation, random.Random(generation), KEY)


def _router(net: Family) -> Router:
    """test_private's first-hop router (s1 on eth2), with the control group's key too."""
    router = net.make_router()
    router.provide_key(int(net.control), PUB, 300.0, 0.0)
    return router


def _sample(net: Family, router: Router, sources: list[int]) -> np.ndarray:
    """Whether the router sends each source's packets to s1 (and to nobody else)."""
    out = []
    for source in sources:
        hops = router.resolve(source, int(net.group))
        assert hops in ((), (("eth2", int(net.s1)),))
        out.append(bool(hops))
    return np.array(out)


def test_split_parts_rejoin_to_the_portions_filter() -> None:
    portions = SPACE.cover(_selection(SEED))
    assert len(portions) > 10_000
    packets = _report(V4, portions, None, 1)
    assert len(packets) > 100 and max(len(p) for p in packets) <= LINK_MTU
    records = [
        record
        for packet in packets
        for record in IGMPv3Report.from_wire(IPv4Packet.from_wire(packet).payload).records
    ]
    assert dict(changes(records)) == {
        CONTROL: SourceFilter.any_source(),
        GROUP: SourceFilter.of(portions),
    }


@family
def test_router_acts_on_a_split_report_only_once_it_has_every_part(net: Family) -> None:
    """A current-state report and then a Claim 3 change, each of a hundred parts or
    more (IGMPv3, or signed MLDv2 parts on IPv6): until the last part the router
    forwards as before, then exactly as the report says; a forged part and a
    replayed one are refused, and the refused forgery does not stand in for the
    genuine part."""
    router = _router(net)
    space = SPACES[net.version]
    group, s1 = int(net.group), int(net.s1)
    first, second = _selection(SEED), _selection(SEED + 1)
    old, new = space.cover(first), space.cover(second)
    # Sources anywhere in IPv4, or anywhere in the clients' /64 (the index is low bits).
    base = 0 if net.version == 4 else int(net.host(net.lan, 0))
    random_bits = np.random.default_rng(SEED).integers(0, 2**32, 300, dtype=np.uint64)
    sources = [base + bits for bits in random_bits.tolist()]
    buckets = np.array([space.bucket(source) for source in sources])

    join = _report(net, old, None, 1)
    assert len(join) > 100
    for packet in join[:-1]:
        router.receive("eth2", packet, 1.0)
    assert router.members.get(group, {}) == {}  # nothing yet: no part acted on alone
    assert not _sample(net, router, sources[:50]).any()
    router.receive("eth2", join[-1], 1.0)
    member = router.members[group][s1]
    assert member.filter == SourceFilter.of(old)  # exactly the unsplit report's filter
    assert (_sample(net, router, sources) == first[buckets]).all()

    change = _report(net, new, old, 2)
    assert len(change) > len(join)
    # The last part with its last record altered after signing, and a fresh random
    # key (past the replay cache), on s1's own link: refused.
    _, original = net.decode(change[-1])
    assert original.signed is not None
    altered = replace(original.records[-1], include_masks=(MaskPair(0, 0),), exclude_masks=())
    forged = replace(
        original,
        records=(*original.records[:-1], altered),
        signed=replace(original.signed, random_key=b"\x05" * 8),
    )
    refused = Counter(router.stats.rejected)
    before = member.filter
    for packet in change[:-1]:
        router.receive("eth2", packet, 1.0)
        assert router.members[group][s1].filter is before  # untouched meanwhile
    router.receive("eth2", net.wire(forged, net.s1), 1.0)
    router.receive("eth2", change[0], 1.0)  # a copy of a part already admitted
    assert router.members[group][s1].filter is before  # still the old portions
    assert (_sample(net, router, sources) == first[buckets]).all()
    router.receive("eth2", change[-1], 1.0)
    assert router.members[group][s1].filter == SourceFilter.of(new)  # all at once
    assert (_sample(net, router, sources) == second[buckets]).all()
    after = Counter(router.stats.rejected)
    after.subtract(refused)
    assert +after == {Refusal.BAD_SIGNATURE: 1, Refusal.DUPLICATE: 1}
    assert router.parts.stats.completed == 2 and len(router.parts) == 0

    # Clients s1 now serves send to the group and reach s1, and only s1; the others
    # reach nobody here (s1 is this router's only member).
    lan = [net.host(net.lan, i) for i in range(2, 254)]
    served = [a for a in lan if second[space.bucket(int(a))]]
    others = [a for a in lan if not second[space.bucket(int(a))]]
    for address in served[:3]:
        router.receive("eth0", net.registration(address, at=1.0), 1.0)
        assert net.data_hops_of(router, address) == [("eth2", net.s1)]
    for address in others[:3]:  # and the others' packets not to s1
        router.receive("eth0", net.registration(address, at=1.0), 1.0)
        assert net.data_hops_of(router, address) == []


def test_a_part_keeps_the_membership_alive_without_the_others() -> None:
    """Parts that do arrive prove the server is alive: its membership lasts, even
    when a part of each later report is lost."""
    router = _router(V4)
    router.hold_time = router.parts.hold = 3.0
    portions = SPACE.cover(_selection(SEED))
    for packet in _report(V4, portions, None, 1):
        router.receive("eth2", packet, 1.0)
    held = router.members[int(GROUP)][int(S1)]
    for generation, now in ((2, 3.0), (3, 5.0), (4, 7.0)):
        parts = _report(V4, portions, None, generation)
        for packet in parts[1:]:  # the first part lost every time
            router.receive("eth2", packet, now)
        router.on_timer(now)
    assert router.members[int(GROUP)][int(S1)] is held and held.expires == 10.0
    assert router.parts.stats.completed == 1


# -- the soak's crash, on a whole pool ---------------------------------------------------------


def test_seed_20261201_fragmented_claim_3_report_no_longer_stops_the_pool() -> None:
    """docs/soak.md finding 1, seed 20261201: s1 and s2 hold 3001 stripes of a
    65 536-bucket space (about 5000 value/mask pairs each), then s1's share is set
    to 0.4, so each Claim 3 report blocks about 5000 pairs and allows about 3900:
    about 71 KB, which raised `ValueError: total_length 71378 does not fit in 16
    bits` in `igmp_packet` and stopped the whole run. Now every report packet fits
    the 1500-byte MTU, the routers forward each client to its owner alone, every
    client is served after the change, and a replayed or forged part is refused."""
    text = pool_toml(
        servers=2,
        clients=12,
        duration=4.0,
        pool={"private": True, "policy": "striped", "portions": 3001},
        scenario=[(2.0, "set_share", {"server": "s1", "share": 0.4})],
    )
    run = PoolRun(loads(text), "memory", seed=SEED)
    sent: list[tuple[float, str, bytes]] = []
    for name, server in run.nodes.servers.items():
        send = server.send

        def watch(iface: str, packet: bytes, hop: int | None, name=name, send=send) -> None:
            if packet[9] == IPPROTO_IGMP:
                sent.append((run.network.now, name, packet))
            send(iface, packet, hop)

        server.send = watch  # type: ignore[method-assign]
    s1 = run.nodes.servers["s1"]
    edge = run.nodes.routers["rs1"]  # s1's first-hop router
    attacks: dict[str, Counter[Refusal]] = {}

    def attack() -> None:
        # Parts of a report s1 sent a moment ago, arriving again on s1's link: one as
        # it was (a replay), one with its last record altered and a new random key
        # (a forgery that the replay cache does not catch).
        iface = edge.route(int(s1.address))
        assert iface is not None
        recent = [p for at, name, p in sent if name == "s1" and at < run.network.now - 0.1]
        ip = IPv4Packet.from_wire(recent[-1])
        report = IGMPv3Report.from_wire(ip.payload)
        assert report.signed is not None and report.signed.parts > 1
        last = report.records[-1]
        forged = replace(
            report,
            records=(*report.records[:-1], replace(last, sources=(S1,))),
            signed=replace(report.signed, random_key=b"\x05" * 8),
        )
        attacks["before"] = Counter(edge.stats.rejected)
        edge.receive(iface[0], recent[-1], run.network.now)
        edge.receive(iface[0], igmp_packet(forged, s1.address).to_wire(), run.network.now)
        attacks["after"] = Counter(edge.stats.rejected)

    run.network.call_at(3.0, attack)
    run.run(4.0)

    assert max(len(packet) for _, _, packet in sent) <= LINK_MTU
    parts: Counter[tuple[str, int]] = Counter()
    length: Counter[tuple[str, int]] = Counter()
    for _, name, packet in sent:
        signed = IGMPv3Report.from_wire(IPv4Packet.from_wire(packet).payload).signed
        assert signed is not None and signed.signature
        parts[name, signed.generation] += 1
        length[name, signed.generation] += len(packet)
    # The longest report, a Claim 3 change, would not have fit one IP packet.
    longest = max(length, key=length.__getitem__)
    assert length[longest] > 65_535 and parts[longest] > 50
    assert_one_allocation(run)  # every router sends each client to its owner alone
    assert_all_served_since(run, 2.5)
    refused = attacks["after"]
    refused.subtract(attacks["before"])
    assert +refused == {Refusal.DUPLICATE: 1, Refusal.BAD_SIGNATURE: 1}
    for router in run.nodes.routers.values():
        assert router.parts.stats.expired == router.parts.stats.evicted == 0


def _members(router: Router) -> set[int]:
    return {origin for members in router.members.values() for origin in members}
