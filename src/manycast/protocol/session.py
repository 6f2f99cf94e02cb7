"""The manycast session transport: a TCP-like connection as a sans-I/O state machine.

A `Connection` is one connection's state machine; an `Endpoint` demultiplexes
the segments of many connections of one host by 4-tuple.  Neither touches a
socket or a clock: every entry point takes `now` (seconds), randomness comes
from the `random.Random` given to the constructor, and effects come back as
data (`segments_to_send()`, `events()`, `next_deadline()`).

The transport is deliberately plain TCP (RFC 9293) where manycast needs
nothing else: cumulative ACKs, a fixed receive window, retransmission on an
RFC 6298 timer with exponential backoff, fast retransmit on three duplicate
ACKs, RFC 5961 checks on RST and SYN, RFC 1337 TIME_WAIT.  No congestion
control, no SACK, no timestamps, no window scaling, no delayed ACKs, no
simultaneous open, no urgent data.  Departures, each explained where it is
made: `close()` before the handshake completes waits for it; an ACK of new
data drops the RTO backoff; FIN_WAIT_2 ends after an idle time.

What manycast adds (seed Fig 12-15, 20-21):
- the client's SYN carries TAG_COOKIE, the server echoes it on the SYN-ACK
  (with a DESTINATION when it has one to give) and the client drops a SYN-ACK
  whose echo does not match;
- a connection's whole transport state can be exported on one server and
  imported on another, which then continues it (technique R3);
- an endpoint never answers a segment for a 4-tuple it does not know: it
  reports `UnknownSegment` and its owner resets it (R1), forwards it (R2) or
  fetches the state and adopts the connection (R3);
- a segment marked CHANGE_DESTINATION carries a `ChangeDestination` message
  outside the byte stream; the connection checks tag and cookie and reports
  it, and its owner checks the signature.

Sequence numbers are kept internally as unbounded integers (the wire value is
the low 32 bits), so comparisons need no modular arithmetic.
"""

from __future__ import annotations

import enum
import heapq
import ipaddress
import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from manycast.wire.cursor import Reader, Writer
from manycast.wire.errors import WireError
from manycast.wire.transport import (
    MAX_OPTIONS_LEN,
    ChangeDestination,
    ChangeDestinationMark,
    Destination,
    IPAddress,
    Mss,
    TagCookie,
    TcpFlags,
    TcpOption,
    TcpSegment,
)

Address = tuple[IPAddress, int]
ConnKey = tuple[Address, Address]  # (local, remote)

_MOD = 1 << 32
_HALF = 1 << 31
_F = TcpFlags


def _unwrap(wire: int, ref: int) -> int:
    """The unbounded sequence number nearest `ref` whose low 32 bits are `wire`."""
    return ref + ((wire - ref + _HALF) % _MOD) - _HALF


class SessionError(Exception):
    """A call that the connection's (or endpoint's) current state does not allow."""


class State(enum.Enum):
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


class _Input(enum.Enum):
    CONNECT = enum.auto()
    ACCEPT = enum.auto()  # a SYN handed over by a listener (LISTEN lives in the Endpoint)
    SYN_ACK = enum.auto()
    ACK_OF_SYN = enum.auto()
    CLOSE = enum.auto()
    FIN = enum.auto()
    FIN_ACKED = enum.auto()
    EXPIRE = enum.auto()


# Reset, abort and the retry limit take any state to CLOSED; everything else is here.
_TRANSITIONS: dict[tuple[State, _Input], State] = {
    (State.CLOSED, _Input.CONNECT): State.SYN_SENT,
    (State.CLOSED, _Input.ACCEPT): State.SYN_RCVD,
    (State.SYN_SENT, _Input.SYN_ACK): State.ESTABLISHED,
    (State.SYN_RCVD, _Input.ACK_OF_SYN): State.ESTABLISHED,
    (State.SYN_RCVD, _Input.CLOSE): State.FIN_WAIT_1,
    (State.ESTABLISHED, _Input.CLOSE): State.FIN_WAIT_1,
    (State.ESTABLISHED, _Input.FIN): State.CLOSE_WAIT,
    (State.FIN_WAIT_1, _Input.FIN_ACKED): State.FIN_WAIT_2,
    (State.FIN_WAIT_1, _Input.FIN): State.CLOSING,
    (State.FIN_WAIT_2, _Input.FIN): State.TIME_WAIT,
    (State.FIN_WAIT_2, _Input.EXPIRE): State.CLOSED,
    (State.CLOSING, _Input.FIN_ACKED): State.TIME_WAIT,
    (State.CLOSE_WAIT, _Input.CLOSE): State.LAST_ACK,
    (State.LAST_ACK, _Input.FIN_ACKED): State.CLOSED,
    (State.TIME_WAIT, _Input.EXPIRE): State.CLOSED,
}

_CAN_SEND = (State.SYN_SENT, State.SYN_RCVD, State.ESTABLISHED, State.CLOSE_WAIT)
_CAN_CLOSE = (State.SYN_SENT, State.SYN_RCVD, State.ESTABLISHED, State.CLOSE_WAIT)
_ABORT_SENDS_RST = (
    State.SYN_RCVD,
    State.ESTABLISHED,
    State.FIN_WAIT_1,
    State.FIN_WAIT_2,
    State.CLOSE_WAIT,
)


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Transport parameters.  The default MSS leaves room for the overlay's outer
    IPv4/UDP and inner IPv6/TCP headers inside a 1500-byte link MTU."""

    mss: int = 1200
    window: int = 65535
    rto_initial: float = 1.0
    rto_min: float = 0.2
    rto_max: float = 60.0
    clock_granularity: float = 0.001
    max_retries: int = 8
    time_wait: float = 1.0
    fin_wait_2_timeout: float = 180.0  # idle time; longer than a peer's backed-off RTO

    def __post_init__(self) -> None:
        if not 1 <= self.mss <= 0xFFFF:
            raise ValueError(f"mss {self.mss} is not in 1..65535")
        if not 1 <= self.window <= 0xFFFF:
            raise ValueError(f"window {self.window} is not in 1..65535 (no window scaling)")
        if not 0 < self.rto_min <= self.rto_initial <= self.rto_max:
            raise ValueError("need 0 < rto_min <= rto_initial <= rto_max")
        if self.max_retries < 0 or self.time_wait < 0 or self.fin_wait_2_timeout <= 0:
            raise ValueError("max_retries and time_wait must be >= 0, fin_wait_2_timeout > 0")


# --- events ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connected:
    """The three-way handshake completed."""


@dataclass(frozen=True, slots=True)
class DataReceived:
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer sent FIN: no more data will arrive (we may still send)."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """Orderly close: both directions finished."""


@dataclass(frozen=True, slots=True)
class ConnectionReset:
    """The connection was reset: by the peer's RST, or by our own `abort()` (remote=False)."""

    remote: bool = True


@dataclass(frozen=True, slots=True)
class ConnectionTimedOut:
    """Retransmissions hit the retry limit, or the peer went silent for
    `fin_wait_2_timeout` after acknowledging our FIN without sending its own."""


@dataclass(frozen=True, slots=True)
class ChangeDestinationReceived:
    """A change-destination message whose tag and cookie match; its signature is unchecked."""

    message: ChangeDestination


Event = (
    Connected
    | DataReceived
    | StreamEnded
    | ConnectionClosed
    | ConnectionReset
    | ConnectionTimedOut
    | ChangeDestinationReceived
)


# --- connection --------------------------------------------------------------


def _default_peer_mss(address: IPAddress) -> int:
    # RFC 9293 3.7.1: without an MSS option assume 536 (IPv4) or 1220 (IPv6).
    return 536 if address.version == 4 else 1220


class Connection:
    """One connection's state machine.  Every connection that reaches CLOSED reports
    exactly one of ConnectionClosed, ConnectionReset or ConnectionTimedOut."""

    def __init__(
        self,
        local: Address,
        remote: Address,
        rng: random.Random,
        config: SessionConfig | None = None,
        *,
        destination: Address | None = None,
    ) -> None:
        self.local = local
        self.remote = remote
        self.config = config or SessionConfig()
        self._rng = rng
        self._state = State.CLOSED
        # Fig 20: the client's tag and cookie, or the ones the server received and echoes.
        self.tag: int | None = None
        self.cookie: int | None = None
        # Server: what its SYN-ACK advertises.  Client: what the SYN-ACK said.
        self.destination = destination

        self._iss = rng.getrandbits(32)
        self._snd_una = self._iss
        self._snd_nxt = self._iss
        self._snd_wnd = 0
        self._snd_wl1 = 0
        self._snd_wl2 = self._iss
        self._peer_mss = _default_peer_mss(remote[0])
        self._sndbuf = bytearray()  # data from sequence number _sndbuf_seq on
        self._sndbuf_seq = self._iss + 1
        self._fin_requested = False
        self._fin_seq: int | None = None

        self._irs: int | None = None
        self._rcv_nxt = 0
        self._rcv_wnd = self.config.window
        self._ooo: dict[int, bytes] = {}  # out-of-order data by sequence number
        self._ooo_bytes = 0
        self._peer_fin: int | None = None

        self._srtt: float | None = None
        self._rttvar = 0.0
        self._rto = self.config.rto_initial
        self._rtt_seq: int | None = None  # sample taken when this is acknowledged
        self._rtt_time = 0.0
        self._retries = 0
        self._dupacks = 0
        self._recover: int | None = None  # snd_nxt when loss recovery began

        self._rto_deadline: float | None = None
        self._close_deadline: float | None = None  # TIME_WAIT or FIN_WAIT_2
        self._ack_needed = False
        self._out: list[TcpSegment] = []
        self._events: list[Event] = []
        self._observer: Callable[[Connection], None] | None = None

    # --- read-only views -----------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def key(self) -> ConnKey:
        return (self.local, self.remote)

    @property
    def mss(self) -> int:
        """Largest payload this side sends."""
        return min(self.config.mss, self._peer_mss)

    @property
    def rto(self) -> float:
        return self._rto

    @property
    def srtt(self) -> float | None:
        return self._srtt

    @property
    def bytes_unacked(self) -> int:
        """Data given to `send()` that the peer has not acknowledged yet."""
        return len(self._sndbuf)

    @property
    def bytes_in_flight(self) -> int:
        """Sequence space sent and not yet acknowledged (SYN and FIN count one)."""
        return self._snd_nxt - self._snd_una

    def __repr__(self) -> str:
        return f"<Connection {self.local}->{self.remote} {self._state.name}>"

    # --- user calls ------------------------------------------------------------

    def connect(self, now: float) -> None:
        self._transition(_Input.CONNECT, now)
        self.tag = self._rng.getrandbits(32)
        self.cookie = self._rng.getrandbits(64)
        self._output(now)
        self._touched()

    def accept(self, syn: TcpSegment, now: float) -> None:
        """Open passively with the SYN a listener received."""
        if syn.flags & (_F.SYN | _F.ACK | _F.RST) != _F.SYN:
            raise SessionError(f"not an opening SYN: {syn}")
        self._transition(_Input.ACCEPT, now)
        self._irs = syn.seq
        self._rcv_nxt = syn.seq + 1
        echo = syn.option(TagCookie)
        if echo is not None:
            self.tag, self.cookie = echo.tag, echo.cookie
        self._learn_mss(syn)
        self._snd_wnd, self._snd_wl1, self._snd_wl2 = syn.window, syn.seq, self._iss
        self._output(now)
        self._touched()

    def send(self, data: bytes, now: float) -> None:
        if self._state not in _CAN_SEND or self._fin_requested:
            raise SessionError(f"cannot send in state {self._state.name}")
        self._sndbuf += data
        self._output(now)
        self._touched()

    def close(self, now: float) -> None:
        """Orderly close: a FIN follows the data already given to `send()`.

        Before the handshake completes the close waits for it (unlike RFC 9293,
        which drops the connection): connect, send, close is a complete request.
        `abort()` is the way to give up on a connection attempt."""
        if self._state in _CAN_CLOSE and not self._fin_requested:
            self._fin_requested = True
            if self._state is not State.SYN_SENT:
                self._transition(_Input.CLOSE, now)
            self._output(now)
            self._touched()

    def abort(self, now: float) -> None:
        """Drop the connection at once, telling the peer with a RST."""
        if self._state is State.CLOSED:
            return
        if self._state is State.TIME_WAIT:  # already reported closed
            self._state = State.CLOSED
            self._clear()
        else:
            if self._state in _ABORT_SENDS_RST:
                self._emit(self._snd_nxt, _F.RST | _F.ACK)
            self._terminate(ConnectionReset(remote=False))
        self._touched()

    def send_change_destination(self, message: ChangeDestination, now: float) -> None:
        """Queue a marked segment carrying `message` (outside the byte stream)."""
        if self._irs is None or self._state is State.CLOSED:
            raise SessionError(f"cannot send change-destination in state {self._state.name}")
        payload = message.to_wire()
        self._emit(self._snd_nxt, _F.ACK, payload, (ChangeDestinationMark(),))
        self._touched()

    # --- effects ----------------------------------------------------------------

    def segments_to_send(self) -> list[TcpSegment]:
        out, self._out = self._out, []
        return out

    def events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def next_deadline(self) -> float | None:
        deadlines = [d for d in (self._rto_deadline, self._close_deadline) if d is not None]
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> None:
        if self._rto_deadline is not None and now >= self._rto_deadline:
            self._on_retransmit_timeout(now)
        if self._close_deadline is not None and now >= self._close_deadline:
            self._close_deadline = None
            if self._state is State.TIME_WAIT:
                self._transition(_Input.EXPIRE, now)
            elif self._state is State.FIN_WAIT_2:
                self._transition(_Input.EXPIRE, now)
                self._events.append(ConnectionTimedOut())
        self._touched()

    # --- receiving --------------------------------------------------------------

    def receive(self, segment: TcpSegment, now: float) -> None:
        if self._state is State.CLOSED:
            return
        if segment.option(ChangeDestinationMark) is not None:
            self._receive_change_destination(segment)
        elif self._state is State.SYN_SENT:
            self._receive_in_syn_sent(segment, now)
        else:
            self._receive_synchronized(segment, now)
        self._output(now)
        self._touched()

    def _receive_in_syn_sent(self, seg: TcpSegment, now: float) -> None:
        flags = seg.flags
        if flags & _F.ACK and seg.ack != (self._iss + 1) % _MOD:
            if not flags & _F.RST:
                self._emit_raw(seg.ack, 0, _F.RST)
            return
        if flags & _F.RST:
            if flags & _F.ACK:
                self._terminate(ConnectionReset())
            return
        if flags & (_F.SYN | _F.ACK) != _F.SYN | _F.ACK:
            return  # a bare SYN (simultaneous open) is not supported
        echo = seg.option(TagCookie)
        if echo is not None and (echo.tag, echo.cookie) != (self.tag, self.cookie):
            return  # Fig 20: the tag and cookie match a SYN-ACK to its connection
        dest = seg.option(Destination)
        if dest is not None:
            self.destination = (dest.address, dest.port)
        self._irs = seg.seq
        self._rcv_nxt = seg.seq + 1
        self._learn_mss(seg)
        self._snd_wnd, self._snd_wl1, self._snd_wl2 = seg.window, seg.seq, self._iss + 1
        self._transition(_Input.SYN_ACK, now)
        self._advance(self._iss + 1, now)
        self._ack_needed = True
        if self._fin_requested:
            self._transition(_Input.CLOSE, now)

    def _receive_synchronized(self, seg: TcpSegment, now: float) -> None:
        assert self._irs is not None
        flags = seg.flags
        seq = _unwrap(seg.seq, self._rcv_nxt)
        if self._state is State.FIN_WAIT_2 and not flags & _F.RST:
            # An idle timeout: a peer still sending after our half-close is alive,
            # even when what arrives is a retransmission of data we already have.
            self._close_deadline = now + self.config.fin_wait_2_timeout
        if self._state is State.SYN_RCVD and flags & _F.SYN and seq == self._irs:
            self._ack_needed = True  # the SYN again: our SYN-ACK was lost, send it again
            return
        if not self._acceptable(seq, seg.seq_length):
            if not flags & _F.RST:
                self._ack_needed = True
            if self._state is State.TIME_WAIT and flags & _F.FIN:
                self._close_deadline = now + self.config.time_wait
            return
        if flags & _F.RST:
            if self._state is State.TIME_WAIT:
                return  # RFC 1337: a RST does not cut TIME_WAIT short
            if seq == self._rcv_nxt:
                self._terminate(ConnectionReset())
            else:
                self._ack_needed = True  # RFC 5961 challenge ACK
            return
        if flags & _F.SYN:
            self._ack_needed = True  # RFC 5961 challenge ACK
            return
        if not flags & _F.ACK or not self._process_ack(seg, seq, now):
            return
        if self._state is not State.CLOSED:
            self._process_data(seg, seq, now)

    def _acceptable(self, seq: int, length: int) -> bool:
        lo, hi = self._rcv_nxt, self._rcv_nxt + self._rcv_wnd
        if length == 0:
            return lo <= seq < hi
        return lo <= seq < hi or lo <= seq + length - 1 < hi

    def _process_ack(self, seg: TcpSegment, seq: int, now: float) -> bool:
        """RFC 9293 3.10.7.4 fifth check; False when the segment is to be dropped."""
        ack = _unwrap(seg.ack, self._snd_una)
        if self._state is State.SYN_RCVD and not self._snd_una < ack <= self._snd_nxt:
            self._emit_raw(seg.ack, 0, _F.RST)
            return False
        if ack > self._snd_nxt:
            self._ack_needed = True
            return False
        if ack > self._snd_una:
            self._advance(ack, now)
        elif (
            ack == self._snd_una
            and self._snd_nxt > self._snd_una
            and seg.seq_length == 0
            and seg.window == self._snd_wnd
        ):
            self._dupacks += 1
            if self._dupacks == 3 and self._recover is None:
                self._recover = self._snd_nxt
                self._retransmit(now)
        if self._snd_wl1 < seq or (self._snd_wl1 == seq and self._snd_wl2 <= ack):
            self._snd_wnd, self._snd_wl1, self._snd_wl2 = seg.window, seq, ack
        return self._state is not State.CLOSED

    def _advance(self, ack: int, now: float) -> None:
        """The peer acknowledged everything before `ack` for the first time."""
        syn_acked_now = self._snd_una == self._iss
        self._snd_una = ack
        cut = min(ack, self._sndbuf_seq + len(self._sndbuf)) - self._sndbuf_seq
        if cut > 0:
            del self._sndbuf[:cut]
            self._sndbuf_seq += cut
        if self._rtt_seq is not None and ack >= self._rtt_seq:
            self._rtt_sample(now - self._rtt_time)
            self._rtt_seq = None
        elif self._retries:
            # New data acknowledged: the path delivers again, so drop the backoff
            # (as QUIC does, RFC 9002 6.2.1).  Karn's rule still keeps the
            # ambiguous sample out of SRTT.  Without this, holes left after a
            # timeout at the end of a stream each cost a fully backed-off RTO.
            self._reset_rto()
        self._retries = 0
        self._dupacks = 0
        self._rto_deadline = None if ack == self._snd_nxt else now + self._rto
        if self._recover is not None:
            if ack < self._recover:
                self._retransmit(now)  # partial ACK: the next hole is lost too
            else:
                self._recover = None
        if syn_acked_now:
            if self._state is State.SYN_RCVD:
                self._transition(_Input.ACK_OF_SYN, now)
            self._events.append(Connected())
        if self._fin_seq is not None and ack > self._fin_seq:
            self._transition(_Input.FIN_ACKED, now)

    def _process_data(self, seg: TcpSegment, seq: int, now: float) -> None:
        payload = seg.payload
        fin = bool(seg.flags & _F.FIN)
        if not payload and not fin:
            return
        self._ack_needed = True
        if self._peer_fin is not None and self._rcv_nxt > self._peer_fin:
            return  # the peer's stream is over; this is a retransmission
        end = seq + len(payload)
        limit = self._rcv_nxt + self._rcv_wnd
        if end > limit:
            payload, end, fin = payload[: limit - seq], limit, False
        if seq < self._rcv_nxt:
            payload, seq = payload[self._rcv_nxt - seq :], self._rcv_nxt
        if fin and self._peer_fin is None:
            self._peer_fin = end
        delivered = bytearray()
        if payload and seq == self._rcv_nxt:
            delivered += payload
            self._rcv_nxt += len(payload)
            self._drain_out_of_order(delivered)
        elif payload and self._ooo_bytes + len(payload) <= self._rcv_wnd:
            old = self._ooo.get(seq, b"")
            if len(payload) > len(old):
                self._ooo[seq] = payload
                self._ooo_bytes += len(payload) - len(old)
        if self._peer_fin is not None and self._rcv_nxt > self._peer_fin:
            # A broken peer sent data past its own FIN: the FIN stands.
            del delivered[len(delivered) - (self._rcv_nxt - self._peer_fin) :]
            self._rcv_nxt = self._peer_fin
        if delivered:
            self._events.append(DataReceived(bytes(delivered)))
        if self._peer_fin is not None and self._rcv_nxt == self._peer_fin:
            self._rcv_nxt += 1
            self._ooo.clear()
            self._ooo_bytes = 0
            self._events.append(StreamEnded())
            self._transition(_Input.FIN, now)

    def _drain_out_of_order(self, delivered: bytearray) -> None:
        for start in sorted(self._ooo):
            if start > self._rcv_nxt:
                break
            data = self._ooo.pop(start)
            self._ooo_bytes -= len(data)
            if start + len(data) > self._rcv_nxt:
                delivered += data[self._rcv_nxt - start :]
                self._rcv_nxt = start + len(data)

    def _receive_change_destination(self, seg: TcpSegment) -> None:
        if self._irs is None or self.tag is None:
            return
        if not self._acceptable(_unwrap(seg.seq, self._rcv_nxt), 0):
            return
        try:
            message = ChangeDestination.from_wire(seg.payload)
        except WireError:
            return
        if (message.tag, message.cookie) == (self.tag, self.cookie):
            self._events.append(ChangeDestinationReceived(message))

    # --- sending ------------------------------------------------------------------

    def _output(self, now: float) -> None:
        """Send what the state, the window and the buffers allow, then arm the timer."""
        if self._state is State.CLOSED:
            return
        sent = False
        if self._snd_una == self._iss:  # our SYN is not acknowledged yet
            if self._snd_nxt == self._iss:
                self._send_syn()
                self._snd_nxt = self._iss + 1
                self._rtt_seq, self._rtt_time = self._snd_nxt, now
                sent = True
            elif self._ack_needed and self._irs is not None:
                self._send_syn()  # a SYN-ACK is the only acknowledgment SYN_RCVD can give
                self._rtt_seq = None
                sent = True
        else:
            sent = self._send_data(now)
        if self._ack_needed and not sent and self._irs is not None:
            self._emit(self._snd_nxt, _F.ACK)
        self._ack_needed = False
        if self._snd_nxt > self._snd_una and self._rto_deadline is None:
            self._rto_deadline = now + self._rto

    def _send_data(self, now: float) -> bool:
        data_end = self._sndbuf_seq + len(self._sndbuf)
        window = self._snd_wnd
        if window == 0 and self._snd_nxt == self._snd_una:
            window = 1  # zero-window probe, retransmitted on the timer until it opens
        window_end = self._snd_una + window
        sent = False
        while True:
            n = max(0, min(self.mss, data_end - self._snd_nxt, window_end - self._snd_nxt))
            fin = self._fin_requested and self._fin_seq is None and self._snd_nxt + n == data_end
            if n == 0 and not fin:
                return sent
            offset = self._snd_nxt - self._sndbuf_seq
            flags = _F.ACK | (_F.PSH if n and self._snd_nxt + n == data_end else 0)
            self._emit(
                self._snd_nxt,
                flags | (_F.FIN if fin else 0),
                bytes(self._sndbuf[offset : offset + n]),
            )
            self._snd_nxt += n
            if fin:
                self._fin_seq = self._snd_nxt
                self._snd_nxt += 1
            if self._rtt_seq is None:
                self._rtt_seq, self._rtt_time = self._snd_nxt, now
            sent = True
            if fin:
                return sent

    def _send_syn(self) -> None:
        options: tuple[TcpOption, ...]
        if self._irs is None:
            assert self.tag is not None and self.cookie is not None
            options = (Mss(self.config.mss), TagCookie(self.tag, self.cookie))
            self._emit(self._iss, _F.SYN, b"", options)
            return
        options = (Mss(self.config.mss),)
        if self.tag is not None and self.cookie is not None:
            options += (TagCookie(self.tag, self.cookie),)
            if self.destination is not None:
                options += (Destination(*self.destination),)
        if len(b"".join(o.encode() for o in options)) > MAX_OPTIONS_LEN:
            options = options[1:]  # an IPv6 DESTINATION leaves no room for MSS
        self._emit(self._iss, _F.SYN | _F.ACK, b"", options)

    def _retransmit(self, now: float) -> None:
        """Send the earliest unacknowledged segment again (Karn: no RTT sample)."""
        self._rtt_seq = None
        if self._snd_una == self._iss:
            self._send_syn()
            return
        start = self._snd_una
        offset = start - self._sndbuf_seq
        n = max(0, min(self.mss, len(self._sndbuf) - offset, self._snd_nxt - start))
        fin = self._fin_seq is not None and start + n == self._fin_seq
        if n or fin:
            payload = bytes(self._sndbuf[offset : offset + n])
            self._emit(start, _F.ACK | (_F.FIN if fin else 0) | (_F.PSH if n else 0), payload)

    def _on_retransmit_timeout(self, now: float) -> None:
        if self._snd_nxt == self._snd_una:
            self._rto_deadline = None
            return
        self._retries += 1
        if self._retries > self.config.max_retries:
            self._terminate(ConnectionTimedOut())
            return
        self._rto = min(self._rto * 2, self.config.rto_max)
        self._recover = self._snd_nxt
        self._dupacks = 0
        self._retransmit(now)
        self._rto_deadline = now + self._rto

    def _rtt_sample(self, r: float) -> None:
        # RFC 6298 section 2, with alpha 1/8, beta 1/4, K 4.
        if self._srtt is None:
            self._srtt, self._rttvar = r, r / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - r)
            self._srtt = 0.875 * self._srtt + 0.125 * r
        self._reset_rto()

    def _reset_rto(self) -> None:
        """RTO from the estimate, without backoff (rto_initial before any sample)."""
        if self._srtt is None:
            self._rto = self.config.rto_initial
            return
        rto = self._srtt + max(self.config.clock_granularity, 4 * self._rttvar)
        self._rto = min(max(rto, self.config.rto_min), self.config.rto_max)

    def _emit(
        self, seq: int, flags: TcpFlags, payload: bytes = b"", options: tuple[TcpOption, ...] = ()
    ) -> None:
        ack = self._rcv_nxt % _MOD if flags & _F.ACK else 0
        self._emit_raw(seq % _MOD, ack, flags, payload, options)

    def _emit_raw(
        self,
        seq: int,
        ack: int,
        flags: TcpFlags,
        payload: bytes = b"",
        options: tuple[TcpOption, ...] = (),
    ) -> None:
        segment = TcpSegment(
            self.local[1], self.remote[1], seq, ack, flags, self._rcv_wnd, 0, options, payload
        )
        self._out.append(segment)

    # --- state ------------------------------------------------------------------------

    def _transition(self, inp: _Input, now: float) -> None:
        new = _TRANSITIONS.get((self._state, inp))
        if new is None:
            raise SessionError(f"{inp.name.lower()} is not allowed in state {self._state.name}")
        self._state = new
        if new is State.TIME_WAIT:
            self._rto_deadline = None
            self._close_deadline = now + self.config.time_wait
            self._events.append(ConnectionClosed())
        elif new is State.FIN_WAIT_2:
            self._close_deadline = now + self.config.fin_wait_2_timeout
        elif new is State.CLOSED:
            if inp in (_Input.CLOSE, _Input.FIN_ACKED):
                self._events.append(ConnectionClosed())
            self._clear()

    def _terminate(self, event: Event) -> None:
        self._state = State.CLOSED
        self._events.append(event)
        self._clear()

    def _clear(self) -> None:
        self._rto_deadline = self._close_deadline = None
        self._sndbuf.clear()
        self._ooo.clear()
        self._ooo_bytes = 0

    def _learn_mss(self, seg: TcpSegment) -> None:
        option = seg.option(Mss)
        if option is not None and option.value > 0:
            self._peer_mss = option.value

    def _touched(self) -> None:
        if self._observer is not None:
            self._observer(self)

    # --- state transfer (R3) ------------------------------------------------------------

    def export_state(self) -> bytes:
        """The transport state, for `Connection.import_state` on another server.

        Segments and events not yet drained are not included: drain first.
        Timers are not included: the importer arms them afresh.
        """
        if self._state is State.CLOSED:
            raise SessionError("a closed connection has no state to export")
        return _encode_state(self)

    @classmethod
    def import_state(
        cls,
        data: bytes,
        now: float,
        rng: random.Random,
        config: SessionConfig | None = None,
    ) -> Connection:
        """Continue an exported connection: same 4-tuple, sequence numbers and buffers."""
        conn = _decode_state(data, rng, config)
        if conn._state is State.TIME_WAIT:
            conn._close_deadline = now + conn.config.time_wait
        elif conn._state is State.FIN_WAIT_2:
            conn._close_deadline = now + conn.config.fin_wait_2_timeout
        if conn._snd_nxt > conn._snd_una:
            conn._rto_deadline = now + conn._rto
        return conn


# --- export format -------------------------------------------------------------------
#
# magic "MCS1" (the 1 is the format version), then (big-endian):
#   u8 state (State value, not CLOSED)
#   u8 flags: 1 tag+cookie, 2 destination, 4 irs known, 8 close requested,
#             16 FIN sent, 32 peer FIN seen, 64 RTT measured
#   local address, remote address: u8 length (4|16), address, u16 port
#   [u32 tag, u64 cookie] [destination address]
#   u32 iss; u64 snd_una-iss, snd_nxt-iss, sndbuf_seq-iss; u16 snd_wnd;
#   u64 snd_wl2-iss; u16 peer mss; u32 length + unacknowledged/unsent data
#   [u32 irs; u64 rcv_nxt-irs, snd_wl1-irs; [u64 peer_fin-irs];
#    u16 count, then per out-of-order block: u64 seq-irs, u16 length, data]
#   [f64 srtt, f64 rttvar] f64 rto, u8 retries
# Offsets from the initial sequence numbers keep the values unbounded and exact.

_MAGIC = b"MCS1"
_FLAG_TAG, _FLAG_DEST, _FLAG_IRS, _FLAG_CLOSE, _FLAG_FIN, _FLAG_PEER_FIN, _FLAG_RTT = (
    1 << i for i in range(7)
)


def _put_address(w: Writer, address: Address) -> None:
    w.u8(len(address[0].packed)).bytes(address[0].packed).u16(address[1])


def _get_address(r: Reader, field: str) -> Address:
    length = r.u8(f"{field} address length")
    if length not in (4, 16):
        raise WireError(f"session state: {field} address of {length} bytes")
    raw = r.bytes(length, f"{field} address")
    ip: IPAddress = ipaddress.IPv4Address(raw) if length == 4 else ipaddress.IPv6Address(raw)
    return ip, r.u16(f"{field} port")


def _encode_state(c: Connection) -> bytes:
    flags = (
        (_FLAG_TAG if c.tag is not None and c.cookie is not None else 0)
        | (_FLAG_DEST if c.destination is not None else 0)
        | (_FLAG_IRS if c._irs is not None else 0)
        | (_FLAG_CLOSE if c._fin_requested else 0)
        | (_FLAG_FIN if c._fin_seq is not None else 0)
        | (_FLAG_PEER_FIN if c._peer_fin is not None else 0)
        | (_FLAG_RTT if c._srtt is not None else 0)
    )
    w = Writer().bytes(_MAGIC).u8(c._state.value).u8(flags)
    _put_address(w, c.local)
    _put_address(w, c.remote)
    if c.tag is not None and c.cookie is not None:
        w.u32(c.tag).u64(c.cookie)
    if c.destination is not None:
        _put_address(w, c.destination)
    iss = c._iss
    w.u32(iss).u64(c._snd_una - iss).u64(c._snd_nxt - iss).u64(c._sndbuf_seq - iss)
    w.u16(c._snd_wnd).u64(c._snd_wl2 - iss).u16(c._peer_mss)
    w.u32(len(c._sndbuf)).bytes(bytes(c._sndbuf))
    if c._irs is not None:
        irs = c._irs
        w.u32(irs).u64(c._rcv_nxt - irs).u64(c._snd_wl1 - irs)
        if c._peer_fin is not None:
            w.u64(c._peer_fin - irs)
        w.u16(len(c._ooo))
        for start in sorted(c._ooo):
            w.u64(start - irs).u16(len(c._ooo[start])).bytes(c._ooo[start])
    if c._srtt is not None:
        w.f64(c._srtt).f64(c._rttvar)
    w.f64(c._rto).u8(min(c._retries, 255))
    return w.getvalue()


def _get_time(r: Reader, field: str) -> float:
    value = r.f64(field)
    if not math.isfinite(value) or value < 0:
        raise WireError(f"session state: {field} {value} is not a finite non-negative time")
    return value


def _decode_state(data: bytes, rng: random.Random, config: SessionConfig | None) -> Connection:
    r = Reader(data, "session state")
    if r.bytes(4, "magic") != _MAGIC:
        raise WireError("session state: bad magic or unsupported version")
    state_value = r.u8("state")
    try:
        state = State(state_value)
    except ValueError:
        raise WireError(f"session state: unknown state {state_value}") from None
    if state is State.CLOSED:
        raise WireError("session state: a closed connection cannot be imported")
    flags = r.u8("flags")
    if flags >> 7:
        raise WireError(f"session state: unknown flags {flags:#x}")
    local = _get_address(r, "local")
    remote = _get_address(r, "remote")
    if local[0].version != remote[0].version:
        raise WireError("session state: local and remote addresses of different IP versions")
    conn = Connection(local, remote, rng, config)
    conn._state = state
    if flags & _FLAG_TAG:
        conn.tag, conn.cookie = r.u32("tag"), r.u64("cookie")
    if flags & _FLAG_DEST:
        conn.destination = _get_address(r, "destination")
    iss = conn._iss = r.u32("iss")
    conn._snd_una = iss + r.u64("snd_una")
    conn._snd_nxt = iss + r.u64("snd_nxt")
    conn._sndbuf_seq = iss + r.u64("send buffer start")
    conn._snd_wnd = r.u16("snd_wnd")
    conn._snd_wl2 = iss + r.u64("snd_wl2")
    conn._peer_mss = r.u16("peer mss")
    conn._sndbuf = bytearray(r.bytes(r.u32("send buffer length"), "send buffer"))
    conn._fin_requested = bool(flags & _FLAG_CLOSE)
    data_end = conn._sndbuf_seq + len(conn._sndbuf)
    if flags & _FLAG_FIN:
        conn._fin_seq = data_end
    fin_acked = bool(flags & _FLAG_FIN) and not conn._sndbuf and conn._snd_una == data_end + 1
    if not (
        iss <= conn._snd_una <= conn._snd_nxt <= data_end + (1 if flags & _FLAG_FIN else 0)
        and (conn._sndbuf_seq == max(iss + 1, conn._snd_una) or fin_acked)
        and conn._peer_mss > 0
    ):
        raise WireError("session state: inconsistent send sequence numbers")
    if (flags & _FLAG_FIN) and not (flags & _FLAG_CLOSE):
        raise WireError("session state: FIN sent without a close")
    if state is State.SYN_SENT and not flags & _FLAG_TAG:
        raise WireError("session state: SYN_SENT without the tag and cookie of its SYN")
    if flags & _FLAG_IRS:
        irs = conn._irs = r.u32("irs")
        conn._rcv_nxt = irs + r.u64("rcv_nxt")
        conn._snd_wl1 = irs + r.u64("snd_wl1")
        if flags & _FLAG_PEER_FIN:
            conn._peer_fin = irs + r.u64("peer fin")
            if conn._peer_fin + 1 < conn._rcv_nxt:
                raise WireError("session state: peer FIN before the receive point")
        if conn._rcv_nxt <= irs:
            raise WireError("session state: rcv_nxt before the peer's SYN")
        for i in range(r.u16("out-of-order count")):
            start = irs + r.u64(f"out-of-order {i} start")
            block = r.bytes(r.u16(f"out-of-order {i} length"), f"out-of-order {i} data")
            if start <= conn._rcv_nxt or not block or start in conn._ooo:
                raise WireError(f"session state: out-of-order block {i} is misplaced")
            conn._ooo[start] = block
            conn._ooo_bytes += len(block)
    elif state is not State.SYN_SENT or flags & _FLAG_PEER_FIN:
        raise WireError(f"session state: {state.name} needs the peer's sequence number")
    if (state is State.SYN_SENT) != (conn._snd_una == iss and conn._irs is None):
        raise WireError(f"session state: sequence numbers do not fit state {state.name}")
    _check_close_state(state, flags, fin_acked, conn)
    if flags & _FLAG_RTT:
        conn._srtt, conn._rttvar = _get_time(r, "srtt"), _get_time(r, "rttvar")
    rto = _get_time(r, "rto")
    conn._rto = min(max(rto, conn.config.rto_min), conn.config.rto_max)
    conn._retries = r.u8("retries")
    r.expect_end()
    return conn


# The states where our FIN is sent, acknowledged, and where the peer's FIN was taken in.
_FIN_SENT = {State.FIN_WAIT_1, State.FIN_WAIT_2, State.CLOSING, State.LAST_ACK, State.TIME_WAIT}
_FIN_ACKED = {State.FIN_WAIT_2, State.TIME_WAIT}
_PEER_FIN = {State.CLOSE_WAIT, State.CLOSING, State.LAST_ACK, State.TIME_WAIT}


def _check_close_state(state: State, flags: int, fin_acked: bool, conn: Connection) -> None:
    """The state must agree with the FINs: an imported connection that says FIN_WAIT_2
    with its FIN unacknowledged would fail on the next segment."""
    if bool(flags & _FLAG_FIN) != (state in _FIN_SENT):
        raise WireError(f"session state: {state.name} does not fit the FIN-sent flag")
    if state in _FIN_SENT and fin_acked != (state in _FIN_ACKED):
        raise WireError(f"session state: {state.name} does not fit the FIN's acknowledgement")
    # A peer FIN may be known ahead of a gap in any state; it is taken in exactly in
    # the states that follow it.
    peer_fin = conn._peer_fin
    taken_in = peer_fin is not None and conn._rcv_nxt == peer_fin + 1
    if taken_in != (state in _PEER_FIN):
        raise WireError(f"session state: {state.name} does not fit the peer's FIN")


# --- endpoint ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UnknownSegment:
    """A segment for no known connection and not an opening SYN to a listening port.

    The owner decides: `Endpoint.reset_for` (R1), forward it (R2), or import the
    connection's state and `Endpoint.adopt` it (R3)."""

    src: IPAddress
    dst: IPAddress
    segment: TcpSegment


EndpointEvent = Event | UnknownSegment


class Endpoint:
    """All connections of one host, demultiplexed by 4-tuple.

    Connections may be driven directly (`conn.send(...)`); they tell the
    endpoint, which collects their segments, events and deadlines lazily, so
    the work per call is proportional to the connections that changed.
    """

    def __init__(self, rng: random.Random, config: SessionConfig | None = None) -> None:
        self._rng = rng
        self.config = config or SessionConfig()
        self._conns: dict[ConnKey, Connection] = {}
        self._listeners: dict[int, Address | None] = {}
        self._out: list[tuple[IPAddress, IPAddress, TcpSegment]] = []
        self._events: list[tuple[ConnKey, EndpointEvent]] = []
        self._dirty: dict[ConnKey, Connection] = {}
        # Deadlines: a heap with lazy invalidation against _deadline[key].
        self._heap: list[tuple[float, int, ConnKey]] = []
        self._deadline: dict[ConnKey, float] = {}
        self._tiebreak = itertools.count()

    # --- connections -------------------------------------------------------------------

    def listen(self, port: int, *, destination: Address | None = None) -> None:
        """Accept SYNs to `port` on any local address; SYN-ACKs advertise `destination`."""
        self._listeners[port] = destination

    def unlisten(self, port: int) -> None:
        self._listeners.pop(port, None)

    def connect(self, local: Address, remote: Address, now: float) -> Connection:
        if (local, remote) in self._conns:
            raise SessionError(f"a connection {(local, remote)} already exists")
        conn = Connection(local, remote, self._rng, self.config)
        conn.connect(now)
        self.adopt(conn)
        return conn

    def connection(self, key: ConnKey) -> Connection | None:
        return self._conns.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._conns

    def __len__(self) -> int:
        return len(self._conns)

    def keys(self) -> list[ConnKey]:
        return list(self._conns)

    def adopt(self, conn: Connection) -> None:
        """Take over a connection (one imported from another server, typically)."""
        if conn.key in self._conns:
            raise SessionError(f"a connection {conn.key} already exists")
        if conn.state is State.CLOSED:
            raise SessionError("cannot adopt a closed connection")
        self._conns[conn.key] = conn
        conn._observer = self._mark
        self._mark(conn)

    def release(self, key: ConnKey) -> Connection:
        """Remove a connection without sending anything; what it had queued still goes out."""
        conn = self._conns.get(key)
        if conn is None:
            raise KeyError(key)
        self._flush_one(key, conn)
        self._forget(key)
        return conn

    def rekey(
        self, key: ConnKey, *, local: Address | None = None, remote: Address | None = None
    ) -> ConnKey:
        """Move a connection to a new 4-tuple after a destination change (Fig 20):
        the client to the new remote, the new server to its own local address.
        Segments queued before the call leave from the old addresses."""
        conn = self.release(key)
        conn.local = local or conn.local
        conn.remote = remote or conn.remote
        self.adopt(conn)
        return conn.key

    # --- segments ----------------------------------------------------------------------

    def receive(self, src: IPAddress, dst: IPAddress, segment: TcpSegment, now: float) -> None:
        key = ((dst, segment.dst_port), (src, segment.src_port))
        conn = self._conns.get(key)
        if conn is not None:
            conn.receive(segment, now)
            return
        opening = segment.flags & (_F.SYN | _F.ACK | _F.RST) == _F.SYN
        if opening and segment.dst_port in self._listeners:
            destination = self._listeners[segment.dst_port]
            conn = Connection(key[0], key[1], self._rng, self.config, destination=destination)
            conn.accept(segment, now)
            self.adopt(conn)
            return
        self._events.append((key, UnknownSegment(src, dst, segment)))

    def reset_for(self, src: IPAddress, dst: IPAddress, segment: TcpSegment) -> TcpSegment | None:
        """Queue the RFC 9293 reply RST to a segment received from `src` to `dst`.

        Returns it, or None for a RST (never answered)."""
        if segment.flags & _F.RST:
            return None
        if segment.flags & _F.ACK:
            rst = TcpSegment(segment.dst_port, segment.src_port, segment.ack, 0, _F.RST, 0)
        else:
            ack = (segment.seq + segment.seq_length) % _MOD
            rst = TcpSegment(segment.dst_port, segment.src_port, 0, ack, _F.RST | _F.ACK, 0)
        self._out.append((dst, src, rst))
        return rst

    def segments_to_send(self) -> list[tuple[IPAddress, IPAddress, TcpSegment]]:
        """Drain: (source, destination, segment) for every segment to put on the wire."""
        self._flush()
        out, self._out = self._out, []
        return out

    def events(self) -> list[tuple[ConnKey, EndpointEvent]]:
        self._flush()
        events, self._events = self._events, []
        return events

    # --- timers --------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        self._flush()
        while self._heap:
            deadline, _, key = self._heap[0]
            if self._deadline.get(key) == deadline:
                return deadline
            heapq.heappop(self._heap)
        return None

    def handle_timer(self, now: float) -> None:
        self._flush()
        while self._heap and self._heap[0][0] <= now:
            deadline, _, key = heapq.heappop(self._heap)
            if self._deadline.get(key) != deadline:
                continue
            del self._deadline[key]
            self._conns[key].handle_timer(now)
        self._flush()

    # --- bookkeeping ---------------------------------------------------------------------

    def _mark(self, conn: Connection) -> None:
        self._dirty[conn.key] = conn

    def _flush(self) -> None:
        while self._dirty:
            dirty, self._dirty = self._dirty, {}
            for key, conn in dirty.items():
                if self._conns.get(key) is conn:
                    self._flush_one(key, conn)

    def _flush_one(self, key: ConnKey, conn: Connection) -> None:
        self._dirty.pop(key, None)
        local, remote = conn.local[0], conn.remote[0]
        self._out.extend((local, remote, seg) for seg in conn.segments_to_send())
        self._events.extend((key, event) for event in conn.events())
        if conn.state is State.CLOSED:
            self._forget(key)
        else:
            self._schedule(key, conn.next_deadline())

    def _schedule(self, key: ConnKey, deadline: float | None) -> None:
        if deadline is None:
            self._deadline.pop(key, None)
        elif self._deadline.get(key) != deadline:
            self._deadline[key] = deadline
            heapq.heappush(self._heap, (deadline, next(self._tiebreak), key))
            if len(self._heap) > 2 * len(self._deadline) + 64:
                self._heap = [(d, next(self._tiebreak), k) for k, d in self._deadline.items()]
                heapq.heapify(self._heap)

    def _forget(self, key: ConnKey) -> None:
        conn = self._conns.pop(key, None)
        if conn is not None:
            conn._observer = None
        self._deadline.pop(key, None)
        self._dirty.pop(key, None)
