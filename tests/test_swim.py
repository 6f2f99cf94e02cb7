"""The gossip membership (`protocol/swim.py`) on the virtual clock: detectors wired by a
small in-test network (1 ms per hop unless a test says otherwise, the control channel
as a broadcast), so each test controls exactly which messages are lost or late. Then
a pool on the memory driver with `membership = "swim"`: a killed server is removed
and a restarted one comes back."""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import math
import random
import re
from collections import Counter
from collections.abc import Callable

import pytest

from manycast.protocol.lifeguard import SUSPICION_STRETCH, Suspicion, wanted_confirmations
from manycast.protocol.swim import RECONNECT_PERIODS, ProbeBody, SwimDetector
from manycast.topology import TopologyError, loads
from manycast.wire.control import MemberNotice, MemberStatus, Probe, ProbeKind, ServerState
from pooltools import assert_all_served_since, assert_one_allocation, pool_toml, run_to, start

PERIOD = 0.1
SUSPICION = 0.2
HOP = 0.001
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Message = Probe | MemberNotice
Drop = Callable[[str, str, Message], bool]
Delay = Callable[[str, str, Message], float]


class Network:
    """Detectors named m0.. delivering to each other after `delay(sender, receiver,
    message)` (one hop); `drop(sender, receiver, message)` loses what it returns true
    for; `down` members neither send nor receive."""

    def __init__(self, n: int, seed: int = 1, *, configured: bool = False) -> None:
        """`configured`: the members start knowing each other (as a pool's configured
        members do), at incarnation 0."""
        self.now = 0.0
        self.rng = random.Random(seed)
        self.queue: list[tuple[float, int, str, Message]] = []
        self.order = itertools.count()
        self.down: set[str] = set()
        self.drop: Drop = lambda sender, receiver, message: False
        self.delay: Delay = lambda sender, receiver, message: HOP
        self.sent: Counter[str] = Counter()
        self.received: Counter[str] = Counter()
        self.notices: list[tuple[float, str, MemberNotice]] = []
        self.detectors: dict[str, SwimDetector] = {}
        self.names_at: dict[Address, str] = {}
        for index in range(n):
            self.add(f"m{index}", incarnation=0 if configured else 1, start=False)
        for detector in self.detectors.values():
            if configured:
                self.configure(detector)
            detector.start(self.now, ServerState.ACTIVE)

    def configure(self, detector: SwimDetector) -> None:
        """What a configured member knows before it starts: every other member."""
        detector.know({name: address for address, name in self.names_at.items()})

    def add(self, name: str, incarnation: int, *, start: bool = True) -> SwimDetector:
        address: Address = ipaddress.IPv4Address(
            f"10.0.{len(self.names_at) // 250}.{len(self.names_at) % 250 + 1}"
        )
        if name in self.detectors:
            address = self.detectors[name].address
        detector = SwimDetector(
            name,
            address,
            incarnation,
            period=PERIOD,
            suspicion=SUSPICION,
            rng=random.Random(self.rng.random()),
            send=lambda message, to: self._send(name, message, to),
            body=lambda: ProbeBody(1, "0" * 16, ServerState.ACTIVE, 0.0, 0),
        )
        self.detectors[name] = detector
        self.names_at[address] = name
        self.down.discard(name)
        if start:
            detector.start(self.now, ServerState.ACTIVE)
        return detector

    def _send(self, sender: str, message: Message, to: Address | None) -> None:
        if sender in self.down:
            return
        self.sent[sender] += 1
        if isinstance(message, MemberNotice) and to is None:
            self.notices.append((self.now, sender, message))
        receivers = [self.names_at[to]] if to is not None else list(self.detectors)
        for receiver in receivers:
            if receiver != sender:
                at = self.now + self.delay(sender, receiver, message)
                heapq.heappush(self.queue, (at, next(self.order), receiver, message))

    def run(self, until: float) -> None:
        while True:
            deadlines = [
                (at, name)
                for name, d in self.detectors.items()
                if name not in self.down and (at := d.next_deadline()) is not None
            ]
            timer = min(deadlines, default=None)
            delivery = self.queue[0][0] if self.queue else None
            times = [t for t in (timer[0] if timer else None, delivery) if t is not None]
            if not times or min(times) > until:
                self.now = until
                return
            if delivery is not None and (timer is None or delivery <= timer[0]):
                at, _, receiver, message = heapq.heappop(self.queue)
                self.now = at
                if receiver in self.down or self.drop(message.sender, receiver, message):
                    continue
                self.received[receiver] += 1
                detector = self.detectors[receiver]
                if isinstance(message, Probe):
                    detector.on_probe(message, at)
                else:
                    detector.on_notice(message, at)
            else:
                assert timer is not None
                self.now = timer[0]
                self.detectors[timer[1]].on_timer(self.now, ServerState.ACTIVE, stalled=False)

    def alive_in_view_of(self, name: str) -> set[str]:
        detector = self.detectors[name]
        return {m for m in detector.members if detector.alive(m)}


def test_every_member_learns_every_other_from_the_start_announcements() -> None:
    net = Network(6)
    net.run(0.05)
    for name in net.detectors:
        assert net.alive_in_view_of(name) == set(net.detectors) - {name}


def test_a_dead_member_is_suspected_then_counted_dead_by_all_within_a_bound() -> None:
    net = Network(8)
    net.run(1.05)
    net.down.add("m3")
    net.run(3.0)
    for name in set(net.detectors) - {"m3"}:
        assert "m3" not in net.alive_in_view_of(name), name
    suspicions = [(at, s, n) for at, s, n in net.notices if n.status == MemberStatus.SUSPECT]
    deaths = [(at, s, n) for at, s, n in net.notices if n.status == MemberStatus.DEAD]
    # Whoever probed it in that period suspected it; the three members after it in
    # the ring probed it at once and confirmed (a notice each at most: two are
    # wanted); the first suspector announced the death when the suspicion ran out.
    assert {n.member for _, _, n in suspicions + deaths} == {"m3"}
    first, *confirmations = suspicions
    assert 2 <= len(confirmations) <= 3
    assert len({s for _, s, _ in suspicions}) == len(suspicions)
    assert [s for _, s, _ in deaths] == [first[1]]
    # Probed in the next period (the ring), one period to give up, then the suspicion
    # at its shortest: as fast as without confirmations.
    assert deaths[0][0] - 1.05 < PERIOD + PERIOD + SUSPICION + 0.01
    # The helpers nacked in time: nobody took the failed probes for its own slowness.
    assert all(d.health.score == 0 for d in net.detectors.values())


def test_only_the_member_that_began_a_suspicion_announces_the_death() -> None:
    """The first suspector's death notice comes late (50 ms a hop): the members that
    confirmed the suspicion count the suspect dead when their own suspicions run out,
    and announce nothing themselves (one death notice to every member, not one per
    confirmation)."""
    net = Network(8)
    net.run(1.05)
    net.down.add("m3")
    net.delay = lambda sender, receiver, message: (
        0.05 if isinstance(message, MemberNotice) and message.status == MemberStatus.DEAD else HOP
    )
    net.run(3.0)
    suspicions = [(s, n) for _, s, n in net.notices if n.status == MemberStatus.SUSPECT]
    deaths = [(s, n) for _, s, n in net.notices if n.status == MemberStatus.DEAD]
    assert len(suspicions) >= 3  # the first and its confirmations
    assert [s for s, _ in deaths] == [suspicions[0][0]]
    for name in set(net.detectors) - {"m3"}:
        assert "m3" not in net.alive_in_view_of(name), name


def test_an_indirect_probe_keeps_a_member_behind_a_bad_path_alive() -> None:
    """m0 cannot reach m1 directly (either way); the others still can, and answer for it."""
    net = Network(5)
    net.drop = lambda sender, receiver, message: (
        {sender, receiver} == {"m0", "m1"} and (isinstance(message, Probe))
    )
    net.run(5.0)
    assert net.detectors["m0"].stats.indirect_pings == 0  # m0 asks, the others ping
    assert sum(d.stats.indirect_pings for d in net.detectors.values()) > 0
    assert not [n for _, _, n in net.notices if n.status != MemberStatus.ALIVE]
    assert net.alive_in_view_of("m0") == {"m1", "m2", "m3", "m4"}


def test_without_indirect_probes_the_bad_path_would_be_taken_for_a_death() -> None:
    """The same bad path with no member to ask: m0 suspects m1, and m1 refutes."""
    net = Network(2)
    net.drop = lambda sender, receiver, message: isinstance(message, Probe)
    net.run(2.0)
    suspicions = [n for _, _, n in net.notices if n.status == MemberStatus.SUSPECT]
    assert suspicions
    assert net.detectors["m1"].stats.refutations >= 1
    refuted = [n for _, s, n in net.notices if s == "m1" and n.status == MemberStatus.ALIVE]
    assert max(n.incarnation for n in refuted) > 1


def test_a_refuted_suspicion_leaves_the_member_alive_everywhere() -> None:
    net = Network(4)
    net.run(1.0)
    # Lose m2's ACKs to whoever probes it for half a second: suspected, then refuted.
    net.drop = lambda sender, receiver, message: (
        sender == "m2"
        and isinstance(message, Probe)
        and message.kind == ProbeKind.ACK
        and net.now < 1.5
    )
    net.run(3.0)
    assert net.detectors["m2"].stats.refutations >= 1
    for name in ("m0", "m1", "m3"):
        assert "m2" in net.alive_in_view_of(name), name
        assert net.detectors[name].members["m2"].incarnation > 1


def test_a_suspicion_nobody_confirms_leaves_the_suspect_long_enough_to_refute() -> None:
    """m0 alone cannot reach m2 (nor hear of it through others), and m2 does not hear
    that it is suspected. The members that follow m2 in the ring reach it, so nobody
    confirms m0's suspicion: it lasts SUSPICION_STRETCH times as long as a confirmed
    one before m2 is counted dead."""
    net = Network(6)
    net.run(1.0)
    net.drop = lambda sender, receiver, message: (
        (receiver == "m0" and isinstance(message, Probe) and message.target == "m2")
        or (receiver == "m2" and isinstance(message, MemberNotice))
    )
    while not (suspicions := [n for _, _, n in net.notices if n.status == MemberStatus.SUSPECT]):
        net.run(net.now + 0.01)
    suspected = net.now
    net.run(suspected + 2 * SUSPICION)  # a confirmed suspicion would have ended by now
    assert [(n.sender, n.member) for n in suspicions] == [("m0", "m2")]
    assert all("m2" in net.alive_in_view_of(n) for n in net.detectors if n != "m2")
    net.run(suspected + SUSPICION_STRETCH * SUSPICION + 0.01)
    assert all("m2" not in net.alive_in_view_of(n) for n in net.detectors if n != "m2")


def test_round_trips_longer_than_the_period_take_nobody_for_dead() -> None:
    """Every hop takes 10 to 90 ms (round trips up to 180 ms against a 100 ms period,
    as through a busy host's routers): the wait for an ACK grows with the round trips
    measured, so no live member is suspected; a dead one is still found."""
    net = Network(8)
    net.delay = lambda sender, receiver, message: net.rng.uniform(0.01, 0.09)
    net.run(6.0)
    assert not [n for _, _, n in net.notices if n.status != MemberStatus.ALIVE]
    assert all(d.ack_wait() > PERIOD / 2 for d in net.detectors.values())
    net.down.add("m3")
    net.run(9.0)
    for name in set(net.detectors) - {"m3"}:
        assert "m3" not in net.alive_in_view_of(name), name
    deaths = [at for at, _, n in net.notices if n.status == MemberStatus.DEAD]
    assert deaths and deaths[0] - 6.0 < 2.0


def test_a_slow_member_backs_off_instead_of_accusing_the_others() -> None:
    """Everything sent to m0 arrives 150 ms late (its own backlog): its probes and the
    nacks of the members it asks come too late, so its local health worsens and it
    probes less often; nobody is counted dead, m0 included."""
    net = Network(6)
    net.run(1.0)
    net.delay = lambda sender, receiver, message: 0.15 if receiver == "m0" else HOP
    net.run(6.0)
    assert not [n for _, _, n in net.notices if n.status == MemberStatus.DEAD]
    for name in net.detectors:
        assert net.alive_in_view_of(name) == set(net.detectors) - {name}, name
    slow = net.detectors["m0"]
    assert slow.health.score > 0 or slow.ack_wait() > PERIOD / 2


def test_a_suspicion_shrinks_from_its_longest_to_its_shortest_as_others_confirm() -> None:
    """memberlist's timer: max - (max - min) * log(n + 1) / log(k + 1) after the start;
    the first suspector and repeated confirmations do not count."""
    suspicion = Suspicion(10.0, "m1", 0.2, 1.2, wanted=2)
    assert suspicion.deadline == pytest.approx(11.2)
    assert not suspicion.confirm("m1")
    assert suspicion.confirm("m4") and not suspicion.confirm("m4")
    assert suspicion.deadline == pytest.approx(11.2 - 1.0 * math.log(2) / math.log(3))
    assert suspicion.confirm("m5") and not suspicion.confirm("m6")
    assert suspicion.deadline == pytest.approx(10.2)
    assert Suspicion(10.0, "m1", 0.2, 1.2, wanted=0).deadline == pytest.approx(10.2)
    assert [wanted_confirmations(n) for n in (2, 3, 4, 100)] == [0, 1, 2, 2]


def test_a_restarted_member_outranks_its_dead_record() -> None:
    net = Network(4)
    net.run(1.0)
    net.down.add("m1")
    net.run(2.0)
    assert all("m1" not in net.alive_in_view_of(n) for n in ("m0", "m2", "m3"))
    net.add("m1", incarnation=2000)  # a new process: its start time in ms
    net.run(2.5)
    for name in ("m0", "m2", "m3"):
        assert "m1" in net.alive_in_view_of(name), name
    assert net.alive_in_view_of("m1") == {"m0", "m2", "m3"}


def test_configured_members_start_knowing_each_other_and_announce_once() -> None:
    """Before any message each member holds every other alive (no start announcements
    to learn them from: one each, not two); deaths are found as when they had."""
    net = Network(8, configured=True)
    for name in net.detectors:
        assert net.alive_in_view_of(name) == set(net.detectors) - {name}, name
    net.run(1.05)
    alive = [n for _, _, n in net.notices if n.status == MemberStatus.ALIVE]
    assert sorted(n.sender for n in alive) == sorted(net.detectors)
    assert not [n for _, _, n in net.notices if n.status != MemberStatus.ALIVE]
    net.down.add("m3")
    net.run(3.0)
    for name in set(net.detectors) - {"m3"}:
        assert "m3" not in net.alive_in_view_of(name), name
    deaths = [at for at, _, n in net.notices if n.status == MemberStatus.DEAD]
    assert deaths and deaths[0] - 1.05 < PERIOD + PERIOD + SUSPICION + 0.01


def test_a_restarted_configured_member_is_told_it_is_dead_and_refutes() -> None:
    """A configured member starts at incarnation 0 again after a restart: the pool
    holds it dead at that incarnation, tells it so when it probes, and its
    refutation brings it back everywhere."""
    net = Network(4, configured=True)
    net.run(1.0)
    net.down.add("m1")
    net.run(2.0)
    assert all("m1" not in net.alive_in_view_of(n) for n in ("m0", "m2", "m3"))
    restarted = net.add("m1", incarnation=0, start=False)
    net.configure(restarted)
    restarted.start(net.now, ServerState.ACTIVE)
    net.run(2.5)
    assert restarted.stats.refutations >= 1 and restarted.incarnation > 0
    for name in ("m0", "m2", "m3"):
        assert "m1" in net.alive_in_view_of(name), name
    assert net.alive_in_view_of("m1") == {"m0", "m2", "m3"}


def test_the_two_sides_of_a_healed_partition_find_each_other() -> None:
    net = Network(6)
    left = {"m0", "m1", "m2"}
    net.run(1.0)
    net.drop = lambda sender, receiver, message: (
        ((sender in left) != (receiver in left)) and (net.now < 3.0)
    )
    net.run(3.0)
    assert net.alive_in_view_of("m0") == {"m1", "m2"}
    # Reconnect pings (one per RECONNECT_PERIODS periods) find the other side again.
    net.run(3.0 + 3 * RECONNECT_PERIODS * PERIOD)
    for name in net.detectors:
        assert net.alive_in_view_of(name) == set(net.detectors) - {name}, name


def test_when_views_agree_each_member_is_probed_by_exactly_one_other_per_period() -> None:
    net = Network(12)
    net.run(0.55)
    targets: list[list[str]] = []
    for period in range(6, 16):
        net.run(period * PERIOD + HOP / 2)  # just after the period's pings went out
        probes = [p.target for d in net.detectors.values() for p in d._probes.values()]
        targets.append(sorted(probes))
    for probes in targets:
        assert probes == sorted(net.detectors), probes


def test_after_many_deaths_at_once_the_survivors_are_each_probed_once_a_period() -> None:
    """Ten of thirty members die at once (some next to each other in the ring): each
    is counted dead by every survivor, and the ring of the survivors is whole again
    (each probed by exactly one other per period)."""
    net = Network(30)
    net.run(1.05)
    dead = {f"m{i}" for i in range(0, 30, 3)}
    net.down |= dead
    net.run(3.0)
    for name in set(net.detectors) - dead:
        assert net.alive_in_view_of(name) == set(net.detectors) - dead - {name}, name
    assert {n.member for _, _, n in net.notices if n.status == MemberStatus.DEAD} == dead
    living = set(net.detectors) - dead
    for period in range(31, 36):
        net.run(period * PERIOD + HOP / 2)
        probes = [p.target for n in living for p in net.detectors[n]._probes.values()]
        assert sorted(probes) == sorted(living), probes


@pytest.mark.parametrize("n", [8, 64])
def test_messages_per_member_do_not_grow_with_the_pool(n: int) -> None:
    """About one ping and one ACK sent, and as many received, per member per period,
    whatever n (with heartbeats a member would receive n - 1 per period)."""
    net = Network(n)
    net.run(1.0)
    sent, received = sum(net.sent.values()), sum(net.received.values())
    net.run(6.0)
    periods = 5.0 / PERIOD
    per_member_sent = (sum(net.sent.values()) - sent) / n / periods
    per_member_received = (sum(net.received.values()) - received) / n / periods
    assert 1.9 <= per_member_sent <= 2.2
    assert 1.9 <= per_member_received <= 2.2


def test_a_pool_with_the_gossip_membership_removes_a_dead_server_and_takes_back_a_new_one() -> None:
    steps = [(2.0, "kill", {"server": "s2"}), (3.0, "add", {"server": "s5"})]
    run, _ = start(
        pool_toml(scenario=steps, duration=6.0, standby=1, pool={"membership": "swim"}), seed=1
    )
    run_to(run, 6.0)
    current = assert_one_allocation(run)
    assert current.servers == ("s1", "s3", "s4", "s5")
    removed = [
        at for at, _, what in run.nodes.servers["s1"].coordinator.changes if "remove s2" in what
    ]
    assert removed and removed[0] - 2.0 < 0.8
    # No heartbeat was sent: the servers' control traffic is probes, notices and changes.
    coordinator = run.nodes.servers["s1"].coordinator
    assert coordinator.swim is not None and coordinator.swim.stats.pings > 0
    assert_all_served_since(run, 5.0)
    assert run.summary()["clients_served_at_end"] == 24


def test_the_membership_key_is_read_and_checked() -> None:
    assert loads(pool_toml()).pool.membership == "heartbeat"
    assert loads(pool_toml(pool={"membership": "swim"})).pool.membership == "swim"


@pytest.mark.parametrize(
    ("pool", "message"),
    [
        ({"membership": "gossip"}, "membership 'gossip': expected one of heartbeat, swim"),
        (
            {"membership": "swim", "coordination": "etcd", "etcd": ["http://127.0.0.1:2379"]},
            "'membership' is for coordination = \"channel\"",
        ),
    ],
)
def test_bad_membership_keys_are_refused_with_the_line(
    pool: dict[str, object], message: str
) -> None:
    with pytest.raises(TopologyError, match=r"<topology>:\d+: .*" + re.escape(message)):
        loads(pool_toml(pool=pool))
