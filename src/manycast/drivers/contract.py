"""The one driver contract every driver implements, and the one way to carry out a node's output.

A driver hosts sans-I/O nodes (`protocol.node.Node`) on some network: the memory
driver's virtual clock, the overlay's UDP endpoints, a kernel lab namespace. The
pool, the scenario engine and the runtime see only this contract, never which
driver they have.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from manycast.protocol.node import Frame, Node

# Called with (node, effect) for every effect a node hands out.
EffectHandler = Callable[[Node, object], None]


@runtime_checkable
class Network(Protocol):
    """What the pool and the scenario engine need of a driver."""

    @property
    def now(self) -> float:
        """Seconds on this network's clock (virtual or monotonic), 0 at start."""

    @property
    def wall_base(self) -> float:
        """Wall-clock seconds (Unix epoch) at `now == 0`: what nodes stamp signed
        joins and reports with. Fixed on the memory driver, so runs repeat exactly."""

    # True when `now` follows real time (a DNS lookup can run); False on a virtual clock.
    realtime: bool

    def add(self, node: Node) -> None:
        """Bring a node up now (also while running)."""

    def kill(self, name: str) -> Node:
        """Stop a node at once, as a crash would: nothing more is sent or delivered."""

    def call_at(self, at: float, callback: Callable[[], object]) -> None:
        """Run `callback` at time `at` on this network's clock, then carry out what
        the nodes produced meanwhile."""

    def run_until(self, until: float, condition: Callable[[], bool] | None = None) -> bool:
        """Run until `now` reaches `until`, or earlier once `condition()` holds
        (checked after every event). True if the condition held."""

    def defer(self, work: Callable[[], Any], then: Callable[[Any], object]) -> None:
        """Run blocking `work` (a DNS lookup) off the clock; `then(result)` runs on
        this network's clock when it is done."""

    def close(self) -> None:
        """Release whatever the driver holds (sockets, timers). Idempotent."""

    # Set by whoever runs the pool; None: effects are dropped.
    on_effect: EffectHandler | None


# The part of a driver that keeps one timer per node: (node, its next deadline or None).
Armer = Callable[[Node, float | None], None]


def carry_out(
    node: Node, send: Callable[[Frame], None], arm: Armer, on_effect: EffectHandler | None
) -> None:
    """After any call into `node`: hand each frame it produced to `send`, each effect
    to `on_effect`, then tell `arm` the node's next deadline (None: no timer).
    Every driver calls this after every call into a node (or `deliver` after each
    of several calls in one go, then `arm` once: see `deliver`)."""
    deliver(node, send, on_effect)
    arm(node, node.next_deadline())


def deliver(node: Node, send: Callable[[Frame], None], on_effect: EffectHandler | None) -> None:
    """`carry_out` without the re-arm. A driver that calls into a node many times
    without yielding to its loop (a batch of datagrams read in one wake-up) calls
    this after each call and arms once after the last: no timer can fire in
    between, so the outcome is the same, and the per-packet path skips the deadline
    look-up."""
    if node.outbox:
        for frame in node.take_frames():
            send(frame)
    if node.effects:
        for effect in node.take_effects():
            if on_effect is not None:
                on_effect(node, effect)
