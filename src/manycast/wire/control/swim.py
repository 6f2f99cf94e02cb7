"""Messages of the gossip membership (`[pool] membership = "swim"`).

SWIM (Das, Gupta, Motivala, DSN 2002), as HashiCorp's memberlist runs it: each
protocol period a server pings one member point to point (`Probe` PING) and
expects its `Probe` ACK; without one it asks a few others to ping the member for
it (PING_REQ), and they pass an ACK back, or a NACK when the member does not
answer them either (Lifeguard: an asker that gets neither is the slow one). A
member nobody reaches is suspected (`MemberNotice` SUSPECT; others that fail to
reach it too confirm with a SUSPECT of their own) and, unless it refutes with a
greater incarnation (ALIVE), counted dead when the suspicion times out. Notices
go on the control channel: one message per event, where memberlist piggybacks
them on pings.

Every probe also carries its sender's state (what a heartbeat carried), so the
pool learns epochs and loads from the probes it exchanges anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

from manycast.wire.control.coordination import ServerState
from manycast.wire.control.envelope import Envelope, MessageType, control_message
from manycast.wire.control.fields import (
    U32,
    U64,
    Address,
    check_address,
    check_digest,
    check_id,
    check_real,
    check_uint,
    read_address,
    read_digest,
    read_enum,
    read_id,
    write_address,
    write_digest,
    write_id,
)
from manycast.wire.cursor import Reader, Writer
from manycast.wire.errors import WireError


class ProbeKind(IntEnum):
    PING = 1  # to `target`: are you alive?
    ACK = 2  # `target` answered (itself, or through the sender of an indirect probe)
    PING_REQ = 3  # please ping `target` for me and pass its ACK back
    NACK = 4  # `target` did not answer my ping for you in time (Lifeguard's nack)


class MemberStatus(IntEnum):
    ALIVE = 1  # a member starting, or refuting a suspicion with a greater incarnation
    SUSPECT = 2  # nobody reached it in a protocol period
    DEAD = 3  # its suspicion timed out


@control_message
@dataclass(frozen=True, slots=True)
class Probe(Envelope):
    """One step of a probe, `nonce` matching an ACK to its PING, with the sender's
    state: its `incarnation`, allocation `epoch` and `digest`, `state`, unicast
    `address`, `load` and `sessions`. `target_incarnation` is the target's as the
    sender knows it (an ACK: the incarnation the target answered with)."""

    TYPE: ClassVar[MessageType] = MessageType.PROBE
    kind: ProbeKind
    nonce: int
    target: str
    target_address: Address
    target_incarnation: int
    incarnation: int
    epoch: int
    digest: str
    state: ServerState
    address: Address
    load: float
    sessions: int

    def _check(self, what: str) -> None:
        if not isinstance(self.kind, ProbeKind):
            raise WireError(f"{what}: kind must be a ProbeKind, not {self.kind!r}")
        check_uint(what, "nonce", self.nonce, U32)
        check_id(what, "target", self.target)
        check_address(what, "target_address", self.target_address)
        check_uint(what, "target_incarnation", self.target_incarnation, U64)
        check_uint(what, "incarnation", self.incarnation, U64)
        check_uint(what, "epoch", self.epoch, U64)
        check_digest(what, "digest", self.digest)
        if not isinstance(self.state, ServerState):
            raise WireError(f"{what}: state must be a ServerState, not {self.state!r}")
        check_address(what, "address", self.address)
        check_real(what, "load", self.load, 0.0)
        check_uint(what, "sessions", self.sessions, U32)

    def _write_body(self, w: Writer) -> None:
        w.u8(self.kind).u32(self.nonce)
        write_id(w, self.target)
        write_address(w, self.target_address)
        w.u64(self.target_incarnation).u64(self.incarnation).u64(self.epoch)
        write_digest(w, self.digest)
        w.u8(self.state)
        write_address(w, self.address)
        w.f64(self.load).u32(self.sessions)

    @classmethod
    def _read_body(cls, sender: str, seq: int, r: Reader) -> Probe:
        kind = read_enum(r, ProbeKind, r.u8("kind"), "probe kind")
        nonce = r.u32("nonce")
        target = read_id(r, "target")
        target_address = read_address(r, "target address")
        target_incarnation = r.u64("target incarnation")
        incarnation = r.u64("incarnation")
        epoch = r.u64("epoch")
        digest = read_digest(r, "digest")
        state = read_enum(r, ServerState, r.u8("state"), "server state")
        address = read_address(r, "address")
        load = r.f64("load")
        return cls(
            sender,
            seq,
            kind,
            nonce,
            target,
            target_address,
            target_incarnation,
            incarnation,
            epoch,
            digest,
            state,
            address,
            load,
            r.u32("sessions"),
        )


@control_message
@dataclass(frozen=True, slots=True)
class MemberNotice(Envelope):
    """`member` (at `address`, in `state`) is `status` as of its `incarnation`."""

    TYPE: ClassVar[MessageType] = MessageType.MEMBER_NOTICE
    status: MemberStatus
    member: str
    address: Address
    incarnation: int
    state: ServerState

    def _check(self, what: str) -> None:
        if not isinstance(self.status, MemberStatus):
            raise WireError(f"{what}: status must be a MemberStatus, not {self.status!r}")
        check_id(what, "member", self.member)
        check_address(what, "address", self.address)
        check_uint(what, "incarnation", self.incarnation, U64)
        if not isinstance(self.state, ServerState):
            raise WireError(f"{what}: state must be a ServerState, not {self.state!r}")

    def _write_body(self, w: Writer) -> None:
        w.u8(self.status)
        write_id(w, self.member)
        write_address(w, self.address)
        w.u64(self.incarnation).u8(self.state)

    @classmethod
    def _read_body(cls, sender: str, seq: int, r: Reader) -> MemberNotice:
        status = read_enum(r, MemberStatus, r.u8("status"), "member status")
        member = read_id(r, "member")
        address = read_address(r, "address")
        incarnation = r.u64("incarnation")
        state = read_enum(r, ServerState, r.u8("state"), "server state")
        return cls(sender, seq, status, member, address, incarnation, state)
