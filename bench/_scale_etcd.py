"""bench/scale.py's etcd part: share-change and failover latency with the pool's state in
etcd (`coordination = "etcd"`) beside the channel coordination, on real sockets and time.

A real three-member etcd cluster on loopback (each member its own process, as
tests/etcdcluster.py starts it: 50 ms Raft heartbeats, 500 ms election timeout), and
pools of N servers (4 and 16 by default) on the overlay driver, in one process, in
the shape of the memory part (clients a1..a2N behind `ra`, a `core`, the servers
alternating between `rs1` and `rs2`), heartbeats every 100 ms for both. A round is
one pool's life: it starts and settles (every server alive in every view, every
router forwarding by the allocation), then
- two share changes, one after the other: `s2` set to twice its equal share, then
  back to it. Each is timed from the command until every router forwards by the new
  allocation: every live server holds it and serves all of its own portions in it
  (with etcd a gaining server waits for the others' hand-over first), and every
  router's membership for the group is exactly those portions, nobody else's;
- a failover: the last server (not the coordinator) is killed as a crash is: its
  node stops at once and its etcd session stops renewing without giving its lease
  back. Timed until every router forwards by an allocation without it, as above
  (its buckets all go to live servers and the dead one's membership is gone), and
  until the first live server holds such an allocation (`removed_s`).
One process hosts every server, router and etcd session of a pool (etcd's members
are processes of their own): `*_cpu_over_wall` says how much of the wall time of a
change or failover that process spent on a core, where a figure near 1 means the
time is that process's work, which servers on hosts of their own would share out.
Rounds of both coordinations and every size are run in one random order, so a burst
of load on the shared machine falls on either. Each outcome is checked every 5 ms
(the overlay's poll), the figures' resolution. Rounds stop being started once the
part has run `budget_s` (the JSON says how many ran).

Run alone, it prints one json object, its last line on stdout, naming the bench
to run (`_common.not_a_bench`).
"""

from __future__ import annotations

import _common  # isort: skip  # first: a missing package ends in the JSON line
import importlib
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from _common import progress
from _pool import PORT_SEARCH, table
from manycast.ports import free_base_port
from manycast.protocol.membership import SourceFilter
from manycast.protocol.server import Server
from manycast.runtime import PoolRun
from manycast.space import Allocation
from manycast.steps import Kill, SetShare
from manycast.topology import loads

TESTS = Path(__file__).resolve().parent.parent / "tests"

SIZES = (4, 16)
ROUNDS = 3  # per coordination and size
LEASE_S = 2  # each server's etcd lease (the default `lease_s`)
HEARTBEAT_MS = 100  # both coordinations (the default)
WAIT_S = 15.0  # the longest any outcome is waited for (normally well under 3 s)
GAP_S = 0.3  # between a round's steps
BUDGET_S = 110.0  # no round is started after this much of the part
COORDINATIONS = ("etcd", "channel")


def topology(n: int, coordination: str, name: str, endpoints: Sequence[str]) -> str:
    """clients a1..a2N -- ra -- core -- rs1 (odd servers) / rs2 (even servers)."""
    pool: dict[str, Any] = {"name": name, "group": "232.1.1.1", "heartbeat_ms": HEARTBEAT_MS}
    if coordination == "etcd":
        pool.update(coordination="etcd", etcd=list(endpoints), lease_s=LEASE_S)
    parts = [table("pool", array=False, **pool)]
    parts += [table("router", name=r) for r in ("ra", "core", "rs1", "rs2")]
    for a, b, delay in (("ra", "core", 2), ("core", "rs1", 1), ("core", "rs2", 3)):
        parts.append(table("link", between=[a, b], delay_ms=delay))
    for index in range(1, n + 1):
        parts.append(table("server", name=f"s{index}", router="rs1" if index % 2 else "rs2"))
    parts.append(table("clients", name="a", count=2 * n, router="ra", subnet="10.0.0.0/16"))
    parts.append(table("run", array=False, duration=3600.0))
    return "\n".join(parts)


class Forwarding:
    """Whether every router forwards by one allocation the live servers hold."""

    def __init__(self, run: PoolRun) -> None:
        self.run = run
        self.group = int(run.topology.pool.group)
        self._expected: tuple[Allocation, dict[str, SourceFilter]] | None = None

    def live(self) -> dict[str, Server]:
        dead = self.run.engine.dead
        return {n: s for n, s in self.run.nodes.servers.items() if n not in dead}

    def held(self) -> Allocation | None:
        """The allocation every live server holds (None while they differ)."""
        servers = list(self.live().values())
        if not servers or len({s.coordinator.view for s in servers}) != 1:
            return None
        return servers[0].coordinator.allocation

    def portions(self, allocation: Allocation) -> dict[str, SourceFilter]:
        """Each server's portions in `allocation` (computed once per allocation: the
        check runs every few milliseconds beside the pool)."""
        if self._expected is None or self._expected[0] is not allocation:
            filters = {
                name: SourceFilter.of(allocation.portions(name))
                for name in allocation.servers
                if allocation.count(name)
            }
            self._expected = (allocation, filters)
        return self._expected[1]

    def by(self, accept: Callable[[Allocation], bool]) -> bool:
        live = self.live()
        allocation = self.held()
        if allocation is None or not accept(allocation):
            return False
        if allocation.servers != tuple(sorted(live)):
            return False
        expected = self.portions(allocation)
        for name, server in live.items():
            want = expected.get(name)
            got = SourceFilter.of(server.portions) if server.portions else None
            if not same(got, want):
                return False
        by_origin = {int(live[name].address): f for name, f in expected.items()}
        for router in self.run.nodes.routers.values():
            members = router.members.get(self.group, {})
            if members.keys() != by_origin.keys():
                return False
            if not all(same(m.filter, by_origin[o]) for o, m in members.items()):
                return False
        return True

    def settled(self) -> bool:
        """Every configured server alive in every view, and forwarded to by its share."""
        names = sorted(self.run.nodes.servers)
        now = self.run.now
        return all(
            sorted(n for n in names if s.coordinator.holds_alive(n, now)) == names
            for s in self.live().values()
        ) and self.by(lambda a: a.servers == tuple(names))


def same(a: SourceFilter | None, b: SourceFilter | None) -> bool:
    if a is None or b is None:
        return a is b
    return set(a.include) == set(b.include) and set(a.exclude) == set(b.exclude)


def follow(run: PoolRun, view: Forwarding, accept: Callable[[Allocation], bool]) -> dict[str, Any]:
    """From now: seconds until the first live server holds an allocation `accept`ed
    (`held_s`), and until every router forwards by it (`routed_s`); None for one not
    seen within WAIT_S. `cpu_s`: this process's CPU time meanwhile (it hosts every
    server, router and etcd session of the pool)."""
    start, cpu = run.now, time.process_time()
    held: list[float] = []

    def routed() -> bool:
        if not held and any(
            s.coordinator.allocation is not None and accept(s.coordinator.allocation)
            for s in view.live().values()
        ):
            held.append(round(run.now - start, 4))
        return view.by(accept)

    done = run.network.run_until(start + WAIT_S, routed)
    return {
        "held_s": held[0] if held else None,
        "routed_s": round(run.now - start, 4) if done else None,
        "wall_s": run.now - start,
        "cpu_s": time.process_time() - cpu,
    }


def holding(server: str, share: Fraction) -> Callable[[Allocation], bool]:
    return lambda allocation: server in allocation.servers and allocation.share(server) == share


def cpu_over_wall(steps: Sequence[dict[str, Any]]) -> float:
    cpu = sum(float(s["cpu_s"]) for s in steps)
    wall = sum(float(s["wall_s"]) for s in steps)
    return round(cpu / max(wall, 1e-9), 2)


def one_round(coordination: str, n: int, index: int, endpoints: Sequence[str]) -> dict[str, Any]:
    name = f"r{index}.n{n}.scale.bench"
    topo = loads(topology(n, coordination, name, endpoints))
    base = free_base_port(topo.attachment_count, PORT_SEARCH)
    run = PoolRun(topo, "overlay", seed=index, base_port=base)
    view = Forwarding(run)
    out: dict[str, Any] = {"coordination": coordination, "n": n, "round": index}
    try:
        start = run.now
        if not run.network.run_until(start + WAIT_S, view.settled):
            out["error"] = f"the pool did not settle within {WAIT_S} s"
            return out
        out["settle_s"] = round(run.now - start, 4)
        engine = run.engine
        changes = []
        for share in (Fraction(2, n), Fraction(1, n)):
            run.network.run_until(run.now + GAP_S)
            engine.carry_out(SetShare(at=run.now, server="s2", share=share), run.now)
            changes.append(follow(run, view, holding("s2", share)))
        out["change_s"] = [c["routed_s"] for c in changes]
        out["change_held_s"] = [c["held_s"] for c in changes]
        out["change_cpu_over_wall"] = cpu_over_wall(changes)
        run.network.run_until(run.now + GAP_S)
        victim = f"s{n}"
        engine.carry_out(Kill(at=run.now, server=victim), run.now)
        failover = follow(run, view, lambda a: victim not in a.servers)
        out["failover_s"], out["removed_s"] = failover["routed_s"], failover["held_s"]
        out["failover_cpu_over_wall"] = cpu_over_wall([failover])
        return out
    finally:
        run.close()


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 4) if present else None


def ratio(top: float | None, base: float | None) -> float | None:
    return None if top is None or not base else round(top / base, 2)


def summary(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians per coordination over `rounds`, and etcd's over the channel's."""
    out: dict[str, Any] = {}
    for kind in COORDINATIONS:
        mine = [r for r in rounds if r["coordination"] == kind and "error" not in r]
        changes = [c for r in mine for c in r["change_s"]]
        failovers = [r["failover_s"] for r in mine]
        out[kind] = {
            "change_s_median": median(changes),
            "failover_s_median": median(failovers),
            "change_held_s_median": median([c for r in mine for c in r["change_held_s"]]),
            "removed_s_median": median([r["removed_s"] for r in mine]),
            "settle_s_median": median([r["settle_s"] for r in mine]),
            "change_cpu_over_wall_median": median([r["change_cpu_over_wall"] for r in mine]),
            "failover_cpu_over_wall_median": median([r["failover_cpu_over_wall"] for r in mine]),
            "changes": len(changes),
            "failovers": len(failovers),
            "timed_out": sum(v is None for v in [*changes, *failovers]),
        }
    for figure in ("change", "failover"):
        out[f"etcd_over_channel_{figure}"] = ratio(
            out["etcd"][f"{figure}_s_median"], out["channel"][f"{figure}_s_median"]
        )
    return out


def etcd_cluster() -> tuple[Any, str | None]:
    """tests/etcdcluster.py's cluster class, or why there is none to start."""
    if str(TESTS) not in sys.path:
        sys.path.append(str(TESTS))
    etcdcluster = importlib.import_module("etcdcluster")
    if etcdcluster.etcd_path() is None:
        return None, etcdcluster.ETCD_MISSING
    return etcdcluster.EtcdCluster, None


def run(
    sizes: Sequence[int] = SIZES, rounds: int = ROUNDS, seed: int = 0, budget_s: float = BUDGET_S
) -> dict[str, Any]:
    """The part's figures for the bench's JSON, or `{"skipped": reason}`."""
    cluster_class, missing = etcd_cluster()
    if missing is not None:
        progress(f"etcd part: skipped, {missing}")
        return {"skipped": missing}
    began = time.monotonic()
    plan = [(kind, n) for kind in COORDINATIONS for n in sizes for _ in range(rounds)]
    random.Random(seed).shuffle(plan)
    done: list[dict[str, Any]] = []
    with cluster_class(3) as cluster:
        started_s = round(time.monotonic() - began, 2)
        progress(f"etcd part: 3 etcd members up in {started_s} s; {len(plan)} rounds")
        for index, (kind, n) in enumerate(plan, start=1):
            if time.monotonic() - began > budget_s:
                progress(f"etcd part: {budget_s:.0f} s spent, {len(plan) - len(done)} rounds left")
                break
            result = one_round(kind, n, index, cluster.urls)
            progress(f"etcd part: {result}")
            done.append(result)
    by_n = {str(n): summary([r for r in done if r["n"] == n]) for n in sizes}
    return {
        **summary(done),
        "by_n": by_n,
        "rounds": done,
        "rounds_planned": len(plan),
        "errors": [r for r in done if "error" in r],
        "sizes": list(sizes),
        "lease_s": LEASE_S,
        "heartbeat_ms": HEARTBEAT_MS,
        "heartbeat_misses": 3,
        "etcd_members": 3,
        "etcd_election_timeout_ms": 500,
        "etcd_start_s": started_s,
        "poll_s": 0.005,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "wall_s": round(time.monotonic() - began, 1),
    }


if __name__ == "__main__":
    _common.not_a_bench(__file__, "bench/scale.py")
