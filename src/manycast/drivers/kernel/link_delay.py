"""Link delay in the kernel lab, emulated in user space: packets wait in an NFQUEUE.

A topology gives each link a one-way `delay_ms`; the memory driver and the
overlay honour it, but the lab's veth pairs and bridges forward at once, and this
kernel has no netem. With `emulate_delay` (`Lab.up`, `MANYCAST_LAB_DELAY=1`) the
lab starts one more program per router with delayed links (`manycast daemon
link-delay`), which makes every packet crossing such a link wait `delay`:

* each direction of a delayed link is delayed once, in a router's namespace:
  what a router receives on an interface waits in iptables' and ip6tables'
  `raw PREROUTING -i IFACE -j NFQUEUE` (the first hook after the device, before
  conntrack, the VIP plane's marks and the edge's hold queue), and on a link to
  a client LAN, a server or a VIP router (hosts have no program of ours) what the
  router sends on it waits in `mangle POSTROUTING -o IFACE -j NFQUEUE` too;
* one queue per (interface, direction), bound with metadata only (no packet
  bytes are copied) and GSO packets whole; the program notes each packet's
  arrival and, `delay` later, gives one batch verdict (NF_ACCEPT for every id up
  to the last one due): a queue's delay is constant, so the packets leave in the
  order they came, with the spacing they came with;
* the kernel's queue is bounded (`QUEUE_LIMIT` packets); beyond it the kernel
  drops and counts (`status`: `dropped`, from /proc/net/netfilter/nfnetlink_queue);
* the rules carry `--queue-bypass`: with no program on the queue (it died, or not
  yet bound) packets pass undelayed rather than being dropped. The program
  removes its rules when it stops; they go with the namespace anyway.

Cost and limits: every packet of a delayed link makes a round trip through one
Python process per router it crosses (one `select` wake-up per burst, one batch
verdict per timer tick), tens of microseconds of CPU per packet; a busy lab pays
that on a shared CPU, and a late wake-up adds to the delay (jitter of the
scheduler, about 0.1-1 ms, more on a loaded machine). The delay is a time in a
queue, not a rate limit: there is no bandwidth or loss emulation. Packets the
kernel forwards without the IP hooks (the portion plane's netdev `fwd`, frames
bridged between two clients of one LAN) are not delayed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import signal
import subprocess
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from manycast.drivers.kernel.control import ControlSocket, Request, command_path, ready_path
from manycast.drivers.kernel.tcp_hold import NFQA_CFG_F_GSO, HoldError, NfQueue, install
from manycast.topology import Topology

ROLE = "link_delay"
QUEUE_BASE = 7300  # queue numbers of a router's delayed paths: QUEUE_BASE, +1, ...
QUEUE_LIMIT = 4096  # packets a queue holds; beyond, the kernel drops (and counts)
IDLE_WAKE_S = 0.2  # with nothing waiting, how often the loop looks at its stop flag

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DelayedPath:
    """One direction of a delayed link at one router: `in` (received on `iface`) or
    `out` (sent on it), held `delay` seconds in NFQUEUE `queue`."""

    iface: str
    direction: str
    delay: float
    queue: int

    def rule(self) -> list[str]:
        if self.direction == "in":
            where = ["-t", "raw", "-A", "PREROUTING", "-i", self.iface]
        else:
            where = ["-t", "mangle", "-A", "POSTROUTING", "-o", self.iface]
        return [*where, "-j", "NFQUEUE", "--queue-num", str(self.queue), "--queue-bypass"]


def delayed_paths(topology: Topology, router: str) -> list[DelayedPath]:
    """The paths `router` delays: what it receives on each delayed link, and what it
    sends on a delayed link whose other end is not a router (that router delays it)."""
    found: list[tuple[str, str, float]] = []
    for link in sorted(topology.links.values(), key=lambda link: link.name):
        if link.delay <= 0 or any(topology.kind(m.node) == "server" for m in link.members):
            # A server's own link: its 0.5 ms is the compiler's stand-in for a host's
            # hop, and the veth is already that close. Queueing every packet of the
            # server through this program costs far more than it models: a TCP move's
            # state transfer crosses two such links several times (bench/tcp_move.py:
            # edge hold 41 ms with them delayed, 9 ms without delay at all).
            continue
        mine = [m for m in link.members if m.node == router]
        if not mine:
            continue
        others = [m for m in link.members if m.node != router]
        found.append((mine[0].iface, "in", link.delay))
        if any(topology.kind(m.node) != "router" for m in others):
            found.append((mine[0].iface, "out", link.delay))
    return [
        DelayedPath(iface, direction, delay, QUEUE_BASE + i)
        for i, (iface, direction, delay) in enumerate(found)
    ]


def delayed_routers(topology: Topology) -> list[str]:
    """The routers with at least one delayed path (the ones that run the program)."""
    return [router for router in topology.routers if delayed_paths(topology, router)]


def kernel_drops() -> dict[int, int]:
    """Per queue of this namespace, the packets the kernel dropped (queue full, or the
    socket's buffer full): /proc/net/netfilter/nfnetlink_queue."""
    drops: dict[int, int] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/netfilter/nfnetlink_queue").read_text().splitlines():
            fields = line.split()
            if len(fields) >= 7 and fields[0].isdigit():
                drops[int(fields[0])] = int(fields[5]) + int(fields[6])
    return drops


@dataclass
class DelayQueue:
    """One delayed path's queue: packet ids in arrival order with the time they are due."""

    path: DelayedPath
    waiting: deque[tuple[float, int]] = field(default_factory=deque)
    passed: int = 0
    most_waiting: int = 0
    late_s: float = 0.0  # the latest any verdict was given after its due time

    def __post_init__(self) -> None:
        self.nfq = NfQueue(self.path.queue, copy_bytes=0, maxlen=QUEUE_LIMIT, flags=NFQA_CFG_F_GSO)

    def take(self, now: float) -> None:
        due = now + self.path.delay
        self.waiting.extend((due, packet_id) for packet_id in self.nfq.read_ids())
        self.most_waiting = max(self.most_waiting, len(self.waiting))

    def release(self, now: float) -> None:
        last: int | None = None
        while self.waiting and self.waiting[0][0] <= now:
            due, last = self.waiting.popleft()
            self.late_s = max(self.late_s, now - due)
            self.passed += 1
        if last is not None:
            self.nfq.accept_through(last)

    def next_due(self) -> float | None:
        return self.waiting[0][0] if self.waiting else None

    def status(self, drops: dict[int, int]) -> dict[str, Any]:
        path = self.path
        return {
            "iface": path.iface,
            "direction": path.direction,
            "delay_ms": round(path.delay * 1e3, 3),
            "queue": path.queue,
            "passed": self.passed,
            "waiting": len(self.waiting),
            "most_waiting": self.most_waiting,
            "dropped": drops.get(path.queue, 0),
            "latest_ms": round(self.late_s * 1e3, 3),
        }


class LinkDelay:
    """A router's delayed paths: their queues and the one loop that serves them all.
    Construct it inside the router's namespace."""

    def __init__(self, paths: list[DelayedPath]) -> None:
        self.queues = [DelayQueue(path) for path in paths]
        self.stopping = False

    def install(self) -> None:
        rules = [queue.path.rule() for queue in self.queues]
        install(lambda: None, rules)
        ip6tables = shutil.which("ip6tables") or shutil.which("ip6tables", path="/usr/sbin:/sbin")
        if ip6tables is not None:
            install(lambda: None, rules, ip6tables)
        else:
            log.warning(
                "no ip6tables: IPv6 packets (an IPv6 pool's, the VIP plane's segments)"
                " are not delayed"
            )

    def uninstall(self) -> None:
        for binary in ("iptables", "ip6tables"):
            found = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/sbin")
            if found is None:
                continue
            for queue in self.queues:
                rule = ["-D" if word == "-A" else word for word in queue.path.rule()]
                subprocess.run([found, "-w", *rule], capture_output=True, timeout=20, check=False)

    def status(self) -> dict[str, Any]:
        drops = kernel_drops()
        return {"paths": [queue.status(drops) for queue in self.queues]}

    def serve(self, control: ControlSocket | None = None) -> None:
        """Until `stopping`: take what each queue got, let go of what is due."""
        by_fd = {queue.nfq.sock.fileno(): queue for queue in self.queues}
        watched = [*by_fd, *([control.sock.fileno()] if control is not None else [])]
        while not self.stopping:
            dues = [due for due in (q.next_due() for q in self.queues) if due is not None]
            wait = IDLE_WAKE_S if not dues else max(0.0, min(dues) - time.monotonic())
            readable, _, _ = select.select(watched, [], [], min(wait, IDLE_WAKE_S))
            now = time.monotonic()
            for fd in readable:
                if fd in by_fd:
                    by_fd[fd].take(now)
                elif control is not None:
                    control.on_readable()
            for queue in self.queues:
                queue.release(now)

    def close(self) -> None:
        for queue in self.queues:
            queue.nfq.close()


def run(topology: Topology, node: str, run_dir: Path) -> None:
    """The `link-delay` program of router `node` (already inside its namespace)."""
    paths = delayed_paths(topology, node)
    if not paths:
        raise HoldError(f"{node} has no delayed link: nothing to emulate")
    delay = LinkDelay(paths)

    def stop(signum: int, frame: FrameType | None) -> None:
        delay.stopping = True

    def dispatch(request: Request) -> Any:
        if request.get("op") != "status":
            raise KeyError(f"unknown op {request.get('op')!r} (link-delay answers status)")
        return delay.status()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    control = ControlSocket(command_path(run_dir, node, ROLE), dispatch)
    try:
        delay.install()
        described = ", ".join(f"{p.iface} {p.direction} {p.delay * 1e3:g} ms" for p in paths)
        log.info("delaying %s", described)
        ready_path(run_dir, node, ROLE).write_text(str(os.getpid()))
        delay.serve(control)
    finally:
        delay.uninstall()
        delay.close()
        control.close()


__all__ = [
    "QUEUE_BASE",
    "QUEUE_LIMIT",
    "ROLE",
    "DelayQueue",
    "DelayedPath",
    "LinkDelay",
    "delayed_paths",
    "delayed_routers",
    "kernel_drops",
    "run",
]
