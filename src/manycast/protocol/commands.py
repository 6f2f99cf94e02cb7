"""Operators' commands on their way to the pool's coordinator, time passed in.

An operator may give a change (a share, a rebalance) to any server. A server that
does not coordinate passes it on to the control channel, and again each heartbeat
until a proposal carries it: a datagram may be lost, the coordinator may die. It
gives up after `COMMAND_PATIENCE` seconds (no proposal ever carried it: it changes
nothing, or the pool is split). Each command has a random id, so the coordinator
queues a command once however often it is resent.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from manycast.wire import control

COMMAND_PATIENCE = 10.0  # seconds an operator's command is resent before it is dropped


@dataclass
class Due:
    """What a heartbeat's look at the commands gives."""

    resend: list[tuple[int, control.PolicyOp]] = field(default_factory=list)  # (id, op)
    take_up: list[control.PolicyOp] = field(default_factory=list)  # we coordinate now
    given_up: int = 0


class CommandRelay:
    def __init__(self, rng: random.Random, resend_s: float) -> None:
        self.rng = rng
        self.resend_s = resend_s
        # commands we passed on: id -> (op, next resend, give up)
        self._passed: dict[int, tuple[control.PolicyOp, float, float]] = {}
        self._taken: dict[int, float] = {}  # ids the coordinator (we) queued, and when

    def pass_on(self, op: control.PolicyOp, now: float) -> None:
        """Sent at the next `due` (at once when called with `now`)."""
        self._passed[self.rng.getrandbits(63)] = (op, now, now + COMMAND_PATIENCE)

    def due(self, now: float, coordinating: bool) -> Due:
        """The commands to send again, or to queue ourselves if we now coordinate."""
        due = Due()
        for command_id, (op, resend_at, give_up) in list(self._passed.items()):
            if coordinating:
                del self._passed[command_id]
                due.take_up.append(op)
            elif now >= give_up:
                del self._passed[command_id]
                due.given_up += 1
            elif now >= resend_at:
                self._passed[command_id] = (op, now + self.resend_s, give_up)
                due.resend.append((command_id, op))
        for command_id in [c for c, at in self._taken.items() if now - at > COMMAND_PATIENCE]:
            del self._taken[command_id]
        return due

    def first_time(self, command_id: int, now: float) -> bool:
        """As coordinator: True the first time a command's id is heard (resends repeat it)."""
        if command_id in self._taken:
            return False
        self._taken[command_id] = now
        return True

    def carried(self, op: control.PolicyOp) -> None:
        """A proposal carries `op`: the pool has taken our command up."""
        for command_id, (passed, _, _) in list(self._passed.items()):
            if passed == op:
                del self._passed[command_id]
