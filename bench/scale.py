"""Cost curves of the control plane from 4 to 1024 servers, on the memory driver.

Each size N runs one pool on the virtual clock with the real routers, servers and
coordination: clients (2N of them, so active sources grow with the pool) behind an
edge router `ra`, a `core`, and the servers alternating between two edge routers
`rs1` and `rs2`, each server on its own link; one standby server. Heartbeats every
100 ms, dead after 3 missed (the defaults). Per N, in this order:

- idle: control messages each server sends and receives per second, with no change
  going on (the servers' own counters: every datagram on the control port);
- set share: `s2` is given twice its equal share; add: the standby starts and joins;
  death: the last server is killed (not the coordinator). For each change, the time
  until every router forwards by the new allocation (the allocation the pool's
  coordinator holds satisfies the change, every server in it has applied it, and
  every router's membership for the group is exactly the portions each server
  joined, with nobody else), and the control messages per server per second from
  the change until then;
- detection of the death: until the first live server's view counts the dead one
  dead, and until every live server's does;
- forwarding state at the end of the idle window: per router, the per-source
  forwarding entries for the group (the cache a packet of a new source fills) and
  the value/mask pairs of its membership, beside the active client sources and the
  portions of the allocation.

The growth exponent k of each figure (figure ~ N^k, least squares on log-log) is
printed and reported; the forwarding state also against sources and portions.

Wall time: with today's all-to-all heartbeats a pool of N servers delivers 10 N^2
control datagrams per virtual second (10^7 at N = 1024), so larger pools run shorter
idle windows and change timeouts (`virtual_s` per size says what ran). The same
multicast datagram reaches hundreds of servers as one bytes object; the bench
memoizes the pure decoders (IP header, UDP, control message) on those bytes so each
is parsed once (`manycast.sim.memoized_decoders`, which the simulator uses too),
which changes no outcome, only how long the run takes. `--max-n`
stops at a smaller size for a quick run. `--budget-s` (300 by default) skips a size
whose projected wall time (from the sizes run before it) would take the run past it:
the JSON then lists it under `skipped` and gives its figures as the fitted curves
project them, under `projected`, never as measured; `--budget-s 0` runs every size
(N = 1024 with all-to-all heartbeats: about 11 million events, 7 minutes or more of
one core).

Then the simulator part (bench/_scale_sim.py, under `sim` in the JSON): `manycast
sim`'s 1000-server preset (pool-1000: 10^6 modelled client addresses, 300 sample
clients; shares change, 100 servers die, 100 join) for 60 simulated seconds, its wall
time as `sim_1000_servers_wall_s` (goal <= 120) beside its report's figures;
`--skip-sim` leaves it out, `--sim-preset`/`--sim-duration` run another (the figure is
then null), `--sim-wall-limit` (900 s) stops a run that takes longer (null too).

Then, on real sockets and time, the etcd part (bench/_scale_etcd.py, under `etcd` in
the JSON): share-change and failover latency of pools of 4 and 16 servers on the
overlay with `coordination = "etcd"` (a three-member etcd cluster on loopback) beside
the same pools with the channel coordination, rounds interleaved; about a minute.
`{"skipped": reason}` where etcd is not installed, or with `--skip-etcd`.
Progress on stderr; one JSON object, the last line on stdout.

Its last line on stdout is one json object (`_common.run_and_emit`): the result,
or why it stopped (an error, a missing package, SIGTERM or Ctrl-C).
"""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
import argparse
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

import _plots
import _scale_etcd
import _scale_sim
from _common import progress, run_and_emit
from manycast.drivers.memory import MemoryNetwork
from manycast.protocol.membership import SourceFilter
from manycast.protocol.server import Server
from manycast.runtime import PoolRun
from manycast.sim import PoolShape, memoized_decoders, topology_text
from manycast.space import Allocation
from manycast.steps import Add, Kill, SetShare
from manycast.topology import loads

SIZES = (4, 16, 64, 256, 1024)
# The gossip membership (the pool's gentle control plane), then all-to-all heartbeats.
MEMBERSHIPS = ("swim", "heartbeat")
SEED = 20261201
BUDGET_S = 300.0  # wall seconds the default run may take
POLL = 0.005  # virtual seconds between checks of a change's progress
CLIENT_RATE = 2.0  # requests/s per client: every client is an active source in the window


@dataclass(frozen=True)
class Plan:
    """Virtual seconds a size runs: the idle window and how long a change may take."""

    idle: float
    patience: float
    gap: float = 0.1
    warm_up: float = 0.5


def plan_for(n: int, membership: str = "heartbeat") -> Plan:
    if n <= 64 or membership == "swim":  # probing: a constant cost per server at any N
        return Plan(idle=1.0, patience=3.0)
    if n <= 256:
        return Plan(idle=0.5, patience=2.0)
    return Plan(idle=0.2, patience=0.8, gap=0.02, warm_up=0.2)


# -- the pool ---------------------------------------------------------------------------
def topology(n: int, membership: str = "heartbeat") -> str:
    """clients a1..a2N -- ra -- core -- rs1 (odd servers) / rs2 (even servers)."""
    shape = PoolShape(
        servers=n,
        standby=1,
        server_routers=2,
        client_routers=1,
        sample_clients=2 * n,
        client_rate=CLIENT_RATE,
        client_subnet="10.0.0.0/12",
        client_uplink_ms=2,
        router_delays_ms=(1, 3),
        pool={"heartbeat_ms": 100, "heartbeat_misses": 3, "membership": membership},
    )
    return topology_text(shape)


class Pool:
    """One size's pool and the views the measurements need."""

    def __init__(self, n: int, seed: int, membership: str = "heartbeat") -> None:
        self.n = n
        self.run = PoolRun(loads(topology(n, membership)), "memory", seed)
        network = self.run.network
        assert isinstance(network, MemoryNetwork)
        self.network = network
        self.group = int(self.run.topology.pool.group)
        self.all_servers: dict[str, Server] = {
            **self.run.nodes.servers,
            **self.run.nodes.standby,
        }

    @property
    def now(self) -> float:
        return self.network.now

    def advance(self, until: float) -> None:
        self.network.run_until(until)

    def live(self) -> list[Server]:
        return [s for name, s in self.all_servers.items() if name in self.network.nodes]

    def messages(self) -> tuple[int, int]:
        """Control datagrams sent and received, summed over every server ever run."""
        sent = sum(s.stats.control_sent for s in self.all_servers.values())
        received = sum(s.stats.control_received for s in self.all_servers.values())
        return sent, received

    def reference(self) -> Server:
        """The live server with the smallest name: the coordinator, in a settled pool."""
        return min(self.live(), key=lambda s: s.name)

    def routed(self, allocation: Allocation) -> bool:
        """Every server of `allocation` applied it, and every router's membership for the
        group is exactly what those servers joined (nobody else, nothing more)."""
        view = (self.reference().coordinator.epoch, self.reference().coordinator.digest)
        expected: dict[int, SourceFilter] = {}
        for name in allocation.servers:
            server = self.all_servers[name]
            if name not in self.network.nodes:
                return False
            if (server.coordinator.epoch, server.coordinator.digest) != view:
                return False
            if server.portions is not None and len(server.portions):
                expected[int(server.address)] = SourceFilter.of(server.portions)
        for router in self.run.nodes.routers.values():
            members = router.members.get(self.group, {})
            if members.keys() != expected.keys():
                return False
            for origin, member in members.items():
                want = expected[origin]
                got = member.filter
                if set(got.include) != set(want.include) or set(got.exclude) != set(want.exclude):
                    return False
        return True

    def forwarding_state(self) -> dict[str, Any]:
        """Per router: per-source entries for the group and its membership's mask pairs;
        the active client sources; the allocation's portions."""
        entries, pairs = {}, {}
        for router in self.run.nodes.routers.values():
            entries[router.name] = len(router._mfc.get(self.group, {}))
            members = router.members.get(self.group, {}).values()
            pairs[router.name] = sum(len(m.filter.include) + len(m.filter.exclude) for m in members)
        allocation = self.reference().coordinator.allocation
        assert allocation is not None
        portions = sum(len(allocation.portions(s)) for s in allocation.servers)
        sources = sum(
            1 for c in self.run.nodes.clients.values() if c.stats.requests_ok or c.stats.connects
        )
        return {
            "entries_per_router": entries,
            "mask_pairs_per_router": pairs,
            "entries": max(entries.values()),
            "mask_pairs": max(pairs.values()),
            "active_sources": sources,
            "portions": portions,
        }


# -- one size ---------------------------------------------------------------------------
def per_server_rate(
    pool: Pool, before: tuple[int, int], after: tuple[int, int], seconds: float, servers: float
) -> dict[str, float]:
    sent = (after[0] - before[0]) / servers / seconds
    received = (after[1] - before[1]) / servers / seconds
    return {"sent": sent, "received": received, "total": sent + received}


def change(
    pool: Pool,
    name: str,
    act: Callable[[], None],
    accept: Callable[[Allocation], bool],
    patience: float,
    watch_death: str | None = None,
) -> dict[str, Any]:
    """Carry out one change and follow it until every router forwards by the new
    allocation (or `patience` runs out). With `watch_death`, also when each live
    server's view first counts that server dead."""
    start = pool.now
    servers_before = len(pool.live())
    counts = pool.messages()
    # Those whose view held the server alive (a newcomer of the gossip membership may
    # not have heard of it yet): their views are the ones that must change.
    watchers = {
        s.name
        for s in pool.live()
        if watch_death is not None and s.coordinator.holds_alive(watch_death, start)
    }
    act()
    detected: dict[str, float] = {}
    converged: float | None = None
    while pool.now < start + patience:
        pool.advance(pool.now + POLL)
        now = pool.now
        if watch_death is not None:
            for server in pool.live():
                if server.name not in watchers or server.name == watch_death:
                    continue
                if server.name not in detected and not server.coordinator.holds_alive(
                    watch_death, now
                ):
                    detected[server.name] = round(now - start, 6)
        allocation = pool.reference().coordinator.allocation
        watching = watch_death is not None and len(detected) < len(watchers) - 1
        if (
            converged is None
            and allocation is not None
            and accept(allocation)
            and pool.routed(allocation)
        ):
            converged = round(now - start, 6)
        if converged is not None and not watching:
            break
    elapsed = (converged if converged is not None else pool.now - start) or POLL
    servers = (servers_before + len(pool.live())) / 2
    rate = per_server_rate(pool, counts, pool.messages(), elapsed, servers)
    out: dict[str, Any] = {
        "change": name,
        "converged_s": converged,
        "msgs_per_server_per_s": rate,
        "msgs_per_server": rate["total"] * elapsed,
    }
    if watch_death is not None:
        out["detection_first_s"] = min(detected.values(), default=None)
        out["detection_all_s"] = (
            max(detected.values()) if len(detected) == len(watchers) - 1 else None
        )
    return out


def measure(n: int, seed: int, membership: str = "heartbeat") -> dict[str, Any]:
    plan = plan_for(n, membership)
    wall = time.perf_counter()
    cpu = time.process_time()
    pool = Pool(n, seed, membership)
    built_s = time.perf_counter() - wall
    pool.advance(plan.warm_up)
    counts = pool.messages()
    pool.advance(plan.warm_up + plan.idle)
    idle = per_server_rate(pool, counts, pool.messages(), plan.idle, n)
    state = pool.forwarding_state()
    engine = pool.run.engine
    target = Fraction(2, n) if n > 2 else Fraction(1, 2)
    standby, victim = f"s{n + 1}", f"s{n}"

    def step(kind: Callable[..., Any], **args: Any) -> Callable[[], None]:
        return lambda: engine.carry_out(kind(at=pool.now, **args), pool.now)

    changes = []
    changes.append(
        change(
            pool,
            "set_share",
            step(SetShare, server="s2", share=target),
            lambda a: "s2" in a.servers and a.share("s2") == target,
            plan.patience,
        )
    )
    pool.advance(pool.now + plan.gap)
    changes.append(
        change(
            pool,
            "add",
            step(Add, server=standby),
            lambda a: standby in a.servers and a.count(standby) > 0,
            plan.patience,
        )
    )
    pool.advance(pool.now + plan.gap)
    changes.append(
        change(
            pool,
            "death",
            step(Kill, server=victim),
            lambda a: victim not in a.servers,
            plan.patience,
            watch_death=victim,
        )
    )
    during_msgs = sum(c["msgs_per_server"] for c in changes)
    during_time = sum(c["converged_s"] or plan.patience for c in changes)
    death = changes[-1]
    return {
        "n": n,
        "membership": membership,
        "idle_msgs_per_server_per_s": idle,
        "change_msgs_per_server_per_s": during_msgs / during_time,
        "changes": changes,
        "converged_s": {c["change"]: c["converged_s"] for c in changes},
        "detection_first_s": death["detection_first_s"],
        "detection_all_s": death["detection_all_s"],
        "forwarding": state,
        "virtual_s": round(pool.now, 3),
        "plan": {"warm_up_s": plan.warm_up, "idle_s": plan.idle, "patience_s": plan.patience},
        "wall_s": round(time.perf_counter() - wall, 2),
        "build_s": round(built_s, 2),
        "cpu_s": round(time.process_time() - cpu, 2),
        "events": pool.network.events_processed,
    }


# -- curves -----------------------------------------------------------------------------
def exponent(xs: Sequence[float], ys: Sequence[float | None]) -> float | None:
    """k of y ~ x^k by least squares on log-log, over the points with positive values."""
    points = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None and y > 0 and x > 0]
    if len(points) < 2 or len({x for x, _ in points}) < 2:
        return None
    lx = np.log([x for x, _ in points])
    ly = np.log([y for _, y in points])
    slope = float(np.polyfit(lx, ly, 1)[0])
    return round(slope, 3)


def series(runs: Sequence[Mapping[str, Any]]) -> dict[str, list[float | None]]:
    """Every curve the bench fits, one value per size."""
    out: dict[str, list[float | None]] = {
        "idle_sent_per_server_per_s": [r["idle_msgs_per_server_per_s"]["sent"] for r in runs],
        "idle_received_per_server_per_s": [
            r["idle_msgs_per_server_per_s"]["received"] for r in runs
        ],
        "idle_msgs_per_server_per_s": [r["idle_msgs_per_server_per_s"]["total"] for r in runs],
        "change_msgs_per_server_per_s": [r["change_msgs_per_server_per_s"] for r in runs],
        "detection_first_s": [r["detection_first_s"] for r in runs],
        "detection_all_s": [r["detection_all_s"] for r in runs],
        "forwarding_entries": [r["forwarding"]["entries"] for r in runs],
        "membership_mask_pairs": [r["forwarding"]["mask_pairs"] for r in runs],
    }
    for kind in ("set_share", "add", "death"):
        out[f"converged_{kind}_s"] = [r["converged_s"][kind] for r in runs]
    return out


def exponents(runs: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    ns = [float(r["n"]) for r in runs]
    fitted = {f"{key}_vs_n": exponent(ns, values) for key, values in series(runs).items()}
    sources = [float(r["forwarding"]["active_sources"]) for r in runs]
    portions = [float(r["forwarding"]["portions"]) for r in runs]
    for key in ("entries", "mask_pairs"):
        values = [r["forwarding"][key] for r in runs]
        fitted[f"forwarding_{key}_vs_sources"] = exponent(sources, values)
        fitted[f"forwarding_{key}_vs_portions"] = exponent(portions, values)
    return fitted


def projected_figures(runs: Sequence[Mapping[str, Any]], sizes: Sequence[int]) -> dict[str, Any]:
    """For sizes skipped for time: each curve's value there by its fitted power law
    (not measured), and the 1024-over-16 ratios that follow from them."""
    if not sizes or len(runs) < 2:
        return {}
    ns = [float(r["n"]) for r in runs]
    out: dict[str, Any] = {}
    for key, values in series(runs).items():
        points = [(x, y) for x, y in zip(ns, values, strict=True) if y is not None and y > 0]
        if len(points) < 2:
            continue
        slope, intercept = np.polyfit(
            np.log([p[0] for p in points]), np.log([p[1] for p in points]), 1
        )
        for n in sizes:
            out.setdefault(str(n), {})[key] = round(
                float(np.exp(intercept + slope * math.log(n))), 4
            )
    by_n = {r["n"]: r for r in runs}
    top = out.get("1024")
    if top is not None and 16 in by_n:
        base = by_n[16]
        idle = top.get("idle_msgs_per_server_per_s")
        detection = top.get("detection_all_s")
        out["control_msgs_per_server_ratio_1024_over_16"] = (
            None if idle is None else round(idle / base["idle_msgs_per_server_per_s"]["total"], 3)
        )
        out["detection_ratio_1024_over_16"] = (
            None
            if detection is None or not base["detection_all_s"]
            else round(detection / base["detection_all_s"], 3)
        )
    return out


def ratio(runs: Sequence[Mapping[str, Any]], value: Callable[[Mapping[str, Any]], Any]) -> Any:
    by_n = {r["n"]: r for r in runs}
    if 1024 not in by_n or 16 not in by_n:
        return None
    top, base = value(by_n[1024]), value(by_n[16])
    if top is None or not base:
        return None
    return round(top / base, 3)


def table_lines(runs: Sequence[Mapping[str, Any]], fitted: Mapping[str, float | None]) -> str:
    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.3g}"

    rows = series(runs)
    header = f"{'figure':34}" + "".join(f"{'N=' + str(r['n']):>10}" for r in runs) + "   k (~N^k)"
    lines = [header]
    for key, values in rows.items():
        k = fitted.get(f"{key}_vs_n")
        lines.append(f"{key:34}" + "".join(f"{fmt(v):>10}" for v in values) + f"   {fmt(k)}")
    for key in ("active_sources", "portions"):
        values = [r["forwarding"][key] for r in runs]
        lines.append(f"{key:34}" + "".join(f"{fmt(v):>10}" for v in values))
    for key, k in fitted.items():
        if "_vs_sources" in key or "_vs_portions" in key:
            lines.append(f"{key:44} k = {fmt(k)}")
    return "\n".join(lines)


def projected_wall_s(done: Sequence[Mapping[str, Any]], n: int) -> float:
    """Wall seconds a pool of `n` would take, from the sizes already run: events per
    virtual second grow as N^k (k fitted on the last two sizes; 2 with one, as for
    all-to-all heartbeats), each costs what it cost at the last size, over the virtual
    time `n`'s plan runs (the changes as long as they took at the last size)."""
    last = done[-1]
    rate = [r["events"] / r["virtual_s"] for r in done]
    k = exponent([r["n"] for r in done[-2:]], rate[-2:]) if len(done) > 1 else None
    growth = (n / last["n"]) ** (2.0 if k is None else k)
    plan, last_plan = plan_for(n, last.get("membership", "heartbeat")), last["plan"]
    changes_s = last["virtual_s"] - last_plan["warm_up_s"] - last_plan["idle_s"]
    virtual = plan.warm_up + plan.idle + min(changes_s, 3 * plan.patience + 2 * plan.gap)
    per_event = last["wall_s"] / last["events"]
    return float(rate[-1] * growth * virtual * per_event)


def run(
    sizes: Sequence[int], seed: int, budget_s: float, membership: str = "heartbeat"
) -> dict[str, Any]:
    """Every size with one membership (under its wall-time budget)."""
    runs: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    spent = 0.0
    with memoized_decoders():
        for n in sizes:
            if len(runs) >= 2 and budget_s > 0:
                projected = projected_wall_s(runs, n)
                if spent + projected > budget_s:
                    progress(
                        f"N={n}: skipped, would take about {projected:.0f} s"
                        f" ({spent:.0f} s spent of a {budget_s:.0f} s budget; --budget-s 0 runs it)"
                    )
                    skipped.append({"n": n, "projected_wall_s": round(projected, 1)})
                    continue
            progress(f"N={n}, {membership}: running ({plan_for(n, membership)})")
            result = measure(n, seed, membership)
            spent += result["wall_s"]
            progress(
                f"N={n}: idle {result['idle_msgs_per_server_per_s']['total']:.1f} msgs/server/s,"
                f" converged {result['converged_s']},"
                f" detection {result['detection_all_s']}, wall {result['wall_s']} s"
            )
            runs.append(result)
    fitted = exponents(runs)
    progress(table_lines(runs, fitted))
    load = os.getloadavg()
    reduced = [
        f"N={r['n']}: warm-up {r['plan']['warm_up_s']} s, idle window {r['plan']['idle_s']} s,"
        f" change timeout {r['plan']['patience_s']} s (N <= 64: 0.5, 1.0 and 3.0 s)"
        for r in runs
        if plan_for(r["n"], membership) != plan_for(4)
    ]
    return {
        "bench": "scale",
        "membership": membership,
        "sizes": [r["n"] for r in runs],
        "runs": runs,
        "exponents": fitted,
        "control_msgs_per_server_ratio_1024_over_16": ratio(
            runs, lambda r: r["idle_msgs_per_server_per_s"]["total"]
        ),
        "change_msgs_per_server_ratio_1024_over_16": ratio(
            runs, lambda r: r["change_msgs_per_server_per_s"]
        ),
        "detection_ratio_1024_over_16": ratio(runs, lambda r: r["detection_all_s"]),
        "skipped": skipped,
        "projected": projected_figures(runs, [r["n"] for r in skipped]),
        "reduced_virtual_time": reduced,
        "decoders_memoized": True,
        "load_average": [round(x, 2) for x in load],
        "wall_s": round(sum(r["wall_s"] for r in runs), 1),
    }


# -- plots ------------------------------------------------------------------------------
def plot(result: Mapping[str, Any], directory: Path) -> list[Path]:
    """Log-log curves against N: control messages per server per second, the time a
    change takes and detection, and forwarding state against sources and portions."""
    runs = result["runs"]
    ns = [r["n"] for r in runs]
    rows = series(runs)
    fitted = result.get("exponents", {})
    panels = (
        (
            "control messages / server / s",
            (
                "idle_msgs_per_server_per_s",
                "idle_sent_per_server_per_s",
                "change_msgs_per_server_per_s",
            ),
        ),
        (
            "seconds",
            ("converged_set_share_s", "converged_add_s", "converged_death_s", "detection_all_s"),
        ),
        ("forwarding state", ("forwarding_entries", "membership_mask_pairs")),
    )
    fig, axes = _plots.grid(
        "Control-plane cost against pool size (log-log)", len(panels), width=14.0
    )
    for ax, (ylabel, keys) in zip(axes, panels, strict=True):
        for i, key in enumerate(keys):
            points = [(n, v) for n, v in zip(ns, rows[key], strict=True) if v]
            if not points:
                continue
            k = fitted.get(f"{key}_vs_n")
            label = key if k is None else f"{key} (k={k:.2f})"
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                "o-",
                label=label,
                color=_plots.COLOURS[i % len(_plots.COLOURS)],
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("servers N")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    paths = [_plots.save(fig, directory, "scale_curves")]
    fig, ax = _plots.figure("Forwarding state against sources and portions")
    sources = [r["forwarding"]["active_sources"] for r in runs]
    portions = [r["forwarding"]["portions"] for r in runs]
    for i, (label, xs, key) in enumerate(
        (
            ("per-source entries vs active sources", sources, "entries"),
            ("mask pairs vs portions", portions, "mask_pairs"),
        )
    ):
        ys = [r["forwarding"][key] for r in runs]
        ax.plot(xs, ys, "o-", label=label, color=_plots.COLOURS[i])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("active client sources / portions")
    ax.set_ylabel("router entries (largest router)")
    ax.legend(fontsize=8)
    paths.append(_plots.save(fig, directory, "scale_forwarding"))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--max-n", type=int, default=SIZES[-1], help="largest pool to run (default 1024)"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=BUDGET_S,
        help="skip a size whose projected wall time would take the run past this many"
        " seconds (0: run every size; default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument(
        "--membership",
        choices=("both", *MEMBERSHIPS),
        default="both",
        help="both (default): the curves of `swim` first (the JSON's top level), then"
        " those of `heartbeat` (under `heartbeat`); or one of them",
    )
    parser.add_argument(
        "--skip-etcd", action="store_true", help="leave the etcd part out (it runs on real time)"
    )
    parser.add_argument(
        "--skip-sim",
        action="store_true",
        help="leave the simulator part out (its goal is 2 minutes; see docs/sim.md)",
    )
    parser.add_argument(
        "--sim-preset",
        default=_scale_sim.PRESET,
        help="the simulator part's preset (default %(default)s; sim_1000_servers_wall_s is"
        " given for it alone)",
    )
    parser.add_argument(
        "--sim-duration",
        type=float,
        default=_scale_sim.DURATION_S,
        help="the simulator part's simulated seconds (default %(default)s)",
    )
    parser.add_argument(
        "--sim-wall-limit",
        type=float,
        default=_scale_sim.WALL_LIMIT_S,
        help="stop the simulator part after this many wall seconds (default %(default)s)",
    )
    parser.add_argument(
        "--etcd-sizes",
        type=int,
        nargs="+",
        default=list(_scale_etcd.SIZES),
        help="the etcd part's pool sizes (default %(default)s)",
    )
    parser.add_argument(
        "--etcd-rounds",
        type=int,
        default=_scale_etcd.ROUNDS,
        help="the etcd part's rounds per coordination and size (default %(default)s)",
    )
    _plots.add_argument(parser)
    args = parser.parse_args()
    sizes = [n for n in SIZES if n <= args.max_n]
    if not sizes:
        parser.error(f"--max-n must be at least {SIZES[0]}")
    if min(args.etcd_sizes) < 3 or args.etcd_rounds < 1:
        parser.error("--etcd-sizes must be at least 3 (s2 changes share, the last one dies)")
    holder: list[dict[str, Any]] = []

    def go() -> dict[str, Any]:
        memberships = MEMBERSHIPS if args.membership == "both" else (args.membership,)
        result = run(sizes, args.seed, args.budget_s, memberships[0])
        for other in memberships[1:]:
            result[other] = run(sizes, args.seed, args.budget_s, other)
        result["sim"] = (
            {"skipped": "--skip-sim"}
            if args.skip_sim
            else _scale_sim.run(args.sim_preset, args.sim_duration, args.sim_wall_limit)
        )
        result["sim_1000_servers_wall_s"] = _scale_sim.wall_of_1000_servers(result["sim"])
        result["etcd"] = (
            {"skipped": "--skip-etcd"}
            if args.skip_etcd
            else _scale_etcd.run(args.etcd_sizes, args.etcd_rounds, args.seed)
        )
        holder.append(result)
        return result

    run_and_emit("scale", go)
    _plots.write(holder[0], args.plots, plot)


if __name__ == "__main__":
    main()
