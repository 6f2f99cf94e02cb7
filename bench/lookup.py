"""Batch owner lookup: which server serves each of 10^7 random IPv4 sources.

Compared in the same run with (a) a raw numpy gather from a precomputed 2^16-entry
table indexed by the low 16 address bits (the practical limit of a table lookup
in numpy) and (b) a Maglev lookup (table[hash(addr) % 65537]) over the same 1000
servers. Each timing is repeated, interleaved, and the median taken.

Output: progress on stderr, then the result as one json object, the last line on stdout.
"""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

import _plots
from _baselines import MAGLEV_M, maglev_entry, maglev_lookup, maglev_table
from _common import emit, interleaved_medians, progress
from manycast.policy import equal_split
from manycast.space import AddressSpace

SERVERS = 1000
ADDRESSES = 10**7
REPEATS = 9
SAMPLE = 20_000


def plot(result: Mapping[str, Any], directory: Path) -> list[Path]:
    """Lookups per second of each method, and how evenly each spreads the space."""
    fig, axes = _plots.grid(
        f"Owner lookup of {result['addresses']:.0e} sources over {result['servers']} servers", 2
    )
    _plots.bars(
        axes[0],
        {
            "ours (owner_many)": result["owners_per_s"] / 1e6,
            "raw 2^16 gather": result["gather_per_s"] / 1e6,
            "Maglev": result["maglev_per_s"] / 1e6,
        },
        ylabel="million lookups / s",
        fmt="{:.1f}",
    )
    _plots.bars(
        axes[1],
        {
            "ours": result["balance_max_over_mean"],
            "Maglev": result["maglev_balance_max_over_mean"],
        },
        ylabel="largest share / mean share",
        fmt="{:.4f}",
    )
    _plots.reference(axes[1], 1.0, "perfect balance")
    axes[1].legend(fontsize=8)
    return [_plots.save(fig, directory, "lookup_rates")]


def main() -> None:
    args = _plots.arguments(__doc__)
    rng = np.random.default_rng(20240601)
    names = [f"s{i:04d}" for i in range(SERVERS)]
    space = AddressSpace.create()  # 0.0.0.0/0, 16 low-order index bits
    alloc = equal_split(space, names)
    addrs = rng.integers(0, 1 << 32, ADDRESSES, dtype=np.uint32)

    # (a) the table a hand-written lookup would use: owner by raw low 16 bits.
    field_table = alloc.owner_many(np.arange(1 << 16, dtype=np.uint32))
    # (b) Maglev over the same backends.
    start = time.perf_counter()
    maglev = maglev_table(names)
    maglev_build_s = time.perf_counter() - start
    progress(f"maglev table built in {maglev_build_s:.2f} s")

    # Correctness before speed.
    ours = alloc.owner_many(addrs)
    sample = rng.choice(ADDRESSES, SAMPLE, replace=False)
    owners_agree = all(alloc.servers[int(ours[i])] == alloc.owner(int(addrs[i])) for i in sample)
    gather_agrees = bool(np.array_equal(ours, field_table.take(addrs & 0xFFFF)))
    found = maglev_lookup(maglev, addrs)
    maglev_agrees = all(int(found[i]) == maglev[maglev_entry(int(addrs[i]))] for i in sample)
    if not (owners_agree and gather_agrees and maglev_agrees):
        raise SystemExit(f"lookup mismatch: {owners_agree=} {gather_agrees=} {maglev_agrees=}")
    del ours, found

    progress(f"timing {ADDRESSES:.0e} lookups, {REPEATS} interleaved repeats")
    medians = interleaved_medians(
        {
            "owners": lambda: alloc.owner_many(addrs),
            "gather": lambda: field_table.take(addrs & 0xFFFF),
            "maglev": lambda: maglev_lookup(maglev, addrs),
        },
        REPEATS,
    )
    rate = {name: ADDRESSES / seconds for name, seconds in medians.items()}
    for name, per_s in rate.items():
        progress(f"{name:>7}: {per_s / 1e6:8.1f} M lookups/s")

    counts = np.bincount(alloc.owners, minlength=SERVERS)
    maglev_counts = np.bincount(maglev, minlength=SERVERS)
    result = {
        "bench": "lookup",
        "servers": SERVERS,
        "addresses": ADDRESSES,
        "repeats": REPEATS,
        "space": str(space),
        "owners_per_s": round(rate["owners"]),
        "gather_per_s": round(rate["gather"]),
        "maglev_per_s": round(rate["maglev"]),
        "ratio_vs_gather": round(rate["owners"] / rate["gather"], 3),
        "ratio_vs_maglev": round(rate["owners"] / rate["maglev"], 3),
        "checked_sample": SAMPLE,
        "owners_agree_with_owner": owners_agree,
        "maglev_m": MAGLEV_M,
        "maglev_build_s": round(maglev_build_s, 3),
        "balance_max_over_mean": round(float(counts.max() / counts.mean()), 4),
        "maglev_balance_max_over_mean": round(float(maglev_counts.max() / maglev_counts.mean()), 4),
    }
    emit(result)
    _plots.write(result, args.plots, plot)


if __name__ == "__main__":
    main()
