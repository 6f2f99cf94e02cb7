"""Gossip membership: who is alive, found by probing, not by everyone's heartbeats.

With heartbeats every server hears every other every period: N - 1 messages per
server per period, N^2 in the pool. SWIM (Das, Gupta, Motivala, "SWIM: Scalable
Weakly-consistent Infection-style Process Group Membership Protocol", DSN 2002)
keeps each server's share constant, as HashiCorp's memberlist (under Consul and
Serf) runs it; this module follows memberlist's `probeNode` and suspicion rules:

* Each protocol period (`period`) a server pings one member and expects an ACK
  within half a period (memberlist: ProbeTimeout). Targets follow a ring: the
  live members in name order, each pinging the one `k` places on, `k` drawn from
  the period's number by a hash every server computes alike. So when views agree
  each member is probed by exactly one other in every period, and a death is
  found in the next period (SWIM 4.3 asks for a bounded time to the first probe;
  memberlist's shuffled round robin bounds it by N periods, and random choice
  leaves a tail: no probe for 6 periods happens with probability e^-6 per death).
* Without one it sends PING_REQ to `indirect` other members (memberlist:
  IndirectChecks = 3), which ping the target and pass its ACK back: a bad path
  between two servers is not taken for a death.
* No ACK by the end of the period: the target is suspected. The suspicion goes on
  the control channel (`MemberNotice` SUSPECT) to every member at once, where
  memberlist piggybacks it on pings; each member counts the target dead
  `suspicion` seconds after hearing it, unless the target refutes it with a
  greater incarnation (ALIVE). The suspector announces the death too, for a
  member that missed the suspicion.
* A server's incarnation starts at its start time in milliseconds, so a restarted
  server outranks what the pool remembers of its previous life.
* Every `RECONNECT_PERIODS` periods a server also pings one member it holds dead
  (Serf's reconnect of failed members), and a member that hears from one it holds
  dead tells it so, point to point: the one told refutes (ALIVE, a greater
  incarnation). So the two sides of a healed partition find each other again.

So per period a server sends one ping and one ack and receives about as many,
whatever N; a death costs two notices. Detection takes the wait until someone
probes the dead member (each of N - 1 members picks it with probability about
1/(N - 1) per period: about 1.6 periods on average), one period, then the
suspicion: independent of N.

Sans-I/O: time is passed in; messages go out through `send(message, to)` (`to`
None: the control channel).
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable
from dataclasses import dataclass

from manycast.wire.control import MemberNotice, MemberStatus, Probe, ProbeKind, ServerState

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
NO_ADDRESS = ipaddress.IPv4Address(0)
RECONNECT_PERIODS = 10  # a ping to a member held dead, every this many periods


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
    suspect_until: float = 0.0  # when a suspicion turns into a death
    suspected_by_us: bool = False


@dataclass
class _Probe:
    target: str
    nonce: int
    sent: float
    indirect_sent: bool = False


@dataclass
class SwimStats:
    pings: int = 0
    indirect_pings: int = 0
    suspicions: int = 0
    refutations: int = 0
    deaths: int = 0


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
        self.generation = 0
        self.stats = SwimStats()
        self._ring: tuple[int, list[str], int] | None = None  # (generation, names, ours)
        self._probe: _Probe | None = None
        self._next_period: float | None = None
        # Indirect probes we run for others: our nonce -> (asker's address, its nonce).
        self._relays: dict[int, tuple[Address, int, float]] = {}
        self._nonce = rng.getrandbits(32)
        self._suspects: dict[str, float] = {}  # name -> when the suspicion ends
        self._announce_again: float | None = None
        self._periods = 0

    # -- what the coordinator asks ---------------------------------------------------
    def alive(self, name: str) -> bool:
        """Alive or suspected (a suspect serves until its suspicion times out)."""
        member = self.members.get(name)
        return member is not None and member.status != MemberStatus.DEAD

    def start(self, now: float, state: ServerState) -> None:
        """Announce ourselves (twice: a notice may be lost) and start probing."""
        self._announce(state)
        self._next_period = now + self.period
        self._announce_again = now + self.period

    def next_deadline(self) -> float | None:
        deadlines = [d for d in (self._next_period,) if d is not None]
        if self._probe is not None and not self._probe.indirect_sent:
            deadlines.append(self._probe.sent + self.period / 2)
        if self._suspects:
            deadlines.append(min(self._suspects.values()))
        return min(deadlines, default=None)

    def on_timer(self, now: float, state: ServerState, stalled: bool) -> None:
        """Expire suspicions, escalate a probe without an ACK, start the next period.
        `stalled`: our own timer fired late, so ACKs may sit unread in our socket;
        suspect nobody this period."""
        for name, until in list(self._suspects.items()):
            if now >= until:
                self._die(name, announce=self.members[name].suspected_by_us)
        probe = self._probe
        if probe is not None and not probe.indirect_sent and now >= probe.sent + self.period / 2:
            probe.indirect_sent = True
            self._ask_others(probe, now)
        if self._next_period is None or now < self._next_period:
            return
        if self._announce_again is not None:
            self._announce_again = None
            self._announce(state)
        if stalled:
            self._probe = None
        elif probe is not None:
            self._probe = None
            self._suspect(probe.target, now)
        self._next_period = now + self.period
        self._relays = {n: r for n, r in self._relays.items() if now - r[2] < self.period}
        self._ping_next(now)
        self._periods += 1
        if self._periods % RECONNECT_PERIODS == 0:
            self._reconnect()

    # -- messages --------------------------------------------------------------------
    def on_probe(self, probe: Probe, now: float) -> None:
        self._heard(probe.sender, probe.address, probe.incarnation)
        sender = self.members.get(probe.sender)
        if sender is not None and sender.status == MemberStatus.DEAD:
            # It lives, at an incarnation we hold dead: tell it, so that it refutes.
            self._send(self._notice(MemberStatus.DEAD, probe.sender, sender), probe.address)
        if probe.kind == ProbeKind.PING and probe.target == self.name:
            self._send_probe(ProbeKind.ACK, probe.nonce, self.name, self.address, probe.address)
        elif probe.kind == ProbeKind.PING_REQ:
            nonce = self._next_nonce()
            self._relays[nonce] = (probe.address, probe.nonce, now)
            self.stats.indirect_pings += 1
            self._send_probe(
                ProbeKind.PING, nonce, probe.target, probe.target_address, probe.target_address
            )
        elif probe.kind == ProbeKind.ACK:
            relay = self._relays.pop(probe.nonce, None)
            if relay is not None:
                asker, nonce, _ = relay
                self._send_probe(
                    ProbeKind.ACK,
                    nonce,
                    probe.target,
                    probe.address,
                    asker,
                    target_incarnation=probe.incarnation,
                )
                return
            mine = self._probe
            if mine is not None and mine.nonce == probe.nonce and mine.target == probe.target:
                self._probe = None
                if probe.target != probe.sender:  # through another member
                    self._heard(probe.target, probe.target_address, probe.target_incarnation)

    def on_notice(self, notice: MemberNotice, now: float) -> None:
        if notice.member == self.name:
            if notice.status != MemberStatus.ALIVE and notice.incarnation >= self.incarnation:
                # Suspected or declared dead while alive: refute (memberlist's refute).
                self.incarnation = notice.incarnation + 1
                self.stats.refutations += 1
                self._announce(notice.state)
            return
        member = self.members.get(notice.member)
        if notice.status == MemberStatus.ALIVE:
            self._heard(notice.member, notice.address, notice.incarnation)
        elif member is None:
            return
        elif notice.status == MemberStatus.SUSPECT:
            if member.status == MemberStatus.ALIVE and notice.incarnation >= member.incarnation:
                member.incarnation = notice.incarnation
                self._mark_suspect(notice.member, now)
        elif notice.incarnation >= member.incarnation and member.status != MemberStatus.DEAD:
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
                self._suspects.pop(name, None)
                member.status = MemberStatus.ALIVE
                member.suspected_by_us = False
                self.generation += 1
            member.incarnation = incarnation

    def _add(self, name: str, member: Member) -> None:
        self.members[name] = member
        self.generation += 1

    def _announce(self, state: ServerState) -> None:
        self._send(
            MemberNotice(
                self.name, 0, MemberStatus.ALIVE, self.name, self.address, self.incarnation, state
            ),
            None,
        )

    def _ping_next(self, now: float) -> None:
        target = self._next_target(now)
        if target is None:
            return
        member = self.members[target]
        self._probe = _Probe(target, self._next_nonce(), now)
        self.stats.pings += 1
        self._send_probe(ProbeKind.PING, self._probe.nonce, target, member.address, member.address)

    def _next_target(self, now: float) -> str | None:
        """The member `k` places on from us in the ring of live members, `k` from the
        period's number: 1 to n - 1, the same at every member for the same period."""
        ring = self._ring
        if ring is None or ring[0] != self.generation:
            names = sorted(
                [self.name, *(n for n, m in self.members.items() if m.status != MemberStatus.DEAD)]
            )
            ring = self._ring = (self.generation, names, names.index(self.name))
        _, names, ours = ring
        if len(names) < 2:
            return None
        offset = 1 + _mix(round(now / self.period)) % (len(names) - 1)
        return names[(ours + offset) % len(names)]

    def _reconnect(self) -> None:
        """Ping one member we hold dead: if it lives, its ACK gets it told (`on_probe`)."""
        dead = [n for n, m in self.members.items() if m.status == MemberStatus.DEAD]
        if dead:
            name = self.rng.choice(dead)
            address = self.members[name].address
            self._send_probe(ProbeKind.PING, self._next_nonce(), name, address, address)

    def _notice(self, status: MemberStatus, name: str, member: Member) -> MemberNotice:
        return MemberNotice(
            self.name, 0, status, name, member.address, member.incarnation, ServerState.ACTIVE
        )

    def _ask_others(self, probe: _Probe, now: float) -> None:
        target = self.members.get(probe.target)
        if target is None:
            return
        helpers = [
            n
            for n, m in self.members.items()
            if m.status == MemberStatus.ALIVE and n != probe.target
        ]
        for name in self.rng.sample(helpers, min(self.indirect, len(helpers))):
            self._send_probe(
                ProbeKind.PING_REQ,
                probe.nonce,
                probe.target,
                target.address,
                self.members[name].address,
                target_incarnation=target.incarnation,
            )

    def _suspect(self, name: str, now: float) -> None:
        member = self.members.get(name)
        if member is None or member.status != MemberStatus.ALIVE:
            return
        self.stats.suspicions += 1
        self._mark_suspect(name, now)
        member.suspected_by_us = True
        self._send(self._notice(MemberStatus.SUSPECT, name, member), None)

    def _mark_suspect(self, name: str, now: float) -> None:
        member = self.members[name]
        member.status = MemberStatus.SUSPECT
        self._suspects[name] = member.suspect_until = now + self.suspicion
        self.generation += 1

    def _die(self, name: str, *, announce: bool) -> None:
        self._suspects.pop(name, None)
        member = self.members[name]
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
