"""Lifeguard: a prober that doubts itself before it accuses others.

SWIM takes a member that misses one ACK deadline for a suspect, and a suspect that
does not refute in time for dead. When the prober itself is slow (a busy host, a
backlog in its socket, routers under load) it is the prober's own lateness that
fails the probe, and live members are removed. Lifeguard (Dadgar, Phillips,
Currey, "Lifeguard: Local Health Awareness for More Accurate Failure Detection",
2018), as HashiCorp's memberlist runs it (awareness.go, suspicion.go), answers
with three parts; this module holds the arithmetic of each, and `swim.py` uses them:

* `Health` (the local health multiplier): a score raised when our probes fail
  while the members we asked for help did not even answer that they failed
  (missing nacks), and when we learn that others suspect us; lowered by each
  probe that succeeds. Our probe period is scaled by score + 1, so a slow member
  probes less often and waits longer before it accuses anyone.
* `Suspicion`: a suspicion starts at `maximum` and shrinks toward `minimum` as
  independent members confirm it (logarithmically, `wanted` confirmations reach
  the minimum), so one member's mistake leaves the suspect a long time to refute
  while a real death, which every prober sees, is declared as fast as before.
  `Suspicions` holds a member's suspicions with their deadlines in a heap, so
  the next one to run out is found without going through them all.
* `RoundTrip`: the ACK round trip, smoothed as TCP smooths it (RFC 6298), so the
  wait for a direct ACK follows what the network takes rather than a fixed half
  period (a busy host's own routers can take half a second where they took 20
  ms). memberlist keeps a fixed ProbeTimeout; its Vivaldi coordinates are not
  used for timeouts.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

HEALTH_LIMIT = 8  # scores 0 to 7: the probe period stretches to 8 times (memberlist)
SUSPICION_STRETCH = 6  # a suspicion nobody confirms lasts 6 times the minimum (memberlist)
CONFIRMATIONS = 2  # independent confirmations that bring a suspicion to its minimum


@dataclass
class Health:
    """The local health multiplier (memberlist's awareness): 0 is healthy."""

    score: int = 0
    limit: int = HEALTH_LIMIT

    def apply(self, delta: int) -> None:
        self.score = min(max(self.score + delta, 0), self.limit - 1)

    def scale(self, seconds: float) -> float:
        return seconds * (self.score + 1)


def wanted_confirmations(members: int) -> int:
    """How many confirmations a suspicion can hope for among `members` (counting
    ourselves and the suspect, neither of whom confirms)."""
    return max(0, min(CONFIRMATIONS, members - 2))


@dataclass
class Suspicion:
    """One member's suspicion of another, begun at `start` on the word of `first`."""

    start: float
    first: str
    minimum: float
    maximum: float
    wanted: int
    confirmed_by: set[str] = field(default_factory=set)
    slack: float = 0.0  # added once when it ran out while its holder was stalled
    deadline: float = field(init=False)  # kept as confirmations come, not recomputed

    def __post_init__(self) -> None:
        self.deadline = self._deadline()

    def confirm(self, by: str) -> bool:
        """`by` suspects the member too: True if it is a new confirmation that counts."""
        if len(self.confirmed_by) >= self.wanted or by == self.first or by in self.confirmed_by:
            return False
        self.confirmed_by.add(by)
        self.deadline = self._deadline()
        return True

    def extend(self, slack: float) -> None:
        """Give the suspicion `slack` more (once: it ran out while we were stalled)."""
        self.slack = slack
        self.deadline = self._deadline()

    def _deadline(self) -> float:
        """When the suspect is dead unless it refutes: memberlist's
        max - (max - min) * log(n + 1) / log(k + 1), never under min."""
        if self.wanted < 1:
            return self.start + self.minimum + self.slack
        share = math.log(len(self.confirmed_by) + 1) / math.log(self.wanted + 1)
        timeout = self.maximum - share * (self.maximum - self.minimum)
        return self.start + max(timeout, self.minimum) + self.slack


class Suspicions:
    """The suspicions one member holds, by suspect, with their deadlines in a heap:
    the soonest is found without going through them all (an entry whose suspicion
    ended or whose deadline moved is dropped when it comes up)."""

    def __init__(self) -> None:
        self._by_suspect: dict[str, Suspicion] = {}
        self._order: dict[str, int] = {}  # when each began, by count
        self._begun = 0
        self._deadlines: list[tuple[float, int, str]] = []  # (deadline, order, suspect)

    def __getitem__(self, suspect: str) -> Suspicion:
        return self._by_suspect[suspect]

    def begin(self, suspect: str, suspicion: Suspicion) -> None:
        self._by_suspect[suspect] = suspicion
        self._begun += 1
        self._order[suspect] = self._begun
        self._schedule(suspect)

    def end(self, suspect: str) -> None:
        self._by_suspect.pop(suspect, None)
        self._order.pop(suspect, None)

    def confirm(self, suspect: str, by: str) -> bool:
        """`by` suspects `suspect` too: True if that counts (the deadline moves up)."""
        if not self._by_suspect[suspect].confirm(by):
            return False
        self._schedule(suspect)
        return True

    def extend(self, suspect: str, slack: float) -> None:
        self._by_suspect[suspect].extend(slack)
        self._schedule(suspect)

    def soonest(self) -> float | None:
        while self._deadlines and not self._current(self._deadlines[0]):
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None

    def expired(self, now: float) -> list[str]:
        """The suspects whose suspicion has run out by `now`, in the order their
        suspicions began."""
        expired: dict[str, int] = {}
        while self._deadlines and self._deadlines[0][0] <= now:
            entry = heapq.heappop(self._deadlines)
            if self._current(entry):
                expired[entry[2]] = entry[1]
        return sorted(expired, key=expired.__getitem__)

    def _schedule(self, suspect: str) -> None:
        entry = (self._by_suspect[suspect].deadline, self._order[suspect], suspect)
        heapq.heappush(self._deadlines, entry)

    def _current(self, entry: tuple[float, int, str]) -> bool:
        deadline, order, suspect = entry
        suspicion = self._by_suspect.get(suspect)
        return (
            suspicion is not None
            and self._order[suspect] == order
            and suspicion.deadline == deadline
        )


@dataclass
class RoundTrip:
    """Smoothed round trip and its variation (RFC 6298: alpha 1/8, beta 1/4)."""

    smoothed: float | None = None
    variation: float = 0.0

    def sample(self, seconds: float) -> None:
        if self.smoothed is None:
            self.smoothed, self.variation = seconds, seconds / 2
            return
        self.variation += (abs(self.smoothed - seconds) - self.variation) / 4
        self.smoothed += (seconds - self.smoothed) / 8

    def wait(self) -> float | None:
        """SRTT + 2 RTTVAR: how long an ACK may take before we ask others to try (a
        probe waits twice that in all, at least TCP's SRTT + 4 RTTVAR); None before
        the first sample."""
        if self.smoothed is None:
            return None
        return self.smoothed + 2 * self.variation
