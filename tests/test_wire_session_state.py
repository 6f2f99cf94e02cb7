"""Session-state codec ("MCS1"): round trips, strictness under garbage, the checks it makes."""

from __future__ import annotations

import contextlib
import dataclasses
import random
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Literal

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from manycast.protocol.tcp import Connection, SessionConfig
from manycast.wire.errors import WireError
from manycast.wire.session_state import MAGIC, ReceiveState, SessionState, State

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)
# Offsets from an initial sequence number: mostly small, sometimes near the top of
# the u64 the format stores them in (halved, so sums of two stay in range).
offsets = st.one_of(st.integers(0, 100_000), st.integers(0, (1 << 63) - 1))
times = st.floats(min_value=0, allow_nan=False, allow_infinity=False)

CLOSED_BY_US = {State.FIN_WAIT_1, State.FIN_WAIT_2, State.CLOSING, State.LAST_ACK, State.TIME_WAIT}
FIN_ACKED = {State.FIN_WAIT_2, State.TIME_WAIT}
PEER_FIN_TAKEN = {State.CLOSE_WAIT, State.CLOSING, State.LAST_ACK, State.TIME_WAIT}
OPEN_STATES = [s for s in State if s is not State.CLOSED]


@st.composite
def receive_states(draw: st.DrawFn, state: State) -> ReceiveState:
    irs = draw(u32)
    rcv_nxt = irs + 1 + draw(offsets)
    if state in PEER_FIN_TAKEN:
        peer_fin: int | None = rcv_nxt - 1
    else:  # not seen, or seen ahead of a gap
        peer_fin = draw(st.none() | st.integers(rcv_nxt, rcv_nxt + 100_000))
    starts = draw(st.lists(st.integers(rcv_nxt + 1, rcv_nxt + 200_000), max_size=4, unique=True))
    blocks = tuple((start, draw(st.binary(min_size=1, max_size=40))) for start in sorted(starts))
    return ReceiveState(irs, rcv_nxt, irs + draw(offsets), peer_fin, blocks)


@st.composite
def session_states(draw: st.DrawFn) -> SessionState:
    """Every state the format can carry, consistent as the codec demands."""
    state = draw(st.sampled_from(OPEN_STATES))
    version: Literal[4, 6] = draw(st.sampled_from([4, 6]))
    local = (draw(st.ip_addresses(v=version)), draw(u16))
    remote = (draw(st.ip_addresses(v=version)), draw(u16))
    destination = draw(st.none() | st.tuples(st.ip_addresses(), u16))
    tagged = state is State.SYN_SENT or draw(st.booleans())
    tag, cookie = (draw(u32), draw(u64)) if tagged else (None, None)
    iss = draw(u32)
    # After our close the FIN may still wait behind data; it is acknowledged in FIN_ACKED.
    fin_sent = state in FIN_ACKED or (state in CLOSED_BY_US and draw(st.booleans()))
    close_requested = state in CLOSED_BY_US or draw(st.booleans())
    if state in FIN_ACKED:  # everything sent and acknowledged, the FIN too
        buffer = b""
        sndbuf_seq = iss + 1 + draw(offsets)
        snd_una = snd_nxt = sndbuf_seq + 1
    else:
        buffer = draw(st.binary(max_size=64))
        snd_una = iss if state is State.SYN_SENT else iss + draw(offsets)
        sndbuf_seq = max(iss + 1, snd_una)
        data_end = sndbuf_seq + len(buffer)
        snd_nxt = draw(st.integers(snd_una, data_end + fin_sent))
    receive = None if state is State.SYN_SENT else draw(receive_states(state))
    measured = draw(st.booleans())
    return SessionState(
        state=state,
        local=local,
        remote=remote,
        iss=iss,
        snd_una=snd_una,
        snd_nxt=snd_nxt,
        sndbuf_seq=sndbuf_seq,
        snd_wnd=draw(u16),
        snd_wl2=iss + draw(offsets),
        peer_mss=draw(st.integers(1, 0xFFFF)),
        send_buffer=buffer,
        rto=draw(times),
        tag=tag,
        cookie=cookie,
        destination=destination,
        close_requested=close_requested,
        fin_sent=fin_sent,
        receive=receive,
        srtt=draw(times) if measured else None,
        rttvar=draw(times) if measured else 0.0,
        retries=draw(u8),
    )


SIMPLE = SessionState(
    state=State.ESTABLISHED,
    local=(IPv4Address("233.252.0.1"), 80),
    remote=(IPv4Address("198.51.100.10"), 40000),
    iss=1000,
    snd_una=1001,
    snd_nxt=1004,
    sndbuf_seq=1001,
    snd_wnd=65535,
    snd_wl2=1001,
    peer_mss=1200,
    send_buffer=b"abc",
    rto=1.0,
    tag=7,
    cookie=9,
    receive=ReceiveState(5000, 5001, 5000, None, ((5010, b"late"),)),
    srtt=0.1,
    rttvar=0.05,
)


# --- round trips ----------------------------------------------------------------------


@given(session_states())
@example(SIMPLE)
def test_round_trip(state: SessionState) -> None:
    data = state.to_wire()
    assert data.startswith(MAGIC)
    decoded = SessionState.from_wire(data)
    assert decoded == state
    assert decoded.to_wire() == data


@given(session_states())
def test_a_connection_carries_every_field(state: SessionState) -> None:
    config = SessionConfig()
    conn = Connection.from_session_state(state, 100.0, random.Random(0), config)
    # The importer keeps the RTO within its own bounds; everything else is taken as is.
    rto = min(max(state.rto, config.rto_min), config.rto_max)
    assert conn.session_state() == dataclasses.replace(state, rto=rto)


def test_ipv6_and_destination() -> None:
    state = dataclasses.replace(
        SIMPLE,
        local=(IPv6Address("2001:db8:ff::1"), 80),
        remote=(IPv6Address("2001:db8:1::10"), 40000),
        destination=(IPv4Address("192.0.2.20"), 8080),
    )
    assert SessionState.from_wire(state.to_wire()) == state


# --- strictness -----------------------------------------------------------------------


def decodes_canonically(data: bytes) -> None:
    """`data` decodes to a state that re-encodes to exactly `data`, or raises WireError."""
    try:
        state = SessionState.from_wire(data)
    except WireError:
        return
    assert state.to_wire() == data


@given(st.binary(max_size=200))
def test_garbage_raises_only_wire_error(data: bytes) -> None:
    for candidate in (data, MAGIC + data, SIMPLE.to_wire()[:40] + data):
        decodes_canonically(candidate)


@settings(max_examples=50)
@given(session_states(), st.data())
def test_mutations_raise_only_wire_error(state: SessionState, data: st.DataObject) -> None:
    wire = bytearray(state.to_wire())
    for _ in range(20):
        mutated = bytearray(wire)
        index = data.draw(st.integers(0, len(wire) - 1))
        mutated[index] ^= data.draw(st.integers(1, 255))
        decodes_canonically(bytes(mutated))
    for cut in range(len(wire)):
        with pytest.raises(WireError):
            SessionState.from_wire(bytes(wire[:cut]))
    with pytest.raises(WireError, match="trailing"):
        SessionState.from_wire(bytes(wire) + b"\0")


def test_flags_and_magic_are_checked() -> None:
    wire = SIMPLE.to_wire()
    with pytest.raises(WireError, match="magic"):
        SessionState.from_wire(b"MCS2" + wire[4:])
    with pytest.raises(WireError, match="unknown state 10"):
        SessionState.from_wire(wire[:4] + b"\x0a" + wire[5:])
    with pytest.raises(WireError, match="closed"):
        SessionState.from_wire(wire[:4] + b"\x00" + wire[5:])
    with pytest.raises(WireError, match="unknown flags"):
        SessionState.from_wire(wire[:5] + bytes([wire[5] | 0x80]) + wire[6:])
    syn_sent = dataclasses.replace(
        SIMPLE, state=State.SYN_SENT, snd_una=1000, snd_nxt=1001, receive=None, srtt=None,
        rttvar=0.0,
    )  # fmt: skip
    raw = syn_sent.to_wire()
    with pytest.raises(WireError, match="peer FIN without"):
        SessionState.from_wire(raw[:5] + bytes([raw[5] | 0x20]) + raw[6:])


def test_out_of_order_blocks_must_be_in_order() -> None:
    # The encoder writes them in increasing order; any other order would decode to a
    # state that re-encodes differently.
    state = dataclasses.replace(
        SIMPLE, receive=ReceiveState(5000, 5001, 5000, None, ((5010, b"a"), (5020, b"b")))
    )
    wire = state.to_wire()
    tail = 8 + 8 + 8 + 1  # srtt, rttvar, rto, retries
    first, second = wire[-tail - 22 : -tail - 11], wire[-tail - 11 : -tail]
    swapped = wire[: -tail - 22] + second + first + wire[-tail:]
    with pytest.raises(WireError, match="block 1 is misplaced"):
        SessionState.from_wire(swapped)
    for blocks in (
        ((5020, b"b"), (5010, b"a")),
        ((5001, b"x"),),
        ((5010, b""),),
        ((5010, b"a"), (5010, b"b")),
    ):
        with pytest.raises(WireError, match="misplaced"):
            ReceiveState(5000, 5001, 5000, None, blocks)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"tag": None}, "tag without a cookie"),
        ({"srtt": None}, "RTT variance without"),
        ({"rto": float("nan")}, "rto"),
        ({"retries": 256}, "retries"),
        ({"peer_mss": 0}, "peer mss"),
        ({"snd_una": 999}, "snd_una"),
        ({"sndbuf_seq": 1002}, "inconsistent send"),
        ({"fin_sent": True}, "FIN sent without a close"),
        ({"fin_sent": True, "close_requested": True}, "ESTABLISHED does not fit the FIN-sent"),
        ({"state": State.FIN_WAIT_1}, "FIN_WAIT_1 without a close"),
        ({"state": State.FIN_WAIT_2, "close_requested": True}, "FIN's acknowledgement"),
        ({"state": State.CLOSE_WAIT}, "peer's FIN"),
        ({"receive": None}, "needs the peer's sequence number"),
        ({"remote": (IPv6Address("::1"), 1)}, "different IP versions"),
        ({"local": ("233.252.0.1", 80)}, "local"),
        ({"send_buffer": "abc"}, "send buffer"),
        ({"state": 3}, "state"),
        ({"iss": True}, "iss"),
    ],
)
def test_invalid_values_are_refused(change: dict[str, Any], match: str) -> None:
    with pytest.raises(WireError, match=match):
        dataclasses.replace(SIMPLE, **change)


def test_constructor_garbage_raises_only_wire_error() -> None:
    rng = random.Random(5)
    junk: list[object] = [None, -1, 0, 2**70, 1.5, "x", b"x", (1, 2), True, float("inf")]
    names = [f.name for f in dataclasses.fields(SessionState)]
    for _ in range(2000):
        change: dict[str, Any] = {
            name: rng.choice(junk) for name in rng.sample(names, rng.randint(1, 3))
        }
        with contextlib.suppress(WireError):
            dataclasses.replace(SIMPLE, **change)
