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

Ours keeps history: each allocation is the previous one changed by the policy, an
`Apportionment` that keeps the desired shares beside the allocation (`set_share`,
`add_server`, `remove_server`; the rebalance is one `balance_loads` call at a target
of 1.0, given the loads the servers would measure, share over capacity; the bench
checks that a second call would move nothing, `ours_rebalance.second_call_moved`).
Beside the methods, `ours_from_holdings` runs the same operations through the
policy functions on the allocation alone, which read the shares from what is held,
as the pool's coordination applied proposals until its agreed state became the
`Apportionment` too (allocation and shares, both in the digest and the snapshot:
docs/coordination.md); it stays as the baseline that shows what keeping the shares
buys. Maglev and rendezvous keep none: each state is a
rebuild from the current servers and weights.

Compared in the same run with Maglev (Eisenbud et al. 2016) at M = 65537 and at the
smallest prime >= 100 N (the paper's advice is M > 100 N; `maglev_100n`): remove and
add rebuild the table without / with the backend, shares are Envoy-style weighted
Maglev, not replicated backends; and with weighted rendezvous hashing (score
-w / ln h). In part 2
Maglev's table is filled by a small C loop (compiled here with cc; checked against
the Python reference of bench/_baselines.py) and rendezvous is kept up to date
incrementally, checked against a rebuild at the end: both give exactly what the
Python rebuild gives, 50 to 1000 times faster. Their `ms_median` is therefore not a
like-for-like timing against ours (Python policy code); part 1's `ms` is.

Headline fields (part 2, worst over the pool sizes, per method): `share_error_worst`
(relative), `share_error_worst_cells`, `quality_moved_over_minimal` (own outcomes),
`quality_moved_over_desired_minimal`, and `keeps_history`; `quality` has each size;
`ours_from_holdings_share_error_worst_cells` and `..._moved_over_minimal` the same
for the functions on the allocation alone.

"Moved" is counted exactly, without sampling: for ours and rendezvous over the
65536 buckets of the default space (rendezvous hashes each bucket index as its
key), for Maglev over its M table entries, each 1/M of the space under a uniform
address hash.

Output: progress on stderr, then the result as one json object, the last line on stdout.
"""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
import argparse
import time
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

import _plots
from _baselines import MAGLEV_M, maglev_table, rendezvous_owners
from _common import median_seconds, progress, run_and_emit
from _realloc_fast import (
    IncrementalRendezvous,
    MaglevBuilder,
    compiled_fill,
    names_for,
    smallest_prime_at_least,
)
from _realloc_quality import KINDS, Op, Tracker, check_fill, operations, quality, summary
from manycast.policy import add_server, equal_split, remove_server, set_share
from manycast.space import AddressSpace, Allocation, moved_share

SIZES = (10, 100, 1000)
OURS_REPEATS = 7
BASELINE_REPEATS = 3
OPS = 1000
SEED = 20240613


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
    run_and_emit("realloc", lambda: measure(args))


def measure(args: argparse.Namespace) -> dict[str, Any]:
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
    builder = check_fill(fill, args.seed)
    by_n: dict[int, dict[str, Any]] = {}
    for n in sizes:
        start = time.perf_counter()
        by_n[n] = quality(n, args.ops, args.seed, space, fill)
        progress(f"part 2, N={n}: {time.perf_counter() - start:.1f} s")
        shown = {**by_n[n]["methods"], "ours_from_holdings": by_n[n]["ours_from_holdings"]}
        for label, q in shown.items():
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
        # its whole mapping (Python, bench/_baselines.py).
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
        # The same policy without the shares kept, as the pool applies proposals today.
        "ours_from_holdings_share_error_worst_cells": max(
            q["ours_from_holdings"]["share_error_worst_cells"] for q in by_n.values()
        ),
        "ours_from_holdings_moved_over_minimal": max(
            q["ours_from_holdings"]["moved_over_minimal"] or 0.0 for q in by_n.values()
        ),
        "quality": {str(n): q for n, q in by_n.items()},
    }
    _plots.write(result, args.plots, plot)
    return result


# What tests and other benches use from here.
__all__ = [
    "KINDS",
    "IncrementalRendezvous",
    "MaglevBuilder",
    "Op",
    "Tracker",
    "compiled_fill",
    "main",
    "operations",
    "plot",
    "quality",
]


if __name__ == "__main__":
    main()
