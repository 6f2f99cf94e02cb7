"""The session-state format ("MCS1"): one connection's transport state, moved between servers.

Technique R3 (seed Fig 15) continues a connection on another server: the old
owner exports its transport state, a `StateReply` carries the bytes, and the new
owner imports them. `SessionState` is those bytes as an immutable value; the
connection machine (`manycast.protocol.tcp`) builds one to export and starts
from one to import. Segments and events not yet drained are not part of it, nor
are timers: the importer arms them afresh.

Layout, big-endian:

    magic "MCS1" (the 1 is the format version)
    u8 state (State value, not CLOSED)
    u8 flags: 1 tag+cookie, 2 destination, 4 irs known, 8 close requested,
              16 FIN sent, 32 peer FIN seen, 64 RTT measured; bit 7 zero
    local address, remote address: u8 length (4|16), address, u16 port
    [u32 tag, u64 cookie] [destination address]
    u32 iss; u64 snd_una-iss, snd_nxt-iss, sndbuf_seq-iss; u16 snd_wnd;
    u64 snd_wl2-iss; u16 peer mss; u32 length + unacknowledged/unsent data
    [u32 irs; u64 rcv_nxt-irs, snd_wl1-irs; [u64 peer_fin-irs];
     u16 count, then per out-of-order block in increasing order:
     u64 seq-irs, u16 length, data]
    [f64 srtt, f64 rttvar] f64 rto, u8 retries

Sequence numbers are unbounded integers here, as in the connection machine;
the format stores them as offsets from the initial sequence numbers, which
keeps them exact. Strictness as for every codec: the fields must agree with
each other (the state with the FINs, the sequence numbers with the state), a
decoder accepts only bytes that re-encode identically, and both a bad value and
bad bytes raise `WireError`.
"""

from __future__ import annotations

import enum
import ipaddress
import math
from dataclasses import dataclass

from manycast.wire.cursor import Reader, Writer
from manycast.wire.errors import WireError
from manycast.wire.transport import IPAddress

MAGIC = b"MCS1"

_U8 = 0xFF
_U16 = 0xFFFF
_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1
_FLAG_TAG, _FLAG_DEST, _FLAG_IRS, _FLAG_CLOSE, _FLAG_FIN, _FLAG_PEER_FIN, _FLAG_RTT = (
    1 << i for i in range(7)
)
_WHAT = "session state"


class State(enum.Enum):
    """The connection states of RFC 9293 (LISTEN lives in the demultiplexer)."""

    CLOSED = 0
    SYN_SENT = 1
    SYN_RCVD = 2
    ESTABLISHED = 3
    FIN_WAIT_1 = 4
    FIN_WAIT_2 = 5
    CLOSE_WAIT = 6
    CLOSING = 7
    LAST_ACK = 8
    TIME_WAIT = 9


# The states after our close (the FIN may still wait behind data the window holds
# back), those where it is sent and acknowledged, and those where the peer's FIN
# was taken in.
_CLOSED_BY_US = frozenset(
    {State.FIN_WAIT_1, State.FIN_WAIT_2, State.CLOSING, State.LAST_ACK, State.TIME_WAIT}
)
_FIN_ACKED = frozenset({State.FIN_WAIT_2, State.TIME_WAIT})
_PEER_FIN_TAKEN = frozenset({State.CLOSE_WAIT, State.CLOSING, State.LAST_ACK, State.TIME_WAIT})


def _fail(problem: str) -> WireError:
    return WireError(f"{_WHAT}: {problem}")


def _check_uint(name: str, value: object, top: int, low: int = 0) -> None:
    # bool is an int subclass, but True for a sequence number is a caller's mistake.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(f"{name} must be an int, not {type(value).__name__}")
    if not low <= value <= top:
        raise _fail(f"{name} {value} out of range {low}..{top}")


def _check_offset(name: str, value: int, base: int, low: int = 0) -> None:
    """`value` must lie `low`..2**64-1 after `base`: the format stores the difference."""
    _check_uint(name, value, base + _U64, base + low)


def _check_time(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, float | int):
        raise _fail(f"{name} must be a float, not {type(value).__name__}")
    if not (math.isfinite(value) and value >= 0):
        raise _fail(f"{name} {value} is not a finite non-negative time")


def _check_socket(name: str, value: object) -> None:
    if not (
        isinstance(value, tuple)
        and len(value) == 2
        and isinstance(value[0], ipaddress.IPv4Address | ipaddress.IPv6Address)
    ):
        raise _fail(f"{name} must be an (address, port) pair, not {value!r}")
    _check_uint(f"{name} port", value[1], _U16)


def _bytes(name: str, value: object, top: int) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise _fail(f"{name} must be bytes, not {type(value).__name__}")
    if len(value) > top:
        raise _fail(f"{name} of {len(value)} bytes, at most {top}")
    return bytes(value)


def _write_socket(w: Writer, value: tuple[IPAddress, int]) -> None:
    w.u8(len(value[0].packed)).bytes(value[0].packed).u16(value[1])


def _read_socket(r: Reader, name: str) -> tuple[IPAddress, int]:
    length = r.u8(f"{name} address length")
    if length not in (4, 16):
        raise _fail(f"{name} address of {length} bytes")
    raw = r.bytes(length, f"{name} address")
    ip: IPAddress = ipaddress.IPv4Address(raw) if length == 4 else ipaddress.IPv6Address(raw)
    return ip, r.u16(f"{name} port")


def _read_time(r: Reader, name: str) -> float:
    value = r.f64(name)
    _check_time(name, value)
    return value


@dataclass(frozen=True, slots=True)
class ReceiveState:
    """What a connection knows once the peer's SYN arrived.

    `out_of_order` holds data received beyond `rcv_nxt` as (sequence number,
    data) blocks in increasing order; blocks may overlap."""

    irs: int
    rcv_nxt: int
    snd_wl1: int
    peer_fin: int | None = None
    out_of_order: tuple[tuple[int, bytes], ...] = ()

    def __post_init__(self) -> None:
        _check_uint("irs", self.irs, _U32)
        irs = self.irs
        _check_offset("rcv_nxt", self.rcv_nxt, irs, low=1)  # past the peer's SYN
        _check_offset("snd_wl1", self.snd_wl1, irs)
        if self.peer_fin is not None:
            _check_offset("peer fin", self.peer_fin, irs)
            if self.peer_fin + 1 < self.rcv_nxt:
                raise _fail("peer FIN before the receive point")
        blocks: object = self.out_of_order
        if not isinstance(blocks, tuple | list):
            raise _fail(f"out-of-order blocks must be a sequence, not {blocks!r}")
        if len(blocks) > _U16:
            raise _fail(f"{len(blocks)} out-of-order blocks, at most {_U16}")
        checked = []
        previous = self.rcv_nxt
        for i, block in enumerate(blocks):
            if not (isinstance(block, tuple) and len(block) == 2):
                raise _fail(f"out-of-order block {i} must be a (start, data) pair")
            start, data = block
            _check_offset(f"out-of-order {i} start", start, irs)
            data = _bytes(f"out-of-order {i} data", data, _U16)
            if start <= previous or not data:
                raise _fail(f"out-of-order block {i} is misplaced")
            previous = start
            checked.append((start, data))
        object.__setattr__(self, "out_of_order", tuple(checked))


@dataclass(frozen=True, slots=True)
class SessionState:
    """One connection's transport state (RFC 9293 names; sequence numbers unbounded).

    `sndbuf_seq` is the sequence number of the first byte of `send_buffer`, the
    data given to the connection and not yet acknowledged; `tag` and `cookie`
    (seed Fig 20) come together or not at all; `srtt` is None until the first
    round-trip sample, and `rttvar` is 0 until then."""

    state: State
    local: tuple[IPAddress, int]
    remote: tuple[IPAddress, int]
    iss: int
    snd_una: int
    snd_nxt: int
    sndbuf_seq: int
    snd_wnd: int
    snd_wl2: int
    peer_mss: int
    send_buffer: bytes
    rto: float
    tag: int | None = None
    cookie: int | None = None
    destination: tuple[IPAddress, int] | None = None
    close_requested: bool = False
    fin_sent: bool = False
    receive: ReceiveState | None = None
    srtt: float | None = None
    rttvar: float = 0.0
    retries: int = 0

    def __post_init__(self) -> None:
        state = self.state
        if not isinstance(state, State):
            raise _fail(f"state must be a State, not {state!r}")
        if state is State.CLOSED:
            raise _fail("a closed connection has no state to move")
        _check_socket("local", self.local)
        _check_socket("remote", self.remote)
        if self.local[0].version != self.remote[0].version:
            raise _fail("local and remote addresses of different IP versions")
        if self.destination is not None:
            _check_socket("destination", self.destination)
        if (self.tag is None) != (self.cookie is None):
            raise _fail("a tag without a cookie or a cookie without a tag")
        if self.tag is not None:
            _check_uint("tag", self.tag, _U32)
            _check_uint("cookie", self.cookie, _U64)
        for name in ("close_requested", "fin_sent"):
            if not isinstance(getattr(self, name), bool):
                raise _fail(f"{name} must be a bool")
        self._check_send()
        receive = self.receive
        if receive is not None and not isinstance(receive, ReceiveState):
            raise _fail(f"receive must be a ReceiveState, not {receive!r}")
        if receive is None and state is not State.SYN_SENT:
            raise _fail(f"{state.name} needs the peer's sequence number")
        if (state is State.SYN_SENT) != (self.snd_una == self.iss and receive is None):
            raise _fail(f"sequence numbers do not fit state {state.name}")
        self._check_close_state()
        if self.srtt is None:
            if self.rttvar != 0:
                raise _fail("an RTT variance without a smoothed RTT")
        else:
            _check_time("srtt", self.srtt)
            _check_time("rttvar", self.rttvar)
        _check_time("rto", self.rto)
        _check_uint("retries", self.retries, _U8)

    def _check_send(self) -> None:
        _check_uint("iss", self.iss, _U32)
        iss = self.iss
        for name in ("snd_una", "snd_nxt", "sndbuf_seq", "snd_wl2"):
            _check_offset(name, getattr(self, name), iss)
        _check_uint("snd_wnd", self.snd_wnd, _U16)
        _check_uint("peer mss", self.peer_mss, _U16, low=1)
        object.__setattr__(self, "send_buffer", _bytes("send buffer", self.send_buffer, _U32))
        data_end = self.sndbuf_seq + len(self.send_buffer)
        if not (
            iss <= self.snd_una <= self.snd_nxt <= data_end + (1 if self.fin_sent else 0)
            and (self.sndbuf_seq == max(iss + 1, self.snd_una) or self._fin_acked)
        ):
            raise _fail("inconsistent send sequence numbers")
        if self.fin_sent and not self.close_requested:
            raise _fail("FIN sent without a close")
        if self.state is State.SYN_SENT and self.tag is None:
            raise _fail("SYN_SENT without the tag and cookie of its SYN")

    @property
    def _fin_acked(self) -> bool:
        data_end = self.sndbuf_seq + len(self.send_buffer)
        return self.fin_sent and not self.send_buffer and self.snd_una == data_end + 1

    def _check_close_state(self) -> None:
        """The state must agree with the FINs: an imported connection that says
        FIN_WAIT_2 with its FIN unacknowledged would fail on the next segment."""
        state = self.state
        if self.fin_sent and state not in _CLOSED_BY_US:
            raise _fail(f"{state.name} does not fit the FIN-sent flag")
        if state in _CLOSED_BY_US and not self.close_requested:
            raise _fail(f"{state.name} without a close")
        if state in _CLOSED_BY_US and self._fin_acked != (state in _FIN_ACKED):
            raise _fail(f"{state.name} does not fit the FIN's acknowledgement")
        # A peer FIN may be known ahead of a gap in any state; it is taken in exactly in
        # the states that follow it.
        receive = self.receive
        taken_in = (
            receive is not None
            and receive.peer_fin is not None
            and receive.rcv_nxt == receive.peer_fin + 1
        )
        if taken_in != (state in _PEER_FIN_TAKEN):
            raise _fail(f"{state.name} does not fit the peer's FIN")

    def to_wire(self) -> bytes:
        receive = self.receive
        flags = (
            (_FLAG_TAG if self.tag is not None else 0)
            | (_FLAG_DEST if self.destination is not None else 0)
            | (_FLAG_IRS if receive is not None else 0)
            | (_FLAG_CLOSE if self.close_requested else 0)
            | (_FLAG_FIN if self.fin_sent else 0)
            | (_FLAG_PEER_FIN if receive is not None and receive.peer_fin is not None else 0)
            | (_FLAG_RTT if self.srtt is not None else 0)
        )
        w = Writer().bytes(MAGIC).u8(self.state.value).u8(flags)
        _write_socket(w, self.local)
        _write_socket(w, self.remote)
        if self.tag is not None and self.cookie is not None:
            w.u32(self.tag).u64(self.cookie)
        if self.destination is not None:
            _write_socket(w, self.destination)
        iss = self.iss
        w.u32(iss).u64(self.snd_una - iss).u64(self.snd_nxt - iss).u64(self.sndbuf_seq - iss)
        w.u16(self.snd_wnd).u64(self.snd_wl2 - iss).u16(self.peer_mss)
        w.u32(len(self.send_buffer)).bytes(self.send_buffer)
        if receive is not None:
            irs = receive.irs
            w.u32(irs).u64(receive.rcv_nxt - irs).u64(receive.snd_wl1 - irs)
            if receive.peer_fin is not None:
                w.u64(receive.peer_fin - irs)
            w.u16(len(receive.out_of_order))
            for start, data in receive.out_of_order:
                w.u64(start - irs).u16(len(data)).bytes(data)
        if self.srtt is not None:
            w.f64(self.srtt).f64(self.rttvar)
        w.f64(self.rto).u8(self.retries)
        return w.getvalue()

    @classmethod
    def from_wire(cls, data: bytes | bytearray | memoryview) -> SessionState:
        r = Reader(data, _WHAT)
        if r.bytes(len(MAGIC), "magic") != MAGIC:
            raise _fail("bad magic or unsupported version")
        value = r.u8("state")
        try:
            state = State(value)
        except ValueError:
            raise _fail(f"unknown state {value}") from None
        flags = r.u8("flags")
        if flags >> 7:
            raise _fail(f"unknown flags {flags:#x}")
        local = _read_socket(r, "local")
        remote = _read_socket(r, "remote")
        tag: int | None = None
        cookie: int | None = None
        if flags & _FLAG_TAG:
            tag, cookie = r.u32("tag"), r.u64("cookie")
        destination = _read_socket(r, "destination") if flags & _FLAG_DEST else None
        iss = r.u32("iss")
        snd_una = iss + r.u64("snd_una")
        snd_nxt = iss + r.u64("snd_nxt")
        sndbuf_seq = iss + r.u64("send buffer start")
        snd_wnd = r.u16("snd_wnd")
        snd_wl2 = iss + r.u64("snd_wl2")
        peer_mss = r.u16("peer mss")
        send_buffer = r.bytes(r.u32("send buffer length"), "send buffer")
        receive: ReceiveState | None = None
        if flags & _FLAG_IRS:
            receive = cls._read_receive(r, flags)
        elif flags & _FLAG_PEER_FIN:
            raise _fail("a peer FIN without the peer's sequence number")
        srtt: float | None = None
        rttvar = 0.0
        if flags & _FLAG_RTT:
            srtt, rttvar = _read_time(r, "srtt"), _read_time(r, "rttvar")
        rto = _read_time(r, "rto")
        retries = r.u8("retries")
        r.expect_end()
        return cls(
            state,
            local,
            remote,
            iss,
            snd_una,
            snd_nxt,
            sndbuf_seq,
            snd_wnd,
            snd_wl2,
            peer_mss,
            send_buffer,
            rto,
            tag,
            cookie,
            destination,
            bool(flags & _FLAG_CLOSE),
            bool(flags & _FLAG_FIN),
            receive,
            srtt,
            rttvar,
            retries,
        )

    @staticmethod
    def _read_receive(r: Reader, flags: int) -> ReceiveState:
        irs = r.u32("irs")
        rcv_nxt = irs + r.u64("rcv_nxt")
        snd_wl1 = irs + r.u64("snd_wl1")
        peer_fin = irs + r.u64("peer fin") if flags & _FLAG_PEER_FIN else None
        blocks = []
        for i in range(r.u16("out-of-order count")):
            start = irs + r.u64(f"out-of-order {i} start")
            blocks.append((start, r.bytes(r.u16(f"out-of-order {i} length"), f"out-of-order {i}")))
        return ReceiveState(irs, rcv_nxt, snd_wl1, peer_fin, tuple(blocks))


__all__ = ["MAGIC", "ReceiveState", "SessionState", "State"]
