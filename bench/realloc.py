"""Address space moved by a reallocation, and how exact the allocation stays over many.

Part 1, one change. For N = 10, 100, 1000 servers: remove one, add one, and one
server from 25% to 20% (seed Fig 11; the server is first set to 25%). The minimum
for each change is the share that has to change hands to reach the outcome: the
removed server's share before (remove), the new server's share after (add), the
changed server's loss (25% -> 20%). Each method is judged against its own outcome,
and also against the nominal figure (1/N, 1/(N+1), 5%).

Part 2, quality over time. From an equal split of N = 10, 100, 1000 servers, 1000
random operations, the same seeded sequence for every method: set a server's share
(to 0.25-2.5 times an equal share; the others keep their proportions), add a server
(an equal share), remove one, and a load rebalance (the capacities of a tenth of the
servers change, each to 0.5-2 times the mean; the desired shares follow). After
every operation, each method's share of each server against the desired one: the
worst abs(actual - desired) / desired, and the same error in the method's cells
(our buckets, Maglev's table entries; the goal is at most one), over the whole run
and at its end; and the space moved over the least that had to move to reach each
method's own outcomes (summed over the run; the goal is 1.000), and over the least
between the desired shares. The methods take turns in a random order in each round.

Ours keeps history: each allocation is the previous one changed by the policy
(`set_share`, `add_server`, `remove_server`; the rebalance is `balance_loads` at a
target of 1.0, given the loads the servers would measure, share over capacity,
repeated until it moves nothing, at most 8 times). Maglev and rendezvous keep none:
each state is a rebuild from the current servers and weights.

Compared in the same run with Maglev (Eisenbud et al. 2016) at M = 65537 and at the
smallest prime >= 100 N (the paper's advice is M > 100 N; `maglev_100n`): remove and
add rebuild the table without / with the backend, shares are Envoy-style weighted
Maglev, not replicated backends; and with weighted rendezvous hashing (score
-w / ln h). In part 2
Maglev's table is filled by a small C loop (compiled here with cc; checked against
the Python reference of bench/_common.py) and rendezvous is kept up to date
incrementally, checked against a rebuild at the end: both give exactly what the
Python rebuild gives, 50 to 1000 times faster. Their `ms_median` is therefore not a
like-for-like timing against ours (Python policy code); part 1's `ms` is.

Headline fields (part 2, worst over the pool sizes, per method): `share_error_worst`
(relative), `share_error_worst_cells`, `quality_moved_over_minimal` (own outcomes),
`quality_moved_over_desired_minimal`, and `keeps_history`; `quality` has each size.

"Moved" is counted exactly, without sampling: for ours and rendezvous over the
65536 buckets of the default space (rendezvous hashes each bucket index as its
key), for Maglev over its M table entries, each 1/M of the space under a uniform
address hash.

Output: progress on stderr, then the result as one json object, the last line on stdout.
"""

from __future__ import annotations

import argparse
import ctypes
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

import _plots
from _common import (
    _GOLDEN,
    MAGLEV_M,
    emit,
    maglev_table,
    median_seconds,
    mix64,
    name_hash,
    progress,
    rendezvous_owners,
)
from manycast.policy import (
    add_server,
    balance_loads,
    equal_split,
    remove_server,
    set_share,
)
from manycast.space import AddressSpace, Allocation, moved_share

SIZES = (10, 100, 1000)
OURS_REPEATS = 7
BASELINE_REPEATS = 3
OPS = 1000
SEED = 20240613


def names_for(n: int) -> list[str]:
    return [f"s{i:04d}" for i in range(n)]


def smallest_prime_at_least(n: int) -> int:
    def prime(k: int) -> bool:
        return k >= 2 and all(k % d for d in range(2, int(k**0.5) + 1))

    while not prime(n):
        n += 1
    return n


# -- part 1: one change ------------------------------------------------------------------


def moved_fraction(
    before: npt.NDArray[np.int32],
    after: npt.NDArray[np.int32],
    names_before: Sequence[str],
    names_after: Sequence[str],
) -> float:
    """Share of entries whose owner (by name) differs."""
    ids_before = np.array(names_before, dtype=object)[before]
    ids_after = np.array(names_after, dtype=object)[after]
    return float((ids_before != ids_after).mean())


def share_of(owners: npt.NDArray[np.int32], names: Sequence[str], name: str) -> float:
    return float((owners == list(names).index(name)).mean())


def run_record(
    method: str,
    n: int,
    change: str,
    moved: float,
    minimum: float,
    nominal: float,
    seconds: float,
) -> dict[str, Any]:
    return {
        "method": method,
        "n": n,
        "change": change,
        "moved": round(moved, 7),
        "minimum": round(minimum, 7),
        "moved_over_minimum": round(moved / minimum, 5),
        "moved_over_nominal": round(moved / nominal, 5),
        "ms": round(seconds * 1e3, 3),
    }


def ours(n: int, space: AddressSpace) -> list[dict[str, Any]]:
    names = names_for(n)
    base = equal_split(space, names)
    gone, newcomer, changed = names[n // 2], f"s{n:04d}", names[1]
    at_25 = set_share(base, changed, Fraction(1, 4))
    ops: list[tuple[str, Allocation, Callable[[], Allocation], float]] = [
        ("remove", base, lambda: remove_server(base, gone), 1 / n),
        ("add", base, lambda: add_server(base, newcomer), 1 / (n + 1)),
        ("25%->20%", at_25, lambda: set_share(at_25, changed, Fraction(1, 5)), 0.05),
    ]
    records = []
    for change, before, op, nominal in ops:
        after = op()
        if change == "remove":
            minimum = before.share(gone)
        elif change == "add":
            minimum = after.share(newcomer)
        else:
            minimum = before.share(changed) - after.share(changed)
        moved = moved_share(before, after)
        seconds = median_seconds(op, OURS_REPEATS)
        records.append(
            run_record("ours", n, change, float(moved), float(minimum), nominal, seconds)
        )
    return records


def timed(build: Callable[[], npt.NDArray[np.int32]]) -> tuple[npt.NDArray[np.int32], float]:
    result = build()
    return result, median_seconds(build, BASELINE_REPEATS)


Build = Callable[[Sequence[str], Sequence[float] | None], npt.NDArray[np.int32]]


def baseline(method: str, n: int, build: Build) -> list[dict[str, Any]]:
    """Remove / add / 25% -> 20% for a hashing baseline that rebuilds its mapping."""
    names = names_for(n)
    gone, newcomer, changed = names[n // 2], f"s{n:04d}", names[1]
    base, _ = timed(lambda: build(names, None))
    records = []

    fewer = [s for s in names if s != gone]
    after, seconds = timed(lambda: build(fewer, None))
    records.append(
        run_record(
            method,
            n,
            "remove",
            moved_fraction(base, after, names, fewer),
            share_of(base, names, gone),
            1 / n,
            seconds,
        )
    )

    more = [*names, newcomer]
    after, seconds = timed(lambda: build(more, None))
    records.append(
        run_record(
            method,
            n,
            "add",
            moved_fraction(base, after, names, more),
            share_of(after, more, newcomer),
            1 / (n + 1),
            seconds,
        )
    )

    # Integer weights giving `changed` 1/4, then 1/5: it weighs n - 1 and the
    # n - 1 others 3 each (then 4 each).
    at_25 = [n - 1 if s == changed else 3 for s in names]
    at_20 = [n - 1 if s == changed else 4 for s in names]
    before = build(names, at_25)
    after, seconds = timed(lambda: build(names, at_20))
    records.append(
        run_record(
            method,
            n,
            "25%->20%",
            moved_fraction(before, after, names, names),
            share_of(before, names, changed) - share_of(after, names, changed),
            0.05,
            seconds,
        )
    )
    return records


def maglev_at(size: int) -> Build:
    def build(names: Sequence[str], weights: Sequence[float] | None) -> npt.NDArray[np.int32]:
        return maglev_table(names, None if weights is None else [int(w) for w in weights], size)

    return build


def rendezvous(names: Sequence[str], weights: Sequence[float] | None) -> npt.NDArray[np.int32]:
    return rendezvous_owners(names, np.arange(1 << 16, dtype=np.uint64), weights)


def worst(records: list[dict[str, Any]], method: str) -> float:
    return float(max(r["moved_over_minimum"] for r in records if r["method"] == method))


METHODS = ("ours", "maglev", "maglev_100n", "rendezvous")


# -- part 2: Maglev and rendezvous that keep up with 1000 changes ----------------------------

# Maglev's fill (Eisenbud et al. 2016, section 3.4) with the turns of bench/_common.py's
# Envoy-style weights: backend b claims its k-th entry in round ceil(k * top / w[b]),
# in index order within a round, each time the next free entry along its permutation
# (offset + j * skip) mod size.
_MAGLEV_C = r"""
#include <stdint.h>
int maglev_fill(int64_t n, const int64_t *offset, const int64_t *skip,
                const int64_t *weight, int64_t size, int64_t *next, int64_t *claimed,
                int32_t *table) {
    int64_t top = 0, filled = 0;
    for (int64_t b = 0; b < n; b++) {
        if (weight[b] < 0) return -1;
        if (weight[b] > top) top = weight[b];
        next[b] = 0;
        claimed[b] = 0;
    }
    if (top == 0) return -1;
    for (int64_t e = 0; e < size; e++) table[e] = -1;
    for (int64_t round = 0; filled < size; round++) {
        for (int64_t b = 0; b < n && filled < size; b++) {
            if (weight[b] == 0 || claimed[b] * top > round * weight[b]) continue;
            int64_t j = next[b], e = (offset[b] + j * skip[b]) % size;
            while (table[e] >= 0) {
                j++;
                e = (offset[b] + j * skip[b]) % size;
            }
            table[e] = (int32_t)b;
            next[b] = j + 1;
            claimed[b]++;
            filled++;
        }
    }
    return 0;
}
"""

Fill = Callable[..., int]


@cache
def compiled_fill() -> Fill | None:
    """The C fill, compiled with the system's cc and loaded; None without a compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    with tempfile.TemporaryDirectory(prefix="manycast-maglev-") as tmp:
        source, library = Path(tmp) / "maglev.c", Path(tmp) / "maglev.so"
        source.write_text(_MAGLEV_C)
        done = subprocess.run(
            [compiler, "-O2", "-shared", "-fPIC", "-o", str(library), str(source)],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            progress(f"cc failed, Maglev in Python: {done.stderr[-300:]}")
            return None
        fill = ctypes.CDLL(str(library)).maglev_fill  # stays mapped once loaded
    i64 = np.ctypeslib.ndpointer(np.int64, flags="C_CONTIGUOUS")
    i32 = np.ctypeslib.ndpointer(np.int32, flags="C_CONTIGUOUS")
    fill.argtypes = [ctypes.c_int64, i64, i64, i64, ctypes.c_int64, i64, i64, i32]
    fill.restype = ctypes.c_int
    return fill


class MaglevBuilder:
    """Maglev tables of one size, the same as `maglev_table` gives, built in C when a
    compiler is at hand; backend hashes kept per name."""

    def __init__(self, size: int, fill: Fill | None) -> None:
        self.size = size
        self.fill = fill
        self._hashes: dict[str, tuple[int, int]] = {}

    def __call__(
        self, names: Sequence[str], weights: Sequence[int] | None
    ) -> npt.NDArray[np.int32]:
        if self.fill is None:
            return maglev_table(names, weights, self.size)
        for s in names:
            if s not in self._hashes:
                self._hashes[s] = (
                    name_hash(s, "maglev-offset") % self.size,
                    name_hash(s, "maglev-skip") % (self.size - 1) + 1,
                )
        pairs = np.array([self._hashes[s] for s in names], dtype=np.int64).reshape(-1, 2)
        n = len(names)
        w = np.ones(n, dtype=np.int64) if weights is None else np.array(weights, dtype=np.int64)
        table = np.empty(self.size, dtype=np.int32)
        scratch = np.empty((2, n), dtype=np.int64)
        offsets, skips = np.ascontiguousarray(pairs[:, 0]), np.ascontiguousarray(pairs[:, 1])
        if self.fill(n, offsets, skips, w, self.size, scratch[0], scratch[1], table):
            raise ValueError("Maglev needs non-negative weights, one of them positive")
        return table


class IncrementalRendezvous:
    """Weighted rendezvous owners of the 2^16 bucket keys, kept up to date as weights
    change: the same owners `rendezvous_owners` computes from scratch (the same scores,
    float for float), at the cost of the keys a change can affect."""

    BLOCK = 32

    def __init__(self, bits: int = 16) -> None:
        self.keys = np.arange(1 << bits, dtype=np.uint64)
        self._mixed = mix64(self.keys * _GOLDEN)
        self.weight: dict[str, float] = {}
        self._seed: dict[str, np.uint64] = {}
        self.best = np.full(len(self.keys), -np.inf)
        self.owner = np.full(len(self.keys), -1, dtype=np.int64)  # server ids

    def _scores(
        self, names: Sequence[str], keys: npt.NDArray[np.intp] | slice
    ) -> npt.NDArray[np.float64]:
        seeds = np.array([self._seed[s] for s in names], dtype=np.uint64)
        w = np.array([self.weight[s] for s in names], dtype=np.float64)
        h = mix64(self._mixed[keys][None, :] ^ seeds[:, None])
        u = ((h >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))
        scores: npt.NDArray[np.float64] = -w[:, None] / np.log(u)
        return scores

    def _recompute(self, keys: npt.NDArray[np.intp]) -> None:
        """Owners of `keys` over every server, in name order (a rebuild's tie-break)."""
        names = sorted(self.weight)
        best = np.full(len(keys), -np.inf)
        owner = np.full(len(keys), -1, dtype=np.int64)
        for first in range(0, len(names), self.BLOCK):
            block = names[first : first + self.BLOCK]
            scores = self._scores(block, keys)
            top = scores.argmax(axis=0)
            top_score = scores[top, np.arange(len(keys))]
            better = top_score > best
            best[better] = top_score[better]
            owner[better] = np.array([server_id(s) for s in block])[top[better]]
        self.best[keys], self.owner[keys] = best, owner

    def set(self, name: str, weight: float) -> None:
        old = self.weight.get(name)
        self.weight[name] = weight
        self._seed.setdefault(name, np.uint64(name_hash(name, "rendezvous")))
        mine = self.owner == server_id(name)
        if old is not None and weight < old:
            self._recompute(np.flatnonzero(mine))  # only its keys can change hands
            return
        scores = self._scores([name], slice(None))[0]
        self.best[mine] = scores[mine]
        wins = ~mine & (scores > self.best)
        self.best[wins], self.owner[wins] = scores[wins], server_id(name)

    def remove(self, name: str) -> None:
        del self.weight[name]
        self._recompute(np.flatnonzero(self.owner == server_id(name)))

    def rebuilt(self) -> npt.NDArray[np.int64]:
        """The owners from scratch, by `rendezvous_owners` (to check this class)."""
        names = sorted(self.weight)
        found = rendezvous_owners(names, self.keys, [self.weight[s] for s in names])
        return np.array([server_id(s) for s in names], dtype=np.int64)[found]


# -- part 2: the operations and the methods ---------------------------------------------------

KINDS = ("set_share", "add", "remove", "rebalance")
REBALANCE_TARGET = 1.0
REBALANCE_ROUNDS = 8
WEIGHT_SCALE = 1 << 30  # Maglev's integer weights: the largest capacity's


def server_id(name: str) -> int:
    return int(name[1:])


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
    label = "ours"
    keeps_history = True
    how = "stateful: each allocation is the previous one changed by the policy"

    def __init__(self, space: AddressSpace, names: Sequence[str]) -> None:
        self.allocation = equal_split(space, names)
        self.cells = space.buckets
        self.rebalance_rounds: list[int] = []  # balance_loads calls that moved something

    def owners(self) -> npt.NDArray[np.int64]:
        return _ids(self.allocation)

    def apply(self, op: Op, capacity: Mapping[str, float]) -> int:
        before = self.allocation
        if op.kind == "rebalance":
            return self._rebalance(capacity)
        if op.kind == "set_share":
            self.allocation = set_share(before, op.server, Fraction(op.share))
        elif op.kind == "add":
            self.allocation = add_server(before, op.server)
        else:
            self.allocation = remove_server(before, op.server)
        return int((_ids(before) != self.owners()).sum())

    def _rebalance(self, capacity: Mapping[str, float]) -> int:
        """`balance_loads` with the loads the servers would measure under uniform
        traffic (share over capacity), until it moves nothing."""
        total = sum(capacity.values())
        moved = rounds = 0
        for _ in range(REBALANCE_ROUNDS):
            counts = self.allocation.counts()
            loads = {s: counts[s] / (capacity[s] / total) for s in counts}
            after = balance_loads(self.allocation, loads, REBALANCE_TARGET)
            step = int((_ids(self.allocation) != _ids(after)).sum())
            self.allocation = after
            if not step:
                break
            moved += step
            rounds += 1
        self.rebalance_rounds.append(rounds)
        return moved


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
    ids = n + count + 1
    trackers = {
        m.label: Tracker(m.cells, ids, np.bincount(m.owners(), minlength=ids)) for m in methods
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
        turns = list(methods)
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
    ours_state = next(m for m in methods if isinstance(m, Ours))
    rounds = ours_state.rebalance_rounds
    out["ours_rebalance"] = {
        "how": f"balance_loads(target={REBALANCE_TARGET}) with loads share / capacity, "
        f"repeated until it moves nothing, at most {REBALANCE_ROUNDS} times",
        "rounds_median": statistics.median(rounds) if rounds else None,
        "rounds_max": max(rounds, default=None),
        "stopped_at_the_limit": sum(r == REBALANCE_ROUNDS for r in rounds),
    }
    for method in methods:
        t = trackers[method.label]
        desired_moved = t.moved / t.cells
        out["methods"][method.label] = {
            "cells": t.cells,
            "keeps_history": method.keeps_history,
            "how": method.how,
            "share_error_worst": round(t.worst_relative, 6),
            "share_error_worst_cells": round(t.worst_cells, 4),
            "share_error_worst_at": t.worst_at,
            "share_error_worst_cells_after": {
                k: round(v, 4) for k, v in t.worst_cells_after.items()
            },
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
    return out


def check_fill(fill: Fill | None) -> str:
    """Which Maglev fill part 2 uses, after checking the C one against the reference."""
    if fill is None:
        return "python (bench/_common.py maglev_table; no C compiler)"
    rng = random.Random(SEED)
    for n, size in ((3, 13), (10, 1009), (100, 10007)):
        names = names_for(n)
        for weights in (None, [rng.randrange(1, WEIGHT_SCALE) for _ in names]):
            built = MaglevBuilder(size, fill)(names, weights)
            if not np.array_equal(built, maglev_table(names, weights, size)):
                raise RuntimeError(f"C Maglev fill differs from the reference at {n=} {size=}")
    return "C (cc), equal to bench/_common.py maglev_table on the checked tables"


def summary(by_n: Mapping[int, Mapping[str, Any]], key: str, pick: Callable[..., Any]) -> Any:
    labels = list(next(iter(by_n.values()))["methods"])
    return {
        label: pick(q["methods"][label][key] for q in by_n.values() if q["methods"][label][key])
        for label in labels
    }


# -- plots and main ----------------------------------------------------------------------------


def plot(result: Mapping[str, Any], directory: Path) -> list[Path]:
    """Share of the space each method moved, over the least that had to move, per
    change and number of servers; the same as a share of the space; and, after many
    changes, the worst share error and the space moved over the least."""
    runs = result["runs"]
    changes = list(dict.fromkeys(r["change"] for r in runs))
    sizes = [str(n) for n in result["sizes"]]

    def series(change: str, key: str) -> dict[str, list[float]]:
        return {
            method: [
                next(
                    r[key]
                    for r in runs
                    if r["method"] == method and r["change"] == change and str(r["n"]) == n
                )
                for n in sizes
            ]
            for method in METHODS
            if any(r["method"] == method for r in runs)
        }

    paths = []
    for key, name, label in (
        ("moved_over_minimum", "realloc_moved_over_minimum", "moved / least that had to move"),
        ("moved", "realloc_moved_share", "share of the space moved"),
    ):
        fig, axes = _plots.grid(
            "Space moved by one change: ours vs Maglev and rendezvous", len(changes)
        )
        for ax, change in zip(axes, changes, strict=True):
            _plots.grouped_bars(ax, sizes, series(change, key), ylabel=label, log=key == "moved")
            ax.set_xlabel("servers")
            ax.set_title(change, fontsize=10)
            if key == "moved_over_minimum":
                _plots.reference(ax, 1.0, "the least")
                ax.legend(fontsize=8)
        paths.append(_plots.save(fig, directory, name))

    quality_runs = result.get("quality")
    if quality_runs:
        ns = list(quality_runs)
        labels = list(quality_runs[ns[0]]["methods"])
        fig, axes = _plots.grid(
            f"After {quality_runs[ns[0]]['operations']} random changes "
            "(ours keeps history; Maglev and rendezvous rebuild)",
            2,
        )
        for ax, key, ylabel, goal in (
            (axes[0], "share_error_worst_cells", "worst |actual - desired| in cells", "1 cell"),
            (axes[1], "moved_over_minimal", "moved / least that had to move", "the least"),
        ):
            values = {m: [quality_runs[n]["methods"][m][key] or 0.0 for n in ns] for m in labels}
            _plots.grouped_bars(ax, ns, values, ylabel=ylabel, log=key.endswith("cells"))
            _plots.reference(ax, 1.0, goal)
            ax.set_xlabel("servers at the start")
            ax.legend(fontsize=8)
        paths.append(_plots.save(fig, directory, "realloc_quality"))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=OPS, help="operations in part 2")
    parser.add_argument(
        "--sizes", default=",".join(map(str, SIZES)), help="comma-separated pool sizes"
    )
    parser.add_argument("--seed", type=int, default=SEED)
    _plots.add_argument(parser)
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",") if x]
    space = AddressSpace.create()
    records: list[dict[str, Any]] = []
    for n in sizes:
        start = time.perf_counter()
        records += ours(n, space)
        records += baseline("maglev", n, maglev_at(MAGLEV_M))
        records += baseline("maglev_100n", n, maglev_at(smallest_prime_at_least(100 * n)))
        records += baseline("rendezvous", n, rendezvous)
        progress(f"part 1, N={n}: {time.perf_counter() - start:.1f} s")
    for r in records:
        progress(
            f"{r['method']:>11} N={r['n']:<4} {r['change']:<9} moved {r['moved']:.5f} "
            f"min {r['minimum']:.5f} ratio {r['moved_over_minimum']:.4f} ({r['ms']:.1f} ms)"
        )

    fill = compiled_fill()
    builder = check_fill(fill)
    by_n: dict[int, dict[str, Any]] = {}
    for n in sizes:
        start = time.perf_counter()
        by_n[n] = quality(n, args.ops, args.seed, space, fill)
        progress(f"part 2, N={n}: {time.perf_counter() - start:.1f} s")
        for label, q in by_n[n]["methods"].items():
            progress(
                f"{label:>13} N={n:<4} worst error {q['share_error_worst']:.5f} "
                f"({q['share_error_worst_cells']:.2f} cells, final "
                f"{q['share_error_final_cells']:.2f}), moved/least {q['moved_over_minimal']}, "
                f"moved/least desired {q['moved_over_desired_minimal']}"
            )

    big = equal_split(space, names_for(max(sizes)))
    counts = np.bincount(big.owners, minlength=max(sizes))

    def ms_at(n: int) -> dict[str, dict[str, float]]:
        return {
            method: {r["change"]: r["ms"] for r in records if r["method"] == method and r["n"] == n}
            for method in METHODS
        }

    result = {
        "bench": "realloc",
        "sizes": sizes,
        "moved_counted_over": "ours and rendezvous: the 65536-bucket grid; "
        "maglev: its M table entries; exact, no sampling",
        "maglev_weights": "Envoy-style weighted Maglev (not replicated backends)",
        "maglev_sizes": {
            "maglev": MAGLEV_M,
            "maglev_100n": {n: smallest_prime_at_least(100 * n) for n in sizes},
        },
        # Part 1: one change.
        "moved_over_minimum": worst(records, "ours"),
        "maglev_moved_over_minimum": worst(records, "maglev"),
        "maglev_100n_moved_over_minimum": worst(records, "maglev_100n"),
        "rendezvous_moved_over_minimum": worst(records, "rendezvous"),
        # The equal split at the start only: part 2 measures balance after changes.
        "initial_split_max_over_mean": round(float(counts.max() / counts.mean()), 5),
        # Median ms per change: our policy operation beside each baseline's rebuild of
        # its whole mapping (Python, bench/_common.py).
        "ms_median_n10": ms_at(10) if 10 in sizes else None,
        "ms_median_n1000": ms_at(1000) if 1000 in sizes else None,
        "runs": records,
        # Part 2: many changes; worst over the pool sizes.
        "keeps_history": {
            label: q["keeps_history"] for label, q in by_n[sizes[0]]["methods"].items()
        },
        "maglev_fill": builder,
        "share_error_worst": summary(by_n, "share_error_worst", max),
        "share_error_worst_cells": summary(by_n, "share_error_worst_cells", max),
        "quality_moved_over_minimal": summary(by_n, "moved_over_minimal", max),
        "quality_moved_over_desired_minimal": summary(by_n, "moved_over_desired_minimal", max),
        "quality": {str(n): q for n, q in by_n.items()},
    }
    emit(result)
    _plots.write(result, args.plots, plot)


if __name__ == "__main__":
    main()
