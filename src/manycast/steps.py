"""A scenario's typed steps: what an operator or the world does to a pool, and when.

Steps are plain data. The topology reader makes them from `[[scenario]]` tables;
`manycast.scenario.ScenarioEngine` carries them out on any driver. A new kind of
step is a new dataclass here and one entry in the engine's dispatch table.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from enum import StrEnum
from fractions import Fraction
from typing import ClassVar


class Action(StrEnum):
    """The `action` key of a `[[scenario]]` table."""

    SET_SHARE = "set_share"
    KILL = "kill"
    ADD = "add"
    REBALANCE = "rebalance"
    CLIENT_RATE = "client_rate"
    KILL_VIP_ROUTER = "kill_vip_router"
    DRAIN = "drain"
    MOVE = "move"


# A field `describe` names only when it is not its default (a flag added later, so
# that the steps written before it keep their description).
QUIET = {"quiet": True}


@dataclass(frozen=True, kw_only=True)
class Step:
    """One timed step. `line` is where the topology file gave it (0: made in code)."""

    action: ClassVar[Action]
    # Steps that change who serves what: each starts a recovery measurement.
    disruptive: ClassVar[bool] = True

    at: float
    line: int = 0

    def describe(self) -> str:
        """`set_share server=s1 share=1/5`: the action and its arguments (an optional
        flag such as `move` only when it is set: `set_share server=s1 share=1/5 move=True`)."""
        detail = " ".join(
            f"{f.name}={getattr(self, f.name)}"
            for f in fields(self)
            if f.name not in ("at", "line")
            and not (
                f.metadata.get("quiet")
                and f.default is not MISSING
                and getattr(self, f.name) == f.default
            )
        )
        return f"{self.action} {detail}".strip()


@dataclass(frozen=True, kw_only=True)
class SetShare(Step):
    """Give `server` exactly `share` of the client address space (Fig 11). With `move`
    (a manycast pool in the kernel lab) the clients whose portions change owner
    take their live kernel TCP connections to their new owner (TCP_REPAIR); without
    it their connections follow the pool's technique."""

    action: ClassVar[Action] = Action.SET_SHARE
    server: str
    share: Fraction
    move: bool = field(default=False, metadata=QUIET)


@dataclass(frozen=True, kw_only=True)
class Kill(Step):
    """Crash `server` at once: it sends nothing more (a failure, Fig 10)."""

    action: ClassVar[Action] = Action.KILL
    server: str


@dataclass(frozen=True, kw_only=True)
class Add(Step):
    """Start a standby `server`: it joins the pool and gets a share."""

    action: ClassVar[Action] = Action.ADD
    server: str


@dataclass(frozen=True, kw_only=True)
class Rebalance(Step):
    """Ask the pool to rebalance by measured load, aiming at max/mean <= `target`;
    `move` as `SetShare`'s."""

    action: ClassVar[Action] = Action.REBALANCE
    target: float = 1.1
    move: bool = field(default=False, metadata=QUIET)  # as SetShare's


@dataclass(frozen=True, kw_only=True)
class ClientRate(Step):
    """Every client of the `[[clients]]` group `clients` now sends `rate` requests/s."""

    action: ClassVar[Action] = Action.CLIENT_RATE
    disruptive: ClassVar[bool] = False
    clients: str
    rate: float


@dataclass(frozen=True, kw_only=True)
class KillVipRouter(Step):
    """Crash the VIP router `vip_router` at once (Fig 17-18): flows already tagged
    keep their server, new flows go to another VIP router."""

    action: ClassVar[Action] = Action.KILL_VIP_ROUTER
    vip_router: str


@dataclass(frozen=True, kw_only=True)
class Drain(Step):
    """`server` hands all its clients and connections to the others, then leaves
    `grace` seconds later: its share goes to 0 (under technique D every connection
    moves to its client's new owner with a signed change-destination, Fig 20-21;
    under R3 on its next packet), then the server stops (`Leave`)."""

    action: ClassVar[Action] = Action.DRAIN
    server: str
    grace: float = 2.0

    def then(self) -> Leave:
        return Leave(at=self.at + self.grace, line=self.line, server=self.server)


@dataclass(frozen=True, kw_only=True)
class Leave(Step):
    """The second half of a `Drain`: the drained server stops. Not a step of its own
    in topology files; not disruptive (nothing of the pool was left on it)."""

    action: ClassVar[Action] = Action.DRAIN
    disruptive: ClassVar[bool] = False
    server: str

    def describe(self) -> str:
        return f"leave server={self.server}"


@dataclass(frozen=True, kw_only=True)
class Move(Step):
    """Move the live kernel TCP connections of `server` (all of them, or `count`) to
    `to`, or spread over the other live servers when `to` is empty, without closing
    them (TCP_REPAIR; the kernel lab only). The allocation does not change: not
    disruptive. A VIP pool's step only: in a manycast pool a client's server is its
    portion's owner, so its connections move with a change of the allocation
    (`SetShare`/`Rebalance` with `move`, or `Drain`)."""

    action: ClassVar[Action] = Action.MOVE
    disruptive: ClassVar[bool] = False
    server: str
    to: str = ""
    count: int = 0  # 0: every connection


STEP_TYPES: dict[Action, type[Step]] = {
    cls.action: cls
    for cls in (SetShare, Kill, Add, Rebalance, ClientRate, KillVipRouter, Drain, Move)
}
