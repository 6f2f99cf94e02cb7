"""The envelope every control message shares, and the one decoder that dispatches on it.

Each message class registers itself with `@control_message`, so `decode` knows
every type whose module is imported; the package imports them all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, ClassVar, Self, TypeVar, cast

from manycast.wire.control.fields import U32, check_id, check_uint, read_enum, read_id, write_id
from manycast.wire.cursor import Reader, Writer
from manycast.wire.errors import WireError

if TYPE_CHECKING:
    from manycast.wire.control import ControlMessage

MAGIC = b"MC"
VERSION = 1
ENVELOPE_FIXED = len(MAGIC) + 1 + 1 + 1 + 4  # magic, version, type, sender length, seq


class MessageType(IntEnum):
    HEARTBEAT = 1
    COMMAND = 2
    PROPOSAL = 3
    ACK = 4
    COMMIT = 5
    SNAPSHOT_REQUEST = 6
    SNAPSHOT = 7
    FORWARDED = 8
    REDIRECT = 9
    STATE_QUERY = 10
    STATE_REPLY = 11
    # 12 and 13 were R4's per-hop pin request and unpin, retired: R4 tags connections
    # onto label-switched trees (FLOW_TAG, FLOW_UNTAG). Not reused, so an old
    # sender's pin is refused as an unknown type.
    SERVER_HELLO = 14
    LABEL_MAPPING = 15
    FLOW_TAG = 16
    FLOW_UNTAG = 17
    VIP_ADVERT = 18
    LOAD_REPORT = 19
    MOVE_CONNECTION = 20
    MOVE_ACK = 21
    MEMBER_DOWN = 22
    PROBE = 23
    MEMBER_NOTICE = 24


@dataclass(frozen=True, slots=True)
class Envelope:
    """Fields every control message carries: who sent it and its sequence number."""

    TYPE: ClassVar[MessageType]
    sender: str
    seq: int

    def __post_init__(self) -> None:
        what = type(self).__name__
        check_id(what, "sender", self.sender)
        check_uint(what, "seq", self.seq, U32)
        self._check(what)

    def _check(self, what: str) -> None:
        raise NotImplementedError

    def _write_body(self, w: Writer) -> None:
        raise NotImplementedError

    @classmethod
    def _read_body(cls, sender: str, seq: int, r: Reader) -> Self:
        raise NotImplementedError

    def to_wire(self) -> bytes:
        w = Writer().bytes(MAGIC).u8(VERSION).u8(self.TYPE)
        write_id(w, self.sender)
        w.u32(self.seq)
        self._write_body(w)
        return w.getvalue()

    @classmethod
    def from_wire(cls, data: bytes | bytearray | memoryview) -> Self:
        message = decode(data)
        if not isinstance(message, cls):
            raise WireError(f"expected a {cls.__name__}, got a {type(message).__name__}")
        return message


_READERS: dict[MessageType, Callable[[str, int, Reader], Envelope]] = {}

_M = TypeVar("_M", bound=Envelope)


def control_message(cls: type[_M]) -> type[_M]:
    """Class decorator (outside `@dataclass`): `decode` reads type `cls.TYPE` as a `cls`."""
    if cls.TYPE in _READERS:
        raise TypeError(f"{cls.__name__}: message type {cls.TYPE.name} is registered twice")
    _READERS[cls.TYPE] = cls._read_body
    return cls


def registered_types() -> frozenset[MessageType]:
    """The message types `decode` can read (every one, once the package is imported)."""
    return frozenset(_READERS)


def decode(data: bytes | bytearray | memoryview) -> ControlMessage:
    """One control message; `WireError` for anything that is not exactly one."""
    r = Reader(data, "control message")
    magic = r.bytes(len(MAGIC), "magic")
    if magic != MAGIC:
        raise WireError(f"control message: bad magic {magic!r}, expected {MAGIC!r}")
    version = r.u8("version")
    if version != VERSION:
        raise WireError(f"control message: version {version}, only {VERSION} is known")
    kind = read_enum(r, MessageType, r.u8("type"), "control message type")
    r.what = f"control {kind.name}"
    sender = read_id(r, "sender")
    seq = r.u32("seq")
    message = _READERS[kind](sender, seq, r)
    r.expect_end()
    # Only the message classes of the ControlMessage union register themselves.
    return cast("ControlMessage", message)


def encode(message: ControlMessage) -> bytes:
    return message.to_wire()
