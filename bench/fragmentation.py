"""How fragmented the allocation becomes under the soak's kinds of change.

From an equal split of 65 536 buckets among four servers, a seeded random sequence
of the changes the soak makes (docs/soak.md): a server killed and added back, a
share set to 5-40 %, a standby joining (two of them), and a rebalance as the pool's
coordinator asks for one, by the servers' loads and the 256 busiest buckets of the
busiest server (the buckets of 1000 clients, each a load of 1). Every 25 changes it
counts the allocation's runs of buckets with one owner and the value/mask portions
of all its servers (each portion is a pair in a server's join and in a router's
filter, built again at every change).

Ours hands each receiver of a rebalance its evenly loaded buckets as one stretch
(`policy._hand_over`). The baseline is the rule before it, the same buckets handed
out one by one, each to the server least loaded at that moment (the same buckets
move, with the same loads: only which receiver gets which differs). Each seed runs
both on the same sequence.

    .venv/bin/python bench/fragmentation.py [--steps 200] [--seeds 1,2,3] [--plots DIR]
"""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
import argparse
import contextlib
import random
import statistics
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

import _plots
from _common import ArgumentParser, progress, run_and_emit
from manycast import policy
from manycast.policy import Apportionment
from manycast.space import AddressSpace, Portion

SERVERS = ("s1", "s2", "s3", "s4")
STANDBYS = ("s5", "s6")
HOT_BUCKETS = 256  # what a congested server reports (protocol/server.py)
CLIENTS = 1000
EVERY = 25


def _one_by_one(owners: npt.NDArray[np.int32], given: list[tuple[float, int, int]]) -> None:
    """The baseline: each bucket to the receiver the greedy picked for it."""
    for _, receiver, bucket in given:
        owners[bucket] = receiver


@contextlib.contextmanager
def _method(name: str) -> Iterator[None]:
    if name == "stretches":
        yield
        return
    kept = policy._hand_over
    policy._hand_over = _one_by_one
    try:
        yield
    finally:
        policy._hand_over = kept


def _count(state: Apportionment) -> tuple[int, int]:
    alloc = state.allocation
    runs = sum(1 for _ in alloc.runs())
    return runs, sum(len(alloc.portions(s)) for s in alloc.servers)


def replay(seed: int, steps: int) -> list[tuple[int, int]]:
    """(runs, portions) after every EVERY changes of seed's sequence."""
    rng = random.Random(seed)
    space = AddressSpace(Portion.parse("10.0.0.0/8"))
    clients = np.array(sorted({rng.randrange(space.buckets) for _ in range(CLIENTS)}))
    state = Apportionment.split(space, dict.fromkeys(SERVERS, 1))
    standby = list(STANDBYS)
    counts = []
    for step in range(1, steps + 1):
        kind = rng.choice(("kill", "share", "rebalance", "join"))
        live = list(state.allocation.servers)
        if kind == "kill" and len(live) > 2:
            server = rng.choice(live)
            state = state.remove_server(server).add_server(server)
        elif kind == "share":
            state = state.set_share(rng.choice(live), rng.uniform(0.05, 0.4))
        elif kind == "rebalance":
            alloc = state.allocation
            owner = alloc.owners[clients]
            loads = {
                s: float((owner == i).sum()) * rng.uniform(0.5, 1.5)
                for i, s in enumerate(alloc.servers)
            }
            busiest = alloc.servers.index(max(loads, key=loads.__getitem__))
            hot = {int(b): 1.0 for b in clients[owner == busiest][:HOT_BUCKETS]}
            state = state.balance_loads(loads, 1.1, hot)
        elif kind == "join" and standby:
            state = state.add_server(standby.pop())
        if step % EVERY == 0:
            counts.append(_count(state))
    return counts


def run(args: argparse.Namespace) -> dict[str, Any]:
    per_seed: dict[str, dict[str, list[tuple[int, int]]]] = {}
    for seed in args.seeds:
        per_seed[str(seed)] = {}
        for name in ("stretches", "one_by_one"):
            progress(f"seed {seed}: {name}")
            with _method(name):
                per_seed[str(seed)][name] = replay(seed, args.steps)
    summary: dict[str, dict[str, Any]] = {}
    for name in ("stretches", "one_by_one"):
        every = [c for seed in per_seed.values() for c in seed[name]]
        summary[name] = {
            "runs_median": statistics.median(r for r, _ in every),
            "runs_range": [min(r for r, _ in every), max(r for r, _ in every)],
            "portions_median": statistics.median(p for _, p in every),
        }
    return {
        "bench": "fragmentation",
        "steps": args.steps,
        "seeds": args.seeds,
        "clients": CLIENTS,
        "counted_every": EVERY,
        "per_seed": per_seed,
        "summary": summary,
        "baseline": "one_by_one",
        "runs_ratio": round(
            summary["stretches"]["runs_median"] / summary["one_by_one"]["runs_median"], 3
        ),
        "portions_ratio": round(
            summary["stretches"]["portions_median"] / summary["one_by_one"]["portions_median"], 3
        ),
    }


def plot(result: Mapping[str, Any], directory: Path) -> list[Path]:
    """Runs of one owner after each EVERY changes, the median over the seeds."""
    fig, ax = _plots.figure("Runs of one owner under the soak's kinds of change")
    for i, name in enumerate(("stretches", "one_by_one")):
        seeds = [seed[name] for seed in result["per_seed"].values()]
        medians = [statistics.median(s[k][0] for s in seeds) for k in range(len(seeds[0]))]
        changes = [result["counted_every"] * (k + 1) for k in range(len(medians))]
        label = "ours (stretches)" if name == "stretches" else "one by one (before)"
        ax.plot(changes, medians, "o-", label=label, color=_plots.COLOURS[i])
    ax.set_xlabel("changes")
    ax.set_ylabel("runs (median over seeds)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    return [_plots.save(fig, directory, "fragmentation_runs")]


def _run_and_plot(args: argparse.Namespace) -> dict[str, Any]:
    result = run(args)
    _plots.write(result, args.plots, plot)
    return result


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds are integers, comma-separated: {text!r}") from None


def main() -> None:
    parser = ArgumentParser("fragmentation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="changes per seed")
    parser.add_argument(
        "--seeds",
        type=_seeds,
        default=[1, 2, 3],
        help="comma-separated seeds",
    )
    _plots.add_argument(parser)
    args = parser.parse_args()
    if args.steps < EVERY:
        parser.error(f"--steps must be at least {EVERY}")
    run_and_emit("fragmentation", lambda: _run_and_plot(args))


if __name__ == "__main__":
    main()
