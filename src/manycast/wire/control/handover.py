"""Messages that keep existing connections when their part of the space moves (Fig 14-15).

R2 forwards a packet to the old owner, which asks for the rest point to point
(`Forwarded`, `Redirect`); R3 transfers a connection's state on demand
(`StateQuery`, `StateReply`). R4 (Fig 16) tags connections onto label-switched
trees with the VIP pool's `FlowTag` and `FlowUntag` (`vip.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from manycast.wire.control.envelope import Envelope, MessageType, control_message
from manycast.wire.control.fields import (
    MAX_PACKET,
    U16,
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
from manycast.wire.cursor import Reader, Writer
from manycast.wire.errors import WireError


@dataclass(frozen=True, slots=True)
class ConnectionKey:
    """One client connection to the pool's group address."""

    client: Address
    client_port: int
    group: Address
    service_port: int

    def __post_init__(self) -> None:
        what = "connection key"
        check_address(what, "client", self.client)
        check_address(what, "group", self.group)
        if self.client.version != self.group.version:
            raise WireError(f"{what}: client {self.client} and group {self.group} mix families")
        check_uint(what, "client_port", self.client_port, U16)
        check_uint(what, "service_port", self.service_port, U16)

    def _write(self, w: Writer) -> None:
        write_address(w, self.client)
        w.u16(self.client_port)
        write_address(w, self.group)
        w.u16(self.service_port)

    @classmethod
    def _read(cls, r: Reader) -> ConnectionKey:
        client = read_address(r, "client")
        client_port = r.u16("client port")
        group = read_address(r, "group")
        return cls(client, client_port, group, r.u16("service port"))


@control_message
@dataclass(frozen=True, slots=True)
class Forwarded(Envelope):
    """R2 (Fig 14): an inner IP packet that `receiver` got for a connection it has no
    state for, sent on to the old owner, which can then answer `receiver` directly."""

    TYPE: ClassVar[MessageType] = MessageType.FORWARDED
    receiver: Address
    packet: bytes

    def _check(self, what: str) -> None:
        check_address(what, "receiver", self.receiver)
        set_field(self, "packet", as_bytes(what, "packet", self.packet))
        if not 1 <= len(self.packet) <= MAX_PACKET:
            raise WireError(f"{what}: packet of {len(self.packet)} bytes, not 1..{MAX_PACKET}")
        if self.packet[0] >> 4 not in (4, 6):
            raise WireError(f"{what}: packet is not IPv4 or IPv6 (version {self.packet[0] >> 4})")

    def _write_body(self, w: Writer) -> None:
        write_address(w, self.receiver)
        w.u16(len(self.packet)).bytes(self.packet)

    @classmethod
    def _read_body(cls, sender: str, seq: int, r: Reader) -> Forwarded:
        receiver = read_address(r, "receiver")
        return cls(sender, seq, receiver, r.bytes(r.u16("packet length"), "packet"))


@control_message
@dataclass(frozen=True, slots=True)
class Redirect(Envelope):
    """R2 (Fig 14, 1430): the old owner asks that packets of this connection be sent
    to it point to point at (target, target_port) instead of over the channel."""

    TYPE: ClassVar[MessageType] = MessageType.REDIRECT
    client: Address
    client_port: int
    service_port: int
    target: Address
    target_port: int

    def _check(self, what: str) -> None:
        check_address(what, "client", self.client)
        check_uint(what, "client_port", self.client_port, U16)
        check_uint(what, "service_port", self.service_port, U16)
        check_address(what, "target", self.target)
        check_uint(what, "target_port", self.target_port, U16)

    def _write_body(self, w: Writer) -> None:
        write_address(w, self.client)
        w.u16(self.client_port).u16(self.service_port)
        write_address(w, self.target)
        w.u16(self.target_port)

    @classmethod
    def _read_body(cls, sender: str, seq: int, r: Reader) -> Redirect:
        client = read_address(r, "client")
        client_port, service_port = r.u16("client port"), r.u16("service port")
        target = read_address(r, "target")
        return cls(sender, seq, client, client_port, service_port, target, r.u16("target port"))


@control_message
@dataclass(frozen=True, slots=True)
class StateQuery(Envelope):
    """R3 (Fig 15): who holds the state of this connection?"""

    TYPE: ClassVar[MessageType] = MessageType.STATE_QUERY
    query_id: int
    key: ConnectionKey

    def _check(self, what: str) -> None:
        check_uint(what, "query_id", self.query_id, U64)
        if not isinstance(self.key, ConnectionKey):
            raise WireError(f"{what}: key must be a ConnectionKey, not {self.key!r}")

    def _write_body(self, w: Writer) -> None:
        w.u64(self.query_id)
        self.key._write(w)

    @classmethod
    def _read_body(cls, sender: str, seq: int, r: Reader) -> StateQuery:
        query_id = r.u64("query id")
        return cls(sender, seq, query_id, ConnectionKey._read(r))


_HELD = 2  # StateReply's outcome byte: found, not given (its holder serves the client)


@control_message
@dataclass(frozen=True, slots=True)
class StateReply(Envelope):
    """R3 (Fig 15, 1530): the old owner's answer; the states are opaque here and empty
    when the connection was not found. `held`: not given, though found, because its
    holder serves the connection's client now (a server whose view of the allocation
    is behind asked for it); the asker lets its query lapse instead of resetting the
    client. One byte on the wire: 0 not found, 1 found, 2 held."""

    TYPE: ClassVar[MessageType] = MessageType.STATE_REPLY
    query_id: int
    key: ConnectionKey
    found: bool
    transport_state: bytes = b""
    app_state: bytes = b""
    held: bool = False

    def _check(self, what: str) -> None:
        check_uint(what, "query_id", self.query_id, U64)
        if not isinstance(self.key, ConnectionKey):
            raise WireError(f"{what}: key must be a ConnectionKey, not {self.key!r}")
        for name in ("found", "held"):
            if not isinstance(getattr(self, name), bool):
                raise WireError(f"{what}: {name} must be a bool, not {getattr(self, name)!r}")
        if self.found and self.held:
            raise WireError(f"{what}: a state both given and held")
        for name in ("transport_state", "app_state"):
            blob = as_bytes(what, name, getattr(self, name))
            set_field(self, name, blob)
            if len(blob) > U32:
                raise WireError(f"{what}: {name} of {len(blob)} bytes, at most {U32}")
            if blob and not self.found:
                raise WireError(f"{what}: {name} given for a connection not found")

    def _write_body(self, w: Writer) -> None:
        w.u64(self.query_id)
        self.key._write(w)
        w.u8(1 if self.found else _HELD if self.held else 0)
        w.u32(len(self.transport_state)).bytes(self.transport_state)
        w.u32(len(self.app_state)).bytes(self.app_state)

    @classmethod
    def _read_body(cls, sender: str, seq: int, r: Reader) -> StateReply:
        query_id = r.u64("query id")
        key = ConnectionKey._read(r)
        outcome = r.u8("outcome")
        if outcome > _HELD:
            raise WireError(f"{r.what}: outcome must be 0, 1 or {_HELD}, not {outcome}")
        transport = r.bytes(r.u32("transport state length"), "transport state")
        app = r.bytes(r.u32("application state length"), "application state")
        return cls(sender, seq, query_id, key, outcome == 1, transport, app, outcome == _HELD)
