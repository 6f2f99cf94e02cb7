"""What a connection reports to its owner: connected, data, end of stream, closed, reset."""

from __future__ import annotations

from dataclasses import dataclass

from manycast.protocol.refusal import RedirectRefusal
from manycast.wire.transport import ChangeDestination, IPAddress

_Address = tuple[IPAddress, int]


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


@dataclass(frozen=True, slots=True)
class ChangeDestinationIgnored:
    """A segment marked CHANGE_DESTINATION that the connection dropped, and why (not
    this connection's tag and cookie, outside the window, garbage)."""

    reason: RedirectRefusal


@dataclass(frozen=True, slots=True)
class Rekeyed:
    """The connection answers to a new 4-tuple (the key this event comes with), by
    itself: a client followed the DESTINATION of its SYN-ACK, or a server's connection
    got its first segment at the destination it advertised (Fig 20). `previous`, its
    old key, still reaches it."""

    previous: tuple[_Address, _Address]


Event = (
    Connected
    | DataReceived
    | StreamEnded
    | ConnectionClosed
    | ConnectionReset
    | ConnectionTimedOut
    | ChangeDestinationReceived
    | ChangeDestinationIgnored
    | Rekeyed
)
