"""Failover as clients see it: a server SIGKILLed under load, beside keepalived.

The pool (`_pool.two_router_pool`: two edge routers, four servers) carries 1000
sessions (500 clients on each edge at 0.1 requests/s) and, beside them, probe
clients that send a request every `1 / PROBE_RATE` s (so that a client's own
pacing adds little to what it sees). The probes are interactive clients: while a
request is unanswered they resend it at a steady interval (the RTO, 50 ms here) for
six timeouts before backing off (`thin_stream`, Linux's tcp_thin_linear_timeouts),
as the anchor's clients send a request every interval whatever happened to the last.
Beside them, fewer probes with plain exponential backoff (`backoff_probe_clients_s`)
show what a client without that option sees. Heartbeats every 50 ms, dead after 3 missed.
The server s3 runs alone in a `manycast run --nodes s3` process, the clients in a
process of their own, the routers and the other servers here. Once the clients
have been running WARM_S (all connected and answered: a run reports probes not
answered in the second before the kill, which would measure their start instead)
and the pool is stable, s3's process gets SIGKILL; then, every 5 ms:

- `committed_s`: until a server here adopted the allocation without s3 (detection
  and the commit);
- `covered_s`: until both edge routers send every run of buckets s3 held (and
  each of its clients' addresses) to a live server;
- `clean_s`: until no router holds s3's membership any more (the coordinator's
  signed `MemberDown` notice; without it, the 3.5 report-interval hold time);
- `clients_s`: until every probe client s3 served was answered for a request it
  sent after the kill (the client's view, as the anchor measures it); the same for
  the backoff probes (`backoff_clients_s`); beside it
  the same for the 1000 sessions' clients (`sessions_clients_s`, which includes
  up to 2 s of their own pacing).

Ten runs; medians and nearest-rank p95. In the same command, as root with
keepalived installed (`make lab-deps`), the anchor: keepalived VRRPv3 at its
fastest advert interval in namespaces (`vrrp_anchor.py`), its clients paced like
the probes, measured the same way; `clients_s_over_vrrp` is our median over its.
Progress on stderr; one JSON object, the last line on stdout.
"""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
import argparse
import multiprocessing
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import _plots
import vrrp_anchor
from _common import progress, run_and_emit
from _pool import (
    PORT_SEARCH,
    host_pool,
    median,
    node_command,
    percentile,
    table,
    two_router_pool,
)
from manycast.ports import free_base_port
from manycast.runtime import PoolRun
from manycast.topology import loads

SEED = 20261130
RUNS = 10
SESSION_CLIENTS_PER_LAN = 500
SESSION_RATE = 0.1  # 1000 sessions held open, 100 requests/s between them
PROBES_PER_LAN = 20
BACKOFF_PROBES_PER_LAN = 10  # probes without thin_stream, for comparison
PROBE_RATE = 10.0  # requests/s: one every 100 ms
PROBE_S = 0.005
LIMIT_S = 8.0  # after the kill: a figure not reached by then is null
CLIENTS_S = 30.0  # how long the clients run: the pool settles, then the kill and LIMIT_S
STABLE_S = 1.0
WARM_S = 10.0  # bench time before the kill: every client connected and answered by then
VICTIM = "s3"
HEARTBEAT_MS, HEARTBEAT_MISSES, REPORT_INTERVAL_MS = 50, 3, 1000  # 100 ms is the default


# client group -> (edge router, subnet, thin_stream)
PROBE_GROUPS = {
    "p": ("ra", "10.3.0.0/16", True),
    "q": ("rb", "10.4.0.0/16", True),
    "x": ("ra", "10.5.0.0/16", False),
    "y": ("rb", "10.6.0.0/16", False),
}


def is_probe(name: str, thin: bool | None = None) -> bool:
    group = PROBE_GROUPS.get(name[0])
    return group is not None and (thin is None or group[2] == thin)


def pool_text(sessions_per_lan: int, probes_per_lan: int, heartbeat_ms: int) -> str:
    text = two_router_pool(
        technique="R1",
        clients_per_lan=sessions_per_lan,
        rate=SESSION_RATE,
        duration=60.0,
        heartbeat_ms=heartbeat_ms,
        heartbeat_misses=HEARTBEAT_MISSES,
        report_interval_ms=REPORT_INTERVAL_MS,
    )
    probes = [
        table(
            "clients",
            name=name,
            count=probes_per_lan if thin else BACKOFF_PROBES_PER_LAN,
            router=router,
            subnet=subnet,
            rate=PROBE_RATE,
            delay_ms=0,
            thin_stream=thin,
        )
        for name, (router, subnet, thin) in PROBE_GROUPS.items()
    ]
    head, run = text.rsplit("[run]", 1)
    return head + "\n".join(probes) + "\n[run]" + run


def probes_for(allocation: Any, server: str) -> list[int]:
    """One source address per run of buckets `server` holds (its first bucket)."""
    space = allocation.space
    return [space.block(a, 1).value for a, _, owner in allocation.runs() if owner == server]


def matched(router: Any, group: int, source: int) -> set[int]:
    members = router.members.get(group, {})
    return {origin for origin, m in members.items() if m.filter.matches(source)}


def since(at: float | None, t: float) -> float | None:
    return None if at is None else round(at - t, 4)


def wait_stable(run: PoolRun, victim_address: int, group: int) -> Any:
    """Every server here agrees on one allocation in which the victim serves, it is
    alive to all, both routers send its sources to it, and nothing changed for
    STABLE_S: the allocation."""
    net, servers = run.network, run.nodes.servers
    routers = list(run.nodes.routers.values())
    stable_since, view = None, None
    deadline = net.now + 30.0
    while True:
        net.run_until(net.now + 0.05)
        if net.now > deadline:
            raise RuntimeError(f"the pool did not settle with {VICTIM} serving")
        now = net.now
        views = {(s.coordinator.epoch, s.coordinator.digest) for s in servers.values()}
        allocation = next(iter(servers.values())).coordinator.allocation
        ready = (
            len(views) == 1
            and allocation is not None
            and VICTIM in allocation.servers
            and allocation.count(VICTIM) > 0
            and all(VICTIM in s.coordinator.alive(now) for s in servers.values())
        )
        if ready:
            probes = probes_for(allocation, VICTIM)
            ready = all(victim_address in matched(r, group, p) for r in routers for p in probes)
        if not ready:
            stable_since = None
        elif views != view or stable_since is None:
            view, stable_since = views, now
        elif now - stable_since >= STABLE_S:
            return allocation


def _clients_child(conn: Connection, text: str, base: int, duration: float, seed: int) -> None:
    """The clients' process: every client's answers, in bench time."""
    names = sorted(loads(text).clients)

    def collect(run: PoolRun, offset: float) -> dict[str, Any]:
        return {
            name: (
                [t - offset for t in run.nodes.clients[name].stats.ok_times],
                list(run.nodes.clients[name].stats.latencies),
            )
            for name in names
        }

    host_pool(conn, text, set(names), base, seed, duration, "clients", lambda *_: None, collect)


def _expect(conn: Connection, what: str, wait: float) -> Any:
    if not conn.poll(wait):
        raise RuntimeError(f"the clients' process: no {what!r} within {wait:.0f} s")
    message, payload = conn.recv()
    if message != what:
        raise RuntimeError(f"the clients' process: {message} {payload}")
    return payload


def answered_after(answers: tuple[list[float], list[float]], t: float) -> float | None:
    """When the first request sent after `t` was answered."""
    for ok, latency in zip(*answers, strict=True):
        if ok - latency > t:
            return ok
    return None


def once(index: int, path: Path, text: str) -> dict[str, Any]:
    """One kill. Three processes: the clients, the victim, and here the routers and the
    other servers (whose state the bench reads every PROBE_S)."""
    topo = loads(text)
    base = free_base_port(topo.attachment_count, PORT_SEARCH)
    clients = set(topo.clients)
    local = set(topo.interfaces) - {VICTIM} - clients
    seed = SEED + index
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(
        target=_clients_child,
        args=(child, text, base, CLIENTS_S, seed),
        name="clients",
        daemon=True,
    )
    process.start()
    child.close()
    run = PoolRun(topo, "overlay", seed=seed, base_port=base, local=local)
    net = run.network
    group = int(topo.pool.group)
    victim_address = int(topo.address(VICTIM))
    routers = list(run.nodes.routers.values())
    servers = run.nodes.servers
    command = [*node_command(path, VICTIM, base, CLIENTS_S + 5, seed), "--json"]
    victim = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _expect(parent, "built", 120)
        start = time.monotonic() + 0.2
        parent.send(("go", start))
        net.run_until(0.05)
        # The clients connect over their first seconds: kill only once they are served.
        while time.monotonic() - start < WARM_S:
            net.run_until(net.now + 0.05)
        allocation = wait_stable(run, victim_address, group)
        sources = probes_for(allocation, VICTIM)
        mine = sorted(n for n in clients if allocation.owner(topo.address(n)) == VICTIM)
        # The probes' addresses, not the sessions': matching hundreds of sources every
        # PROBE_S would take this process's time from the routers and servers it hosts.
        sources += [int(topo.address(n)) for n in mine if is_probe(n)]
        live = {int(s.address) for s in servers.values()}
        killed, killed_bench = net.now, time.monotonic() - start
        if killed_bench + LIMIT_S > CLIENTS_S:
            raise RuntimeError(f"the pool settled too late ({killed_bench:.1f} s) to measure")
        os.kill(victim.pid, signal.SIGKILL)
        covered_at = clean_at = None
        while net.now - killed < LIMIT_S and (covered_at is None or clean_at is None):
            net.run_until(net.now + PROBE_S)
            seen = [matched(r, group, p) for r in routers for p in sources]
            if covered_at is None and all(m & live for m in seen):
                covered_at = net.now
            if clean_at is None and all(m and m <= live for m in seen):
                clean_at = net.now
        # The pool's decision: the first allocation any server here adopted after the kill.
        adopted = [t for s in servers.values() for t, _, _ in s.coordinator.changes if t > killed]
        committed_at = min(adopted, default=None)
        net.run_until(net.now + max(0.0, start + CLIENTS_S - time.monotonic()))
        answers = _expect(parent, "done", 60)
        probes = [n for n in mine if is_probe(n, thin=True)]
        per_probe = [answered_after(answers[n], killed_bench) for n in probes]
        backoff = [n for n in mine if is_probe(n, thin=False)]
        per_backoff = [answered_after(answers[n], killed_bench) for n in backoff]
        # A probe not answered in the second before the kill was not yet served: the
        # run would measure its start, not the failover.
        warm_since = killed_bench - 1.0
        cold = [n for n in probes if not any(warm_since < t < killed_bench for t in answers[n][0])]
        per_session = [answered_after(answers[n], killed_bench) for n in mine if not is_probe(n)]
        return {
            "run": index + 1,
            "killed_at_s": round(killed_bench, 3),  # bench time (the clients' clock, shifted)
            "victim_share": float(allocation.share(VICTIM)),
            "victim_probes": len(probes),
            "victim_probes_not_answered_before_kill": len(cold),
            "victim_sessions": len(per_session),
            "committed_s": since(committed_at, killed),
            "covered_s": since(covered_at, killed),
            "clean_s": since(clean_at, killed),
            "clients_s": None if None in per_probe else since(max(per_probe), killed_bench),  # type: ignore[type-var]
            "probe_clients_s": [since(t, killed_bench) for t in per_probe],
            "victim_backoff_probes": len(backoff),
            "backoff_clients_s": None
            if None in per_backoff or not backoff
            else since(max(per_backoff), killed_bench),  # type: ignore[type-var]
            "sessions_clients_s": None
            if None in per_session
            else since(max(per_session), killed_bench),  # type: ignore[type-var]
            "deaths_told": sum(s.stats.deaths_told for s in servers.values()),
            "members_down": sum(r.stats.members_down for r in routers),
        }
    finally:
        net.close()
        if victim.poll() is None:
            victim.kill()
        victim.wait(10)
        process.join(5)
        if process.is_alive():
            process.terminate()
            process.join(5)
        parent.close()


def summarise(values: list[float | None]) -> dict[str, float | None]:
    known = [v for v in values if v is not None]
    if len(known) < len(values):
        return {"median": None, "p95": None}
    return {"median": median(known), "p95": percentile(known, 95)}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    began = time.monotonic()
    load_start = round(os.getloadavg()[0], 2)
    text = pool_text(args.sessions_per_lan, PROBES_PER_LAN, args.heartbeat_ms)
    runs = []
    with tempfile.TemporaryDirectory(prefix="manycast-failover-") as tmp:
        path = Path(tmp) / "failover.toml"
        path.write_text(text)
        for index in range(args.runs):
            one = once(index, path, text)
            progress(
                f"run {index + 1}/{args.runs}: covered {one['covered_s']} s, routers clean "
                f"{one['clean_s']} s, probes answered {one['clients_s']} s (with backoff "
                f"{one['backoff_clients_s']} s), sessions "
                f"{one['sessions_clients_s']} s ({one['victim_probes']} probes, "
                f"{one['victim_sessions']} sessions of {VICTIM})"
            )
            runs.append(one)
    ours = summarise([r["clients_s"] for r in runs])
    result: dict[str, Any] = {
        "bench": "failover",
        "sessions": 2 * args.sessions_per_lan,
        "session_rate": SESSION_RATE,
        "probe_clients": 2 * PROBES_PER_LAN,
        "probe_retransmission": "thin_stream: the RTO kept for 6 timeouts, then doubled",
        "backoff_probe_clients": 2 * BACKOFF_PROBES_PER_LAN,
        "probe_interval_s": round(1 / PROBE_RATE, 4),
        "heartbeat_ms": args.heartbeat_ms,
        "heartbeat_misses": HEARTBEAT_MISSES,
        "runs": len(runs),
        "failover_clients_s_median": ours["median"],
        "failover_clients_s_p95": ours["p95"],
        "failover_backoff_clients_s": summarise([r["backoff_clients_s"] for r in runs]),
        "failover_committed_s": summarise([r["committed_s"] for r in runs]),
        "failover_covered_s": summarise([r["covered_s"] for r in runs]),
        "failover_clean_s": summarise([r["clean_s"] for r in runs]),
        "failover_sessions_clients_s": summarise([r["sessions_clients_s"] for r in runs]),
        "goal": {"clients_s_median": 0.25, "clients_s_p95": 0.4},
        "per_run": runs,
    }
    if args.skip_anchor:
        result["vrrp"] = {"skipped": "--skip-anchor"}
    else:
        reason = vrrp_anchor.skip_reason()
        if reason is not None:
            result["vrrp"] = {"skipped": reason}
        else:
            progress(f"the anchor: keepalived, {args.runs} runs, clients paced like the probes")
            clients = max(1, round(sum(r["victim_probes"] for r in runs) / len(runs)))
            vrrp = vrrp_anchor.measure_vrrp(
                runs=args.runs, clients=clients, interval_s=1 / PROBE_RATE
            )
            result["vrrp"] = vrrp
            theirs = vrrp.get("clients_s_median")
            if ours["median"] is not None and theirs:
                result["clients_s_over_vrrp"] = round(ours["median"] / theirs, 3)
    result["loadavg_1min_start_end"] = [load_start, round(os.getloadavg()[0], 2)]
    result["seconds"] = round(time.monotonic() - began, 1)
    return result


def plot(result: Mapping[str, Any], directory: Path) -> list[Path]:
    fig, ax = _plots.figure(f"Failover after SIGKILL of a server ({result['runs']} runs)")
    per_run = result.get("per_run") or []
    series = {
        "every probe client answered again": [r["clients_s"] for r in per_run],
        "the same, probes with exponential backoff": [r.get("backoff_clients_s") for r in per_run],
        "portions served again (routers)": [r["covered_s"] for r in per_run],
        "routers dropped the dead member": [r["clean_s"] for r in per_run],
    }
    vrrp = result.get("vrrp") or {}
    if vrrp.get("clients_s"):
        series["keepalived VRRPv3: every client answered again"] = vrrp["clients_s"]
    _plots.cdf(
        ax,
        {k: [v for v in vals if v is not None] for k, vals in series.items()},
        xlabel="seconds after SIGKILL",
    )
    ax.set_ylabel("fraction of runs")
    _plots.vertical(ax, 0.25, "goal: median 0.25 s", colour="#1d9a5b")
    ax.legend(fontsize=8)
    return [_plots.save(fig, directory, "failover_cdf")]


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _plots.add_argument(parser)
    parser.add_argument("--runs", type=int, default=RUNS, help="kills (default 10)")
    parser.add_argument(
        "--sessions-per-lan",
        type=int,
        default=SESSION_CLIENTS_PER_LAN,
        help="the sessions' clients on each edge (default 500: 1000 sessions)",
    )
    parser.add_argument(
        "--heartbeat-ms", type=int, default=HEARTBEAT_MS, help="the pool's heartbeat (default 50)"
    )
    parser.add_argument("--skip-anchor", action="store_true", help="no keepalived runs")
    return parser.parse_args()


def main() -> None:
    args = parse_arguments()  # before run_and_emit, so that --help prints on stdout

    def run() -> dict[str, Any]:
        result = measure(args)
        _plots.write(result, args.plots, plot)
        return result

    run_and_emit("failover", run)


if __name__ == "__main__":
    main()
