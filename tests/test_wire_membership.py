"""IGMPv3/MLDv2 reports with mask and signed-join extensions: vectors, round trips, garbage."""

from __future__ import annotations

import struct
from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from manycast.wire.cursor import internet_checksum
from manycast.wire.errors import WireError
from manycast.wire.ip import IPPROTO_ICMPV6, IPPROTO_IGMP, IPv4Packet, IPv6Packet, pseudo_header
from manycast.wire.membership import (
    EXT_GROUP_MASKS,
    EXT_SIGNED_JOIN,
    IGMP_V3_ROUTERS,
    MLD_V2_ROUTERS,
    GroupRecord,
    IGMPv3Report,
    MaskPair,
    MLDv2Report,
    RecordType,
    SignedJoin,
    igmp_packet,
    mld_packet,
)

# Linux's IGMPv3 report for a source-specific join of (198.51.100.7, 232.1.2.3).
KERNEL_SSM_JOIN = bytes.fromhex("2200c4bd000000010500 0001e8010203c6336407".replace(" ", ""))
HOST = IPv6Address("fe80::1")
# Captured from Linux on a veth pair: the same join wrapped for the wire, and an
# MLDv2 join of (2001:db8::7, ff3e::8000:1), from fe80::848d:fbff:fe91:7ef4.
KERNEL_IGMP_PACKET = bytes.fromhex(
    "46c0002c00004000010241f4c0000201e0000016940400002200c4bd0000000105000001e8010203c6336407"
)
KERNEL_MLD_PACKET = bytes.fromhex(
    "6000000000340001fe80000000000000848dfbfffe917ef4ff020000000000000000000000000016"
    "3a00050200000100"
    "8f00c2e80000000105000001ff3e000000000000000000008000000120010db8000000000000000000000007"
)


def addresses(bits: int) -> st.SearchStrategy[IPv4Address | IPv6Address]:
    make = IPv4Address if bits == 32 else IPv6Address
    return st.builds(make, st.integers(0, 2**bits - 1))


@st.composite
def mask_pairs(draw: st.DrawFn, bits: int) -> MaskPair:
    mask = draw(st.integers(0, 2**bits - 1))
    return MaskPair(draw(st.integers(0, 2**bits - 1)) & mask, mask)


@st.composite
def records(draw: st.DrawFn, bits: int) -> GroupRecord:
    masks = st.lists(mask_pairs(bits), max_size=3).map(tuple)
    return GroupRecord(
        record_type=draw(st.sampled_from(RecordType)),
        group=draw(addresses(bits)),
        sources=tuple(draw(st.lists(addresses(bits), max_size=3))),
        include_masks=draw(masks),
        exclude_masks=draw(masks),
        aux=draw(st.binary(max_size=8).map(lambda b: b + bytes(-len(b) % 4))),
    )


@st.composite
def signed_joins(draw: st.DrawFn, bits: int) -> SignedJoin:
    parts = draw(st.integers(1, 2**16 - 1))
    return SignedJoin(
        draw(st.integers(0, 2**64 - 1)),
        draw(addresses(bits)),
        draw(st.binary(max_size=32)),
        draw(st.binary(max_size=80)),
        draw(st.integers(0, 2**32 - 1)),
        draw(st.integers(0, parts - 1)),
        parts,
    )


def igmp_reports() -> st.SearchStrategy[IGMPv3Report]:
    return st.builds(
        IGMPv3Report, st.lists(records(32), max_size=3).map(tuple), st.none() | signed_joins(32)
    )


def mld_reports() -> st.SearchStrategy[MLDv2Report]:
    return st.builds(
        MLDv2Report, st.lists(records(128), max_size=3).map(tuple), st.none() | signed_joins(128)
    )


def igmp_with_checksum(message: bytes) -> bytes:
    zeroed = message[:2] + b"\0\0" + message[4:]
    return zeroed[:2] + internet_checksum(zeroed).to_bytes(2, "big") + zeroed[4:]


def truncations_and_flips(wire: bytes) -> list[bytes]:
    cuts = [wire[:n] for n in range(len(wire))]
    flips = [
        wire[:i] + bytes((wire[i] ^ 1 << b,)) + wire[i + 1 :]
        for i in range(len(wire))
        for b in range(8)
    ]
    return cuts + flips


def igmp_decodes_canonically(data: bytes) -> None:
    try:
        report = IGMPv3Report.from_wire(data)
    except WireError:
        return
    assert report.to_wire() == data


def mld_decodes_canonically(data: bytes) -> None:
    try:
        report = MLDv2Report.from_wire(data, HOST)
    except WireError:
        return
    assert report.to_wire(HOST) == data


# --- the kernel's report --------------------------------------------------------------


def test_kernel_ssm_join_vector() -> None:
    report = IGMPv3Report.from_wire(KERNEL_SSM_JOIN)
    assert report == IGMPv3Report(
        (
            GroupRecord(
                RecordType.ALLOW_NEW_SOURCES,
                IPv4Address("232.1.2.3"),
                (IPv4Address("198.51.100.7"),),
            ),
        )
    )
    assert report.signed is None
    assert report.to_wire() == KERNEL_SSM_JOIN


def test_igmp_packet_as_a_host_sends_it() -> None:
    report = IGMPv3Report.from_wire(KERNEL_SSM_JOIN)
    packet = igmp_packet(report, IPv4Address("192.0.2.10"))
    wire = packet.to_wire()
    # IHL 6 (Router Alert), TOS 0xc0, DF, TTL 1, protocol IGMP, to 224.0.0.22.
    assert wire[:2] == b"\x46\xc0" and wire[6:10] == b"\x40\x00\x01\x02"
    assert wire[16:24] == IGMP_V3_ROUTERS.packed + b"\x94\x04\x00\x00"
    assert wire[24:] == KERNEL_SSM_JOIN
    decoded = IPv4Packet.from_wire(wire)
    assert decoded.header.router_alert and decoded.header.protocol == IPPROTO_IGMP
    assert IGMPv3Report.from_wire(decoded.payload) == report


def test_kernel_packets_rebuilt_byte_for_byte() -> None:
    report = IGMPv3Report.from_wire(IPv4Packet.from_wire(KERNEL_IGMP_PACKET).payload)
    assert report == IGMPv3Report.from_wire(KERNEL_SSM_JOIN)
    assert igmp_packet(report, IPv4Address("192.0.2.1")).to_wire() == KERNEL_IGMP_PACKET
    packet = IPv6Packet.from_wire(KERNEL_MLD_PACKET)
    mld = MLDv2Report.from_wire(packet.payload, packet.header.src)
    assert mld == MLDv2Report(
        (
            GroupRecord(
                RecordType.ALLOW_NEW_SOURCES,
                IPv6Address("ff3e::8000:1"),
                (IPv6Address("2001:db8::7"),),
            ),
        )
    )
    assert mld_packet(mld, packet.header.src).to_wire() == KERNEL_MLD_PACKET


def test_mld_packet_as_a_host_sends_it() -> None:
    report = MLDv2Report(
        (
            GroupRecord(
                RecordType.ALLOW_NEW_SOURCES,
                IPv6Address("ff3e::8000:1"),
                (IPv6Address("2001:db8::7"),),
            ),
        )
    )
    packet = mld_packet(report, HOST)
    wire = packet.to_wire()
    assert wire[6:8] == b"\x00\x01"  # next header Hop-by-Hop, hop limit 1
    assert wire[24:40] == MLD_V2_ROUTERS.packed
    assert wire[40:48] == bytes.fromhex("3a00050200000100")
    assert wire[48] == 143
    decoded = IPv6Packet.from_wire(wire)
    assert decoded.protocol == IPPROTO_ICMPV6 and decoded.hop_by_hop is not None
    assert decoded.hop_by_hop.router_alert == 0
    assert MLDv2Report.from_wire(decoded.payload, decoded.header.src) == report


# --- the extension layout -------------------------------------------------------------


def test_extension_layout_is_pinned() -> None:
    group = IPv4Address("232.1.2.3")
    report = IGMPv3Report(
        (
            GroupRecord(
                RecordType.MODE_IS_INCLUDE,
                group,
                (),
                include_masks=(MaskPair(0x0A000000, 0xFF000001),),
                exclude_masks=(MaskPair(0, 0x80),),
            ),
        ),
        SignedJoin(
            0x0102030405060708,
            IPv4Address("10.0.0.9"),
            b"KEY",
            b"SIG",
            generation=0x0A0B0C0D,
            part=1,
            parts=3,
        ),
    )
    wire = report.to_wire()
    expected = (
        b"\x22\x00"
        + wire[2:4]
        + b"\x80\x00\x00\x01"
        + b"\x01\x00\x00\x00"
        + group.packed
        + struct.pack("!HH", EXT_GROUP_MASKS, 24)
        + b"\x00\x00\x00\x01"
        + group.packed
        + bytes.fromhex("0a000000ff000001")
        + bytes.fromhex("0000000000000080")
        + struct.pack("!HH", EXT_SIGNED_JOIN, 8 + 4 + 8 + 2 + 3 + 3)
        + bytes.fromhex("0102030405060708")
        + bytes((10, 0, 0, 9))
        + bytes.fromhex("0a0b0c0d00010003")
        + b"\x00\x03KEY"
        + b"SIG"
    )
    assert wire == expected
    assert internet_checksum(wire) == 0


def test_signed_bytes_cover_all_but_signature_and_checksum() -> None:
    record = GroupRecord(
        RecordType.MODE_IS_INCLUDE, IPv4Address("232.0.0.1"), include_masks=(MaskPair(1, 1),)
    )
    join = SignedJoin(1_700_000_000_000, IPv4Address("10.0.0.9"), b"k" * 16, b"s" * 64)
    report = IGMPv3Report((record,), join)
    unsigned = replace(report, signed=replace(join, signature=b""))
    expected = unsigned.to_wire()
    assert report.signed_bytes() == expected[:2] + b"\0\0" + expected[4:]
    assert replace(report, signed=replace(join, signature=b"x" * 70)).signed_bytes() == (
        report.signed_bytes()
    )
    assert replace(report, signed=replace(join, timestamp=1)).signed_bytes() != (
        report.signed_bytes()
    )
    with pytest.raises(ValueError, match="no signed join"):
        IGMPv3Report((record,)).signed_bytes()
    mld = MLDv2Report((), SignedJoin(5, HOST, b"k", b"sig"))
    assert mld.signed_bytes()[2:4] == b"\0\0"
    assert not mld.signed_bytes().endswith(b"sig")


# --- round trips ----------------------------------------------------------------------


@given(igmp_reports())
def test_igmp_round_trip(report: IGMPv3Report) -> None:
    wire = report.to_wire()
    assert IGMPv3Report.from_wire(wire) == report
    assert IGMPv3Report.from_wire(wire).to_wire() == wire
    assert internet_checksum(wire) == 0


@given(mld_reports(), addresses(128))
def test_mld_round_trip(report: MLDv2Report, src: IPv4Address | IPv6Address) -> None:
    assert isinstance(src, IPv6Address)
    wire = report.to_wire(src)
    assert MLDv2Report.from_wire(wire, src) == report
    assert MLDv2Report.from_wire(wire, src).to_wire(src) == wire
    assert internet_checksum(pseudo_header(src, MLD_V2_ROUTERS, 58, len(wire)) + wire) == 0


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_mask_pair_matching(address: int, mask: int) -> None:
    pair = MaskPair(address & mask, mask)
    assert pair.matches(address)
    assert pair.matches(address ^ ~mask & 0xFFFFFFFF)
    if mask:
        assert not pair.matches(address ^ (mask & -mask))


# --- strictness -----------------------------------------------------------------------


@settings(max_examples=25)
@given(igmp_reports())
def test_igmp_mutations_raise_only_wire_error(report: IGMPv3Report) -> None:
    for data in truncations_and_flips(report.to_wire()):
        igmp_decodes_canonically(data)


@settings(max_examples=15)
@given(mld_reports())
def test_mld_mutations_raise_only_wire_error(report: MLDv2Report) -> None:
    for data in truncations_and_flips(report.to_wire(HOST)):
        mld_decodes_canonically(data)


@given(st.binary(max_size=200))
def test_random_bytes_raise_only_wire_error(data: bytes) -> None:
    igmp_decodes_canonically(data)
    mld_decodes_canonically(data)


@given(st.binary(max_size=120))
def test_random_bodies_with_valid_checksum(body: bytes) -> None:
    # Past the checksum, so the structural checks get exercised, not just the sum.
    igmp_decodes_canonically(igmp_with_checksum(b"\x22\x00\x00\x00" + body))


def test_kernel_vector_truncations_and_flips() -> None:
    for data in truncations_and_flips(KERNEL_SSM_JOIN):
        igmp_decodes_canonically(data)


def test_corrupted_checksums_are_refused() -> None:
    bad = KERNEL_SSM_JOIN[:2] + b"\xc4\xbe" + KERNEL_SSM_JOIN[4:]
    with pytest.raises(WireError, match="checksum"):
        IGMPv3Report.from_wire(bad)
    twin = igmp_with_checksum(KERNEL_SSM_JOIN)
    assert twin == KERNEL_SSM_JOIN
    report = MLDv2Report((GroupRecord(RecordType.MODE_IS_EXCLUDE, IPv6Address("ff05::2")),))
    wire = report.to_wire(HOST)
    with pytest.raises(WireError, match="checksum"):
        MLDv2Report.from_wire(wire, IPv6Address("fe80::2"))
    with pytest.raises(WireError, match="checksum"):
        MLDv2Report.from_wire(wire[:2] + bytes((wire[2] ^ 1, wire[3])) + wire[4:], HOST)


def _report(records: bytes, count: int, extensions: bytes = b"", flags: int = 0x8000) -> bytes:
    header = struct.pack("!BBHHH", 0x22, 0, 0, flags if extensions else 0, count)
    return igmp_with_checksum(header + records + extensions)


_GROUP = IPv4Address("232.1.2.3")
_RECORD = b"\x01\x00\x00\x00" + _GROUP.packed


def _masks(index: int, include: int, group: IPv4Address, pairs: bytes) -> bytes:
    value = struct.pack("!HH", index, include) + group.packed + pairs
    return struct.pack("!HH", EXT_GROUP_MASKS, len(value)) + value


def _signed(signature: bytes = b"sig", part: int = 0, parts: int = 1) -> bytes:
    value = bytes(8) + bytes(4) + struct.pack("!IHH", 7, part, parts) + b"\x00\x01k" + signature
    return struct.pack("!HH", EXT_SIGNED_JOIN, len(value)) + value


_PAIR = bytes.fromhex("0a000000ff000000")


@pytest.mark.parametrize(
    ("message", "complaint"),
    [
        (_report(_RECORD, 1, _masks(0, 1, _GROUP, _PAIR)), None),
        (
            _report(_RECORD, 1, _masks(0, 1, _GROUP, bytes.fromhex("0a000001ff000000"))),
            "bits outside mask",
        ),
        (_report(_RECORD, 1, _masks(0, 2, _GROUP, _PAIR)), "include count"),
        (_report(_RECORD, 1, _masks(1, 1, _GROUP, _PAIR)), "out of order"),
        (
            _report(_RECORD * 2, 2, _masks(1, 1, _GROUP, _PAIR) + _masks(0, 1, _GROUP, _PAIR)),
            "out of order",
        ),
        (_report(_RECORD * 2, 2, _masks(0, 1, _GROUP, _PAIR) * 2), "out of order"),
        (_report(_RECORD, 1, _masks(0, 1, IPv4Address("232.9.9.9"), _PAIR)), "names group"),
        (_report(_RECORD, 1, _masks(0, 0, _GROUP, b"")), "positive multiple"),
        (_report(_RECORD, 1, _masks(0, 0, _GROUP, _PAIR[:6])), "positive multiple"),
        (_report(_RECORD, 1, _signed() + _masks(0, 1, _GROUP, _PAIR)), "not last"),
        (_report(_RECORD, 1, _signed() + _signed()), "not last"),
        (_report(_RECORD, 1, struct.pack("!HH", 0, 0)), "unsupported extension type 0"),
        (_report(_RECORD, 1, b"\x00"), "extension type"),
        (_report(_RECORD, 1, struct.pack("!HH", EXT_SIGNED_JOIN, 9) + bytes(8)), "extension"),
        (_report(_RECORD, 1, _signed()), None),
        (_report(_RECORD, 1, _signed(b"")), None),
        (_report(_RECORD, 1, _signed(part=2, parts=3)), None),
        (_report(_RECORD, 1, _signed(part=3, parts=3)), "part 3 of 3"),
        (_report(_RECORD, 1, _signed(part=0, parts=0)), "part 0 of 0"),
        (_report(_RECORD, 1) + b"\0\0\0\0", "trailing"),
        (igmp_with_checksum(b"\x22\x00\x00\x00\x80\x00\x00\x01" + _RECORD), "no extension"),
        (igmp_with_checksum(b"\x22\x00\x00\x00\x00\x01\x00\x01" + _RECORD), "unknown flags"),
        (igmp_with_checksum(b"\x22\x01\x00\x00\x00\x00\x00\x01" + _RECORD), "reserved"),
        (
            igmp_with_checksum(b"\x22\x00\x00\x00\x00\x00\x00\x01\x07" + _RECORD[1:]),
            "unknown type 7",
        ),
        (igmp_with_checksum(b"\x16\x00\x00\x00" + _GROUP.packed), "type 22, expected 34"),
        (igmp_with_checksum(b"\x22\x00\x00\x00\x00\x00\x00\x02" + _RECORD), "record 1 type"),
        (
            igmp_with_checksum(
                b"\x22\x00\x00\x00\x00\x00\x00\x01\x01\x01\x00\x00" + _GROUP.packed + b"ab"
            ),
            "record 0 aux",
        ),
    ],
)
def test_malformed_reports_are_refused(message: bytes, complaint: str | None) -> None:
    if complaint is None:
        assert IGMPv3Report.from_wire(message).to_wire() == message
        return
    with pytest.raises(WireError, match=complaint):
        IGMPv3Report.from_wire(message)


def test_programming_errors_are_value_errors() -> None:
    with pytest.raises(ValueError, match="outside mask"):
        MaskPair(3, 1)
    with pytest.raises(ValueError, match="negative"):
        MaskPair(0, -1)
    with pytest.raises(ValueError, match="wider than 32"):
        GroupRecord(RecordType.MODE_IS_INCLUDE, _GROUP, include_masks=(MaskPair(0, 1 << 32),))
    with pytest.raises(ValueError, match="mix"):
        GroupRecord(RecordType.MODE_IS_INCLUDE, _GROUP, (IPv6Address("::1"),))
    with pytest.raises(ValueError, match="aux"):
        GroupRecord(RecordType.MODE_IS_INCLUDE, _GROUP, aux=b"abc")
    with pytest.raises(ValueError):
        GroupRecord(9, _GROUP)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot carry group"):
        IGMPv3Report((GroupRecord(RecordType.MODE_IS_INCLUDE, IPv6Address("ff05::1")),))
    with pytest.raises(ValueError, match="cannot carry requester"):
        MLDv2Report((), SignedJoin(0, IPv4Address("10.0.0.1"), b""))
    with pytest.raises(ValueError, match="64 bits"):
        SignedJoin(2**64, _GROUP, b"")
    with pytest.raises(ValueError, match="32 bits"):
        SignedJoin(0, _GROUP, b"", generation=2**32)
    with pytest.raises(ValueError, match="part 2 of 2"):
        SignedJoin(0, _GROUP, b"", part=2, parts=2)
