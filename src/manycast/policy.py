"""Allocation policies: how the pool cuts the space among servers and changes it.

Every function is deterministic: the same inputs give the same allocation on
every server (ties are broken by server id), which lets servers compute a new
allocation independently and agree on it. Every change goes through
`reassign()`, which moves only the buckets a server must give up, so removing a
server moves exactly its share, adding one moves exactly the new server's
share, and changing one server's share moves exactly the difference (Fig 11).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from fractions import Fraction

import numpy as np
import numpy.typing as npt

from manycast.errors import ManycastError
from manycast.space import AddressSpace, Allocation, SpaceError, bit_reversal

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
    whole = sum(exact.values(), Fraction(0))
    if whole == 0:
        raise PolicyError("at least one weight must be positive")
    quotas = {s: total * w / whole for s, w in exact.items()}
    counts = {s: int(q) for s, q in quotas.items()}
    leftover = total - sum(counts.values())
    by_remainder = sorted(quotas, key=lambda s: (-(quotas[s] - counts[s]), s))
    for server in by_remainder[:leftover]:
        counts[server] += 1
    return counts


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
    servers = sorted(set(alloc.servers) | set(targets))
    position = {s: i for i, s in enumerate(servers)}
    remap = np.array([position[s] for s in alloc.servers], dtype=np.int32)
    owners = remap[alloc.owners]
    freed: list[npt.NDArray[np.intp]] = []
    for server in servers:
        surplus = current.get(server, 0) - targets.get(server, 0)
        if surplus > 0:
            mine = np.flatnonzero(owners == position[server])
            freed.append(mine[-surplus:])
    pool = np.sort(np.concatenate(freed)) if freed else np.empty(0, dtype=np.intp)
    taken = 0
    for server in servers:
        deficit = targets.get(server, 0) - current.get(server, 0)
        if deficit > 0:
            owners[pool[taken : taken + deficit]] = position[server]
            taken += deficit
    gone = set(remove)
    if any(targets.get(s, 0) for s in gone):
        raise PolicyError(f"servers to remove must have a target of 0: {sorted(gone)}")
    keep = [s for s in servers if s in targets and s not in gone]
    keep_pos = {s: i for i, s in enumerate(keep)}
    final = np.array([keep_pos.get(s, -1) for s in servers], dtype=np.int32)[owners]
    return Allocation(space, tuple(keep), final)


def set_share(alloc: Allocation, server: str, share: Weight) -> Allocation:
    """Give `server` this share (e.g. 25% -> 20%, Fig 11); the others absorb the
    difference in proportion to what they hold, so only the difference moves."""
    wanted = Fraction(share)
    if not 0 <= wanted <= 1:
        raise PolicyError(f"share must be between 0 and 1, not {share}")
    alloc.index_of(server)
    buckets = alloc.space.buckets
    current = alloc.counts()
    target = round(wanted * buckets)
    others = {s: n for s, n in current.items() if s != server}
    if not others:
        if target != buckets:
            raise PolicyError(f"{server} is the only server; it must hold everything")
        return alloc
    delta = target - current[server]
    targets = dict(current)
    targets[server] = target
    if delta < 0:
        # Hand the freed buckets to the others in proportion to their holdings.
        weights: Mapping[str, Weight] = others if sum(others.values()) else dict.fromkeys(others, 1)
        for s, n in apportion(-delta, weights).items():
            targets[s] += n
    elif delta > 0:
        for s, n in _take_proportionally(others, delta).items():
            targets[s] -= n
    return reassign(alloc, targets)


def _take_proportionally(holdings: Mapping[str, int], total: int) -> dict[str, int]:
    """Take `total` units from holders in proportion to holdings, never more than held."""
    taken = apportion(total, holdings)
    # Rounding can ask a holder for one more than it has only when it holds
    # almost nothing; move such excess to the largest holders.
    excess = 0
    for s, n in taken.items():
        if n > holdings[s]:
            excess += n - holdings[s]
            taken[s] = holdings[s]
    for s in sorted(holdings, key=lambda s: (-(holdings[s] - taken[s]), s)):
        if not excess:
            break
        extra = min(excess, holdings[s] - taken[s])
        taken[s] += extra
        excess -= extra
    return taken


def remove_server(alloc: Allocation, server: str) -> Allocation:
    """A server leaves (failure): only its buckets move, to the survivors in
    proportion to their holdings (an equal split stays equal)."""
    current = alloc.counts()
    if server not in current:
        raise PolicyError(f"{server!r} is not in the pool")
    survivors = {s: n for s, n in current.items() if s != server}
    if not survivors:
        raise PolicyError(f"cannot remove {server}: it is the last server")
    weights: Mapping[str, Weight] = (
        survivors if sum(survivors.values()) else dict.fromkeys(survivors, 1)
    )
    targets = {**survivors, server: 0}
    for s, n in apportion(current[server], weights).items():
        targets[s] += n
    return reassign(alloc, targets, remove=[server])


def add_server(alloc: Allocation, server: str, share: Weight | None = None) -> Allocation:
    """A server joins with `share` (default: an equal share, 1/(N+1)); the others give
    it buckets in proportion to their holdings, so only its share moves."""
    if server in alloc.servers:
        raise PolicyError(f"{server!r} is already in the pool")
    if not server:
        raise PolicyError("server ids must be non-empty")
    current = alloc.counts()
    wanted = Fraction(1, len(current) + 1) if share is None else Fraction(share)
    if not 0 <= wanted < 1:
        raise PolicyError(f"a new server's share must be in [0, 1), not {share}")
    count = round(wanted * alloc.space.buckets)
    targets = dict(current)
    for s, n in _take_proportionally(current, count).items():
        targets[s] -= n
    targets[server] = count
    return reassign(alloc, targets)


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
        for bucket in mine[np.argsort(-load[mine], kind="stable")]:
            if totals[server] <= limit:
                break
            weight = load[bucket]
            if weight == 0:
                break
            receiver = int(np.argmin(totals))
            if receiver == server or totals[receiver] + weight > limit:
                continue
            owners[bucket] = receiver
            totals[server] -= weight
            totals[receiver] += weight
            moved += 1
    result = Allocation(alloc.space, alloc.servers, owners)
    after = imbalance(result, load)
    return Rebalance(result, moved, before, after, after <= target + 1e-9)


def balance_loads(
    alloc: Allocation,
    server_loads: Mapping[str, float],
    target: float = 1.1,
    hot: Mapping[int, float] | None = None,
) -> Allocation:
    """Even out measured server loads.

    With `hot` (bucket -> load, the busiest buckets a congested server measured) the
    per-bucket loads are those, each server's remaining load spread over its other
    buckets, and `rebalance` moves the fewest buckets, the hot ones first. Without,
    each server's load counts as spread evenly: a server above the mean sheds the
    buckets that carry its excess, by whole runs (`reassign`), and servers below the
    mean take them in proportion to their spare load. Servers already within
    `target` times the mean keep what they have.
    """
    if target < 1.0:
        raise PolicyError("target max/mean must be at least 1.0")
    counts = alloc.counts()
    loads = {s: max(0.0, float(server_loads.get(s, 0.0))) for s in counts}
    mean = sum(loads.values()) / len(loads)
    if mean <= 0 or max(loads.values()) <= target * mean:
        return alloc
    if hot:
        return rebalance(alloc, _bucket_loads(alloc, loads, hot), target).allocation
    targets = dict(counts)
    freed = 0
    for server, load in loads.items():
        if load > mean and counts[server] > 0:
            density = load / counts[server]
            shed = min(counts[server] - 1, round((load - mean) / density))
            targets[server] -= shed
            freed += shed
    spare = {s: mean - load for s, load in loads.items() if load < mean}
    if not freed or not spare:
        return alloc
    for server, extra in apportion(freed, spare).items():
        targets[server] += extra
    return reassign(alloc, targets)


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
    "PolicyError",
    "Rebalance",
    "SpaceError",
    "add_server",
    "apportion",
    "balance_loads",
    "equal_split",
    "imbalance",
    "reassign",
    "rebalance",
    "remove_server",
    "set_share",
    "striped",
    "weighted_split",
]
