"""Shares kept beside the allocation (`Apportionment`): after any sequence of changes
every server holds its share to within one bucket, and each change moves only the
surplus buckets; `bucket_targets` against every admissible count vector."""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from manycast.policy import (
    SCALE,
    Apportionment,
    PolicyError,
    bucket_targets,
    rebalance,
    set_share,
    weighted_split,
)
from manycast.space import AddressSpace, Allocation, moved_share

SPACES = [
    AddressSpace.create("0.0.0.0/0", 8),
    AddressSpace.create("10.0.0.0/8", 6, "high"),
    AddressSpace.create("2001:db8::/32", 7),
    AddressSpace.create("2001:db8::/56", 8, "high"),
]
share_st = st.fractions(0, 1, max_denominator=20)


def moved_buckets(old: Allocation, new: Allocation) -> int:
    return int(moved_share(old, new) * old.space.buckets)


# Apportionment: shares kept beside the allocation --------------------------------------

capacity_st = st.floats(0.05, 20.0, allow_nan=False, allow_infinity=False)
kept_op_st = st.one_of(
    st.tuples(st.just("set_share"), st.integers(0, 40), share_st),
    st.tuples(st.just("add"), st.one_of(st.none(), st.fractions(0, 1, max_denominator=10))),
    st.tuples(st.just("remove"), st.integers(0, 40)),
    st.tuples(st.just("balance"), st.lists(capacity_st, min_size=40, max_size=40)),
    st.tuples(st.just("weights"), st.lists(st.integers(0, 9), min_size=40, max_size=40)),
)


def surplus(old: Allocation, new: Allocation) -> int:
    """The least any change from `old` to `new`'s counts must move."""
    before, after = old.counts(), new.counts()
    return sum(max(0, n - after.get(s, 0)) for s, n in before.items())


def apply_kept(state: Apportionment, op: tuple) -> Apportionment:  # type: ignore[type-arg]
    """One operation on an Apportionment; checks the shares it sets."""
    servers = state.allocation.servers
    kind = op[0]
    if kind == "set_share":
        server = servers[op[1] % len(servers)]
        if len(servers) == 1:
            return state
        new = state.set_share(server, op[2])
        assert abs(new.desired()[server] - op[2]) < Fraction(1, SCALE)
        assert new.allocation.count(server) == round(op[2] * state.allocation.space.buckets)
        return new
    if kind == "add":
        if op[1] == 1:
            return state
        server = f"n{len(servers):03d}"
        if server in servers:
            return state
        return state.add_server(server, op[1])
    if kind == "remove":
        if len(servers) == 1:
            return state
        server = servers[op[1] % len(servers)]
        new = state.remove_server(server)
        # The survivors keep their proportions (to the 1/SCALE the shares are kept in).
        old, kept = state.desired(), new.desired()
        whole = 1 - old[server]
        if whole:
            assert all(abs(kept[s] - old[s] / whole) <= Fraction(len(servers), SCALE) for s in kept)
        return new
    if kind == "balance":
        # Loads as servers with these capacities measure them under even traffic.
        capacity = dict(zip(servers, op[1], strict=False))
        total = sum(capacity.values())
        counts = state.allocation.counts()
        loads = {s: counts[s] / (capacity[s] / total) for s in servers}
        new = state.balance_loads(loads, target=1.0)
        if all(counts[s] for s in servers):
            # One call reaches the capacities' shares; a second moves nothing.
            want = {s: Fraction(c / total) for s, c in capacity.items()}
            assert all(abs(new.desired()[s] - want[s]) < Fraction(1, 10**9) for s in servers)
            after = new.allocation.counts()
            again = {s: after[s] / (capacity[s] / total) for s in servers}
            assert new.balance_loads(again, target=1.0).allocation == new.allocation
        return new
    weights = dict(zip(servers, op[1], strict=False))
    if not any(weights.values()):
        return state
    return state.set_weights(weights)


@settings(max_examples=120, deadline=None)
@given(
    st.sampled_from(SPACES),
    st.lists(st.integers(0, 9), min_size=1, max_size=8),
    st.lists(kept_op_st, max_size=25),
)
def test_kept_shares_stay_within_one_bucket_and_moves_are_minimal(
    space: AddressSpace,
    start_weights: list[int],
    ops: list[tuple],  # type: ignore[type-arg]
) -> None:
    weights = {f"s{i:02d}": w for i, w in enumerate(start_weights)}
    if not any(weights.values()):
        weights["s00"] = 1
    state = Apportionment.split(space, weights)
    assert state.error() < 1
    for op in ops:
        new = apply_kept(state, op)
        assert new.error() < 1, op  # every server within one bucket of its share
        assert sum(new.desired().values()) == 1
        # Only surplus buckets move: the least any change to these counts can move.
        assert moved_buckets(state.allocation, new.allocation) == surplus(
            state.allocation, new.allocation
        )
        state = new


def test_kept_shares_do_not_drift_where_held_shares_do() -> None:
    """The others' proportions are known only to a bucket once they hold little;
    read back from the held buckets, the error grows with the share they regain."""
    space = AddressSpace.create()
    kept = Apportionment.split(space, {"a": 2, "b": 1, "c": 3})
    kept = kept.set_share("a", Fraction(999, 1000)).set_share("a", Fraction(1, 1000))
    assert kept.error() < 1
    exact = Fraction(999, 4000) * space.buckets  # b's share of the space, in buckets
    assert abs(kept.allocation.count("b") - exact) < 1
    held = weighted_split(space, {"a": 2, "b": 1, "c": 3})
    held = set_share(set_share(held, "a", Fraction(999, 1000)), "a", Fraction(1, 1000))
    assert abs(held.count("b") - exact) > 100  # 17 of 66 buckets read as b's proportion


def test_kept_shares_are_deterministic() -> None:
    space = AddressSpace.create(bits=10)
    runs = []
    for _ in range(2):
        state = Apportionment.split(space, dict.fromkeys("abcde", 1))
        state = state.set_share("c", Fraction(1, 3)).add_server("f").remove_server("a")
        state = state.balance_loads({"b": 1.0, "c": 3.0, "d": 0.5, "e": 1.0, "f": 2.0}, 1.0)
        runs.append((state.allocation.digest(), dict(state.weights)))
    assert runs[0] == runs[1]


def test_kept_shares_bad_requests() -> None:
    space = AddressSpace.create(bits=8)
    state = Apportionment.split(space, dict.fromkeys("abc", 1))
    with pytest.raises(PolicyError, match="'z' is not in the pool"):
        state.remove_server("z")
    with pytest.raises(PolicyError, match="each server of the pool"):
        state.set_weights({"a": 1})
    with pytest.raises(PolicyError, match="add up to the space"):
        Apportionment(state.allocation, {"a": 1, "b": 1, "c": 1})
    with pytest.raises(PolicyError, match="exactly the allocation's servers"):
        Apportionment(state.allocation, {"a": SCALE})


@settings(max_examples=200)
@given(
    st.lists(st.integers(0, 6), min_size=1, max_size=4),
    st.lists(st.integers(0, 8), min_size=4, max_size=4),
)
def test_bucket_targets_are_the_closest_counts_within_one_bucket(
    weights: list[int], held: list[int]
) -> None:
    """Against every count vector within one bucket of the quotas (brute force)."""
    if not any(weights):
        weights = [1, *weights[1:]]
    buckets = 8
    names = [f"s{i}" for i in range(len(weights))]
    w = dict(zip(names, weights, strict=True))
    current = dict(zip(names, held, strict=False))
    targets = bucket_targets(buckets, w, current)
    whole = sum(weights)
    quota = {s: Fraction(buckets * w[s], whole) for s in names}
    assert sum(targets.values()) == buckets
    assert all(abs(targets[s] - quota[s]) < 1 for s in names)

    def cost(t: dict[str, int]) -> int:
        return sum(abs(t[s] - current.get(s, 0)) for s in names)

    options = [[int(q), -(-q.numerator // q.denominator)] for q in quota.values()]
    admissible = [
        dict(zip(names, choice, strict=True))
        for choice in itertools.product(*options)
        if sum(choice) == buckets
    ]
    assert cost(targets) == min(cost(t) for t in admissible)


def test_kept_shares_rebalance_and_digest() -> None:
    """A rebalance by per-bucket loads moves chosen buckets, so the shares become what
    it leaves; when nothing moves the kept shares stay. The digest covers the shares."""
    space = AddressSpace.create(bits=8)
    state = Apportionment.split(space, dict.fromkeys("abc", 1)).set_share("a", Fraction(1, 7))
    assert state.weights != Apportionment.held(state.allocation).weights
    assert state.digest() != Apportionment.held(state.allocation).digest()
    assert state.digest() == Apportionment(state.allocation, dict(state.weights)).digest()
    even = np.ones(space.buckets)
    assert state.rebalance(even, target=2.0) is state  # within the target: nothing moves
    hot = np.ones(space.buckets)
    hot[state.allocation.buckets("b")] = 5.0
    moved = state.rebalance(hot, target=1.1)
    assert moved.allocation != state.allocation
    assert moved.allocation == rebalance(state.allocation, hot, 1.1).allocation
    assert moved.weights == Apportionment.held(moved.allocation).weights
