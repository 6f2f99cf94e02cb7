"""Live kernel TCP connections moved between the lab's servers (root), against reset (R1).

The pool is the bundled vip.toml (two clients per LAN, no scenario), or with
`--pool manycast` the bundled demo.toml (a manycast pool: a move steers the
routers' (client, group) entries; `drivers/kernel/tcp_manycast.py`), with the movable
TCP service (`drivers/kernel/tcp_service.py`) on s1..s4; `drivers/kernel/tcp_move.py`
moves connections: the edge holds the flow, the old server freezes, dumps and hands
the socket (signed) to the new one, the edge releases the flow onto the new segment.

1. Pauses. `--streams` downloads (`GET /bytes/<huge>?rate=<rate>`, paced by the
   server's kernel, SO_MAX_PACING_RATE) read by client threads in the clients'
   namespaces, every byte compared with the pattern it must be (`bytes_verified`).
   Rounds of both kinds in random order, on the streams in turn: a move to another
   server, or (R1) the server resets the connection and the client reconnects at
   once and resumes from its offset. The pause of a round is the longest gap
   between two reads of the stream that overlaps the round (`pause_*`: moves;
   `r1_gap_*`: resets); the pacing alone leaves gaps of ~64 KiB / rate. Beside them: the
   round trip of a line on an established connection (`rtt_ms`, application level),
   the gaps of the streams away from any round (`gap_without_rounds_p99_ms`: the
   pacing's own), and the edge's hold time per move (`edge_hold_*`, hold to release).
   `connections_broken`: a moved stream that failed (reset, end, wrong byte).
   `--delay-ms D` (default 10) gives the clients' edge links D ms one way and turns
   on the lab's emulated link delay (`bench/_tcp_move_delay.py`), so that a
   reconnect costs real round trips (`rtt_ms` says how long one is); 0: no delay.
2. Drain. `--drain` echo connections from one client, all on its server, move in
   batches of `--batch` to the other servers; `moves_per_s` is connections over the
   drain's wall time; each connection then answers its next line, numbered on.

Progress goes to stderr.

Its last line on stdout is one json object (`_common.run_and_emit`): the result,
or why it stopped (an error, a missing package, SIGTERM or Ctrl-C).
"""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
import argparse
import contextlib
import itertools
import os
import random
import re
import resource
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Mapping
from importlib.resources import files
from pathlib import Path
from typing import Any

import _plots
import _tcp_move_delay
from _common import progress, run_and_emit
from _pool import percentile
from manycast.drivers import netns
from manycast.drivers.kernel import tcp_apps
from manycast.drivers.kernel.tcp_move import TcpMover
from manycast.lab import Lab
from manycast.topology import Topology

NEEDS_ROOT = "the kernel lab needs root (network namespaces, TCP_REPAIR, iptables' NFQUEUE)"
SERVERS = ["s1", "s2", "s3", "s4"]
PORT = 7100
HUGE = 1 << 40  # a download that never ends within the bench
WINDOW_S = 0.25  # after a round, how long its gap may still be running (quiet gaps)


def pool_toml(pool: str) -> str:
    """vip.toml, or (manycast) demo.toml, with two clients per LAN and no scenario."""
    name = "vip.toml" if pool == "vip" else "demo.toml"
    text = files("manycast").joinpath("topologies", name).read_text()
    text = text.replace("count = 60", "count = 2").replace("count = 120", "count = 2")
    return re.sub(r"\[\[scenario\]\].*?(?=\n\[run\])", "", text, flags=re.S)


def _wait_serving(lab: Lab, address: str) -> None:
    """A manycast pool: until a connection from a1 to the pool's TCP address is
    answered (the servers' joins have reached the routers)."""
    deadline = time.monotonic() + 30
    while True:
        sock = netns.socket_in(lab.ns("a1"), socket.AF_INET, socket.SOCK_STREAM)
        with sock:
            sock.settimeout(2.0)
            try:
                sock.connect((address, PORT))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the manycast pool never answered") from None
        time.sleep(0.2)


def _wait_following(lab: Lab, topology: Topology) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if all(
                len(lab.ask(v, "vip_router", {"op": "status"})["alive"]) >= 4
                for v in topology.vip_routers
            ):
                return
        time.sleep(0.1)
    raise RuntimeError("the VIP routers never followed the servers")


class Stream:
    """One paced download read by a thread in a client's namespace; every byte checked."""

    def __init__(self, lab: Lab, topology: Topology, client: str, rate: int, vip: str) -> None:
        self.ns = lab.ns(client)
        self.vip = vip
        self.address = str(topology.address(client))
        self.rate = rate
        self.offset = 0
        self.times: list[float] = []
        self.flow: tuple[str, int] | None = None
        self.expect_reset = False
        self.resets = 0
        self.broken: list[str] = []
        self.stopping = threading.Event()
        self.sock: socket.socket | None = None
        self.connected = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _connect(self) -> bytes:
        sock = netns.socket_in(self.ns, socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(10.0)
        sock.connect((self.vip, PORT))
        path = f"/bytes/{HUGE}?rate={self.rate}&from={self.offset}"
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: vip\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed before the headers")
            head += chunk
        self.sock = sock
        self.flow = (self.address, sock.getsockname()[1])
        self.connected.set()
        return head.split(b"\r\n\r\n", 1)[1]

    def _run(self) -> None:
        data = self._connect()
        while not self.stopping.is_set():
            if data:
                if data != tcp_apps.body(self.offset, len(data)):
                    self.broken.append(f"wrong bytes at {self.offset}")
                    return
                self.offset += len(data)
                self.times.append(time.perf_counter())
            try:
                assert self.sock is not None
                data = self.sock.recv(1 << 16)
                if not data:
                    raise ConnectionError("the server closed the stream")
            except OSError as exc:
                if self.stopping.is_set():
                    return
                if not self.expect_reset:
                    self.broken.append(f"{type(exc).__name__}: {exc}")
                self.expect_reset = False
                self.connected.clear()
                with contextlib.suppress(OSError):
                    self.sock.close()  # type: ignore[union-attr]
                try:
                    data = self._connect()  # R1: reconnect at once, resume where it was
                except OSError as again:
                    self.broken.append(f"cannot reconnect: {again}")
                    return
                finally:
                    self.resets += 1

    def stop(self) -> None:
        self.stopping.set()
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(timeout=10)
        if self.sock is not None:
            self.sock.close()


def gap_around(times: list[float], start: float, end: float) -> float | None:
    """The longest gap between two reads that overlaps the round [start, end] (a round
    stops the stream's data from its start: the gap it causes overlaps it)."""
    best: float | None = None
    for before, after in itertools.pairwise(times):
        if after < start or before > end:
            continue
        gap = after - before
        best = gap if best is None else max(best, gap)
    return best


def application_rtt(lab: Lab, vip: str, client: str, count: int) -> float:
    """Median round trip of a line on an established connection through the VIP (ms)."""
    sock = netns.socket_in(lab.ns(client), socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(5.0)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect((vip, PORT))
        reader = sock.makefile("rb")
        samples = []
        for i in range(count):
            began = time.perf_counter()
            sock.sendall(b"ping %d\n" % i)
            reader.readline()
            samples.append((time.perf_counter() - began) * 1e3)
        reader.close()
    return statistics.median(samples)


def pauses(
    lab: Lab, topology: Topology, mover: TcpMover, args: argparse.Namespace
) -> dict[str, Any]:
    rng = random.Random(args.seed)
    clients = ["a1", "a2", "b1", "b2"]
    streams = [
        Stream(lab, topology, clients[i % len(clients)], args.rate, mover.vip)
        for i in range(args.streams)
    ]
    for stream in streams:
        stream.start()
    for stream in streams:
        if not stream.connected.wait(10):
            raise RuntimeError("a stream did not connect")
    time.sleep(0.5)  # every stream flowing
    rounds = ["move"] * args.moves + ["reset"] * args.resets
    rng.shuffle(rounds)
    events: list[dict[str, Any]] = []
    began = time.perf_counter()
    for i, kind in enumerate(rounds):
        # The streams in turn: a stream's rounds are len(streams) spacings apart, so a
        # gap is one round's.
        stream = streams[i % len(streams)]
        if not stream.connected.wait(5) or stream.flow is None:
            continue
        flow = stream.flow
        where = mover.where([flow])
        if flow not in where:
            continue
        server = where[flow]
        start = time.perf_counter()
        if kind == "move":
            target = rng.choice([s for s in SERVERS if s != server])
            result = mover.move([flow], server, target)
            end = time.perf_counter()
            events.append(
                {
                    "kind": kind,
                    "stream": streams.index(stream),
                    "start": start,
                    "end": end,
                    "moved": result.moved == [flow],
                    "edge_hold_ms": result.pause_ms,
                    "bytes": result.bytes,
                }
            )
        else:
            resets = stream.resets
            stream.expect_reset = True
            answer = mover.ask(server, {"op": "reset", "flows": [list(flow)]})
            deadline = time.monotonic() + 5
            while not (stream.resets > resets and stream.connected.is_set()):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"stream {flow} reset on {server} did not come back: resets "
                        f"{stream.resets}, connected {stream.connected.is_set()}, now "
                        f"{stream.flow}, broken {stream.broken}, {server} answered {answer}"
                    )
                time.sleep(0.001)
            end = time.perf_counter()
            events.append(
                {"kind": kind, "stream": streams.index(stream), "start": start, "end": end}
            )
        if (i + 1) % 50 == 0:
            progress(f"  {i + 1} of {len(rounds)} rounds")
        time.sleep(args.spacing)
    time.sleep(WINDOW_S + 0.1)
    elapsed = time.perf_counter() - began
    for stream in streams:
        stream.stop()
    move_gaps, r1_gaps, holds = [], [], []
    for event in events:
        gap = gap_around(streams[event["stream"]].times, event["start"], event["end"])
        event["gap_ms"] = None if gap is None else gap * 1e3
        if event["kind"] == "move" and event["moved"]:
            holds.append(event["edge_hold_ms"])
            if gap is not None:
                move_gaps.append(gap * 1e3)
        elif event["kind"] == "reset" and gap is not None:
            r1_gaps.append(gap * 1e3)
    quiet = _quiet_gaps(streams, events)
    moved = sum(1 for e in events if e["kind"] == "move" and e["moved"])
    broken = sum(1 for s in streams if s.broken)
    return {
        "moves": moved,
        "moves_refused": sum(1 for e in events if e["kind"] == "move" and not e["moved"]),
        "resets": sum(1 for e in events if e["kind"] == "reset"),
        "connections_broken": broken,
        "broken_reasons": [reason for s in streams for reason in s.broken][:10],
        "bytes_verified": sum(s.offset for s in streams),
        "pause_p50_ms": _round(percentile(move_gaps, 50)),
        "pause_p99_ms": _round(percentile(move_gaps, 99)),
        "pause_max_ms": _round(max(move_gaps, default=None)),
        "r1_gap_p50_ms": _round(percentile(r1_gaps, 50)),
        "r1_gap_p99_ms": _round(percentile(r1_gaps, 99)),
        "edge_hold_p50_ms": _round(percentile(holds, 50)),
        "edge_hold_p99_ms": _round(percentile(holds, 99)),
        "gap_without_rounds_p50_ms": _round(percentile(quiet, 50)),
        "gap_without_rounds_p99_ms": _round(percentile(quiet, 99)),
        "moved_bytes_p50": percentile([e["bytes"] for e in events if "bytes" in e], 50),
        "move_gaps_ms": [round(g, 3) for g in move_gaps],
        "r1_gaps_ms": [round(g, 3) for g in r1_gaps],
        "streams": len(streams),
        "rate_bytes_per_s": args.rate,
        "seconds": round(elapsed, 1),
    }


def _quiet_gaps(streams: list[Stream], events: list[dict[str, Any]]) -> list[float]:
    """Gaps between reads away from every round (ms): the streams' own unevenness."""
    busy: dict[int, list[tuple[float, float]]] = {}
    for event in events:
        busy.setdefault(event["stream"], []).append(
            (event["start"] - 0.01, event["end"] + WINDOW_S)
        )
    gaps = []
    for index, stream in enumerate(streams):
        spans = busy.get(index, [])
        for before, after in itertools.pairwise(stream.times):
            if not any(a <= after and before <= b for a, b in spans):
                gaps.append((after - before) * 1e3)
    return gaps


def drain(lab: Lab, topology: Topology, mover: TcpMover, count: int, batch: int) -> dict[str, Any]:
    """`count` echo connections from a1, all on its server, drained to the others."""
    vip = mover.vip
    socks = []
    for _ in range(count):
        sock = netns.socket_in(lab.ns("a1"), socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(10.0)
        sock.connect((vip, PORT))
        sock.sendall(b"hello\n")
        socks.append(sock)
    for sock in socks:
        if sock.recv(64) != b"1 hello\n":
            raise RuntimeError("a drain connection was not answered")
    flows = [("10.1.0.2", s.getsockname()[1]) for s in socks]
    where = mover.where(flows)
    server = where[flows[0]]
    on_server = sum(1 for f in flows if where.get(f) == server)
    others = [s for s in SERVERS if s != server]
    if mover.group is not None:
        # A manycast pool: the path is a1's, so all its connections go to one server.
        others, batch = others[:1], max(batch, on_server)
    progress(f"  draining {on_server} connections from {server} to {', '.join(others)}")
    began = time.perf_counter()
    results = mover.drain(server, others, batch=batch)
    elapsed = time.perf_counter() - began
    moved = sum(len(r.moved) for r in results)
    broken = 0
    for sock in socks:
        try:
            sock.sendall(b"again\n")
            if sock.recv(64) != b"2 again\n":
                broken += 1
        except OSError:
            broken += 1
        sock.close()
    return {
        "drain_connections": on_server,
        "drain_moved": moved,
        "drain_seconds": round(elapsed, 3),
        "moves_per_s": round(moved / elapsed, 1) if elapsed > 0 else None,
        "drain_batch": batch,
        "drain_edge_hold_ms_per_batch": [round(r.pause_ms, 1) for r in results],
        "drain_connections_broken": broken,
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    began = time.monotonic()
    result: dict[str, Any] = {"bench": "tcp_move"}
    if os.geteuid() != 0:
        result.update({"reason": NEEDS_ROOT, "moves": None, "pause_p99_ms": None})
        return result
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    load_start = round(os.getloadavg()[0], 2)
    lab = Lab(
        prefix=f"tmb{os.getpid()}", run_root=Path(tempfile.mkdtemp(prefix="manycast-tcpmove-"))
    )
    lab.down()
    text = pool_toml(args.pool)
    if args.delay_ms > 0:
        text = _tcp_move_delay.with_client_delay(text, args.delay_ms, args.router_delays)
    topology = lab.up(text, "tcp-move-bench.toml", emulate_delay=args.delay_ms > 0)
    mover = TcpMover(lab, topology)
    result["pool"] = args.pool
    result["client_link_delay_ms"] = args.delay_ms
    result["router_link_delays"] = bool(args.delay_ms > 0 and args.router_delays)
    try:
        mover.start(SERVERS)
        if args.pool == "vip":
            _wait_following(lab, topology)
        else:
            _wait_serving(lab, mover.vip)
        progress("application round trip")
        result["rtt_ms"] = round(application_rtt(lab, mover.vip, "a2", 100), 3)
        progress(f"pauses: {args.moves} moves and {args.resets} resets, random order")
        result.update(pauses(lab, topology, mover, args))
        result["pause_p99_over_r1_p99"] = _ratio(result["pause_p99_ms"], result["r1_gap_p99_ms"])
        result["pause_p50_over_rtt"] = _ratio(result["pause_p50_ms"], result["rtt_ms"])
        result["pause_p50_over_r1_p50"] = _ratio(result["pause_p50_ms"], result["r1_gap_p50_ms"])
        p99, r1_p99 = result["pause_p99_ms"], result["r1_gap_p99_ms"]
        result["goal_met"] = p99 is not None and r1_p99 is not None and p99 <= 50 and p99 < r1_p99
        if args.delay_ms > 0:
            result.update(_tcp_move_delay.delay_status(lab, topology))
        progress(f"drain: {args.drain} connections, {args.batch} per move")
        result.update(drain(lab, topology, mover, args.drain, args.batch))
    finally:
        mover.close()
        lab.down()
    result["goal_pause_p99_ms"] = 50
    result["loadavg_1min_start_end"] = [load_start, round(os.getloadavg()[0], 2)]
    result["seconds"] = round(time.monotonic() - began, 1)
    _plots.write(result, args.plots, plot)
    return result


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


def plot(result: Mapping[str, Any], directory: Path) -> list[Path]:
    """The CDF of the gaps a stream saw around each move and each reset (R1), with the
    goal; the figures side by side."""
    fig, ax = _plots.figure("Longest gap in a live download around a move or a reset")
    _plots.cdf(
        ax,
        {
            "move (TCP_REPAIR)": result.get("move_gaps_ms") or [],
            "reset and reconnect (R1)": result.get("r1_gaps_ms") or [],
        },
        xlabel="gap (ms)",
    )
    ax.set_ylabel("fraction of rounds")
    _plots.vertical(
        ax, float(result.get("goal_pause_p99_ms") or 50), "goal: p99 <= 50 ms", colour="#1d9a5b"
    )
    ax.legend(fontsize=8)
    paths = [_plots.save(fig, directory, "tcp_move_gaps")]
    fig, axes = _plots.grid("Moving live kernel TCP connections", 2)
    _plots.bars(
        axes[0],
        {
            "move p50": result.get("pause_p50_ms"),
            "move p99": result.get("pause_p99_ms"),
            "R1 p50": result.get("r1_gap_p50_ms"),
            "R1 p99": result.get("r1_gap_p99_ms"),
            "rtt": result.get("rtt_ms"),
        },
        ylabel="ms",
        fmt="{:.1f}",
    )
    _plots.bars(
        axes[1],
        {"drain moves/s": result.get("moves_per_s")},
        ylabel=f"connections moved per second ({result.get('drain_connections')} at once)",
        fmt="{:.0f}",
    )
    paths.append(_plots.save(fig, directory, "tcp_move_figures"))
    return paths


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    _plots.add_argument(parser)
    parser.add_argument("--moves", type=int, default=240, help="move rounds (default 240)")
    parser.add_argument("--resets", type=int, default=60, help="R1 rounds (default 60)")
    parser.add_argument("--streams", type=int, default=4, help="paced downloads (default 4)")
    parser.add_argument(
        "--rate", type=int, default=8 << 20, help="bytes/s per download (default 8 MiB/s)"
    )
    parser.add_argument("--spacing", type=float, default=0.08, help="seconds between rounds")
    parser.add_argument("--drain", type=int, default=500, help="connections drained at once")
    parser.add_argument("--batch", type=int, default=100, help="connections per transfer")
    parser.add_argument("--seed", type=int, default=20240917)
    parser.add_argument(
        "--delay-ms",
        type=float,
        default=10.0,
        help="one-way delay of the clients' edge links, emulated (default 10; 0: none)",
    )
    parser.add_argument(
        "--router-delays",
        action="store_true",
        help="with --delay-ms, also emulate the topology's delays between routers (1-4 ms)",
    )
    parser.add_argument(
        "--pool",
        choices=("vip", "manycast"),
        default="vip",
        help="vip.toml (the edge's tag moves), or demo.toml (manycast: the routers'"
        " (client, group) entries are steered; a client's connections move together)",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_arguments()  # before run_and_emit, so that --help prints on stdout
    run_and_emit("tcp_move", lambda: measure(args))


if __name__ == "__main__":
    main()
