"""The pool's coordination through a consistent store with leases (`[pool] coordination =
"etcd"`), as a sans-I/O state machine the server agent uses in place of the channel's.

What moves to the store is liveness and the allocation; everything else stays on the
control channel (heartbeats still carry each server's load, R2 forwards, R3 state,
the data-plane handoffs). The rules:

* Liveness. Each server holds a lease in the store and keeps a member key on it; the
  live servers are the member keys there. A server that stops renewing (dead, or cut
  off from the store's quorum) loses its key when its lease expires.
* Fencing. A server serves only while its lease is surely alive: until the send time
  of its last answered renewal plus the lease's time to live, less a guard for a late
  timer. The store expires the lease no earlier, so a server cut off from the quorum
  has stopped serving before anyone can see it gone.
* Changes. Any server may commit a change: a transaction that writes the new state
  if the epoch is still the one it was computed from and the writer's member key
  still holds its lease. The coordinator (the smallest live member in the
  allocation) removes servers whose keys are gone and adds live ones that are not
  in it; operators' commands are committed by the server they were given to. A
  side without the quorum commits nothing, and a transaction of a server whose
  lease has expired fails even if it reaches the store late.
* Hand-over. A server leaves what a new allocation takes from it at once, and says
  so in its member key (`applied`); it takes up what the allocation gives it only
  once every live member's key says it has applied that same epoch. A member cut off
  from the store is waited for until its lease expires, by which time it has fenced
  itself: no bucket is served by two servers at any moment, and a change's gains
  wait at most one lease time. A server whose lease ran out was not waited for, so
  once it has a new one it takes nothing up from a view older than its new key.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from manycast import policy
from manycast.protocol.coordination import COMMAND_PATIENCE, Coordinator, PoolSettings, describe_op
from manycast.protocol.poolstate import starting_state
from manycast.protocol.server import Server
from manycast.protocol.storestate import (
    Announce,
    Change,
    MemberRecord,
    Outcome,
    StoredState,
    StoreRequest,
    StoreView,
)
from manycast.space import Allocation
from manycast.wire import control
from manycast.wire.control import ServerState

UNREGISTERED = 1 << 62  # no member key of ours since our lease was lost
UNSERVED = "~unserved"  # owns what we withhold when the allocation names nobody else


@dataclass
class _InFlight:
    ident: int
    op: control.PolicyOp | None  # None: the initial state
    stored: StoredState
    give_up: float | None  # an operator's command: retried until then; None: a duty
    deadline: float


class LeasedCoordinator(Coordinator):
    """`Coordinator`'s interface for the server agent, with liveness and the allocation
    kept in a store (fed by `on_store`, `on_lease`, `on_change_result`; asked of it by
    `take_store_requests`)."""

    def __init__(
        self,
        name: str,
        address: ipaddress.IPv4Address | ipaddress.IPv6Address,
        settings: PoolSettings,
        rng: random.Random,
        *,
        initial: Allocation | policy.Apportionment | None,
        lease_s: float,
    ) -> None:
        super().__init__(name, address, settings, rng, initial=None)
        self.lease_s = lease_s
        self.guard = lease_s / 4  # how late a fencing timer may fire without harm
        # What we write if the store holds no state yet (a configured member's start).
        self._seed = starting_state(settings, initial)
        self._lease_until = float("-inf")
        self._members: dict[str, MemberRecord] = {}  # the others' live member keys
        self._addresses: dict[str, ipaddress.IPv4Address | ipaddress.IPv6Address] = {}
        self._seen: set[str] = set()  # members whose keys we have seen at some time
        self._requests: list[StoreRequest] = []
        self._change: _InFlight | None = None
        self._asked: list[tuple[control.PolicyOp, float]] = []  # commands, with give-up
        self._serving = np.zeros(settings.space.buckets, dtype=bool)
        self._handed_epoch = 0
        self._registered = 0  # the store's revision when our member key was written
        self._view_revision = 0  # the store's revision of the view we act on
        self._wake: float | None = None
        self.unreadable: str | None = None
        # Called whenever a request is queued: the I/O side takes them soon after.
        self.on_request: Callable[[], None] | None = None

    # -- events from the store's I/O ---------------------------------------------------
    def on_lease(self, valid_until: float, now: float) -> None:
        """A renewal answered: the lease lives at least until `valid_until`."""
        self._lease_until = max(self._lease_until, valid_until)
        self._wake = now

    def on_lease_lost(self, now: float) -> None:
        """The store no longer has our lease (expired): we are no member until we
        register again with a new one."""
        self._lease_until = float("-inf")
        self._registered = UNREGISTERED
        self._wake = now

    def on_registered(self, revision: int, now: float) -> None:
        """Our member key was written at the store's `revision`. While it was gone the
        others took our buckets without waiting for us, so a view older than it may
        show a state they have left: we take nothing up from one."""
        self._registered = revision
        self._wake = now

    def on_store(self, view: StoreView, now: float) -> None:
        self._view_revision = view.revision
        self._members = {n: r for n, r in view.members.items() if n != self.name}
        self._seen.update(self._members)
        for name, record in self._members.items():
            if record.address is not None:
                self._addresses[name] = record.address
        self.unreadable = view.unreadable
        stored = view.state
        if stored is None and view.unreadable is None:
            self._initialize(now)
        elif stored is not None and stored.epoch > self.epoch:
            self._adopt(stored, now)
        self._wake = now

    def on_change_result(self, ident: int, outcome: Outcome, now: float) -> None:
        change = self._change
        if change is None or change.ident != ident:
            return
        self._change = None
        self._wake = now
        if outcome is Outcome.COMMITTED:
            self.stats.commits += 1
            if change.stored.epoch > self.epoch:
                self._adopt(change.stored, now)
        elif change.op is not None and change.give_up is not None and now < change.give_up:
            # Computed from a state that was not the latest, or unanswered: again, from
            # the state the store holds by the time it is tried.
            self._asked.insert(0, (change.op, change.give_up))
        elif change.give_up is not None:
            self.stats.rejected_ops += 1

    def take_store_requests(self) -> list[StoreRequest]:
        out, self._requests = self._requests, []
        return out

    def record(self) -> MemberRecord:
        """What our member key says now."""
        return MemberRecord(self.address, self._handed_epoch)

    # -- what the server agent calls -------------------------------------------------
    def take_new_allocation(self) -> Allocation | None:
        new, self._new = self._new, None
        if new is not None:
            # The agent applies it right after taking it: our key says so after that.
            self._request(Announce(self.record()))
        return new

    def next_deadline(self) -> float | None:
        deadlines = [self._next_heartbeat]
        if self._wake is not None:
            deadlines.append(self._wake)
        if self._serving.any():  # fence in time (at once when the lease is gone)
            deadlines.append(max(self._lease_until - self.guard, self._started))
        if self._change is not None:
            deadlines.append(self._change.deadline)
        deadlines.extend(give_up for _, give_up in self._asked)
        return min(deadlines)

    def on_timer(self, now: float) -> None:
        self._wake = None
        if now >= self._next_heartbeat:
            self._heartbeat(now)  # loads and addresses for the pool's peers
            self._next_heartbeat = now + self.settings.heartbeat_s
            self._watch_load(now)
        change = self._change
        if change is not None and now >= change.deadline:
            self.on_change_result(change.ident, Outcome.FAILED, now)
        for op, give_up in [a for a in self._asked if now >= a[1]]:
            self._asked.remove((op, give_up))
            self.stats.rejected_ops += 1
        self._refresh(now)
        self._duties(now)

    def on_message(self, message: control.ControlMessage, now: float) -> None:
        """Only heartbeats (loads, addresses): changes and liveness are the store's."""
        if isinstance(message, control.Heartbeat):
            self._on_heartbeat(message, now)

    def command(self, op: control.PolicyOp, now: float) -> None:
        """An operator's change, committed by this server (tried again on conflict for
        `COMMAND_PATIENCE` seconds)."""
        if isinstance(op, control.RebalanceOp) and not op.loads and self.allocation is not None:
            op = self._balance_op(op.target, now)
        self._asked.append((op, now + COMMAND_PATIENCE))
        self._duties(now)

    # -- liveness, as the store says --------------------------------------------------
    def lease_valid(self, now: float) -> bool:
        return now < self._lease_until - self.guard

    def alive(self, now: float) -> list[str]:
        me = [self.name] if self.lease_valid(now) else []
        return sorted([*self._members, *me])

    def holds_alive(self, name: str, now: float) -> bool:
        return self.lease_valid(now) if name == self.name else name in self._members

    def dead_addresses(self, now: float) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        known: dict[str, ipaddress.IPv4Address | ipaddress.IPv6Address] = dict(self._addresses)
        for peer in self.peers.values():
            if int(peer.address):  # NO_ADDRESS (0) until heard from
                known[peer.name] = peer.address
        return {a for n, a in known.items() if n not in self._members and n != self.name}

    def coordinator(self, now: float) -> str | None:
        allocation = self.allocation
        if allocation is None:
            return None
        names = [n for n in self._members if n in allocation.servers]
        if self.lease_valid(now) and self.name in allocation.servers:
            names.append(self.name)
        return min(names, default=None)

    @property
    def changing(self) -> bool:
        """A change of ours is with the store, its outcome not yet heard."""
        return self._change is not None

    def serving(self) -> int:
        """How many buckets we serve now."""
        return int(self._serving.sum())

    # -- the state and what we serve of it -------------------------------------------------
    def _adopt(self, stored: StoredState, now: float) -> None:
        self.epoch = stored.epoch
        self.apportionment = stored.state
        self.state = (
            ServerState.ACTIVE
            if self.name in stored.state.allocation.servers
            else ServerState.JOINING
        )
        self.load_watch.hold_off(now)
        self.changes.append((now, stored.epoch, f"{stored.why} by {stored.by}"))

    def _view_current(self) -> bool:
        """Our view is of a time our member key was there (others wait for us)."""
        return self._view_revision >= self._registered

    def _settled(self) -> bool:
        """Every other live member keeps within the allocation of our epoch."""
        return all(record.applied == self.epoch for record in self._members.values())

    def _refresh(self, now: float) -> None:
        """Fence when the lease may have run out; leave at once what the allocation
        took; take up what it gave once every live member has left it."""
        state = self.apportionment
        if state is None:
            return
        allocation = state.allocation
        mine = (
            allocation.buckets(self.name)
            if self.name in allocation.servers
            else np.zeros(allocation.space.buckets, dtype=bool)
        )
        if not self.lease_valid(now):
            serve = np.zeros_like(mine)
        elif (mine & ~self._serving).any() and self._settled() and self._view_current():
            serve = mine
        else:
            serve = self._serving & mine
        if self._handed_epoch == self.epoch and np.array_equal(serve, self._serving):
            return
        if self._handed_epoch != self.epoch and self.on_offer is not None:
            self.on_offer(allocation)  # the technique prepares (R4 pins what it will lose)
        self._serving = serve
        self._handed_epoch = self.epoch
        self._new = _withholding(allocation, self.name, serve)

    # -- changes ------------------------------------------------------------------------
    def _duties(self, now: float) -> None:
        if self._change is not None or self.apportionment is None or not self.lease_valid(now):
            return
        allocation = self.apportionment.allocation
        if self.is_coordinator(now):
            for server in allocation.servers:
                if self._gone(server, now) and len(allocation.servers) > 1:
                    self._try(control.RemoveServerOp(server), now, None)
                    return
            for name in sorted(set(self._members) - set(allocation.servers)):
                self._try(control.AddServerOp(name, None), now, None)
                return
        while self._asked:
            op, give_up = self._asked.pop(0)
            if self._try(op, now, give_up):
                return

    def _gone(self, server: str, now: float) -> bool:
        """A server of the allocation with no live member key: one we saw leave, or one
        never seen for a grace time after we started (the pool may be starting)."""
        if server == self.name or server in self._members:
            return False
        return server in self._seen or now - self._started >= 2 * self.lease_s

    def _try(self, op: control.PolicyOp, now: float, give_up: float | None) -> bool:
        """Ask the store to commit `op` applied to our state; False if nothing to ask."""
        result = self._result_of(op)
        if result is None:
            return False
        stored = StoredState(self.epoch + 1, result, self.name, describe_op(op))
        self._start_change(op, stored, now, give_up)
        return True

    def _initialize(self, now: float) -> None:
        """The store holds no state: write the configured one (epoch 1), if we have it."""
        if self._seed is None or self._change is not None or not self.lease_valid(now):
            return
        stored = StoredState(1, self._seed, self.name, "initial state")
        self._start_change(None, stored, now, None)

    def _start_change(
        self, op: control.PolicyOp | None, stored: StoredState, now: float, give_up: float | None
    ) -> None:
        ident = self.rng.getrandbits(63)
        self._change = _InFlight(ident, op, stored, give_up, now + 2 * self.lease_s)
        self.stats.proposals += 1
        self._request(Change(ident, stored.epoch - 1, stored))

    def _request(self, request: StoreRequest) -> None:
        if isinstance(request, Announce):  # only the newest of our key's values matters
            self._requests = [r for r in self._requests if not isinstance(r, Announce)]
        self._requests.append(request)
        if self.on_request is not None:
            self.on_request()


def _withholding(allocation: Allocation, name: str, serve: np.ndarray[Any, Any]) -> Allocation:
    """`allocation` as the agent should apply it: ours only the buckets in `serve`
    (the rest of ours to another server, or to nobody's name if there is none)."""
    if name not in allocation.servers:
        return allocation
    index = allocation.index_of(name)
    withheld = (allocation.owners == index) & ~serve
    if not withheld.any():
        return allocation
    others = [i for i in range(len(allocation.servers)) if i != index]
    owners = allocation.owners.copy()
    if others:
        owners[withheld] = others[0]
        return Allocation(allocation.space, allocation.servers, owners)
    owners[withheld] = len(allocation.servers)
    return allocation.with_owners([*allocation.servers, UNSERVED], owners)


def lease_coordination(
    server: Server, initial: Allocation | policy.Apportionment | None, lease_s: float
) -> LeasedCoordinator:
    """Give `server` the leased coordination in place of the channel's (its callbacks
    carried over)."""
    old = server.coordinator
    leased = LeasedCoordinator(
        server.name, server.address, server.settings, server.rng, initial=initial, lease_s=lease_s
    )
    leased.on_offer, leased.hot_buckets = old.on_offer, old.hot_buckets
    server.coordinator = leased
    return leased
