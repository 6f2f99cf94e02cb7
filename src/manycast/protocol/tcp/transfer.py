"""Moving a connection between servers (R3, seed Fig 15): its state as a `SessionState` and back.

These two functions belong to the connection machine and read and set its
sequence variables directly; they live apart from `connection.py` because the
mapping to the wire format is a concept of its own. Call them through
`Connection.session_state` and `Connection.from_session_state`.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from manycast.protocol.tcp.config import SessionConfig
from manycast.protocol.tcp.errors import SessionError
from manycast.wire.session_state import ReceiveState, SessionState, State

if TYPE_CHECKING:
    from manycast.protocol.tcp.connection import Connection


def capture(conn: Connection) -> SessionState:
    """`conn`'s transport state; SessionError once it is closed."""
    if conn._state is State.CLOSED:
        raise SessionError("a closed connection has no state to export")
    receive = None
    if conn._irs is not None:
        receive = ReceiveState(
            conn._irs,
            conn._rcv_nxt,
            conn._snd_wl1,
            conn._peer_fin,
            tuple(sorted(conn._ooo.items())),
        )
    return SessionState(
        state=conn._state,
        local=conn.local,
        remote=conn.remote,
        iss=conn._iss,
        snd_una=conn._snd_una,
        snd_nxt=conn._snd_nxt,
        sndbuf_seq=conn._sndbuf_seq,
        snd_wnd=conn._snd_wnd,
        snd_wl2=conn._snd_wl2,
        peer_mss=conn._peer_mss,
        send_buffer=bytes(conn._sndbuf),
        rto=conn._rtt.rto,
        tag=conn.tag,
        cookie=conn.cookie,
        destination=conn.destination,
        close_requested=conn._fin_requested,
        fin_sent=conn._fin_seq is not None,
        receive=receive,
        srtt=conn._rtt.srtt,
        rttvar=conn._rtt.rttvar,
        retries=min(conn._retries, 255),
    )


def restore(
    cls: type[Connection],
    s: SessionState,
    now: float,
    rng: random.Random,
    config: SessionConfig | None,
) -> Connection:
    """A `cls` continuing the connection `s` describes, its timers armed from `now`."""
    conn = cls(s.local, s.remote, rng, config)
    conn._state = s.state
    conn.tag, conn.cookie, conn.destination = s.tag, s.cookie, s.destination
    conn._iss, conn._snd_una, conn._snd_nxt = s.iss, s.snd_una, s.snd_nxt
    conn._snd_wnd, conn._snd_wl2, conn._peer_mss = s.snd_wnd, s.snd_wl2, s.peer_mss
    conn._sndbuf, conn._sndbuf_seq = bytearray(s.send_buffer), s.sndbuf_seq
    conn._fin_requested = s.close_requested
    if s.fin_sent:
        conn._fin_seq = s.sndbuf_seq + len(s.send_buffer)
    if s.receive is not None:
        r = s.receive
        conn._irs, conn._rcv_nxt, conn._snd_wl1 = r.irs, r.rcv_nxt, r.snd_wl1
        conn._peer_fin = r.peer_fin
        conn._ooo = dict(r.out_of_order)
        conn._ooo_bytes = sum(len(block) for _, block in r.out_of_order)
    conn._rtt.restore(s.srtt, s.rttvar, s.rto)
    conn._retries = s.retries
    if conn._state is State.TIME_WAIT:
        conn._close_deadline = now + conn.config.time_wait
    elif conn._state is State.FIN_WAIT_2:
        conn._close_deadline = now + conn.config.fin_wait_2_timeout
    if conn._snd_nxt > conn._snd_una:
        conn._rto_deadline = now + conn._rtt.rto
    return conn
