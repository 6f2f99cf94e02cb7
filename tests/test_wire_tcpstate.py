"""Kernel TCP state codec ("MCK1"), its signed transfer and reply: round trips, checks, garbage."""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from manycast.wire.errors import WireError
from manycast.wire.tcpstate import (
    MAGIC,
    NONCE_BYTES,
    StateTransfer,
    TcpState,
    TcpStateError,
    TransferReply,
    Window,
)

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
names = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=64
)


@st.composite
def tcp_states(draw: st.DrawFn) -> TcpState:
    """Every state the kernel's checks let through, as the codec demands."""
    version: Literal[4, 6] = draw(st.sampled_from([4, 6]))
    rcv_nxt = draw(u32)
    rcv_wnd = draw(u32)
    # rcv_wup at or before rcv_nxt; snd_wl1 at or before the receive window's end.
    rcv_wup = (rcv_nxt - draw(st.integers(0, (1 << 31) - 1))) & 0xFFFFFFFF
    snd_wl1 = (rcv_nxt + rcv_wnd - draw(st.integers(0, (1 << 31) - 1))) & 0xFFFFFFFF
    send_queue = draw(st.binary(max_size=300))
    timestamps = draw(st.booleans())
    return TcpState(
        local=(draw(st.ip_addresses(v=version)), draw(u16)),
        remote=(draw(st.ip_addresses(v=version)), draw(u16)),
        write_seq=draw(u32),
        unsent=draw(st.integers(0, len(send_queue))),
        send_queue=send_queue,
        rcv_nxt=rcv_nxt,
        recv_queue=draw(st.binary(max_size=300)),
        mss=draw(st.integers(1, 0xFFFF)),
        window=Window(snd_wl1, draw(u32), draw(u32), rcv_wnd, rcv_wup),
        sack=draw(st.booleans()),
        timestamps=timestamps,
        wscale=draw(st.none() | st.tuples(st.integers(0, 14), st.integers(0, 14))),
        timestamp=draw(u32) if timestamps else 0,
        app=draw(names),
        app_state=draw(st.binary(max_size=200)),
    )


transfers = st.builds(
    StateTransfer,
    sender=names,
    nonce=st.binary(min_size=NONCE_BYTES, max_size=NONCE_BYTES),
    issued_ms=st.integers(0, (1 << 64) - 1),
    states=st.lists(tcp_states(), min_size=1, max_size=3).map(tuple),
    signature=st.sampled_from([b"", bytes(range(64))]),
)
replies = st.builds(
    TransferReply,
    sender=names,
    nonce=st.binary(min_size=NONCE_BYTES, max_size=NONCE_BYTES),
    issued_ms=st.integers(0, (1 << 64) - 1),
    refused=st.lists(st.just("") | names, max_size=5).map(tuple),
    signature=st.sampled_from([b"", bytes(range(64))]),
)

SIMPLE = TcpState(
    local=(IPv4Address("203.0.113.80"), 7100),
    remote=(IPv4Address("10.1.0.2"), 40000),
    write_seq=5000,
    unsent=2,
    send_queue=b"hello",
    rcv_nxt=9000,
    recv_queue=b"abc",
    mss=1460,
    window=Window(snd_wl1=9000, snd_wnd=65535, max_window=65535, rcv_wnd=65536, rcv_wup=8990),
    timestamp=123456,
    app="echo",
    app_state=b"\x00" * 8,
)


# --- round trips ----------------------------------------------------------------------
@given(tcp_states())
@settings(max_examples=300)
def test_state_round_trip(state: TcpState) -> None:
    wire = state.to_wire()
    assert wire.startswith(MAGIC)
    back = TcpState.from_wire(wire)
    assert back == state
    assert back.to_wire() == wire


@given(transfers)
@settings(max_examples=100)
def test_transfer_round_trip(transfer: StateTransfer) -> None:
    wire = transfer.to_wire()
    back = StateTransfer.from_wire(wire)
    assert back == transfer and back.signature == transfer.signature
    assert back.to_wire() == wire
    # The signature covers every byte before it.
    assert wire == transfer.signed_bytes() + bytes([len(transfer.signature)]) + transfer.signature


@given(replies)
@settings(max_examples=100)
def test_reply_round_trip(reply: TransferReply) -> None:
    wire = reply.to_wire()
    back = TransferReply.from_wire(wire)
    assert back == reply and back.signature == reply.signature
    assert back.to_wire() == wire
    assert back.restored == sum(1 for r in reply.refused if not r)


def test_sequence_numbers_derived_from_the_queues() -> None:
    assert SIMPLE.snd_una == 4995 and SIMPLE.snd_nxt == 4998
    wrapped = dataclasses.replace(SIMPLE, write_seq=3, send_queue=b"12345", unsent=0)
    assert wrapped.snd_una == 0xFFFFFFFE and wrapped.snd_nxt == 3


def test_ipv6_state() -> None:
    state = dataclasses.replace(
        SIMPLE, local=(IPv6Address("2001:db8::80"), 7100), remote=(IPv6Address("2001:db8::2"), 1)
    )
    assert TcpState.from_wire(state.to_wire()) == state


# --- garbage and damage ---------------------------------------------------------------
DECODERS: list[Any] = [TcpState.from_wire, StateTransfer.from_wire, TransferReply.from_wire]


@pytest.mark.parametrize("decode", DECODERS)
@given(data=st.binary(max_size=400))
@settings(max_examples=300)
def test_garbage_raises_only_tcp_state_error(decode: Any, data: bytes) -> None:
    try:
        value = decode(data)
    except TcpStateError:
        return
    assert value.to_wire() == data


@given(tcp_states(), st.data())
@settings(max_examples=200)
def test_damaged_state_raises_or_reencodes(state: TcpState, data: st.DataObject) -> None:
    wire = bytearray(state.to_wire())
    at = data.draw(st.integers(0, len(wire) - 1))
    wire[at] = data.draw(st.integers(0, 255))
    try:
        value = TcpState.from_wire(bytes(wire))
    except TcpStateError:
        return
    assert value.to_wire() == bytes(wire)


@given(tcp_states())
@settings(max_examples=50)
def test_every_truncation_raises(state: TcpState) -> None:
    wire = state.to_wire()
    for end in range(len(wire)):
        with pytest.raises(TcpStateError):
            TcpState.from_wire(wire[:end])
    with pytest.raises(TcpStateError, match="trailing"):
        TcpState.from_wire(wire + b"\0")


@given(transfers, st.data())
@settings(max_examples=100)
def test_damaged_transfer_raises_or_reencodes(transfer: StateTransfer, data: st.DataObject) -> None:
    wire = bytearray(transfer.to_wire())
    at = data.draw(st.integers(0, len(wire) - 1))
    wire[at] ^= data.draw(st.integers(1, 255))
    try:
        value = StateTransfer.from_wire(bytes(wire))
    except TcpStateError:
        return
    assert value.to_wire() == bytes(wire)


def test_error_is_a_wire_error() -> None:
    assert issubclass(TcpStateError, WireError) and issubclass(TcpStateError, ValueError)


# --- the checks -----------------------------------------------------------------------
def _flags_at() -> int:
    return len(MAGIC)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"unsent": 6}, "unsent"),
        ({"mss": 0}, "mss"),
        ({"wscale": (15, 0)}, "window scale"),
        ({"timestamps": False}, "timestamp clock without timestamps"),
        ({"write_seq": 1 << 32}, "write_seq"),
        ({"app": ""}, "app name"),
        ({"app": "é"}, "app name"),
        ({"sack": 1}, "sack must be a bool"),
        ({"remote": (IPv6Address("::1"), 1)}, "different IP versions"),
        ({"local": ("203.0.113.80", 7100)}, "local"),
        (
            {"window": Window(9000, 1, 1, rcv_wnd=10, rcv_wup=9001)},
            "rcv_wup after rcv_nxt",
        ),
        (
            {"window": Window(9011, 1, 1, rcv_wnd=10, rcv_wup=9000)},
            "snd_wl1 after the receive window",
        ),
    ],
)
def test_state_checks(change: dict[str, Any], message: str) -> None:
    with pytest.raises(TcpStateError, match=message):
        dataclasses.replace(SIMPLE, **change)


def test_kernel_window_checks_wrap_around() -> None:
    # rcv_wup just before rcv_nxt across the 2**32 wrap is fine; just after is not.
    near = dataclasses.replace(
        SIMPLE, rcv_nxt=5, window=Window(5, 1, 1, rcv_wnd=0, rcv_wup=0xFFFFFFF0)
    )
    assert TcpState.from_wire(near.to_wire()) == near
    with pytest.raises(TcpStateError, match="rcv_wup"):
        dataclasses.replace(SIMPLE, rcv_nxt=0xFFFFFFF0, window=Window(0xFFFFFFF0, 1, 1, 0, 5))


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (0, ord("X"), "magic"),
        (_flags_at(), 0x08, "unknown flags"),
        (_flags_at() + 1, 5, "address of 5 bytes"),
    ],
)
def test_bad_bytes(offset: int, value: int, message: str) -> None:
    wire = bytearray(SIMPLE.to_wire())
    wire[offset] = value
    with pytest.raises(TcpStateError, match=message):
        TcpState.from_wire(bytes(wire))


def test_window_scales_without_the_flag_are_refused() -> None:
    wire = bytearray(dataclasses.replace(SIMPLE, wscale=None).to_wire())
    # mss (u16) then the two scales follow the receive queue.
    at = wire.index(b"abc") + 3 + 2
    assert wire[at : at + 2] == b"\0\0"
    wire[at] = 3
    with pytest.raises(TcpStateError, match="window scales without window scaling"):
        TcpState.from_wire(bytes(wire))


def test_envelope_checks() -> None:
    nonce = bytes(NONCE_BYTES)
    with pytest.raises(TcpStateError, match="nonce"):
        StateTransfer("s1", b"short", 0, (SIMPLE,))
    with pytest.raises(TcpStateError, match="states"):
        StateTransfer("s1", nonce, 0, ())
    with pytest.raises(TcpStateError, match="signature"):
        StateTransfer("s1", nonce, 0, (SIMPLE,), b"x" * 10)
    with pytest.raises(TcpStateError, match="sender"):
        TransferReply("", nonce, 0, ())
    with pytest.raises(TcpStateError, match="refusal"):
        TransferReply("s1", nonce, 0, ("\n",))
    wire = bytearray(StateTransfer("s1", nonce, 0, (SIMPLE,), bytes(64)).to_wire())
    wire[-65] = 10  # the signature's length byte
    with pytest.raises(TcpStateError, match="signature of 10 bytes"):
        StateTransfer.from_wire(bytes(wire))


def test_signature_is_not_part_of_equality_nor_of_the_signed_bytes() -> None:
    nonce = bytes(range(NONCE_BYTES))
    unsigned = StateTransfer("s1", nonce, 7, (SIMPLE,))
    signed = dataclasses.replace(unsigned, signature=bytes(64))
    assert unsigned == signed
    assert unsigned.signed_bytes() == signed.signed_bytes()
    assert unsigned.to_wire() != signed.to_wire()
