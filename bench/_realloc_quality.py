"""bench/realloc.py part 2: the seeded operations, the methods that carry them out and
what is measured after each.

Run alone, it prints one json object, its last line on stdout, naming the bench
to run (`_common.not_a_bench`).
"""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
import random
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from _baselines import MAGLEV_M, maglev_table
from _common import progress
from _realloc_fast import (
    Fill,
    IncrementalRendezvous,
    MaglevBuilder,
    names_for,
    server_id,
    smallest_prime_at_least,
)
from manycast.policy import (
    Apportionment,
    add_server,
    balance_loads,
    equal_split,
    remove_server,
    set_share,
)
from manycast.space import AddressSpace, Allocation

# -- part 2: the operations and the methods ---------------------------------------------------

KINDS = ("set_share", "add", "remove", "rebalance")
REBALANCE_TARGET = 1.0
WEIGHT_SCALE = 1 << 30  # Maglev's integer weights: the largest capacity's


@dataclass(frozen=True)
class Op:
    kind: str
    server: str = ""
    share: float = 0.0
    changed: tuple[str, ...] = ()  # whose capacity changed


def operations(n: int, count: int, seed: int) -> Iterator[tuple[Op, dict[str, float]]]:
    """`count` random operations on a pool of `n` equal servers, each with every
    server's capacity after it (desired share: capacity over the total). The pool
    stays between n/2 (at least 2) and 2n servers."""
    rng = random.Random(seed * 1_000_003 + n)
    capacity = dict.fromkeys(names_for(n), 1.0)
    next_id = n
    for _ in range(count):
        live = len(capacity)
        kinds = [
            k
            for k in KINDS
            if not (k == "remove" and live <= max(2, n // 2)) and not (k == "add" and live >= 2 * n)
        ]
        kind = rng.choice(kinds)
        if kind == "set_share":
            server = rng.choice(sorted(capacity))
            share = rng.uniform(0.25, 2.5) / live
            others = sum(c for s, c in capacity.items() if s != server)
            capacity[server] = share / (1 - share) * others
            op = Op(kind, server, share, (server,))
        elif kind == "add":
            server = f"s{next_id:04d}"
            next_id += 1
            capacity[server] = sum(capacity.values()) / live  # an equal share, 1/(live+1)
            op = Op(kind, server, 1 / (live + 1), (server,))
        elif kind == "remove":
            server = rng.choice(sorted(capacity))
            del capacity[server]
            op = Op(kind, server)
        else:
            changed = tuple(rng.sample(sorted(capacity), max(2, live // 10)))
            mean = sum(capacity.values()) / live
            for s in changed:  # relative to the mean, so that shares stay within bounds
                capacity[s] = mean * rng.uniform(0.5, 2.0)
            op = Op(kind, changed=changed)
        yield op, dict(capacity)


class Method(Protocol):
    label: str
    cells: int
    keeps_history: bool
    how: str

    def apply(self, op: Op, capacity: Mapping[str, float]) -> int:
        """Carry out `op`; the number of cells that changed owner (over every step)."""
        ...

    def owners(self) -> npt.NDArray[np.int64]:
        """Each cell's owner, as a server id."""
        ...


def _ids(allocation: Allocation) -> npt.NDArray[np.int64]:
    ids = np.array([server_id(s) for s in allocation.servers], dtype=np.int64)
    owners: npt.NDArray[np.int64] = ids[allocation.owners]
    return owners


class Ours:
    """Our policy keeping the shares beside the allocation (`Apportionment`): each
    allocation is the previous one changed by the policy."""

    label = "ours"
    keeps_history = True
    how = (
        "stateful: each allocation is the previous one changed by the policy, which keeps "
        "the desired shares beside it (Apportionment)"
    )

    def __init__(self, space: AddressSpace, names: Sequence[str]) -> None:
        self.state = Apportionment.split(space, dict.fromkeys(names, 1))
        self.cells = space.buckets
        self.second_call_moved = 0  # what a second balance_loads call would move

    @property
    def allocation(self) -> Allocation:
        return self.state.allocation

    def owners(self) -> npt.NDArray[np.int64]:
        return _ids(self.allocation)

    def apply(self, op: Op, capacity: Mapping[str, float]) -> int:
        before = self.allocation
        if op.kind == "rebalance":
            self.state = self.state.balance_loads(
                measured_loads(before, capacity), REBALANCE_TARGET
            )
            again = self.state.balance_loads(measured_loads(self.allocation, capacity), 1.0)
            self.second_call_moved += int((_ids(self.allocation) != _ids(again.allocation)).sum())
        elif op.kind == "set_share":
            self.state = self.state.set_share(op.server, Fraction(op.share))
        elif op.kind == "add":
            self.state = self.state.add_server(op.server)
        else:
            self.state = self.state.remove_server(op.server)
        return int((_ids(before) != self.owners()).sum())


def measured_loads(allocation: Allocation, capacity: Mapping[str, float]) -> dict[str, float]:
    """The loads the servers would measure under uniform traffic: share over capacity."""
    total = sum(capacity.values())
    counts = allocation.counts()
    return {s: counts[s] / (capacity[s] / total) for s in counts}


class OursFromHoldings(Ours):
    """The same operations through the functions on an `Allocation` alone, which read
    the shares from what is held: what a pool's members computed from a proposal
    while their agreed state was the allocation alone (now it is the Apportionment)."""

    label = "ours_from_holdings"
    how = (
        "stateful: the policy functions on the allocation alone (the shares read from "
        "the held buckets), as the pool's coordination applied proposals before it kept "
        "the shares"
    )

    def __init__(self, space: AddressSpace, names: Sequence[str]) -> None:
        super().__init__(space, names)
        self.plain = equal_split(space, names)

    @property
    def allocation(self) -> Allocation:
        return self.plain

    def apply(self, op: Op, capacity: Mapping[str, float]) -> int:
        before = self.plain
        if op.kind == "rebalance":
            self.plain = balance_loads(before, measured_loads(before, capacity), REBALANCE_TARGET)
        elif op.kind == "set_share":
            self.plain = set_share(before, op.server, Fraction(op.share))
        elif op.kind == "add":
            self.plain = add_server(before, op.server)
        else:
            self.plain = remove_server(before, op.server)
        return int((_ids(before) != self.owners()).sum())


class Maglev:
    keeps_history = False
    how = "stateless: the table rebuilt from the current backends and weights"

    def __init__(self, label: str, build: MaglevBuilder, names: Sequence[str]) -> None:
        self.label = label
        self.build = build
        self.cells = build.size
        self._owners = self._table(sorted(names), None)

    def _table(self, names: Sequence[str], weights: Sequence[int] | None) -> npt.NDArray[np.int64]:
        ids = np.array([server_id(s) for s in names], dtype=np.int64)
        owners: npt.NDArray[np.int64] = ids[self.build(names, weights)]
        return owners

    def owners(self) -> npt.NDArray[np.int64]:
        return self._owners

    def apply(self, op: Op, capacity: Mapping[str, float]) -> int:
        names = sorted(capacity)
        top = max(capacity.values())
        weights = [max(1, round(capacity[s] / top * WEIGHT_SCALE)) for s in names]
        owners = self._table(names, weights)
        moved = int((owners != self._owners).sum())
        self._owners = owners
        return moved


class Rendezvous:
    label = "rendezvous"
    keeps_history = False
    how = "stateless: each key's owner is the highest score over the current servers"

    def __init__(self, names: Sequence[str]) -> None:
        self.state = IncrementalRendezvous()
        self.cells = len(self.state.keys)
        for s in sorted(names):
            self.state.set(s, 1.0)

    def owners(self) -> npt.NDArray[np.int64]:
        return self.state.owner

    def apply(self, op: Op, capacity: Mapping[str, float]) -> int:
        before = self.state.owner.copy()
        if op.kind == "remove":
            self.state.remove(op.server)
        else:
            for s in op.changed:
                self.state.set(s, capacity[s])
        return int((before != self.state.owner).sum())


# -- part 2: measuring -------------------------------------------------------------------------


@dataclass
class Tracker:
    """One method's share errors and moves over the run."""

    cells: int
    ids: int
    counts: npt.NDArray[np.int64]
    moved: int = 0
    minimal: int = 0
    by_kind: dict[str, list[int]] = field(default_factory=dict)  # kind -> [moved, minimal]
    worst_relative: float = 0.0
    worst_cells: float = 0.0
    worst_at: dict[str, Any] = field(default_factory=dict)
    worst_cells_after: dict[str, float] = field(default_factory=dict)  # by kind of operation
    per_op_cells: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    final: tuple[float, float] = (0.0, 0.0)

    def record(
        self,
        index: int,
        op: Op,
        moved: int,
        owners: npt.NDArray[np.int64],
        desired: npt.NDArray[np.float64],
        live: npt.NDArray[np.intp],
        seconds: float,
    ) -> None:
        counts = np.bincount(owners, minlength=self.ids)
        minimal = int(np.maximum(self.counts - counts, 0).sum())
        self.counts = counts
        self.moved += moved
        self.minimal += minimal
        kind = self.by_kind.setdefault(op.kind, [0, 0])
        kind[0] += moved
        kind[1] += minimal
        error = np.abs(counts[live] / self.cells - desired[live])
        relative = float((error / desired[live]).max())
        in_cells = float(error.max() * self.cells)
        self.per_op_cells.append(in_cells)
        self.seconds.append(seconds)
        self.final = (relative, in_cells)
        if relative > self.worst_relative:
            self.worst_relative = relative
            self.worst_at = {"op": index, "kind": op.kind}
        self.worst_cells = max(self.worst_cells, in_cells)
        self.worst_cells_after[op.kind] = max(self.worst_cells_after.get(op.kind, 0.0), in_cells)


def quality(
    n: int, count: int, seed: int, space: AddressSpace, fill: Fill | None
) -> dict[str, Any]:
    """Part 2 for one pool size: every method through the same `count` operations."""
    names = names_for(n)
    small_m = smallest_prime_at_least(100 * n)
    methods: list[Method] = [
        Ours(space, names),
        Maglev("maglev_65537", MaglevBuilder(MAGLEV_M, fill), names),
        Maglev("maglev_100n", MaglevBuilder(small_m, fill), names),
        Rendezvous(names),
    ]
    # Reported beside the methods, not among them: the same policy without the shares.
    holdings = OursFromHoldings(space, names)
    ids = n + count + 1
    trackers = {
        m.label: Tracker(m.cells, ids, np.bincount(m.owners(), minlength=ids))
        for m in [*methods, holdings]
    }
    previous = np.zeros(ids)
    previous[:n] = 1 / n
    desired_minimal = 0.0
    kinds: dict[str, int] = dict.fromkeys(KINDS, 0)
    rng = random.Random(seed)
    live_servers = n
    for index, (op, capacity) in enumerate(operations(n, count, seed)):
        kinds[op.kind] += 1
        total = sum(capacity.values())
        desired = np.zeros(ids)
        live = np.array([server_id(s) for s in capacity], dtype=np.intp)
        desired[live] = np.array(list(capacity.values())) / total
        desired_minimal += float(np.maximum(previous - desired, 0).sum())
        previous = desired
        turns: list[Method] = [*methods, holdings]
        rng.shuffle(turns)  # a burst of load on the machine hits every method alike
        for method in turns:
            start = time.perf_counter()
            moved = method.apply(op, capacity)
            seconds = time.perf_counter() - start
            trackers[method.label].record(index, op, moved, method.owners(), desired, live, seconds)
        live_servers = len(capacity)
        if (index + 1) % 250 == 0:
            progress(
                f"  N={n}: {index + 1} operations, {live_servers} servers, worst error in "
                + ", ".join(f"{k} {t.worst_cells:.2f}" for k, t in trackers.items())
                + " cells"
            )
    rendezvous_state = next(m for m in methods if isinstance(m, Rendezvous)).state
    if not np.array_equal(rendezvous_state.owner, rendezvous_state.rebuilt()):
        raise RuntimeError("incremental rendezvous differs from a rebuild")
    out: dict[str, Any] = {
        "operations": count,
        "operations_by_kind": kinds,
        "servers_at_end": live_servers,
        "maglev_sizes": {"maglev_65537": MAGLEV_M, "maglev_100n": small_m},
        "rendezvous_checked_against_rebuild": True,
        "methods": {},
    }
    ours = next(m for m in methods if isinstance(m, Ours))
    out["ours_rebalance"] = {
        "how": f"one balance_loads(target={REBALANCE_TARGET}) call per rebalance, "
        "given the loads share / capacity",
        "second_call_moved": ours.second_call_moved,
    }
    for method in methods:
        out["methods"][method.label] = method_stats(method, trackers[method.label], desired_minimal)
    out["ours_from_holdings"] = method_stats(holdings, trackers[holdings.label], desired_minimal)
    return out


def method_stats(method: Method, t: Tracker, desired_minimal: float) -> dict[str, Any]:
    """One method's figures over the run."""
    desired_moved = t.moved / t.cells
    return {
        "cells": t.cells,
        "keeps_history": method.keeps_history,
        "how": method.how,
        "share_error_worst": round(t.worst_relative, 6),
        "share_error_worst_cells": round(t.worst_cells, 4),
        "share_error_worst_at": t.worst_at,
        "share_error_worst_cells_after": {k: round(v, 4) for k, v in t.worst_cells_after.items()},
        "share_error_median_cells": round(statistics.median(t.per_op_cells), 4),
        "share_error_final": round(t.final[0], 6),
        "share_error_final_cells": round(t.final[1], 4),
        "within_one_cell": t.worst_cells <= 1 + 1e-9,
        "moved_share_total": round(desired_moved, 6),
        "moved_over_minimal": round(t.moved / t.minimal, 5) if t.minimal else None,
        "moved_over_minimal_by_kind": {
            k: round(m / mn, 5) if mn else None for k, (m, mn) in t.by_kind.items()
        },
        "moved_over_desired_minimal": round(desired_moved / desired_minimal, 5),
        "ms_median": round(statistics.median(t.seconds) * 1e3, 3),
    }


def check_fill(fill: Fill | None, seed: int) -> str:
    """Which Maglev fill part 2 uses, after checking the C one against the reference."""
    if fill is None:
        return "python (bench/_baselines.py maglev_table; no C compiler)"
    rng = random.Random(seed)
    for n, size in ((3, 13), (10, 1009), (100, 10007)):
        names = names_for(n)
        for weights in (None, [rng.randrange(1, WEIGHT_SCALE) for _ in names]):
            built = MaglevBuilder(size, fill)(names, weights)
            if not np.array_equal(built, maglev_table(names, weights, size)):
                raise RuntimeError(f"C Maglev fill differs from the reference at {n=} {size=}")
    return "C (cc), equal to bench/_baselines.py maglev_table on the checked tables"


def summary(by_n: Mapping[int, Mapping[str, Any]], key: str, pick: Callable[..., Any]) -> Any:
    labels = list(next(iter(by_n.values()))["methods"])
    return {
        label: pick(q["methods"][label][key] for q in by_n.values() if q["methods"][label][key])
        for label in labels
    }


if __name__ == "__main__":
    from _common import not_a_bench

    not_a_bench(__file__, "bench/realloc.py")
