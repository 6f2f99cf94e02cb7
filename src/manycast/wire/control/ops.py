"""Policy operations: the allocation changes a `Command` asks for and a `Proposal` carries.

Each is the wire form of one call in `manycast.policy` (add or remove a server,
set a share, rebalance, replace the allocation, balance measured loads), or of
several removals and additions made as one change (`MembersOp`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from fractions import Fraction
from typing import ClassVar, NamedTuple, Self, TypeAlias

from manycast.wire.control.fields import (
    MAX_BUCKET_LOADS,
    U32,
    U64,
    as_share,
    check_digest,
    check_id,
    check_real,
    check_uint,
    read_count,
    read_digest,
    read_enum,
    read_flag,
    read_id,
    read_share,
    records,
    set_field,
    write_digest,
    write_id,
    write_share,
)
from manycast.wire.cursor import Reader, Writer
from manycast.wire.errors import WireError


class OpKind(IntEnum):
    ADD_SERVER = 1
    REMOVE_SERVER = 2
    SET_SHARE = 3
    REBALANCE = 4
    REPLACE = 5
    BALANCE_LOADS = 6
    MEMBERS = 7


class BucketLoad(NamedTuple):
    bucket: int
    load: float


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
        check_id("ADD_SERVER", "server", self.server)
        if self.share is not None:
            set_field(self, "share", as_share("ADD_SERVER", self.share))

    def _write(self, w: Writer) -> None:
        write_id(w, self.server)
        w.u8(self.share is not None)
        if self.share is not None:
            write_share(w, self.share)

    @classmethod
    def _read(cls, r: Reader) -> AddServerOp:
        server = read_id(r, "server")
        return cls(server, read_share(r) if read_flag(r, "has-share flag") else None)


@dataclass(frozen=True, slots=True)
class RemoveServerOp(_Op):
    """A server leaves; only its buckets move, as `policy.remove_server`."""

    KIND: ClassVar[OpKind] = OpKind.REMOVE_SERVER
    server: str

    def __post_init__(self) -> None:
        check_id("REMOVE_SERVER", "server", self.server)

    def _write(self, w: Writer) -> None:
        write_id(w, self.server)

    @classmethod
    def _read(cls, r: Reader) -> RemoveServerOp:
        return cls(read_id(r, "server"))


@dataclass(frozen=True, slots=True)
class SetShareOp(_Op):
    """One server's share changes (Fig 11: 25% -> 20%), as `policy.set_share`."""

    KIND: ClassVar[OpKind] = OpKind.SET_SHARE
    server: str
    share: Fraction

    def __post_init__(self) -> None:
        check_id("SET_SHARE", "server", self.server)
        set_field(self, "share", as_share("SET_SHARE", self.share))

    def _write(self, w: Writer) -> None:
        write_id(w, self.server)
        write_share(w, self.share)

    @classmethod
    def _read(cls, r: Reader) -> SetShareOp:
        server = read_id(r, "server")
        return cls(server, read_share(r))


@dataclass(frozen=True, slots=True)
class RebalanceOp(_Op):
    """Bring max/mean server load to `target`, given the loads of the busiest buckets
    (buckets not listed count as idle), as `policy.rebalance`."""

    KIND: ClassVar[OpKind] = OpKind.REBALANCE
    target: float
    loads: tuple[BucketLoad, ...] = ()

    def __post_init__(self) -> None:
        what = "REBALANCE"
        check_real(what, "target", self.target, 1.0)
        set_field(self, "loads", records(what, "loads", self.loads, BucketLoad))
        if len(self.loads) > MAX_BUCKET_LOADS:
            raise WireError(f"{what}: {len(self.loads)} bucket loads, at most {MAX_BUCKET_LOADS}")
        previous = -1
        for bucket, load in self.loads:
            check_uint(what, "bucket", bucket, U32)
            check_real(what, f"load of bucket {bucket}", load, 0.0)
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
        count = read_count(r, "bucket loads", 12, MAX_BUCKET_LOADS)
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
        check_uint("REPLACE", "snapshot_epoch", self.snapshot_epoch, U64)
        check_digest("REPLACE", "digest", self.digest)

    def _write(self, w: Writer) -> None:
        w.u64(self.snapshot_epoch)
        write_digest(w, self.digest)

    @classmethod
    def _read(cls, r: Reader) -> ReplaceOp:
        epoch = r.u64("snapshot epoch")
        return cls(epoch, read_digest(r, "digest"))


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
        check_real(what, "target", self.target, 1.0)
        set_field(self, "loads", records(what, "loads", self.loads, ServerLoad))
        set_field(self, "hot", records(what, "hot", self.hot, BucketLoad))
        if len(self.loads) > MAX_BUCKET_LOADS or len(self.hot) > MAX_BUCKET_LOADS:
            raise WireError(f"{what}: more than {MAX_BUCKET_LOADS} loads")
        names = [server for server, _ in self.loads]
        if names != sorted(set(names)):
            raise WireError(f"{what}: servers must be listed once each, in order")
        for server, load in self.loads:
            check_id(what, "server", server)
            check_real(what, f"load of {server}", load, 0.0)
        previous = -1
        for bucket, load in self.hot:
            check_uint(what, "bucket", bucket, U32)
            check_real(what, f"load of bucket {bucket}", load, 0.0)
            if bucket <= previous:
                raise WireError(f"{what}: hot buckets must be listed in increasing order")
            previous = bucket

    def _write(self, w: Writer) -> None:
        w.f64(self.target).u16(len(self.loads))
        for server, load in self.loads:
            write_id(w, server)
            w.f64(load)
        w.u16(len(self.hot))
        for bucket, load in self.hot:
            w.u32(bucket).f64(load)

    @classmethod
    def _read(cls, r: Reader) -> BalanceLoadsOp:
        target = r.f64("target")
        count = read_count(r, "server loads", 10, MAX_BUCKET_LOADS)
        loads = tuple(ServerLoad(read_id(r, "server"), r.f64("load")) for _ in range(count))
        count = read_count(r, "hot buckets", 12, MAX_BUCKET_LOADS)
        hot = tuple(BucketLoad(r.u32("bucket"), r.f64("load")) for _ in range(count))
        return cls(target, loads, hot)


MAX_MEMBERS_CHANGED = 1024  # servers one MembersOp names, removed and added together


@dataclass(frozen=True, slots=True)
class MembersOp(_Op):
    """Servers leave and join in one change: each of `removed` leaves, one after the
    other in name order (as `policy.remove_server`: only its buckets move), then each
    of `added` joins with an equal share, in name order (as `policy.add_server`). So a
    burst of deaths, or of newcomers, is one epoch, not one each. Neither: the
    proposer's state again at a new epoch (after a split, `Coordinator._duties`)."""

    KIND: ClassVar[OpKind] = OpKind.MEMBERS
    removed: tuple[str, ...] = ()
    added: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        what = "MEMBERS"
        for name in ("removed", "added"):
            servers = getattr(self, name)
            if not isinstance(servers, tuple | list):
                raise WireError(f"{what}: {name} must be a tuple of server ids")
            set_field(self, name, tuple(servers))
            for server in servers:
                check_id(what, name, server)
            if list(servers) != sorted(set(servers)):
                raise WireError(f"{what}: {name} must be listed once each, in order")
        if set(self.removed) & set(self.added):
            raise WireError(f"{what}: a server is both removed and added")
        if len(self.removed) + len(self.added) > MAX_MEMBERS_CHANGED:
            raise WireError(f"{what}: more than {MAX_MEMBERS_CHANGED} servers")

    def _write(self, w: Writer) -> None:
        for servers in (self.removed, self.added):
            w.u16(len(servers))
            for server in servers:
                write_id(w, server)

    @classmethod
    def _read(cls, r: Reader) -> MembersOp:
        removed = tuple(
            read_id(r, "server") for _ in range(read_count(r, "removed", 2, MAX_MEMBERS_CHANGED))
        )
        added = tuple(
            read_id(r, "server") for _ in range(read_count(r, "added", 2, MAX_MEMBERS_CHANGED))
        )
        return cls(removed, added)


PolicyOp: TypeAlias = (
    AddServerOp | RemoveServerOp | SetShareOp | RebalanceOp | ReplaceOp | BalanceLoadsOp | MembersOp
)

_OP_READERS: dict[OpKind, Callable[[Reader], PolicyOp]] = {
    OpKind.ADD_SERVER: AddServerOp._read,
    OpKind.REMOVE_SERVER: RemoveServerOp._read,
    OpKind.SET_SHARE: SetShareOp._read,
    OpKind.REBALANCE: RebalanceOp._read,
    OpKind.REPLACE: ReplaceOp._read,
    OpKind.BALANCE_LOADS: BalanceLoadsOp._read,
    OpKind.MEMBERS: MembersOp._read,
}


def check_op(what: str, op: object) -> None:
    if not isinstance(
        op,
        AddServerOp
        | RemoveServerOp
        | SetShareOp
        | RebalanceOp
        | ReplaceOp
        | BalanceLoadsOp
        | MembersOp,
    ):
        raise WireError(f"{what}: op must be a policy operation, not {type(op).__name__}")


def write_op(w: Writer, op: PolicyOp) -> None:
    w.u8(op.KIND)
    op._write(w)


def read_op(r: Reader) -> PolicyOp:
    kind = read_enum(r, OpKind, r.u8("op kind"), "policy op kind")
    return _OP_READERS[kind](r)


def encode_op(op: PolicyOp) -> bytes:
    """A policy operation on its own, as embedded in `Command` and `Proposal`."""
    return op.to_wire()


def decode_op(data: bytes | bytearray | memoryview) -> PolicyOp:
    r = Reader(data, "policy op")
    op = read_op(r)
    r.expect_end()
    return op
