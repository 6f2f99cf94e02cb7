"""What the allocator of a long-running pool process costs: CPU time and memory with
glibc's malloc (`PYTHONMALLOC=malloc`, what `manycast run` and the soak's pool
processes use) against CPython's default, pymalloc, the baseline.

Each round runs the soak's pool and seeded fault schedule (D by default) on the
memory driver, in virtual time, in a fresh interpreter under one allocator
(`_soak_replay`'s pool: servers, routers, coordination and clients in one process,
with the pool's heap trim every 30 s of its clock). Rounds alternate in random
order, so a burst of load on a shared machine falls on both. Per allocator, the
medians of CPU seconds for the run and of the resident anonymous memory's lowest
sample in the last three tenths of the run (the same work's memory). The headline
is the ratio malloc / pymalloc of CPU seconds: the price of a floor that does not
creep. The creep itself takes a half hour of the soak's processes to show, each
with its own bursts (docs/soak.md, finding 31); one process replaying the pool here
does not show it.

    .venv/bin/python bench/allocator.py [--rounds 3] [--seconds 900] [--per-lan 50]

Ends in one JSON object, its last line on stdout.
"""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import _plots
from _common import ArgumentParser, progress, run_and_emit

ALLOCATORS = ("pymalloc", "malloc")  # the baseline first
SEED = 20261201


def child(technique: str, seconds: float, per_lan: int) -> dict[str, Any]:
    """One round, in this interpreter: the replayed pool's CPU seconds and its
    anonymous RSS each tenth of the run (after the clients' lists are emptied, as the
    soak's clients process does, and a heap trim)."""
    from _proc_sample import resident
    from _soak_replay import scheduled_pool
    from manycast.drivers import heap

    run, _ = scheduled_pool(SEED, seconds, per_lan, technique)
    network = run.network
    began = time.process_time()
    anon: list[float] = []
    for tenth in range(1, 11):
        network.run_until(seconds * tenth / 10)
        for client in run.nodes.clients.values():
            stats = client.stats
            del stats.ok_times[:-1]
            for kept in (stats.latencies, stats.failures, stats.moves, stats.disruptions):
                kept.clear()
        heap.trim()
        got = resident(os.getpid())
        anon.append(got["rss_anon_mb"] if got else float("nan"))
    return {"cpu_s": round(time.process_time() - began, 2), "rss_anon_mb": anon}


def _round(allocator: str, args: Any) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--child",
        "--technique",
        args.technique,
        "--seconds",
        str(args.seconds),
        "--per-lan",
        str(args.per_lan),
    ]
    env = {**os.environ, "PYTHONMALLOC": allocator}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"a {allocator} round failed: {done.stderr.strip()[-800:]}")
    got: dict[str, Any] = json.loads(lines[-1])
    return got


def bench(args: Any) -> dict[str, Any]:
    order = [name for _ in range(args.rounds) for name in ALLOCATORS]
    random.Random(args.order_seed).shuffle(order)
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in ALLOCATORS}
    for i, allocator in enumerate(order, 1):
        progress(f"allocator: round {i}/{len(order)}, {allocator}")
        rounds[allocator].append(_round(allocator, args))
    per: dict[str, Any] = {}
    for name, runs in rounds.items():
        floors = [min(r["rss_anon_mb"][-3:]) for r in runs]
        per[name] = {
            "cpu_s_median": statistics.median(r["cpu_s"] for r in runs),
            "cpu_s": [r["cpu_s"] for r in runs],
            "rss_anon_floor_mb_median": round(statistics.median(floors), 2),
            "rss_anon_mb_by_tenth": [r["rss_anon_mb"] for r in runs],
        }
    base, other = per["pymalloc"], per["malloc"]
    return {
        "bench": "allocator",
        "baseline": "pymalloc (CPython's default allocator), same pool, schedule and seed",
        "technique": args.technique,
        "seconds": args.seconds,
        "clients": 2 * args.per_lan,
        "rounds": args.rounds,
        "order": order,
        "cpu_ratio_malloc_to_pymalloc": round(other["cpu_s_median"] / base["cpu_s_median"], 3),
        "rss_floor_ratio_malloc_to_pymalloc": round(
            other["rss_anon_floor_mb_median"] / base["rss_anon_floor_mb_median"], 3
        ),
        "allocators": per,
    }


def plot(result: Mapping[str, Any], directory: Path) -> list[Path]:
    """CPU seconds per round of each allocator, and the resident anonymous memory of
    each over the run (its first round)."""
    per = result["allocators"]
    fig, ax = _plots.figure("CPU seconds of the replayed pool, per round")
    _plots.per_round(ax, {name: per[name]["cpu_s"] for name in ALLOCATORS}, ylabel="CPU s")
    cpu = _plots.save(fig, directory, "allocator_cpu")
    fig, ax = _plots.figure("Resident anonymous memory over the run")
    for i, name in enumerate(ALLOCATORS):
        tenths = per[name]["rss_anon_mb_by_tenth"][0]
        at = [result["seconds"] * (k + 1) / len(tenths) for k in range(len(tenths))]
        ax.plot(at, tenths, "o-", label=name, color=_plots.COLOURS[i])
    ax.set_xlabel("virtual seconds")
    ax.set_ylabel("RSS, anonymous (MB)")
    ax.legend(fontsize=8)
    return [cpu, _plots.save(fig, directory, "allocator_rss")]


def main() -> None:
    parser = ArgumentParser("allocator", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per allocator (3)")
    parser.add_argument("--seconds", type=float, default=900.0, help="virtual seconds (900)")
    parser.add_argument("--per-lan", type=int, default=50, help="clients per LAN (50)")
    parser.add_argument("--technique", default="D", choices=("R2", "R3", "D"))
    parser.add_argument("--order-seed", type=int, default=1, help="seed of the rounds' order")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    _plots.add_argument(parser)
    args = parser.parse_args()
    for name in ("rounds", "per_lan"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.seconds < 60:
        parser.error("--seconds must be at least 60")
    if args.child:
        print(json.dumps(child(args.technique, args.seconds, args.per_lan)), flush=True)
        return

    def run() -> dict[str, Any]:
        result = bench(args)
        _plots.write(result, args.plots, plot)
        return result

    run_and_emit("allocator", run)


if __name__ == "__main__":
    main()
