"""Live kernel TCP connections in a lab run: a paced download per client, moved by the scenario.

A topology whose scenario moves connections (a `move` step, a `set_share` or
`rebalance` with `move = true`, or `[run] tcp_moves = true`) runs, beside the
pool's own service and clients, the movable TCP service
(`drivers/kernel/tcp_service.py`) on its servers and one paced download
(`GET /bytes/<huge>?rate=<r>`) from every client, read by a thread in the
client's namespace with every byte compared with the pattern it must be. The
steps move connections with the driver's mover (`drivers/kernel/tcp_move.TcpMover`):
in a VIP pool `move` and `drain` move a server's connections; in a manycast
pool a client's server is its portion's owner, so its connections move when the
allocation does (`reallocate`: a drain, or a change with `move = true`). A
`kill` kills the server's service (its connections break, as a crash breaks
them), an `add` starts it.

The pause a moved connection saw is the longest gap between two reads of its
download that overlaps its move (the pacing alone leaves gaps of about
64 KiB / rate). `summary()` is the run summary's `kernel.tcp` section.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import socket
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from manycast.drivers import netns
from manycast.drivers.kernel import tcp_apps
from manycast.drivers.kernel.tcp_move import TcpMover
from manycast.lab.build import Lab
from manycast.topology import Topology

HUGE = 1 << 40  # a download that does not end within a run
RATE = 8 << 20  # bytes/s per download: a read every ~8 ms, so a pause stands out
STALL_S = 2.0  # a download with no byte for this long at the end is broken
FOLLOW_S = 5.0  # a manycast pool's change with its connections: how long it may take
RESOLVE_S = 3.0  # then how long a client's move is tried again before it stays pinned
POLL_S = 0.05
Flow = tuple[str, int]


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def gap_around(times: list[float], start: float, end: float) -> float | None:
    """The longest gap between two reads that overlaps [start, end] (seconds)."""
    best: float | None = None
    for before, after in itertools.pairwise(times):
        if after < start or before > end:
            continue
        best = after - before if best is None else max(best, after - before)
    return best


class Download:
    """One paced download read by a thread in a client's namespace; every byte checked."""

    def __init__(self, ns: str, client: str, address: str, server: tuple[str, int]) -> None:
        self.ns, self.client, self.address, self.server = ns, client, address, server
        self.offset = 0
        self.times: list[float] = []
        self.flow: Flow | None = None
        self.broken: str | None = None
        self.stopping = threading.Event()
        self.connected = threading.Event()
        self.sock: socket.socket | None = None
        self.thread = threading.Thread(target=self._run, name=f"download-{client}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _connect(self) -> bytes:
        family = socket.AF_INET6 if ":" in self.server[0] else socket.AF_INET
        sock = netns.socket_in(self.ns, family, socket.SOCK_STREAM)
        self.sock = sock
        sock.settimeout(15.0)
        sock.connect(self.server)
        sock.sendall(f"GET /bytes/{HUGE}?rate={RATE} HTTP/1.1\r\nHost: pool\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed before the headers")
            head += chunk
        self.flow = (self.address, sock.getsockname()[1])
        self.connected.set()
        return head.split(b"\r\n\r\n", 1)[1]

    def _run(self) -> None:
        try:
            data = self._connect()
            while not self.stopping.is_set():
                if data:
                    if data != tcp_apps.body(self.offset, len(data)):
                        self.broken = f"wrong bytes at offset {self.offset}"
                        return
                    self.offset += len(data)
                    self.times.append(time.perf_counter())
                data = self.sock.recv(1 << 16)  # type: ignore[union-attr]
                if not data:
                    raise ConnectionError("the server closed the download")
        except OSError as exc:
            if not self.stopping.is_set():
                self.broken = f"{type(exc).__name__}: {exc}"

    def stop(self) -> None:
        self.stopping.set()
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(timeout=10)
        if self.sock is not None:
            self.sock.close()


@dataclass
class MoveRecord:
    """One flow's move: when, where from and to, and how it went."""

    flow: Flow
    old: str
    new: str
    start: float
    end: float
    moved: bool
    edge_hold_ms: float
    reason: str = ""


@dataclass
class TcpMoves:
    """The scenario's `ConnectionMover` in the lab: the mover, the downloads, the record."""

    lab: Lab
    topology: Topology
    mover: TcpMover = field(init=False)
    downloads: list[Download] = field(default_factory=list)
    records: list[MoveRecord] = field(default_factory=list)
    steps: int = 0
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    follower: threading.Thread | None = None
    # At the end: the clients whose live connection a server other than their owner
    # holds (None: not looked at yet).
    misplaced: list[str] | None = None

    def __post_init__(self) -> None:
        self.mover = TcpMover(self.lab, self.topology)

    def start(self) -> None:
        """The service on every running server, then a download from every client."""
        servers = [s.name for s in self.topology.servers.values() if s.authorized and not s.standby]
        self.mover.start(servers)
        for name, spec in sorted(self.topology.clients.items()):
            if spec.authorized:
                address = str(self.topology.address(name))
                # (A dual-stack pool: the TCP address of the client's family.)
                target = (self.mover.address_for(address), self.mover.port)
                self.downloads.append(Download(self.lab.ns(name), name, address, target))
        for download in self.downloads:
            download.start()

    # -- ConnectionMover ---------------------------------------------------------------
    def move(self, server: str, to: list[str], count: int) -> None:
        self.steps += 1
        try:
            flows = self.mover.connections(server)
        except (OSError, ValueError):
            return  # its service is gone: nothing to move
        if count:
            flows = flows[:count]
        shares: dict[str, list[Flow]] = defaultdict(list)
        if self.mover.group is None:
            for i, flow in enumerate(flows):
                shares[to[i % len(to)]].append(flow)
        else:  # a manycast pool: the path is the client's, so are the shares
            clients = sorted({f[0] for f in flows})
            for flow in flows:
                shares[to[clients.index(flow[0]) % len(to)]].append(flow)
        for target, group in shares.items():
            self._move(group, server, target)

    def _move(self, flows: list[Flow], server: str, target: str) -> set[Flow]:
        """Move `flows` and record each flow that went (or not); the flows moved."""
        if target not in self.mover.processes:
            return set()
        self.mover.wait_ready(target)
        with self.lock:
            start = time.perf_counter()
            result = self.mover.move(flows, server, target)
            end = time.perf_counter()
        moved = set(result.moved)
        for flow in sorted(set(flows) | moved):
            reason = result.refused.get(f"{flow[0]}:{flow[1]}", "")
            self.records.append(
                MoveRecord(flow, server, target, start, end, flow in moved, result.pause_ms, reason)
            )
        return moved

    def drain(self, server: str, to: list[str]) -> None:
        """Before `server`'s share goes to 0: a VIP pool moves its connections now (the
        edges' tags hold them, whatever the allocation). In a manycast pool a drain is
        a change of the allocation with its connections (`reallocate`)."""
        if self.mover.group is None:
            self.move(server, to, 0)
            return
        self.reallocate(server, Fraction(0))

    def reallocate(self, server: str | None, share: Fraction | None) -> None:
        """A manycast pool's allocation is about to change (`server`'s share becomes
        `share`; None: a rebalance), and its clients' connections go with their
        portions. Before the change, every client with a live connection is pinned
        to the server that holds its sockets (the routers steer its (client, group)
        entry there: the change cannot take its path away while they are there); it
        is every such client, not only those whose portion will move, because the
        pool decides the new allocation only as it commits it (a rebalance's depends
        on the loads its coordinator holds). Once a live agent shows the change
        committed, each pinned client is looked up: its owner has its sockets, and
        the pin goes; or its connections move to its new owner, then both paths are
        handed back to the allocation, which now agrees. A VIP pool's flows keep
        their server when shares change: nothing to do."""
        if self.mover.group is None:
            return
        self.steps += 1
        if self.follower is not None:  # one change at a time: pins of two would cross
            self.follower.join(timeout=FOLLOW_S + RESOLVE_S)
        before = self._view()
        holders = self._holders()
        by_server: dict[str, list[str]] = defaultdict(list)
        for client, holder in holders.items():
            by_server[holder].append(client)
        for holder, clients in sorted(by_server.items()):
            self._steer(clients, holder, holder)
        if not holders:
            return
        self.follower = threading.Thread(
            target=self._follow,
            args=(holders, server, share, before),
            name="reallocate-follower",
            daemon=True,
        )
        self.follower.start()

    def _holders(self) -> dict[str, str]:
        """Each client with a live connection, and the server that holds it."""
        holders: dict[str, str] = {}
        for server in sorted(self.mover.processes):
            try:
                flows = self.mover.connections(server)
            except (OSError, ValueError):  # its service is gone
                continue
            for client, _ in flows:
                holders.setdefault(client, server)
        return holders

    def _steer(self, clients: list[str], toward: str, to: str | None) -> None:
        """The routers from each client's edge to `toward`: steer to `to` (None: back to
        the allocation)."""
        self.mover.steer(clients, toward, to)

    def _view(self) -> tuple[int, dict[str, Fraction]] | None:
        """A live agent's epoch and shares (None: no agent answered)."""
        for server in sorted(self.mover.processes):
            with contextlib.suppress(OSError, ValueError, KeyError, ZeroDivisionError):
                answer = self.lab.ask(server, "server", {"op": "status"})
                shares = {s: Fraction(f) for s, f in answer["shares"].items()}
                return int(answer["epoch"]), shares
        return None

    def _committed(
        self,
        before: tuple[int, dict[str, Fraction]] | None,
        server: str | None,
        share: Fraction | None,
    ) -> bool:
        """Whether a live agent has installed the change asked for after `before`: a
        later epoch and, for a share, `server`'s nearer to `share` than it was."""
        now = self._view()
        if now is None or before is None or now[0] <= before[0]:
            return False
        if server is None or share is None:
            return True
        was = before[1].get(server, Fraction(0))
        return abs(now[1].get(server, Fraction(0)) - share) < abs(was - share)

    def _follow(
        self,
        holders: dict[str, str],
        server: str | None,
        share: Fraction | None,
        before: tuple[int, dict[str, Fraction]] | None,
    ) -> None:
        deadline = time.monotonic() + FOLLOW_S
        while time.monotonic() < deadline and not self._committed(before, server, share):
            time.sleep(POLL_S)
        # A drained server's agent is left out of the look-ups: it is about to go.
        leaving = server if share == 0 else None
        pending = dict(holders)
        deadline = time.monotonic() + RESOLVE_S
        while pending:
            owners = self._owners(sorted(pending), leaving)
            for client, holder in sorted(pending.items()):
                owner = owners.get(client)
                if owner is None or (owner != holder and owner not in self.mover.processes):
                    continue  # not known yet, or its service is not running (yet)
                if owner == holder:
                    self._steer([client], holder, None)
                    del pending[client]
                    continue
                try:
                    flows = [f for f in self.mover.connections(holder) if f[0] == client]
                except (OSError, ValueError):
                    flows = []  # the holder's service is gone, its connections with it
                if not flows or self._move(flows, holder, owner):
                    # Its owner has it now (or nothing is left to move): the pins on
                    # both paths go.
                    self._steer([client], holder, None)
                    self._steer([client], owner, None)
                    del pending[client]
            if not pending or time.monotonic() >= deadline:
                break  # a client left pinned keeps its connections where they are
            time.sleep(POLL_S)

    def _owners(self, addresses: list[str], leaving: str | None) -> dict[str, str | None]:
        """The pool's owner of each address, asked of a live agent other than `leaving`."""
        for server in sorted(self.mover.processes):
            if server == leaving:
                continue
            with contextlib.suppress(OSError, ValueError, KeyError):
                answer = self.lab.ask(server, "server", {"op": "owners", "addresses": addresses})
                return dict(answer["owners"])
        return {}

    def server_killed(self, server: str) -> None:
        if self.follower is not None:
            self.follower.join(timeout=FOLLOW_S + RESOLVE_S)
        self.mover.kill_server(server)

    def server_added(self, server: str) -> None:
        self.mover.start_server(server, wait=False)

    # -- the end -----------------------------------------------------------------------
    def close(self) -> None:
        """Stop the downloads (a silent one is broken) and the service."""
        if self.closed:
            return
        self.closed = True
        if self.follower is not None:
            self.follower.join(timeout=FOLLOW_S + RESOLVE_S)
        self.misplaced = self._misplaced()
        now = time.perf_counter()
        for download in self.downloads:
            if download.broken is None and (
                not download.times or now - download.times[-1] > STALL_S
            ):
                download.broken = f"no byte for the last {STALL_S:.0f} s"
        for download in self.downloads:
            download.stop()
        self.mover.close()

    def _misplaced(self) -> list[str]:
        """The clients whose live download a server other than their owner holds (in a
        manycast pool a client's connections are its owner's once the moves are done;
        a VIP pool's flows keep their server: none)."""
        if self.mover.group is None:
            return []
        live = [d for d in self.downloads if d.flow is not None and d.broken is None]
        holders = self.mover.where(d.flow for d in live if d.flow is not None)
        owners = self._owners(sorted({d.address for d in live}), None)
        return sorted(
            d.client
            for d in live
            if d.flow is not None and holders.get(d.flow) != owners.get(d.address)
        )

    def pauses_ms(self) -> list[float]:
        """The longest gap each moved connection's download saw around its move (ms)."""
        by_flow = {d.flow: d for d in self.downloads if d.flow is not None}
        with self.lock:
            records = list(self.records)
        pauses: list[float] = []
        for record in records:
            download = by_flow.get(record.flow)
            if record.moved and download is not None:
                gap = gap_around(list(download.times), record.start, record.end)
                if gap is not None:
                    pauses.append(gap * 1e3)
        return pauses

    def live(self) -> tuple[int, int, dict[str, float | None]]:
        """For the progress line: connections moved so far, downloads broken, and the
        pauses the moved ones saw (ms: p50, p99, max)."""
        with self.lock:
            moved = sum(1 for r in self.records if r.moved)
        broken = sum(1 for d in self.downloads if d.broken is not None)
        return moved, broken, _figures(self.pauses_ms())

    def summary(self) -> dict[str, Any]:
        """`moved`, `refused`, `broken`, `bytes_verified` and the pauses (ms) moved
        connections saw (`pause_ms`: p50, p99, max), beside the edge's hold per move."""
        pauses = self.pauses_ms()
        holds = [r.edge_hold_ms for r in self.records if r.moved]
        quiet = self._quiet_gaps()
        return {
            "steps": self.steps,
            "connections": len(self.downloads),
            "moved": sum(1 for r in self.records if r.moved),
            "refused": {f"{r.flow[0]}:{r.flow[1]}": r.reason for r in self.records if not r.moved},
            "broken": sum(1 for d in self.downloads if d.broken is not None),
            "broken_reasons": {d.client: d.broken for d in self.downloads if d.broken},
            "connections_not_at_owner": self.misplaced,
            "bytes_verified": sum(d.offset for d in self.downloads),
            "pause_ms": _figures(pauses),
            "edge_hold_ms": _figures(holds),
            "gap_without_moves_ms": _figures(quiet),
            "rate_bytes_per_s": RATE,
            "families": self._by_family(),
        }

    def _by_family(self) -> dict[str, dict[str, int]]:
        """The downloads, moves, breaks and bytes checked of each family's clients
        (`ipv4`, `ipv6`: a dual-stack pool has both)."""
        families: dict[str, dict[str, int]] = {}
        for download in self.downloads:
            name = f"ipv{ipaddress.ip_address(download.address).version}"
            counts = families.setdefault(
                name, {"connections": 0, "moved": 0, "broken": 0, "bytes_verified": 0}
            )
            counts["connections"] += 1
            counts["broken"] += download.broken is not None
            counts["bytes_verified"] += download.offset
        for record in self.records:
            name = f"ipv{ipaddress.ip_address(record.flow[0]).version}"
            if record.moved and name in families:
                families[name]["moved"] += 1
        return families

    def _quiet_gaps(self) -> list[float]:
        """The downloads' gaps away from every move (ms): the pacing's own unevenness."""
        busy: dict[Flow, list[tuple[float, float]]] = defaultdict(list)
        for record in self.records:
            busy[record.flow].append((record.start - 0.01, record.end + 0.25))
        gaps = []
        for download in self.downloads:
            spans = busy.get(download.flow, []) if download.flow else []
            for before, after in itertools.pairwise(download.times):
                if not any(a <= after and before <= b for a, b in spans):
                    gaps.append((after - before) * 1e3)
        return gaps


def _figures(values: list[float]) -> dict[str, float | None]:
    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, 2)

    return {
        "p50": rounded(percentile(values, 50)),
        "p99": rounded(percentile(values, 99)),
        "max": rounded(max(values, default=None)),
        "count": len(values),
    }


__all__ = ["Download", "MoveRecord", "TcpMoves", "gap_around", "percentile"]
