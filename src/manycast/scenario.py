"""The one scenario engine: carries out a topology's timed steps on any running pool.

The engine knows the pool only through `PoolControl`, which an in-process pool
(memory driver, overlay) and the kernel lab (over its control sockets) both
implement. It keeps the one record of what happened (`events`) and of which
servers are dead, and the one rule for who receives an operator's command.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Protocol

from manycast.errors import ConfigError
from manycast.steps import (
    Add,
    ClientRate,
    Drain,
    Kill,
    KillVipRouter,
    Leave,
    Move,
    Rebalance,
    SetShare,
    Step,
)
from manycast.topology import Topology
from manycast.wire import control


class PoolControl(Protocol):
    """What the engine needs of a running pool, whatever hosts it."""

    def hosts(self, server: str) -> bool:
        """Whether this process runs `server` (a pool split over processes runs
        the same scenario in each; a step is carried out where its server runs)."""

    def kill_server(self, server: str) -> None: ...

    def start_server(self, server: str) -> None: ...

    def command(self, server: str, op: control.PolicyOp) -> None:
        """Hand an operator's policy change to `server`, which proposes it to the pool."""

    def set_client_rate(self, group: str, rate: float) -> None:
        """Every client of the `[[clients]]` group `group` this process runs."""

    def hosts_node(self, name: str) -> bool:
        """Whether this process runs the node `name` (a VIP router, say)."""

    def kill_node(self, name: str) -> None:
        """Crash a node other than a server (a VIP router): nothing more from it."""


class ConnectionMover(Protocol):
    """Live kernel TCP connections that can move between servers (the kernel lab's
    `lab.tcp_moves.TcpMoves`): what the `move` step needs, and what a `drain`, a
    `kill` and an `add` tell it."""

    def move(self, server: str, to: list[str], count: int) -> None:
        """Move `count` (0: all) of `server`'s connections, spread over `to` in turn."""

    def drain(self, server: str, to: list[str]) -> None:
        """`server` is about to hand its share to `to`: its connections go too."""

    def reallocate(self, server: str | None, share: Fraction | None) -> None:
        """The pool's allocation is about to change at an operator's request (`server`'s
        share becomes `share`; None: a rebalance), and the connections of the clients
        whose portions change owner go to their new owners (`move = true`)."""

    def server_killed(self, server: str) -> None: ...

    def server_added(self, server: str) -> None: ...


class ScenarioError(ConfigError):
    """A step this run cannot carry out (a `move` with no TCP connections to move)."""


@dataclass(frozen=True)
class EventRecord:
    """A step the engine carried out: when, what, and whether it moves clients."""

    at: float
    what: str
    disruptive: bool


@dataclass
class ScenarioEngine:
    topology: Topology
    pool: PoolControl
    events: list[EventRecord] = field(default_factory=list)
    dead: set[str] = field(default_factory=set)
    added: set[str] = field(default_factory=set)
    connections: ConnectionMover | None = None

    def __post_init__(self) -> None:
        if self.connections is None and any(
            isinstance(s, Move) or getattr(s, "move", False) for s in self.topology.scenario
        ):
            raise ScenarioError(
                "the 'move' step (and move = true) moves live kernel TCP connections: run"
                " the topology in the kernel lab (manycast lab run)"
            )
        self._dispatch: dict[type[Step], Callable[[Step], None]] = {
            SetShare: self._set_share,  # type: ignore[dict-item]
            Kill: self._kill,  # type: ignore[dict-item]
            Add: self._add,  # type: ignore[dict-item]
            Rebalance: self._rebalance,  # type: ignore[dict-item]
            ClientRate: self._client_rate,  # type: ignore[dict-item]
            KillVipRouter: self._kill_vip_router,  # type: ignore[dict-item]
            Drain: self._drain,  # type: ignore[dict-item]
            Leave: self._leave,  # type: ignore[dict-item]
            Move: self._move,  # type: ignore[dict-item]
        }

    def steps(self) -> list[Step]:
        """The topology's steps in time order; a drain brings its leave along."""
        steps = list(self.topology.scenario)
        steps += [step.then() for step in steps if isinstance(step, Drain)]
        return sorted(steps, key=lambda step: step.at)

    def schedule(self, call_at: Callable[[float, Callable[[], object]], None]) -> None:
        """Arrange every step of the topology with a driver's `call_at`."""
        for step in self.steps():
            call_at(step.at, lambda step=step: self.carry_out(step, step.at))  # type: ignore[misc]

    def carry_out(self, step: Step, now: float) -> None:
        handler = self._dispatch.get(type(step))
        if handler is None:
            raise TypeError(f"no handler for scenario step {type(step).__name__}")
        handler(step)
        self.events.append(EventRecord(now, step.describe(), step.disruptive))

    def carry_out_due(self, pending: list[Step], now: float) -> None:
        """Carry out (and remove) the steps of `pending` that are due at `now`."""
        while pending and pending[0].at <= now:
            self.carry_out(pending.pop(0), now)

    # -- who is who ----------------------------------------------------------
    def live_servers(self) -> list[str]:
        """The pool's members now: authorized servers that are running (configured or
        added) and not dead. An outsider (`authorized = false`) is never one."""
        return sorted(
            name
            for name, spec in self.topology.servers.items()
            if spec.authorized
            and (not spec.standby or name in self.added)
            and name not in self.dead
        )

    def status(self, server: str) -> str:
        """up, dead, standby or outsider."""
        spec = self.topology.servers[server]
        if not spec.authorized:
            return "outsider"
        if server in self.dead:
            return "dead"
        if spec.standby and server not in self.added:
            return "standby"
        return "up"

    def _receiver(self, about: str | None) -> str | None:
        """Who takes an operator's command: the server it is about when that one is
        live, else the first live server; so the pool gets it exactly once."""
        live = self.live_servers()
        if about is not None and about in live:
            return about
        return live[0] if live else None

    # -- the steps -----------------------------------------------------------
    def _command(self, op: control.PolicyOp, about: str | None) -> None:
        receiver = self._receiver(about)
        if receiver is not None and self.pool.hosts(receiver):
            self.pool.command(receiver, op)

    def _set_share(self, step: SetShare) -> None:
        if step.move and self.connections is not None:
            self.connections.reallocate(step.server, step.share)
        self._command(control.SetShareOp(step.server, step.share), step.server)

    def _rebalance(self, step: Rebalance) -> None:
        if step.move and self.connections is not None:
            self.connections.reallocate(None, None)
        self._command(control.RebalanceOp(float(step.target), ()), None)

    def _kill(self, step: Kill) -> None:
        if step.server in self.dead or self.status(step.server) == "standby":
            return
        self.dead.add(step.server)
        if self.pool.hosts(step.server):
            self.pool.kill_server(step.server)
            if self.connections is not None:
                self.connections.server_killed(step.server)

    def _add(self, step: Add) -> None:
        if step.server in self.added or step.server in self.dead:
            return
        self.added.add(step.server)
        if self.pool.hosts(step.server):
            self.pool.start_server(step.server)
            if self.connections is not None:
                self.connections.server_added(step.server)

    def _kill_vip_router(self, step: KillVipRouter) -> None:
        if step.vip_router in self.dead:
            return
        self.dead.add(step.vip_router)
        if self.pool.hosts_node(step.vip_router):
            self.pool.kill_node(step.vip_router)

    def _drain(self, step: Drain) -> None:
        if step.server in self.dead or self.status(step.server) == "standby":
            return
        others = [s for s in self.live_servers() if s != step.server]
        if self.connections is not None and others and self.pool.hosts(step.server):
            self.connections.drain(step.server, others)
        self._command(control.SetShareOp(step.server, Fraction(0)), step.server)

    def _move(self, step: Move) -> None:
        """The server's live TCP connections go elsewhere; a dead or standby server has none."""
        if step.server not in self.live_servers() or not self.pool.hosts(step.server):
            return
        to = [step.to] if step.to else [s for s in self.live_servers() if s != step.server]
        if self.connections is not None and all(t in self.live_servers() for t in to) and to:
            self.connections.move(step.server, to, step.count)

    def _leave(self, step: Leave) -> None:
        """The drained server stops, as a crash would stop it (nothing is left on it)."""
        self._kill(Kill(at=step.at, line=step.line, server=step.server))

    def _client_rate(self, step: ClientRate) -> None:
        self.pool.set_client_rate(step.clients, step.rate)


def disruptive(events: Iterable[EventRecord]) -> list[EventRecord]:
    return [event for event in events if event.disruptive]
