"""bench/kernel.py's run over one family or both: each family's lab built the same way,
then every step taken by both labs in a random order per round, so that neither family
is always measured second (on a shared machine, the later moment is another load).

`FamilyRun` carries one family's lab through the steps; `measure_families` interleaves
them: the labs are built (in a random order), warmed by the 1- and 2-generator
intervals, then each throughput round runs both families one after the other in a
shuffled order (each with its kinds shuffled), then the 100 000 sources at scale,
then the first packets in blocks, again in a shuffled family order per block. Each
block's first sample per kind is sent and discarded for both families alike (the
plane was just switched). An IPv6 run that fails leaves the IPv4 figures standing:
its lab is taken down and the other carries on.

Run alone, its last stdout line is one json object naming the bench to run
(`_common.not_a_bench`): bench/kernel.py."""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
import argparse
import contextlib
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

from _common import progress
from _kernel_first import at_scale, check_entries, check_plane, first_packets, install_sources
from _kernel_setup import FAMILIES, FRESH_SOURCE, HOSTS, SCALE_PER_HOST, Family, KernelBench

FIRST_KINDS = ("manycast", "manycast_portions", "nftables")
FIRST_BLOCK = 50  # first-packet samples per kind per block (--quick: 20)
FIRST_DISCARDED = 1  # sent at the start of each block and kind, not counted


def prepare(bench: KernelBench) -> dict[str, Any]:
    """Servers agreed, every source's MFC entry installed and checked, the portion
    plane checked, the generators started."""
    facts = bench.prepare()
    facts.update(install_sources(bench, {h: bench.sources(h) for h in HOSTS}))
    facts.update(check_entries(bench))
    progress(
        f"{facts['entries_at_owner']} MFC entries toward their owner,"
        f" {facts['entries_elsewhere']} elsewhere, installed in {facts['install_all_seconds']} s"
    )
    if facts["entries_elsewhere"] or facts["entries_at_owner"] < len(bench.owner):
        raise RuntimeError(f"the MFC does not send every source to its owner: {facts}")
    facts.update(check_plane(bench))
    progress(
        f"portion plane: {facts['portion_entries']} entries ({facts['portion_elements_in_kernel']}"
        f" in the kernel) for {facts['portions']} portions, {facts['portion_entries_at_owner']}"
        " toward their owner"
    )
    if facts["portion_entries_elsewhere"] or facts["portion_entries_at_owner"] != facts["portions"]:
        raise RuntimeError(f"the portion plane does not send every portion to its owner: {facts}")
    bench.start_generators()
    return facts


class FamilyRun:
    """One family's lab (namespaces `<family.prefix>-*`) through the measurement."""

    def __init__(self, family: Family, root: Path, args: argparse.Namespace) -> None:
        from manycast.lab import Lab

        self.family, self.args = family, args
        self.seconds = 1.0 if args.quick else 2.0
        self.directory = root / f"ipv{family.version}"
        self.directory.mkdir()
        self.lab = Lab(prefix=family.prefix, run_root=root)
        self.bench: KernelBench | None = None
        self.per_kind: dict[str, list[dict[str, Any]]] = {k: [] for k in family.kinds}
        self.orders: list[list[str]] = []
        self.scaling: dict[str, dict[str, int]] = {}
        self.facts: dict[str, Any] = {}
        self.first: dict[str, dict[str, Any]] = {
            k: {
                "delivered_us": [],
                "install_us": [],
                "install_us_unpreempted": [],
                "install_us_blocks": [],
                "upcalls": 0,
            }
            for k in FIRST_KINDS
        }
        self.daemon0: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return f"IPv{self.family.version}"

    def up(self) -> None:
        self.lab.down()  # a crashed run's namespaces of this prefix, if any
        progress(f"bench/kernel.py: {self.name}: bringing the lab up (router, 4 servers, 2 LANs)")
        topology = self.lab.up(
            self.family.topology, "bench-kernel", start_servers=False, plane="mfc"
        )
        self.bench = KernelBench(self.lab, topology, self.directory, self.family)
        self.facts.update(prepare(self.bench))

    def _bench(self) -> KernelBench:
        if self.bench is None:
            raise RuntimeError(f"the {self.name} lab is not up")
        return self.bench

    def warm(self) -> None:
        """The 1- and 2-generator intervals of both planes (also the rounds' warm-up)."""
        bench = self._bench()
        for kind in ("manycast", "manycast_portions"):
            for some in (HOSTS[:1], HOSTS):
                got = bench.interval(kind, self.seconds, some)
                self.scaling.setdefault(kind, {})[str(len(some))] = round(got["delivered_pps"])
                progress(f"{self.name} {kind} from {len(some)} generator(s): {describe(got)}")
        self.daemon0 = self.lab.ask("r", "router", {"op": "status"})["daemon"]

    def round(self, rng: random.Random, number: int, rounds: int) -> None:
        bench = self._bench()
        order = list(self.family.kinds)
        rng.shuffle(order)
        self.orders.append(order)
        progress(f"{self.name} round {number}/{rounds}:")
        for kind in order:
            got = bench.interval(kind, self.seconds)
            self.per_kind[kind].append(got)
            progress(f"  {kind:22s} {describe(got)}")

    def after_rounds(self) -> None:
        """The daemon's counters over the rounds, the sink's share, the profile; the
        generators stopped."""
        bench = self._bench()
        daemon1 = self.lab.ask("r", "router", {"op": "status"})["daemon"]
        self.facts["entries_rewritten_during_rounds"] = daemon1["rewritten"] - self.daemon0.get(
            "rewritten", 0
        )
        self.facts["upcalls_during_rounds"] = daemon1["upcalls"] - self.daemon0.get("upcalls", 0)
        self.facts["servers_sunk_share"] = bench.sunk_share()
        if self.args.profile:
            if shutil.which("perf") is None:
                self.facts["events_per_packet"] = "perf is not installed"
            else:
                counts = {k: bench.event_counts(k, self.seconds) for k in self.family.kinds}
                self.facts["events_per_packet"] = counts
                for kind, got in counts.items():
                    progress(f"{self.name} events per packet in the router's thread, {kind}: {got}")
        bench.close()

    def at_scale(self, per_host: int) -> None:
        progress(f"{self.name}:")
        self.facts["at_scale"] = at_scale(self._bench(), per_host)

    def first_block(self, block: int, size: int) -> None:
        """`size` fresh sources per kind (after FIRST_DISCARDED more), one at a time."""
        bench = self._bench()
        for kind in FIRST_KINDS:
            start = FRESH_SOURCE[kind] + block * (size + FIRST_DISCARDED)
            got = first_packets(bench, kind, size + FIRST_DISCARDED, start, FIRST_DISCARDED)
            into = self.first[kind]
            into["delivered_us"] += got["delivered_us"]
            into["install_us"] += got["install_us"]
            into["install_us_unpreempted"] += got["install_us_unpreempted"]
            into["install_us_blocks"].append(got["install_us"])
            into["upcalls"] += got["upcalls"]
            into["sent"] = into.get("sent", 0) + got["sent"]

    def down(self) -> None:
        if self.bench is not None:
            self.bench.close()
        self.lab.down()


def describe(got: dict[str, Any]) -> str:
    from _kernel_setup import ROUTER_CPU

    return (
        f"{got['delivered_pps']:>9,.0f} pps delivered (offered {got['offered_pps']:,.0f}, "
        f"dropped at the router {got['dropped_pps']:,.0f}; router thread "
        f"{got['router_thread_cpu_share']:.2f} of CPU {ROUTER_CPU}, "
        f"{got['router_thread_ns_per_packet']:,.0f} ns/packet; "
        f"generators {got['generator_cpu_share']:.2f})"
    )


class Runs:
    """The families' runs, each step taken by every live run in a shuffled order; a
    failure of IPv6 beside IPv4 is recorded and its lab taken down, any other raised."""

    def __init__(self, runs: dict[int, FamilyRun], rng: random.Random) -> None:
        self.runs, self.rng = runs, rng
        self.errors: dict[int, str] = {}
        self.round_orders: list[list[int]] = []  # the families' order in each round
        self.block_orders: list[list[int]] = []  # and in each block of first packets

    def live(self) -> list[int]:
        return [v for v in self.runs if v not in self.errors]

    def each(self, step: str, *args: Any, orders: list[list[int]] | None = None) -> None:
        order = self.live()
        self.rng.shuffle(order)
        if orders is not None:
            orders.append(order)
        for version in order:
            run = self.runs[version]
            try:
                getattr(run, step)(*args)
            except Exception as exc:
                if version == 4 or len(self.runs) == 1:
                    raise
                self.errors[version] = f"{type(exc).__name__}: {exc}"
                progress(f"{run.name} failed ({self.errors[version]}); IPv4 carries on")
                with contextlib.suppress(Exception):
                    run.down()


def measure_families(
    args: argparse.Namespace, versions: tuple[int, ...], rng: random.Random, root: Path
) -> Runs:
    """Every family of `versions` measured, step by step in shuffled orders (module
    docstring); the labs are down at the end, whatever happens."""
    rounds = args.rounds or (3 if args.quick else 7)
    samples = 60 if args.quick else 300
    block = 20 if args.quick else FIRST_BLOCK
    per_host = 10_000 if args.quick else SCALE_PER_HOST
    began, load_start = time.monotonic(), round(os.getloadavg()[0], 2)
    runs = Runs({}, rng)
    try:
        for version in versions:
            runs.runs[version] = FamilyRun(FAMILIES[version], root, args)
        runs.each("up")
        runs.each("warm")
        for number in range(1, rounds + 1):
            runs.each("round", rng, number, rounds, orders=runs.round_orders)
        runs.each("after_rounds")
        runs.each("at_scale", per_host)
        blocks = max(1, samples // block)
        progress(f"first packets: {blocks} blocks of {block} fresh sources per kind, one at a time")
        for number in range(blocks):
            runs.each("first_block", number, block, orders=runs.block_orders)
    finally:
        for run in runs.runs.values():
            with contextlib.suppress(Exception):
                run.down()
    window = {
        "rounds": rounds,
        "seconds_per_interval": 1.0 if args.quick else 2.0,
        "loadavg_1min_start_end": [load_start, round(os.getloadavg()[0], 2)],
        "seconds": round(time.monotonic() - began, 1),
    }
    for run in runs.runs.values():
        run.facts.update(window)
        if run.family.not_measured:
            run.facts["not_measured"] = dict(run.family.not_measured)
    return runs


if __name__ == "__main__":
    from _common import not_a_bench

    not_a_bench(__file__, "bench/kernel.py")
