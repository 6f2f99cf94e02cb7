"""Chaos soak: a pool under load lives through seeded, overlapping random faults.

The overlay variant here; `--lab` runs the kernel-lab variant (root only,
bench/_soak_lab.py: the same pool and seeded faults in network namespaces). A pool
on the overlay split over processes: all the clients (1000 by default, 0.5
requests/s each) in one, router ra with servers s1, s2 in another (the
infrastructure), router rb (the edge of s3, s4 and client LAN b) in a third, each of
the servers s3, s4 alone in a `manycast run --nodes` process, and each standby (s5,
s6) alone in a process from the start, which it joins the pool in at its join fault.
Technique R3 (lossless) by default; the pool finds a death after 2 s (20 missed 100
ms heartbeats), longer than any router outage drawn (`_soak_plan.DETECTION_S`). A
client's request fails 2 s after it was sent, but its connection stays, and the late
answer is still checked, until a request has waited 10 s or TCP gives up
(`--abandon-after-ms`; 2000: the connection goes with the request); the clients cap
their retransmission timeout at 200 ms with 15 retries (`--rto-max-ms`,
`--max-retries`; `--thin-stream` for Linux's thin-stream timeouts instead).
After a warm-up, `--seed` draws every kind of fault once per 20 s at random offsets
(they overlap): SIGKILL of s3's or s4's process and its restart 2-5 s later;
SIGKILL of rb's process and its restart 0.3-1.5 s later; a standby server joining;
share changes; rebalances; loss bursts (10-30 %) and delay spikes (20-100 ms) of
2-5 s on the core link ra-rb; a flood of malformed and replayed joins and control
messages (bench/fuzz.py's corpus) at router ra's client-LAN endpoint; the private
pool's DNS server SIGKILLed and started again 2-6 s later; VIP router vr1 of a
small VIP pool run beside it (its own processes and clients) SIGKILLed and started
again 2-5 s later. With `--private` the pool is private: its participants sign
their joins and registrations, and its routers read its key from that DNS server,
in a process of its own (the DNS fault needs it). Not the default: with 1000
clients the private pool loses most sessions with no fault at all (docs/soak.md).

Measured (one JSON object last on stdout, progress on stderr):
- `sessions_lost`: session losses (a reset, a connection given up, a wrong answer)
  not explained by a crash; `sessions_lost_to_crashes`: those of clients whose
  owner was a killed server in any allocation between its last answer before the
  kill and the loss, within the kill's window (kill to restart + 8 s);
- `wrong_answers`; requests answered and failed per minute;
  `requests_answered_late` (failed at their deadline, answered later and checked);
- `recovery_s` per fault: until every client whose session it broke (for a router
  restart, also every client behind the router) was answered again;
- RSS and open file descriptors of every long-lived process each minute (each
  10 s in runs under 10 minutes), and the slope of a fitted line per hour;
- `unexpected_exits` and `tracebacks`.
Exits 1 when sessions_lost > 0, a process died unexpectedly or logged a traceback.

Its last line on stdout is one json object (`_common.run_and_emit`): the result,
or why it stopped (an error, a missing package, SIGTERM or Ctrl-C).
"""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
import argparse
import hashlib
import math
import multiprocessing
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import _plots
from _common import progress, run_and_emit
from _pool import PORT_SEARCH, HeapProbe, expect, node_command
from _proc_sample import resident
from _soak_analysis import analyse, keep_every_loss
from _soak_dns import DnsProcess, free_port
from _soak_flood import Flood, build
from _soak_growth import fit_live_heap, fit_per_hour
from _soak_hosts import RouterProcess, Spill, clients_child, infra_child
from _soak_lab import lab_arguments, run_lab
from _soak_plan import (
    CYCLE_S,
    DETECTION_S,
    KEY_TTL_S,
    KINDS,
    LOCAL_SERVERS,
    PRIVATE_ONLY,
    ROUTER,
    STANDBY,
    VICTIMS,
    VIP_KINDS,
    VIP_VICTIM,
    WARMUP_S,
    Fault,
    pool_text,
    schedule,
    vip_pool_text,
)
from _soak_vip import analyse_vip, vip_child
from manycast.auth import save_private
from manycast.drivers import heap
from manycast.ports import free_base_port
from manycast.topology import loads

SEED = 20261201
# The clients give a request up after 2 s; so they cap their RTO (Linux's
# TCP_RTO_MAX_MS) and retry within that time rather than 0.75 and 1.55 s after it
# was sent, and keep trying past it (tcp_retries2's default): docs/soak.md finding 21.
CLIENT_RTO_MAX_MS = 200
CLIENT_MAX_RETRIES = 15
CLIENT_ABANDON_AFTER_MS = 10_000  # a failed request does not end its connection (finding 24)
GRACE_S = 3.0  # the pool processes run this long past the measured time
HEAP_FROM_S = 300.0  # --trace-heap and --census-heap compare the end with this by default
PREPARE_S = 8.0  # a restarted router's next process is spawned this long before the kill


def _traced(results: Mapping[str, Any], probe: HeapProbe | None) -> dict[str, Any]:
    """With --trace-heap or --census-heap: per pool process, what grew most from the
    probe's time to the end (`_pool.HeapProbe`) and how long its first count stopped
    the process; the run says which of its losses may be the probe's."""
    if probe is None:
        return {}
    key = f"heap_growth_by_{probe.by}"
    out: dict[str, Any] = {
        key: {
            name: {
                "from_s": got.get("heap_traced_from"),
                "paused_s": got.get("heap_paused_s"),
                "total": got.get("heap_growth_total"),  # every owner's: the rows' share
                f"{probe.by}s": got[key],
            }
            for name, got in results.items()
            if got and key in got
        }
    }
    if probe.by == "line":
        out["heap_traced"] = (
            "every allocation of the pool processes was traced (--trace-heap): "
            "they ran slower, so this run's losses and recovery times are not the pool's"
        )
    else:
        out["heap_counted"] = (
            "each pool process stopped for its paused_s at from_s to count its heap "
            "(--census-heap): losses in the seconds after may be the count's (requests "
            "wait, a killed server's clients time out later)"
        )
    return out


def _growth(
    samples: list[dict[str, Any]],
    live_heap: dict[str, list[list[Any]]],
    vip_on: bool,
    joins: Mapping[str, Fault],
) -> dict[str, Any]:
    """Each long-lived process's growth: RSS and descriptors from the bench's samples,
    and, for the processes that host pool nodes, what their heaps hold alive. A
    standby's process from its join plus the warm-up (before, it holds a server that
    has not started; the join starts it, as the pool's start starts the others)."""
    since = {name: join.at + WARMUP_S for name, join in joins.items()}
    names = ("infra", "clients", "bench", *(("vip",) if vip_on else ()), *joins)
    growth = fit_per_hour(samples, names, since)
    for name, figures in fit_live_heap(live_heap, since).items():
        growth.setdefault(name, {}).update(figures)
    return growth


def heap_probe(args: argparse.Namespace, seconds: float) -> HeapProbe | None:
    """--trace-heap's or --census-heap's probe, from --heap-from (`_pool.HeapProbe`)."""
    if not (args.trace_heap or args.census_heap):
        return None
    start = min(HEAP_FROM_S, seconds / 2) if args.heap_from is None else args.heap_from
    return HeapProbe("line" if args.trace_heap else "owner", start)


class Victim:
    """One server in its own `manycast run --nodes` process, killed and restarted.

    It runs with the soak's seed, as every other process of the pool does: a pool
    without a key file derives its key from the seed (`pool_keys`), and a server
    built from another seed signs change-destinations that D's clients refuse (bad
    signature), so every connection moved to it was lost (finding 35)."""

    def __init__(self, name: str, path: Path, base: int, seed: int, logs: Path, end: float) -> None:
        self.name, self.path, self.base, self.logs, self.end = name, path, base, logs, end
        self.seed = seed
        self.process: subprocess.Popen[bytes] | None = None
        self.incarnation = 0
        self.exits: list[dict[str, Any]] = []

    def start(self) -> None:
        self.incarnation += 1
        log = self.logs / f"{self.name}.{self.incarnation}.log"
        remaining = max(5.0, self.end - time.monotonic())
        command = node_command(self.path, self.name, self.base, remaining + 10, self.seed)
        with log.open("wb") as err:
            self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def check(self, at: float) -> None:
        """An exit we did not cause is unexpected."""
        if self.process is not None and self.process.poll() is not None:
            self.exits.append(
                {
                    "process": f"{self.name}#{self.incarnation}",
                    "at": round(at, 2),
                    "returncode": self.process.returncode,
                }
            )
            self.process = None


def private_setup(directory: Path, seed: int) -> tuple[str, tuple[str, int]]:
    """The private pool's key file (the key derived from the seed) and the address its
    DNS server will listen on."""
    key = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"soak:{seed}".encode()).digest())
    path = directory / "pool.key"
    save_private(key, path)
    return str(path), ("127.0.0.1", free_port())


def client_options(args: argparse.Namespace) -> dict[str, Any]:
    """The `[[clients]]` keys the transport options give."""
    options: dict[str, Any] = {"thin_stream": True} if args.thin_stream else {}
    if args.rto_max_ms is not None:
        options["rto_max_ms"] = args.rto_max_ms
    if args.max_retries is not None:
        options["max_retries"] = args.max_retries
    if args.abandon_after_ms is not None:
        options["abandon_after_ms"] = args.abandon_after_ms
    return options


def measure(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="manycast-soak-") as tmp:
        return _measure(args, Path(tmp))


def _measure(args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    began = time.monotonic()
    load_start = [round(x, 2) for x in os.getloadavg()]
    seconds = args.minutes * 60.0
    private = private_setup(logs, args.seed) if args.private else None
    text = pool_text(
        args.technique,
        args.clients_per_lan,
        args.rate,
        seconds + 60,
        private,
        membership=args.membership,
        heartbeat_ms=args.heartbeat_ms,
        heartbeat_misses=args.heartbeat_misses,
        client_options=client_options(args),
    )
    topo = loads(text)
    faults = schedule(args.seed, seconds, args.kinds, args.cycle_s)
    progress(
        f"soak: {seconds:.0f} s, {2 * args.clients_per_lan} clients, {args.technique}, "
        f"seed {args.seed}, {len(faults)} faults scheduled"
    )
    sample_every = 10.0  # (`_soak_growth.fit_per_hour`'s floor wants several a minute)
    probe = heap_probe(args, seconds)
    progress_every = 60.0 if args.minutes >= 10 else 15.0
    packets: dict[str, Any] = {}
    builder = threading.Thread(
        target=lambda: packets.update(build(args.seed, topo.pool.group, topo.pool.control_port)),
        daemon=True,
    )
    builder.start()
    path = logs / "soak.toml"
    path.write_text(text)
    base = free_base_port(topo.attachment_count, PORT_SEARCH)
    ctx = multiprocessing.get_context("spawn")
    dns = DnsProcess(topo, args.key_ttl, logs) if args.private else None
    if dns is not None:  # serving before any router asks
        dns.start()
        dns.wait_up(120)
    local = {"ra", *LOCAL_SERVERS}
    restarts = [f.until or f.at for f in faults if f.kind == "router_restart"]
    bodies: list[tuple[str, Any, tuple[Any, ...]]] = [
        ("infra", infra_child, (text, local, base, args.seed, seconds + GRACE_S, faults)),
        ("clients", clients_child, (text, base, args.seed, seconds + GRACE_S, restarts)),
    ]
    # Each standby that joins, in a process of its own (a new machine), from the start.
    joins = {f.args["server"]: f for f in faults if f.kind == "join"}
    assert set(joins) <= set(STANDBY)
    for name, join in joins.items():
        standby = (text, {name}, base, args.seed, seconds + GRACE_S, [join])
        bodies.append((name, infra_child, standby))
    vip_on = any(kind in VIP_KINDS for kind in args.kinds)
    if vip_on:  # the VIP pool beside it, on ports of its own
        vip_text = vip_pool_text(args.vip_clients, args.vip_clients, seconds + 60)
        vip_path = logs / "vip.toml"
        vip_path.write_text(vip_text)
        count = loads(vip_text).attachment_count
        apart = [b for b in PORT_SEARCH if b >= base + topo.attachment_count or b + count <= base]
        vip_base = free_base_port(count, apart)
        kills = [f.at for f in faults if f.kind == "vip_router_kill"]
        bodies.append(("vip", vip_child, (vip_text, vip_base, args.seed, seconds + GRACE_S, kills)))
    children = []
    for name, body, extra in bodies:
        parent, child = ctx.Pipe()
        process = ctx.Process(
            target=body,
            name=name,
            daemon=True,
            args=(child, *extra, logs / f"{name}.log", progress_every, probe),
        )
        process.start()
        child.close()
        children.append((process, parent))
    end_estimate = time.monotonic() + 90 + seconds
    victims = {v: Victim(v, path, base, args.seed, logs, end_estimate) for v in VICTIMS}
    for victim in victims.values():
        victim.start()
    vip_router = (
        Victim(VIP_VICTIM, vip_path, vip_base, args.seed, logs, end_estimate) if vip_on else None
    )
    if vip_router is not None:
        vip_router.start()
    router = RouterProcess(ROUTER, text, base, args.seed, faults, logs)
    router.prepare()
    samples: list[dict[str, Any]] = []
    unexpected: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    flood: Flood | None = None
    try:
        for process, conn in children:
            expect(conn, process.name, "built", 180)
        router.wait_built(180)
        builder.join(120)
        if not packets:
            raise RuntimeError("the flood's packets were not built")
        flood = Flood(packets)
        start = time.monotonic() + 0.5
        for _, conn in children:
            conn.send(("go", start))
        router.begin(start, start + seconds + GRACE_S)
        if dns is not None:
            dns.begin(start)
        endpoint = dict(topo.endpoints(base))
        ra_lan = next(m for m in topo.links["ra-a"].members if m.node == "ra")
        target = endpoint[("ra", ra_lan.iface)]
        actions: list[tuple[float, str, Fault]] = []
        for fault in faults:
            if fault.kind == "kill":
                actions += [
                    (fault.at, "kill", fault),
                    (fault.until or fault.at, "restart", fault),
                ]
            elif fault.kind == "flood":
                actions.append((fault.at, "flood", fault))
            elif fault.kind == "router_restart":
                actions += [
                    (fault.at - PREPARE_S, "prepare", fault),
                    (fault.at, "router_kill", fault),
                    (fault.until or fault.at, "router_go", fault),
                ]
            elif fault.kind == "vip_router_kill":
                actions += [
                    (fault.at, "vip_kill", fault),
                    (fault.until or fault.at, "vip_go", fault),
                ]
            elif fault.kind == "dns_restart":
                actions += [
                    (fault.at, "dns_kill", fault),
                    (fault.until or fault.at, "dns_go", fault),
                ]
        actions.sort(key=lambda a: a[0])
        next_sample = 0.0
        done_at = start + seconds + GRACE_S
        while time.monotonic() < done_at:
            now = time.monotonic() - start
            while actions and actions[0][0] <= now:
                _, what, fault = actions.pop(0)
                hit = victims.get(fault.args.get("server", ""))
                if what == "kill" and hit is not None:
                    hit.check(now)
                    hit.kill()
                    progress(f"  t={now:6.1f}s SIGKILL {hit.name}")
                elif what == "restart" and hit is not None:
                    hit.start()
                    progress(f"  t={now:6.1f}s restart {hit.name}")
                elif what == "flood":
                    flood.burst(
                        target, int(fault.args["packets"]), float(fault.until or 0) - fault.at
                    )
                elif what == "prepare":
                    router.prepare()
                elif what == "router_kill":
                    router.kill(now)
                    progress(f"  t={now:6.1f}s SIGKILL {router.name}")
                elif what == "router_go":
                    router.go(fault.until or now)
                    progress(f"  t={now:6.1f}s restart {router.name}")
                elif what == "vip_kill" and vip_router is not None:
                    vip_router.check(now)
                    vip_router.kill()
                    progress(f"  t={now:6.1f}s SIGKILL {vip_router.name} (VIP pool)")
                elif what == "vip_go" and vip_router is not None:
                    vip_router.start()
                    progress(f"  t={now:6.1f}s restart {vip_router.name} (VIP pool)")
                elif what == "dns_kill" and dns is not None:
                    dns.kill(now)
                    progress(f"  t={now:6.1f}s SIGKILL the DNS server")
                elif what == "dns_go" and dns is not None:
                    dns.start(now)
                    progress(f"  t={now:6.1f}s restart the DNS server")
            router.poll(now)
            if dns is not None:
                dns.check(now)
            for victim in victims.values():
                victim.check(now)
            if vip_router is not None:
                vip_router.check(now)
            for process, conn in children:
                if process.name in failed:
                    continue
                message, payload = "", None
                if conn.poll(0):
                    message, payload = conn.recv()
                if message == "error" and "Address already in use" in str(payload):
                    raise RuntimeError(f"{process.name} failed to start:\n{payload}")
                if message == "error" or not process.is_alive():
                    # A pool process died: recorded, the run goes on without it.
                    failed[process.name] = str(payload or f"exit code {process.exitcode}")
                    unexpected.append(
                        {
                            "process": process.name,
                            "at": round(now, 2),
                            "returncode": process.exitcode,
                        }
                    )
                    progress(f"  t={now:6.1f}s {process.name} died:\n{payload}")
            if "clients" in failed:
                raise RuntimeError(f"the clients' process died: {failed['clients']}")
            if now >= next_sample:
                sample: dict[str, Any] = {"t": round(now, 2)}
                pids = {p.name: p.pid for p, _ in children}
                pids.update({v.name: v.process.pid for v in victims.values() if v.process})
                if vip_router is not None and vip_router.process is not None:
                    pids[vip_router.name] = vip_router.process.pid
                pids[router.name] = router.pid()
                if dns is not None:
                    pids["dns"] = dns.pid()
                pids["bench"] = os.getpid()
                for name, pid in pids.items():
                    got = resident(pid) if pid else None
                    if got is not None:
                        sample[name] = got
                samples.append(sample)
                next_sample += sample_every
            time.sleep(0.02)
        results: dict[str, Any] = {"infra": {"epochs": {}, "servers": [], "done": []}}
        for process, conn in children:
            if process.name not in failed:
                results[process.name] = expect(conn, process.name, "done", 120)
                if "spill" in results[process.name]:  # the clients' figures, written out
                    results[process.name] = Spill.read(results[process.name])
    except BaseException:
        # Stopped early (an error, SIGTERM, Ctrl-C): the pool's processes would run on
        # to the end of their schedule, so they are not waited for.
        for process, _ in children:
            if process.is_alive():
                process.terminate()
        raise
    finally:
        for victim in [*victims.values(), *([vip_router] if vip_router else [])]:
            victim.check(time.monotonic() - began)
            victim.kill()
        router.stop(time.monotonic() - began)
        if dns is not None:
            dns.stop(time.monotonic() - began)
        for process, conn in children:
            process.join(10)
            if process.is_alive():
                process.terminate()
                process.join(5)
            conn.close()
        if flood is not None:
            flood.close()
    unexpected += [e for v in victims.values() for e in v.exits]
    if vip_router is not None:
        unexpected += vip_router.exits
    unexpected += router.exits
    failed.update(router.errors)
    if dns is not None:
        unexpected += dns.exits
        failed.update(dns.errors)
    if args.logs is not None:
        args.logs.mkdir(parents=True, exist_ok=True)
        for log in logs.glob("*.log"):
            shutil.copy(log, args.logs / log.name)
    tracebacks = {name: text[text.find("Traceback") :][-3000:] for name, text in failed.items()}
    for log in sorted(logs.glob("*.log")):
        logged = log.read_text(errors="replace")
        if "Traceback" in logged:
            tracebacks[log.stem] = logged[logged.index("Traceback") :][:3000]
    # The outage each router restart really was (its next process may start late).
    for fault, started in zip(
        (f for f in faults if f.kind == "router_restart"), router.starts[1:], strict=False
    ):
        fault.args["down_actual_s"] = started.get("down_s")
    # When each restarted DNS server first answered the bench's own key lookup.
    restarted = dns.starts[1:] if dns is not None else []
    for fault, started in zip(
        (f for f in faults if f.kind == "dns_restart"), restarted, strict=False
    ):
        fault.args["answered_again_at"] = started.get("answered_again")
    pool_faults = [f for f in faults if f.kind not in VIP_KINDS]
    # what each pool process's heap held alive, sampled inside it
    live_heap = {
        name: got["live_heap"] for name, got in results.items() if got and "live_heap" in got
    }
    result = analyse(
        pool_faults, results["infra"], results["clients"], seconds, topo.pool.technique, args.rate
    )
    keep_every_loss(result, args.logs)
    vip_lost = 0
    if vip_on and "vip" in results:
        vip = analyse_vip(faults, results["vip"])
        kills = len(vip["rows"])
        result["faults"]["vip_router_kill"] = kills
        result["faults_total"] += kills
        result["recovery_by_kind"]["vip_router_kill"] = vip["by_kind"]
        result["per_fault"] = sorted(result["per_fault"] + vip["rows"], key=lambda r: r["at"])
        result["vip"] = vip["summary"]
        vip_lost = vip["summary"]["sessions_lost"]
    result.update(
        {
            "bench": "soak",
            "variant": "overlay",
            "seed": args.seed,
            "minutes": args.minutes,
            "clients": 2 * args.clients_per_lan,
            "rate_per_client": args.rate,
            "cycle_s": args.cycle_s,
            "membership": args.membership,
            "heartbeat_ms": args.heartbeat_ms,
            "heartbeat_misses": args.heartbeat_misses,
            "thin_stream": args.thin_stream,
            "rto_max_ms": args.rto_max_ms,
            "max_retries": args.max_retries,
            "abandon_after_ms": args.abandon_after_ms,
            "fault_kinds": list(args.kinds),
            "unexpected_exits": unexpected,
            "tracebacks": tracebacks,
            "flood_sent": flood.sent if flood is not None else {},
            "router_starts": router.starts,
            "epoch_changes": results["infra"].get("changes", []),
            "allocation_at_end": results["infra"].get("allocation_at_end", {}),
            "cpu_s": {name: (got or {}).get("cpu_s") for name, got in results.items()},
            "allocator": os.environ.get("PYTHONMALLOC"),
            "private": args.private,
            "key_ttl_s": args.key_ttl if args.private else None,
            "dns_starts": dns.starts if dns is not None else [],
            "join_refusals": {
                "ra": results["infra"].get("refusals", {}).get("ra", {}),
                "rb_last": (router.starts[-1].get("done") or {}).get("refusals", {})
                if router.starts
                else {},
            },
            "samples": samples,
            "live_heap_samples": live_heap,
            **_traced(results, probe),
            "growth_per_hour": _growth(samples, live_heap, vip_on, joins),
            "loadavg_start": load_start,
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "seconds": round(time.monotonic() - began, 1),
        }
    )
    result["ok"] = (
        result["sessions_lost"] == 0 and vip_lost == 0 and not unexpected and not tracebacks
    )
    return result


def _measure_retrying(args: argparse.Namespace, attempts: int = 3) -> dict[str, Any]:
    """`measure`, again on fresh ports when another program took one of the pool's
    between the probe for a free range and the bind (other benches and tests share
    the machine)."""
    for attempt in range(attempts):
        try:
            return measure(args)
        except RuntimeError as exc:
            if "Address already in use" not in str(exc) or attempt == attempts - 1:
                raise
            progress(f"soak: a port of the pool was taken meanwhile; again ({attempt + 2})")
    raise AssertionError("unreachable")


def plot(result: Mapping[str, Any], directory: Path) -> list[Path]:
    paths = []
    fig, ax = _plots.figure(f"Soak: requests per minute (seed {result['seed']})")
    per_min = result.get("per_minute") or []
    xs = [m["minute"] for m in per_min]
    ax.plot(xs, [m["answered"] for m in per_min], marker="o", label="answered")
    ax.plot(xs, [m["failed"] for m in per_min], marker="o", label="failed")
    ax.set_xlabel("minute")
    ax.set_ylabel("requests")
    ax.legend(fontsize=8)
    paths.append(_plots.save(fig, directory, "soak_requests"))
    fig, ax = _plots.figure("Soak: resident memory of the long-lived processes")
    for name in ("infra", "clients", "bench"):
        points = [(s["t"], s[name]["rss_mb"]) for s in result.get("samples", []) if name in s]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=name)
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS (MB)")
    ax.legend(fontsize=8)
    paths.append(_plots.save(fig, directory, "soak_rss"))
    return paths


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _plots.add_argument(parser)
    parser.add_argument("--minutes", type=float, default=30.0, help="how long (default 30)")
    parser.add_argument("--seed", type=int, default=SEED, help="the fault schedule's seed")
    parser.add_argument("--technique", default="R3", help="R1..R4, D (default R3, lossless)")
    parser.add_argument(
        "--clients-per-lan", type=int, default=500, help="default 500 (1000 in all)"
    )
    parser.add_argument("--rate", type=float, default=0.5, help="requests/s per client (0.5)")
    parser.add_argument(
        "--private",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="a private pool, its key read from a DNS server of its own, and the "
        "dns_restart fault (default: a public pool, without that fault)",
    )
    parser.add_argument(
        "--vip-clients",
        type=int,
        default=20,
        help="the VIP pool's clients of each kind: long connections and short ones (20)",
    )
    parser.add_argument(
        "--key-ttl",
        type=int,
        default=KEY_TTL_S,
        help=f"the TTL of the private pool's DNS records, seconds (default {KEY_TTL_S})",
    )
    parser.add_argument(
        "--cycle-s",
        type=float,
        default=CYCLE_S,
        help=f"each kind of fault once per this many seconds (default {CYCLE_S:g}: about "
        "one fault every 3 s; 120 gives a 30-minute run about 130 faults)",
    )
    parser.add_argument(
        "--membership",
        choices=("heartbeat", "swim"),
        default="heartbeat",
        help="the pool's failure detection (docs/coordination.md; default heartbeat)",
    )
    parser.add_argument(
        "--heartbeat-ms", type=int, default=100, help="heartbeat or probe period (100)"
    )
    parser.add_argument(
        "--heartbeat-misses",
        type=int,
        help=f"periods missed before a death (default: {DETECTION_S:g} s of periods on the "
        "overlay, 20 at 100 ms, longer than any router outage drawn; 3 in the lab)",
    )
    parser.add_argument(
        "--thin-stream",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="the clients keep their retransmission timeout through six timeouts "
        "(Linux's tcp_thin_linear_timeouts) instead of doubling it (default: doubling)",
    )
    parser.add_argument(
        "--rto-max-ms",
        type=int,
        help="the clients' cap on their retransmission timeout, ms (Linux's TCP_RTO_MAX_MS, "
        f"50..120000; default {CLIENT_RTO_MAX_MS}; 60000: plain TCP's doubling, as before "
        "finding 21)",
    )
    parser.add_argument(
        "--max-retries",
        type=int,
        help="timeouts a client lives through before it gives up (tcp_retries2; default "
        f"{CLIENT_MAX_RETRIES}, with 5 a capped client gives up before its 2 s deadline)",
    )
    parser.add_argument(
        "--abandon-after-ms",
        type=int,
        help="how long a client waits for a request's answer before it gives its connection "
        f"up, ms (2000..600000; default {CLIENT_ABANDON_AFTER_MS}: a request fails at its "
        "2 s deadline and its late answer is still checked; 2000: the connection is given "
        "up with the request, as before finding 24)",
    )
    parser.add_argument("--logs", type=Path, metavar="DIR", help="keep every process's log in DIR")
    probes = parser.add_mutually_exclusive_group()
    probes.add_argument(
        "--trace-heap",
        action="store_true",
        help="trace every allocation of the pool processes (tracemalloc) and report the "
        "lines whose memory grew most from --heap-from to the end, as heap_growth_by_line; "
        "the processes run slower, so the run's losses are not the pool's "
        "(bench/_heap_trace.py)",
    )
    probes.add_argument(
        "--census-heap",
        action="store_true",
        help="count the pool processes' live objects by the attribute or type that holds "
        "them at --heap-from and at the end, and report what grew most, as "
        "heap_growth_by_owner; it does not slow the run between its two counts "
        "(bench/_heap_census.py)",
    )
    parser.add_argument(
        "--heap-from",
        type=float,
        metavar="S",
        help=f"seconds into the run that --trace-heap or --census-heap compares the end with "
        f"(default {HEAP_FROM_S:.0f}, or half the run if shorter)",
    )
    parser.add_argument(
        "--allocator",
        choices=("malloc", "pymalloc"),
        default=os.environ.get("PYTHONMALLOC", heap.LONG_RUN_ALLOCATOR),
        help="PYTHONMALLOC for every process the soak starts (default: the environment's, "
        f"else {heap.LONG_RUN_ALLOCATOR}, as `manycast run` runs; pymalloc, CPython's "
        "default, keeps the arenas of a process's largest burst: docs/soak.md, finding 31)",
    )
    parser.add_argument(
        "--kinds",
        help=f"the kinds of fault, comma-separated, or none (default: {','.join(KINDS)}; "
        f"without {','.join(PRIVATE_ONLY)} for a public pool)",
    )
    parser.add_argument(
        "--lab",
        action="store_true",
        help="the kernel-lab variant (root only; bench/_soak_lab.py, docs/soak.md)",
    )
    args = parser.parse_args()
    if args.heartbeat_ms <= 0 or (args.heartbeat_misses is not None and args.heartbeat_misses < 1):
        parser.error("--heartbeat-ms and --heartbeat-misses must be positive")
    if args.heartbeat_misses is None:
        args.heartbeat_misses = 3 if args.lab else math.ceil(DETECTION_S * 1000 / args.heartbeat_ms)
    if args.rto_max_ms is not None and not 50 <= args.rto_max_ms <= 120_000:
        parser.error("--rto-max-ms must be in 50..120000")
    if args.max_retries is not None and not 1 <= args.max_retries <= 100:
        parser.error("--max-retries must be in 1..100")
    if args.abandon_after_ms is not None and not 2000 <= args.abandon_after_ms <= 600_000:
        parser.error("--abandon-after-ms must be in 2000..600000 (the deadline is 2000)")
    if args.lab and (args.trace_heap or args.census_heap):
        parser.error(
            "--trace-heap, --census-heap: for the overlay's pool processes (the lab's are programs)"
        )
    if args.heap_from is not None and not (args.trace_heap or args.census_heap):
        parser.error("--heap-from: with --trace-heap or --census-heap")
    if args.heap_from is not None and not 0 <= args.heap_from < args.minutes * 60:
        parser.error("--heap-from must be within the run (0 to --minutes * 60 s)")
    if args.lab:
        transport = [name for name, value in client_options(args).items() if value]
        if transport:
            parser.error(
                f"{', '.join(transport)}: for the overlay's TCP clients (the lab's prober: UDP)"
            )
        return lab_arguments(parser, args)
    args.rto_max_ms = CLIENT_RTO_MAX_MS if args.rto_max_ms is None else args.rto_max_ms
    args.max_retries = CLIENT_MAX_RETRIES if args.max_retries is None else args.max_retries
    if args.abandon_after_ms is None:
        args.abandon_after_ms = CLIENT_ABANDON_AFTER_MS
    if args.kinds is None:
        kinds = tuple(k for k in KINDS if args.private or k not in PRIVATE_ONLY)
    else:
        kinds = () if args.kinds == "none" else tuple(k for k in args.kinds.split(",") if k)
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown fault kinds: {', '.join(sorted(unknown))}")
    if not args.private and set(kinds) & set(PRIVATE_ONLY):
        parser.error(f"{','.join(PRIVATE_ONLY)} needs a private pool (--private)")
    args.kinds = kinds
    return args


def main() -> None:
    args = parse_arguments()  # before run_and_emit, so that --help prints on stdout
    os.environ["PYTHONMALLOC"] = args.allocator  # every process started from here on

    def run() -> dict[str, Any]:
        result = run_lab(args) if args.lab else _measure_retrying(args)
        _plots.write(result, args.plots, plot)
        return result

    run_and_emit("soak", run)  # exits 1 when the result is not ok


if __name__ == "__main__":
    main()
