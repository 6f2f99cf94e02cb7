"""A server's side of the pool's load loop (Fig 10, step 1020), time passed in.

Each server measures its own request rate (an exponential average over
`load_smoothing` seconds, updated once per heartbeat) and reads its peers' from
their heartbeats or probes. It asks for a rebalance when it is the congested one:
the busiest of the pool, above `rebalance_above` times the mean, for
`rebalance_sustain` heartbeats in a row. Hysteresis keeps the loop from chasing
noise: the trigger is above the target, it must last, and every change of the
allocation (a commit, a snapshot, a store's state) is followed by a hold-off of
`rebalance_hold_s` seconds, since loads measured before a change say little about
after it.

A rebalance counts the load of a member that joined the allocation in the last
`SETTLING` time constants as not known (0.0: a rebalance by capacities keeps its
share). Its load averages the few requests it has had for buckets it has only
just been given, so its capacity (buckets / load) looked many times the others':
in the soak an operator's rebalance 0.25 s after a killed server was added back
gave it and one other about 95 % of the space (docs/soak.md, finding 16).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from manycast.protocol.peerview import Peer
from manycast.protocol.poolstate import PoolSettings
from manycast.space import Allocation
from manycast.wire import control

SETTLING = 3  # load-average time constants before a newcomer's load counts


class LoadWatch:
    def __init__(self, name: str, settings: PoolSettings) -> None:
        self.name = name
        self.settings = settings
        self.load = 0.0  # our requests per second, smoothed
        self.sessions = 0
        self._counted: tuple[float, int] | None = None  # (when, requests then)
        self._congested = 0  # heartbeats in a row we were the congested one
        self._hold_until = 0.0
        self._settling: dict[str, float] = {}  # newcomer -> when its load counts

    def start(self, now: float) -> None:
        """Loads are averages: judge them only once they have had time to settle."""
        settings = self.settings
        self._hold_until = now + max(settings.rebalance_hold_s, 3 * settings.load_smoothing)

    def hold_off(self, now: float) -> None:
        """The allocation changed: let the loads settle before judging them again."""
        self._hold_until = max(self._hold_until, now + self.settings.rebalance_hold_s)

    def joined(self, names: Iterable[str], now: float) -> None:
        """`names` joined the allocation now: their loads say little for a while."""
        until = now + SETTLING * self.settings.load_smoothing
        self._settling = {n: t for n, t in self._settling.items() if t > now}
        for name in names:
            self._settling[name] = until

    def count(self, requests_total: int, sessions: int, now: float) -> None:
        """The agent's request counter: the rate since the last count, averaged."""
        self.sessions = sessions
        if self._counted is None:
            self._counted = (now, requests_total)
            return
        then, counted = self._counted
        elapsed = now - then
        if elapsed >= self.settings.heartbeat_s:
            rate = (requests_total - counted) / elapsed
            weight = 1.0 - math.exp(-elapsed / self.settings.load_smoothing)
            self.load += weight * (rate - self.load)
            self._counted = (now, requests_total)

    def loads(self, allocation: Allocation, peers: Iterable[Peer]) -> dict[str, float]:
        """Every member's load as its heartbeats report it (ours as we measure it)."""
        known = {self.name: self.load}
        for peer in peers:
            known[peer.name] = peer.load
        return {server: known.get(server, 0.0) for server in allocation.servers}

    def congested(self, allocation: Allocation | None, peers: Iterable[Peer], now: float) -> bool:
        """Called once per heartbeat: True when we should ask for a rebalance now (and
        the hold-off then starts)."""
        settings = self.settings
        if settings.rebalance_above <= 0 or now < self._hold_until or allocation is None:
            return False
        if self.name not in allocation.servers:
            return False
        members = self.loads(allocation, peers)
        mean = sum(members.values()) / len(members)
        busiest = max(members.values())
        if mean <= 0 or self.load < busiest or busiest / mean <= settings.rebalance_above:
            self._congested = 0
            return False
        self._congested += 1
        if self._congested < settings.rebalance_sustain:
            return False
        self._congested = 0
        self._hold_until = now + settings.rebalance_hold_s
        return True

    def balance_op(
        self,
        target: float,
        allocation: Allocation,
        peers: Iterable[Peer],
        hot: tuple[control.BucketLoad, ...],
        now: float,
    ) -> control.BalanceLoadsOp:
        """A rebalance by the loads we know: every member's but a newcomer's, and our
        busiest buckets' (`hot`: only this server knows them)."""
        members = self.loads(allocation, peers)
        for name, until in self._settling.items():
            if name in members and until > now:
                members[name] = 0.0
        measured = tuple(control.ServerLoad(s, v) for s, v in sorted(members.items()))
        return control.BalanceLoadsOp(target, measured, hot)
