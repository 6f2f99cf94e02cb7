"""One connection's state machine: handshake, reliable byte stream, close, state transfer.

The transport is deliberately plain TCP (RFC 9293) where manycast needs
nothing else: cumulative ACKs, a fixed receive window, retransmission on an
RFC 6298 timer with exponential backoff, fast retransmit on three duplicate
ACKs, RFC 5961 checks on RST and SYN, RFC 1337 TIME_WAIT.  No congestion
control, no SACK, no timestamps, no window scaling, no delayed ACKs, no
simultaneous open, no urgent data.  Departures, each explained where it is
made: `close()` before the handshake completes waits for it; an ACK of new
data drops the RTO backoff; FIN_WAIT_2 ends after an idle time.  Every change
of state goes through the table `states.TRANSITIONS`, except reset, abort and
the retry limit, which take any state to CLOSED.

Sequence numbers are kept internally as unbounded integers (the wire value is
the low 32 bits), so comparisons need no modular arithmetic.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from manycast.protocol.refusal import RedirectRefusal
from manycast.protocol.tcp.config import SessionConfig
from manycast.protocol.tcp.errors import SessionError
from manycast.protocol.tcp.events import (
    ChangeDestinationIgnored,
    ChangeDestinationReceived,
    Connected,
    ConnectionClosed,
    ConnectionReset,
    ConnectionTimedOut,
    DataReceived,
    Event,
    StreamEnded,
)
from manycast.protocol.tcp.rto import RtoEstimator
from manycast.protocol.tcp.states import (
    ABORT_SENDS_RST,
    CAN_CLOSE,
    CAN_SEND,
    TRANSITIONS,
    Input,
    State,
)
from manycast.protocol.tcp.transfer import capture, restore
from manycast.wire.errors import WireError
from manycast.wire.session_state import SessionState
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

MOD = 1 << 32  # sequence numbers on the wire are taken modulo 2**32
_HALF = 1 << 31
_TIME_SLACK = 1e-9  # seconds: sums of timeouts that should meet may differ in the last bits
_F = TcpFlags


def _unwrap(wire: int, ref: int) -> int:
    """The unbounded sequence number nearest `ref` whose low 32 bits are `wire`."""
    return ref + ((wire - ref + _HALF) % MOD) - _HALF


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
        # Client: send the rest of the connection to the SYN-ACK's destination (Fig 20).
        # The connection then changes its own remote address and leaves its old key
        # in `moved_from` for the demultiplexer, which files it under the new one.
        self.follow = False
        self.moved_from: ConnKey | None = None

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

        self._rtt = RtoEstimator(self.config)
        self._rtt_seq: int | None = None  # sample taken when this is acknowledged
        self._rtt_time = 0.0
        self._retries = 0
        # When the retransmissions that began at the first timeout give up: as long as
        # `max_retries` doubling timeouts take, however many linear ones came between.
        self._give_up_at = 0.0
        self._dupacks = 0
        self._recover: int | None = None  # snd_nxt when loss recovery began

        self._rto_deadline: float | None = None
        self._close_deadline: float | None = None  # TIME_WAIT or FIN_WAIT_2
        # When a segment last came in (a keepalive's idle clock, Linux's lrcvtime): what
        # tells a connection whose peer has gone silent from one that is busy.
        self.last_received = 0.0
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
        return self._rtt.rto

    @property
    def srtt(self) -> float | None:
        return self._rtt.srtt

    @property
    def rtt_estimate(self) -> tuple[float, float] | None:
        """(SRTT, RTTVAR) once measured: what a later connection to the same
        destination may start from (`seed_rtt`)."""
        srtt = self._rtt.srtt
        return None if srtt is None else (srtt, self._rtt.rttvar)

    def seed_rtt(self, srtt: float, rttvar: float) -> None:
        """Start from an earlier connection's estimate instead of `rto_initial`, as a
        TCP metrics cache does (RFC 6298 section 2.1 leaves the initial RTO to the
        implementation; Linux keeps SRTT and RTTVAR per destination). Before
        `connect`: the SYN's timer uses it."""
        if self._state is not State.CLOSED:
            raise SessionError("seed_rtt before connect")
        self._rtt.srtt, self._rtt.rttvar = srtt, rttvar
        self._rtt.reset()

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

    def connect(self, now: float, *, offer: bool = True) -> None:
        """Open actively. `offer`: send TAG_COOKIE on the SYN (Fig 20); without it the
        SYN is plain TCP and the server neither echoes nor gives a destination."""
        self._transition(Input.CONNECT, now)
        if offer:
            self.tag = self._rng.getrandbits(32)
            self.cookie = self._rng.getrandbits(64)
        self._output(now)
        self._touched()

    def accept(self, syn: TcpSegment, now: float) -> None:
        """Open passively with the SYN a listener received."""
        if syn.flags & (_F.SYN | _F.ACK | _F.RST) != _F.SYN:
            raise SessionError(f"not an opening SYN: {syn}")
        self._transition(Input.ACCEPT, now)
        self.last_received = now
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
        if self._state not in CAN_SEND or self._fin_requested:
            raise SessionError(f"cannot send in state {self._state.name}")
        self._sndbuf += data
        self._output(now)
        self._touched()

    def close(self, now: float) -> None:
        """Orderly close: a FIN follows the data already given to `send()`.

        Before the handshake completes the close waits for it (unlike RFC 9293,
        which drops the connection): connect, send, close is a complete request.
        `abort()` is the way to give up on a connection attempt."""
        if self._state in CAN_CLOSE and not self._fin_requested:
            self._fin_requested = True
            if self._state is not State.SYN_SENT:
                self._transition(Input.CLOSE, now)
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
            if self._state in ABORT_SENDS_RST:
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

    def acknowledge(self, now: float) -> None:
        """Send an ACK now (a client that moved to a new destination says so at once)."""
        if self._irs is not None and self._state is not State.CLOSED:
            self._ack_needed = True
            self._output(now)
            self._touched()

    def retransmit_now(self, now: float) -> None:
        """Send the earliest unacknowledged segment again now, not at the timer: a moved
        connection whose client has just switched to us (its earlier copies went to a
        destination the client had left)."""
        if self._state is not State.CLOSED and self._snd_nxt > self._snd_una:
            self._retransmit(now)
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
                self._transition(Input.EXPIRE, now)
            elif self._state is State.FIN_WAIT_2:
                self._transition(Input.EXPIRE, now)
                self._events.append(ConnectionTimedOut())
        self._touched()

    # --- receiving --------------------------------------------------------------

    def receive(self, segment: TcpSegment, now: float) -> None:
        if self._state is State.CLOSED:
            return
        self.last_received = now
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
        if flags & _F.ACK and seg.ack != (self._iss + 1) % MOD:
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
            if self.follow and echo is not None:
                self._follow(self.destination)
        self._irs = seg.seq
        self._rcv_nxt = seg.seq + 1
        self._learn_mss(seg)
        self._snd_wnd, self._snd_wl1, self._snd_wl2 = seg.window, seg.seq, self._iss + 1
        self._transition(Input.SYN_ACK, now)
        self._advance(self._iss + 1, now)
        self._ack_needed = True
        if self._fin_requested:
            self._transition(Input.CLOSE, now)

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
        # RFC 9293 3.10.7.4: only an ACK in SND.UNA..SND.NXT may update the window (an
        # older one would also leave SND.WL2 before the ISS, which no state can carry).
        if ack >= self._snd_una and (
            self._snd_wl1 < seq or (self._snd_wl1 == seq and self._snd_wl2 <= ack)
        ):
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
            self._rtt.sample(now - self._rtt_time)
            self._rtt_seq = None
        elif self._retries:
            # New data acknowledged: the path delivers again, so drop the backoff
            # (as QUIC does, RFC 9002 6.2.1).  Karn's rule still keeps the
            # ambiguous sample out of SRTT.  Without this, holes left after a
            # timeout at the end of a stream each cost a fully backed-off RTO.
            self._rtt.reset()
        self._retries = 0
        self._dupacks = 0
        self._rto_deadline = None if ack == self._snd_nxt else now + self._rtt.rto
        if self._recover is not None:
            if ack < self._recover:
                self._retransmit(now)  # partial ACK: the next hole is lost too
            else:
                self._recover = None
        if syn_acked_now:
            if self._state is State.SYN_RCVD:
                self._transition(Input.ACK_OF_SYN, now)
            self._events.append(Connected())
        if self._fin_seq is not None and ack > self._fin_seq:
            self._transition(Input.FIN_ACKED, now)

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
            self._transition(Input.FIN, now)

    def _drain_out_of_order(self, delivered: bytearray) -> None:
        for start in sorted(self._ooo):
            if start > self._rcv_nxt:
                break
            data = self._ooo.pop(start)
            self._ooo_bytes -= len(data)
            if start + len(data) > self._rcv_nxt:
                delivered += data[self._rcv_nxt - start :]
                self._rcv_nxt = start + len(data)

    def _follow(self, destination: Address) -> None:
        """Send to `destination` from now on (checked: one family, a unicast address)."""
        address = destination[0]
        if (
            destination == self.remote
            or address.version != self.remote[0].version
            or address.is_multicast
            or address.is_unspecified
        ):
            return
        self.moved_from = self.key
        self.remote = destination

    def _receive_change_destination(self, seg: TcpSegment) -> None:
        if self.tag is None:
            self._events.append(ChangeDestinationIgnored(RedirectRefusal.NOT_OFFERED))
            return
        if self._irs is None or not self._acceptable(_unwrap(seg.seq, self._rcv_nxt), 0):
            self._events.append(ChangeDestinationIgnored(RedirectRefusal.OUT_OF_WINDOW))
            return
        try:
            message = ChangeDestination.from_wire(seg.payload)
        except WireError:
            self._events.append(ChangeDestinationIgnored(RedirectRefusal.MALFORMED))
            return
        if (message.tag, message.cookie) == (self.tag, self.cookie):
            self._events.append(ChangeDestinationReceived(message))
        else:
            self._events.append(ChangeDestinationIgnored(RedirectRefusal.WRONG_COOKIE))

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
            self._rto_deadline = now + self._rtt.rto

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
            options = (Mss(self.config.mss),)
            if self.tag is not None and self.cookie is not None:
                options += (TagCookie(self.tag, self.cookie),)
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
        if self._retries == 1:
            self._give_up_at = now + self._patience()
        if self._retries > self._retry_limit() and now >= self._give_up_at - _TIME_SLACK:
            self._terminate(ConnectionTimedOut())
            return
        if not self._linear_timeout():
            self._rtt.back_off()
        self._recover = self._snd_nxt
        self._dupacks = 0
        self._retransmit(now)
        self._rto_deadline = now + self._rtt.rto
        if self._give_up_at > now:
            self._rto_deadline = min(self._rto_deadline, self._give_up_at)

    def _patience(self) -> float:
        """How long after the first timeout the connection gives up: the time its
        `max_retries` doubled timeouts would take. Linux bounds retransmission by time
        the same way (retransmits_timed_out), so a thin stream, whose linear timeouts
        come sooner and count more, retransmits more often within the same patience
        rather than giving up sooner."""
        rto, total = self._rtt.rto, 0.0
        for _ in range(self._retry_limit()):
            rto = min(rto * 2, self.config.rto_max)
            total += rto
        return total

    def _retry_limit(self) -> int:
        """Timeouts before giving up: `syn_retries` while our SYN (or SYN-ACK) is not
        acknowledged, if set; `max_retries` otherwise."""
        syn = self.config.syn_retries
        return syn if syn is not None and self._snd_una == self._iss else self.config.max_retries

    def _linear_timeout(self) -> bool:
        """Whether this timeout keeps the RTO: an established thin stream (fewer than
        four segments in flight, as Linux's tcp_stream_is_thin) within its
        `thin_linear_retries`, where an interactive sender would wait longer and longer
        for a path that may already be back."""
        limit = self.config.thin_linear_retries
        return (
            limit > 0
            and self._retries <= limit
            and self._state is State.ESTABLISHED
            and self.bytes_in_flight < 4 * self.mss
        )

    def _emit(
        self, seq: int, flags: TcpFlags, payload: bytes = b"", options: tuple[TcpOption, ...] = ()
    ) -> None:
        ack = self._rcv_nxt % MOD if flags & _F.ACK else 0
        self._emit_raw(seq % MOD, ack, flags, payload, options)

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

    def _transition(self, inp: Input, now: float) -> None:
        new = TRANSITIONS.get((self._state, inp))
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
            if inp in (Input.CLOSE, Input.FIN_ACKED):
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

    def set_observer(self, observer: Callable[[Connection], None] | None) -> None:
        """Call `observer` after every call that may change what the connection hands out."""
        self._observer = observer

    # --- state transfer (R3) ------------------------------------------------------------

    def export_state(self) -> bytes:
        """The transport state as bytes, for `Connection.import_state` on another server."""
        return self.session_state().to_wire()

    def session_state(self) -> SessionState:
        """The transport state as a value.  Segments and events not yet drained are not
        in it (drain first), nor are timers (the importer arms them afresh)."""
        return capture(self)

    @classmethod
    def import_state(
        cls,
        data: bytes,
        now: float,
        rng: random.Random,
        config: SessionConfig | None = None,
    ) -> Connection:
        """Continue an exported connection: same 4-tuple, sequence numbers and buffers.
        `WireError` if `data` is not a session state."""
        return cls.from_session_state(SessionState.from_wire(data), now, rng, config)

    @classmethod
    def from_session_state(
        cls,
        state: SessionState,
        now: float,
        rng: random.Random,
        config: SessionConfig | None = None,
    ) -> Connection:
        """Continue the connection `state` describes, with this side's `config`."""
        conn = restore(cls, state, now, rng, config)
        conn.last_received = now  # it arrives because its peer is sending
        return conn
