"""Allocation policies: exact shares, minimal movement, Fig 10 and Fig 11 of the seed."""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from manycast.policy import (
    PolicyError,
    add_server,
    apportion,
    equal_split,
    imbalance,
    reassign,
    rebalance,
    remove_server,
    set_share,
    striped,
    weighted_split,
)
from manycast.space import AddressSpace, Allocation, Portion, SpaceError, diff, moved_share

SPACES = [
    AddressSpace.create("0.0.0.0/0", 8),
    AddressSpace.create("10.0.0.0/8", 6, "high"),
    AddressSpace.create("2001:db8::/32", 7),
    AddressSpace.create("2001:db8::/56", 8, "high"),
]
NAMES = [f"s{i}" for i in range(12)]


def check_invariants(alloc: Allocation, rng: np.random.Generator) -> None:
    """Disjoint and covering, seen the way routers see it: through the portions."""
    space = alloc.space
    shares = alloc.shares()
    assert all(type(f) is Fraction for f in shares.values())
    assert sum(shares.values()) == 1
    portions = {s: alloc.portions(s) for s in alloc.servers}
    assert Allocation.from_portions(space, portions) == alloc
    width = space.prefix.width
    for _ in range(24):
        addr = int.from_bytes(rng.bytes(width // 8), "big")
        addr = (addr & ~space.prefix.mask) | space.prefix.value
        holders = [s for s, p in portions.items() if p.contains(addr)]
        assert holders == [alloc.owner(addr)]


def moved_buckets(old: Allocation, new: Allocation) -> int:
    return int(moved_share(old, new) * old.space.buckets)


# Hypothesis: random sequences of policy operations ---------------------------

start_st = st.one_of(
    st.tuples(st.just("equal"), st.integers(1, 6)),
    st.tuples(st.just("weighted"), st.lists(st.integers(0, 9), min_size=1, max_size=6)),
    st.tuples(st.just("striped"), st.integers(1, 5), st.integers(0, 40)),
)
share_st = st.fractions(0, 1, max_denominator=20)
op_st = st.one_of(
    st.tuples(st.just("set_share"), st.integers(0, 11), share_st),
    st.tuples(st.just("add"), st.one_of(st.none(), st.fractions(0, 1, max_denominator=10))),
    st.tuples(st.just("remove"), st.integers(0, 11)),
    st.tuples(st.just("rebalance"), st.integers(0, 2**32 - 1), st.floats(1.0, 2.0)),
    st.tuples(st.just("reassign"), st.integers(0, 2**32 - 1)),
)


def start(space: AddressSpace, spec: tuple) -> Allocation:  # type: ignore[type-arg]
    kind = spec[0]
    if kind == "equal":
        return equal_split(space, NAMES[: spec[1]])
    if kind == "weighted":
        weights = dict(zip(NAMES, spec[1], strict=False))
        if not any(weights.values()):
            with pytest.raises(PolicyError, match="at least one weight must be positive"):
                weighted_split(space, weights)
            weights[NAMES[0]] = 1
        return weighted_split(space, weights)
    n, extra = spec[1], spec[2]
    return striped(space, NAMES[:n], min(n + extra, space.buckets))


def apply(alloc: Allocation, op: tuple, rng: np.random.Generator) -> Allocation:  # type: ignore[type-arg]
    """Apply one operation and check that it moved exactly what it had to."""
    buckets = alloc.space.buckets
    kind = op[0]
    if kind == "set_share":
        server = alloc.servers[op[1] % len(alloc.servers)]
        if len(alloc.servers) == 1 and round(op[2] * buckets) != buckets:
            with pytest.raises(PolicyError, match="is the only server"):
                set_share(alloc, server, op[2])
            return alloc
        new = set_share(alloc, server, op[2])
        assert new.count(server) == round(op[2] * buckets)
        assert moved_share(alloc, new) == abs(new.share(server) - alloc.share(server))
        assert all(m.source == server or m.target == server for m in diff(alloc, new))
        return new
    if kind == "add":
        server = f"n{len(alloc.servers)}-{rng.integers(1 << 30)}"
        if op[1] == 1:
            with pytest.raises(PolicyError, match=r"must be in \[0, 1\)"):
                add_server(alloc, server, op[1])
            return alloc
        new = add_server(alloc, server, op[1])
        wanted = Fraction(1, len(alloc.servers) + 1) if op[1] is None else op[1]
        assert new.count(server) == round(wanted * buckets)
        assert moved_share(alloc, new) == new.share(server)
        assert {m.target for m in diff(alloc, new)} <= {server}
        return new
    if kind == "remove":
        server = alloc.servers[op[1] % len(alloc.servers)]
        if len(alloc.servers) == 1:
            with pytest.raises(PolicyError, match="it is the last server"):
                remove_server(alloc, server)
            return alloc
        new = remove_server(alloc, server)
        assert server not in new.servers
        assert moved_share(alloc, new) == alloc.share(server)
        assert {m.source for m in diff(alloc, new)} <= {server}
        return new
    if kind == "rebalance":
        load = np.random.default_rng(op[1]).integers(0, 50, buckets).astype(float)
        result = rebalance(alloc, load, op[2])
        assert result.moved_buckets == moved_buckets(alloc, result.allocation)
        assert result.reached == (imbalance(result.allocation, load) <= op[2] + 1e-9)
        assert result.imbalance_after <= result.imbalance_before + 1e-9
        return result.allocation
    # reassign: random targets; the moved share is the sum of the surpluses.
    local = np.random.default_rng(op[1])
    cut = np.sort(local.integers(0, buckets + 1, len(alloc.servers) - 1))
    counts = np.diff(np.concatenate(([0], cut, [buckets])))
    targets = {s: int(n) for s, n in zip(alloc.servers, local.permutation(counts), strict=True)}
    new = reassign(alloc, targets)
    assert new.counts() == targets
    surplus = sum(max(0, alloc.count(s) - targets[s]) for s in alloc.servers)
    assert moved_buckets(alloc, new) == surplus
    return new


@settings(max_examples=150)
@given(
    st.sampled_from(SPACES),
    start_st,
    st.lists(op_st, max_size=8),
    st.integers(0, 2**32 - 1),
)
def test_random_operation_sequences(
    space: AddressSpace,
    spec: tuple,  # type: ignore[type-arg]
    ops: list[tuple],  # type: ignore[type-arg]
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    alloc = start(space, spec)
    check_invariants(alloc, rng)
    for op in ops:
        alloc = apply(alloc, op, rng)
        check_invariants(alloc, rng)


# Deterministic policies ----------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda sp: equal_split(sp, ["c", "a", "b"]),
        lambda sp: weighted_split(sp, {"a": 1, "b": Fraction(5, 2), "c": 0.5}),
        lambda sp: striped(sp, ["a", "b", "c"], 30),
        lambda sp: set_share(equal_split(sp, "abcd"), "b", Fraction(1, 5)),
        lambda sp: add_server(equal_split(sp, "abc"), "d"),
        lambda sp: remove_server(equal_split(sp, "abcd"), "c"),
        lambda sp: rebalance(equal_split(sp, "abcd"), np.arange(sp.buckets) % 7).allocation,
    ],
)
def test_policies_are_deterministic(make: Callable[[AddressSpace], Allocation]) -> None:
    one = make(AddressSpace.create())
    two = make(AddressSpace.create())
    assert one == two
    assert one.digest() == two.digest()
    assert {s: str(one.portions(s)) for s in one.servers} == {
        s: str(two.portions(s)) for s in two.servers
    }


def test_apportion_is_exact_largest_remainder() -> None:
    assert apportion(10, {"a": 1, "b": 1, "c": 1}) == {"a": 4, "b": 3, "c": 3}
    assert apportion(7, {"a": Fraction(1, 2), "b": 0.25, "c": 0.25}) == {"a": 3, "b": 2, "c": 2}
    assert apportion(5, {"a": 0, "b": 3}) == {"a": 0, "b": 5}


def test_equal_split_shares_differ_by_at_most_one_bucket() -> None:
    space = AddressSpace.create()
    alloc = equal_split(space, [f"s{i:04d}" for i in range(1000)])
    counts = alloc.counts().values()
    assert max(counts) - min(counts) == 1
    assert max(counts) / (space.buckets / 1000) <= 1.01


def test_equal_split_of_four_is_the_low_two_bits() -> None:
    alloc = equal_split(AddressSpace.create(), "abcd")
    pairs = {str(alloc.portions(s)) for s in alloc.servers}
    assert pairs == {f"0.0.0.{v}/0.0.0.3" for v in range(4)}


def test_weighted_split_keeps_zero_weight_servers() -> None:
    alloc = weighted_split(AddressSpace.create(bits=4), {"a": 3, "b": 1, "idle": 0})
    assert alloc.counts() == {"a": 12, "b": 4, "idle": 0}
    assert str(alloc.portions("idle")) == "(none)"


# Fig 10: thirty portions, every third to each of three servers ---------------


def test_fig10_thirty_portions_three_servers() -> None:
    space = AddressSpace.create()
    alloc = striped(space, ["s1", "s2", "s3"], 30)
    for share in alloc.shares().values():
        assert abs(share - Fraction(1, 3)) <= Fraction(1, space.buckets)
    # Portions dealt in turn: every region of the space is shared by all three.
    for start in range(0, space.buckets, space.buckets // 8):
        window = alloc.owners[start : start + space.buckets // 8]
        assert len(set(window.tolist())) == 3
    portions = {s: alloc.portions(s) for s in alloc.servers}
    assert Allocation.from_portions(space, portions) == alloc


def test_fig10_thirty_portions_in_contiguous_space() -> None:
    space = AddressSpace.create("10.0.0.0/8", 16, "high")
    alloc = striped(space, ["s1", "s2", "s3"], 30)
    runs = list(alloc.runs())
    assert len(runs) == 30
    assert [server for _, _, server in runs] == ["s1", "s2", "s3"] * 10
    for share in alloc.shares().values():
        assert abs(share - Fraction(1, 3)) <= Fraction(1, space.buckets)


def test_fig10_power_of_two_portions_give_one_pair_each() -> None:
    space = AddressSpace.create()
    alloc = striped(space, ["s1", "s2", "s3", "s4"], 32)
    for k, server in enumerate(alloc.servers):
        assert alloc.share(server) == Fraction(1, 4)
        portions = alloc.portions(server)
        assert not portions.exclude
        assert portions.include == (Portion(4, k, 3),)
        assert str(portions) == f"0.0.0.{k}/0.0.0.3"
        assert alloc.owner(f"198.51.100.{4 * 7 + k}") == server


def test_striped_refuses_too_few_portions() -> None:
    with pytest.raises(PolicyError, match="portions must be between 3 and 65536"):
        striped(AddressSpace.create(), "abc", 2)


# Fig 11: one server from 25% to 20%; only that 5% moves ---------------------


def test_fig11_one_server_from_25_to_20_percent() -> None:
    space = AddressSpace.create()
    old = equal_split(space, ["s1", "s2", "s3", "s4"])
    assert all(share == Fraction(1, 4) for share in old.shares().values())
    new = set_share(old, "s1", Fraction(1, 5))
    assert abs(new.share("s1") - Fraction(1, 5)) <= Fraction(1, space.buckets)
    moved = moved_share(old, new)
    assert abs(moved - Fraction(1, 20)) <= Fraction(1, space.buckets)
    assert moved == old.share("s1") - new.share("s1")
    # Nothing else moves: every changed bucket left s1, and s1 gained none.
    changed = old.owners != new.owners
    s1_old, s1_new = old.index_of("s1"), new.index_of("s1")
    assert (old.owners[changed] == s1_old).all()
    assert (new.owners[changed] != s1_new).all()
    # The others absorb the 5% evenly and keep all they had.
    for server in ("s2", "s3", "s4"):
        gained = new.share(server) - old.share(server)
        assert abs(gained - Fraction(1, 60)) <= Fraction(1, space.buckets)
        assert not (old.buckets(server) & ~new.buckets(server)).any()
    # diff() names exactly those buckets, from s1 to each of the others.
    moves = diff(old, new)
    assert [(m.source, m.target) for m in moves] == [("s1", "s2"), ("s1", "s3"), ("s1", "s4")]
    assert sum(m.share for m in moves) == moved
    covered = np.zeros(space.buckets, dtype=bool)
    for move in moves:
        chosen = np.zeros(space.buckets, dtype=bool)
        for p in move.portions.include:
            chosen |= space.buckets_of(p)
        for p in move.portions.exclude:
            chosen &= ~space.buckets_of(p)
        expected = changed & (new.owners == new.index_of(move.target))
        assert np.array_equal(chosen, expected)
        assert int(chosen.sum()) == move.buckets
        covered |= chosen
    assert np.array_equal(covered, changed)


def test_fig11_back_and_forth_moves_only_the_difference() -> None:
    space = AddressSpace.create()
    base = equal_split(space, [f"s{i}" for i in range(10)])
    at_25 = set_share(base, "s3", Fraction(1, 4))
    at_20 = set_share(at_25, "s3", Fraction(1, 5))
    assert moved_share(at_25, at_20) == at_25.share("s3") - at_20.share("s3")
    assert abs(moved_share(at_25, at_20) - Fraction(1, 20)) <= Fraction(1, space.buckets)


def test_remove_and_add_move_exactly_one_share() -> None:
    space = AddressSpace.create()
    pool = equal_split(space, [f"s{i:03d}" for i in range(100)])
    smaller = remove_server(pool, "s042")
    assert moved_share(pool, smaller) == pool.share("s042")
    # Survivors absorb it in proportion to their holdings: from 655/656 buckets
    # each, that ends within two buckets of each other, not one.
    counts = smaller.counts().values()
    assert max(counts) - min(counts) <= 2
    bigger = add_server(pool, "s100")
    assert moved_share(pool, bigger) == bigger.share("s100")
    assert abs(bigger.share("s100") - Fraction(1, 101)) <= Fraction(1, space.buckets)


# rebalance -----------------------------------------------------------------


def lower_bound(alloc: Allocation, load: np.ndarray, target: float) -> int:
    """For each overloaded server, the fewest of its largest buckets that carry its
    excess: no rebalance can move fewer buckets."""
    totals = np.bincount(alloc.owners, weights=load, minlength=len(alloc.servers))
    limit = target * totals.sum() / len(alloc.servers)
    needed = 0
    for server, total in enumerate(totals):
        if total <= limit:
            continue
        remaining = total
        for weight in np.sort(load[alloc.owners == server])[::-1]:
            remaining -= weight
            needed += 1
            if remaining <= limit:
                break
    return needed


@settings(max_examples=80)
@given(
    st.integers(2, 12),
    st.integers(0, 2**32 - 1),
    st.floats(1.0, 1.5),
    st.sampled_from(["equal", "skewed"]),
)
def test_rebalance_is_minimal_when_buckets_are_small(
    n: int, seed: int, target: float, start_kind: str
) -> None:
    space = AddressSpace.create(bits=9)
    rng = np.random.default_rng(seed)
    servers = NAMES[:n]
    if start_kind == "equal":
        alloc = equal_split(space, servers)
    else:
        alloc = weighted_split(space, {s: int(rng.integers(1, 10)) for s in servers})
    # Integer loads keep every sum exact. When no bucket exceeds (target - 1) x the
    # mean server load, the least loaded server (at most the mean) can always take
    # the next largest bucket, so the target is reachable moving only those.
    load = rng.integers(1, 10, space.buckets).astype(float)
    target = max(target, 1 + float(load.max()) * n / float(load.sum()) + 1e-9)
    result = rebalance(alloc, load, target)
    bound = lower_bound(alloc, load, target)
    assert result.reached
    assert result.imbalance_after <= target + 1e-9
    assert result.moved_buckets == bound
    assert moved_buckets(alloc, result.allocation) == bound
    if bound == 0:
        assert result.allocation == alloc
    elif start_kind == "skewed":
        # Only buckets of servers that were over the limit move.
        totals = np.bincount(alloc.owners, weights=load, minlength=n)
        over = totals > target * totals.mean()
        assert over[alloc.owners[alloc.owners != result.allocation.owners]].all()


def test_rebalance_hot_spot() -> None:
    space = AddressSpace.create(bits=8)
    alloc = equal_split(space, "abcd")
    load = np.ones(space.buckets)
    load[alloc.buckets("a")] = 3.0  # a carries half of all load
    result = rebalance(alloc, load, target=1.1)
    assert result.imbalance_before == pytest.approx(2.0)
    assert result.reached and result.imbalance_after <= 1.1
    assert result.moved_buckets == lower_bound(alloc, load, 1.1)
    # Only a's buckets move.
    changed = alloc.owners != result.allocation.owners
    assert (alloc.owners[changed] == alloc.index_of("a")).all()


def test_rebalance_hands_over_evenly_loaded_buckets_in_stretches() -> None:
    """A rebalance by hot buckets spreads a server's other load evenly over its other
    buckets; handed out one by one to the least loaded, they alternated between the
    receivers and cut the space into a run per bucket (the soak, seed 20261201: the
    infrastructure process's servers held 10-27 thousand portions). Each receiver now
    takes its count of them as one stretch, and as many buckets move."""
    space = AddressSpace.create(bits=12)
    alloc = equal_split(space, "abcd")
    load = np.ones(space.buckets)
    mine = alloc.buckets("a")
    load[mine] = 3.0
    hot = np.flatnonzero(mine)[::97]  # a few busy clients' buckets, scattered
    load[hot] = 40.0
    result = rebalance(alloc, load, target=1.1)
    assert result.reached and result.moved_buckets == lower_bound(alloc, load, 1.1)
    runs = sum(1 for _ in result.allocation.runs())
    # Four runs to start; each hot bucket moved cuts at most two more, and each
    # receiver's stretch of the even ones at most two.
    assert runs <= 4 + 2 * len(hot) + 2 * 3
    moved = np.flatnonzero((alloc.owners != result.allocation.owners) & (load == 3.0))
    receivers = result.allocation.owners[moved]
    assert len(moved) > 100 and len(set(receivers.tolist())) == 3
    assert (np.diff(receivers) >= 0).all()  # one stretch each, in bucket order


def test_rebalance_reports_unreachable_target() -> None:
    space = AddressSpace.create(bits=6)
    alloc = equal_split(space, "abcd")
    load = np.ones(space.buckets)
    load[5] = 1000.0  # one bucket alone exceeds 1.1 x the mean server load
    result = rebalance(alloc, load, target=1.1)
    assert not result.reached
    assert result.imbalance_after > 1.1
    assert result.imbalance_after == pytest.approx(imbalance(result.allocation, load))
    assert result.imbalance_after <= result.imbalance_before


def test_rebalance_balanced_load_moves_nothing() -> None:
    alloc = equal_split(AddressSpace.create(bits=8), "abcd")
    result = rebalance(alloc, np.ones(256))
    assert result.moved_buckets == 0 and result.reached and result.allocation == alloc


@pytest.mark.parametrize(
    ("load", "target", "message"),
    [
        (np.ones(3), 1.1, "bucket_load must have 16 entries"),
        (-np.ones(16), 1.1, "finite and non-negative"),
        (np.full(16, np.nan), 1.1, "finite and non-negative"),
        (np.ones(16), 0.9, "at least 1.0"),
    ],
)
def test_rebalance_bad_input(load: np.ndarray, target: float, message: str) -> None:
    alloc = equal_split(AddressSpace.create(bits=4), "ab")
    with pytest.raises(PolicyError, match=message):
        rebalance(alloc, load, target)


# Bad requests --------------------------------------------------------------


def test_bad_policy_requests() -> None:
    space = AddressSpace.create(bits=8)
    alloc = equal_split(space, "abc")
    with pytest.raises(SpaceError, match="'z' is not a server"):
        set_share(alloc, "z", Fraction(1, 4))
    with pytest.raises(PolicyError, match="share must be between 0 and 1, not -1/4"):
        set_share(alloc, "a", Fraction(-1, 4))
    with pytest.raises(PolicyError, match="share must be between 0 and 1"):
        set_share(alloc, "a", 1.5)
    with pytest.raises(PolicyError, match="'z' is not in the pool"):
        remove_server(alloc, "z")
    with pytest.raises(PolicyError, match="cannot remove a: it is the last server"):
        remove_server(equal_split(space, "a"), "a")
    with pytest.raises(PolicyError, match="'a' is already in the pool"):
        add_server(alloc, "a")
    with pytest.raises(PolicyError, match="server ids must be non-empty"):
        add_server(alloc, "")
    with pytest.raises(PolicyError, match=r"share must be in \[0, 1\)"):
        add_server(alloc, "d", 1)
    with pytest.raises(PolicyError, match=r"share must be in \[0, 1\)"):
        add_server(alloc, "d", -0.1)
    with pytest.raises(PolicyError, match="a pool needs at least one server"):
        equal_split(space, [])
    with pytest.raises(PolicyError, match="server ids must be non-empty"):
        equal_split(space, ["a", ""])
    with pytest.raises(PolicyError, match="weights must not be negative"):
        weighted_split(space, {"a": 1, "b": -1})
    with pytest.raises(PolicyError, match="the only server; it must hold everything"):
        set_share(equal_split(space, "a"), "a", Fraction(1, 2))
    with pytest.raises(PolicyError, match="targets add up to 10, not 256"):
        reassign(alloc, {"a": 10})
    with pytest.raises(PolicyError, match="target counts must not be negative"):
        reassign(alloc, {"a": 300, "b": -44, "c": 0})
    with pytest.raises(PolicyError, match=r"servers \['c'\] hold buckets but have no target"):
        reassign(alloc, {"a": 128, "b": 128})
    with pytest.raises(PolicyError, match="must have a target of 0"):
        reassign(alloc, {"a": 128, "b": 64, "c": 64}, remove=["c"])


def test_set_share_to_everything_and_nothing() -> None:
    space = AddressSpace.create(bits=8)
    alloc = equal_split(space, "abcd")
    everything = set_share(alloc, "b", 1)
    assert everything.counts() == {"a": 0, "b": 256, "c": 0, "d": 0}
    assert moved_share(alloc, everything) == Fraction(3, 4)
    nothing = set_share(everything, "b", 0)
    assert nothing.count("b") == 0
    assert moved_share(everything, nothing) == 1
