"""TCP segment codec: layout, options, checksum, strictness."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from manycast.wire.errors import WireError
from manycast.wire.transport import (
    MANYCAST_EXID,
    ChangeDestination,
    ChangeDestinationMark,
    Destination,
    IPAddress,
    Mss,
    Nop,
    TagCookie,
    TcpFlags,
    TcpOption,
    TcpSegment,
    UnknownOption,
    decode_options,
    encode_options,
)

V4A = ipaddress.IPv4Address("192.0.2.1")
V4B = ipaddress.IPv4Address("233.252.0.7")
V6A = ipaddress.IPv6Address("2001:db8::1")
V6B = ipaddress.IPv6Address("ff3e::8000:1")


def naive_checksum(data: bytes) -> int:
    """RFC 1071 the long way, as an independent check of the codec."""
    if len(data) % 2:
        data += b"\x00"
    total = 0
    for (word,) in struct.iter_unpack("!H", data):
        total += word
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


# --- strategies ----------------------------------------------------------------

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 2**64 - 1)
exp_kind = st.sampled_from([253, 254])
ipv4 = st.builds(ipaddress.IPv4Address, u32)
ipv6 = st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1))


def _unknown(kind: int, data: bytes) -> UnknownOption | None:
    try:
        return UnknownOption(kind, data)
    except ValueError:
        return None


unknown_options = (
    st.one_of(
        st.builds(
            _unknown,
            st.integers(3, 252),
            st.binary(max_size=8),
        ),
        st.builds(
            _unknown,
            exp_kind,
            st.binary(
                min_size=2, max_size=8
            ),  # another experiment's ExID, or a later subtype of ours
        ),
    )
    .filter(lambda o: o is not None)
    .map(lambda o: o or UnknownOption(3, b""))
)

options_st: st.SearchStrategy[TcpOption] = st.one_of(
    st.just(Nop()),
    st.builds(Mss, u16),
    st.builds(TagCookie, u32, u64, exp_kind),
    st.builds(Destination, st.one_of(ipv4, ipv6), u16, exp_kind),
    st.builds(ChangeDestinationMark, exp_kind),
    unknown_options,
)


def _fits(options: list[TcpOption]) -> bool:
    return sum(len(o.encode()) for o in options) <= 40


option_lists = st.lists(options_st, max_size=6).filter(_fits).map(tuple)

Addrs = tuple[IPAddress, IPAddress]
addresses: st.SearchStrategy[Addrs] = st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6))

segments = st.builds(
    TcpSegment,
    src_port=u16,
    dst_port=u16,
    seq=u32,
    ack=u32,
    flags=st.builds(TcpFlags, st.integers(0, 255)),
    window=u16,
    urgent=u16,
    options=option_lists,
    payload=st.binary(max_size=64),
)


# --- round trips -------------------------------------------------------------------


@given(segments, addresses)
def test_segment_round_trip(segment: TcpSegment, addrs: Addrs) -> None:
    src, dst = addrs
    wire = segment.to_wire(src, dst)
    assert len(wire) == segment.data_offset * 4 + len(segment.payload)
    decoded = TcpSegment.from_wire(wire, src, dst)
    assert decoded == segment
    assert decoded.to_wire(src, dst) == wire


@given(segments, addresses)
def test_checksum_matches_rfc1071(segment: TcpSegment, addrs: Addrs) -> None:
    src, dst = addrs
    wire = segment.to_wire(src, dst)
    if src.version == 4:
        pseudo = src.packed + dst.packed + struct.pack("!BBH", 0, 6, len(wire))
    else:
        pseudo = src.packed + dst.packed + struct.pack("!I3xB", len(wire), 6)
    zeroed = wire[:16] + b"\x00\x00" + wire[18:]
    assert struct.unpack("!H", wire[16:18])[0] == naive_checksum(pseudo + zeroed)


@given(option_lists)
def test_option_area_round_trip(options: tuple[TcpOption, ...]) -> None:
    area = encode_options(options)
    assert len(area) % 4 == 0
    assert decode_options(area) == options


def test_known_layout() -> None:
    seg = TcpSegment(
        40000,
        80,
        seq=0x01020304,
        ack=0,
        flags=TcpFlags.SYN,
        window=65535,
        options=(Mss(1460), TagCookie(0xAABBCCDD, 0x1122334455667788)),
    )
    wire = seg.to_wire(V4A, V4B)
    assert wire[:4] == struct.pack("!HH", 40000, 80)
    assert wire[4:8] == bytes([1, 2, 3, 4])
    assert wire[12] >> 4 == 11  # 20 + 4 (MSS) + 17 (TAG_COOKIE) + 3 padding = 44 bytes
    assert wire[13] == 0x02
    assert wire[20:24] == bytes([2, 4, 0x05, 0xB4])
    exid = MANYCAST_EXID.to_bytes(2, "big")
    tag_cookie = bytes([253, 17]) + exid + bytes([1]) + bytes.fromhex("aabbccdd1122334455667788")
    assert wire[24:41] == tag_cookie
    assert wire[41:44] == b"\x00\x00\x00"


def test_destination_and_mark_layout() -> None:
    exid = MANYCAST_EXID.to_bytes(2, "big")
    v4 = Destination(V4A, 443).encode()
    assert v4 == bytes([253, 11]) + exid + bytes([2]) + struct.pack("!H", 443) + V4A.packed
    v6 = Destination(V6A, 443, kind=254).encode()
    assert v6 == bytes([254, 23]) + exid + bytes([2]) + struct.pack("!H", 443) + V6A.packed
    assert ChangeDestinationMark().encode() == bytes([253, 5]) + exid + bytes([3])


def test_seq_length_and_option_lookup() -> None:
    seg = TcpSegment(1, 2, 0, 0, TcpFlags.SYN | TcpFlags.FIN, 0, payload=b"abc", options=(Nop(),))
    assert seg.seq_length == 5
    assert seg.option(Nop) == Nop()
    assert seg.option(Mss) is None


# --- strictness -------------------------------------------------------------------


@given(st.binary(max_size=100), addresses)
def test_random_bytes_raise_only_wire_error(data: bytes, addrs: Addrs) -> None:
    with contextlib.suppress(WireError):
        TcpSegment.from_wire(data, *addrs)


@given(segments, addresses, st.data())
def test_truncated_header_is_refused(
    segment: TcpSegment, addrs: Addrs, data: st.DataObject
) -> None:
    wire = segment.to_wire(*addrs)
    cut = data.draw(st.integers(0, segment.data_offset * 4 - 1))
    with pytest.raises(WireError):
        TcpSegment.from_wire(wire[:cut], *addrs)


@given(segments, addresses, st.data())
def test_truncated_anywhere_raises_only_wire_error(
    segment: TcpSegment,
    addrs: Addrs,
    data: st.DataObject,
) -> None:
    wire = segment.to_wire(*addrs)
    cut = data.draw(st.integers(0, len(wire) - 1))
    with contextlib.suppress(WireError):
        TcpSegment.from_wire(wire[:cut], *addrs)


@given(segments, addresses, st.data())
def test_any_bit_flip_is_refused(segment: TcpSegment, addrs: tuple, data: st.DataObject) -> None:  # type: ignore[type-arg]
    wire = bytearray(segment.to_wire(*addrs))
    i = data.draw(st.integers(0, len(wire) - 1))
    wire[i] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(WireError):
        TcpSegment.from_wire(bytes(wire), *addrs)


def test_wrong_pseudo_header_is_refused() -> None:
    wire = TcpSegment(1, 2, 3, 4, TcpFlags.ACK, 100, payload=b"x").to_wire(V4A, V4B)
    with pytest.raises(WireError, match="checksum"):
        TcpSegment.from_wire(wire, V4B, V4A.__class__("192.0.2.99"))
    with pytest.raises(WireError, match="versions"):
        TcpSegment.from_wire(wire, V4A, V6B)


def _raw(offset_words: int, options: bytes, flags_byte: int = 0x10, reserved: int = 0) -> bytes:
    """A hand-built segment with a correct checksum, for malformed-header cases."""
    header = struct.pack(
        "!HHIIBBHHH", 1, 2, 3, 4, (offset_words << 4) | reserved, flags_byte, 100, 0, 0
    )
    raw = header + options
    pseudo = V4A.packed + V4B.packed + struct.pack("!BBH", 0, 6, len(raw))
    checksum = naive_checksum(pseudo + raw)
    return raw[:16] + struct.pack("!H", checksum) + raw[18:]


@pytest.mark.parametrize(
    ("offset", "options", "message"),
    [
        (4, b"", "below 5"),
        (6, b"", "truncated"),
        (6, bytes([2, 3, 0, 0]), "MSS option has length 3"),
        (6, bytes([2, 4, 5]) + b"", "truncated"),
        (6, bytes([8, 1, 0, 0]), "length 1"),
        (6, bytes([0, 0, 1, 0]), "non-zero byte after EOL"),
        (7, bytes([0, 0, 0, 0, 0, 0, 0, 0]), "padding past a boundary"),
        (6, bytes([253, 3, 0x4D, 0]), "too short for an ExID"),
        (8, bytes([253, 10, 0x4D, 0x43, 1, 0, 0, 0, 0, 0, 0, 0]), "TAG_COOKIE option"),
        (7, bytes([253, 6, 0x4D, 0x43, 2, 0, 0, 0]), "DESTINATION option"),
        (7, bytes([253, 6, 0x4D, 0x43, 3, 0, 0, 0]), "CHANGE_DESTINATION option"),
    ],
)
def test_malformed_header_messages(offset: int, options: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message):
        TcpSegment.from_wire(_raw(offset, options), V4A, V4B)


def test_reserved_bits_are_refused() -> None:
    with pytest.raises(WireError, match="reserved"):
        TcpSegment.from_wire(_raw(5, b"", reserved=0x1), V4A, V4B)


def test_unknown_options_round_trip_raw() -> None:
    sack_permitted = bytes([4, 2])
    other_experiment = bytes([254, 6, 0xF9, 0x89, 0xAB, 0xCD])
    our_later_subtype = bytes([253, 6, 0x4D, 0x43, 9, 7])
    area = sack_permitted + other_experiment + our_later_subtype + b"\x00\x00"
    options = decode_options(area)
    assert options == (
        UnknownOption(4, b""),
        UnknownOption(254, bytes([0xF9, 0x89, 0xAB, 0xCD])),
        UnknownOption(253, bytes([0x4D, 0x43, 9, 7])),
    )
    assert encode_options(options) == area


def test_encoding_limits_are_programming_errors() -> None:
    too_many = (TagCookie(1, 2), TagCookie(3, 4), TagCookie(5, 6))
    with pytest.raises(ValueError, match="at most 40"):
        TcpSegment(1, 2, 3, 4, TcpFlags.SYN, 0, options=too_many).to_wire(V4A, V4B)
    with pytest.raises(ValueError):
        TcpSegment(1, 2, 2**32, 0, TcpFlags.ACK, 0)
    with pytest.raises(ValueError):
        UnknownOption(2, b"\x05\xb4")  # that is an MSS option
    with pytest.raises(ValueError):
        UnknownOption(253, MANYCAST_EXID.to_bytes(2, "big") + b"\x01")
    with pytest.raises(ValueError):
        TagCookie(2**32, 0)


# --- change destination ----------------------------------------------------------

change_destinations = st.builds(
    ChangeDestination,
    tag=u32,
    cookie=u64,
    address=st.one_of(ipv4, ipv6),
    port=u16,
    serial=u32,
    timestamp_ms=u64,
    signature=st.binary(max_size=80),
)


@given(change_destinations)
def test_change_destination_round_trip(message: ChangeDestination) -> None:
    wire = message.to_wire()
    assert ChangeDestination.from_wire(wire) == message
    assert message.signed_bytes().endswith(wire[: len(wire) - 2 - len(message.signature)])
    resigned = dataclasses.replace(message, signature=message.signature + b"x")
    assert resigned.signed_bytes() == message.signed_bytes()


@given(change_destinations, st.data())
def test_change_destination_truncated_or_extended(
    message: ChangeDestination, data: st.DataObject
) -> None:
    wire = message.to_wire()
    cut = data.draw(st.integers(0, len(wire) - 1))
    with pytest.raises(WireError):
        ChangeDestination.from_wire(wire[:cut])
    with pytest.raises(WireError, match="trailing"):
        ChangeDestination.from_wire(wire + b"\x00")


@given(st.binary(max_size=120))
def test_change_destination_random_bytes(data: bytes) -> None:
    with contextlib.suppress(WireError):
        ChangeDestination.from_wire(data)


def test_change_destination_rides_in_a_marked_segment() -> None:
    message = ChangeDestination(7, 9, V6A, 443, serial=1, timestamp_ms=5, signature=bytes(64))
    seg = TcpSegment(
        80,
        40000,
        1,
        2,
        TcpFlags.ACK,
        100,
        options=(ChangeDestinationMark(),),
        payload=message.to_wire(),
    )
    back = TcpSegment.from_wire(seg.to_wire(V6B, V6A), V6B, V6A)
    assert back.option(ChangeDestinationMark) is not None
    assert ChangeDestination.from_wire(back.payload) == message


def test_bad_change_destination_fields() -> None:
    good = ChangeDestination(1, 2, V4A, 3, 4, 5, b"s").to_wire()
    with pytest.raises(WireError, match="version"):
        ChangeDestination.from_wire(b"\x02" + good[1:])
    bad_len = bytearray(good)
    bad_len[25] = 5  # address length byte
    with pytest.raises(WireError):
        ChangeDestination.from_wire(bytes(bad_len))


# Inputs the fuzzer (bench/fuzz.py) found: each must be refused with WireError.
SRC, DST = ipaddress.IPv4Address("192.0.2.1"), ipaddress.IPv4Address("233.252.0.7")


@pytest.mark.parametrize(
    "area",
    [bytes([254, 41]) + bytes(39), b"\x01", b"\x01\x00", b"\x01\x00\x00"],
    ids=["too long", "not padded 1", "not padded 2", "not padded 3"],
)
def test_fuzz_found_option_areas_are_refused(area: bytes) -> None:
    with pytest.raises(WireError):
        decode_options(area)


@pytest.mark.parametrize(
    "hexdump",
    [
        "00000000000003e00000000050000000ffff0000",  # checksum 0xFFFF where 0x0000 is written
        "00010002000000030000000470100064e25900000100000000000000",  # padding past a boundary
    ],
)
def test_fuzz_found_segments_that_do_not_reencode_are_refused(hexdump: str) -> None:
    with pytest.raises(WireError):
        TcpSegment.from_wire(bytes.fromhex(hexdump), SRC, DST)
