"""Messages of technique D, the dynamic destination (Fig 20-21): a live connection moved.

The old server hands a connection's state to its new owner point to point
(`MoveConnection`: the transport state as R3's `StateReply` carries it, the
application's state, and the serial the new owner signs its change-destination
with); the new owner confirms it took the connection (`MoveAck`), or the old one
sends again and, at last, takes the connection back. A new connection's SYN that
an overloaded server passes to another, and a moved connection's stragglers that
reach the old server, travel as R2's `Forwarded`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from manycast.wire.control.envelope import Envelope, MessageType, control_message
from manycast.wire.control.fields import (
    U32,
    U64,
    Address,
    as_bytes,
    check_address,
    check_uint,
    read_address,
    set_field,
    write_address,
)
from manycast.wire.control.handover import ConnectionKey
from manycast.wire.cursor import Reader, Writer
from manycast.wire.errors import WireError


def _check_key(what: str, key: object) -> None:
    if not isinstance(key, ConnectionKey):
        raise WireError(f"{what}: key must be a ConnectionKey, not {key!r}")


@control_message
@dataclass(frozen=True, slots=True)
class MoveConnection(Envelope):
    """D (Fig 20, 2020; Fig 21): the old server gives the connection `key` (its `group`
    is the old server's own address, where the client sent) to the receiver, which
    continues it and tells the client, with a change-destination signed with
    `serial` (1 for a connection's first move), to send to it. `origin` is where the
    receiver's `MoveAck` goes; `epoch` is the allocation the sender moved it by (the
    receiver moves it on only once it holds that epoch or a later one)."""

    TYPE: ClassVar[MessageType] = MessageType.MOVE_CONNECTION
    origin: Address
    epoch: int
    key: ConnectionKey
    serial: int
    transport_state: bytes
    app_state: bytes = b""

    def _check(self, what: str) -> None:
        check_address(what, "origin", self.origin)
        check_uint(what, "epoch", self.epoch, U64)
        _check_key(what, self.key)
        check_uint(what, "serial", self.serial, U32, low=1)
        for name in ("transport_state", "app_state"):
            blob = as_bytes(what, name, getattr(self, name))
            set_field(self, name, blob)
            if len(blob) > U32:
                raise WireError(f"{what}: {name} of {len(blob)} bytes, at most {U32}")
        if not self.transport_state:
            raise WireError(f"{what}: no transport state")

    def _write_body(self, w: Writer) -> None:
        write_address(w, self.origin)
        w.u64(self.epoch)
        self.key._write(w)
        w.u32(self.serial)
        w.u32(len(self.transport_state)).bytes(self.transport_state)
        w.u32(len(self.app_state)).bytes(self.app_state)

    @classmethod
    def _read_body(cls, sender: str, seq: int, r: Reader) -> MoveConnection:
        origin = read_address(r, "origin")
        epoch = r.u64("epoch")
        key = ConnectionKey._read(r)
        serial = r.u32("serial")
        transport = r.bytes(r.u32("transport state length"), "transport state")
        app = r.bytes(r.u32("application state length"), "application state")
        return cls(sender, seq, origin, epoch, key, serial, transport, app)


@control_message
@dataclass(frozen=True, slots=True)
class MoveAck(Envelope):
    """D: the new owner took the connection `key` (as `MoveConnection` named it) at
    `serial`; the old server may forget the state it kept to take it back."""

    TYPE: ClassVar[MessageType] = MessageType.MOVE_ACK
    key: ConnectionKey
    serial: int

    def _check(self, what: str) -> None:
        _check_key(what, self.key)
        check_uint(what, "serial", self.serial, U32, low=1)

    def _write_body(self, w: Writer) -> None:
        self.key._write(w)
        w.u32(self.serial)

    @classmethod
    def _read_body(cls, sender: str, seq: int, r: Reader) -> MoveAck:
        key = ConnectionKey._read(r)
        return cls(sender, seq, key, r.u32("serial"))
