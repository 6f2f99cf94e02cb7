"""The manycast session transport: a TCP-like connection as a sans-I/O state machine.

A `Connection` is one connection's state machine (`connection`, its states and
their table of moves in `states`, its retransmission timer in `rto`); a
`Demultiplexer` finds the connections of one host by 4-tuple (`endpoint`).
Neither touches a socket or a clock: every entry point takes `now` (seconds),
randomness comes from the `random.Random` given to the constructor, and effects
come back as data (`segments_to_send()`, `events()`, `next_deadline()`).

What manycast adds to plain TCP (seed Fig 12-15, 20-21):
- the client's SYN carries TAG_COOKIE, the server echoes it on the SYN-ACK
  (with a DESTINATION when it has one to give) and the client drops a SYN-ACK
  whose echo does not match;
- a connection's whole transport state can be exported on one server and
  imported on another, which then continues it (technique R3; `transfer`, in
  the format of `manycast.wire.session_state`);
- a demultiplexer never answers a segment for a 4-tuple it does not know: it
  reports `UnknownSegment` and its owner resets it (R1), forwards it (R2) or
  fetches the state and adopts the connection (R3);
- a segment marked CHANGE_DESTINATION carries a `ChangeDestination` message
  outside the byte stream; the connection checks tag and cookie and reports
  it (or why it dropped it), and its owner checks the signature;
- a client connection may follow its SYN-ACK's DESTINATION, and a listener
  that advertises one moves the connection there when the client's first
  segment arrives (`Rekeyed`); a connection still answers to the 4-tuples it
  left, and a following one takes a change-destination from any source.
"""

from manycast.protocol.tcp.config import SessionConfig
from manycast.protocol.tcp.connection import Address, Connection, ConnKey
from manycast.protocol.tcp.endpoint import Demultiplexer, EndpointEvent, UnknownSegment
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
    Rekeyed,
    StreamEnded,
)
from manycast.protocol.tcp.states import State

__all__ = [
    "Address",
    "ChangeDestinationIgnored",
    "ChangeDestinationReceived",
    "ConnKey",
    "Connected",
    "Connection",
    "ConnectionClosed",
    "ConnectionReset",
    "ConnectionTimedOut",
    "DataReceived",
    "Demultiplexer",
    "EndpointEvent",
    "Event",
    "Rekeyed",
    "SessionConfig",
    "SessionError",
    "State",
    "StreamEnded",
    "UnknownSegment",
]
