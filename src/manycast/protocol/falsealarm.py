"""Local health for the heartbeat membership: a removal undone at once is our fault.

With heartbeats a member is removed once it has not been heard for `dead_after`
(0.3 s by default). On a busy host the silence can be the listener's: its input
queued behind a burst while its timers still fire on time, which the stall check
(a heartbeat timer that fired late) does not see. A removal moves the member's
clients, which is more work for the same hosts, so one false removal breeds the
next. The soak found this (docs/soak.md, finding 11): after a router restart with
1000 clients the coordinator removed and re-added members of its own process a
dozen times in ten seconds, each time breaking sessions.

Lifeguard's answer (`lifeguard.py`, for the gossip membership) fits here too. A
member removed for its silence and heard again within `REHEARD` timeouts was alive
all along (a server that really died takes seconds to come back), and that raises
our local health score; we judge by a timeout of `dead_after` times (score + 1); the
score comes down by one for every `DECAY` timeouts without another false removal.
A healthy member still finds a death in one timeout.

A member heard again holding no more than the state a server starts with (epoch 1
or less) restarted: it did die, however soon it came back. With a long timeout (the
soak's 2 s) a killed server's process is up again within `REHEARD` timeouts, and
counting each restart as our fault stretched the timeout until deaths went unseen.
"""

from __future__ import annotations

from collections.abc import Iterable

from manycast.protocol.lifeguard import Health

REHEARD = 3  # heard again within this many timeouts of its removal: a false removal
DECAY = 10  # timeouts without a false removal that bring the score down by one
STARTED_EPOCH = 1  # a configured server starts at epoch 1, a standby at 0


class FalseAlarms:
    """Removals for silence, and the judging timeout they stretch."""

    def __init__(self, dead_after: float) -> None:
        self.dead_after = dead_after
        self.health = Health()
        self.false_removals = 0  # counted for people (metrics, tests)
        self._removed: dict[str, float] = {}  # member removed for its silence: when
        self._changed = 0.0  # when the score last went up or down

    def timeout(self, now: float) -> float:
        """How long a member may stay silent before we hold it dead."""
        if self.health.score:
            steps = int((now - self._changed) / (DECAY * self.dead_after))
            if steps:
                self.health.apply(-steps)
                self._changed = now
        return self.health.scale(self.dead_after)

    def removed(self, names: Iterable[str], now: float) -> None:
        """`names` left the allocation while we held them dead."""
        for name in names:
            self._removed[name] = now

    def heard(self, name: str, now: float, epoch: int) -> None:
        """A message from `name`, which holds state `epoch` (called only while some
        removal is remembered)."""
        at = self._removed.pop(name, None)
        if at is not None and epoch > STARTED_EPOCH and now - at <= REHEARD * self.dead_after:
            self.timeout(now)  # the decay due so far, first
            self.health.apply(1)
            self._changed = now
            self.false_removals += 1

    @property
    def remembering(self) -> bool:
        return bool(self._removed)
