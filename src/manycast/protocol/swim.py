"""Gossip membership: who is alive, found by probing, not by everyone's heartbeats.

With heartbeats every server hears every other every period: N - 1 messages per
server per period, N^2 in the pool. SWIM (Das, Gupta, Motivala, "SWIM: Scalable
Weakly-consistent Infection-style Process Group Membership Protocol", DSN 2002)
keeps each server's share constant, as HashiCorp's memberlist (under Consul and
Serf) runs it; this module follows memberlist's `probeNode` and suspicion rules:

* Each protocol period (`period`) a server pings one member and expects an ACK
  within half a period (memberlist: ProbeTimeout), longer when round trips are.
  Targets follow a ring: the live members in name order, each pinging the one `k`
  places on, `k` drawn from the period's number by a hash every server computes
  alike. So when views agree each member is probed by exactly one other in every
  period, and a death is found in the next period (SWIM 4.3 asks for a bounded
  time to the first probe; memberlist's shuffled round robin bounds it by N
  periods, and random choice leaves a tail: no probe for 6 periods happens with
  probability e^-6 per death).
* Without one it sends PING_REQ to `indirect` other members (memberlist:
  IndirectChecks = 3), which ping the target and pass its ACK back: a bad path
  between two servers is not taken for a death.
* No ACK within a period (or two ACK waits, when longer): the target is suspected,
  unless it has spoken to us or refuted since we pinged it. The suspicion goes on
  the control channel (`MemberNotice` SUSPECT) to every member at once, where
  memberlist piggybacks it on pings; each member counts the target dead when the
  suspicion times out, unless the target refutes it with a greater incarnation
  (ALIVE). The member that began the suspicion announces the death too, for a
  member that missed the suspicion (those that confirmed it do not: one notice to
  every member, not one per confirmation).
* Lifeguard (`lifeguard.py`; memberlist's awareness and suspicion timers), so that
  a slow prober does not remove live members: a helper that gets no ACK either
  tells the asker so (NACK); a failed probe without those nacks, or a suspicion of
  ourselves, raises our local health score, a successful probe lowers it, and our
  probe period is the base period times score + 1. The wait for a direct ACK
  follows the round trips measured (SRTT + 2 RTTVAR, at least half a period; the
  whole probe waits twice that), so a slow round trip makes probes wait longer,
  not more frequent or less. A suspicion lasts `SUSPICION_STRETCH` times its
  shortest until others confirm it (each member whose own probe of the suspect
  fails multicasts a SUSPECT of its own), down to the shortest at
  `CONFIRMATIONS` confirmations; the shortest is `suspicion`, or two ACK waits
  when longer (time for the suspect to hear of it and refute). The three members
  that follow the suspect in the ring probe it at once, so a real death is
  confirmed one probe after it is suspected, at any N.
* When our own timer fired late (`stalled`: ACKs and refutations may sit unread
  in our socket), a probe or a suspicion that runs out gets its wait once more.
* A newcomer's incarnation starts at its start time in milliseconds, so a
  restarted newcomer outranks what the pool remembers of its previous life. The
  configured members start at incarnation 0 and know each other from the
  configuration (`know`), as they would after hearing every member's announcement,
  which a pool of N members pays with N^2 deliveries; a restarted configured member
  is told it is held dead (below) and refutes.
* Every `RECONNECT_PERIODS` periods a server also pings one member it holds dead
  (Serf's reconnect of failed members), and a member that hears from one it holds
  dead tells it so, point to point: the one told refutes (ALIVE, a greater
  incarnation). So the two sides of a healed partition find each other again.

So per period a server sends one ping and one ack and receives about as many,
whatever N; a death costs four or five notices (a suspicion, two or three
confirmations, the death).
Detection takes the wait until someone probes the dead member (one period when
views agree), one period, then the suspicion, confirmed one probe later and over
`suspicion` after it began: independent of N.
Nor does a server's work per message or timer grow with N: the ring of live
members and their count are kept as members change state (a sorted insert or
removal, no re-sort), a suspect's followers are found by its place in the ring,
and each suspicion's deadline is computed when its confirmations change and kept
in a heap (`lifeguard.Suspicions`).

Sans-I/O: time is passed in; messages go out through `send(message, to)` (`to`
None: the control channel).
"""

from __future__ import annotations

import ipaddress
import random
from bisect import bisect_left, insort
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from manycast.protocol.lifeguard import (
    HEALTH_LIMIT,
    SUSPICION_STRETCH,
    Health,
    RoundTrip,
    Suspicion,
    Suspicions,
    wanted_confirmations,
)
from manycast.wire.control import MemberNotice, MemberStatus, Probe, ProbeKind, ServerState

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
NO_ADDRESS = ipaddress.IPv4Address(0)
RECONNECT_PERIODS = 10  # a ping to a member held dead, every this many periods
NACK_AFTER = 0.5  # a helper nacks after this share of its own ACK wait, so the nack
# reaches an asker that is keeping up before the asker's period ends


@dataclass(frozen=True)
class ProbeBody:
    """The sender's state every probe carries (what a heartbeat carried)."""

    epoch: int
    digest: str
    state: ServerState
    load: float
    sessions: int


@dataclass
class Member:
    address: Address
    incarnation: int
    status: MemberStatus
    suspected_by_us: bool = False  # we began its suspicion: we announce its death
    spoke: float = float("-inf")  # when we last heard from it directly


@dataclass
class _Probe:
    target: str
    nonce: int
    sent: float
    ack_by: float  # then ask others
    fail_at: float  # then suspect the target
    incarnation: int  # the target's when we asked
    extended: bool = False  # its wait ran out while we stalled, and was given again
    indirect_sent: bool = False
    asked: int = 0  # helpers asked, each owing an ACK or a NACK
    nacks: int = 0


@dataclass
class _Relay:
    """An indirect probe we run for `asker` (its `nonce`)."""

    asker: Address
    nonce: int
    target: str
    target_address: Address
    at: float
    nack_at: float
    nacked: bool = False


@dataclass
class SwimStats:
    pings: int = 0
    indirect_pings: int = 0
    suspicions: int = 0
    confirmations: int = 0
    refutations: int = 0
    deaths: int = 0
    nacks: int = 0


class SwimDetector:
    """One server's view of the pool's membership. `generation` moves whenever
    any member's status changes, so callers may cache what they derive from it."""

    def __init__(
        self,
        name: str,
        address: Address,
        incarnation: int,
        *,
        period: float,
        suspicion: float,
        rng: random.Random,
        send: Callable[[Probe | MemberNotice, Address | None], None],
        body: Callable[[], ProbeBody],
        indirect: int = 3,
    ) -> None:
        self.name = name
        self.address = address
        self.incarnation = incarnation
        self.period = period
        self.suspicion = suspicion
        self.indirect = indirect
        self.rng = rng
        self._send = send
        self._body = body
        self.members: dict[str, Member] = {}
        # The members we hold dead, each with its place in `members` (the order
        # `_reconnect` picks from): kept as they die or come back, not looked for.
        self.dead: dict[str, int] = {}
        self.generation = 0
        self.stats = SwimStats()
        self.health = Health()
        self.round_trip = RoundTrip()
        # The live (alive or suspect) members and ourselves in name order, kept sorted
        # as members change state, and how many members besides us are live.
        self._ring: list[str] = [name]
        self._places: dict[str, int] = {}  # each member's place in `members`
        self._live = 0
        self._probes: dict[int, _Probe] = {}  # this period's, and checks of suspects
        self._next_period: float | None = None
        self._relays: dict[int, _Relay] = {}  # by the nonce of our ping to the target
        self._pings: dict[int, float] = {}  # our recent direct pings: nonce -> when sent
        self._nonce = rng.getrandbits(32)
        self._suspicions = Suspicions()
        self._announce_again: float | None = None
        self._known = False  # we started knowing the configured members (`know`)
        self._periods = 0

    # -- what the coordinator asks ---------------------------------------------------
    def alive(self, name: str) -> bool:
        """Alive or suspected (a suspect serves until its suspicion times out)."""
        member = self.members.get(name)
        return member is not None and member.status != MemberStatus.DEAD

    def know(self, members: Mapping[str, Address]) -> None:
        """Before `start`: the configured members at their addresses, alive until
        found otherwise, at incarnation 0, where every configured member starts (all
        in one go: the ring is sorted once, not grown one insert at a time)."""
        added = [name for name in members if name != self.name and name not in self.members]
        for name in added:
            self._places[name] = len(self.members)
            self.members[name] = Member(members[name], 0, MemberStatus.ALIVE)
        if added:
            self._ring = sorted([*self._ring, *added])
            self._live += len(added)
            self.generation += len(added)
            self._known = True

    def start(self, now: float, state: ServerState) -> None:
        """Announce ourselves and start probing. A newcomer announces itself twice (a
        notice may be lost, and the first may go out before the routers know the
        members); a configured member that starts knowing the pool (`know`) once: the
        others know it already, and one round more would be N^2 deliveries when a
        large pool starts."""
        self._announce(state)
        self._next_period = now + self.period
        self._announce_again = None if self._known else now + self.period

    def ack_wait(self) -> float:
        """How long a direct ACK may take before others are asked: half a period, or
        SRTT + 2 RTTVAR when longer (the whole probe then waits twice that: at least
        TCP's timeout, SRTT + 4 RTTVAR); at most HEALTH_LIMIT half periods. Before
        any round trip is measured, a whole period (a server starting on a busy host
        does not know yet how slow it is)."""
        measured = self.round_trip.wait()
        if measured is None:
            return self.period
        return min(max(self.period / 2, measured), HEALTH_LIMIT * self.period / 2)

    def probe_wait(self) -> float:
        """How long a probe waits for an ACK, direct or through others, before it
        suspects its target: a period, or two ACK waits when that is longer."""
        return max(self.period, 2 * self.ack_wait())

    def probe_period(self) -> float:
        """The time between our probes: the period scaled by our local health (a slow
        round trip makes each probe wait longer, not probe less often)."""
        return self.health.scale(self.period)

    def next_deadline(self) -> float | None:
        """The soonest of the next period, each probe's next step, each suspicion's
        end and each nack owed (asked after every message: no list is built)."""
        soonest = self._next_period
        for probe in self._probes.values():
            at = probe.fail_at if probe.indirect_sent else probe.ack_by
            if soonest is None or at < soonest:
                soonest = at
        suspicion = self._suspicions.soonest()
        if suspicion is not None and (soonest is None or suspicion < soonest):
            soonest = suspicion
        for relay in self._relays.values():
            if not relay.nacked and (soonest is None or relay.nack_at < soonest):
                soonest = relay.nack_at
        return soonest

    def on_timer(self, now: float, state: ServerState, stalled: bool) -> None:
        """Expire suspicions, nack, escalate a probe without an ACK, start the next
        period. `stalled`: our own timer fired late, so ACKs and refutations may sit
        unread in our socket: a probe or a suspicion that runs out now waits once
        more (not forever: a host that stays busy must still find deaths)."""
        for name in self._suspicions.expired(now):
            if stalled and not self._suspicions[name].slack:
                self._suspicions.extend(name, self.probe_wait())
            else:
                self._die(name, announce=self.members[name].suspected_by_us)
        for relay in self._relays.values():
            if not relay.nacked and now >= relay.nack_at:
                relay.nacked = True
                self._send_probe(
                    ProbeKind.NACK, relay.nonce, relay.target, relay.target_address, relay.asker
                )
        for nonce, probe in list(self._probes.items()):
            if now >= probe.fail_at and stalled and not probe.extended:
                probe.extended = True
                probe.fail_at = now + self.probe_wait()
            elif now >= probe.fail_at:
                del self._probes[nonce]
                self._failed(probe, now)
            elif not probe.indirect_sent and now >= probe.ack_by:
                probe.indirect_sent = True
                self._ask_others(probe)
        if self._next_period is None or now < self._next_period:
            return
        if self._announce_again is not None:
            self._announce_again = None
            self._announce(state)
        kept = HEALTH_LIMIT * self.period
        self._relays = {n: r for n, r in self._relays.items() if now - r.at < kept}
        self._pings = {n: at for n, at in self._pings.items() if now - at < kept}
        self._next_period = now + self.probe_period()
        target = self._next_target(now)
        if target is not None:
            self._ping(target, now, now + self.probe_wait())
        self._periods += 1
        if self._periods % RECONNECT_PERIODS == 0:
            self._reconnect()

    # -- messages --------------------------------------------------------------------
    def on_probe(self, probe: Probe, now: float) -> None:
        self._heard(probe.sender, probe.address, probe.incarnation)
        sender = self.members.get(probe.sender)
        if sender is not None:
            sender.spoke = now
        if sender is not None and sender.status == MemberStatus.DEAD:
            # It lives, at an incarnation we hold dead: tell it, so that it refutes.
            self._send(self._notice(MemberStatus.DEAD, probe.sender, sender), probe.address)
        if probe.kind == ProbeKind.PING and probe.target == self.name:
            self._send_probe(ProbeKind.ACK, probe.nonce, self.name, self.address, probe.address)
        elif probe.kind == ProbeKind.PING_REQ:
            nonce = self._next_nonce()
            nack_at = now + NACK_AFTER * self.ack_wait()
            self._relays[nonce] = _Relay(
                probe.address, probe.nonce, probe.target, probe.target_address, now, nack_at
            )
            self.stats.indirect_pings += 1
            self._send_probe(
                ProbeKind.PING, nonce, probe.target, probe.target_address, probe.target_address
            )
        elif probe.kind == ProbeKind.ACK:
            self._on_ack(probe, now)
        elif probe.kind == ProbeKind.NACK:
            mine = self._probes.get(probe.nonce)
            if mine is not None and mine.target == probe.target:
                mine.nacks += 1
                self.stats.nacks += 1

    def _on_ack(self, probe: Probe, now: float) -> None:
        relay = self._relays.pop(probe.nonce, None)
        if relay is not None:
            self.round_trip.sample(now - relay.at)
            self._send_probe(
                ProbeKind.ACK,
                relay.nonce,
                probe.target,
                probe.address,
                relay.asker,
                target_incarnation=probe.incarnation,
            )
            return
        direct = probe.target == probe.sender
        sent = self._pings.pop(probe.nonce, None) if direct else None
        if sent is not None:  # late ones too: a wait that was too short must grow
            self.round_trip.sample(now - sent)
        mine = self._probes.get(probe.nonce)
        if mine is not None and mine.target == probe.target:
            del self._probes[probe.nonce]
            self.health.apply(-1)
            if not direct:  # through another member
                self._heard(probe.target, probe.target_address, probe.target_incarnation)

    def on_notice(self, notice: MemberNotice, now: float) -> None:
        if notice.member == self.name:
            if notice.status != MemberStatus.ALIVE and notice.incarnation >= self.incarnation:
                # Suspected or declared dead while alive: refute (memberlist's refute),
                # and take it as a sign that we may be the slow one.
                self.incarnation = notice.incarnation + 1
                self.stats.refutations += 1
                self.health.apply(1)
                self._announce(notice.state)
            return
        member = self.members.get(notice.member)
        if notice.status == MemberStatus.ALIVE:
            self._heard(notice.member, notice.address, notice.incarnation)
            if notice.sender == notice.member and notice.member in self.members:
                self.members[notice.member].spoke = now
        elif member is None or notice.incarnation < member.incarnation:
            return
        elif notice.status == MemberStatus.SUSPECT:
            member.incarnation = notice.incarnation
            if member.status == MemberStatus.ALIVE:
                self._begin_suspicion(notice.member, notice.sender, now)
                probing = any(p.target == notice.member for p in self._probes.values())
                if not probing and self._confirms(notice.member, notice.sender):
                    self._ping(notice.member, now, now + self.probe_wait())
            elif member.status == MemberStatus.SUSPECT:
                self._suspicions.confirm(notice.member, notice.sender)
        elif member.status != MemberStatus.DEAD:
            member.incarnation = notice.incarnation
            self._die(notice.member, announce=False)

    # -- internals -------------------------------------------------------------------
    def _heard(self, name: str, address: Address, incarnation: int) -> None:
        """`name` spoke (or was vouched for) at `incarnation`: a greater incarnation
        ends a suspicion or a death; the same one only confirms a live member."""
        if name == self.name:
            return
        member = self.members.get(name)
        if member is None:
            if int(address):
                self._add(name, Member(address, incarnation, MemberStatus.ALIVE))
            return
        if int(address):
            member.address = address
        if incarnation > member.incarnation or (
            member.status == MemberStatus.ALIVE and incarnation == member.incarnation
        ):
            if member.status != MemberStatus.ALIVE:
                self._suspicions.end(name)
                if member.status == MemberStatus.DEAD:
                    self._join_ring(name)
                    del self.dead[name]
                member.status = MemberStatus.ALIVE
                member.suspected_by_us = False
                self.generation += 1
            member.incarnation = incarnation

    def _add(self, name: str, member: Member) -> None:
        self._places[name] = len(self.members)
        self.members[name] = member
        if member.status == MemberStatus.DEAD:
            self.dead[name] = self._places[name]
        else:
            self._join_ring(name)
        self.generation += 1

    def _join_ring(self, name: str) -> None:
        insort(self._ring, name)
        self._live += 1

    def _leave_ring(self, name: str) -> None:
        at = bisect_left(self._ring, name)
        if at < len(self._ring) and self._ring[at] == name:
            del self._ring[at]
            self._live -= 1

    def _announce(self, state: ServerState) -> None:
        self._send(
            MemberNotice(
                self.name, 0, MemberStatus.ALIVE, self.name, self.address, self.incarnation, state
            ),
            None,
        )

    def _live_ring(self) -> tuple[list[str], int]:
        """The live (alive or suspect) members and ourselves in name order, and our place."""
        return self._ring, bisect_left(self._ring, self.name)

    def _ping(self, target: str, now: float, fail_at: float) -> None:
        """Probe `target`: ACK within `ack_wait`, else ask others; none by `fail_at`:
        suspect it."""
        member = self.members[target]
        nonce = self._next_nonce()
        ack_by = now + self.ack_wait()
        self._probes[nonce] = _Probe(target, nonce, now, ack_by, fail_at, member.incarnation)
        self._pings[nonce] = now
        self.stats.pings += 1
        self._send_probe(ProbeKind.PING, nonce, target, member.address, member.address)

    def _next_target(self, now: float) -> str | None:
        """The member `k` places on from us in the ring of live members, `k` from the
        period's number: 1 to n - 1, the same at every member for the same period."""
        names, ours = self._live_ring()
        if len(names) < 2:
            return None
        offset = 1 + _mix(round(now / self.period)) % (len(names) - 1)
        return names[(ours + offset) % len(names)]

    def _confirms(self, suspect: str, first: str) -> bool:
        """Whether we are one of the members that probe `suspect` at once (besides
        the period's probe) to confirm or clear `first`'s suspicion: the ones that
        follow it in the ring, `first` left out, one more than the suspicion wants
        (a newcomer among them may not know the suspect yet)."""
        names = self._ring
        at = bisect_left(names, suspect)
        if at == len(names) or names[at] != suspect:
            return False
        places = self._suspicions[suspect].wanted + 1
        for step in range(1, len(names)):
            name = names[(at + step) % len(names)]
            if name == first:
                continue
            if name == self.name:
                return True
            places -= 1
            if places == 0:
                return False
        return False

    def _reconnect(self) -> None:
        """Ping one member we hold dead: if it lives, its ACK gets it told (`on_probe`)."""
        dead = sorted(self.dead, key=self.dead.__getitem__)  # in the order they joined
        if dead:
            name = self.rng.choice(dead)
            address = self.members[name].address
            self._send_probe(ProbeKind.PING, self._next_nonce(), name, address, address)

    def _notice(self, status: MemberStatus, name: str, member: Member) -> MemberNotice:
        return MemberNotice(
            self.name, 0, status, name, member.address, member.incarnation, ServerState.ACTIVE
        )

    def _ask_others(self, probe: _Probe) -> None:
        target = self.members.get(probe.target)
        if target is None:
            return
        helpers = [
            n
            for n, m in self.members.items()
            if m.status == MemberStatus.ALIVE and n != probe.target
        ]
        chosen = self.rng.sample(helpers, min(self.indirect, len(helpers)))
        probe.asked = len(chosen)
        for name in chosen:
            self._send_probe(
                ProbeKind.PING_REQ,
                probe.nonce,
                probe.target,
                target.address,
                self.members[name].address,
                target_incarnation=target.incarnation,
            )

    def _failed(self, probe: _Probe, now: float) -> None:
        """No ACK came for `probe` in time: suspect its target, unless it has spoken
        to us or refuted since we asked (alive: the wait was what fell short)."""
        member = self.members.get(probe.target)
        if member is None or member.spoke >= probe.sent or member.incarnation > probe.incarnation:
            return
        if member.status == MemberStatus.ALIVE:
            # Helpers that did not even nack say the fault may be ours (memberlist);
            # a member others suspect already says it is not.
            self.health.apply(probe.asked - probe.nacks if probe.asked else 1)
        self._suspect(probe.target, now)

    def _suspect(self, name: str, now: float) -> None:
        """Our own probe of `name` failed: suspect it, or confirm others' suspicion."""
        member = self.members.get(name)
        if member is None or member.status == MemberStatus.DEAD:
            return
        if member.status == MemberStatus.ALIVE:
            self.stats.suspicions += 1
            self._begin_suspicion(name, self.name, now)
            # The death is announced by whoever began the suspicion; every member that
            # heard of it (from us or from those who confirm it) counts the suspect dead
            # when it runs out. (Confirmers announcing too, their suspicions running out
            # within milliseconds of ours, made each death four or five notices to every
            # member instead of one.)
            member.suspected_by_us = True
        elif self._suspicions.confirm(name, self.name):
            self.stats.confirmations += 1
        else:
            return
        self._send(self._notice(MemberStatus.SUSPECT, name, member), None)

    def _begin_suspicion(self, name: str, first: str, now: float) -> None:
        """`name` is suspect on `first`'s word: dead at the end of a suspicion that
        starts long and shrinks as others confirm it (`lifeguard.Suspicion`)."""
        self.members[name].status = MemberStatus.SUSPECT
        live = self._live + 1
        # The suspect refutes only once the suspicion has reached it and its answer
        # has come back: never less than two of our ACK waits.
        shortest = max(self.suspicion, 2 * self.ack_wait())
        self._suspicions.begin(
            name,
            Suspicion(
                now, first, shortest, SUSPICION_STRETCH * shortest, wanted_confirmations(live)
            ),
        )
        self.generation += 1

    def _die(self, name: str, *, announce: bool) -> None:
        self._suspicions.end(name)
        member = self.members[name]
        if member.status != MemberStatus.DEAD:
            self._leave_ring(name)
            self.dead[name] = self._places[name]
        member.status = MemberStatus.DEAD
        self.generation += 1
        self.stats.deaths += 1
        if announce:
            self._send(self._notice(MemberStatus.DEAD, name, member), None)

    def _send_probe(
        self,
        kind: ProbeKind,
        nonce: int,
        target: str,
        target_address: Address,
        to: Address,
        *,
        target_incarnation: int = 0,
    ) -> None:
        body = self._body()
        if kind == ProbeKind.ACK and target == self.name:
            target_incarnation = self.incarnation
        self._send(
            Probe(
                self.name,
                0,
                kind,
                nonce,
                target,
                target_address,
                target_incarnation,
                self.incarnation,
                body.epoch,
                body.digest,
                body.state,
                self.address,
                body.load,
                body.sessions,
            ),
            to,
        )

    def _next_nonce(self) -> int:
        self._nonce = (self._nonce + 1) & 0xFFFFFFFF
        return self._nonce


def _mix(value: int) -> int:
    """splitmix64's finalizer: a well-spread 64-bit hash of `value`, the same anywhere."""
    z = (value + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)
