"""Helpers for benches that run a live pool on the overlay: topologies as text, free
port ranges, pool-hosting child processes and a shared time base.

Every process of one pool waits until the same CLOCK_MONOTONIC instant before it
starts, so "bench time" (seconds since that instant) means the same in all of them;
each child still measures its own offset, and the figures use it.

Not a bench itself: bench/reallocation.py uses it and prints the json result line.
"""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
import asyncio
import bisect
import math
import multiprocessing
import sys
import time
import traceback
from array import array
from collections.abc import Callable, Mapping, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NamedTuple

from _heap_census import HeapCensus
from _heap_trace import HeapTrace
from _pymalloc import arenas
from manycast.drivers import heap as heap_memory
from manycast.drivers.overlay_network import OverlayNetwork
from manycast.runtime import PoolRun
from manycast.topology import loads

# Below Linux's ephemeral range (32768+) and apart from the 41000+ ranges the tests
# probe, so concurrent test runs and benches rarely race for the same ports.
PORT_SEARCH = range(21000, 32000, 1201)


class HeapProbe(NamedTuple):
    """Where a pool process's memory grew from bench time `from_s` to its end: by the
    line that allocated it (`by="line"`, `_heap_trace`: it slows the process) or by
    the attribute or type that holds it (`by="owner"`, `_heap_census`)."""

    by: str
    from_s: float


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def table(kind: str, array: bool = True, **keys: Any) -> str:
    body = "".join(f"{k} = {_toml(v)}\n" for k, v in keys.items())
    return f"[[{kind}]]\n{body}" if array else f"[{kind}]\n{body}"


# Per family: the pool's group and the two client LANs.
POOL_GROUP = {4: "232.1.1.1", 6: "ff3e::8000:1"}
CLIENT_LANS = {4: ("10.1.0.0/16", "10.2.0.0/16"), 6: ("2001:db8:1::/64", "2001:db8:2::/64")}


def two_router_pool(
    *,
    technique: str,
    clients_per_lan: int,
    rate: float,
    duration: float,
    steps: Sequence[tuple[float, str, dict[str, Any]]] = (),
    heartbeat_ms: int = 100,
    heartbeat_misses: int = 3,
    report_interval_ms: int = 1000,
    membership: str = "heartbeat",
    family: int = 4,
    client_options: Mapping[str, Any] | None = None,
) -> str:
    """Two edge routers, each with two servers and one client LAN:

        a1..aN -- ra -- s1, s2
                  |  (1 ms)
        b1..bN -- rb -- s3, s4

    Client LANs have no emulated delay: on loopback the hosts' own processing is
    the delay, and emulating one more per datagram costs the CPU the pool needs.
    `family` 6: the same pool on an IPv6 network (its group and client LANs IPv6,
    the other addresses from the plan's 2001:db8::/32). `client_options`: more keys
    of both `[[clients]]` tables (`thin_stream`, `rto_max_ms`, `max_retries`).
    """
    parts = [
        table(
            "pool",
            array=False,
            group=POOL_GROUP[family],
            technique=technique,
            heartbeat_ms=heartbeat_ms,
            heartbeat_misses=heartbeat_misses,
            report_interval_ms=report_interval_ms,
            membership=membership,
        ),
        table("router", name="ra"),
        table("router", name="rb"),
        table("link", between=["ra", "rb"], delay_ms=1),
    ]
    for name, router in (("s1", "ra"), ("s2", "ra"), ("s3", "rb"), ("s4", "rb")):
        parts.append(table("server", name=name, router=router))
    for group, router, subnet in zip(("a", "b"), ("ra", "rb"), CLIENT_LANS[family], strict=True):
        parts.append(
            table(
                "clients",
                name=group,
                count=clients_per_lan,
                router=router,
                subnet=subnet,
                rate=rate,
                delay_ms=0,
                **(client_options or {}),
            )
        )
    for at, action, args in steps:
        parts.append(table("scenario", at=round(at, 3), action=action, **args))
    parts.append(table("run", array=False, duration=duration))
    return "\n".join(parts)


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile (the runtime's definition), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(pct / 100 * len(ordered)) - 1))
    return ordered[index]


def median(values: Sequence[float]) -> float | None:
    finite = sorted(v for v in values if v is not None)
    if not finite:
        return None
    mid = len(finite) // 2
    return finite[mid] if len(finite) % 2 else (finite[mid - 1] + finite[mid]) / 2


class Transitions:
    """A boolean per item sampled over time, kept as change points: state at time t."""

    def __init__(self, count: int) -> None:
        self.times: list[list[float]] = [[] for _ in range(count)]
        self.states: list[list[bool]] = [[] for _ in range(count)]

    def record(self, index: int, at: float, state: bool) -> None:
        states = self.states[index]
        if not states or states[-1] != state:
            self.times[index].append(at)
            states.append(state)

    def at(self, index: int, t: float) -> bool:
        i = bisect.bisect_right(self.times[index], t)
        return self.states[index][i - 1] if i else False

    def shifted(self, by: float) -> Transitions:
        out = Transitions(len(self.times))
        out.times = [[t + by for t in times] for times in self.times]
        out.states = [list(s) for s in self.states]
        return out


def every(loop: asyncio.AbstractEventLoop, period: float, probe: Callable[[], None]) -> None:
    """Call `probe` every `period` seconds on the loop itself, not through the
    overlay's call_at, which would also flush every local node after each call."""

    def tick() -> None:
        probe()
        loop.call_later(period, tick)

    loop.call_soon(tick)


_ROW = 5  # a live-heap row: bench time and `_live`'s four figures


def _live() -> tuple[float, ...]:
    """What this process's heap holds now: the interpreter's allocated blocks (its
    objects and buffers), malloc's MB in use, and pymalloc's MB of arenas held and of
    blocks in use in them (`_pymalloc`). Each is NaN where not counted: the blocks
    and arenas under another allocator (`PYTHONMALLOC=malloc`, where malloc's MB in
    use holds every object)."""
    in_use = heap_memory.in_use_mb()
    small = arenas()
    blocks = math.nan if small is None else sys.getallocatedblocks()
    return blocks, math.nan if in_use is None else in_use, *(small or (math.nan, math.nan))


def host_pool(
    conn: Connection,
    text: str,
    local: set[str],
    base_port: int,
    seed: int,
    duration: float,
    label: str,
    setup: Callable[[PoolRun, asyncio.AbstractEventLoop, float], None],
    collect: Callable[[PoolRun, float], Any],
    progress_every: float = 5.0,
    progress_line: Callable[[PoolRun], str] | None = None,
    heap_every: float | None = None,
    heap_probe: HeapProbe | None = None,
) -> None:
    """Child process body: build the nodes in `local`, report "built", wait for
    ("go", start) with `start` a CLOCK_MONOTONIC instant, start then, run for
    `duration`, and send ("done", collect(run, offset)) with the process's CPU seconds
    added as "cpu_s". `offset` is this process's pool time minus bench time (a few ms
    at most). Errors go back as ("error", text). With `heap_every`, what the process's
    heap holds is sampled that often and sent as "live_heap": rows of [bench time, the
    interpreter's allocated blocks, malloc's MB in use (`heap.in_use_mb`), pymalloc's
    MB of arenas held and MB of blocks in use in them (`_pymalloc.arenas`)], each
    None where not counted (`_live`).
    With `heap_probe`, what grew most from its bench time to the end is sent as
    "heap_growth_by_line" or "heap_growth_by_owner" (`HeapProbe`)."""
    try:
        run = PoolRun(loads(text), "overlay", seed=seed, base_port=base_port, local=local)
        conn.send(("built", None))
        message, start = conn.recv()
        if message != "go":
            return
        offset: list[float] = []
        heap = array("d")  # flat rows, so the record adds no objects to what it counts
        trace: HeapTrace | HeapCensus | None = None
        if heap_probe is not None:
            trace = HeapTrace() if heap_probe.by == "line" else HeapCensus()

        network = run.network
        assert isinstance(network, OverlayNetwork)
        loop = network.loop
        time.sleep(max(0.0, start - time.monotonic()))

        def started() -> None:
            offset.append(start - (time.monotonic() - run.now))
            setup(run, loop, offset[0])
            if heap_every is not None:
                every(loop, heap_every, lambda: heap.extend((run.now - offset[0], *_live())))
            if trace is not None and heap_probe is not None:
                wait = max(0.0, heap_probe.from_s - (run.now - offset[0]))
                loop.call_later(wait, lambda: trace.mark(round(run.now - offset[0], 2)))

        network.call_at(0.0, started)
        last = [0.0]

        def tick(snap: Any) -> None:
            if progress_line is not None and snap.now - last[0] >= progress_every:
                last[0] = snap.now
                print(f"  {label} t={snap.now:5.1f}s {progress_line(run)}", file=sys.stderr)

        run.run(duration, tick, tick=0.5)
        grown = trace.growth() if trace is not None else None  # the pool's, not collect's
        result = collect(run, offset[0] if offset else 0.0)
        result["cpu_s"] = round(time.process_time(), 2)
        if trace is not None and heap_probe is not None:
            result[f"heap_growth_by_{heap_probe.by}"] = grown
            result["heap_traced_from"] = trace.marked_at
            result["heap_paused_s"] = trace.paused_s
            result["heap_growth_total"] = trace.total
        if heap_every is not None:
            rows = [heap[i : i + _ROW] for i in range(0, len(heap), _ROW)]
            result["live_heap"] = [
                [round(t, 2), None if math.isnan(blocks) else int(blocks)]
                + [None if math.isnan(mb) else mb for mb in sizes]
                for t, blocks, *sizes in rows
            ]
        conn.send(("done", result))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def run_together(
    children: Sequence[tuple[str, Callable[..., None], tuple[Any, ...]]], wait: float
) -> list[Any]:
    """Run one spawned process per (name, target, args), each hosting part of a pool
    with `host_pool`: `target(conn, *args)` gets its end of a pipe first. Wait until
    every one has built its nodes, start them all at one CLOCK_MONOTONIC instant,
    and return what each sent when done (in `children`' order; `wait` seconds each at
    most). The processes are daemons, and are stopped whatever happens."""
    ctx = multiprocessing.get_context("spawn")
    started = []
    try:
        for name, target, args in children:
            parent, child = ctx.Pipe()
            process = ctx.Process(target=target, args=(child, *args), name=name, daemon=True)
            process.start()
            child.close()
            started.append((process, parent))
        for process, conn in started:
            expect(conn, process.name, "built", 60)
        start = time.monotonic() + 0.3
        for _, conn in started:
            conn.send(("go", start))
        return [expect(conn, process.name, "done", wait) for process, conn in started]
    finally:
        for process, conn in started:
            process.join(5)
            if process.is_alive():
                process.terminate()
                process.join(5)
            conn.close()


def node_command(path: Path, node: str, base_port: int, duration: float, seed: int) -> list[str]:
    """`manycast run` hosting only `node` of the topology at `path`: the process a
    bench SIGKILLs to crash that node for real. `seed` is the one the rest of the
    pool was built with: without a key file the pool's key derives from it, and a
    node of another seed signs with another key (docs/soak.md, finding 35)."""
    command = [sys.executable, "-m", "manycast", "run", str(path), "--nodes", node]
    command += ["--base-port", str(base_port), "--duration", f"{duration:g}"]
    return [*command, "--seed", str(seed)]


def expect(conn: Connection, name: str, what: str, wait: float) -> Any:
    """The payload of the message `what` from the child process `name`, which
    `host_pool` sends as (what, payload); its error, or silence, raised here."""
    if not conn.poll(wait):
        raise RuntimeError(f"{name}: no {what!r} within {wait:.0f} s")
    message, payload = conn.recv()
    if message == "error":
        raise RuntimeError(f"{name} failed:\n{payload}")
    if message != what:
        raise RuntimeError(f"{name}: expected {what!r}, got {message!r}")
    return payload


def servers_line(run: PoolRun) -> str:
    """A progress line of the servers hosted here: the epoch, each one's share and sessions."""
    servers = run.nodes.servers.values()
    if not servers:
        return "no server running here (standbys: " + ", ".join(run.nodes.standby) + ")"
    parts = []
    for s in servers:
        allocation = s.coordinator.allocation
        held = allocation is not None and s.name in allocation.servers
        share = float(allocation.share(s.name)) if held else 0.0  # type: ignore[union-attr]
        parts.append(f"{s.name}={share:.0%}/{s.sessions}")
    epoch = max(s.coordinator.epoch for s in servers)
    return f"epoch {epoch} share/sessions " + " ".join(parts)


if __name__ == "__main__":
    from _common import not_a_bench

    not_a_bench(__file__, "bench/failover.py, reallocation.py, redirect.py and soak.py")
