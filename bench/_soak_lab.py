"""The chaos soak in the kernel lab (bench/soak.py --lab; root only).

The overlay soak's pool (`_soak_plan.pool_text`: routers ra and rb, servers s1-s4,
standbys s5 and s6 on ra, client LANs a and b) brought up by `Lab.up`, one network
namespace per node, the kernel forwarding the clients' packets by the entries our
router daemons install. Every client is the lab's `Prober`, in this process, each
sending from its own namespace. The same seeded schedule (`_soak_plan.schedule`)
restricted to the kinds the lab can carry out (`LAB_KINDS`), each the lab's way:

- `kill`, `join`, `set_share`, `rebalance`: the scenario engine's steps through
  `LabControl` (SIGKILL of the server's agent and service; a standby's programs
  started; a policy change on an agent's command socket); a killed server's programs
  are started again 2-5 s later (`LabControl.start_server`);
- `router_restart`: SIGKILL of rb's router daemon (the kernel flushes its VIFs and
  forwarding entries as the MRT socket closes), a fresh daemon started 0.3-1.5 s later;
  the outage is until it is ready (`down_actual_s`: a Python program starting);
- `loss_burst`: nftables `numgen random` drops at both ends of ra-rb for 2-5 s;
- `flood`: `_soak_flood`'s malformed and replayed packets from a client namespace of
  LAN a at router ra (`_soak_lab_faults.LabFlood`).

Not done, and why: `NOT_DONE`. The figures are `_soak_analysis.analyse`'s, from what
the prober saw (`_soak_lab_clients`), plus the kernel's forwarding entries.

Run alone, it prints one json object, its last line on stdout, naming the bench
to run (`_common.not_a_bench`).
"""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
import argparse
import itertools
import os
import shutil
import threading
import time
from fractions import Fraction
from typing import Any

from _common import progress
from _soak_analysis import analyse, keep_every_loss
from _soak_flood import build
from _soak_growth import fit_per_hour
from _soak_lab_clients import Ledger, OwnerLog
from _soak_lab_faults import (
    LabFlood,
    LossBurst,
    cpu_seconds,
    last_incarnation,
    mfc_growth,
    programs,
    sample,
)
from _soak_plan import CORE_LINK, KINDS, ROUTER, Fault, pool_text, schedule
from manycast.errors import LabError
from manycast.lab import NEEDS_ROOT, Lab, LabControl, Prober
from manycast.lab.daemons import READY_TIMEOUT, ROLES_OF, SERVER_START
from manycast.lab.neighbours import table_fulls
from manycast.scenario import ScenarioEngine
from manycast.steps import Add, Kill, Rebalance, SetShare, Step
from manycast.summary import served_window
from manycast.topology import Topology

LAB_KINDS = ("kill", "router_restart", "join", "set_share", "rebalance", "loss_burst", "flood")
NOT_DONE = {
    "delay_spike": "this kernel has no netem; the lab's link-delay program holds one "
    "constant delay per link, set when the lab is built, and cannot change it for seconds",
    "dns_restart": "the lab runs the public pool: a private lab pool reads its key from "
    "the run directory, with no DNS server to restart",
    "vip_router_kill": "the VIP pool is a topology of its own (bench/vip_lab.py), not "
    "built beside this one in the lab",
}
# The overlay's clients give a request up after 2 s (`Client.request_timeout`); the
# lab's clients send each request once, and wait as long.
REQUEST_TIMEOUT_S = 2.0
SLICE_S = 0.1  # the prober runs this long at most between looks at faults and programs
OWNERS_EVERY_S = 0.25
FLOOD_FROM_LAN = "a"  # the flood comes from a host on ra's client LAN


def lab_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """`--kinds` for the lab: by default every kind it can carry out; one it cannot is
    refused, with the reason."""
    if args.private:
        parser.error(f"--lab runs the public pool: {NOT_DONE['dns_restart']}")
    if args.kinds is None:
        kinds: tuple[str, ...] = LAB_KINDS
    else:
        kinds = () if args.kinds == "none" else tuple(k for k in args.kinds.split(",") if k)
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown fault kinds: {', '.join(sorted(unknown))}")
    for kind in kinds:
        if kind not in LAB_KINDS:
            parser.error(f"--lab does not do {kind}: {NOT_DONE[kind]}")
    args.kinds = kinds
    return args


def run_lab(args: argparse.Namespace) -> dict[str, Any]:
    if os.geteuid() != 0:
        raise RuntimeError(f"--lab: {NEEDS_ROOT} (run it as root, e.g. with sudo)")
    began = time.monotonic()
    load_start = [round(x, 2) for x in os.getloadavg()]
    seconds = args.minutes * 60.0
    text = pool_text(
        args.technique,
        args.clients_per_lan,
        args.rate,
        seconds + 60,
        membership=args.membership,
        heartbeat_ms=args.heartbeat_ms,
        heartbeat_misses=args.heartbeat_misses,
    )
    faults = schedule(args.seed, seconds, args.kinds)
    lab = Lab(prefix=f"soak{os.getpid()}")
    packets: dict[str, Any] = {}
    soak = LabSoak(args, lab, faults, seconds)
    progress(
        f"soak --lab: {seconds:.0f} s, {2 * args.clients_per_lan} clients, {args.technique}, "
        f"seed {args.seed}, {len(faults)} faults scheduled; lab {lab.prefix} coming up"
    )
    fulls_start = table_fulls()
    try:
        up = time.monotonic()
        topology = lab.up(text, "soak.toml", seed=args.seed)
        soak.lab_info = {
            "prefix": lab.prefix,
            "namespaces": len(lab.namespaces()),
            "up_s": round(time.monotonic() - up, 1),
            "plane": lab.state().get("plane"),
        }
        progress(f"  lab up: {soak.lab_info['namespaces']} namespaces in {soak.lab_info['up_s']} s")
        if "flood" in args.kinds:
            builder = threading.Thread(
                target=lambda: packets.update(
                    build(args.seed, topology.pool.group, topology.pool.control_port)
                ),
                daemon=True,
            )
            builder.start()
            soak.packets = packets
            soak.builder = builder
        soak.run(topology)
    finally:
        soak.collect_logs()
        down = lab.down() if lab.is_up() or lab.run_dir.exists() else {}
        progress(f"  lab down: {down}")
    result = soak.result()
    result["loadavg_start"] = load_start
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    fulls_end = table_fulls()
    # New neighbour entries the host refused during the run (any lab's): a packet
    # dropped where it was sent, unseen by its sender (docs/soak.md, lab finding 1).
    result["neighbour_table_fulls"] = (
        None if fulls_start is None or fulls_end is None else fulls_end - fulls_start
    )
    result["lab_down"] = down
    result["lab_left_namespaces"] = len(lab.namespaces())
    result["seconds"] = round(time.monotonic() - began, 1)
    return result


class LabSoak:
    """One soak on a lab that is up: the clients, the faults, the watch on programs."""

    def __init__(
        self, args: argparse.Namespace, lab: Lab, faults: list[Fault], seconds: float
    ) -> None:
        self.args, self.lab, self.faults, self.seconds = args, lab, faults, seconds
        self.lab_info: dict[str, Any] = {"prefix": lab.prefix}
        self.packets: dict[str, Any] = {}
        self.builder: threading.Thread | None = None
        self.flood: LabFlood | None = None
        self.samples: list[dict[str, Any]] = []
        self.unexpected: list[dict[str, Any]] = []
        self.tracebacks: dict[str, str] = {}
        self.done: list[dict[str, Any]] = []
        self.router_starts: list[dict[str, Any]] = []
        self.bursts: dict[int, LossBurst] = {}
        self.burst_numbers = itertools.count()  # a table of its own per burst, even overlapping
        self.cpu: dict[str, float | None] = {}
        self.end: dict[str, Any] = {}
        self.window = served_window([args.rate])  # as every scenario's summary counts
        self._record: tuple[dict[str, Any], dict[str, Any]] | None = None

    # -- the run -----------------------------------------------------------------
    def run(self, topology: Topology) -> None:
        self.topology = topology
        made = time.monotonic()
        prober = Prober(self.lab, topology, timeout=REQUEST_TIMEOUT_S)
        # Opening a socket in each client's namespace takes a while: the first
        # requests are spread over one interval from now, not all due at once (each
        # new source is an upcall the router daemon answers in turn).
        prober.t0 = time.monotonic()
        self.lab_info["clients_ready_s"] = round(prober.t0 - made, 1)
        self.prober = prober
        self.control = LabControl(self.lab, prober)
        self.engine = ScenarioEngine(topology, self.control)
        names = sorted(prober.clients)
        self.ledger = Ledger(names, self.args.seed)
        servers = sorted(topology.servers)
        self.owners = OwnerLog(self.lab, [prober.clients[n].address for n in names], servers)
        # Programs that should be running: each is checked for an exit we did not cause.
        self.expected = {(r, "router"): True for r in topology.routers}
        for server, spec in topology.servers.items():
            for role in ROLES_OF["server"]:
                self.expected[(server, role)] = not spec.standby
        self.router_pending: tuple[Fault, float] | None = None
        self.killed_at: dict[int, float] = {}
        try:
            self._loop()
        finally:
            prober.close()
            if self.flood is not None:
                self.flood.close()

    def _loop(self) -> None:
        prober, seconds = self.prober, self.seconds
        actions = self._actions()
        sample_every = 60.0 if self.args.minutes >= 10 else 10.0
        progress_every = 60.0 if self.args.minutes >= 10 else 15.0
        next_fold = next_owners = next_check = next_sample = 0.0
        next_progress = progress_every
        while prober.now() < seconds:
            due = actions[0][0] if actions else seconds
            prober.run_until(min(seconds, due, prober.now() + SLICE_S))
            now = prober.now()
            while actions and actions[0][0] <= now:
                _, what, fault = actions.pop(0)
                self._carry_out(what, fault, now)
            self._check_started(now)
            if now >= next_fold:
                self.ledger.fold(prober)
                next_fold += 1.0
            if now >= next_owners:
                self.owners.poll(now, self.engine.live_servers())
                next_owners = now + OWNERS_EVERY_S
            if now >= next_check:
                self._check_programs(now)
                next_check = now + 0.5
            if now >= next_sample:
                self.samples.append(sample(self.lab, self.topology, now))
                next_sample += sample_every
            if now >= next_progress:
                next_progress += progress_every
                self._progress(now)
        self._finish()

    def _progress(self, now: float) -> None:
        ledger = self.ledger
        entries = self.samples[-1]["mfc_entries"] if self.samples else {}
        progress(
            f"  t={now:6.1f}s served {self.prober.served_since(now - self.window)}"
            f"/{len(self.prober.clients)}, answered {sum(ledger.ok_per_s.values())}, "
            f"failed {sum(ledger.failed_per_s.values())}, epochs {len(self.owners.epochs)}, "
            f"mfc {entries}, load {os.getloadavg()[0]:.2f}"
        )

    def _actions(self) -> list[tuple[float, str, Fault]]:
        actions: list[tuple[float, str, Fault]] = []
        ends = {"kill": "restart", "router_restart": "router_go", "loss_burst": "loss_off"}
        for fault in self.faults:
            first = {"router_restart": "router_kill", "loss_burst": "loss_on"}.get(
                fault.kind, fault.kind
            )
            actions.append((fault.at, first, fault))
            if fault.kind in ends:
                actions.append((fault.until or fault.at, ends[fault.kind], fault))
        return sorted(actions, key=lambda a: a[0])

    def _carry_out(self, what: str, fault: Fault, now: float) -> None:
        args = fault.args
        try:
            if what in ("kill", "join", "set_share", "rebalance"):
                self._step(what, fault, now)
            elif what == "restart":
                if fault.args.get("carried_out") is None:
                    return  # the kill was not carried out: nothing to start again
                self.control.start_server(args["server"])
                args["restarted_at"] = round(now, 3)
                progress(f"  t={now:6.1f}s start {args['server']} again")
            elif what == "router_kill":
                if self.router_pending is not None:
                    # The last restart's daemon is killed before it was ready (restarts
                    # drawn in consecutive cycles can fall within its start-up).
                    self.router_pending[0].args["killed_before_ready"] = True
                    self.router_starts[-1]["killed_before_ready"] = True
                    self.router_pending = None
                self.lab.kill(ROUTER, "router")
                self.expected[(ROUTER, "router")] = False
                self.killed_at[id(fault)] = now
                args["carried_out"] = round(now, 3)
                progress(f"  t={now:6.1f}s SIGKILL {ROUTER}'s router daemon")
            elif what == "router_go":
                self.lab.start(ROUTER, "router")
                self.ledger.watch_from(fault.until or fault.at)
                self.router_pending = (fault, time.monotonic() + READY_TIMEOUT)
                self.router_starts.append({"killed_at": args.get("carried_out")})
                self.router_starts[-1]["started_at"] = round(now, 3)
                progress(f"  t={now:6.1f}s start {ROUTER}'s router daemon again")
            elif what == "loss_on":
                percent = round(100 * float(args["loss"]))
                self.bursts[id(fault)] = LossBurst(
                    self.lab, self.topology, CORE_LINK, percent, next(self.burst_numbers)
                )
                args["carried_out"] = round(now, 3)
                progress(f"  t={now:6.1f}s loss {percent} % on {CORE_LINK}")
            elif what == "loss_off":
                burst = self.bursts.pop(id(fault), None)
                if burst is not None:
                    args["dropped"] = burst.stop()
                    progress(f"  t={now:6.1f}s loss on {CORE_LINK} ends: {args['dropped']}")
            elif what == "flood":
                self._flood(fault, now)
        except (LabError, OSError, ValueError, RuntimeError) as exc:
            args["error"] = f"{what}: {type(exc).__name__}: {exc}"
            progress(f"  t={now:6.1f}s {args['error']}")

    def _step(self, kind: str, fault: Fault, now: float) -> None:
        """A fault the scenario engine carries out, as the same step would be in a
        topology's scenario."""
        args = fault.args
        server = args.get("server", "")
        step: Step
        if kind == "kill":
            if server in self.engine.dead:
                args["skipped"] = f"{server} is not up"
                return
            step = Kill(at=fault.at, server=server)
        elif kind == "join":
            step = Add(at=fault.at, server=server)
        elif kind == "set_share":
            step = SetShare(at=fault.at, server=server, share=Fraction(str(args["share"])))
        else:
            step = Rebalance(at=fault.at, target=float(args["target"]))
        self.engine.carry_out(step, now)
        args["carried_out"] = round(now, 3)
        if kind == "kill":
            for role in ROLES_OF["server"]:
                self.expected[(server, role)] = False
        if kind == "join":
            # A member in the engine's eyes once its programs are ready: until then an
            # operator's command goes to another server, never waits for this one.
            self.engine.dead.add(server)
        progress(f"  t={now:6.1f}s {step.describe()}")

    def _flood(self, fault: Fault, now: float) -> None:
        if self.flood is None:
            if self.builder is not None:
                self.builder.join(60)
            if not self.packets:
                fault.args["error"] = "the flood's packets were not built"
                return
            host = f"{FLOOD_FROM_LAN}{self.args.clients_per_lan}"
            self.flood = LabFlood(self.packets, self.lab, self.topology, host)
        packets = int(fault.args["packets"])
        self.flood.start(packets, float(fault.until or fault.at) - fault.at)
        fault.args["carried_out"] = round(now, 3)
        fault.args["from"] = self.flood.host
        progress(f"  t={now:6.1f}s flood of {packets} packets at ra from {self.flood.host}")

    def _check_started(self, now: float) -> None:
        """Servers and the router daemon started again: ready yet? (never waited for)"""
        ready = self.lab.daemons.ready
        for server, deadline in list(self.control.starting.items()):
            try:
                if not all(ready(server, role, deadline) for role in SERVER_START):
                    continue
            except LabError as exc:
                self.unexpected.append({"process": server, "at": round(now, 2), "error": str(exc)})
                del self.control.starting[server]
                continue
            del self.control.starting[server]
            self.engine.dead.discard(server)
            for role in ROLES_OF["server"]:
                self.expected[(server, role)] = True
            for fault in self.faults:
                if fault.args.get("server") != server or "ready_at" in fault.args:
                    continue
                started = {"kill": "restarted_at", "join": "carried_out"}.get(fault.kind)
                if started is not None and started in fault.args:
                    fault.args["ready_at"] = round(now, 3)
        if self.router_pending is not None:
            fault, deadline = self.router_pending
            try:
                if not ready(ROUTER, "router", deadline):
                    return
            except LabError as exc:
                self.unexpected.append({"process": ROUTER, "at": round(now, 2), "error": str(exc)})
                self.router_pending = None
                return
            self.router_pending = None
            self.expected[(ROUTER, "router")] = True
            killed = self.killed_at.get(id(fault), fault.at)
            fault.args["ready_at"] = round(now, 3)
            fault.args["down_actual_s"] = round(now - killed, 3)
            self.router_starts[-1].update(
                {"ready_at": round(now, 3), "down_actual_s": round(now - killed, 3)}
            )
            progress(f"  t={now:6.1f}s {ROUTER}'s router daemon ready (down {now - killed:.2f} s)")

    def _check_programs(self, now: float) -> None:
        """A program that should run and does not: an exit we did not cause."""
        for (node, role), running in self.expected.items():
            if running and self.lab.pid(node, role) is None:
                self.expected[(node, role)] = False
                self.unexpected.append({"process": f"{node}.{role}", "at": round(now, 2)})
                progress(f"  t={now:6.1f}s {node}.{role} exited unexpectedly")

    def _finish(self) -> None:
        """What only a lab that is still up can tell: the clients' owners now, each
        program's CPU time; then the clients' record."""
        prober = self.prober
        now = prober.now()
        self.samples.append(sample(self.lab, self.topology, now))
        for name, pid in programs(self.lab, self.topology).items():
            self.cpu[name] = cpu_seconds(pid)
        served = [c for c in prober.clients.values() if c.last_reply >= now - self.window]
        owners: dict[str, str | None] = {}
        for server in self.engine.live_servers():
            try:
                addresses = [c.address for c in served]
                owners = self.lab.ask(server, "server", {"op": "owners", "addresses": addresses})[
                    "owners"
                ]
                break
            except (OSError, ValueError, KeyError):
                continue
        wrong = sorted(c.name for c in served if owners and owners.get(c.address) != c.server)
        changes_of, changes = self._changes()
        by_server: dict[str, int] = {}
        for client in served:
            if client.server is not None:
                by_server[client.server] = by_server.get(client.server, 0) + 1
        clients = self.ledger.record(prober, self.window)
        answered = sum(self.ledger.ok_per_s.values())
        self.end = {
            "clients_not_at_owner_at_end": len(wrong),
            "clients_not_at_owner_detail": wrong[:20],
            "clients_by_server_at_end": dict(sorted(by_server.items())),
            # answers after their request's timeout, and second answers to one request
            "late_or_duplicate_answers": sum(c.replies for c in prober.clients.values()) - answered,
            "request_send_errors": dict(prober.send_errors),
            "epoch_changes": changes,
            "epoch_changes_of": changes_of,
        }
        self._record = (self.owners.record(self.done), clients)

    def _changes(self) -> tuple[str | None, list[list[Any]]]:
        """Every allocation change the first live server that answers adopted (s1, as
        the overlay's `epoch_changes`; no kill takes it), as [bench time, epoch, why]:
        its agent gives them on the host's monotonic clock, which the prober's shares."""
        for server in self.engine.live_servers():
            try:
                answer = self.lab.ask(server, "server", {"op": "changes"})
                rows = [[round(t - self.prober.t0, 3), e, why] for t, e, why in answer["changes"]]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            return server, rows
        return None, []

    def collect_logs(self) -> None:
        """Every program's log: scanned for tracebacks, kept in --logs DIR if asked
        (before the lab goes down: its run directory goes with it)."""
        if not self.lab.run_dir.exists():
            return
        if self.args.logs is not None:
            self.args.logs.mkdir(parents=True, exist_ok=True)
        for log in sorted(self.lab.run_dir.glob("*.log")):
            text = log.read_text(errors="replace")
            if "Traceback" in text:
                self.tracebacks[log.stem] = text[text.index("Traceback") :][:3000]
            if self.args.logs is not None:
                shutil.copy(log, self.args.logs / log.name)

    # -- the figures ---------------------------------------------------------------
    def result(self) -> dict[str, Any]:
        if self._record is None:
            raise RuntimeError("the soak did not run to its end")
        infra, clients = self._record
        self.done.extend(f.as_dict() for f in self.faults if "carried_out" in f.args)
        result = analyse(
            self.faults, infra, clients, self.seconds, self.args.technique, self.args.rate
        )
        keep_every_loss(result, self.args.logs)
        names = sorted({k for s in self.samples for k in s if k not in ("t", "mfc_entries")})
        growth: dict[str, Any] = {}
        for name in names:
            growth[name] = fit_per_hour(last_incarnation(self.samples, name), [name])[name]
        result.update(self.end)
        result.update(
            {
                "bench": "soak",
                "variant": "kernel lab",
                "seed": self.args.seed,
                "minutes": self.args.minutes,
                "clients": 2 * self.args.clients_per_lan,
                "rate_per_client": self.args.rate,
                "request_timeout_s": REQUEST_TIMEOUT_S,
                "membership": self.args.membership,
                "heartbeat_ms": self.args.heartbeat_ms,
                "heartbeat_misses": self.args.heartbeat_misses,
                "fault_kinds": list(self.args.kinds),
                "kinds_not_done": dict(NOT_DONE),
                "faults_not_carried_out": [
                    f.as_dict() for f in self.faults if "carried_out" not in f.args
                ],
                "lab": self.lab_info,
                "unexpected_exits": self.unexpected,
                "tracebacks": self.tracebacks,
                "flood_sent": self.flood.sent if self.flood is not None else {},
                "flood_send_errors": self.flood.errors if self.flood is not None else 0,
                "router_starts": self.router_starts,
                "cpu_s": self.cpu,
                "samples": self.samples,
                "growth_per_hour": growth,
                "mfc_entries_growth": mfc_growth(self.samples, sorted(self.topology.routers)),
                "private": False,
            }
        )
        result["ok"] = result["sessions_lost"] == 0 and not self.unexpected and not self.tracebacks
        return result


if __name__ == "__main__":
    from _common import not_a_bench

    not_a_bench(__file__, "bench/soak.py --lab")
