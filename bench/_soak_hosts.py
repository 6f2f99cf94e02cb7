"""The soak's long-lived pool processes (bench/soak.py starts them):

- the infrastructure: router ra and servers s1, s2; it carries out the faults that
  act inside a pool (share changes, rebalances, loss bursts and delay spikes on its
  side of the core link) and records every allocation it adopts;
- each standby server (s5, s6), alone: built at the start, it joins the pool at its
  join fault (`infra_child` with that server and that fault), as a new machine
  would; so a join adds no server to the infrastructure's process, whose memory
  the soak measures;
- the clients: all of them; every second it folds the clients' per-request lists
  into compact figures (answers and failures per second, latencies, each session
  loss with the first answer after it, each client's first answer after each router
  restart) and writes them out to a file (`Spill`), which the bench reads back at
  the end, so that its memory measures the clients, not the bench's figures (which
  grow with the run);
- router rb (`RouterProcess`), SIGKILLed and started again by the router_restart
  fault; it carries out the loss bursts and delay spikes on its side of the core link.

Each tees its stderr into a log file the bench scans for tracebacks.

Run alone, it prints one json object, its last line on stdout, naming the bench
to run (`_common.not_a_bench`).
"""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
import asyncio
import bisect
import dataclasses
import functools
import json
import math
import multiprocessing
import sys
import time
import traceback
from array import array
from collections import Counter, defaultdict
from fractions import Fraction
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from _pool import HeapProbe, every, host_pool, servers_line
from _soak_analysis import on_losses, owners_bytes
from _soak_plan import CORE_LINK, LOCAL_SERVERS, Fault
from manycast.drivers.overlay_network import OverlayNetwork
from manycast.runtime import PoolRun
from manycast.summary import served_recently, served_window
from manycast.topology import loads
from manycast.wire import control

HARVEST_S = 1.0
SAMPLE_S = 0.05
WRONG = ("state lost", "answer to no request")
LATENCIES_PER_MINUTE = 2000  # the latencies kept a minute (for its p50 and p99)
LIVE_HEAP_S = 10.0  # each pool process samples what its heap holds alive this often


class Spill:
    """A clients' process's figures, written out each harvest as one JSON line and
    dropped (`write`); `read` puts them back together in the bench's process.

    The per-second counts, the latencies kept and the session losses grow with the
    run: held in the clients' process they made its memory grow by about 4 MB an
    hour for 40 clients' latencies alone (the VIP pool's process in a 30-minute
    soak), which the soak would report as the clients' growth."""

    FIGURES = ("ok_per_s", "failed_per_s", "latency_per_min", "wrong")

    def __init__(self, path: Path) -> None:
        self.path = path
        self._out = path.open("w", buffering=1)

    def write(self, state: dict[str, Any], final: bool = False) -> None:
        """Write the figures harvested since the last call and the losses whose first
        answer after them has come (every loss, when `final`); drop them."""
        losses: list[list[Any]] = state["losses"]
        done = [r for r in losses if final or r[3] is not None]
        losses[:] = [r for r in losses if not final and r[3] is None]
        line = {name: state[name] for name in self.FIGURES}
        line["losses"] = done
        self._out.write(json.dumps(line, separators=(",", ":")) + "\n")
        for name in self.FIGURES:
            state[name].clear()
        if final:
            self._out.close()

    @staticmethod
    def read(result: dict[str, Any]) -> dict[str, Any]:
        """`result` (a clients' process's) with the figures it wrote out."""
        ok: dict[int, int] = {}
        failed: dict[int, int] = {}
        latency: dict[int, list[float]] = {}
        losses: list[list[Any]] = []
        wrong: list[list[Any]] = []
        with Path(result["spill"]).open() as lines:
            for text in lines:
                line = json.loads(text)
                for into, got in ((ok, line["ok_per_s"]), (failed, line["failed_per_s"])):
                    for second, n in got.items():
                        into[int(second)] = into.get(int(second), 0) + n
                for minute, kept in line["latency_per_min"].items():
                    latency.setdefault(int(minute), []).extend(kept)
                losses.extend(line["losses"])
                wrong.extend(line["wrong"])
        losses.sort(key=lambda r: r[1])
        return {
            **result,
            "ok_per_s": ok,
            "failed_per_s": failed,
            "latency_per_min": latency,
            "losses": losses,
            "wrong": wrong,
        }


class _Tee:
    """stderr for a child: the terminal and a log file."""

    def __init__(self, out: TextIO, log: Path) -> None:
        self.out, self.log = out, log.open("a", buffering=1)

    def write(self, text: str) -> int:
        self.out.write(text)
        self.log.write(text)
        return len(text)

    def flush(self) -> None:
        self.out.flush()
        self.log.flush()


def _tee(log: Path) -> None:
    sys.stderr = _Tee(sys.stderr, log)


def align_wall_clock(run: PoolRun) -> float:
    """Give this process's nodes the wall clock as it is: call at pool time 0.

    The overlay reads the wall clock for its nodes (`wall_base`, the wall-clock
    time at pool time 0) when the pool is built, but its pool time starts when it
    runs; a process that builds, then waits for the rest of the pool to be built
    (up to a minute on a busy machine), has nodes whose wall clock is behind by that
    wait. A private pool's routers refuse signed joins more than 30 s off their own
    clock ("stale"), so a router started at once (a restarted rb, `manycast run`)
    refused every registration of clients that had waited 30 s. Returns the lag."""
    lag = time.time() - (run.network.wall_base + run.now)
    if abs(lag) < 0.05:
        return lag
    for router in run.nodes.routers.values():
        if router.admission is not None:
            router.admission.wall_base += lag
    for client in run.nodes.clients.values():
        client.wall_base += lag
        client.guard.wall_base += lag
    replaced: dict[int, Any] = {}
    for server in [*run.nodes.servers.values(), *run.nodes.standby.values()]:
        for holder in (server, server.coordinator):
            old = holder.settings
            new = replaced.setdefault(
                id(old), dataclasses.replace(old, wall_base=old.wall_base + lag)
            )
            holder.settings = new
        redirector = getattr(server, "redirector", None)  # technique D signs with it
        if redirector is not None:
            redirector.wall_base += lag
    return lag


# -- the infrastructure ---------------------------------------------------------------


def _refusals(router: Any) -> dict[str, int]:
    """The joins and registrations a router refused, by reason ("no key": its pool's
    key could not be had from DNS)."""
    return {str(reason): count for reason, count in router.stats.rejected.items() if count}


def _core_ports(run: PoolRun) -> list[Any]:
    """The overlay's ports on the core link. The overlay has no public call to change
    a link at run time; its ports keep delay and loss as plain attributes read on each
    send, and the core link already takes the emulated path (it has a delay)."""
    network = run.network
    assert isinstance(network, OverlayNetwork)
    hosts = network.overlay._hosts
    ports = []
    for attachment in run.topology.links[CORE_LINK].members:
        host = hosts.get(attachment.node)
        if host is not None:
            port = host.ports[attachment.iface]
            if not port.emulated:
                raise RuntimeError(f"{CORE_LINK} is not emulated: its loss cannot change")
            ports.append(port)
    return ports


def _link_faults(run: PoolRun, faults: list[Fault], offset: float) -> None:
    """Carry out the loss bursts and delay spikes on this process's side of the core
    link; `offset` is pool time minus bench time. A fault already under way when the
    process starts (a restarted router) is carried out at once, for what is left of it."""
    ports = _core_ports(run)
    normal = [(p.loss, p.delay) for p in ports]
    now = run.now - offset

    def act(fault: Fault) -> None:
        for port in ports:
            if fault.kind == "loss_burst":
                port.loss = float(fault.args["loss"])
            else:
                port.delay = float(fault.args["delay_s"])

    def restore(fault: Fault) -> None:
        for port, (loss, delay) in zip(ports, normal, strict=True):
            if fault.kind == "loss_burst":
                port.loss = loss
            else:
                port.delay = delay

    for fault in faults:
        if fault.kind not in ("loss_burst", "delay_spike") or fault.until is None:
            continue
        if fault.until > now:
            run.network.call_at(max(fault.at, now) + offset, functools.partial(act, fault))
            run.network.call_at(fault.until + offset, functools.partial(restore, fault))


def _infra_setup(faults: list[Fault], state: dict[str, Any]) -> Any:
    def setup(run: PoolRun, loop: asyncio.AbstractEventLoop, offset: float) -> None:
        state["wall_clock_lag_s"] = round(align_wall_clock(run), 3)
        servers = run.nodes.servers
        names = sorted(run.topology.clients)
        addresses = np.array([int(run.topology.address(n)) for n in names], dtype=np.uint32)
        epochs: dict[int, tuple[float, bytes]] = state["epochs"]
        order: list[str] = state["servers"]

        def sample() -> None:
            for name in LOCAL_SERVERS:  # not a standby's process: the infrastructure's
                server = servers.get(name)
                if server is None:
                    continue
                coordinator = server.coordinator
                allocation = coordinator.allocation
                if allocation is None or coordinator.epoch in epochs:
                    continue
                owners = owners_bytes(allocation, order, addresses)
                epochs[coordinator.epoch] = (run.now - offset, owners)

        if any(name in servers for name in LOCAL_SERVERS):
            every(loop, SAMPLE_S, sample)

        def receiver() -> str:
            return next(n for n in LOCAL_SERVERS if n in servers)

        def act(fault: Fault) -> None:
            now = run.now
            state["done"].append((fault.kind, round(now - offset, 3)))
            if fault.kind == "set_share":
                op: Any = control.SetShareOp(
                    fault.args["server"], Fraction(fault.args["share"]).limit_denominator(1000)
                )
                run.command(receiver(), op)
            elif fault.kind == "rebalance":
                run.command(receiver(), control.RebalanceOp(float(fault.args["target"]), ()))
            elif fault.kind == "join":  # the server starts in the process hosting it
                run.engine.added.add(fault.args["server"])
                run.start_server(fault.args["server"])

        _link_faults(run, faults, offset)
        for fault in faults:  # every one is recorded as done when its time comes
            run.network.call_at(fault.at + offset, functools.partial(act, fault))

    return setup


def _first_local_server(run: PoolRun) -> Any:
    """The first of this process's servers that is running (s1 unless it is down)."""
    return next((run.nodes.servers[n] for n in LOCAL_SERVERS if n in run.nodes.servers), None)


def _changes(run: PoolRun, offset: float) -> list[list[Any]]:
    """The epoch changes the first local server adopted, as [bench time, epoch, why]:
    why the allocation changed when it churns (the other servers' logs agree)."""
    server = _first_local_server(run)
    if server is None:
        return []
    return [[round(t - offset, 3), epoch, why] for t, epoch, why in server.coordinator.changes]


def _allocation_at_end(run: PoolRun) -> dict[str, Any]:
    """The first local server's allocation at the end: its epoch, its runs of buckets
    with one owner and each server's value/mask portions (how fragmented the
    space became; each portion is a pair in a join and a router's filter)."""
    server = _first_local_server(run)
    allocation = server.coordinator.allocation if server is not None else None
    if server is None or allocation is None:
        return {}
    return {
        "epoch": server.coordinator.epoch,
        "runs": sum(1 for _ in allocation.runs()),
        "portions": {s: len(allocation.portions(s)) for s in allocation.servers},
    }


def infra_child(
    conn: Connection,
    text: str,
    local: set[str],
    base: int,
    seed: int,
    duration: float,
    faults: list[Fault],
    log: Path,
    progress_every: float,
    heap_probe: HeapProbe | None = None,
) -> None:
    """The infrastructure's process (`local`: ra, s1, s2; every pool fault), or a
    standby's (`local`: that server; `faults`: its join alone). Its progress lines
    are labelled with the process's name."""
    _tee(log)
    state: dict[str, Any] = {"epochs": {}, "servers": [], "done": []}

    def collect(run: PoolRun, offset: float) -> dict[str, Any]:
        refusals = {name: _refusals(r) for name, r in run.nodes.routers.items()}
        return {
            **state,
            "offset": offset,
            "refusals": refusals,
            "changes": _changes(run, offset),
            "allocation_at_end": _allocation_at_end(run),
        }

    host_pool(
        conn,
        text,
        local,
        base,
        seed,
        duration,
        multiprocessing.current_process().name,
        _infra_setup(faults, state),
        collect,
        progress_every=progress_every,
        progress_line=servers_line,
        heap_every=LIVE_HEAP_S,
        heap_probe=heap_probe,
    )


# -- the clients ----------------------------------------------------------------------


def _clients_setup(state: dict[str, Any]) -> Any:
    """Every HARVEST_S: per-second answer and failure counts, latencies per minute (at
    most 2000 kept), each session loss (the client's `_lost`) with its cause and the
    first answer after it, each client's first answer after each instant of
    `state["watch"]` (bench times, in order); then the clients' own lists are emptied."""

    def setup(run: PoolRun, loop: asyncio.AbstractEventLoop, offset: float) -> None:
        state["wall_clock_lag_s"] = round(align_wall_clock(run), 3)
        clients = [run.nodes.clients[n] for n in state["names"]]
        ok: dict[int, int] = state["ok_per_s"]
        failed: dict[int, int] = state["failed_per_s"]
        latency: dict[int, list[float]] = state["latency_per_min"]
        kept_per_min: dict[int, int] = defaultdict(int)  # latencies kept each minute
        # [client, t, cause, first ok after, the server its connection was sent to]
        losses: list[list[Any]] = state["losses"]
        spill = Spill(Path(state["spill"]))
        waiting: dict[int, list[list[Any]]] = defaultdict(list)

        def lost(index: int, now: float, why: str, via: str | None) -> None:
            record = [index, round(now - offset, 4), why, None, via]
            losses.append(record)
            waiting[index].append(record)

        on_losses(clients, run.topology, lost)

        carried = [0] * len(clients)  # each client's last answer stays in its list
        watch: list[float] = state["watch"]
        again: list[array[float]] = state["again"]  # [instant][client]: first answer
        watched = [0] * len(clients)  # each client's next instant without its answer

        def harvest() -> None:
            for index, client in enumerate(clients):
                stats = client.stats
                fresh = stats.ok_times[carried[index] :]
                if fresh:
                    for t, lat in zip(fresh, stats.latencies, strict=False):
                        b = int(t - offset)
                        ok[b] = ok.get(b, 0) + 1
                        if kept_per_min[b // 60] < LATENCIES_PER_MINUTE:
                            kept_per_min[b // 60] += 1
                            latency.setdefault(b // 60, []).append(lat)
                    pending = waiting.get(index)
                    if pending:
                        for record in pending:
                            after = next(
                                (t - offset for t in fresh if t - offset > record[1]), None
                            )
                            if after is not None:
                                record[3] = round(after, 4)
                        waiting[index] = [r for r in pending if r[3] is None]
                    k = watched[index]
                    while k < len(watch) and watch[k] + offset < fresh[-1]:
                        first = fresh[bisect.bisect_right(fresh, watch[k] + offset)]
                        again[k][index] = round(first - offset, 4)
                        k += 1
                    watched[index] = k
                    # The last answer stays: "served lately" reads it.
                    del stats.ok_times[:-1]
                    stats.latencies.clear()
                    carried[index] = 1
                stats.moves.clear()  # D's accepted redirects: one tuple each, not read here
                if stats.failures:
                    for t, why in stats.failures:
                        b = int(t - offset)
                        failed[b] = failed.get(b, 0) + 1
                        if why.startswith(WRONG):
                            state["wrong"].append([index, round(t - offset, 4), why])
                    stats.failures.clear()
                    stats.disruptions.clear()
            spill.write(state)

        def finish() -> None:
            harvest()
            spill.write(state, final=True)
            state["again"] = [[None if math.isnan(t) else t for t in row] for row in again]

        every(loop, HARVEST_S, harvest)
        state["finish"] = finish

    return setup


def clients_state(names: list[str], watch: list[float], spill: Path) -> dict[str, Any]:
    """What `_clients_setup` fills for `names`; its figures go to the file `spill`."""
    return {
        "names": names,
        "ok_per_s": {},
        "failed_per_s": {},
        "latency_per_min": {},
        "losses": [],
        "wrong": [],
        "watch": sorted(watch),
        # NaN until answered; `finish` turns them into None. Floats in a list are an
        # object each, made as the run goes: 15 instants of 1000 clients are 360 KB
        # in a 30-minute run whose clients' process grew about 500 KB in all.
        "again": [array("d", [math.nan]) * len(names) for _ in watch],
        "spill": str(spill),
    }


def served_at_end(run: PoolRun, duration: float) -> int:
    """The clients answered within `served_window` of the run's end (as the
    progress line counts, and as every scenario's summary does): of its `duration`,
    not of `run.now`, which goes on while the process counts its heap after the run
    (`--census-heap`)."""
    clients = list(run.nodes.clients.values())
    window = served_window(c.rate for c in clients)
    return served_recently(clients, min(run.now, duration), window)


def redirects(run: PoolRun) -> dict[str, Any]:
    """D's change-destinations at the clients: followed, and refused by reason (a
    refused one leaves its client sending to a server that gave the connection away)."""
    clients = run.nodes.clients.values()
    refused: Counter[str] = Counter()
    for c in clients:
        refused.update({str(reason): n for reason, n in c.stats.redirects_refused.items()})
    return {
        "followed": sum(c.stats.destination_changes for c in clients),
        "refused": dict(refused),
    }


def client_line(run: PoolRun) -> str:
    clients = list(run.nodes.clients.values())
    window = served_window(c.rate for c in clients)
    served = served_recently(clients, run.now, window)
    open_ = sum(1 for c in clients if c.connected)
    return f"served in {window:g} s {served}/{len(clients)} open {open_}"


def clients_child(
    conn: Connection,
    text: str,
    base: int,
    seed: int,
    duration: float,
    watch: list[float],
    log: Path,
    progress_every: float,
    heap_probe: HeapProbe | None = None,
) -> None:
    """`watch`: bench times (the router restarts) after which to note each client's
    first answer."""
    _tee(log)
    names = sorted(loads(text).clients)
    state = clients_state(names, watch, log.with_suffix(".figures"))

    def collect(run: PoolRun, offset: float) -> dict[str, Any]:
        state["finish"]()
        kept = {k: v for k, v in state.items() if k != "finish"}
        kept["reconnects"] = sum(c.stats.reconnects for c in run.nodes.clients.values())
        kept["connected_at_end"] = sum(1 for c in run.nodes.clients.values() if c.connected)
        # answers that came after their request failed its deadline (on a connection
        # the client kept, `--abandon-after-ms`), every one checked
        kept["late_answers"] = sum(c.stats.late_answers for c in run.nodes.clients.values())
        kept["served_at_end"] = served_at_end(run, duration)
        kept["redirects"] = redirects(run)
        return {**kept, "offset": offset}

    host_pool(
        conn,
        text,
        set(names),
        base,
        seed,
        duration,
        "clients",
        _clients_setup(state),
        collect,
        progress_every=progress_every,
        progress_line=client_line,
        heap_every=LIVE_HEAP_S,
        heap_probe=heap_probe,
    )


# -- the router that restarts ----------------------------------------------------------


def router_child(
    conn: Connection,
    text: str,
    router: str,
    base: int,
    seed: int,
    faults: list[Fault],
    log: Path,
) -> None:
    """One incarnation of `router`: builds it (the ports stay unbound, so it can wait
    while the last incarnation still holds them), reports "built", and on ("go",
    go_at, bench_start, end_at), CLOCK_MONOTONIC instants, starts at go_at with
    nothing but its configuration and its key cache, reports ("up", bench time) once
    its endpoints are bound, and runs until end_at unless SIGKILLed first."""
    _tee(log)
    try:
        # The keys the last incarnation got from DNS (finding 8 in docs/soak.md).
        keys = log.parent / "router-keys"
        run = PoolRun(
            loads(text), "overlay", seed=seed, base_port=base, local={router}, key_cache=keys
        )
        conn.send(("built", None))
        message, go_at, bench_start, end_at = conn.recv()
        if message != "go":
            return
        time.sleep(max(0.0, go_at - time.monotonic()))
        assert isinstance(run.network, OverlayNetwork)

        def started() -> None:
            align_wall_clock(run)
            bench_now = time.monotonic() - bench_start
            _link_faults(run, faults, run.now - bench_now)
            conn.send(("up", round(bench_now, 4)))

        run.network.call_at(0.0, started)
        run.run(max(0.0, end_at - time.monotonic()), None, tick=0.5)
        node = run.nodes.routers[router]
        done = {
            "querier": vars(node.querier.stats),
            "refusals": _refusals(node),
            "cpu_s": time.process_time(),
        }
        conn.send(("done", done))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class RouterProcess:
    """Router `name` in a process of its own, SIGKILLed and started again.

    A new process takes a second or more to import and build the pool on a busy
    machine, longer than the outages the soak draws; so the next incarnation is
    spawned ahead (`prepare`), builds everything but its sockets and waits, and the
    restart only binds them and starts the router. If it is not ready by then, it
    starts when it is, and `down_s` records the outage it really was."""

    def __init__(
        self,
        name: str,
        text: str,
        base: int,
        seed: int,
        faults: list[Fault],
        logs: Path,
    ) -> None:
        self.name, self.text, self.base, self.seed = name, text, base, seed
        self.faults, self.logs = faults, logs
        self.bench_start = self.end_at = 0.0  # CLOCK_MONOTONIC instants, set by `begin`
        self._ctx = multiprocessing.get_context("spawn")
        self.incarnation = 0
        self.current: tuple[Any, Connection] | None = None  # (process, its pipe)
        self.spare: tuple[Any, Connection] | None = None
        self._built = False  # the spare is built
        self._go_due: float | None = None  # bench time the spare should start at
        self._another = False  # a spare was asked for while one waited
        self.killed_at: float | None = None
        self.starts: list[dict[str, Any]] = []  # each incarnation: when it went, came up
        self.exits: list[dict[str, Any]] = []
        self.errors: dict[str, str] = {}

    def prepare(self) -> None:
        """Spawn the next incarnation (it builds and waits for `go`). While a spare
        waits for its own restart, the next one is spawned as soon as that one goes:
        two restarts closer than it takes to build one would otherwise make the
        second's outage a build long (1.6-2 s: longer than the pool's failure
        detection, so the pool split)."""
        if self.spare is not None:
            self._another = True
            return
        self._another = False
        self.incarnation += 1
        parent, child = self._ctx.Pipe()
        log = self.logs / f"{self.name}.{self.incarnation}.log"
        args = (child, self.text, self.name, self.base, self.seed, self.faults, log)
        process = self._ctx.Process(
            target=router_child, args=args, name=f"{self.name}#{self.incarnation}", daemon=True
        )
        process.start()
        child.close()
        self.spare, self._built = (process, parent), False

    def wait_built(self, wait: float) -> None:
        assert self.spare is not None
        process, conn = self.spare
        if not conn.poll(wait):
            raise RuntimeError(f"{process.name}: not built within {wait:.0f} s")
        message, payload = conn.recv()
        if message != "built":
            raise RuntimeError(f"{process.name} failed:\n{payload}")
        self._built = True

    def begin(self, bench_start: float, end_at: float) -> None:
        """Start the first incarnation with the rest of the pool, at bench time 0."""
        self.bench_start, self.end_at = bench_start, end_at
        self.go(0.0)

    def kill(self, now: float) -> None:
        """SIGKILL the running incarnation (its ports close with it)."""
        self.check(now)
        if self.current is not None:
            process, conn = self.current
            process.kill()
            process.join(10)
            conn.close()
            self.current = None
        self.killed_at = now

    def go(self, at: float) -> None:
        """Start the spare at bench time `at`, or as soon after as it is built."""
        self._go_due = at
        if self.spare is None:  # two restarts closer than it takes to prepare one
            self.prepare()
        self.poll(at)

    def poll(self, now: float) -> None:
        """Start a spare that is due and ready; then note what the processes said."""
        if self._go_due is not None and self.spare is not None:
            process, conn = self.spare
            if not self._built and conn.poll(0):
                message, payload = conn.recv()
                if message != "built":
                    self.errors[process.name] = str(payload)
                    self.spare, self._go_due = None, None
                    return
                self._built = True
            if self._built:
                start = self.bench_start + max(self._go_due, now)
                conn.send(("go", start, self.bench_start, self.end_at))
                self.current, self.spare, self._go_due = self.spare, None, None
                self.starts.append(
                    {"process": process.name, "go": round(start - self.bench_start, 3)}
                )
                if self._another:
                    self.prepare()
        self.check(now)

    def check(self, now: float) -> None:
        """Messages from the running incarnation; an exit we did not cause is unexpected."""
        if self.current is None:
            return
        process, conn = self.current
        try:
            while conn.poll(0):
                message, payload = conn.recv()
                if message == "up" and self.starts:
                    self.starts[-1]["up"] = payload
                    if self.killed_at is not None:
                        self.starts[-1]["down_s"] = round(payload - self.killed_at, 3)
                elif message == "error":
                    self.errors[process.name] = str(payload)
                elif message == "done":
                    self.starts[-1]["done"] = payload
        except (EOFError, OSError):
            pass
        early = now < self.end_at - self.bench_start - 1.0
        if not process.is_alive() and (process.exitcode != 0 or early):
            self.exits.append(
                {"process": process.name, "at": round(now, 2), "returncode": process.exitcode}
            )
            self.current = None

    def pid(self) -> int | None:
        return self.current[0].pid if self.current is not None else None

    def stop(self, now: float) -> None:
        """At the end: let the running incarnation finish, stop any spare."""
        if self.current is not None:
            process, _ = self.current
            process.join(15)
            self.check(now)
        for held in (self.current, self.spare):
            if held is not None:
                process, conn = held
                if process.is_alive():
                    process.kill()
                    process.join(5)
                conn.close()
        self.current = self.spare = None


if __name__ == "__main__":
    from _common import not_a_bench

    not_a_bench(__file__, "bench/soak.py")
