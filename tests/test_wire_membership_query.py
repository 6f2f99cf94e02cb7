"""IGMPv3 Membership Queries (RFC 3376 §4.1): a vector from Linux, round trips, garbage."""

from __future__ import annotations

import contextlib
from ipaddress import IPv4Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from manycast.wire.cursor import internet_checksum
from manycast.wire.errors import WireError
from manycast.wire.ip import IPPROTO_IGMP, IPv4Packet
from manycast.wire.membership_query import (
    ALL_SYSTEMS,
    IGMPv3Query,
    code_value,
    igmp_query_packet,
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
