"""Allocation policies: how the pool cuts the space among servers and changes it.

Every function is deterministic: the same inputs give the same allocation on
every server (ties are broken by server id), which lets servers compute a new
allocation independently and agree on it. Every change goes through
`reassign()`, which moves only the buckets a server must give up, so removing a
server moves exactly its share, adding one moves exactly the new server's
share, and changing one server's share moves exactly the difference (Fig 11).

Each change first fixes the shares the servers should hold, then whole bucket
counts for them (`bucket_targets`: each within one bucket of its exact share,
the rounding chosen to keep what the servers hold), then moves only the
surpluses. An `Apportionment` keeps the shares beside the allocation, so that
the rounding of one change is not carried into the next: after any sequence of
changes every server holds its share to within one bucket. The functions that
take an `Allocation` alone read the shares from what is held.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from fractions import Fraction
from functools import cached_property
from typing import Any

import numpy as np
import numpy.typing as npt

from manycast.errors import ManycastError
from manycast.space import (
    SHARE_SCALE,
    AddressSpace,
    Allocation,
    SpaceError,
    bit_reversal,
    held_weights,
    shares_digest,
)

Weight = int | float | Fraction


class PolicyName(StrEnum):
    """How a pool's initial allocation is split (`[pool] policy`)."""

    EQUAL = "equal"
    WEIGHTED = "weighted"
    STRIPED = "striped"


class PolicyError(ManycastError, ValueError):
    """A policy request that cannot be met (unknown server, bad share, empty pool)."""


def apportion(total: int, weights: Mapping[str, Weight]) -> dict[str, int]:
    """Split `total` whole units in proportion to `weights` (largest remainder).

    Each party gets floor(total * w / sum(w)) and the leftover units go to the
    largest remainders, ties to the smaller id, so the result sums to `total`.
    """
    exact = {s: Fraction(w) for s, w in weights.items()}
    if any(w < 0 for w in exact.values()):
        raise PolicyError("weights must not be negative")
    # Over a common denominator the weights are integers and so is every remainder.
    common = math.lcm(*(w.denominator for w in exact.values())) if exact else 1
    whole_numbers = {s: w.numerator * (common // w.denominator) for s, w in exact.items()}
    if sum(whole_numbers.values()) == 0:
        raise PolicyError("at least one weight must be positive")
    return _largest_remainder(total, whole_numbers)


def _largest_remainder(total: int, weights: Mapping[str, int]) -> dict[str, int]:
    """`apportion` for non-negative integer weights, not all zero."""
    whole = sum(weights.values())
    counts: dict[str, int] = {}
    remainders: dict[str, int] = {}
    for server, weight in weights.items():
        counts[server], remainders[server] = divmod(total * weight, whole)
    leftover = total - sum(counts.values())
    for server in sorted(weights, key=lambda s: (-remainders[s], s))[:leftover]:
        counts[server] += 1
    return counts


def bucket_targets(
    buckets: int,
    weights: Mapping[str, int],
    current: Mapping[str, int],
    pinned: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Whole bucket counts for shares in proportion to integer `weights`, each within
    one bucket of its exact quota q = buckets * w / sum(w), that move the least from
    `current`.

    Every server gets floor(q) or ceil(q), and the counts sum to `buckets`. Among
    such counts, those closest to `current` are chosen: the extra buckets go first
    to servers that already hold at least ceil(q) (each such choice saves a move),
    then by largest remainder, then by id. `pinned` asks for a server's count
    (floor(q) or ceil(q)); it is served first.
    """
    whole = sum(weights.values())
    if whole <= 0 or any(w < 0 for w in weights.values()):
        raise PolicyError("weights must be non-negative, one of them positive")
    wish = dict(pinned or {})
    floor: dict[str, int] = {}
    remainder: dict[str, int] = {}
    for server, weight in weights.items():
        floor[server], remainder[server] = divmod(buckets * weight, whole)
    for server, count in wish.items():
        if count not in (floor[server], floor[server] + (remainder[server] > 0)):
            raise PolicyError(f"{server} cannot hold {count} buckets within one of its share")

    def rank(server: str) -> tuple[int, int, int, str]:
        asked = wish.get(server)
        first = 1 if asked is None else (0 if asked > floor[server] else 2)
        keeps = 0 if current.get(server, 0) > floor[server] else 1
        return first, keeps, -remainder[server], server

    leftover = buckets - sum(floor.values())
    candidates = sorted((s for s in weights if remainder[s]), key=rank)
    targets = dict(floor)
    for server in candidates[:leftover]:
        targets[server] += 1
    return targets


def _check_servers(servers: Iterable[str]) -> list[str]:
    ordered = sorted(set(servers))
    if not ordered:
        raise PolicyError("a pool needs at least one server")
    if any(not s for s in ordered):
        raise PolicyError("server ids must be non-empty")
    return ordered


def equal_split(space: AddressSpace, servers: Iterable[str]) -> Allocation:
    """Each server one consecutive run of buckets, sizes differing by at most one."""
    ordered = _check_servers(servers)
    counts = apportion(space.buckets, {s: 1 for s in ordered})
    return Allocation.from_counts(space, [(s, counts[s]) for s in ordered])


def weighted_split(space: AddressSpace, weights: Mapping[str, Weight]) -> Allocation:
    """Shares in proportion to `weights`; a zero weight keeps the server, with nothing."""
    ordered = _check_servers(weights)
    counts = apportion(space.buckets, weights)
    return Allocation.from_counts(space, [(s, counts[s]) for s in ordered], extra=ordered)


def striped(space: AddressSpace, servers: Iterable[str], portions: int) -> Allocation:
    """Cut the space into `portions` and deal them out in turn (Fig 10: thirty
    portions, every third to each of three servers), so each server gets a piece of
    every region of the space.

    Portions are runs of buckets; in an interleaved space (the default) a run is a
    value/mask pair on the low-order address bits, and with a power-of-two count
    the portion whose low bits equal v goes to server v mod N (Fig 7C's masks).
    Other counts are as even as the buckets allow.
    """
    ordered = _check_servers(servers)
    if not len(ordered) <= portions <= space.buckets:
        raise PolicyError(f"portions must be between {len(ordered)} and {space.buckets}")
    sizes = apportion(space.buckets, {f"{i:08d}": 1 for i in range(portions)})
    deal = list(range(portions))
    if portions & (portions - 1) == 0 and space.interleave:
        # Run j of a power-of-two count fixes the low address bits to reverse(j):
        # deal by that value, so server k gets the sources whose low bits are k
        # modulo the pool size, a single value/mask pair when the size divides.
        deal = [int(v) for v in bit_reversal(portions.bit_length() - 1)]
    runs = [(ordered[deal[i] % len(ordered)], sizes[f"{i:08d}"]) for i in range(portions)]
    return Allocation.from_counts(space, runs)


def reassign(
    alloc: Allocation, targets: Mapping[str, int], remove: Iterable[str] = ()
) -> Allocation:
    """Reach bucket `targets` (server -> count, summing to the space) moving the least.

    Servers named in `remove` must have a target of 0 and leave the server list.

    A server above its target gives away exactly its surplus, highest buckets
    first; servers below theirs take them in id order. No other bucket moves, so
    the moved space equals the sum of the surpluses, which is the minimum any
    allocation with these counts must move.
    """
    space = alloc.space
    if sum(targets.values()) != space.buckets:
        raise PolicyError(f"targets add up to {sum(targets.values())}, not {space.buckets}")
    if any(n < 0 for n in targets.values()):
        raise PolicyError("target counts must not be negative")
    current = alloc.counts()
    dropped = [s for s in current if s not in targets and current[s] > 0]
    if dropped:
        raise PolicyError(f"servers {dropped} hold buckets but have no target")
    gone = set(remove)
    if any(targets.get(s, 0) for s in gone):
        raise PolicyError(f"servers to remove must have a target of 0: {sorted(gone)}")
    servers = sorted(set(alloc.servers) | set(targets))
    position = {s: i for i, s in enumerate(servers)}
    remap = np.array([position[s] for s in alloc.servers], dtype=np.int32)
    owners = remap[alloc.owners]
    # Each server's buckets in ascending order, one sort for all of them.
    by_owner = np.argsort(owners, kind="stable")
    ends = np.cumsum(np.bincount(owners, minlength=len(servers)))
    freed: list[npt.NDArray[np.intp]] = []
    for server in servers:
        surplus = current.get(server, 0) - targets.get(server, 0)
        if surplus > 0:
            stop = int(ends[position[server]])
            freed.append(by_owner[stop - surplus : stop])
    pool = np.sort(np.concatenate(freed)) if freed else np.empty(0, dtype=np.intp)
    taken = 0
    for server in servers:
        deficit = targets.get(server, 0) - current.get(server, 0)
        if deficit > 0:
            owners[pool[taken : taken + deficit]] = position[server]
            taken += deficit
    keep = [s for s in servers if s in targets and s not in gone]
    keep_pos = {s: i for i, s in enumerate(keep)}
    final = np.array([keep_pos.get(s, -1) for s in servers], dtype=np.int32)[owners]
    return Allocation(space, tuple(keep), final)


SCALE = SHARE_SCALE
"""An `Apportionment`'s shares are whole multiples of 1/SCALE of the space: exact
integers every server computes alike, 2**40 times finer than the finest bucket."""
# Measured loads this close (relatively) count as equal: a float sum's rounding is
# no imbalance.
LOAD_TOLERANCE = 1e-9


@dataclass(frozen=True, eq=False)
class Apportionment:
    """An allocation and the shares its servers should hold.

    `weights[s] / SCALE` is server s's share (the weights sum to SCALE) and the
    allocation gives it floor or ceil of that share in buckets. Every change sets
    the new shares exactly (to 1/SCALE), then moves only the surplus buckets
    (`reassign`) to counts within one bucket of them (`bucket_targets`). Since the
    shares are kept, not read back from the rounded counts, the error never
    accumulates: after any sequence of changes each server holds its share to
    within one bucket, and each change moves exactly the surplus it creates.

    A pool's servers keep one as their agreed state (`protocol.coordination`):
    `digest()` covers the shares as well as the buckets.
    """

    allocation: Allocation
    weights: Mapping[str, int]

    def __post_init__(self) -> None:
        if set(self.weights) != set(self.allocation.servers):
            raise PolicyError("the shares must name exactly the allocation's servers")
        if sum(self.weights.values()) != SCALE or any(w < 0 for w in self.weights.values()):
            raise PolicyError("the shares must be non-negative and add up to the space")

    @classmethod
    def held(cls, alloc: Allocation) -> Apportionment:
        """The shares are what `alloc` holds."""
        return cls(alloc, held_weights(alloc))

    @cached_property
    def _digest(self) -> str:
        return shares_digest(self.allocation, self.weights)

    def digest(self) -> str:
        """A stable fingerprint of the allocation and the shares (`space.shares_digest`):
        equal on every host for equal states, different when only the shares differ."""
        return self._digest

    @classmethod
    def split(cls, space: AddressSpace, weights: Mapping[str, Weight]) -> Apportionment:
        """Shares in proportion to `weights`, each server one run of buckets in id order
        (a zero weight keeps the server, with nothing)."""
        ordered = _check_servers(weights)
        shares = apportion(SCALE, weights)
        counts = bucket_targets(space.buckets, shares, {})
        alloc = Allocation.from_counts(space, [(s, counts[s]) for s in ordered], extra=ordered)
        return cls(alloc, shares)

    def desired(self) -> dict[str, Fraction]:
        """Each server's share, exact."""
        return {s: Fraction(w, SCALE) for s, w in self.weights.items()}

    def error(self) -> Fraction:
        """The largest |held - desired| over the servers, in buckets (below 1 for every
        Apportionment the policy builds)."""
        buckets = self.allocation.space.buckets
        counts = self.allocation.counts()
        return max(abs(counts[s] - Fraction(w * buckets, SCALE)) for s, w in self.weights.items())

    def _reach(
        self,
        weights: dict[str, int],
        pinned: Mapping[str, int] | None = None,
        remove: str | None = None,
    ) -> Apportionment:
        alloc = self.allocation
        targets = bucket_targets(alloc.space.buckets, weights, alloc.counts(), pinned)
        if remove is None:
            return Apportionment(reassign(alloc, targets), weights)
        return Apportionment(reassign(alloc, {**targets, remove: 0}, [remove]), weights)

    def _others(self, total: int, server: str) -> dict[str, int]:
        """`total` split among the servers other than `server` in their proportions."""
        others = {s: w for s, w in self.weights.items() if s != server}
        if not any(others.values()):
            others = dict.fromkeys(others, 1)
        return _largest_remainder(total, others) if others else {}

    def set_share(self, server: str, share: Weight) -> Apportionment:
        """Give `server` this share (e.g. 25% -> 20%, Fig 11); the others keep their
        proportions, so when they hold them only the difference moves. The server
        holds round(share * buckets)."""
        wanted = Fraction(share)
        if not 0 <= wanted <= 1:
            raise PolicyError(f"share must be between 0 and 1, not {share}")
        alloc = self.allocation
        alloc.index_of(server)
        buckets = alloc.space.buckets
        count = round(wanted * buckets)
        if len(alloc.servers) == 1:
            if count != buckets:
                raise PolicyError(f"{server} is the only server; it must hold everything")
            return self
        mine = round(wanted * SCALE)
        weights = {**self._others(SCALE - mine, server), server: mine}
        return self._reach(weights, {server: count})

    def add_server(self, server: str, share: Weight | None = None) -> Apportionment:
        """A server joins with `share` (default: an equal share, 1/(N+1)); the others
        keep their proportions, so when they hold them only its share moves."""
        alloc = self.allocation
        if server in alloc.servers:
            raise PolicyError(f"{server!r} is already in the pool")
        if not server:
            raise PolicyError("server ids must be non-empty")
        wanted = Fraction(1, len(alloc.servers) + 1) if share is None else Fraction(share)
        if not 0 <= wanted < 1:
            raise PolicyError(f"a new server's share must be in [0, 1), not {share}")
        mine = round(wanted * SCALE)
        weights = {**self._others(SCALE - mine, server), server: mine}
        return self._reach(weights, {server: round(wanted * alloc.space.buckets)})

    def remove_server(self, server: str) -> Apportionment:
        """A server leaves (failure): the survivors keep their proportions, so when
        they hold them only its buckets move (an equal split stays equal)."""
        if server not in self.weights:
            raise PolicyError(f"{server!r} is not in the pool")
        if len(self.weights) == 1:
            raise PolicyError(f"cannot remove {server}: it is the last server")
        return self._reach(self._others(SCALE, server), remove=server)

    def set_weights(self, weights: Mapping[str, Weight]) -> Apportionment:
        """Shares in proportion to `weights`, one for each current server."""
        if set(weights) != set(self.weights):
            raise PolicyError("give a weight for each server of the pool, and only those")
        return self._reach(apportion(SCALE, weights))

    def balance_loads(
        self,
        server_loads: Mapping[str, float],
        target: float = 1.1,
        hot: Mapping[int, float] | None = None,
    ) -> Apportionment:
        """Even out measured server loads, in one step.

        Nothing moves while the busiest server is within `target` times the mean.
        With `hot` (bucket -> load, the busiest buckets a congested server
        measured), `rebalance` moves the fewest buckets, the hot ones first, and the
        shares become what it leaves. Without, each server's load is taken to grow
        with the buckets it holds at its own rate, load / buckets (the traffic a
        bucket brings over the server's capacity), so its capacity is buckets /
        load; the shares become the capacities' proportions, which give every
        server the same load. A server that holds nothing or reports no load keeps
        its share (its capacity is unknown).
        """
        if target < 1.0:
            raise PolicyError("target max/mean must be at least 1.0")
        alloc = self.allocation
        counts = alloc.counts()
        loads = {s: max(0.0, float(server_loads.get(s, 0.0))) for s in counts}
        if not all(math.isfinite(v) for v in loads.values()):
            raise PolicyError("server loads must be finite")
        mean = sum(loads.values()) / len(loads)
        # Equal loads can sum to a mean a rounding below each (then at target 1.0
        # they would be "uneven"): within LOAD_TOLERANCE of it, nothing moves.
        if mean <= 0 or max(loads.values()) <= target * mean * (1 + LOAD_TOLERANCE):
            return self
        if hot:
            return self.rebalance(_bucket_loads(alloc, loads, hot), target)
        # To 12 significant digits: measured loads are floats, and capacities that are
        # equal but for a rounding must give equal shares (else one server may keep a
        # bucket more than another of the same capacity, and the next call moves it).
        capacity = {
            s: Fraction(f"{counts[s] / load:.12g}")
            for s, load in loads.items()
            if counts[s] > 0 and load > 0
        }
        if not capacity:
            return self
        # Servers whose capacity is unknown (holding nothing, or reporting no load)
        # keep their shares; the others share the rest by capacity.
        kept = {s: w for s, w in self.weights.items() if s not in capacity}
        weights = {**kept, **_split_exact(SCALE - sum(kept.values()), capacity)}
        return self._reach(weights)

    def rebalance(self, bucket_load: npt.ArrayLike, target: float = 1.1) -> Apportionment:
        """Move the fewest buckets that bring max/mean server load to `target` or below
        (`rebalance`: per-bucket loads say which buckets to move, not what share each
        server should hold, so the shares become what it leaves). When nothing moves,
        the shares stay as they were."""
        moved = rebalance(self.allocation, bucket_load, target).allocation
        return self if moved == self.allocation else Apportionment.held(moved)


def _split_exact(total: int, weights: Mapping[str, Fraction]) -> dict[str, int]:
    """`apportion`, or all zeros when there is nothing to split."""
    return apportion(total, weights) if total else dict.fromkeys(weights, 0)


def set_share(alloc: Allocation, server: str, share: Weight) -> Allocation:
    """Give `server` this share (e.g. 25% -> 20%, Fig 11); the others absorb the
    difference in proportion to what they hold, so only the difference moves."""
    return Apportionment.held(alloc).set_share(server, share).allocation


def remove_server(alloc: Allocation, server: str) -> Allocation:
    """A server leaves (failure): only its buckets move, to the survivors in
    proportion to their holdings (an equal split stays equal)."""
    return Apportionment.held(alloc).remove_server(server).allocation


def add_server(alloc: Allocation, server: str, share: Weight | None = None) -> Allocation:
    """A server joins with `share` (default: an equal share, 1/(N+1)); the others give
    it buckets in proportion to their holdings, so only its share moves."""
    return Apportionment.held(alloc).add_server(server, share).allocation


@dataclass(frozen=True, slots=True)
class Rebalance:
    """Outcome of a load-driven rebalance."""

    allocation: Allocation
    moved_buckets: int
    imbalance_before: float
    imbalance_after: float
    reached: bool


def imbalance(alloc: Allocation, bucket_load: npt.ArrayLike) -> float:
    """max/mean server load for per-bucket `bucket_load` (1.0 is perfect)."""
    load = np.asarray(bucket_load, dtype=np.float64)
    totals = np.bincount(alloc.owners, weights=load, minlength=len(alloc.servers))
    mean = totals.mean()
    return float(totals.max() / mean) if mean > 0 else 1.0


def rebalance(alloc: Allocation, bucket_load: npt.ArrayLike, target: float = 1.1) -> Rebalance:
    """Move the fewest buckets that bring max/mean server load to `target` or below.

    Overloaded servers shed their largest buckets first (the fewest buckets that
    remove a given load are the largest ones), each to the least loaded server
    that stays under the limit. When every overloaded server can shed this way,
    the number moved is the minimum possible: for each server, no fewer buckets
    carry its excess. `reached` says whether the target was met.

    Buckets of equal load are interchangeable, so each receiver takes its number of
    them as one stretch of the giver's buckets, in bucket order: handed out one by
    one they would alternate between receivers and cut the space into a run per
    bucket (a rebalance by measured hot buckets spreads a server's other load
    evenly over thousands of buckets; bench/fragmentation.py replays the soak's
    changes: a median of 10 291 runs so, 676.5 in stretches).
    """
    load = np.asarray(bucket_load, dtype=np.float64)
    if load.shape != (alloc.space.buckets,):
        raise PolicyError(f"bucket_load must have {alloc.space.buckets} entries")
    if (load < 0).any() or not np.isfinite(load).all():
        raise PolicyError("bucket loads must be finite and non-negative")
    if target < 1.0:
        raise PolicyError("target max/mean must be at least 1.0")
    before = imbalance(alloc, load)
    owners = alloc.owners.copy()
    n = len(alloc.servers)
    totals = np.bincount(owners, weights=load, minlength=n)
    limit = target * totals.sum() / n
    moved = 0
    for server in np.argsort(-totals, kind="stable"):
        if totals[server] <= limit:
            break
        mine = np.flatnonzero(owners == server)
        given: list[tuple[float, int, int]] = []  # (weight, receiver, bucket) in order
        for bucket in mine[np.argsort(-load[mine], kind="stable")]:
            if totals[server] <= limit:
                break
            weight = load[bucket]
            if weight == 0:
                break
            receiver = int(np.argmin(totals))
            if receiver == server or totals[receiver] + weight > limit:
                continue
            given.append((float(weight), receiver, int(bucket)))
            totals[server] -= weight
            totals[receiver] += weight
            moved += 1
        _hand_over(owners, given)
    result = Allocation(alloc.space, alloc.servers, owners)
    after = imbalance(result, load)
    return Rebalance(result, moved, before, after, after <= target + 1e-9)


def _hand_over(
    owners: npt.NDArray[np.signedinteger[Any]], given: list[tuple[float, int, int]]
) -> None:
    """Give each (weight, receiver, bucket) its receiver, where among buckets of one
    weight each receiver gets its count of them as consecutive buckets."""
    for _, group in itertools.groupby(given, key=lambda g: g[0]):
        batch = list(group)
        buckets = sorted(b for _, _, b in batch)
        receivers = sorted(r for _, r, _ in batch)
        owners[buckets] = receivers


def balance_loads(
    alloc: Allocation,
    server_loads: Mapping[str, float],
    target: float = 1.1,
    hot: Mapping[int, float] | None = None,
) -> Allocation:
    """Even out measured server loads (`Apportionment.balance_loads`, the shares read
    from what is held): one call reaches the shares that give every server the same
    load, to within one bucket each, moving only the surpluses."""
    return Apportionment.held(alloc).balance_loads(server_loads, target, hot).allocation


def _bucket_loads(
    alloc: Allocation, loads: Mapping[str, float], hot: Mapping[int, float]
) -> npt.NDArray[np.float64]:
    """Per-bucket loads: the hot buckets as measured, the rest of each server's load
    spread over its other buckets."""
    per_bucket = np.zeros(alloc.space.buckets)
    known = np.zeros(alloc.space.buckets, dtype=bool)
    for bucket, load in hot.items():
        if 0 <= bucket < alloc.space.buckets:
            per_bucket[bucket] = load
            known[bucket] = True
    for index, server in enumerate(alloc.servers):
        mine = alloc.owners == index
        rest = mine & ~known
        remaining = max(0.0, loads.get(server, 0.0) - float(per_bucket[mine & known].sum()))
        if rest.any():
            per_bucket[rest] = remaining / int(rest.sum())
    return per_bucket


__all__ = [
    "SCALE",
    "Apportionment",
    "PolicyError",
    "Rebalance",
    "SpaceError",
    "add_server",
    "apportion",
    "balance_loads",
    "bucket_targets",
    "equal_split",
    "imbalance",
    "reassign",
    "rebalance",
    "remove_server",
    "set_share",
    "striped",
    "weighted_split",
]
