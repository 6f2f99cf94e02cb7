"""The pool keeps the shares its servers should hold beside the allocation: a pool of
real servers (memory driver, virtual clock) put through many share changes, adds and
removes agrees on allocation and shares, and every server holds its share to within
one bucket; the same operations applied to the allocation alone (the shares read
back from the held buckets, as the pool did before) drift further. A server that
joins late adopts the shares by snapshot and then acks the next change's digest. A
pool starts from the shares its configuration asks for."""

from __future__ import annotations

import dataclasses
import random
from fractions import Fraction
from ipaddress import IPv4Address
from typing import Any

import pytest

from manycast import policy
from manycast.protocol import coordination
from manycast.protocol.coordination import (
    PoolSettings,
    apply_op,
    initial_allocation,
    initial_apportionment,
    starting_state,
)
from manycast.protocol.server import Server
from manycast.runtime import PoolRun
from manycast.space import AddressSpace, Allocation, held_weights
from manycast.wire import control
from pooltools import Trace, assert_one_allocation, live, pool_toml, run_to, start

Seen = list[tuple[str, str, control.ControlMessage]]


def record(trace: Trace) -> Seen:
    """Every control message that reaches a server: (receiver, sender, message)."""
    seen: Seen = []

    def keep(to: str, sender: str, message: control.ControlMessage, now: float) -> bool:
        seen.append((to, sender, message))
        return False  # nothing is lost

    trace.drop(keep)
    return seen


def apply_held(allocation: Allocation, op: control.PolicyOp) -> Allocation:
    """An operation as the pool applied it before it kept the shares: the policy
    functions on the allocation alone, which read the shares from the held buckets."""
    if isinstance(op, control.AddServerOp):
        return policy.add_server(allocation, op.server, op.share)
    if isinstance(op, control.RemoveServerOp):
        return policy.remove_server(allocation, op.server)
    if isinstance(op, control.SetShareOp):
        return policy.set_share(allocation, op.server, op.share)
    raise AssertionError(f"not used here: {op}")


def share_error(allocation: Allocation, weights: dict[str, int]) -> Fraction:
    """The largest |held - desired| over the servers, in buckets."""
    buckets = allocation.space.buckets
    counts = allocation.counts()
    return max(abs(counts[s] - Fraction(w * buckets, policy.SCALE)) for s, w in weights.items())


def agreed_state(run: PoolRun) -> policy.Apportionment:
    """The one state (allocation and shares) every live server holds (asserted)."""
    states = {name: s.coordinator.apportionment for name, s in live(run).items()}
    first = next(iter(states.values()))
    assert first is not None
    for name, state in states.items():
        assert state is not None, name
        assert state.allocation == first.allocation, name
        assert dict(state.weights) == dict(first.weights), name
        assert state.digest() == first.digest(), name
    return first


def committed(seen: Seen) -> list[tuple[int, str, control.PolicyOp]]:
    """The committed changes in epoch order: (epoch, digest, operation)."""
    commits = {(m.epoch, m.digest) for _, _, m in seen if isinstance(m, control.Commit)}
    proposed = {(m.epoch, m.digest): m.op for _, _, m in seen if isinstance(m, control.Proposal)}
    chain = sorted(commits)
    assert [epoch for epoch, _ in chain] == list(range(2, 2 + len(chain))), "one commit an epoch"
    return [(epoch, digest, proposed[(epoch, digest)]) for epoch, digest in chain]


def operate(run: PoolRun, rng: random.Random, at: float) -> None:
    """At `at`, an operator asks a random live server for a random change: mostly a
    share change (some tiny, some large), sometimes the removal of a live server
    (which the coordinator adds back, with an equal share, at its next heartbeat)."""

    def act() -> None:
        servers = live(run)
        allocation = servers["s1"].coordinator.allocation
        assert allocation is not None
        via: Server = servers[rng.choice(sorted(servers))]
        target = rng.choice([s for s in allocation.servers if s != "s1"])
        op: control.PolicyOp
        if rng.random() < 0.15:
            op = control.RemoveServerOp(target)
        elif rng.random() < 0.3:
            op = control.SetShareOp(target, Fraction(rng.randrange(1, 500), 100_000))
        else:
            op = control.SetShareOp(target, Fraction(rng.randrange(1, 60_000), 100_000))
        via.command(op, at)

    run.network.call_at(at, act)


OPERATIONS = 64
SPACING = 0.25
FIRST = 1.5
MEMBERSHIP = [
    (4.0, "add", {"server": "s5"}),
    (7.1, "kill", {"server": "s3"}),
    (10.1, "add", {"server": "s6"}),
    (13.1, "kill", {"server": "s5"}),
]


def test_many_changes_keep_every_share_within_one_bucket_on_every_server() -> None:
    end = FIRST + OPERATIONS * SPACING + 2.0
    text = pool_toml(
        servers=4, standby=2, clients=8, scenario=MEMBERSHIP, duration=end, pool={"index_bits": 12}
    )
    run, trace = start(text, seed=3)
    seen = record(trace)
    rng = random.Random(11)
    for index in range(OPERATIONS):
        operate(run, rng, FIRST + index * SPACING)
    run_to(run, end)

    final = agreed_state(run)
    current = assert_one_allocation(run)  # the routers forward by it, too
    assert current == final.allocation
    assert final.error() < 1  # every server within one bucket of its share
    assert final.weights != held_weights(final.allocation)  # the shares are not the holdings

    changes = committed(seen)
    kinds = [type(op).__name__ for _, _, op in changes]
    assert kinds.count("SetShareOp") >= 30, kinds
    assert kinds.count("AddServerOp") >= 4 and kinds.count("RemoveServerOp") >= 4, kinds

    # Every committed digest is what the operation gives from the configured start, and
    # the shares stay within one bucket after each change; the same operations on the
    # allocation alone lose the shares, by more than a bucket by the end.
    settings = run.nodes.servers["s1"].settings
    state = initial_apportionment(settings)
    held = state.allocation
    worst_held = Fraction(0)
    for _epoch, digest, op in changes:
        state = apply_op(state, op)
        assert state.digest() == digest
        assert state.error() < 1
        held = apply_held(held, op)
        worst_held = max(worst_held, share_error(held, dict(state.weights)))
    assert state.digest() == final.digest()
    assert held.servers == final.allocation.servers
    assert share_error(final.allocation, dict(final.weights)) < 1
    assert share_error(held, dict(final.weights)) > 1, float(share_error(held, final.weights))
    assert worst_held > 1


def test_a_late_server_adopts_the_shares_by_snapshot_and_agrees_on_the_next_change() -> None:
    steps = [
        (1.5, "set_share", {"server": "s2", "share": 0.999}),
        (2.0, "set_share", {"server": "s2", "share": 0.001}),
        (3.0, "add", {"server": "s4"}),
        (5.0, "set_share", {"server": "s3", "share": 0.3}),
    ]
    text = pool_toml(
        servers=3, standby=1, clients=8, scenario=steps, duration=6.0, pool={"index_bits": 12}
    )
    run, trace = start(text, seed=1)
    seen = record(trace)
    run_to(run, 4.5)
    before = agreed_state(run)
    late = run.nodes.servers["s4"]
    assert late.coordinator.apportionment is not None
    assert "s4" in before.allocation.servers
    # The kept shares are not what the servers hold (s1 and s3 regained their shares
    # from s2 in their exact proportions), so only a snapshot with the shares gives
    # the late server the pool's digest.
    assert before.weights != held_weights(before.allocation)
    assert policy.Apportionment.held(before.allocation).digest() != before.digest()
    adopted = [why for _, _, why in late.coordinator.changes if why.startswith("snapshot")]
    assert adopted, late.coordinator.changes
    assert late.coordinator.stats.snapshots_adopted >= 1

    run_to(run, 6.0)
    after = agreed_state(run)
    assert after.error() < 1
    last_epoch, last_digest, last_op = committed(seen)[-1]
    assert last_op == control.SetShareOp("s3", Fraction(3, 10))
    assert after.digest() == last_digest
    # s4 computed the same result from the adopted state: it acked the proposal's digest
    # and installed the change at the commit, not by another snapshot.
    acks = [
        m for to, sender, m in seen if sender == "s4" and to == "s1" and isinstance(m, control.Ack)
    ]
    assert any(m.epoch == last_epoch and m.digest == last_digest for m in acks)
    assert late.coordinator.changes[-1][1:] == (last_epoch, "commit from s1")


def _settings(**changes: Any) -> PoolSettings:
    base = PoolSettings(
        IPv4Address("232.1.1.1"),
        7000,
        IPv4Address("239.1.1.1"),
        7946,
        AddressSpace.create("10.0.0.0/8", 10),
        ("a", "b", "c"),
    )
    return dataclasses.replace(base, **changes)


def test_the_pool_starts_from_the_configured_shares() -> None:
    third = Fraction(1, 3)
    equal = initial_apportionment(_settings())
    assert all(abs(v - third) < Fraction(1, policy.SCALE) for v in equal.desired().values())
    assert equal.weights != held_weights(equal.allocation)  # 1024 buckets do not split in 3
    weights = {"a": 1.0, "b": 2.0, "c": 5.0}
    weighted = initial_apportionment(_settings(policy="weighted", weights=weights))
    assert weighted.desired() == {"a": Fraction(1, 8), "b": Fraction(1, 4), "c": Fraction(5, 8)}
    # A striped cut asks no share of each server: the shares are what it gives them.
    settings = _settings(policy="striped", portions=30)
    striped = initial_apportionment(settings)
    assert striped.allocation == initial_allocation(settings)
    assert dict(striped.weights) == held_weights(striped.allocation)
    # What a server starts from: the configured shares for the configured allocation,
    # an Apportionment as given, and what is held for an allocation from elsewhere.
    start = starting_state(_settings(), initial_allocation(_settings()))
    assert start is not None and start.digest() == equal.digest()
    assert starting_state(_settings(), weighted) is weighted
    assert starting_state(_settings(), None) is None
    elsewhere = starting_state(_settings(), weighted.allocation)
    assert elsewhere is not None
    assert dict(elsewhere.weights) == held_weights(weighted.allocation)


def test_a_coordinators_history_of_changes_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool that runs for months commits changes without end; each coordinator keeps
    only the latest `CHANGES_KEPT` of them (here 8 of 20 share changes and more)."""
    monkeypatch.setattr(coordination, "CHANGES_KEPT", 8)
    steps = [
        (1.0 + 0.25 * k, "set_share", {"server": "s2", "share": 0.2 + 0.02 * k}) for k in range(20)
    ]
    text = pool_toml(servers=3, clients=4, scenario=steps, duration=7.0, pool={"index_bits": 8})
    run, _trace = start(text, seed=5)
    run_to(run, 7.0)
    for name, server in run.nodes.servers.items():
        kept = server.coordinator.changes
        assert len(kept) == 8, (name, list(kept))
        # the newest are kept, in order, ending at the epoch the server is in
        assert [epoch for _, epoch, _ in kept] == sorted(epoch for _, epoch, _ in kept)
        assert kept[-1][1] == server.coordinator.epoch >= 20
