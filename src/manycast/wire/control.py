"""Messages on the pool's control multicast channel (seed Fig 13-16).

Every server of a pool joins one control multicast group (Fig 13, 1300). Over it
the servers announce themselves (`Heartbeat`), agree on allocation changes
(`Command`, `Proposal`, `Ack`, `Commit`), fetch the allocation (`SnapshotRequest`,
`Snapshot`) and keep existing connections when their part of the space moves:
packets forwarded to the old owner, which then asks for them point to point
(R2, Fig 14: `Forwarded`, `Redirect`), state transferred on demand (R3, Fig 15:
`StateQuery`, `StateReply`), and per-connection paths pinned at routers (R4,
Fig 16: `PinRequest`, `Unpin`). The messages travel as UDP payloads of inner IP
packets.

Layout, big-endian, field widths in bits:

    envelope  "MC" version(8)=1 type(8) sender-length(8) sender seq(32) body
    address   family(8)=4|6, then 4 or 16 bytes
    id        length(8), then 1..64 bytes of UTF-8
    share     numerator(32) denominator(32): in lowest terms, 0 <= n/d <= 1
    digest    8 bytes: the 16 hex characters of Allocation.digest(), as raw bytes
    key       client-address client-port(16) group-address service-port(16)
    space     family(8) prefix-value prefix-length(8) index-bits(8) shift(8) flags(8)
              (flags bit 0: interleave; other bits zero)

    type body
     1  Heartbeat       epoch(64) digest state(8) address load(f64) sessions(32) interval-ms(32)
     2  Command         command-id(64) op
     3  Proposal        epoch(64) base-epoch(64) base-digest digest delay-ms(32) op
     4  Ack             epoch(64) digest
     5  Commit          epoch(64) digest
     6  SnapshotRequest epoch(64)  (0: the latest)
     7  Snapshot        epoch(64) digest part(16) count(16) space
                        server-count(16) id...  run-count(16) (start(32) stop(32) server(16))...
     8  Forwarded       receiver-address packet-length(16) packet
     9  Redirect        client-address client-port(16) service-port(16)
                        target-address target-port(16)
    10  StateQuery      query-id(64) key
    11  StateReply      query-id(64) key found(8) length(32) transport-state
                        length(32) application-state
    12  PinRequest      server-address idle-timeout-ms(32) count(16) (address port(16))...
    13  Unpin           count(16) (address port(16))...

    op  kind(8), then
     1  ADD_SERVER      id has-share(8) [share]
     2  REMOVE_SERVER   id
     3  SET_SHARE       id share
     4  REBALANCE       target(f64) count(16) (bucket(32) load(f64))...
     5  REPLACE         snapshot-epoch(64) digest

Strictness: a decoder accepts only bytes that re-encode identically, so flags
are 0 or 1, fractions are in lowest terms, lists are in their canonical order
(sorted, no duplicates) and nothing may follow the body. Every check lives in
the dataclasses' `__post_init__`, so a message that cannot be decoded cannot be
built either, and both raise `WireError`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from fractions import Fraction
from ipaddress import IPv4Address, IPv6Address
from typing import ClassVar, NamedTuple, Self, TypeAlias, TypeVar

import numpy as np

from manycast.space import AddressSpace, Allocation, Portion, SpaceError
from manycast.wire.cursor import Reader, Writer
from manycast.wire.errors import WireError

MAGIC = b"MC"
VERSION = 1
MAX_ID_BYTES = 64
# Lists a receiver must hold in memory are capped well below what their u16
# counts allow, so one datagram cannot make a server allocate much.
MAX_BUCKET_LOADS = 1024
MAX_PIN_KEYS = 1024
MAX_PACKET = 0xFFFF
SNAPSHOT_MAX_BYTES = 1400

_U16 = 0xFFFF
_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1
_ENVELOPE_FIXED = len(MAGIC) + 1 + 1 + 1 + 4

Address: TypeAlias = IPv4Address | IPv6Address


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
    PIN_REQUEST = 12
    UNPIN = 13


class ServerState(IntEnum):
    JOINING = 1
    ACTIVE = 2
    LEAVING = 3


class OpKind(IntEnum):
    ADD_SERVER = 1
    REMOVE_SERVER = 2
    SET_SHARE = 3
    REBALANCE = 4
    REPLACE = 5
    BALANCE_LOADS = 6


# --- field checks and codecs ------------------------------------------------------------


def _check_uint(what: str, name: str, value: object, top: int, low: int = 0) -> None:
    # bool is an int subclass, but True for a port is a caller's mistake.
    if isinstance(value, bool) or not isinstance(value, int):
        raise WireError(f"{what}: {name} must be an int, not {type(value).__name__}")
    if not low <= value <= top:
        raise WireError(f"{what}: {name} {value} out of range {low}..{top}")


def _check_id(what: str, name: str, value: object) -> None:
    if not isinstance(value, str):
        raise WireError(f"{what}: {name} must be a str, not {type(value).__name__}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise WireError(f"{what}: {name} {value!r} is not encodable as UTF-8") from None
    if not 1 <= size <= MAX_ID_BYTES:
        raise WireError(f"{what}: {name} {value!r} is {size} bytes of UTF-8, not 1..{MAX_ID_BYTES}")


def _check_address(what: str, name: str, value: object) -> None:
    if not isinstance(value, IPv4Address | IPv6Address):
        raise WireError(f"{what}: {name} must be an IPv4Address or IPv6Address, not {value!r}")


def _check_digest(what: str, name: str, value: object) -> None:
    if not (
        isinstance(value, str) and len(value) == 16 and all(c in "0123456789abcdef" for c in value)
    ):
        raise WireError(f"{what}: {name} must be 16 lowercase hex characters, not {value!r}")


def _as_share(what: str, value: object) -> Fraction:
    # Floats are refused: a share must mean the same on every server.
    if isinstance(value, bool) or not isinstance(value, Fraction | int):
        raise WireError(f"{what}: share must be a Fraction, not {type(value).__name__}")
    share = Fraction(value)
    if not 0 <= share <= 1:
        raise WireError(f"{what}: share {share} is not between 0 and 1")
    if share.denominator > _U32:
        raise WireError(f"{what}: share {share} has a denominator wider than 32 bits")
    return share


_T = TypeVar("_T")


def _set(obj: object, name: str, value: object) -> None:
    """Store a normalised field value on a frozen dataclass during validation."""
    object.__setattr__(obj, name, value)


def _records(
    what: str, name: str, values: Iterable[Iterable[object]], kind: Callable[..., _T]
) -> tuple[_T, ...]:
    """`values` as a tuple of records, so lists and plain tuples compare like decoded ones."""
    try:
        return tuple(kind(*v) for v in values)
    except TypeError:
        raise WireError(f"{what}: {name} must be a sequence of records, not {values!r}") from None


def _as_bytes(what: str, name: str, value: object) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise WireError(f"{what}: {name} must be bytes, not {type(value).__name__}")
    return bytes(value)


def _check_real(what: str, name: str, value: object, low: float) -> None:
    if isinstance(value, bool) or not isinstance(value, float | int):
        raise WireError(f"{what}: {name} must be a float, not {type(value).__name__}")
    if not (math.isfinite(value) and value >= low):
        raise WireError(f"{what}: {name} {value} must be finite and at least {low}")


def _write_id(w: Writer, value: str) -> None:
    raw = value.encode("utf-8")
    w.u8(len(raw)).bytes(raw)


def _read_id(r: Reader, name: str) -> str:
    size = r.u8(f"{name} length")
    if not 1 <= size <= MAX_ID_BYTES:
        raise WireError(f"{r.what}: {name} length {size} is not 1..{MAX_ID_BYTES}")
    raw = r.bytes(size, name)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise WireError(f"{r.what}: {name} {raw!r} is not valid UTF-8") from None


def _write_address(w: Writer, value: Address) -> None:
    w.u8(value.version).bytes(value.packed)


def _read_address(r: Reader, name: str) -> Address:
    family = r.u8(f"{name} family")
    if family == 4:
        return IPv4Address(r.bytes(4, name))
    if family == 6:
        return IPv6Address(r.bytes(16, name))
    raise WireError(f"{r.what}: {name} family {family} is neither 4 nor 6")


def _write_digest(w: Writer, value: str) -> None:
    w.bytes(bytes.fromhex(value))


def _read_digest(r: Reader, name: str) -> str:
    return r.bytes(8, name).hex()


def _write_share(w: Writer, value: Fraction) -> None:
    w.u32(value.numerator).u32(value.denominator)


def _read_share(r: Reader) -> Fraction:
    numerator, denominator = r.u32("share numerator"), r.u32("share denominator")
    if denominator == 0:
        raise WireError(f"{r.what}: share denominator is zero")
    if math.gcd(numerator, denominator) != 1:
        raise WireError(f"{r.what}: share {numerator}/{denominator} is not in lowest terms")
    return Fraction(numerator, denominator)


def _read_flag(r: Reader, name: str) -> bool:
    value = r.u8(name)
    if value > 1:
        raise WireError(f"{r.what}: {name} must be 0 or 1, not {value}")
    return value == 1


def _read_count(r: Reader, name: str, item_min: int, limit: int) -> int:
    """A u16 list count, checked against `limit` and the bytes left before any allocation."""
    count = r.u16(f"{name} count")
    if count > limit:
        raise WireError(f"{r.what}: {count} {name}, at most {limit}")
    if count * item_min > r.remaining:
        raise WireError(
            f"{r.what}: {count} {name} need at least {count * item_min} bytes, {r.remaining} left"
        )
    return count


_E = TypeVar("_E", bound=IntEnum)


def _enum(r: Reader, kind: type[_E], value: int, name: str) -> _E:
    try:
        return kind(value)
    except ValueError:
        raise WireError(f"{r.what}: unknown {name} {value}") from None


# --- shared parts -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectionKey:
    """One client connection to the pool's group address."""

    client: Address
    client_port: int
    group: Address
    service_port: int

    def __post_init__(self) -> None:
        what = "connection key"
        _check_address(what, "client", self.client)
        _check_address(what, "group", self.group)
        if self.client.version != self.group.version:
            raise WireError(f"{what}: client {self.client} and group {self.group} mix families")
        _check_uint(what, "client_port", self.client_port, _U16)
        _check_uint(what, "service_port", self.service_port, _U16)

    def _write(self, w: Writer) -> None:
        _write_address(w, self.client)
        w.u16(self.client_port)
        _write_address(w, self.group)
        w.u16(self.service_port)

    @classmethod
    def _read(cls, r: Reader) -> ConnectionKey:
        client = _read_address(r, "client")
        client_port = r.u16("client port")
        group = _read_address(r, "group")
        return cls(client, client_port, group, r.u16("service port"))


class PinKey(NamedTuple):
    """A client's connections to pin: one port, or 0 for all of its ports."""

    client: Address
    port: int = 0


class BucketLoad(NamedTuple):
    bucket: int
    load: float


class Run(NamedTuple):
    """Buckets start..stop-1 owned by the server at `server` in the part's id list."""

    start: int
    stop: int
    server: int


# --- policy operations ------------------------------------------------------------------


class _Op:
    """What every policy operation shares: a kind byte, then its fields."""

    __slots__ = ()
    KIND: ClassVar[OpKind]

    def _write(self, w: Writer) -> None:
        raise NotImplementedError

    def to_wire(self) -> bytes:
        w = Writer().u8(self.KIND)
        self._write(w)
        return w.getvalue()

    @classmethod
    def from_wire(cls, data: bytes | bytearray | memoryview) -> Self:
        op = decode_op(data)
        if not isinstance(op, cls):
            raise WireError(f"expected a {cls.__name__}, got a {type(op).__name__}")
        return op


@dataclass(frozen=True, slots=True)
class AddServerOp(_Op):
    """A server joins with `share` (None: an equal share), as `policy.add_server`."""

    KIND: ClassVar[OpKind] = OpKind.ADD_SERVER
    server: str
    share: Fraction | None = None

    def __post_init__(self) -> None:
        _check_id("ADD_SERVER", "server", self.server)
        if self.share is not None:
            _set(self, "share", _as_share("ADD_SERVER", self.share))

    def _write(self, w: Writer) -> None:
        _write_id(w, self.server)
        w.u8(self.share is not None)
        if self.share is not None:
            _write_share(w, self.share)

    @classmethod
    def _read(cls, r: Reader) -> AddServerOp:
        server = _read_id(r, "server")
        return cls(server, _read_share(r) if _read_flag(r, "has-share flag") else None)


@dataclass(frozen=True, slots=True)
class RemoveServerOp(_Op):
    """A server leaves; only its buckets move, as `policy.remove_server`."""

    KIND: ClassVar[OpKind] = OpKind.REMOVE_SERVER
    server: str

    def __post_init__(self) -> None:
        _check_id("REMOVE_SERVER", "server", self.server)

    def _write(self, w: Writer) -> None:
        _write_id(w, self.server)

    @classmethod
    def _read(cls, r: Reader) -> RemoveServerOp:
        return cls(_read_id(r, "server"))


@dataclass(frozen=True, slots=True)
class SetShareOp(_Op):
    """One server's share changes (Fig 11: 25% -> 20%), as `policy.set_share`."""

    KIND: ClassVar[OpKind] = OpKind.SET_SHARE
    server: str
    share: Fraction

    def __post_init__(self) -> None:
        _check_id("SET_SHARE", "server", self.server)
        _set(self, "share", _as_share("SET_SHARE", self.share))

    def _write(self, w: Writer) -> None:
        _write_id(w, self.server)
        _write_share(w, self.share)

    @classmethod
    def _read(cls, r: Reader) -> SetShareOp:
        server = _read_id(r, "server")
        return cls(server, _read_share(r))


@dataclass(frozen=True, slots=True)
class RebalanceOp(_Op):
    """Bring max/mean server load to `target`, given the loads of the busiest buckets
    (buckets not listed count as idle), as `policy.rebalance`."""

    KIND: ClassVar[OpKind] = OpKind.REBALANCE
    target: float
    loads: tuple[BucketLoad, ...] = ()

    def __post_init__(self) -> None:
        what = "REBALANCE"
        _check_real(what, "target", self.target, 1.0)
        _set(self, "loads", _records(what, "loads", self.loads, BucketLoad))
        if len(self.loads) > MAX_BUCKET_LOADS:
            raise WireError(f"{what}: {len(self.loads)} bucket loads, at most {MAX_BUCKET_LOADS}")
        previous = -1
        for bucket, load in self.loads:
            _check_uint(what, "bucket", bucket, _U32)
            _check_real(what, f"load of bucket {bucket}", load, 0.0)
            if bucket <= previous:
                raise WireError(f"{what}: buckets must be listed in increasing order")
            previous = bucket

    def _write(self, w: Writer) -> None:
        w.f64(self.target).u16(len(self.loads))
        for bucket, load in self.loads:
            w.u32(bucket).f64(load)

    @classmethod
    def _read(cls, r: Reader) -> RebalanceOp:
        target = r.f64("target")
        count = _read_count(r, "bucket loads", 12, MAX_BUCKET_LOADS)
        loads = tuple(BucketLoad(r.u32("bucket"), r.f64("load")) for _ in range(count))
        return cls(target, loads)


@dataclass(frozen=True, slots=True)
class ReplaceOp(_Op):
    """Replace the whole allocation. It travels separately, as the `Snapshot` parts
    with this epoch and digest, because one allocation may need many datagrams."""

    KIND: ClassVar[OpKind] = OpKind.REPLACE
    snapshot_epoch: int
    digest: str

    def __post_init__(self) -> None:
        _check_uint("REPLACE", "snapshot_epoch", self.snapshot_epoch, _U64)
        _check_digest("REPLACE", "digest", self.digest)

    def _write(self, w: Writer) -> None:
        w.u64(self.snapshot_epoch)
        _write_digest(w, self.digest)

    @classmethod
    def _read(cls, r: Reader) -> ReplaceOp:
        epoch = r.u64("snapshot epoch")
        return cls(epoch, _read_digest(r, "digest"))


class ServerLoad(NamedTuple):
    server: str
    load: float


@dataclass(frozen=True, slots=True)
class BalanceLoadsOp(_Op):
    """The closed loop's rebalance (Fig 10, step 1020): bring max/mean server load to
    `target` given each server's measured load and, from the congested server, the
    loads of its busiest buckets (`hot`); the rest of a server's load counts as
    spread evenly over its other buckets."""

    KIND: ClassVar[OpKind] = OpKind.BALANCE_LOADS
    target: float
    loads: tuple[ServerLoad, ...] = ()
    hot: tuple[BucketLoad, ...] = ()

    def __post_init__(self) -> None:
        what = "BALANCE_LOADS"
        _check_real(what, "target", self.target, 1.0)
        _set(self, "loads", _records(what, "loads", self.loads, ServerLoad))
        _set(self, "hot", _records(what, "hot", self.hot, BucketLoad))
        if len(self.loads) > MAX_BUCKET_LOADS or len(self.hot) > MAX_BUCKET_LOADS:
            raise WireError(f"{what}: more than {MAX_BUCKET_LOADS} loads")
        names = [server for server, _ in self.loads]
        if names != sorted(set(names)):
            raise WireError(f"{what}: servers must be listed once each, in order")
        for server, load in self.loads:
            _check_id(what, "server", server)
            _check_real(what, f"load of {server}", load, 0.0)
        previous = -1
        for bucket, load in self.hot:
            _check_uint(what, "bucket", bucket, _U32)
            _check_real(what, f"load of bucket {bucket}", load, 0.0)
            if bucket <= previous:
                raise WireError(f"{what}: hot buckets must be listed in increasing order")
            previous = bucket

    def _write(self, w: Writer) -> None:
        w.f64(self.target).u16(len(self.loads))
        for server, load in self.loads:
            _write_id(w, server)
            w.f64(load)
        w.u16(len(self.hot))
        for bucket, load in self.hot:
            w.u32(bucket).f64(load)

    @classmethod
    def _read(cls, r: Reader) -> BalanceLoadsOp:
        target = r.f64("target")
        count = _read_count(r, "server loads", 10, MAX_BUCKET_LOADS)
        loads = tuple(ServerLoad(_read_id(r, "server"), r.f64("load")) for _ in range(count))
        count = _read_count(r, "hot buckets", 12, MAX_BUCKET_LOADS)
        hot = tuple(BucketLoad(r.u32("bucket"), r.f64("load")) for _ in range(count))
        return cls(target, loads, hot)


PolicyOp: TypeAlias = (
    AddServerOp | RemoveServerOp | SetShareOp | RebalanceOp | ReplaceOp | BalanceLoadsOp
)

_OP_READERS: dict[OpKind, Callable[[Reader], PolicyOp]] = {
    OpKind.ADD_SERVER: AddServerOp._read,
    OpKind.REMOVE_SERVER: RemoveServerOp._read,
    OpKind.SET_SHARE: SetShareOp._read,
    OpKind.REBALANCE: RebalanceOp._read,
    OpKind.REPLACE: ReplaceOp._read,
    OpKind.BALANCE_LOADS: BalanceLoadsOp._read,
}


def _check_op(what: str, op: object) -> None:
    if not isinstance(
        op, AddServerOp | RemoveServerOp | SetShareOp | RebalanceOp | ReplaceOp | BalanceLoadsOp
    ):
        raise WireError(f"{what}: op must be a policy operation, not {type(op).__name__}")


def _write_op(w: Writer, op: PolicyOp) -> None:
    w.u8(op.KIND)
    op._write(w)


def _read_op(r: Reader) -> PolicyOp:
    kind = _enum(r, OpKind, r.u8("op kind"), "policy op kind")
    return _OP_READERS[kind](r)


def encode_op(op: PolicyOp) -> bytes:
    """A policy operation on its own, as embedded in `Command` and `Proposal`."""
    return op.to_wire()


def decode_op(data: bytes | bytearray | memoryview) -> PolicyOp:
    r = Reader(data, "policy op")
    op = _read_op(r)
    r.expect_end()
    return op


# --- messages ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Envelope:
    """Fields every control message carries: who sent it and its sequence number."""

    TYPE: ClassVar[MessageType]
    sender: str
    seq: int

    def __post_init__(self) -> None:
        what = type(self).__name__
        _check_id(what, "sender", self.sender)
        _check_uint(what, "seq", self.seq, _U32)
        self._check(what)

    def _check(self, what: str) -> None:
        raise NotImplementedError

    def _write_body(self, w: Writer) -> None:
        raise NotImplementedError

    def to_wire(self) -> bytes:
        w = Writer().bytes(MAGIC).u8(VERSION).u8(self.TYPE)
        _write_id(w, self.sender)
        w.u32(self.seq)
        self._write_body(w)
        return w.getvalue()

    @classmethod
    def from_wire(cls, data: bytes | bytearray | memoryview) -> Self:
        message = decode(data)
        if not isinstance(message, cls):
            raise WireError(f"expected a {cls.__name__}, got a {type(message).__name__}")
        return message


@dataclass(frozen=True, slots=True)
class Heartbeat(_Envelope):
    """A server's periodic announcement: which allocation it runs, its state and load.
    `interval_ms` says when peers should expect the next one."""

    TYPE: ClassVar[MessageType] = MessageType.HEARTBEAT
    epoch: int
    digest: str
    state: ServerState
    address: Address
    load: float
    sessions: int
    interval_ms: int

    def _check(self, what: str) -> None:
        _check_uint(what, "epoch", self.epoch, _U64)
        _check_digest(what, "digest", self.digest)
        if not isinstance(self.state, ServerState):
            raise WireError(f"{what}: state must be a ServerState, not {self.state!r}")
        _check_address(what, "address", self.address)
        _check_real(what, "load", self.load, 0.0)
        _check_uint(what, "sessions", self.sessions, _U32)
        _check_uint(what, "interval_ms", self.interval_ms, _U32, low=1)

    def _write_body(self, w: Writer) -> None:
        w.u64(self.epoch)
        _write_digest(w, self.digest)
        w.u8(self.state)
        _write_address(w, self.address)
        w.f64(self.load).u32(self.sessions).u32(self.interval_ms)

    @classmethod
    def _read_body(cls, sender: str, seq: int, r: Reader) -> Heartbeat:
        epoch = r.u64("epoch")
        digest = _read_digest(r, "digest")
        state = _enum(r, ServerState, r.u8("state"), "server state")
        address = _read_address(r, "address")
        load = r.f64("load")
        sessions = r.u32("sessions")
        return cls(sender, seq, epoch, digest, state, address, load, sessions, r.u32("interval"))


@dataclass(frozen=True, slots=True)
class Command(_Envelope):
    """An operator's request to the pool; `command_id` lets the operator match outcomes."""

    TYPE: ClassVar[MessageType] = MessageType.COMMAND
    command_id: int
    op: PolicyOp

    def _check(self, what: str) -> None:
        _check_uint(what, "command_id", self.command_id, _U64)
        _check_op(what, self.op)

    def _write_body(self, w: Writer) -> None:
        w.u64(self.command_id)
        _write_op(w, self.op)

    @classmethod
    def _read_body(cls, sender: str, seq: int, r: Reader) -> Command:
        command_id = r.u64("command id")
        return cls(sender, seq, command_id, _read_op(r))


@dataclass(frozen=True, slots=True)
class Proposal(_Envelope):
    """Allocation `epoch` is `op` applied to `base_epoch`; it hashes to `digest`.
    Servers apply it `delay_ms` after receipt so all of them switch at about the
    same time (Fig 13: policy updates distributed before they are executed)."""

    TYPE: ClassVar[MessageType] = MessageType.PROPOSAL
    epoch: int
    base_epoch: int
    base_digest: str
    digest: str
    delay_ms: int
    op: PolicyOp

    def _check(self, what: str) -> None:
        _check_uint(what, "epoch", self.epoch, _U64)
        _check_uint(what, "base_epoch", self.base_epoch, _U64)
        if self.epoch <= self.base_epoch:
            raise WireError(f"{what}: epoch {self.epoch} does not follow base {self.base_epoch}")
        _check_digest(what, "base_digest", self.base_digest)
        _check_digest(what, "digest", self.digest)
        _check_uint(what, "delay_ms", self.delay_ms, _U32)
        _check_op(what, self.op)

    def _write_body(self, w: Writer) -> None:
        w.u64(self.epoch).u64(self.base_epoch)
        _write_digest(w, self.base_digest)
        _write_digest(w, self.digest)
        w.u32(self.delay_ms)
        _write_op(w, self.op)

    @classmethod
    def _read_body(cls, sender: str, seq: int, r: Reader) -> Proposal:
        epoch, base_epoch = r.u64("epoch"), r.u64("base epoch")
        base_digest = _read_digest(r, "base digest")
        digest = _read_digest(r, "digest")
        delay = r.u32("delay")
        return cls(sender, seq, epoch, base_epoch, base_digest, digest, delay, _read_op(r))


@dataclass(frozen=True, slots=True)
class _EpochDigest(_Envelope):
    epoch: int
    digest: str

    def _check(self, what: str) -> None:
        _check_uint(what, "epoch", self.epoch, _U64)
        _check_digest(what, "digest", self.digest)

    def _write_body(self, w: Writer) -> None:
        w.u64(self.epoch)
        _write_digest(w, self.digest)

    @classmethod
    def _read_body(cls, sender: str, seq: int, r: Reader) -> Self:
        epoch = r.u64("epoch")
        return cls(sender, seq, epoch, _read_digest(r, "digest"))


@dataclass(frozen=True, slots=True)
class Ack(_EpochDigest):
    """A server has proposal `epoch` and computed the same `digest`."""

    TYPE: ClassVar[MessageType] = MessageType.ACK


@dataclass(frozen=True, slots=True)
class Commit(_EpochDigest):
    """Proposal `epoch` with `digest` is final."""

    TYPE: ClassVar[MessageType] = MessageType.COMMIT


@dataclass(frozen=True, slots=True)
class SnapshotRequest(_Envelope):
    """Ask for the allocation of `epoch` (0: the latest), answered by `Snapshot` parts."""

    TYPE: ClassVar[MessageType] = MessageType.SNAPSHOT_REQUEST
    epoch: int = 0

    def _check(self, what: str) -> None:
        _check_uint(what, "epoch", self.epoch, _U64)

    def _write_body(self, w: Writer) -> None:
        w.u64(self.epoch)

    @classmethod
    def _read_body(cls, sender: str, seq: int, r: Reader) -> SnapshotRequest:
        return cls(sender, seq, r.u64("epoch"))


def _prefix_length(portion: Portion) -> int:
    return bin(portion.mask).count("1")


def _write_space(w: Writer, space: AddressSpace) -> None:
    prefix = space.prefix
    w.u8(prefix.family).uint(prefix.width // 8, prefix.value)
    w.u8(_prefix_length(prefix)).u8(space.bits).u8(space.shift).u8(space.interleave)


def _read_space(r: Reader) -> AddressSpace:
    family = r.u8("space family")
    if family not in (4, 6):
        raise WireError(f"{r.what}: space family {family} is neither 4 nor 6")
    width = 32 if family == 4 else 128
    value = r.uint(width // 8, "space prefix")
    length = r.u8("space prefix length")
    if length > width:
        raise WireError(f"{r.what}: prefix length {length} exceeds {width}")
    bits, shift = r.u8("index bits"), r.u8("index shift")
    interleave = _read_flag(r, "interleave flag")
    mask = ((1 << width) - 1) ^ ((1 << (width - length)) - 1)
    try:
        return AddressSpace(Portion(family, value, mask), bits, shift, interleave)
    except SpaceError as exc:
        raise WireError(f"{r.what}: bad address space: {exc}") from None


def _space_bytes(space: AddressSpace) -> int:
    return 1 + space.prefix.width // 8 + 4


@dataclass(frozen=True, slots=True)
class Snapshot(_Envelope):
    """Part `part` of `count` of the allocation of `epoch`.

    Each part repeats the space and lists only the server ids its runs name (and,
    in some part, the servers that hold nothing), so every part stays one small
    datagram; `assemble()` puts the parts together and checks them.
    """

    TYPE: ClassVar[MessageType] = MessageType.SNAPSHOT
    epoch: int
    digest: str
    part: int
    count: int
    space: AddressSpace
    servers: tuple[str, ...]
    runs: tuple[Run, ...]

    def _check(self, what: str) -> None:
        _check_uint(what, "epoch", self.epoch, _U64)
        _check_digest(what, "digest", self.digest)
        _check_uint(what, "count", self.count, _U16, low=1)
        _check_uint(what, "part", self.part, self.count - 1)
        if not isinstance(self.space, AddressSpace):
            raise WireError(f"{what}: space must be an AddressSpace, not {self.space!r}")
        servers: object = self.servers
        if isinstance(servers, str) or not isinstance(servers, Iterable):
            raise WireError(f"{what}: servers must be a sequence of ids, not {servers!r}")
        _set(self, "servers", tuple(servers))
        _set(self, "runs", _records(what, "runs", self.runs, Run))
        if len(self.servers) > _U16 or len(self.runs) > _U16:
            raise WireError(f"{what}: at most {_U16} servers and {_U16} runs per part")
        for name in self.servers:
            _check_id(what, "server", name)
        if any(a >= b for a, b in itertools.pairwise(self.servers)):
            raise WireError(f"{what}: server ids must be sorted and distinct")
        buckets = self.space.buckets
        previous = 0
        for start, stop, index in self.runs:
            _check_uint(what, "run start", start, _U32)
            _check_uint(what, "run stop", stop, buckets, low=start + 1)
            _check_uint(what, "run server", index, len(self.servers) - 1)
            if start < previous:
                raise WireError(f"{what}: runs must be in order and must not overlap")
            previous = stop

    def _write_body(self, w: Writer) -> None:
        w.u64(self.epoch)
        _write_digest(w, self.digest)
        w.u16(self.part).u16(self.count)
        _write_space(w, self.space)
        w.u16(len(self.servers))
        for name in self.servers:
            _write_id(w, name)
        w.u16(len(self.runs))
        for start, stop, index in self.runs:
            w.u32(start).u32(stop).u16(index)

    @classmethod
    def _read_body(cls, sender: str, seq: int, r: Reader) -> Snapshot:
        epoch = r.u64("epoch")
        digest = _read_digest(r, "digest")
        part, count = r.u16("part"), r.u16("part count")
        space = _read_space(r)
        servers = tuple(_read_id(r, "server") for _ in range(_read_count(r, "servers", 2, _U16)))
        runs = tuple(
            Run(r.u32("run start"), r.u32("run stop"), r.u16("run server"))
            for _ in range(_read_count(r, "runs", 10, _U16))
        )
        return cls(sender, seq, epoch, digest, part, count, space, servers, runs)


@dataclass(frozen=True, slots=True)
class Forwarded(_Envelope):
    """R2 (Fig 14): an inner IP packet that `receiver` got for a connection it has no
    state for, sent on to the old owner, which can then answer `receiver` directly."""

    TYPE: ClassVar[MessageType] = MessageType.FORWARDED
    receiver: Address
    packet: bytes

    def _check(self, what: str) -> None:
        _check_address(what, "receiver", self.receiver)
        _set(self, "packet", _as_bytes(what, "packet", self.packet))
        if not 1 <= len(self.packet) <= MAX_PACKET:
            raise WireError(f"{what}: packet of {len(self.packet)} bytes, not 1..{MAX_PACKET}")
        if self.packet[0] >> 4 not in (4, 6):
            raise WireError(f"{what}: packet is not IPv4 or IPv6 (version {self.packet[0] >> 4})")

    def _write_body(self, w: Writer) -> None:
        _write_address(w, self.receiver)
        w.u16(len(self.packet)).bytes(self.packet)

    @classmethod
    def _read_body(cls, sender: str, seq: int, r: Reader) -> Forwarded:
        receiver = _read_address(r, "receiver")
        return cls(sender, seq, receiver, r.bytes(r.u16("packet length"), "packet"))


@dataclass(frozen=True, slots=True)
class Redirect(_Envelope):
    """R2 (Fig 14, 1430): the old owner asks that packets of this connection be sent
    to it point to point at (target, target_port) instead of over the channel."""

    TYPE: ClassVar[MessageType] = MessageType.REDIRECT
    client: Address
    client_port: int
    service_port: int
    target: Address
    target_port: int

    def _check(self, what: str) -> None:
        _check_address(what, "client", self.client)
        _check_uint(what, "client_port", self.client_port, _U16)
        _check_uint(what, "service_port", self.service_port, _U16)
        _check_address(what, "target", self.target)
        _check_uint(what, "target_port", self.target_port, _U16)

    def _write_body(self, w: Writer) -> None:
        _write_address(w, self.client)
        w.u16(self.client_port).u16(self.service_port)
        _write_address(w, self.target)
        w.u16(self.target_port)

    @classmethod
    def _read_body(cls, sender: str, seq: int, r: Reader) -> Redirect:
        client = _read_address(r, "client")
        client_port, service_port = r.u16("client port"), r.u16("service port")
        target = _read_address(r, "target")
        return cls(sender, seq, client, client_port, service_port, target, r.u16("target port"))


@dataclass(frozen=True, slots=True)
class StateQuery(_Envelope):
    """R3 (Fig 15): who holds the state of this connection?"""

    TYPE: ClassVar[MessageType] = MessageType.STATE_QUERY
    query_id: int
    key: ConnectionKey

    def _check(self, what: str) -> None:
        _check_uint(what, "query_id", self.query_id, _U64)
        if not isinstance(self.key, ConnectionKey):
            raise WireError(f"{what}: key must be a ConnectionKey, not {self.key!r}")

    def _write_body(self, w: Writer) -> None:
        w.u64(self.query_id)
        self.key._write(w)

    @classmethod
    def _read_body(cls, sender: str, seq: int, r: Reader) -> StateQuery:
        query_id = r.u64("query id")
        return cls(sender, seq, query_id, ConnectionKey._read(r))


@dataclass(frozen=True, slots=True)
class StateReply(_Envelope):
    """R3 (Fig 15, 1530): the old owner's answer; the states are opaque here and empty
    when the connection was not found."""

    TYPE: ClassVar[MessageType] = MessageType.STATE_REPLY
    query_id: int
    key: ConnectionKey
    found: bool
    transport_state: bytes = b""
    app_state: bytes = b""

    def _check(self, what: str) -> None:
        _check_uint(what, "query_id", self.query_id, _U64)
        if not isinstance(self.key, ConnectionKey):
            raise WireError(f"{what}: key must be a ConnectionKey, not {self.key!r}")
        if not isinstance(self.found, bool):
            raise WireError(f"{what}: found must be a bool, not {self.found!r}")
        for name in ("transport_state", "app_state"):
            blob = _as_bytes(what, name, getattr(self, name))
            _set(self, name, blob)
            if len(blob) > _U32:
                raise WireError(f"{what}: {name} of {len(blob)} bytes, at most {_U32}")
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
        found = _read_flag(r, "found flag")
        transport = r.bytes(r.u32("transport state length"), "transport state")
        app = r.bytes(r.u32("application state length"), "application state")
        return cls(sender, seq, query_id, key, found, transport, app)


def _as_pins(what: str, keys: Iterable[Iterable[object]]) -> tuple[PinKey, ...]:
    pins = _records(what, "keys", keys, PinKey)
    if not 1 <= len(pins) <= MAX_PIN_KEYS:
        raise WireError(f"{what}: {len(pins)} keys, not 1..{MAX_PIN_KEYS}")
    for client, port in pins:
        _check_address(what, "client", client)
        _check_uint(what, "port", port, _U16)
    return pins


def _write_pins(w: Writer, keys: tuple[PinKey, ...]) -> None:
    w.u16(len(keys))
    for client, port in keys:
        _write_address(w, client)
        w.u16(port)


def _read_pins(r: Reader) -> tuple[PinKey, ...]:
    count = _read_count(r, "pin keys", 7, MAX_PIN_KEYS)
    return tuple(PinKey(_read_address(r, "client"), r.u16("port")) for _ in range(count))


@dataclass(frozen=True, slots=True)
class PinRequest(_Envelope):
    """R4 (Fig 16, 1600), to routers: keep these clients' packets going to `server`
    whatever the allocation, until idle for `idle_timeout_ms`."""

    TYPE: ClassVar[MessageType] = MessageType.PIN_REQUEST
    server: Address
    idle_timeout_ms: int
    keys: tuple[PinKey, ...]

    def _check(self, what: str) -> None:
        _check_address(what, "server", self.server)
        _check_uint(what, "idle_timeout_ms", self.idle_timeout_ms, _U32, low=1)
        _set(self, "keys", _as_pins(what, self.keys))

    def _write_body(self, w: Writer) -> None:
        _write_address(w, self.server)
        w.u32(self.idle_timeout_ms)
        _write_pins(w, self.keys)

    @classmethod
    def _read_body(cls, sender: str, seq: int, r: Reader) -> PinRequest:
        server = _read_address(r, "server")
        timeout = r.u32("idle timeout")
        return cls(sender, seq, server, timeout, _read_pins(r))


@dataclass(frozen=True, slots=True)
class Unpin(_Envelope):
    """R4 (Fig 16, 1630): the pinned paths of these keys may be broken down."""

    TYPE: ClassVar[MessageType] = MessageType.UNPIN
    keys: tuple[PinKey, ...]

    def _check(self, what: str) -> None:
        _set(self, "keys", _as_pins(what, self.keys))

    def _write_body(self, w: Writer) -> None:
        _write_pins(w, self.keys)

    @classmethod
    def _read_body(cls, sender: str, seq: int, r: Reader) -> Unpin:
        return cls(sender, seq, _read_pins(r))


ControlMessage: TypeAlias = (
    Heartbeat
    | Command
    | Proposal
    | Ack
    | Commit
    | SnapshotRequest
    | Snapshot
    | Forwarded
    | Redirect
    | StateQuery
    | StateReply
    | PinRequest
    | Unpin
)

_READERS: dict[MessageType, Callable[[str, int, Reader], ControlMessage]] = {
    MessageType.HEARTBEAT: Heartbeat._read_body,
    MessageType.COMMAND: Command._read_body,
    MessageType.PROPOSAL: Proposal._read_body,
    MessageType.ACK: Ack._read_body,
    MessageType.COMMIT: Commit._read_body,
    MessageType.SNAPSHOT_REQUEST: SnapshotRequest._read_body,
    MessageType.SNAPSHOT: Snapshot._read_body,
    MessageType.FORWARDED: Forwarded._read_body,
    MessageType.REDIRECT: Redirect._read_body,
    MessageType.STATE_QUERY: StateQuery._read_body,
    MessageType.STATE_REPLY: StateReply._read_body,
    MessageType.PIN_REQUEST: PinRequest._read_body,
    MessageType.UNPIN: Unpin._read_body,
}


def decode(data: bytes | bytearray | memoryview) -> ControlMessage:
    """One control message; `WireError` for anything that is not exactly one."""
    r = Reader(data, "control message")
    magic = r.bytes(len(MAGIC), "magic")
    if magic != MAGIC:
        raise WireError(f"control message: bad magic {magic!r}, expected {MAGIC!r}")
    version = r.u8("version")
    if version != VERSION:
        raise WireError(f"control message: version {version}, only {VERSION} is known")
    kind = _enum(r, MessageType, r.u8("type"), "control message type")
    r.what = f"control {kind.name}"
    sender = _read_id(r, "sender")
    seq = r.u32("seq")
    message = _READERS[kind](sender, seq, r)
    r.expect_end()
    return message


def encode(message: ControlMessage) -> bytes:
    return message.to_wire()


# --- allocation snapshots ---------------------------------------------------------------


def snapshot_parts(
    epoch: int,
    allocation: Allocation,
    max_bytes: int = SNAPSHOT_MAX_BYTES,
    *,
    sender: str,
    seq: int = 0,
) -> list[Snapshot]:
    """The allocation as `Snapshot` parts whose encodings are at most `max_bytes` each.

    Runs are packed in bucket order; each part lists the ids its runs name, and
    servers holding nothing ride in the last parts. Part i gets sequence number
    seq + i (mod 2**32). ValueError if one run with its id cannot fit `max_bytes`
    or more than 65535 parts are needed.
    """
    _check_id("snapshot_parts", "sender", sender)
    digest = allocation.digest()
    fixed = (
        _ENVELOPE_FIXED
        + len(sender.encode("utf-8"))
        + 8  # epoch
        + 8  # digest
        + 4  # part, count
        + _space_bytes(allocation.space)
        + 2  # server count
        + 2  # run count
    )
    id_bytes = {s: 1 + len(s.encode("utf-8")) for s in allocation.servers}
    groups: list[tuple[set[str], list[tuple[int, int, str]]]] = []
    names: set[str] = set()
    runs: list[tuple[int, int, str]] = []
    size = fixed

    def place(cost_new: int, cost_known: int, server: str) -> bool:
        """Make room for an item in the current part; True if its id is new there."""
        nonlocal names, runs, size
        new = server not in names
        cost = cost_new if new else cost_known
        if size + cost > max_bytes and (names or runs):
            groups.append((names, runs))
            names, runs, size, new, cost = set(), [], fixed, True, cost_new
        if fixed + cost > max_bytes:
            raise ValueError(f"max_bytes {max_bytes} cannot hold one run of {server!r}")
        size += cost
        names.add(server)
        return new

    for start, stop, server in allocation.runs():
        place(10 + id_bytes[server], 10, server)
        runs.append((start, stop, server))
    owning = {server for _, _, server in allocation.runs()}
    for server in allocation.servers:
        if server not in owning:
            place(id_bytes[server], 0, server)
    groups.append((names, runs))
    if len(groups) > _U16:
        raise ValueError(f"{len(groups)} snapshot parts needed, at most {_U16}")

    parts = []
    for index, (group_names, group_runs) in enumerate(groups):
        ids = tuple(sorted(group_names))
        position = {s: i for i, s in enumerate(ids)}
        parts.append(
            Snapshot(
                sender,
                (seq + index) & _U32,
                epoch,
                digest,
                index,
                len(groups),
                allocation.space,
                ids,
                tuple(Run(a, b, position[s]) for a, b, s in group_runs),
            )
        )
    return parts


def assemble(parts: Iterable[Snapshot]) -> Allocation:
    """The allocation carried by a complete set of `Snapshot` parts, checked: same
    epoch, digest, space and count in each, every part exactly once, runs covering
    every bucket exactly once, and the result hashing to the announced digest."""
    given: Sequence[Snapshot] = list(parts)
    if not given:
        raise WireError("snapshot: no parts")
    first = given[0]
    for part in given:
        if (part.epoch, part.digest, part.count) != (first.epoch, first.digest, first.count):
            raise WireError(
                f"snapshot: part {part.part} is of epoch {part.epoch} digest {part.digest} "
                f"with {part.count} parts, part {first.part} of epoch {first.epoch} "
                f"digest {first.digest} with {first.count}"
            )
        if part.space != first.space:
            raise WireError(f"snapshot: part {part.part} describes another address space")
    indexes = sorted(part.part for part in given)
    duplicates = sorted({i for i, j in itertools.pairwise(indexes) if i == j})
    if duplicates:
        raise WireError(f"snapshot: parts {duplicates} given more than once")
    missing = sorted(set(range(first.count)) - set(indexes))
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise WireError(f"snapshot: {len(missing)} of {first.count} parts missing: {shown}")

    servers = tuple(sorted({s for part in given for s in part.servers}))
    position = {s: i for i, s in enumerate(servers)}
    runs = sorted(
        (start, stop, position[part.servers[server]])
        for part in given
        for start, stop, server in part.runs
    )
    buckets = first.space.buckets
    owners = np.empty(buckets, dtype=np.int32)
    covered = 0
    for start, stop, owner in runs:
        if start != covered:
            problem = "overlap" if start < covered else "leave a gap"
            raise WireError(f"snapshot: runs {problem} at bucket {min(start, covered)}")
        owners[start:stop] = owner
        covered = stop
    if covered != buckets:
        raise WireError(f"snapshot: runs cover {covered} of {buckets} buckets")
    try:
        allocation = Allocation(first.space, servers, owners)
    except SpaceError as exc:
        raise WireError(f"snapshot: {exc}") from None
    if allocation.digest() != first.digest:
        raise WireError(f"snapshot: parts hash to {allocation.digest()}, announced {first.digest}")
    return allocation


__all__ = [
    "MAGIC",
    "MAX_BUCKET_LOADS",
    "MAX_ID_BYTES",
    "MAX_PIN_KEYS",
    "SNAPSHOT_MAX_BYTES",
    "VERSION",
    "Ack",
    "AddServerOp",
    "BucketLoad",
    "Command",
    "Commit",
    "ConnectionKey",
    "ControlMessage",
    "Forwarded",
    "Heartbeat",
    "MessageType",
    "OpKind",
    "PinKey",
    "PinRequest",
    "PolicyOp",
    "Proposal",
    "RebalanceOp",
    "Redirect",
    "RemoveServerOp",
    "ReplaceOp",
    "Run",
    "ServerState",
    "SetShareOp",
    "Snapshot",
    "SnapshotRequest",
    "StateQuery",
    "StateReply",
    "Unpin",
    "assemble",
    "decode",
    "decode_op",
    "encode",
    "encode_op",
    "snapshot_parts",
]
