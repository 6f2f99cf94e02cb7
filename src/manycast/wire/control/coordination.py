"""Messages by which the pool's servers agree on allocation changes (seed Fig 13).

Servers announce themselves (`Heartbeat`); an operator's `Command` becomes a
`Proposal` of the next epoch, which every server acknowledges (`Ack`) with the
digest it computed, and the coordinator makes final (`Commit`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, Self

from manycast.wire.control.envelope import Envelope, MessageType, control_message
from manycast.wire.control.fields import (
    U32,
    U64,
    Address,
    check_address,
    check_digest,
    check_real,
    check_uint,
    read_address,
    read_digest,
    read_enum,
    write_address,
    write_digest,
)
from manycast.wire.control.ops import PolicyOp, check_op, read_op, write_op
from manycast.wire.cursor import Reader, Writer
from manycast.wire.errors import WireError


class ServerState(IntEnum):
    JOINING = 1
    ACTIVE = 2
    LEAVING = 3


@control_message
@dataclass(frozen=True, slots=True)
class Heartbeat(Envelope):
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
        check_uint(what, "epoch", self.epoch, U64)
        check_digest(what, "digest", self.digest)
        if not isinstance(self.state, ServerState):
            raise WireError(f"{what}: state must be a ServerState, not {self.state!r}")
        check_address(what, "address", self.address)
        check_real(what, "load", self.load, 0.0)
        check_uint(what, "sessions", self.sessions, U32)
        check_uint(what, "interval_ms", self.interval_ms, U32, low=1)

    def _write_body(self, w: Writer) -> None:
        w.u64(self.epoch)
        write_digest(w, self.digest)
        w.u8(self.state)
        write_address(w, self.address)
        w.f64(self.load).u32(self.sessions).u32(self.interval_ms)

    @classmethod
    def _read_body(cls, sender: str, seq: int, r: Reader) -> Heartbeat:
        epoch = r.u64("epoch")
        digest = read_digest(r, "digest")
        state = read_enum(r, ServerState, r.u8("state"), "server state")
        address = read_address(r, "address")
        load = r.f64("load")
        sessions = r.u32("sessions")
        return cls(sender, seq, epoch, digest, state, address, load, sessions, r.u32("interval"))


@control_message
@dataclass(frozen=True, slots=True)
class Command(Envelope):
    """An operator's request to the pool; `command_id` lets the operator match outcomes."""

    TYPE: ClassVar[MessageType] = MessageType.COMMAND
    command_id: int
    op: PolicyOp

    def _check(self, what: str) -> None:
        check_uint(what, "command_id", self.command_id, U64)
        check_op(what, self.op)

    def _write_body(self, w: Writer) -> None:
        w.u64(self.command_id)
        write_op(w, self.op)

    @classmethod
    def _read_body(cls, sender: str, seq: int, r: Reader) -> Command:
        command_id = r.u64("command id")
        return cls(sender, seq, command_id, read_op(r))


@control_message
@dataclass(frozen=True, slots=True)
class Proposal(Envelope):
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
        check_uint(what, "epoch", self.epoch, U64)
        check_uint(what, "base_epoch", self.base_epoch, U64)
        if self.epoch <= self.base_epoch:
            raise WireError(f"{what}: epoch {self.epoch} does not follow base {self.base_epoch}")
        check_digest(what, "base_digest", self.base_digest)
        check_digest(what, "digest", self.digest)
        check_uint(what, "delay_ms", self.delay_ms, U32)
        check_op(what, self.op)

    def _write_body(self, w: Writer) -> None:
        w.u64(self.epoch).u64(self.base_epoch)
        write_digest(w, self.base_digest)
        write_digest(w, self.digest)
        w.u32(self.delay_ms)
        write_op(w, self.op)

    @classmethod
    def _read_body(cls, sender: str, seq: int, r: Reader) -> Proposal:
        epoch, base_epoch = r.u64("epoch"), r.u64("base epoch")
        base_digest = read_digest(r, "base digest")
        digest = read_digest(r, "digest")
        delay = r.u32("delay")
        return cls(sender, seq, epoch, base_epoch, base_digest, digest, delay, read_op(r))


@dataclass(frozen=True, slots=True)
class _EpochDigest(Envelope):
    epoch: int
    digest: str

    def _check(self, what: str) -> None:
        check_uint(what, "epoch", self.epoch, U64)
        check_digest(what, "digest", self.digest)

    def _write_body(self, w: Writer) -> None:
        w.u64(self.epoch)
        write_digest(w, self.digest)

    @classmethod
    def _read_body(cls, sender: str, seq: int, r: Reader) -> Self:
        epoch = r.u64("epoch")
        return cls(sender, seq, epoch, read_digest(r, "digest"))


@control_message
@dataclass(frozen=True, slots=True)
class Ack(_EpochDigest):
    """A server has proposal `epoch` and computed the same `digest`."""

    TYPE: ClassVar[MessageType] = MessageType.ACK


@control_message
@dataclass(frozen=True, slots=True)
class Commit(_EpochDigest):
    """Proposal `epoch` with `digest` is final."""

    TYPE: ClassVar[MessageType] = MessageType.COMMIT
