"""IGMPv3 and MLDv2 Queries (RFC 3376 §4.1, RFC 3810 §5.1): vectors from Linux, round
trips, garbage."""

from __future__ import annotations

import contextlib
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from manycast.wire.cursor import internet_checksum
from manycast.wire.errors import WireError
from manycast.wire.ip import IPPROTO_ICMPV6, IPPROTO_IGMP, IPv4Packet, IPv6Packet, pseudo_header
from manycast.wire.membership_query import (
    ALL_NODES,
    ALL_SYSTEMS,
    IGMPv3Query,
    MLDv2Query,
    code_value,
    igmp_query_packet,
    mld_code_value,
    mld_query_packet,
    mld_value_code,
    value_code,
)

# A Linux bridge's IGMPv3 General Query (mcast_querier 1, mcast_igmp_version 3), as
# captured on a veth port: from 192.0.2.1 to 224.0.0.1, TOS 0xc0, TTL 1, DF, Router
# Alert; Max Resp Code 100 (10 s), S 0, QRV 2, QQIC 125 s, no source.
LINUX_GENERAL_QUERY = bytes.fromhex(
    "46c00024000040000102 4211c0000201e0000001 940400001164ec1e00000000027d0000".replace(" ", "")
)


def queries() -> st.SearchStrategy[IGMPv3Query]:
    addresses = st.builds(IPv4Address, st.integers(1, 2**32 - 1))
    specific = st.builds(
        IGMPv3Query,
        addresses,
        st.lists(addresses, max_size=4).map(tuple),
        st.integers(0, 255),
        st.booleans(),
        st.integers(0, 7),
        st.integers(0, 255),
    )
    general = st.builds(
        IGMPv3Query,
        max_resp_code=st.integers(0, 255),
        suppress=st.booleans(),
        qrv=st.integers(0, 7),
        qqic=st.integers(0, 255),
    )
    return st.one_of(general, specific)


def with_checksum(message: bytes) -> bytes:
    message = message[:2] + b"\0\0" + message[4:]
    return message[:2] + internet_checksum(message).to_bytes(2, "big") + message[4:]


def test_linux_general_query_vector() -> None:
    ip = IPv4Packet.from_wire(LINUX_GENERAL_QUERY)
    query = IGMPv3Query.from_wire(ip.payload)
    assert query == IGMPv3Query()  # the defaults are RFC 3376's, as Linux sends them
    assert query.general and query.max_response == 10.0
    assert code_value(query.qqic) == 125
    # The packet as we send it is Linux's, byte for byte.
    rebuilt = igmp_query_packet(query, IPv4Address("192.0.2.1"))
    assert rebuilt.to_wire() == LINUX_GENERAL_QUERY
    assert rebuilt.header.protocol == IPPROTO_IGMP and rebuilt.header.dst == ALL_SYSTEMS


def test_a_specific_query_goes_to_its_group() -> None:
    query = IGMPv3Query(IPv4Address("232.1.1.1"), (IPv4Address("10.1.0.7"),), max_resp_code=1)
    packet = igmp_query_packet(query, IPv4Address("10.1.0.1"))
    assert packet.header.dst == IPv4Address("232.1.1.1") and packet.header.ttl == 1
    assert IGMPv3Query.from_wire(packet.payload) == query
    assert query.max_response == pytest.approx(0.1)


@given(queries())
def test_round_trip(query: IGMPv3Query) -> None:
    wire = query.to_wire()
    assert IGMPv3Query.from_wire(wire) == query
    assert internet_checksum(wire) == 0


@given(st.integers(0, 255))
def test_every_code_stands_for_a_value_coded_back_to_it(code: int) -> None:
    assert value_code(code_value(code)) == code


@given(st.integers(0, 40_000))
def test_value_code_is_the_largest_code_not_above_the_value(value: int) -> None:
    assert value_code(value) == max(c for c in range(256) if code_value(c) <= value)


def test_code_vectors() -> None:
    # RFC 3376 §4.1.1: 1 exp(3) mant(4) stands for (mant | 0x10) << (exp + 3).
    assert [code_value(c) for c in (0, 100, 127, 0x80, 0x8F, 0xFF)] == [
        0,
        100,
        127,
        128,
        248,
        31_744,
    ]


@given(queries(), st.data())
def test_mutations_raise_only_wire_error(query: IGMPv3Query, data: st.DataObject) -> None:
    wire = bytearray(query.to_wire())
    cut = data.draw(st.integers(0, len(wire)))
    flip = data.draw(st.integers(0, len(wire) - 1))
    for mutated in (
        bytes(wire[:cut]),
        bytes(wire[:flip]) + bytes([wire[flip] ^ 0x5A]) + bytes(wire[flip + 1 :]),
    ):
        with contextlib.suppress(WireError):
            IGMPv3Query.from_wire(mutated)


@given(st.binary(max_size=64))
def test_random_bytes_raise_only_wire_error(data: bytes) -> None:
    try:
        decoded = IGMPv3Query.from_wire(data)
    except WireError:
        return
    assert decoded.to_wire() == data


@pytest.mark.parametrize(
    ("message", "complaint"),
    [
        (bytes.fromhex("11640000 00000000"), "IGMPv1/v2 query"),
        (bytes.fromhex("11640000 00000000 12 7d 0000"), "reserved bits"),
        (bytes.fromhex("11640000 00000000 02 7d 0000 00"), "trailing"),
        (bytes.fromhex("11640000 00000000 02 7d 0001 0a000001"), "general query"),
        (bytes.fromhex("22640000 00000000 02 7d 0000"), "type 0x22"),
        (bytes.fromhex("11640000 e8010101 02 7d 0002 0a000001"), "source 1"),
    ],
)
def test_malformed_queries_are_refused(message: bytes, complaint: str) -> None:
    with pytest.raises(WireError, match=complaint):
        IGMPv3Query.from_wire(with_checksum(message))


def test_a_bad_checksum_is_refused() -> None:
    wire = bytearray(IGMPv3Query().to_wire())
    wire[3] ^= 1
    with pytest.raises(WireError, match="bad checksum"):
        IGMPv3Query.from_wire(bytes(wire))


def test_programming_errors_are_value_errors() -> None:
    with pytest.raises(ValueError, match="names no source"):
        IGMPv3Query(sources=(IPv4Address("10.0.0.1"),))
    with pytest.raises(ValueError, match="QRV"):
        IGMPv3Query(qrv=8)
    with pytest.raises(ValueError, match="8 bits"):
        IGMPv3Query(max_resp_code=256)
    with pytest.raises(ValueError, match="8 bits"):
        code_value(-1)


# --- MLDv2 (RFC 3810 §5.1) -----------------------------------------------------------

# A Linux bridge's MLDv2 General Query (mcast_querier 1, mcast_mld_version 2, bridge
# address fe80::ff:fe00:1), as captured on a veth port: to ff02::1, hop limit 1,
# Hop-by-Hop Router Alert 0 padded with two Pad1; Max Resp Code 10000 (10 s), S 0,
# QRV 2, QQIC 125 s, no source.
LINUX_MLD_GENERAL_QUERY = bytes.fromhex(
    "6000000000240001 fe80000000000000000000fffe000001 ff020000000000000000000000000001"
    "3a00050200000000"
    "8200579627100000 00000000000000000000000000000000 027d0000".replace(" ", "")
)
LINUX_BRIDGE = IPv6Address("fe80::ff:fe00:1")
ROUTER = IPv6Address("fe80::1")
GROUP = IPv6Address("ff3e::8000:1")
MLD_LARGEST = 0x1FFF << 10  # mantissa 0xFFF, exponent 7: 8 387 584 ms


def mld_queries() -> st.SearchStrategy[MLDv2Query]:
    addresses = st.builds(IPv6Address, st.integers(1, 2**128 - 1))
    specific = st.builds(
        MLDv2Query,
        addresses,
        st.lists(addresses, max_size=4).map(tuple),
        st.integers(0, 0xFFFF),
        st.booleans(),
        st.integers(0, 7),
        st.integers(0, 255),
    )
    general = st.builds(
        MLDv2Query,
        max_resp_code=st.integers(0, 0xFFFF),
        suppress=st.booleans(),
        qrv=st.integers(0, 7),
        qqic=st.integers(0, 255),
    )
    return st.one_of(general, specific)


def mld_with_checksum(message: bytes, dst: IPv6Address = ALL_NODES) -> bytes:
    message = message[:2] + b"\0\0" + message[4:]
    prefix = pseudo_header(ROUTER, dst, IPPROTO_ICMPV6, len(message))
    return message[:2] + internet_checksum(prefix + message).to_bytes(2, "big") + message[4:]


def test_linux_mld_general_query_vector() -> None:
    ip = IPv6Packet.from_wire(LINUX_MLD_GENERAL_QUERY)
    query = MLDv2Query.from_wire(ip.payload, ip.header.src, ip.header.dst)
    assert query == MLDv2Query()  # the defaults are RFC 3810's, as Linux sends them
    assert query.general and query.max_response == 10.0
    assert code_value(query.qqic) == 125
    rebuilt = mld_query_packet(query, LINUX_BRIDGE)
    assert rebuilt.to_wire() == LINUX_MLD_GENERAL_QUERY
    assert rebuilt.header.dst == ALL_NODES and rebuilt.header.hop_limit == 1
    assert rebuilt.hop_by_hop is not None and rebuilt.hop_by_hop.router_alert == 0


def test_a_specific_mld_query_goes_to_its_address() -> None:
    query = MLDv2Query(GROUP, (IPv6Address("2001:db8::7"),), max_resp_code=1000, suppress=True)
    packet = mld_query_packet(query, ROUTER)
    assert packet.header.dst == GROUP and packet.header.hop_limit == 1
    assert MLDv2Query.from_wire(packet.payload, ROUTER, GROUP) == query
    assert query.max_response == 1.0
    with pytest.raises(WireError, match="bad checksum"):  # the pseudo-header counts
        MLDv2Query.from_wire(packet.payload, ROUTER, ALL_NODES)


def test_an_mld_query_goes_out_from_a_link_local_address() -> None:
    with pytest.raises(ValueError, match="link-local"):
        mld_query_packet(MLDv2Query(), IPv6Address("2001:db8::1"))


@given(mld_queries(), st.sampled_from([ROUTER, LINUX_BRIDGE]))
def test_mld_round_trip(query: MLDv2Query, src: IPv6Address) -> None:
    dst = ALL_NODES if query.general else query.group
    wire = query.to_wire(src, dst)
    assert MLDv2Query.from_wire(wire, src, dst) == query
    assert internet_checksum(pseudo_header(src, dst, IPPROTO_ICMPV6, len(wire)) + wire) == 0
    assert mld_query_packet(query, src).payload == wire


def test_mld_code_edges() -> None:
    # RFC 3810 §5.1.3: exact below 32768; 1 exp(3) mant(12) is (mant | 0x1000) << (exp + 3).
    assert mld_code_value(32767) == 32767 and mld_value_code(32767) == 32767
    assert mld_code_value(0x8000) == 32768 and mld_value_code(32768) == 0x8000
    assert mld_code_value(0x8001) == 32776 and mld_value_code(32775) == 0x8000
    assert mld_code_value(0xFFFF) == MLD_LARGEST and mld_value_code(MLD_LARGEST) == 0xFFFF
    assert mld_value_code(MLD_LARGEST + 1) == mld_value_code(10**9) == 0xFFFF
    assert MLDv2Query(max_resp_code=0xFFFF).max_response == MLD_LARGEST / 1000
    with pytest.raises(ValueError, match="16 bits"):
        mld_code_value(0x10000)
    with pytest.raises(ValueError, match="negative"):
        mld_value_code(-1)


@given(st.integers(0, 0xFFFF))
def test_every_mld_code_stands_for_a_value_coded_back_to_it(code: int) -> None:
    assert mld_value_code(mld_code_value(code)) == code


@given(st.integers(0, MLD_LARGEST + 5000))
def test_mld_value_code_is_the_largest_code_not_above_the_value(value: int) -> None:
    code = mld_value_code(value)
    assert mld_code_value(code) <= value
    assert code == 0xFFFF or mld_code_value(code + 1) > value  # codes grow with values


@given(mld_queries(), st.data())
def test_mld_mutations_raise_only_wire_error(query: MLDv2Query, data: st.DataObject) -> None:
    wire = bytearray(query.to_wire(ROUTER, ALL_NODES))
    cut = data.draw(st.integers(0, len(wire)))
    flip = data.draw(st.integers(0, len(wire) - 1))
    for mutated in (
        bytes(wire[:cut]),
        bytes(wire[:flip]) + bytes([wire[flip] ^ 0x5A]) + bytes(wire[flip + 1 :]),
    ):
        # Checksum repaired too, so the mutation reaches the field checks behind it.
        for candidate in (mutated, mld_with_checksum(mutated) if len(mutated) >= 4 else mutated):
            with contextlib.suppress(WireError):
                MLDv2Query.from_wire(candidate, ROUTER, ALL_NODES)


@given(st.binary(max_size=96))
def test_mld_random_bytes_raise_only_wire_error(data: bytes) -> None:
    for candidate in (data, mld_with_checksum(data) if len(data) >= 4 else data):
        try:
            decoded = MLDv2Query.from_wire(candidate, ROUTER, ALL_NODES)
        except WireError:
            continue
        assert decoded.to_wire(ROUTER, ALL_NODES) == candidate


_ANY = "00" * 16
_GRP = GROUP.packed.hex()
_SRC = IPv6Address("2001:db8::7").packed.hex()


@pytest.mark.parametrize(
    ("message", "complaint"),
    [
        ("82000000 27100000" + _ANY, "MLDv1 query"),
        ("82000000 27100000" + _ANY + "12 7d 0000", "reserved bits"),
        ("82000000 27100001" + _ANY + "02 7d 0000", "reserved field"),
        ("82010000 27100000" + _ANY + "02 7d 0000", "code 1"),
        ("82000000 27100000" + _ANY + "02 7d 0000 00", "trailing"),
        ("82000000 27100000" + _ANY + "02 7d 0001" + _SRC, "general query"),
        ("83000000 27100000" + _ANY + "02 7d 0000", "type 131"),
        ("82000000 27100000" + _GRP + "02 7d 0002" + _SRC, "source 1"),
        ("82000000 27100000" + _GRP[:20], "multicast address"),
    ],
)
def test_malformed_mld_queries_are_refused(message: str, complaint: str) -> None:
    with pytest.raises(WireError, match=complaint):
        MLDv2Query.from_wire(mld_with_checksum(bytes.fromhex(message)), ROUTER, ALL_NODES)


def test_a_bad_mld_checksum_is_refused() -> None:
    wire = bytearray(MLDv2Query().to_wire(ROUTER, ALL_NODES))
    wire[3] ^= 1
    with pytest.raises(WireError, match="bad checksum"):
        MLDv2Query.from_wire(bytes(wire), ROUTER, ALL_NODES)


def test_mld_programming_errors_are_value_errors() -> None:
    with pytest.raises(ValueError, match="names no source"):
        MLDv2Query(sources=(IPv6Address("2001:db8::1"),))
    with pytest.raises(ValueError, match="QRV"):
        MLDv2Query(qrv=8)
    with pytest.raises(ValueError, match="16 bits"):
        MLDv2Query(max_resp_code=0x10000)
    with pytest.raises(ValueError, match="8 bits"):
        MLDv2Query(qqic=256)
    with pytest.raises(ValueError, match="IPv6 addresses only"):
        MLDv2Query(IPv4Address("232.1.1.1"))  # type: ignore[arg-type]
