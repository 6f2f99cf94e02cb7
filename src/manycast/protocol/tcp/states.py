"""The states of a connection and the table of moves between them (RFC 9293)."""

from __future__ import annotations

import enum

from manycast.wire.session_state import State


class Input(enum.Enum):
    """What moves a connection from one state to another."""

    CONNECT = enum.auto()
    ACCEPT = enum.auto()  # a SYN handed over by a listener (LISTEN lives in the Demultiplexer)
    SYN_ACK = enum.auto()
    ACK_OF_SYN = enum.auto()
    CLOSE = enum.auto()
    FIN = enum.auto()
    FIN_ACKED = enum.auto()
    EXPIRE = enum.auto()


# Reset, abort and the retry limit take any state to CLOSED; everything else is here.
TRANSITIONS: dict[tuple[State, Input], State] = {
    (State.CLOSED, Input.CONNECT): State.SYN_SENT,
    (State.CLOSED, Input.ACCEPT): State.SYN_RCVD,
    (State.SYN_SENT, Input.SYN_ACK): State.ESTABLISHED,
    (State.SYN_RCVD, Input.ACK_OF_SYN): State.ESTABLISHED,
    (State.SYN_RCVD, Input.CLOSE): State.FIN_WAIT_1,
    (State.ESTABLISHED, Input.CLOSE): State.FIN_WAIT_1,
    (State.ESTABLISHED, Input.FIN): State.CLOSE_WAIT,
    (State.FIN_WAIT_1, Input.FIN_ACKED): State.FIN_WAIT_2,
    (State.FIN_WAIT_1, Input.FIN): State.CLOSING,
    (State.FIN_WAIT_2, Input.FIN): State.TIME_WAIT,
    (State.FIN_WAIT_2, Input.EXPIRE): State.CLOSED,
    (State.CLOSING, Input.FIN_ACKED): State.TIME_WAIT,
    (State.CLOSE_WAIT, Input.CLOSE): State.LAST_ACK,
    (State.LAST_ACK, Input.FIN_ACKED): State.CLOSED,
    (State.TIME_WAIT, Input.EXPIRE): State.CLOSED,
}

CAN_SEND = (State.SYN_SENT, State.SYN_RCVD, State.ESTABLISHED, State.CLOSE_WAIT)
CAN_CLOSE = (State.SYN_SENT, State.SYN_RCVD, State.ESTABLISHED, State.CLOSE_WAIT)
ABORT_SENDS_RST = (
    State.SYN_RCVD,
    State.ESTABLISHED,
    State.FIN_WAIT_1,
    State.FIN_WAIT_2,
    State.CLOSE_WAIT,
)


__all__ = ["ABORT_SENDS_RST", "CAN_CLOSE", "CAN_SEND", "TRANSITIONS", "Input", "State"]
