"""Address space moved by a reallocation, over the least that had to move.

For N = 10, 100, 1000 servers: remove one, add one, and one server from 25% to 20%
(seed Fig 11; the server is first set to 25%). The minimum for each change is the
share that has to change hands to reach the outcome: the removed server's share
before (remove), the new server's share after (add), the changed server's loss
(25% -> 20%). Each method is judged against its own outcome, and also against the
nominal figure (1/N, 1/(N+1), 5%).

Compared in the same run with Maglev (M = 65537; remove and add rebuild the table
without / with the backend; the share change uses Envoy-style weighted Maglev,
not replicated backends) and weighted rendezvous hashing (score -w / ln h).

"Moved" is counted exactly, without sampling: for ours and rendezvous over the
65536 buckets of the default space (rendezvous hashes each bucket index as its
key), for Maglev over its 65537 table entries, each 1/M of the space under a
uniform address hash.

Output: progress on stderr, then the result as one json object, the last line on stdout.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

import _plots
from _common import (
    MAGLEV_M,
    emit,
    maglev_table,
    median_seconds,
    progress,
    rendezvous_owners,
)
from manycast.policy import add_server, equal_split, remove_server, set_share
from manycast.space import AddressSpace, Allocation, moved_share

SIZES = (10, 100, 1000)
OURS_REPEATS = 7
BASELINE_REPEATS = 3


def names_for(n: int) -> list[str]:
    return [f"s{i:04d}" for i in range(n)]


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


def baseline(
    method: str,
    n: int,
    build: Callable[[Sequence[str], Sequence[float] | None], npt.NDArray[np.int32]],
) -> list[dict[str, Any]]:
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


def maglev(names: Sequence[str], weights: Sequence[float] | None) -> npt.NDArray[np.int32]:
    return maglev_table(names, None if weights is None else [int(w) for w in weights], MAGLEV_M)


def rendezvous(names: Sequence[str], weights: Sequence[float] | None) -> npt.NDArray[np.int32]:
    return rendezvous_owners(names, np.arange(1 << 16, dtype=np.uint64), weights)


def worst(records: list[dict[str, Any]], method: str) -> float:
    return float(max(r["moved_over_minimum"] for r in records if r["method"] == method))


METHODS = ("ours", "maglev", "rendezvous")


def plot(result: Mapping[str, Any], directory: Path) -> list[Path]:
    """Share of the space each method moved, over the least that had to move, per
    change and number of servers; and the same as a share of the space."""
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
    return paths


def main() -> None:
    args = _plots.arguments(__doc__)
    space = AddressSpace.create()
    records: list[dict[str, Any]] = []
    for n in SIZES:
        start = time.perf_counter()
        records += ours(n, space)
        records += baseline("maglev", n, maglev)
        records += baseline("rendezvous", n, rendezvous)
        progress(f"N={n}: {time.perf_counter() - start:.1f} s")
    for r in records:
        progress(
            f"{r['method']:>10} N={r['n']:<4} {r['change']:<9} moved {r['moved']:.5f} "
            f"min {r['minimum']:.5f} ratio {r['moved_over_minimum']:.4f} ({r['ms']:.1f} ms)"
        )

    big = equal_split(space, names_for(1000))
    counts = np.bincount(big.owners, minlength=1000)

    def ms_at(n: int) -> dict[str, dict[str, float]]:
        return {
            method: {r["change"]: r["ms"] for r in records if r["method"] == method and r["n"] == n}
            for method in ("ours", "maglev", "rendezvous")
        }

    result = {
        "bench": "realloc",
        "sizes": list(SIZES),
        "moved_counted_over": "ours and rendezvous: the 65536-bucket grid; "
        "maglev: its 65537 table entries; exact, no sampling",
        "maglev_weights": "Envoy-style weighted Maglev (not replicated backends)",
        "moved_over_minimum": worst(records, "ours"),
        "maglev_moved_over_minimum": worst(records, "maglev"),
        "rendezvous_moved_over_minimum": worst(records, "rendezvous"),
        "balance_max_over_mean": round(float(counts.max() / counts.mean()), 5),
        # Median ms per change: our policy operation beside each baseline's
        # rebuild of its whole mapping.
        "ms_median_n10": ms_at(10),
        "ms_median_n1000": ms_at(1000),
        "runs": records,
    }
    emit(result)
    _plots.write(result, args.plots, plot)


if __name__ == "__main__":
    main()
