"""How the servers of a pool agree on who is alive and which allocation is current.

Every server runs this state machine; there is no fixed leader. The rule:

* Liveness. Each server multicasts a heartbeat on the control channel every
  `heartbeat_s` seconds with its epoch, allocation digest, state and load. A peer
  not heard from for `misses` intervals is dead. With `membership = "swim"` the
  servers probe each other instead (`swim.py`): each handles a constant number of
  messages per period whatever the pool's size, and the probes carry what the
  heartbeats carried.
* Coordinator. The live ACTIVE server with the smallest id coordinates. Every
  server applies this rule to its own view, so when the coordinator dies the
  next one takes over after the same timeout; no election is needed.
* State. The pool's state is an `Apportionment`: the allocation and the share
  each server should hold. Every op is applied to it (`apply_op`), so the shares
  are kept exactly rather than read back from the held buckets, and every server
  holds its share to within one bucket after any sequence of changes. The digest
  heartbeats, proposals and snapshots carry covers the shares too.
* Changes. Only the coordinator proposes: a `Proposal` names the next epoch, the
  base (epoch, digest) it applies to, the operation and the digest of the result.
  Every server computes the result itself (policies are deterministic), checks
  the digest and acks; when every live server has acked (with the gossip
  membership: the `WITNESSES` lowest live ids, so no change waits on every member
  of a large pool), or after a short timeout, the coordinator commits and every
  server applies the new allocation at the commit. So each change is distributed
  before it is executed.
* Disagreement. States are ordered by (epoch, digest). A server that sees a
  heartbeat with a greater state than its own asks for a snapshot and adopts
  it; a coordinator does so before proposing. After a split pool heals, every
  server converges on the greatest state, and the coordinator then adds back the
  live servers that state lacks and removes the dead ones it holds. While views
  disagree (a partition), each side serves what it believes it owns, so a source
  may be served twice or not at all until the sides hear each other again.
"""

from __future__ import annotations

import ipaddress
import random
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from manycast import policy
from manycast.protocol.commands import COMMAND_PATIENCE, CommandRelay
from manycast.protocol.falsealarm import FalseAlarms
from manycast.protocol.loadwatch import LoadWatch
from manycast.protocol.peerview import NO_ADDRESS, NO_DIGEST, Peer, PeerView
from manycast.protocol.poolstate import (
    PoolSettings,
    apply_op,
    describe_op,
    initial_allocation,
    initial_apportionment,
    members_op,
    starting_state,
)
from manycast.protocol.swim import ProbeBody, SwimDetector
from manycast.space import Allocation
from manycast.wire import control
from manycast.wire.control import ServerState
from manycast.wire.errors import WireError

# With heartbeats, hearing none of the allocation's other servers (two or more) is
# more likely our own input stuck in a queue, or our own router down, than all of
# them dead at once: their removal waits this many timeouts more.
ALONE_DOUBT = 3
WITNESSES = 3  # with the gossip membership: the members whose acks a proposal waits for
DUTIES_DEBOUNCE = 0.002  # seconds: news of members within this are acted on together
CHANGES_KEPT = 4096  # the latest adopted changes a coordinator keeps (`changes`)
# The states we held last (`outnumbered`): a peer holding one of them is of our part, a
# commit or a few behind us.
PAST_KEPT = 64


@dataclass
class _Pending:
    epoch: int
    base: tuple[int, str]
    op: control.PolicyOp
    result: policy.Apportionment
    acks: set[str]
    deadline: float
    witnesses: frozenset[str] | None = None  # None: every live member


@dataclass
class CoordinatorStats:
    proposals: int = 0
    commits: int = 0
    snapshots_adopted: int = 0
    snapshots_refused: int = 0  # a split-off part's state that left us out (`_splits_us_off`)
    removals_refused: int = 0  # our removal proposed by a server not our coordinator
    rejected_ops: int = 0
    messages_sent: int = 0


class Coordinator(PeerView):
    def __init__(
        self,
        name: str,
        address: ipaddress.IPv4Address | ipaddress.IPv6Address,
        settings: PoolSettings,
        rng: random.Random,
        *,
        initial: Allocation | policy.Apportionment | None = None,
        observer: bool = False,
    ) -> None:
        # An observer (a VIP router, Fig 19) follows the pool's allocation without being
        # a member: it sends no heartbeat, never coordinates, acks nothing, answers no
        # snapshot request, and is not among the live servers.
        super().__init__(name, observer)
        self.address = address
        self.settings = settings
        self.false_alarms = FalseAlarms(settings.dead_after)
        self.rng = rng
        # The pool's state: the allocation and the shares its servers should hold.
        self.apportionment = starting_state(settings, initial)
        self.epoch = 1 if initial is not None else 0
        self.state = ServerState.ACTIVE if initial is not None else ServerState.JOINING
        self.stats = CoordinatorStats()
        # (time, epoch, what) of the latest changes adopted: a history for people
        # and tests, bounded so that a pool running for months does not grow by it.
        self.changes: deque[tuple[float, int, str]] = deque(maxlen=CHANGES_KEPT)
        self._past: deque[tuple[int, str]] = deque([self.view], maxlen=PAST_KEPT)
        self._seq = 0
        self._outbox: list[control.ControlMessage] = []
        self._to: list[ipaddress.IPv4Address | ipaddress.IPv6Address | None] = []
        self._new: Allocation | None = self.allocation
        self._pending: _Pending | None = None  # ours, as coordinator
        # others' proposals we acked: epoch -> (digest, result, when, the base it is on)
        self._offered: dict[int, tuple[str, policy.Apportionment, float, tuple[int, str]]] = {}
        # States of a split-off part we fetched and refused (`_splits_us_off`): not
        # fetched again; forgotten once our epoch passes theirs.
        self._refused: set[tuple[int, str]] = set()
        # The latest proposal on a state newer than ours, acted on once we hold its base.
        self._ahead_proposal: control.Proposal | None = None
        self._commands = CommandRelay(rng, settings.heartbeat_s)
        self._queue: list[control.PolicyOp] = []  # ops to propose, as coordinator
        self._parts: dict[tuple[int, str], dict[int, control.Snapshot]] = {}
        self._next_heartbeat = 0.0
        # The coordinator's wake-up when a member's silence reaches `dead_after` before
        # the next heartbeat: a death is acted on when it is judged, not up to one
        # heartbeat later.
        self._judge_at: float | None = None
        # The gossip membership's next deadline, as of our last call into it (only those
        # calls change it): asked after every event, worked out once per call instead.
        self._swim_due: float | None = None
        self._snapshot_asked = -1.0
        self.load_watch = LoadWatch(name, settings)
        # Called with a proposed allocation before we ack it (or, as coordinator, before
        # we propose it): the server prepares for the change (R4 pins its connections).
        self.on_offer: Callable[[Allocation], None] | None = None
        # The server's busiest buckets and their request rates, for a rebalance it asks for.
        self.hot_buckets: Callable[[float], list[control.BucketLoad]] | None = None

    # -- what the server agent calls ---------------------------------------------------
    def start(self, now: float) -> None:
        self._started = now
        self._next_heartbeat = now
        # A configured member (its address in the configuration, starting with the
        # configured state) starts at incarnation 0, as every other member knows it
        # from the configuration; a newcomer at its start time in milliseconds.
        known = self.settings.member_addresses
        configured = self.allocation is not None and self.name in known
        if self.settings.membership == "swim" and not self.observer:
            self.swim = SwimDetector(
                self.name,
                self.address,
                0 if configured else int((self.settings.wall_base + now) * 1000),
                period=self.settings.heartbeat_s,
                suspicion=max(self.settings.heartbeat_misses - 1, 1) * self.settings.heartbeat_s,
                rng=self.rng,
                send=lambda message, to: self._send(message, to),
                body=self._probe_body,
            )
        self.load_watch.start(now)
        if self.allocation is not None:
            # Configured members get `startup_grace` (at least one timeout) to send
            # their first heartbeat: heard as of then, until heard for real.
            # With the gossip membership a configured member knows the others from the
            # start (their addresses, incarnation 0): probed from the first period, not
            # announced to each other (N^2 deliveries when a large pool starts).
            swim = self.swim if configured else None
            grace = max(self.settings.startup_grace - self.settings.dead_after, 0.0)
            addresses: dict[str, ipaddress.IPv4Address | ipaddress.IPv6Address] = {}
            for member in self.settings.members:
                if member != self.name and member not in self.peers:
                    address = known.get(member, NO_ADDRESS) if swim is not None else NO_ADDRESS
                    self.peers[member] = Peer(
                        member, address, now + grace, ServerState.ACTIVE, 0, NO_DIGEST, heard=False
                    )
                    self._outside.add(member)
                    if int(address):
                        addresses[member] = address
            if swim is not None:
                swim.know(addresses)
            self._ordered = sorted(self.peers)
        self.on_timer(now)

    @property
    def allocation(self) -> Allocation | None:
        state = self.apportionment
        return state.allocation if state is not None else None

    def report_load(self, requests_total: int, sessions: int, now: float) -> None:
        """The agent's request counter; the heartbeat carries the rate since the last one."""
        self.load_watch.count(requests_total, sessions, now)

    def command(self, op: control.PolicyOp, now: float) -> None:
        """An operator's change: proposed here if we coordinate, else sent to the pool and
        sent again each heartbeat until a proposal carries it (a datagram may be lost,
        the coordinator may die). An operator's rebalance without loads is made from
        the loads this server knows (Fig 10, step 1020, asked for by hand)."""
        if isinstance(op, control.RebalanceOp) and not op.loads and self.allocation is not None:
            op = self._balance_op(op.target, now)
        if self.is_coordinator(now):
            self._queue.append(op)
            self._duties(now)
        else:
            self._commands.pass_on(op, now)
            self._resend_commands(now)

    def _resend_commands(self, now: float) -> None:
        due = self._commands.due(now, self.is_coordinator(now))
        self._queue.extend(due.take_up)
        self.stats.rejected_ops += due.given_up
        for command_id, op in due.resend:
            self._send(control.Command(self.name, self._next_seq(), command_id, op))

    def take_messages(self) -> list[control.ControlMessage]:
        """What to send on the control channel (`take_addressed` for where each goes)."""
        return [message for message, _ in self.take_addressed()]

    def take_addressed(
        self,
    ) -> list[tuple[control.ControlMessage, ipaddress.IPv4Address | ipaddress.IPv6Address | None]]:
        """Each message to send, with its unicast destination (None: the channel)."""
        if not self._outbox:
            return []
        out = list(zip(self._outbox, self._to, strict=True))
        self._outbox, self._to = [], []
        return out

    def take_new_allocation(self) -> Allocation | None:
        new, self._new = self._new, None
        return new

    def next_deadline(self) -> float | None:
        soonest = self._next_heartbeat  # (asked after every event: no list is built)
        if self._judge_at is not None and self._judge_at < soonest:
            soonest = self._judge_at
        if self._pending is not None and self._pending.deadline < soonest:
            soonest = self._pending.deadline
        if self._swim_due is not None and self._swim_due < soonest:
            soonest = self._swim_due
        return soonest

    # -- time ---------------------------------------------------------------------------
    def on_timer(self, now: float) -> None:
        if now >= self._next_heartbeat and self.observer:
            self._next_heartbeat = now + self.settings.heartbeat_s
            self._behind(now)
        elif now >= self._next_heartbeat:
            self._check_stall(now, self._next_heartbeat)
            if self.swim is None:
                self._heartbeat(now)
            self._resend_commands(now)
            self._next_heartbeat = now + self.settings.heartbeat_s
            self._duties(now)
            self._watch_load(now)
            self._arm_judge(now)
        elif self._judge_at is not None and now >= self._judge_at:
            self._check_stall(now, self._judge_at)
            self._judge_at = None
            self._duties(now)
            self._arm_judge(now)
        swim = self.swim
        # (The detector has nothing to do before its next deadline: our other wake-ups,
        # a judgement, a report, a session's timer, need not walk its suspicions.)
        if swim is not None and (self._swim_due is None or now >= self._swim_due):
            before = swim.generation
            if swim._next_period is None:
                swim.start(now, self.state)
            swim.on_timer(now, self.state, stalled=now < self._stalled_until)
            self._swim_due = swim.next_deadline()
            if swim.generation != before:
                self._duties_soon(now)
        if self._pending is not None and now >= self._pending.deadline:
            self._commit(now)

    def _check_stall(self, now: float, due: float) -> None:
        """Our timer due at `due` fired at `now`: more than a heartbeat late, our host
        was busy, and for as long again as we were late (on top of a timeout) peers'
        messages may still be queued unread, so nobody is judged meanwhile."""
        late = now - due
        if late > self.settings.heartbeat_s:
            self._stalled_until = max(self._stalled_until, now + self.timeout(now) + late)

    def _probe_body(self) -> ProbeBody:
        return ProbeBody(
            self.epoch, self.digest, self.state, self.load_watch.load, self.load_watch.sessions
        )

    def _arm_judge(self, now: float) -> None:
        """As coordinator, wake when the member heard from longest ago would be judged
        dead, if that comes before the next heartbeat (once per heartbeat: O(members))."""
        self._judge_at = None
        allocation = self.allocation
        if (
            self.swim is not None
            or allocation is None
            or self._pending is not None
            or not self.is_coordinator(now)
        ):
            return  # (the gossip membership wakes us itself when a member dies)
        timeout = self.timeout(now)
        since = now - timeout
        heard = [
            peer.last_seen
            for name in allocation.servers
            if (peer := self.peers.get(name)) is not None and peer.last_seen >= since
        ]
        if heard:
            # alive() counts a peer while last_seen >= now - timeout: a hair later it is not.
            at = min(heard) + timeout + 1e-6
            if at < self._next_heartbeat:
                self._judge_at = at

    def _doubting_alone(self, servers: tuple[str, ...], dead: list[str], now: float) -> bool:
        """Whether to hold back removing `dead`: with heartbeats, we have heard none of
        the allocation's other servers (two or more, each sending every heartbeat) for
        two heartbeats, and not yet for `ALONE_DOUBT` timeouts more than a timeout.
        The soak saw a coordinator remove all four of its peers at once, three in its
        own process, when its input was queued behind a burst (docs/soak.md, finding
        11); a server alone behind a restarted router took the whole space, which
        reached no client, and moved its clients twice."""
        if self.swim is not None:
            return False
        heard = [p.last_seen for n in servers if n != self.name and (p := self.peers.get(n))]
        if len(heard) < 2:
            return False
        deaf_since = max(heard)
        if now - deaf_since <= 2 * self.settings.heartbeat_s:
            return False
        return now - deaf_since < (1 + ALONE_DOUBT) * self.timeout(now)

    def _heartbeat(self, now: float) -> None:
        self._send(
            control.Heartbeat(
                self.name,
                self._next_seq(),
                self.epoch,
                self.digest,
                self.state,
                self.address,
                self.load_watch.load,
                self.load_watch.sessions,
                int(self.settings.heartbeat_s * 1000),
            )
        )

    def _duties(self, now: float) -> None:
        """What the coordinator does each heartbeat: catch up, then fix the allocation.
        A part that is outnumbered proposes nothing: its epochs would race the bigger
        part's coordinator, which proposes past them to add it back."""
        if (
            self._behind(now)
            or not self.is_coordinator(now)
            or self._pending is not None
            or self.outnumbered(now)
        ):
            return
        if self.allocation is None:
            return
        servers = self.allocation.servers
        alive = set(self.alive(now))
        dead = [server for server in servers if server not in alive][: len(servers) - 1]
        if dead and self._doubting_alone(servers, dead, now):
            return
        # After a stall of ours every peer counts as alive for a while (their
        # heartbeats may be queued unread): that holds back removals, but a server is
        # added back only on a heartbeat heard within the timeout.
        heard = now - self.settings.dead_after
        weights = self.apportionment.weights if self.apportionment is not None else {}
        new = sorted(
            p.name
            for p in self.peers.values()
            if p.name not in weights and self._peer_alive(p, heard)
        )
        # Every dead server in one change, then every newcomer in one: a burst of
        # deaths (or of joins) is one epoch, not one each.
        if dead or new:
            self._propose(members_op(dead, []) if dead else members_op([], new), now)
            return
        if self._refused and self._holding_refused(alive):
            # Our own members hold a split-off state we refused, and wait for us (their
            # coordinator) while our state is below theirs: the same state again, past
            # their epoch, which includes them, so they adopt it.
            self._propose(control.MembersOp((), ()), now, reassert=True)
            return
        while self._queue:
            op = self._queue.pop(0)
            if self._propose(op, now):
                return

    def _watch_load(self, now: float) -> None:
        """Once per heartbeat: when we are the congested one, ask for a rebalance."""
        if self.load_watch.congested(self.allocation, self.peers.values(), now):
            self.command(self._balance_op(self.settings.rebalance_target, now), now)

    def outnumbered(self, now: float) -> bool:
        """Whether more live servers hold some other state than hold ours, we included:
        so it is for a part of the pool that was cut off (a server alone behind a router
        that came back, or one that stopped hearing the rest for a moment) from when it
        hears the rest again until it adopts their state; and for a server a commit has
        not reached yet. A peer holding a state we held before is of our part, behind
        us by a commit or a few; any other state is another part's, whatever its epoch
        (a part cut off may have counted past the bigger one: docs/soak.md, finding 14)."""
        ours = 1
        others: Counter[tuple[int, str]] = Counter()
        view, past = self.view, self._past
        for name, peer in self.peers.items():
            if peer.epoch <= 0 or self.held_dead(name, now):
                continue
            held = (peer.epoch, peer.digest)
            if held == view or held in past:
                ours += 1
            else:
                others[held] += 1
        return any(count > ours for count in others.values())

    def _balance_op(self, target: float, now: float) -> control.PolicyOp:
        assert self.allocation is not None
        hot = tuple(self.hot_buckets(now)) if self.hot_buckets is not None else ()
        return self.load_watch.balance_op(target, self.allocation, self.peers.values(), hot, now)

    def _behind(self, now: float) -> bool:
        """True (and a snapshot asked for) when a live peer holds a greater state."""
        view = self.view
        limit = self._limit(now)
        best = (0, NO_DIGEST)
        # Our state only grows, so a peer heard at or below it stays there until heard
        # again (`_note_view`): only those heard above it need looking at.
        for name in list(self._ahead):
            peer = self.peers[name]
            held = (peer.epoch, peer.digest)
            if held <= view:
                self._ahead.discard(name)
            elif held in self._refused:
                continue
            elif held > best and peer.epoch > 0 and self._peer_alive(peer, limit):
                best = held
        if best <= view:
            return False
        offered = self._offered.get(best[0])
        if (
            offered is not None
            and offered[0] == best[1]
            and now - offered[2] < 3 * self.settings.heartbeat_s
        ):
            return False  # a commit for it is on its way (unless it got lost)
        if now - self._snapshot_asked >= self.settings.heartbeat_s * 2:
            self._snapshot_asked = now
            self._send(control.SnapshotRequest(self.name, self._next_seq(), best[0]))
        return True

    # -- proposing ------------------------------------------------------------------------
    def _result_of(self, op: control.PolicyOp) -> policy.Apportionment | None:
        """The state `op` leads to from ours; None when the policy refuses it (counted)
        or it changes nothing."""
        assert self.apportionment is not None
        try:
            result = apply_op(self.apportionment, op)
        except (policy.PolicyError, ValueError):
            self.stats.rejected_ops += 1
            return None
        return None if result.digest() == self.digest else result

    def _holding_refused(self, alive: set[str]) -> bool:
        """Whether a live peer holds a state we refused (`_splits_us_off`)."""
        return any(
            (peer.epoch, peer.digest) in self._refused
            for name in alive
            if (peer := self.peers.get(name)) is not None
        )

    def _propose(self, op: control.PolicyOp, now: float, reassert: bool = False) -> bool:
        """Propose `op`; `reassert`: our state unchanged, at a new epoch."""
        if reassert:
            assert self.apportionment is not None
            result: policy.Apportionment | None = self.apportionment
        else:
            result = self._result_of(op)
        if result is None:
            return False
        # Past every live peer's epoch: after a split the other part may have counted
        # further, and our state (not its) is to win (`_splits_us_off`).
        limit = self._limit(now)
        epoch = 1 + max(
            [self.epoch] + [p.epoch for p in self.peers.values() if self._peer_alive(p, limit)]
        )
        if self.on_offer is not None:
            self.on_offer(result.allocation)
        self._pending = _Pending(
            epoch,
            self.view,
            op,
            result,
            {self.name},
            now + self.settings.heartbeat_s * 2,
            None if self.swim is None else frozenset(self._witnesses(self.name, now)),
        )
        self.stats.proposals += 1
        self._send(
            control.Proposal(
                self.name, self._next_seq(), epoch, self.epoch, self.digest, result.digest(), 0, op
            )
        )
        self._maybe_commit(now)
        return True

    def _maybe_commit(self, now: float) -> None:
        pending = self._pending
        if pending is None:
            return
        if pending.witnesses is not None:
            if pending.witnesses <= pending.acks:
                self._commit(now)
        elif set(self.alive(now)) - self._beyond(pending.base) <= pending.acks:
            self._commit(now)

    def _beyond(self, base: tuple[int, str]) -> set[str]:
        """Peers heard holding a state greater than `base`: a split-off part's that we
        refused (`_splits_us_off`), the only time we propose while one is heard. They
        cannot ack a proposal on `base`; they adopt its commit."""
        if not self._refused:
            return set()
        return {p.name for p in self.peers.values() if (p.epoch, p.digest) > base}

    def _witnesses(self, proposer: str, now: float) -> list[str]:
        """With the gossip membership, the members a proposal of `proposer` waits for:
        the `WITNESSES` lowest ids of the allocation's servers we count alive, besides
        the proposer (every member computes the same from the same view)."""
        allocation = self.allocation
        chosen: list[str] = []
        for name in allocation.servers if allocation is not None else ():
            if len(chosen) == WITNESSES:
                break
            if name != proposer and self.holds_alive(name, now):
                chosen.append(name)
        return chosen

    def _commit(self, now: float) -> None:
        pending = self._pending
        if pending is None:
            return
        self._pending = None
        if self.view != pending.base:
            return  # overtaken (we adopted a greater state meanwhile)
        self._send(
            control.Commit(self.name, self._next_seq(), pending.epoch, pending.result.digest())
        )
        self._install(pending.epoch, pending.result, now, f"commit {describe_op(pending.op)}")
        self.stats.commits += 1
        self._duties(now)

    def _install(self, epoch: int, state: policy.Apportionment, now: float, why: str) -> None:
        allocation = state.allocation
        if self.apportionment is not None:
            self.load_watch.joined(state.weights.keys() - self.apportionment.weights.keys(), now)
        if self.swim is None and self.apportionment is not None:
            gone = self.apportionment.weights.keys() - state.weights.keys()
            self.false_alarms.removed([n for n in gone if self.held_dead(n, now)], now)
        self.epoch = epoch
        self.apportionment = state
        self._installs += 1
        self._new = allocation
        self.load_watch.hold_off(now)
        self.state = ServerState.ACTIVE if self.name in state.weights else ServerState.JOINING
        self._offered = {e: o for e, o in self._offered.items() if e > epoch}
        if self._refused:
            self._refused = {view for view in self._refused if view[0] > epoch}
        if self._parts:
            # A snapshot that lost a part would wait for it for ever: one no newer
            # than ours is refused on arrival anyway.
            self._parts = {view: parts for view, parts in self._parts.items() if view[0] > epoch}
        self.changes.append((now, epoch, why))
        self._past.append(self.view)
        if self.swim is not None:
            # A newcomer learns the pool's members from the allocation (their addresses
            # come with their probes): until the gossip says otherwise they are alive,
            # so it agrees with the others on who coordinates.
            for name in allocation.servers:
                if name != self.name and name not in self.peers:
                    self._add_peer(Peer(name, NO_ADDRESS, now, ServerState.ACTIVE, 0, NO_DIGEST))

    # -- messages -----------------------------------------------------------------------
    def on_message(self, message: control.ControlMessage, now: float) -> None:
        if isinstance(message, control.Heartbeat):
            self._on_heartbeat(message, now)
        elif isinstance(message, control.Probe | control.MemberNotice):
            self._on_membership(message, now)
        elif isinstance(message, control.Command):
            if self.is_coordinator(now) and self._commands.first_time(message.command_id, now):
                self._queue.append(message.op)
                self._duties(now)
        elif isinstance(message, control.Proposal):
            self._on_proposal(message, now)
        elif isinstance(message, control.Ack):
            pending = self._pending
            if (
                pending is not None
                and message.epoch == pending.epoch
                and message.digest == pending.result.digest()
            ):
                pending.acks.add(message.sender)
                self._maybe_commit(now)
        elif isinstance(message, control.Commit):
            offered = self._offered.get(message.epoch)
            if (
                offered is not None
                and offered[0] == message.digest
                and offered[3] == self.view
                and message.epoch > self.epoch
            ):
                self._install(message.epoch, offered[1], now, f"commit from {message.sender}")
                self._caught_up(now)
            elif (message.epoch, message.digest) > self.view:
                # A state we cannot build from ours: its committer holds it; fetch it.
                self._heard_state(message.sender, (message.epoch, message.digest))
                self._behind(now)
        elif isinstance(message, control.SnapshotRequest):
            self._on_snapshot_request(message, now)
        elif isinstance(message, control.Snapshot):
            self._on_snapshot(message, now)

    def _on_membership(self, message: control.Probe | control.MemberNotice, now: float) -> None:
        """A probe or notice of the gossip membership: to the detector, and what it
        says of its sender (a probe) or its member (an ALIVE notice) to the peer table."""
        swim = self.swim
        if swim is None:
            return
        before = swim.generation
        if isinstance(message, control.Probe):
            swim.on_probe(message, now)
            self._update_peer(
                message.sender,
                message.address,
                message.state,
                now,
                (message.epoch, message.digest, message.load, message.sessions),
            )
        else:
            swim.on_notice(message, now)
            if message.status == control.MemberStatus.ALIVE and message.member != self.name:
                self._update_peer(message.member, message.address, message.state, now, None)
        self._swim_due = swim.next_deadline()
        if swim.generation != before:
            self._duties_soon(now)

    def _duties_soon(self, now: float) -> None:
        """A member died, came back or appeared: act on it at once, but once for a burst
        of such news (a pool starting hears every member within a few milliseconds)."""
        at = now + DUTIES_DEBOUNCE
        if self._judge_at is None or at < self._judge_at:
            self._judge_at = at

    def _on_proposal(self, proposal: control.Proposal, now: float) -> None:
        base = (proposal.base_epoch, proposal.base_digest)
        if base != self.view or self.apportionment is None:
            # The proposer holds `base`: a newer state to fetch, if it is newer than ours
            # (with the gossip membership we may not have heard its state otherwise).
            if base > self.view:
                # Acked once we hold it: when a split pool merges, the coordinator
                # proposes adding the others back as they fetch its state, and a
                # proposal that waits out its timeout for their acks leaves the
                # moving portions without a member at the routers meanwhile.
                ahead = self._ahead_proposal
                if ahead is None or proposal.epoch >= ahead.epoch:
                    self._ahead_proposal = proposal
            self._heard_state(proposal.sender, base)
            self._behind(now)
            return
        try:
            result = apply_op(self.apportionment, proposal.op)
        except (policy.PolicyError, ValueError):
            return
        if result.digest() != proposal.digest:
            return  # we would compute something else: do not ack; a snapshot will settle it
        if (
            not self.observer
            and self.name not in result.weights
            and proposal.sender != self.coordinator(now)
        ):
            # Our removal, by a server that is not our coordinator: it stopped hearing
            # us while we still hear it (its host starved, a loss burst one way). We
            # stay out of its part: acked, the whole part we are in adopted a lone
            # server's state, every client moving to it and back (docs/soak.md,
            # finding 14). Its state is refused too (`_splits_us_off`).
            self.stats.removals_refused += 1
            return
        self._offered[proposal.epoch] = (proposal.digest, result, now, base)
        if self.observer:
            return
        self._commands.carried(proposal.op)
        if self.on_offer is not None:
            self.on_offer(result.allocation)
        to = None
        if self.swim is not None:
            if self.name not in self._witnesses(proposal.sender, now):
                return  # the gossip membership: only the witnesses ack
            # to the proposer alone (its address came with its probes): only it counts acks
            proposer = self.peers.get(proposal.sender)
            to = proposer.address if proposer is not None and int(proposer.address) else None
        self._send(control.Ack(self.name, self._next_seq(), proposal.epoch, proposal.digest), to)

    def _on_snapshot_request(self, request: control.SnapshotRequest, now: float) -> None:
        state = self.apportionment
        if self.observer or state is None or self.epoch < request.epoch:
            return
        if self.swim is not None:
            # Peers' states are known only as of their last probe: the coordinator
            # answers, and, when the coordinator itself asks, its witnesses.
            coordinator = self.coordinator(now)
            if coordinator != self.name and not (
                request.sender == coordinator and self.name in self._witnesses(coordinator, now)
            ):
                return
        else:
            # Answer only if we are the smallest live id holding our state: one answer,
            # usually.
            limit = self._limit(now)
            holders = [
                p.name
                for p in self.peers.values()
                if p.last_seen >= limit and (p.epoch, p.digest) == self.view
            ]
            if min([self.name, *holders]) != self.name:
                return
        # With the gossip membership, to the asker alone (its address came with its
        # probes): on the channel every part would reach every member.
        asker = self.peers.get(request.sender) if self.swim is not None else None
        to = asker.address if asker is not None and int(asker.address) else None
        for part in control.snapshot_parts(
            self.epoch,
            state.allocation,
            sender=self.name,
            seq=self._next_seq(),
            weights=state.weights,
        ):
            self._send(part, to)

    def _on_snapshot(self, part: control.Snapshot, now: float) -> None:
        key = (part.epoch, part.digest)
        if key <= self.view or key in self._refused:
            return
        parts = self._parts.setdefault(key, {})
        parts[part.part] = part
        if len(parts) < part.count:
            return
        del self._parts[key]
        try:
            carried = control.assemble(parts.values())
            state = policy.Apportionment(carried.allocation, carried.weights)
        except (WireError, policy.PolicyError):
            return
        if self._splits_us_off(state, part.sender, now):
            self._refused.add(key)
            self.stats.snapshots_refused += 1
            self._snapshot_asked = -1.0  # another peer's state may be the one to fetch
            self._duties(now)
            return
        self.stats.snapshots_adopted += 1
        self._pending = None
        self._install(part.epoch, state, now, f"snapshot from {part.sender}")
        self._caught_up(now)

    def _splits_us_off(self, state: policy.Apportionment, sender: str, now: float) -> bool:
        """Whether `state` is a split-off part's, not to be adopted: it leaves us out,
        it has no more servers than ours, and it does not come from our coordinator.

        While a router is down the pool splits, and each part takes the whole space
        with a change of its own. When they hear each other again the greater
        (epoch, digest) used to win, by the luck of the digests: a server alone could
        impose its state on the rest, every client moving to it and back (the soak,
        seed 20261201: s1 adopted s3's lone state 1.2 s after rb's restart, and s3
        then added the others back). Now the bigger part's state wins, the
        coordinator's on a tie: its coordinator refuses the other, proposes the
        others back past their epoch (`_propose`), and they adopt that."""
        ours = self.apportionment
        if ours is None or self.observer:
            return False
        if self.name in state.weights or len(state.weights) > len(ours.weights):
            return False
        return sender != self.coordinator(now)

    def _caught_up(self, now: float) -> None:
        """We adopted another's state: a proposal that waited for it is acked now."""
        proposal = self._ahead_proposal
        if proposal is None or (proposal.base_epoch, proposal.base_digest) > self.view:
            return
        self._ahead_proposal = None
        if (proposal.base_epoch, proposal.base_digest) == self.view:
            self._on_proposal(proposal, now)

    # -- plumbing -------------------------------------------------------------------------
    def _send(
        self,
        message: control.ControlMessage,
        to: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None,
    ) -> None:
        """On the control channel, or (`to`) point to point."""
        self._outbox.append(message)
        self._to.append(to)
        self.stats.messages_sent += 1

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq


__all__ = [
    "COMMAND_PATIENCE",
    "Coordinator",
    "PoolSettings",
    "apply_op",
    "describe_op",
    "initial_allocation",
    "initial_apportionment",
    "starting_state",
]
