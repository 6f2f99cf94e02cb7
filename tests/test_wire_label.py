"""MPLS label stacks and MPLS-in-UDP: layout, strictness, encapsulation, router fast path."""

from __future__ import annotations

import contextlib
import dataclasses
import struct
import zlib
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from manycast.wire.cursor import internet_checksum
from manycast.wire.errors import WireError
from manycast.wire.ip import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPv4Header,
    IPv4Packet,
    IPv6Header,
    IPv6Packet,
    UDPDatagram,
)
from manycast.wire.label import (
    ENTROPY_PORT_BASE,
    FIRST_UNRESERVED,
    IMPLICIT_NULL,
    IPV4_EXPLICIT_NULL,
    IPV6_EXPLICIT_NULL,
    MAX_DEPTH,
    MAX_LABEL,
    MPLS_UDP_PORT,
    ROUTER_ALERT,
    LabelEntry,
    LabelledReaderV4,
    LabelStack,
    MplsInUdp,
    TunnelV4,
    decapsulate,
    encapsulate,
    entropy_port,
    entropy_port_v4,
    peek_top,
    pop,
    push,
    read_labelled_v4,
    split,
    swap_top,
    unwrap_v4,
    wrap_v4,
)

# --- strategies -------------------------------------------------------------------------

v4 = st.builds(IPv4Address, st.integers(0, 2**32 - 1))
v6 = st.builds(IPv6Address, st.integers(0, 2**128 - 1))
u8 = st.integers(0, 0xFF)
labels = st.one_of(
    st.integers(0, 15).filter(lambda n: n != IMPLICIT_NULL),
    st.integers(FIRST_UNRESERVED, MAX_LABEL),
    st.just(MAX_LABEL),
)


@st.composite
def stacks(draw: st.DrawFn, bottom_label: int | None = None) -> LabelStack:
    depth = draw(st.integers(1, MAX_DEPTH))
    values = draw(st.lists(labels, min_size=depth, max_size=depth))
    if bottom_label is not None:
        values[-1] = bottom_label
    elif values[-1] == ROUTER_ALERT:
        values[-1] = FIRST_UNRESERVED
    return LabelStack(
        tuple(
            LabelEntry(label, draw(st.integers(0, 7)), i == depth - 1, draw(u8))
            for i, label in enumerate(values)
        )
    )


@st.composite
def inner_packets(draw: st.DrawFn, family: int | None = None) -> bytes:
    family = family or draw(st.sampled_from([4, 6]))
    protocol = draw(st.sampled_from([IPPROTO_TCP, IPPROTO_UDP, 1, 58]))
    payload = draw(st.binary(max_size=48))
    if family == 4:
        return IPv4Packet.make(draw(v4), draw(v4), protocol, payload, ttl=draw(u8)).to_wire()
    return IPv6Packet.make(draw(v6), draw(v6), protocol, payload, hop_limit=draw(u8)).to_wire()


@st.composite
def mpls_payloads(draw: st.DrawFn) -> MplsInUdp:
    stack = draw(stacks())
    family = {IPV4_EXPLICIT_NULL: 4, IPV6_EXPLICIT_NULL: 6}.get(stack.entries[-1].label)
    return MplsInUdp(stack, draw(inner_packets(family)))


@st.composite
def encapsulated(draw: st.DrawFn) -> tuple[bytes, MplsInUdp, int]:
    """(packet, payload, outer TTL): MPLS-in-UDP over IPv4 (with or without a UDP
    checksum) or IPv6."""
    mpls = draw(mpls_payloads())
    ttl = draw(u8)
    if draw(st.booleans()):
        packet = encapsulate(
            draw(v4), draw(v4), mpls.stack, mpls.inner, ttl, checksum=draw(st.booleans())
        )
    else:
        packet = encapsulate(draw(v6), draw(v6), mpls.stack, mpls.inner, ttl)
    return packet, mpls, ttl


def decodes_strictly(decode: object, data: bytes) -> None:
    """Decoding either fails with WireError or yields a value that re-encodes to `data`."""
    assert callable(decode)
    try:
        value = decode(data)
    except WireError:
        return
    assert value.to_wire() == data


V4A, V4B = IPv4Address("192.0.2.1"), IPv4Address("198.51.100.7")
V6A, V6B = IPv6Address("2001:db8::1"), IPv6Address("2001:db8::2")
INNER = IPv4Packet.make(
    IPv4Address("203.0.113.5"), IPv4Address("203.0.113.80"), IPPROTO_TCP, b"\x9c\x40\x00\x50" * 5
).to_wire()


# --- round trips ------------------------------------------------------------------------


@given(stacks())
def test_stack_round_trip(stack: LabelStack) -> None:
    data = stack.to_wire()
    assert len(data) == 4 * len(stack.entries)
    assert LabelStack.from_wire(data) == stack
    for entry, offset in zip(stack.entries, range(0, len(data), 4), strict=True):
        assert LabelEntry.from_wire(data[offset : offset + 4]) == entry


@given(mpls_payloads(), st.binary(max_size=20))
def test_payload_round_trip_and_split(mpls: MplsInUdp, tail: bytes) -> None:
    data = mpls.to_wire()
    assert MplsInUdp.from_wire(data) == mpls
    assert split(data) == (mpls.stack, mpls.inner)
    assert split(mpls.stack.to_wire() + tail) == (mpls.stack, tail)


@given(encapsulated())
def test_encapsulation_round_trip(case: tuple[bytes, MplsInUdp, int]) -> None:
    packet, mpls, ttl = case
    header, stack, inner = decapsulate(packet)
    assert (stack, inner) == (mpls.stack, mpls.inner)
    assert (header.ttl if isinstance(header, IPv4Header) else header.hop_limit) == ttl
    offset = 20 if isinstance(header, IPv4Header) else 40
    src_port, dst_port = struct.unpack_from("!HH", packet, offset)
    assert dst_port == MPLS_UDP_PORT
    assert src_port == entropy_port(mpls.inner) and src_port >= ENTROPY_PORT_BASE


def test_layout_is_byte_exact() -> None:
    assert LabelEntry(16, 0, True, 64).to_wire() == bytes.fromhex("00010140")
    assert LabelEntry(MAX_LABEL, 7, False, 255).to_wire() == bytes.fromhex("fffffeff")
    stack = LabelStack.of(1000, 17, ttl=9, tc=5)
    assert stack.to_wire() == bytes.fromhex("003e8a0900011b09")
    assert stack.labels == (1000, 17) and stack.top == LabelEntry(1000, 5, False, 9)
    packet = encapsulate(V4A, V4B, LabelStack.of(17), INNER, 30)
    header = IPv4Packet.from_wire(packet).header
    assert (header.src, header.dst, header.protocol, header.ttl) == (V4A, V4B, IPPROTO_UDP, 30)
    udp = UDPDatagram.from_wire(packet[20:], V4A, V4B)
    assert (udp.dst_port, udp.payload) == (6635, bytes.fromhex("00011140") + INNER)
    # The entropy port is a fixed function of the flow (protocol, addresses, ports),
    # pinned here so it cannot drift between versions.
    flow = bytes([IPPROTO_TCP]) + INNER[12:20] + INNER[20:24]
    assert udp.src_port == entropy_port(INNER) == 0xC000 | zlib.crc32(flow) & 0x3FFF == 50_766


def test_friendly_inputs_are_normalised() -> None:
    stack = LabelStack([LabelEntry(20, 0, True, 1)])  # type: ignore[arg-type]
    assert stack.entries == (LabelEntry(20, 0, True, 1),)
    assert MplsInUdp(stack, bytearray(INNER)).inner == INNER  # type: ignore[arg-type]


# --- strictness -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (bytes.fromhex("00003140"), "implicit null"),
        (bytes.fromhex("00010040"), "truncated"),
        (bytes.fromhex("0001014000011140"), "trailing"),
        (bytes.fromhex("0001004000011040") * 4 + bytes.fromhex("00012140"), "within 8"),
        (bytes.fromhex("00001140"), "router alert"),
        (bytes.fromhex("000101"), "truncated"),
        (b"", "truncated"),
    ],
)
def test_stack_errors(data: bytes, error: str) -> None:
    with pytest.raises(WireError, match=error):
        LabelStack.from_wire(data)


def test_depth_eight_is_the_limit() -> None:
    eight = LabelStack.of(*range(16, 24))
    assert LabelStack.from_wire(eight.to_wire()) == eight
    with pytest.raises(WireError, match=r"not 1\.\.8"):
        LabelStack.of(*range(16, 25))
    with pytest.raises(WireError, match=r"not 1\.\.8"):
        LabelStack(())


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (bytes.fromhex("00010140"), "no inner packet"),
        (bytes.fromhex("00010140") + b"\x20\x00", "not IPv4 or IPv6"),
        (bytes.fromhex("00000140") + b"\x60" + bytes(39), "explicit null label 0 on an IPv6"),
        (bytes.fromhex("00002140") + INNER, "explicit null label 2 on an IPv4"),
        (bytes.fromhex("00010140") + b"\x45" + bytes(0xFFFF - 12), "more than a UDP payload"),
    ],
)
def test_payload_errors(data: bytes, error: str) -> None:
    with pytest.raises(WireError, match=error):
        MplsInUdp.from_wire(data)


def test_explicit_nulls_on_their_own_family_and_reserved_labels_above() -> None:
    v6_inner = IPv6Packet.make(V6A, V6B, IPPROTO_UDP, b"x").to_wire()
    for stack, inner in (
        (LabelStack.of(IPV4_EXPLICIT_NULL), INNER),
        (LabelStack.of(IPV6_EXPLICIT_NULL), v6_inner),
        (LabelStack.of(ROUTER_ALERT, 0, 15, 7, 13, 14), INNER),
    ):
        data = MplsInUdp(stack, inner).to_wire()
        assert MplsInUdp.from_wire(data) == MplsInUdp(stack, inner)


@pytest.mark.parametrize(
    "build",
    [
        lambda: LabelEntry(IMPLICIT_NULL, 0, True, 1),
        lambda: LabelEntry(MAX_LABEL + 1, 0, True, 1),
        lambda: LabelEntry(-1, 0, True, 1),
        lambda: LabelEntry(16, 8, True, 1),
        lambda: LabelEntry(16, 0, True, 256),
        lambda: LabelEntry(16, 0, 1, 1),  # type: ignore[arg-type]
        lambda: LabelEntry(True, 0, True, 1),
        lambda: LabelEntry(16.0, 0, True, 1),  # type: ignore[arg-type]
        lambda: LabelStack((LabelEntry(16, 0, True, 1), LabelEntry(17, 0, True, 1))),
        lambda: LabelStack((LabelEntry(16, 0, False, 1),)),
        lambda: LabelStack((16,)),  # type: ignore[arg-type]
        lambda: LabelStack(b"\x00\x01\x01\x40"),  # type: ignore[arg-type]
        lambda: LabelStack.of(ROUTER_ALERT),
        lambda: MplsInUdp(LabelStack.of(16), b""),
        lambda: MplsInUdp(LabelStack.of(16), "E"),  # type: ignore[arg-type]
        lambda: MplsInUdp(LabelStack.of(16).to_wire(), INNER),  # type: ignore[arg-type]
        lambda: encapsulate(V4A, V6B, LabelStack.of(16), INNER),
        lambda: encapsulate(V6A, V6B, LabelStack.of(16), INNER, checksum=False),
    ],
)
def test_constructors_validate(build: object) -> None:
    assert callable(build)
    with pytest.raises(WireError):
        build()


@given(stacks())
def test_every_truncation_of_a_stack_fails(stack: LabelStack) -> None:
    data = stack.to_wire()
    for end in range(len(data)):
        with pytest.raises(WireError):
            LabelStack.from_wire(data[:end])
        with pytest.raises(WireError):
            MplsInUdp.from_wire(data[:end])


@given(encapsulated())
def test_every_truncation_of_a_packet_fails(case: tuple[bytes, MplsInUdp, int]) -> None:
    packet = case[0]
    for end in range(len(packet)):
        with pytest.raises(WireError):
            decapsulate(packet[:end])


@given(mpls_payloads(), st.data())
def test_bit_flips(mpls: MplsInUdp, data: st.DataObject) -> None:
    raw = mpls.to_wire()
    positions = list(range(min(len(raw), 4 * len(mpls.stack.entries) + 1) * 8))
    for bit in positions:
        flipped = bytearray(raw)
        flipped[bit // 8] ^= 1 << (bit % 8)
        decodes_strictly(MplsInUdp.from_wire, bytes(flipped))
        decodes_strictly(LabelStack.from_wire, bytes(flipped[: 4 * len(mpls.stack.entries)]))


@given(encapsulated(), st.data())
def test_packet_bit_flips_raise_only_wire_error(
    case: tuple[bytes, MplsInUdp, int], data: st.DataObject
) -> None:
    packet = case[0]
    for bit in data.draw(st.lists(st.integers(0, len(packet) * 8 - 1), max_size=64)):
        flipped = bytearray(packet)
        flipped[bit // 8] ^= 1 << (bit % 8)
        try:
            header, stack, inner = decapsulate(bytes(flipped))
        except WireError:
            continue
        # Only a flip the checksums cannot see survives: then the result is consistent.
        assert bytes(flipped).endswith(MplsInUdp(stack, inner).to_wire())
        assert isinstance(header, IPv4Header | IPv6Header)


@given(st.binary(max_size=80))
def test_random_bytes(data: bytes) -> None:
    decodes_strictly(LabelEntry.from_wire, data)
    decodes_strictly(LabelStack.from_wire, data)
    decodes_strictly(MplsInUdp.from_wire, data)
    with pytest.raises(WireError):
        decapsulate(data)  # random bytes are never a checksummed UDP packet to 6635
    for fast in (peek_top, pop, lambda d: swap_top(d, 100), lambda d: push(d, 100)):
        with contextlib.suppress(WireError):
            fast(data)


def test_decapsulate_refuses_what_is_not_mpls_in_udp() -> None:
    good = encapsulate(V4A, V4B, LabelStack.of(16), INNER)
    assert decapsulate(good)[1:] == (LabelStack.of(16), INNER)
    with pytest.raises(WireError, match="protocol 6, not UDP"):
        decapsulate(IPv4Packet.make(V4A, V4B, IPPROTO_TCP, good[20:]).to_wire())
    to_other_port = UDPDatagram(50000, 6636, good[28:]).to_wire(V4A, V4B)
    with pytest.raises(WireError, match="port 6636, not 6635"):
        decapsulate(IPv4Packet.make(V4A, V4B, IPPROTO_UDP, to_other_port).to_wire())
    bad_sum = bytearray(good)
    bad_sum[-1] ^= 1
    with pytest.raises(WireError, match="bad checksum"):
        decapsulate(bytes(bad_sum))
    header = IPv4Packet.from_wire(good).header
    fragment = IPv4Packet(dataclasses.replace(header, more_fragments=True), good[20:]).to_wire()
    with pytest.raises(WireError, match="fragment"):
        decapsulate(fragment)
    with pytest.raises(WireError, match="version 5"):
        decapsulate(b"\x50" + good[1:])
    with pytest.raises(WireError, match="neither 4 nor 6"):
        decapsulate(b"")
    unsummed = encapsulate(V4A, V4B, LabelStack.of(16), INNER, checksum=False)
    assert unsummed[26:28] == b"\0\0" and decapsulate(unsummed)[1:] == (LabelStack.of(16), INNER)
    v6 = encapsulate(V6A, V6B, LabelStack.of(16, 17), INNER)
    assert decapsulate(v6)[0] == IPv6Packet.from_wire(v6).header


# --- entropy ----------------------------------------------------------------------------


def _tcp(src_port: int, ttl: int, body: bytes) -> bytes:
    segment = struct.pack("!HH", src_port, 80) + body
    return IPv4Packet.make(V4A, V4B, IPPROTO_TCP, segment, ttl=ttl).to_wire()


def test_entropy_port_follows_the_flow_only() -> None:
    port = entropy_port(_tcp(40000, 64, b"first"))
    assert port == entropy_port(_tcp(40000, 3, b"a later segment of the same flow"))
    ports = {entropy_port(_tcp(p, 64, b"x")) for p in range(40000, 40064)}
    assert len(ports) > 48 and all(ENTROPY_PORT_BASE <= p <= 0xFFFF for p in ports)
    v6 = IPv6Packet.make(V6A, V6B, IPPROTO_UDP, b"\x9c\x40\x00\x35rest").to_wire()
    assert ENTROPY_PORT_BASE <= entropy_port(v6) <= 0xFFFF
    for odd in (b"", b"\x45", b"\x4f" + bytes(10), b"\x60"):
        assert ENTROPY_PORT_BASE <= entropy_port(odd) <= 0xFFFF


# --- fast path --------------------------------------------------------------------------


@given(mpls_payloads(), st.integers(FIRST_UNRESERVED, MAX_LABEL))
def test_swap_top_matches_the_strict_decoder(mpls: MplsInUdp, new_label: int) -> None:
    data = mpls.to_wire()
    top = mpls.stack.top
    assert peek_top(data) == (top.label, top.tc, top.bottom, top.ttl)
    swapped = swap_top(data, new_label)
    if top.ttl <= 1:
        assert swapped is None
        return
    assert swapped is not None
    want = LabelEntry(new_label, top.tc, top.bottom, top.ttl - 1)
    entries = (want, *mpls.stack.entries[1:])
    assert MplsInUdp.from_wire(swapped) == MplsInUdp(LabelStack(entries), mpls.inner)


@given(mpls_payloads())
def test_pop_matches_the_strict_decoder(mpls: MplsInUdp) -> None:
    data = mpls.to_wire()
    popped = pop(data)
    if mpls.stack.top.ttl <= 1:
        assert popped is None
    elif len(mpls.stack.entries) == 1:
        assert popped == mpls.inner
    else:
        rest = MplsInUdp(LabelStack(mpls.stack.entries[1:]), mpls.inner)
        assert popped is not None and MplsInUdp.from_wire(popped) == rest


@given(inner_packets(), st.integers(FIRST_UNRESERVED, MAX_LABEL), u8, st.integers(0, 7))
def test_push_then_pop(inner: bytes, label: int, ttl: int, tc: int) -> None:
    pushed = push(inner, label, ttl, tc)
    assert MplsInUdp.from_wire(pushed) == MplsInUdp(
        LabelStack((LabelEntry(label, tc, True, ttl),)), inner
    )
    if ttl > 1:
        assert pop(pushed) == inner


def test_fast_path_errors() -> None:
    payload = push(INNER, 100, ttl=2)
    assert swap_top(payload, 200) == push(INNER, 200, ttl=1)
    assert swap_top(push(INNER, 100, ttl=1), 200) is None
    assert pop(push(INNER, 100, ttl=0)) is None
    with pytest.raises(WireError, match="shorter than one entry"):
        peek_top(b"\x00\x01\x01")
    with pytest.raises(WireError, match="shorter than one entry"):
        pop(b"")
    with pytest.raises(WireError, match="implicit null"):
        swap_top(payload, IMPLICIT_NULL)
    with pytest.raises(WireError, match="out of range"):
        swap_top(payload, MAX_LABEL + 1)
    with pytest.raises(WireError, match="router alert"):
        swap_top(payload, ROUTER_ALERT)
    with pytest.raises(WireError, match="explicit null label 2 on an IPv4"):
        swap_top(payload, IPV6_EXPLICIT_NULL)
    assert swap_top(payload, IPV4_EXPLICIT_NULL) == push(INNER, IPV4_EXPLICIT_NULL, ttl=1)
    two_deep = LabelStack.of(100, 101).to_wire() + INNER
    assert (
        swap_top(two_deep, ROUTER_ALERT)
        == LabelStack(
            (LabelEntry(ROUTER_ALERT, 0, False, 63), LabelEntry(101, 0, True, 64))
        ).to_wire()
        + INNER
    )
    with pytest.raises(WireError, match="not IPv4 or IPv6"):
        push(b"\x20", 100)
    with pytest.raises(WireError, match="no inner packet"):
        push(b"", 100)
    with pytest.raises(WireError, match="ttl 256"):
        push(INNER, 100, ttl=256)


# --- the IPv4 fast path routers use -------------------------------------------------------


@given(mpls_payloads(), st.integers(0, 0xFFFF))
def test_fast_wrap_is_what_the_strict_decoder_reads_and_unwrap_inverts_it(
    mpls: MplsInUdp, sport: int
) -> None:
    packet = wrap_v4(int(V4A), int(V4B), mpls.to_wire(), sport)
    header, stack, inner = decapsulate(packet)
    assert (header.src, header.dst, stack, inner) == (V4A, V4B, mpls.stack, mpls.inner)
    assert unwrap_v4(packet) == (int(V4A), sport, mpls.to_wire())


@given(mpls_payloads(), st.booleans())
def test_fast_unwrap_reads_what_encapsulate_writes(mpls: MplsInUdp, checksum: bool) -> None:
    packet = encapsulate(V4A, V4B, mpls.stack, mpls.inner, checksum=checksum)
    src, _, payload = unwrap_v4(packet)
    assert (src, payload) == (int(V4A), mpls.to_wire())


@given(mpls_payloads(), st.data())
def test_fast_unwrap_raises_only_wire_error_on_bit_flips(
    mpls: MplsInUdp, data: st.DataObject
) -> None:
    packet = bytearray(encapsulate(V4A, V4B, mpls.stack, mpls.inner))
    index = data.draw(st.integers(0, len(packet) - 1))
    packet[index] ^= 1 << data.draw(st.integers(0, 7))
    with contextlib.suppress(WireError):
        unwrap_v4(bytes(packet))
    for cut in (0, 19, 27):
        with pytest.raises(WireError):
            unwrap_v4(bytes(packet[:cut]))


# --- switching with precomputed headers (IPv4) -------------------------------------------


def _strict_swap(packet: bytes, src: int, dst: int, label: int) -> bytes | str | None:
    """What `TunnelV4.swap` must give: unwrap, swap the top entry, wrap (or the error)."""
    _, sport, payload = unwrap_v4(packet)
    try:
        swapped = swap_top(payload, label)
    except WireError as exc:
        return str(exc)
    return None if swapped is None else wrap_v4(src, dst, swapped, sport)


@given(mpls_payloads(), labels, st.booleans(), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_tunnel_swap_is_unwrap_swap_top_wrap_byte_for_byte(
    mpls: MplsInUdp, label: int, checksum: bool, src: int, dst: int
) -> None:
    packet = encapsulate(V4A, V4B, mpls.stack, mpls.inner, checksum=checksum)
    sport, word = read_labelled_v4(packet)
    assert (sport, word) == (unwrap_v4(packet)[1], int.from_bytes(mpls.stack.top.to_wire(), "big"))
    want = _strict_swap(packet, src, dst, label)
    try:
        tunnel = TunnelV4(src, dst, label)
        got: bytes | str | None = tunnel.swap(packet, sport, word)
        assert tunnel.swap(packet, sport, word) == got  # its header now remembered
    except WireError as exc:
        got = str(exc)
    assert got == want
    if isinstance(got, bytes):
        header, stack, inner = decapsulate(got)
        assert isinstance(header, IPv4Header)
        assert (int(header.src), int(header.dst), header.ttl) == (src, dst, 1)
        assert stack.top.label == label and inner == mpls.inner


@given(inner_packets(4), labels, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), u8)
def test_tunnel_push_is_push_then_wrap_byte_for_byte(
    inner: bytes, label: int, src: int, dst: int, ttl: int
) -> None:
    try:
        want: bytes | str = wrap_v4(
            src, dst, push(inner, label, ttl=inner[8]), entropy_port(inner), ttl
        )
    except WireError as exc:
        want = str(exc)
    try:
        tunnel = TunnelV4(src, dst, label, ttl)
        got: bytes | str = tunnel.push(inner)
        assert tunnel.push(inner) == got  # its header now remembered
    except WireError as exc:
        got = str(exc)
    assert got == want


@given(st.binary(min_size=1, max_size=64), st.sampled_from([0x45, 0x46, 0x65]), u8, u8)
def test_entropy_port_v4_is_entropy_port(tail: bytes, first: int, protocol: int, frag: int) -> None:
    inner = bytearray(bytes((first,)) + tail)
    if len(inner) > 9:
        inner[9] = protocol if protocol & 1 else IPPROTO_UDP
    if len(inner) > 7:
        inner[6 + frag % 2] = frag if frag & 2 else 0
    assert entropy_port_v4(bytes(inner)) == entropy_port(bytes(inner))


@given(encapsulated(), st.data())
def test_read_labelled_v4_accepts_exactly_what_unwrap_v4_does(
    case: tuple[bytes, MplsInUdp, int], data: st.DataObject
) -> None:
    packet = bytearray(case[0])
    for _ in range(data.draw(st.integers(0, 2))):
        index = data.draw(st.integers(0, len(packet) - 1))
        packet[index] ^= 1 << data.draw(st.integers(0, 7))
    raw = bytes(packet)
    try:
        _, sport, payload = unwrap_v4(raw)
        want: tuple[int, int] | None = (sport, _top(payload))
    except WireError:
        want = None
    try:
        got: tuple[int, int] | None = read_labelled_v4(raw)
    except WireError:
        got = None
    assert got == want
    for cut in (0, 19, 27, 31):
        with pytest.raises(WireError):
            read_labelled_v4(raw[:cut])


def _top(payload: bytes) -> int:
    if len(payload) < 4:
        raise WireError("no entry")
    return int.from_bytes(payload[:4], "big")


def test_tunnel_errors() -> None:
    with pytest.raises(WireError, match="implicit null"):
        TunnelV4(int(V4A), int(V4B), IMPLICIT_NULL)
    with pytest.raises(WireError, match="out of range"):
        TunnelV4(int(V4A), int(V4B), MAX_LABEL + 1)
    with pytest.raises(WireError, match="out of range"):
        TunnelV4(2**32, int(V4B), 100)
    tunnel = TunnelV4(int(V4A), int(V4B), 100)
    with pytest.raises(WireError, match="IPv4 packets only"):
        tunnel.push(IPv6Packet.make(V6A, V6B, IPPROTO_UDP, b"").to_wire())
    with pytest.raises(WireError, match="no inner packet"):
        tunnel.push(b"")
    largest = IPv4Packet.make(V4A, V4B, IPPROTO_UDP, bytes(0xFFFF - 20 - 32)).to_wire()
    assert len(tunnel.push(largest)) == 0xFFFF
    too_big = IPv4Packet.make(V4A, V4B, IPPROTO_UDP, bytes(0xFFFF - 20 - 31)).to_wire()
    with pytest.raises(WireError, match="do not fit"):
        tunnel.push(too_big)
    with pytest.raises(WireError, match="explicit null label 2 on an IPv4"):
        TunnelV4(int(V4A), int(V4B), IPV6_EXPLICIT_NULL).push(INNER)
    with pytest.raises(WireError, match="router alert"):
        TunnelV4(int(V4A), int(V4B), ROUTER_ALERT).push(INNER)
    labelled = wrap_v4(int(V4B), int(V4A), push(INNER, 100, ttl=1), 50000)
    assert tunnel.swap(labelled, *read_labelled_v4(labelled)) is None


@given(st.binary(max_size=80), st.sampled_from(["raw", "framed", "summed"]))
def test_read_labelled_v4_on_random_bytes_agrees_with_unwrap_v4(data: bytes, how: str) -> None:
    if how != "raw" and len(data) >= 32:  # a plausible packet, so that later checks run
        fixed = bytearray(data)
        fixed[0], fixed[9] = 0x45, IPPROTO_UDP
        fixed[2:4] = len(data).to_bytes(2, "big")
        fixed[22:24] = MPLS_UDP_PORT.to_bytes(2, "big")
        fixed[24:26] = (len(data) - 20).to_bytes(2, "big")
        if how == "summed":  # not a fragment, a right header checksum, no UDP checksum
            fixed[6], fixed[7] = fixed[6] & 0x80, 0  # the reserved bit kept: it is not read
            fixed[10:12], fixed[26:28] = b"\0\0", b"\0\0"
            fixed[10:12] = internet_checksum(bytes(fixed[:20])).to_bytes(2, "big")
        data = bytes(fixed)
    try:
        _, sport, payload = unwrap_v4(data)
        want: tuple[int, int] | None = (sport, _top(payload))
    except WireError:
        want = None
    try:
        got: tuple[int, int] | None = read_labelled_v4(data)
    except WireError:
        got = None
    assert got == want


@given(encapsulated(), st.data())
def test_a_reader_remembering_headers_answers_as_read_labelled_v4(
    case: tuple[bytes, MplsInUdp, int], data: st.DataObject
) -> None:
    """Once a header is found good, packets with that header are read with fewer checks:
    each must still be taken or refused exactly as `read_labelled_v4` does."""
    reader = LabelledReaderV4()
    original = case[0]

    def outcome(read: object, packet: bytes) -> tuple[int, int] | str:
        assert callable(read)
        try:
            value: tuple[int, int] = read(packet)
        except WireError as exc:
            return str(exc)
        return value

    for _ in range(2):  # cold, then with its header remembered
        assert outcome(reader.read, original) == outcome(read_labelled_v4, original)
    for _ in range(3):
        packet = bytearray(original)
        for _ in range(data.draw(st.integers(1, 2))):
            index = data.draw(st.integers(0, len(packet) - 1))
            packet[index] ^= 1 << data.draw(st.integers(0, 7))
        if data.draw(st.booleans()):  # same header, another length, a UDP length to match
            cut = data.draw(st.integers(0, len(packet)))
            packet = packet[:cut] + bytes(data.draw(st.integers(0, 8)))
            if len(packet) >= 26:
                packet[24:26] = (len(packet) - 20).to_bytes(2, "big")
        raw = bytes(packet)
        assert outcome(reader.read, raw) == outcome(read_labelled_v4, raw)
