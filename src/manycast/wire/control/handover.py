"""Messages that keep existing connections when their part of the space moves (Fig 14-16).

R2 forwards a packet to the old owner, which asks for the rest point to point
(`Forwarded`, `Redirect`); R3 transfers a connection's state on demand
(`StateQuery`, `StateReply`); R4 pins per-connection paths at routers
(`PinRequest`, `Unpin`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

from manycast.wire.control.envelope import Envelope, MessageType, control_message
from manycast.wire.control.fields import (
    MAX_PACKET,
    MAX_PIN_KEYS,
    U16,
    U32,
    U64,
    Address,
    as_bytes,
    check_address,
    check_uint,
    read_address,
    read_count,
    read_flag,
    records,
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


class PinKey(NamedTuple):
    """A client's connections to pin: one port, or 0 for all of its ports."""

    client: Address
    port: int = 0


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


@control_message
@dataclass(frozen=True, slots=True)
class StateReply(Envelope):
    """R3 (Fig 15, 1530): the old owner's answer; the states are opaque here and empty
    when the connection was not found."""

    TYPE: ClassVar[MessageType] = MessageType.STATE_REPLY
    query_id: int
    key: ConnectionKey
    found: bool
    transport_state: bytes = b""
    app_state: bytes = b""

    def _check(self, what: str) -> None:
        check_uint(what, "query_id", self.query_id, U64)
        if not isinstance(self.key, ConnectionKey):
            raise WireError(f"{what}: key must be a ConnectionKey, not {self.key!r}")
        if not isinstance(self.found, bool):
            raise WireError(f"{what}: found must be a bool, not {self.found!r}")
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
        w.u8(self.found)
        w.u32(len(self.transport_state)).bytes(self.transport_state)
        w.u32(len(self.app_state)).bytes(self.app_state)

    @classmethod
    def _read_body(cls, sender: str, seq: int, r: Reader) -> StateReply:
        query_id = r.u64("query id")
        key = ConnectionKey._read(r)
        found = read_flag(r, "found flag")
        transport = r.bytes(r.u32("transport state length"), "transport state")
        app = r.bytes(r.u32("application state length"), "application state")
        return cls(sender, seq, query_id, key, found, transport, app)


def _as_pins(what: str, keys: Iterable[Iterable[object]]) -> tuple[PinKey, ...]:
    pins = records(what, "keys", keys, PinKey)
    if not 1 <= len(pins) <= MAX_PIN_KEYS:
        raise WireError(f"{what}: {len(pins)} keys, not 1..{MAX_PIN_KEYS}")
    for client, port in pins:
        check_address(what, "client", client)
        check_uint(what, "port", port, U16)
    return pins


def _write_pins(w: Writer, keys: tuple[PinKey, ...]) -> None:
    w.u16(len(keys))
    for client, port in keys:
        write_address(w, client)
        w.u16(port)


def _read_pins(r: Reader) -> tuple[PinKey, ...]:
    count = read_count(r, "pin keys", 7, MAX_PIN_KEYS)
    return tuple(PinKey(read_address(r, "client"), r.u16("port")) for _ in range(count))


@control_message
@dataclass(frozen=True, slots=True)
class PinRequest(Envelope):
    """R4 (Fig 16, 1600), to routers: keep these clients' packets going to `server`
    whatever the allocation, until idle for `idle_timeout_ms`."""

    TYPE: ClassVar[MessageType] = MessageType.PIN_REQUEST
    server: Address
    idle_timeout_ms: int
    keys: tuple[PinKey, ...]

    def _check(self, what: str) -> None:
        check_address(what, "server", self.server)
        check_uint(what, "idle_timeout_ms", self.idle_timeout_ms, U32, low=1)
        set_field(self, "keys", _as_pins(what, self.keys))

    def _write_body(self, w: Writer) -> None:
        write_address(w, self.server)
        w.u32(self.idle_timeout_ms)
        _write_pins(w, self.keys)

    @classmethod
    def _read_body(cls, sender: str, seq: int, r: Reader) -> PinRequest:
        server = read_address(r, "server")
        timeout = r.u32("idle timeout")
        return cls(sender, seq, server, timeout, _read_pins(r))


@control_message
@dataclass(frozen=True, slots=True)
class Unpin(Envelope):
    """R4 (Fig 16, 1630): the pinned paths of these keys may be broken down."""

    TYPE: ClassVar[MessageType] = MessageType.UNPIN
    keys: tuple[PinKey, ...]

    def _check(self, what: str) -> None:
        set_field(self, "keys", _as_pins(what, self.keys))

    def _write_body(self, w: Writer) -> None:
        _write_pins(w, self.keys)

    @classmethod
    def _read_body(cls, sender: str, seq: int, r: Reader) -> Unpin:
        return cls(sender, seq, _read_pins(r))
