"""IPv4/IPv6/UDP codecs: round trips, strictness under garbage, checksums, router fast path."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from manycast.wire.errors import WireError
from manycast.wire.ip import (
    IPPROTO_HOPOPTS,
    IPPROTO_ICMPV6,
    IPPROTO_UDP,
    ROUTER_ALERT_V4,
    HopByHop,
    IPv4Header,
    IPv4Packet,
    IPv6Header,
    IPv6Packet,
    UDPDatagram,
    UDPHeader,
    decrement_hop_limit_v6,
    decrement_ttl_v4,
    peek_v4,
    peek_v6,
    pseudo_header,
)

T = TypeVar("T")
v4 = st.builds(IPv4Address, st.integers(0, 2**32 - 1))
v6 = st.builds(IPv6Address, st.integers(0, 2**128 - 1))
u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
payloads = st.binary(max_size=64)


def reference_checksum(data: bytes) -> int:
    """RFC 1071 the slow, obvious way: a check independent of the codec's fast sum."""
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@st.composite
def v4_options(draw: st.DrawFn) -> bytes:
    raw = b""
    for part in draw(st.lists(st.sampled_from([b"\x01", ROUTER_ALERT_V4, b"\x88\x04\x12\x34"]))):
        if len(raw) + len(part) <= 40:
            raw += part
    return raw + b"\0" * (-len(raw) % 4)


@st.composite
def v4_packets(draw: st.DrawFn) -> IPv4Packet:
    options = draw(v4_options())
    payload = draw(payloads)
    header = IPv4Header(
        src=draw(v4),
        dst=draw(v4),
        protocol=draw(u8),
        ttl=draw(u8),
        total_length=20 + len(options) + len(payload),
        identification=draw(u16),
        dscp=draw(st.integers(0, 63)),
        ecn=draw(st.integers(0, 3)),
        dont_fragment=draw(st.booleans()),
        more_fragments=draw(st.booleans()),
        fragment_offset=draw(st.integers(0, 0x1FFF)),
        options=options,
    )
    return IPv4Packet(header, payload)


@st.composite
def hop_by_hops(draw: st.DrawFn) -> HopByHop:
    nxt = draw(u8)
    if draw(st.booleans()):
        return HopByHop.with_router_alert(nxt, draw(u16))
    # Pad1 and PadN options filling 8n+6 bytes.
    size = 8 * draw(st.integers(0, 3)) + 6
    options = b""
    while len(options) < size:
        left = size - len(options)
        if left == 1 or draw(st.booleans()):
            options += b"\0"
        else:
            options += bytes((1, left - 2)) + bytes(left - 2)
    return HopByHop(nxt, options)


@st.composite
def v6_packets(draw: st.DrawFn) -> IPv6Packet:
    hbh = draw(st.none() | hop_by_hops())
    protocol = hbh.next_header if hbh else draw(u8.filter(lambda n: n != IPPROTO_HOPOPTS))
    return IPv6Packet.make(
        draw(v6),
        draw(v6),
        protocol,
        draw(payloads),
        hop_limit=draw(u8),
        traffic_class=draw(u8),
        flow_label=draw(st.integers(0, 0xFFFFF)),
        hop_by_hop=hbh,
    )


udp_datagrams = st.builds(UDPDatagram, u16, u16, payloads)


def decodes_canonically(
    decode: Callable[[bytes], T], encode: Callable[[T], bytes], data: bytes
) -> None:
    """Decoding either raises WireError or yields something that re-encodes to `data`."""
    try:
        value = decode(data)
    except WireError:
        return
    assert encode(value) == data


def mutations(wire: bytes) -> list[bytes]:
    """Every truncation and every single-bit flip of `wire`."""
    cuts = [wire[:n] for n in range(len(wire))]
    flips = [
        wire[:i] + bytes((wire[i] ^ 1 << b,)) + wire[i + 1 :]
        for i in range(len(wire))
        for b in range(8)
    ]
    return cuts + flips


# --- round trips ----------------------------------------------------------------------


@given(v4_packets())
def test_ipv4_packet_round_trip(packet: IPv4Packet) -> None:
    wire = packet.to_wire()
    assert IPv4Packet.from_wire(wire) == packet
    assert IPv4Packet.from_wire(wire).to_wire() == wire
    header = wire[: packet.header.header_length]
    assert IPv4Header.from_wire(header) == packet.header
    assert reference_checksum(header) == 0


@given(v6_packets())
def test_ipv6_packet_round_trip(packet: IPv6Packet) -> None:
    wire = packet.to_wire()
    assert IPv6Packet.from_wire(wire) == packet
    assert IPv6Packet.from_wire(wire).to_wire() == wire
    assert IPv6Header.from_wire(wire[:40]) == packet.header
    if packet.hop_by_hop:
        hbh = packet.hop_by_hop
        assert HopByHop.from_wire(wire[40 : 40 + len(hbh.options) + 2]) == hbh


@given(udp_datagrams, v4, v4)
def test_udp_v4_round_trip(dgram: UDPDatagram, src: IPv4Address, dst: IPv4Address) -> None:
    wire = dgram.to_wire(src, dst)
    assert UDPDatagram.from_wire(wire, src, dst) == dgram
    assert reference_checksum(pseudo_header(src, dst, IPPROTO_UDP, len(wire)) + wire) == 0
    assert UDPHeader.from_wire(wire[:8]) == UDPHeader(
        dgram.src_port, dgram.dst_port, len(wire), int.from_bytes(wire[6:8], "big")
    )
    bare = dgram.to_wire(src, dst, checksum=False)
    assert bare[6:8] == b"\0\0"
    assert UDPDatagram.from_wire(bare, src, dst) == dgram


@given(udp_datagrams, v6, v6)
def test_udp_v6_round_trip(dgram: UDPDatagram, src: IPv6Address, dst: IPv6Address) -> None:
    wire = dgram.to_wire(src, dst)
    assert UDPDatagram.from_wire(wire, src, dst) == dgram
    assert reference_checksum(pseudo_header(src, dst, IPPROTO_UDP, len(wire)) + wire) == 0
    assert wire[6:8] != b"\0\0"


@given(st.builds(UDPHeader, u16, u16, u16, u16))
def test_udp_header_round_trip(header: UDPHeader) -> None:
    assert UDPHeader.from_wire(header.to_wire()) == header


# --- known bytes ----------------------------------------------------------------------


def test_ipv4_header_known_checksum() -> None:
    # A textbook header (192.168.0.1 -> 192.168.0.199, UDP, TTL 64): checksum 0xb861.
    wire = bytes.fromhex("450000730000400040 11b861c0a80001c0a800c7".replace(" ", ""))
    header = IPv4Header.from_wire(wire)
    assert header.src == IPv4Address("192.168.0.1")
    assert header.dst == IPv4Address("192.168.0.199")
    assert header.protocol == IPPROTO_UDP
    assert header.dont_fragment and header.total_length == 0x73
    assert header.to_wire() == wire


def test_pseudo_header_layouts() -> None:
    a4, b4 = IPv4Address("10.0.0.1"), IPv4Address("10.0.0.2")
    assert pseudo_header(a4, b4, 17, 0x1234) == a4.packed + b4.packed + b"\x00\x11\x12\x34"
    a6, b6 = IPv6Address("2001:db8::1"), IPv6Address("ff02::16")
    assert pseudo_header(a6, b6, 58, 0x1234) == (
        a6.packed + b6.packed + b"\x00\x00\x12\x34" + b"\x00\x00\x00\x3a"
    )
    with pytest.raises(ValueError, match="one family"):
        pseudo_header(a4, b6, 17, 8)


def test_router_alerts() -> None:
    src, dst = IPv4Address("10.0.0.1"), IPv4Address("224.0.0.22")
    with_ra = IPv4Packet.make(src, dst, 2, b"", options=ROUTER_ALERT_V4)
    assert with_ra.header.router_alert
    assert with_ra.to_wire()[0] == 0x46
    assert not IPv4Packet.make(src, dst, 2, b"").header.router_alert
    hbh = HopByHop.with_router_alert(IPPROTO_ICMPV6)
    assert hbh.to_wire() == bytes.fromhex("3a00050200000100")
    assert hbh.router_alert == 0
    assert HopByHop(IPPROTO_ICMPV6, bytes(6)).router_alert is None


def test_programming_errors_are_value_errors() -> None:
    a, b = IPv4Address("10.0.0.1"), IPv4Address("10.0.0.2")
    with pytest.raises(ValueError, match="ttl"):
        IPv4Header(a, b, 17, ttl=256)
    with pytest.raises(ValueError, match="options length"):
        IPv4Header(a, b, 17, options=b"\x01")
    with pytest.raises(ValueError, match="total_length"):
        IPv4Packet(IPv4Header(a, b, 17, total_length=20), b"x")
    with pytest.raises(ValueError, match="8n\\+6"):
        HopByHop(0, b"")
    with pytest.raises(ValueError, match="port"):
        UDPDatagram(70000, 1, b"")
    with pytest.raises(ValueError, match="IPv6"):
        UDPDatagram(1, 1, b"").to_wire(IPv6Address("::1"), IPv6Address("::2"), checksum=False)


# --- strictness -----------------------------------------------------------------------


@settings(max_examples=30)
@given(v4_packets())
def test_ipv4_mutations_raise_only_wire_error(packet: IPv4Packet) -> None:
    for data in mutations(packet.to_wire()):
        decodes_canonically(IPv4Packet.from_wire, IPv4Packet.to_wire, data)


@settings(max_examples=30)
@given(v6_packets())
def test_ipv6_mutations_raise_only_wire_error(packet: IPv6Packet) -> None:
    for data in mutations(packet.to_wire()):
        decodes_canonically(IPv6Packet.from_wire, IPv6Packet.to_wire, data)


@settings(max_examples=30)
@given(udp_datagrams, v4, v4, v6, v6)
def test_udp_mutations_raise_only_wire_error(
    dgram: UDPDatagram, s4: IPv4Address, d4: IPv4Address, s6: IPv6Address, d6: IPv6Address
) -> None:
    for src, dst in ((s4, d4), (s6, d6)):
        for data in mutations(dgram.to_wire(src, dst)):
            try:
                decoded = UDPDatagram.from_wire(data, src, dst)
            except WireError:
                continue
            assert decoded.to_wire(src, dst, checksum=data[6:8] != b"\0\0") == data


@given(st.binary(max_size=120), v4, v4)
def test_random_bytes_raise_only_wire_error(data: bytes, a: IPv4Address, b: IPv4Address) -> None:
    decodes_canonically(IPv4Packet.from_wire, IPv4Packet.to_wire, data)
    decodes_canonically(IPv6Packet.from_wire, IPv6Packet.to_wire, data)
    decodes_canonically(IPv4Header.from_wire, IPv4Header.to_wire, data)
    decodes_canonically(HopByHop.from_wire, HopByHop.to_wire, data)
    decodes_canonically(UDPHeader.from_wire, UDPHeader.to_wire, data)
    decodes_canonically(
        lambda d: UDPDatagram.from_wire(d, a, b),
        lambda u: u.to_wire(a, b, checksum=data[6:8] != b"\0\0"),
        data,
    )
    for fast in (peek_v4, decrement_ttl_v4, peek_v6, decrement_hop_limit_v6):
        with contextlib.suppress(WireError):
            fast(data)


@given(st.binary(min_size=20, max_size=60))
def test_random_header_after_a_valid_version_byte(data: bytes) -> None:
    wire = b"\x45" + data[1:]
    decodes_canonically(IPv4Packet.from_wire, IPv4Packet.to_wire, wire)


def with_version(wire: bytes, version: int) -> bytes:
    """`wire` with another version nibble and its header checksum made right again, so
    that the version check is the only one left to refuse it."""
    ihl = wire[0] & 0x0F
    header = bytearray(wire[: 4 * ihl])
    header[0] = version << 4 | ihl
    header[10:12] = b"\0\0"
    header[10:12] = reference_checksum(bytes(header)).to_bytes(2, "big")
    return bytes(header) + wire[4 * ihl :]


@given(v4_packets(), st.integers(0, 15).filter(lambda v: v != 4))
def test_ipv4_version_nibble_is_checked(packet: IPv4Packet, version: int) -> None:
    wire = packet.to_wire()
    header_length = packet.header.header_length
    # The same rewrite with version 4 gives back the packet: lengths and checksum hold.
    assert with_version(wire, 4) == wire
    changed = with_version(wire, version)
    message = f"version {version} at offset 0, expected 4"
    with pytest.raises(WireError, match=message):
        IPv4Packet.from_wire(changed)
    with pytest.raises(WireError, match=message):
        IPv4Header.from_wire(changed[:header_length])


# --- checksums ------------------------------------------------------------------------


def test_corrupted_ipv4_header_checksum_is_refused() -> None:
    wire = bytearray(
        IPv4Packet.make(IPv4Address("1.2.3.4"), IPv4Address("5.6.7.8"), 17, b"hi").to_wire()
    )
    wire[10] ^= 0x01
    with pytest.raises(WireError, match="checksum"):
        IPv4Packet.from_wire(bytes(wire))


def test_ones_complement_twin_of_checksum_is_refused() -> None:
    # 0x0000 and 0xFFFF sum alike; only the one we write is accepted.
    for ident in range(0x10000):
        packet = IPv4Packet.make(
            IPv4Address("10.0.0.1"), IPv4Address("10.0.0.2"), 17, b"", identification=ident
        )
        wire = packet.to_wire()
        if wire[10:12] == b"\0\0":
            break
    else:
        pytest.fail("no identification gives a zero checksum")
    twin = wire[:10] + b"\xff\xff" + wire[12:]
    with pytest.raises(WireError, match="checksum"):
        IPv4Packet.from_wire(twin)


@pytest.mark.parametrize("family", [4, 6])
def test_corrupted_udp_checksum_is_refused(family: int) -> None:
    if family == 4:
        src, dst = IPv4Address("10.0.0.1"), IPv4Address("10.0.0.2")
        wire = UDPDatagram(5353, 53, b"query").to_wire(src, dst)
        other: IPv4Address | IPv6Address = IPv4Address("10.0.0.3")
    else:
        src6, dst6 = IPv6Address("2001:db8::1"), IPv6Address("2001:db8::2")
        wire = UDPDatagram(5353, 53, b"query").to_wire(src6, dst6)
        src, dst, other = src6, dst6, IPv6Address("2001:db8::3")  # type: ignore[assignment]
    bad = wire[:6] + bytes((wire[6] ^ 0x80, wire[7])) + wire[8:]
    with pytest.raises(WireError, match="checksum"):
        UDPDatagram.from_wire(bad, src, dst)
    with pytest.raises(WireError, match="checksum"):
        UDPDatagram.from_wire(wire, src, other)


def test_zero_udp_checksum_over_ipv6_is_refused() -> None:
    src, dst = IPv6Address("2001:db8::1"), IPv6Address("2001:db8::2")
    wire = UDPDatagram(1, 2, b"x").to_wire(src, dst)
    with pytest.raises(WireError, match="zero checksum"):
        UDPDatagram.from_wire(wire[:6] + b"\0\0" + wire[8:], src, dst)


def test_udp_computed_zero_is_sent_as_ffff() -> None:
    src, dst = IPv4Address("10.0.0.1"), IPv4Address("10.0.0.2")
    for port in range(0x10000):
        wire = UDPDatagram(port, 9, b"").to_wire(src, dst)
        if wire[6:8] == b"\xff\xff":
            assert UDPDatagram.from_wire(wire, src, dst).src_port == port
            return
    pytest.fail("no source port gives a zero sum")


# --- fast path ------------------------------------------------------------------------


@given(v4_packets())
def test_peek_v4_matches_full_decode(packet: IPv4Packet) -> None:
    h = packet.header
    assert peek_v4(packet.to_wire()) == (int(h.src), int(h.dst), h.protocol, h.ttl)


@given(v4_packets())
def test_decrement_ttl_v4_patches_checksum(packet: IPv4Packet) -> None:
    wire = packet.to_wire()
    if packet.header.ttl == 0:
        with pytest.raises(WireError, match="TTL"):
            decrement_ttl_v4(wire)
        return
    out = decrement_ttl_v4(wire)
    decoded = IPv4Packet.from_wire(out)  # verifies the patched checksum
    assert decoded.header.ttl == packet.header.ttl - 1
    assert out[12:] == wire[12:]


@given(v6_packets())
def test_ipv6_fast_path(packet: IPv6Packet) -> None:
    h = packet.header
    wire = packet.to_wire()
    assert peek_v6(wire) == (int(h.src), int(h.dst), h.next_header, h.hop_limit)
    if h.hop_limit:
        assert IPv6Packet.from_wire(decrement_hop_limit_v6(wire)).header.hop_limit == (
            h.hop_limit - 1
        )


def test_fast_path_refuses_short_and_wrong_version() -> None:
    with pytest.raises(WireError, match="shorter"):
        peek_v4(b"\x45" * 19)
    with pytest.raises(WireError, match="version"):
        peek_v4(b"\x65" + bytes(19))
    with pytest.raises(WireError, match="version/IHL"):
        peek_v4(b"\x44" + bytes(19))
    with pytest.raises(WireError, match="version"):
        peek_v6(b"\x40" + bytes(39))
    with pytest.raises(WireError, match="shorter"):
        decrement_hop_limit_v6(bytes(39))


@given(
    st.builds(IPv6Address, st.integers(0, 2**128 - 1)),
    st.builds(IPv6Address, st.integers(0, 2**128 - 1)),
    st.sampled_from([6, 17]),
    st.binary(min_size=20, max_size=60),
)
def test_complete_l4_checksum_v6_writes_what_a_receiver_checks(
    src: IPv6Address, dst: IPv6Address, protocol: int, segment: bytes
) -> None:
    """A packet read from a packet socket with checksum offload carries a partial TCP
    or UDP checksum (the VIP router reads such first packets): completed, it is what
    the packet's receiver verifies, and nothing else changes."""
    from manycast.wire.ip import complete_l4_checksum_v6

    if protocol == 17:  # a UDP header's length field is the segment's
        segment = segment[:4] + len(segment).to_bytes(2, "big") + segment[6:]
    at = 16 if protocol == 6 else 6
    partial = segment[:at] + b"\xaa\x55" + segment[at + 2 :]  # whatever was there
    packet = IPv6Packet.make(src, dst, protocol, partial).to_wire()
    done = complete_l4_checksum_v6(packet)
    assert done[:40] == packet[:40] and len(done) == len(packet)
    assert (
        done[40 + at + 2 :] == packet[40 + at + 2 :] and done[40 : 40 + at] == packet[40 : 40 + at]
    )
    pseudo = src.packed + dst.packed + len(segment).to_bytes(4, "big") + bytes((0, 0, 0, protocol))
    body = pseudo + done[40:]
    total = int.from_bytes(body + b"\0" * (len(body) % 2), "big") % 0xFFFF
    assert total == 0 and done[40 + at : 40 + at + 2] != b"\0\0"
    # Not TCP or UDP, or an IPv4 packet: unchanged.
    other = IPv6Packet.make(src, dst, 58, partial).to_wire()
    assert complete_l4_checksum_v6(other) == other
    assert complete_l4_checksum_v6(b"\x45" + packet[1:]) == b"\x45" + packet[1:]
