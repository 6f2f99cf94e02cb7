"""MPLS-in-UDP over IPv6 on a router's fast path (`wire/label6.py`): byte for byte what the
strict codec (`label.encapsulate` / `decapsulate`) writes and reads, its UDP checksum
required and checked, and only `WireError` on anything else."""

from __future__ import annotations

import contextlib
from ipaddress import IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from manycast.wire.errors import WireError
from manycast.wire.ip import IPPROTO_UDP, IPv6Packet, UDPDatagram
from manycast.wire.label import (
    ENTRY_LEN,
    FIRST_UNRESERVED,
    IMPLICIT_NULL,
    MAX_LABEL,
    MPLS_UDP_PORT,
    LabelStack,
    MplsInUdp,
    decapsulate,
    encapsulate,
    entropy_port,
    push,
    swap_top,
)
from manycast.wire.label6 import (
    LABELLED_V6_LEN,
    LabelledReaderV6,
    TunnelV6,
    read_labelled_v6,
    wrap_v6,
)
from test_wire_label import inner_packets, labels, mpls_payloads, u8, v6

# Bytes of the outer IPv6 header the UDP checksum does not cover (traffic class, flow
# label, hop limit; byte 0's low half too): a router may rewrite them on the way.
UNCOVERED = {1, 2, 3, 7}


@given(mpls_payloads(), v6, v6, u8)
def test_wrap_v6_is_encapsulate_and_the_reader_reads_it(
    mpls: MplsInUdp, src: IPv6Address, dst: IPv6Address, hop_limit: int
) -> None:
    sport = entropy_port(mpls.inner)
    packet = wrap_v6(int(src), int(dst), mpls.to_wire(), sport, hop_limit)
    assert packet == encapsulate(src, dst, mpls.stack, mpls.inner, hop_limit)
    header, stack, inner = decapsulate(packet)
    assert (header.src, header.dst, stack, inner) == (src, dst, mpls.stack, mpls.inner)
    word = int.from_bytes(mpls.stack.entries[0].to_wire(), "big")
    assert read_labelled_v6(packet) == LabelledReaderV6().read(packet) == (sport, word)


@given(inner_packets(), labels, v6, v6)
def test_tunnel_push_is_push_then_wrap_byte_for_byte(
    inner: bytes, label: int, src: IPv6Address, dst: IPv6Address
) -> None:
    """Either family inside: an IPv6 pool carries IPv6 packets, but nothing here cares."""
    ttl = inner[7] if inner[0] >> 4 == 6 else inner[8]
    try:
        expected = encapsulate(src, dst, LabelStack.of(label, ttl=ttl), inner, 1)
    except WireError:  # an explicit null on the other family's packet
        with pytest.raises(WireError):
            TunnelV6(int(src), int(dst), label).push(inner)
        return
    assert TunnelV6(int(src), int(dst), label).push(inner) == expected
    assert wrap_v6(int(src), int(dst), push(inner, label, ttl), entropy_port(inner)) == expected


@given(mpls_payloads(), labels, v6, v6, v6, v6)
def test_tunnel_swap_is_swap_top_then_wrap_byte_for_byte(
    mpls: MplsInUdp,
    label: int,
    upstream: IPv6Address,
    us: IPv6Address,
    also_us: IPv6Address,
    next_hop: IPv6Address,
) -> None:
    """The checksum patched from the one that came in equals one computed afresh."""
    sport = entropy_port(mpls.inner)
    packet = encapsulate(upstream, us, mpls.stack, mpls.inner, 1)
    read = read_labelled_v6(packet)
    tunnel = TunnelV6(int(also_us), int(next_hop), label)
    try:
        swapped = swap_top(mpls.to_wire(), label)
    except WireError:
        with pytest.raises(WireError):
            tunnel.swap(packet, *read)
        return
    out = tunnel.swap(packet, *read)
    if swapped is None:
        assert out is None  # the label's TTL ran out here
        return
    assert out == wrap_v6(int(also_us), int(next_hop), swapped, sport)
    assert read_labelled_v6(out)[0] == sport


@given(mpls_payloads(), v6, v6, st.data())
def test_every_flip_of_a_covered_byte_is_refused(
    mpls: MplsInUdp, src: IPv6Address, dst: IPv6Address, data: st.DataObject
) -> None:
    packet = encapsulate(src, dst, mpls.stack, mpls.inner, 1)
    at = data.draw(st.integers(0, len(packet) - 1).filter(lambda i: i not in UNCOVERED))
    flip = data.draw(st.integers(1, 0xFF).filter(lambda f: at != 0 or f >= 0x10))
    broken = bytearray(packet)
    broken[at] ^= flip
    # One's-complement sums cannot tell 0x0000 from 0xFFFF: a covered word flipped from
    # one to the other still sums right, unless a field's own check sees it (the
    # destination port, the UDP length, a checksum of zero).
    word = at & ~1
    pair = sorted((packet[word : word + 2], bytes(broken[word : word + 2])))
    if pair == [b"\x00\x00", b"\xff\xff"] and word >= 8 and word not in (42, 44, 46):
        return
    with pytest.raises(WireError):
        read_labelled_v6(bytes(broken))


@given(st.binary(max_size=120))
def test_random_bytes_raise_only_wire_error(data: bytes) -> None:
    with contextlib.suppress(WireError):
        read_labelled_v6(data)


def test_what_is_refused_and_why() -> None:
    src, dst = IPv6Address("2001:db8::1"), IPv6Address("2001:db8::2")
    inner = IPv6Packet.make(dst, src, IPPROTO_UDP, b"\0" * 12, hop_limit=9).to_wire()
    good = encapsulate(src, dst, LabelStack.of(FIRST_UNRESERVED), inner, 1)
    read_labelled_v6(good)

    def changed(at: int, value: bytes) -> bytes:
        return good[:at] + value + good[at + len(value) :]

    cases = {
        "shorter than its headers": good[: LABELLED_V6_LEN - 1],
        "without extension headers": changed(6, b"\x00"),  # next header: Hop-by-Hop
        "not an MPLS-in-UDP packet": changed(42, (MPLS_UDP_PORT + 1).to_bytes(2, "big")),
        "lengths disagree": good + b"\0\0",
        "without a UDP checksum": changed(46, b"\0\0"),
        "bad UDP checksum": changed(46, bytes([good[46] ^ 1, good[47]])),
    }
    for why, packet in cases.items():
        with pytest.raises(WireError, match=why):
            read_labelled_v6(packet)
    # An IPv4 packet is not one either.
    with pytest.raises(WireError):
        read_labelled_v6(b"\x45" + good[1:])


def test_tunnel_errors() -> None:
    a, b = int(IPv6Address("2001:db8::1")), int(IPv6Address("2001:db8::2"))
    for label in (IMPLICIT_NULL, MAX_LABEL + 1, -1):
        with pytest.raises(WireError):
            TunnelV6(a, b, label)
    with pytest.raises(WireError):
        TunnelV6(-1, b, FIRST_UNRESERVED)
    with pytest.raises(WireError):
        TunnelV6(a, 1 << 128, FIRST_UNRESERVED)
    tunnel = TunnelV6(a, b, FIRST_UNRESERVED)
    for inner in (b"", b"\x60" + b"\0" * 10, b"\x10" * 40):  # none, cut short, no IP
        with pytest.raises(WireError):
            tunnel.push(inner)
    big = IPv6Packet.make(
        IPv6Address(a), IPv6Address(b), IPPROTO_UDP, b"\0" * (0xFFFF - 40 - ENTRY_LEN - 8 + 1)
    )
    with pytest.raises(WireError, match="do not fit"):
        tunnel.push(big.to_wire())
    # What the router sends arrives whole: the UDP datagram's own decoder agrees.
    inner = IPv6Packet.make(IPv6Address(b), IPv6Address(a), IPPROTO_UDP, b"hi").to_wire()
    out = tunnel.push(inner)
    UDPDatagram.from_wire(out[40:], IPv6Address(a), IPv6Address(b))
