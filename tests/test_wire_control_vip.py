"""Control messages of the virtual-IP pool: round trips, layout, strictness under garbage."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address
from typing import Literal, get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st

from manycast.wire import WireError, control
from manycast.wire.control import (
    MAX_BINDINGS,
    MAX_FLOW_KEYS,
    Binding,
    ControlMessage,
    FlowKey,
    FlowTag,
    FlowUntag,
    LabelMapping,
    LoadReport,
    MessageType,
    ServerHello,
    VipAdvert,
    decode,
    encode,
)
from manycast.wire.control.envelope import registered_types
from manycast.wire.label import FIRST_UNRESERVED, MAX_LABEL

# --- strategies -------------------------------------------------------------------------

ids = st.text(min_size=1, max_size=64).filter(lambda s: len(s.encode()) <= 64)
u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
holds = st.integers(1, 0xFFFFFFFF)
addresses = st.ip_addresses()
loads = st.floats(min_value=0, allow_nan=False, allow_infinity=False)
vip_labels = st.integers(FIRST_UNRESERVED, MAX_LABEL)


@st.composite
def flow_keys(draw: st.DrawFn) -> FlowKey:
    version: Literal[4, 6] = draw(st.sampled_from([4, 6]))
    return FlowKey(
        draw(u8),
        draw(st.ip_addresses(v=version)),
        draw(u16),
        draw(st.ip_addresses(v=version)),
        draw(u16),
    )


@st.composite
def label_mappings(draw: st.DrawFn) -> LabelMapping:
    fecs = draw(st.sets(addresses, max_size=24))
    chosen = draw(st.lists(vip_labels, min_size=len(fecs), max_size=len(fecs), unique=True))
    table = dict(zip(fecs, chosen, strict=True))
    return LabelMapping.of(draw(ids), draw(u32), draw(addresses), draw(holds), table)


messages: st.SearchStrategy[ControlMessage] = st.one_of(
    st.builds(ServerHello, ids, u32, addresses, addresses, holds),
    label_mappings(),
    st.builds(FlowTag, ids, u32, flow_keys(), addresses, holds),
    st.builds(
        FlowUntag, ids, u32, st.lists(flow_keys(), min_size=1, max_size=12, unique=True).map(tuple)
    ),
    st.builds(VipAdvert, ids, u32, addresses, addresses, holds),
    st.builds(LoadReport, ids, u32, addresses, loads, u32),
)
VIP_TYPES = {
    MessageType.SERVER_HELLO,
    MessageType.LABEL_MAPPING,
    MessageType.FLOW_TAG,
    MessageType.FLOW_UNTAG,
    MessageType.VIP_ADVERT,
    MessageType.LOAD_REPORT,
}


def decodes_strictly(data: bytes) -> None:
    """Decoding either fails with WireError or yields a message that re-encodes to `data`."""
    try:
        message = decode(data)
    except WireError:
        return
    assert encode(message) == data


def _message(kind: MessageType, body: bytes) -> bytes:
    return b"MC\x01" + bytes([kind]) + b"\x02r1\x00\x00\x00\x07" + body


V4 = b"\x04\x0a\x00\x00\x01"
V4B = b"\x04\x0a\x00\x00\x02"
V6 = b"\x06" + IPv6Address("2001:db8::1").packed
A, B = IPv4Address("10.0.0.1"), IPv4Address("10.0.0.2")
C6 = IPv6Address("2001:db8::1")
FLOW = FlowKey(6, IPv4Address("198.51.100.9"), 40000, IPv4Address("203.0.113.80"), 80)
FLOW_BYTES = b"\x06\x04\xc6\x33\x64\x09\x9c\x40\x04\xcb\x00\x71\x50\x00\x50"


# --- round trips ------------------------------------------------------------------------


@given(messages)
def test_round_trip(message: ControlMessage) -> None:
    data = message.to_wire()
    assert data[:4] == b"MC\x01" + bytes([message.TYPE])
    decoded = decode(data)
    assert decoded == message and type(decoded) is type(message)
    assert encode(decoded) == data
    assert type(message).from_wire(data) == message


def test_every_vip_type_is_registered_and_exported() -> None:
    assert registered_types() >= VIP_TYPES
    assert {cls.TYPE for cls in get_args(ControlMessage)} >= VIP_TYPES
    for name in ("ServerHello", "LabelMapping", "Binding", "FlowKey", "FlowTag", "FlowUntag"):
        assert name in control.__all__
    for name in ("VipAdvert", "LoadReport", "MAX_BINDINGS", "MAX_FLOW_KEYS"):
        assert name in control.__all__


def test_layouts_are_byte_exact() -> None:
    mapping = LabelMapping.of("r1", 7, A, 3000, {C6: 17, B: 1 << 19, A: 16})
    assert mapping.bindings == (Binding(A, 16), Binding(B, 1 << 19), Binding(C6, 17))
    assert mapping.table() == {A: 16, B: 1 << 19, C6: 17}
    assert mapping.to_wire() == _message(
        MessageType.LABEL_MAPPING,
        V4
        + struct.pack("!IH", 3000, 3)
        + V4
        + struct.pack("!I", 16)
        + V4B
        + struct.pack("!I", 1 << 19)
        + V6
        + struct.pack("!I", 17),
    )
    assert FlowTag("r1", 7, FLOW, B, 30_000).to_wire() == _message(
        MessageType.FLOW_TAG,
        FLOW_BYTES + V4B + struct.pack("!I", 30_000),
    )
    assert LoadReport("r1", 7, A, 12.5, 3).to_wire() == _message(
        MessageType.LOAD_REPORT, V4 + struct.pack("!dI", 12.5, 3)
    )
    assert ServerHello("r1", 7, A, B, 900).to_wire() == _message(
        MessageType.SERVER_HELLO, V4 + V4B + struct.pack("!I", 900)
    )
    assert VipAdvert("r1", 7, B, A, 900).to_wire() == _message(
        MessageType.VIP_ADVERT, V4B + V4 + struct.pack("!I", 900)
    )
    assert FlowUntag("r1", 7, (FLOW,)).to_wire() == _message(
        MessageType.FLOW_UNTAG, b"\x00\x01" + FLOW_BYTES
    )


def test_empty_mapping_withdraws_all_and_friendly_inputs_are_normalised() -> None:
    empty = LabelMapping("r1", 1, A, 1, ())
    assert decode(empty.to_wire()) == empty and empty.table() == {}
    listed = LabelMapping("r1", 1, A, 1, [(A, 16), (B, 17)])  # type: ignore[arg-type]
    assert listed.bindings == (Binding(A, 16), Binding(B, 17))
    assert decode(listed.to_wire()) == listed
    untag = FlowUntag("r1", 1, [FLOW])  # type: ignore[arg-type]
    assert untag.flows == (FLOW,) and decode(untag.to_wire()) == untag


def test_largest_mapping_fits_one_datagram() -> None:
    table = {IPv6Address(int(C6) + i): FIRST_UNRESERVED + i for i in range(MAX_BINDINGS)}
    mapping = LabelMapping.of("𝄞" * 16, 1, C6, 1, table)
    data = mapping.to_wire()
    assert len(data) <= 0xFFFF - 8 - 40  # a UDP payload in an IPv6 packet
    assert decode(data) == mapping


# --- strictness -------------------------------------------------------------------------


@given(st.integers(14, 19), st.binary(max_size=200))
def test_random_bodies(kind: int, body: bytes) -> None:
    decodes_strictly(b"MC\x01" + bytes([kind, 2]) + b"r1" + body)


@given(messages)
def test_every_truncation_fails(message: ControlMessage) -> None:
    data = message.to_wire()
    for end in range(len(data)):
        with pytest.raises(WireError):
            decode(data[:end])
    with pytest.raises(WireError, match="trailing"):
        decode(data + b"\x00")


@given(messages, st.data())
def test_bit_flips(message: ControlMessage, data: st.DataObject) -> None:
    raw = message.to_wire()
    positions = list(range(len(raw) * 8))
    if len(positions) > 256:
        positions = data.draw(st.lists(st.sampled_from(positions), max_size=256))
    for bit in positions:
        flipped = bytearray(raw)
        flipped[bit // 8] ^= 1 << (bit % 8)
        decodes_strictly(bytes(flipped))


def _binding(address: bytes, label: int) -> bytes:
    return address + struct.pack("!I", label)


def _mapping(*bindings: bytes, count: int | None = None) -> bytes:
    n = len(bindings) if count is None else count
    return _message(
        MessageType.LABEL_MAPPING, V4 + struct.pack("!IH", 1000, n) + b"".join(bindings)
    )


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (_mapping(_binding(V4, 15)), "out of range 16..1048575"),
        (_mapping(_binding(V4, 3)), "out of range 16"),
        (_mapping(_binding(V4, 1 << 20)), "out of range"),
        (_mapping(_binding(V4B, 16), _binding(V4, 17)), "sorted by fec"),
        (_mapping(_binding(V6, 16), _binding(V4, 17)), "sorted by fec"),
        (_mapping(_binding(V4, 16), _binding(V4, 17)), "each once"),
        (_mapping(_binding(V4, 16), _binding(V4B, 16)), "label 16 bound to two fecs"),
        (_mapping(count=MAX_BINDINGS + 1), "at most 2048"),
        (_mapping(count=3), "3 bindings need at least 27 bytes"),
        (_mapping(_binding(b"\x05" + bytes(4), 16)), "family 5"),
        (
            _message(MessageType.LABEL_MAPPING, V4 + struct.pack("!IH", 0, 0)),
            "hold_ms 0",
        ),
        (_message(MessageType.SERVER_HELLO, V4 + V4B + bytes(4)), "hold_ms 0"),
        (_message(MessageType.VIP_ADVERT, V4 + V4B + bytes(4)), "hold_ms 0"),
        (
            _message(MessageType.FLOW_TAG, b"\x06" + V4 + b"\x00\x01" + V6 + b"\x00\x50" + V4B),
            "mix families",
        ),
        (_message(MessageType.FLOW_TAG, FLOW_BYTES + V4B + bytes(4)), "idle_ms 0"),
        (_message(MessageType.FLOW_UNTAG, b"\x00\x00"), "0 flows"),
        (_message(MessageType.FLOW_UNTAG, b"\x00\x02" + FLOW_BYTES * 2), "listed twice"),
        (_message(MessageType.FLOW_UNTAG, b"\x04\x01"), "at most 1024"),
        (_message(MessageType.FLOW_UNTAG, b"\x00\x02" + FLOW_BYTES), "need at least 30"),
        (
            _message(MessageType.LOAD_REPORT, V4 + struct.pack("!dI", -1.0, 0)),
            "load -1.0 must be finite and at least 0",
        ),
        (
            _message(MessageType.LOAD_REPORT, V4 + struct.pack("!dI", float("nan"), 0)),
            "finite",
        ),
        (
            _message(MessageType.LOAD_REPORT, V4 + struct.pack("!dI", float("inf"), 0)),
            "finite",
        ),
        (_message(MessageType.LOAD_REPORT, V4 + struct.pack("!d", 1.0)), "truncated"),
    ],
)
def test_message_errors(data: bytes, error: str) -> None:
    with pytest.raises(WireError, match=error):
        decode(data)


@pytest.mark.parametrize(
    "build",
    [
        lambda: ServerHello("r", 1, "10.0.0.1", B, 1),  # type: ignore[arg-type]
        lambda: ServerHello("r", 1, A, B, 0),
        lambda: ServerHello("r", 1, A, B, 1 << 32),
        lambda: LabelMapping("r", 1, A, 1, ((A, 16), (A, 17))),  # type: ignore[arg-type]
        lambda: LabelMapping("r", 1, A, 1, ((B, 16), (A, 17))),  # type: ignore[arg-type]
        lambda: LabelMapping("r", 1, A, 1, (Binding(A, FIRST_UNRESERVED - 1),)),
        lambda: LabelMapping("r", 1, A, 1, (Binding(A, True),)),  # type: ignore[arg-type]
        lambda: LabelMapping("r", 1, A, 1, (A,)),  # type: ignore[arg-type]
        lambda: LabelMapping("r", 1, A, 1, 5),  # type: ignore[arg-type]
        lambda: LabelMapping(
            "r", 1, A, 1, tuple(Binding(IPv4Address(i), 16 + i) for i in range(MAX_BINDINGS + 1))
        ),
        lambda: LabelMapping.of("r", 1, A, 1, {"10.0.0.1": 16}),  # type: ignore[dict-item]
        lambda: LabelMapping.of("r", 1, A, 1, {A: 16, B: 16}),
        lambda: FlowKey(256, A, 1, B, 2),
        lambda: FlowKey(6, A, 1 << 16, B, 2),
        lambda: FlowKey(6, A, 1, C6, 2),
        lambda: FlowKey(6, A, 1, "10.0.0.2", 2),  # type: ignore[arg-type]
        lambda: FlowTag("r", 1, (6, A, 1, B, 2), B, 1),  # type: ignore[arg-type]
        lambda: FlowTag("r", 1, FLOW, B, 0),
        lambda: FlowUntag("r", 1, ()),
        lambda: FlowUntag("r", 1, FLOW),  # type: ignore[arg-type]
        lambda: FlowUntag("r", 1, (FLOW, FLOW)),
        lambda: FlowUntag("r", 1, ((6, A, 1, B, 2),)),  # type: ignore[arg-type]
        lambda: FlowUntag("r", 1, tuple(FlowKey(6, A, p, B, 80) for p in range(MAX_FLOW_KEYS + 1))),
        lambda: VipAdvert("r", 1, A, B, 0),
        lambda: LoadReport("r", 1, A, -0.5, 0),
        lambda: LoadReport("r", 1, A, float("nan"), 0),
        lambda: LoadReport("r", 1, A, "1.0", 0),  # type: ignore[arg-type]
        lambda: LoadReport("r", 1, A, 1.0, -1),
        lambda: LoadReport("", 1, A, 1.0, 0),
    ],
)
def test_constructors_validate(build: object) -> None:
    assert callable(build)
    with pytest.raises(WireError):
        build()


def test_from_wire_checks_the_type() -> None:
    data = VipAdvert("r1", 1, B, A, 10).to_wire()
    assert VipAdvert.from_wire(data).router == A
    with pytest.raises(WireError, match="expected a ServerHello, got a VipAdvert"):
        ServerHello.from_wire(data)
