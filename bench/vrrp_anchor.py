"""The VRRP anchor: Debian's keepalived (VRRPv3) failover, measured from the clients' side.

The figure the pool's failover is compared with, measured the same way: the time
from SIGKILL of the serving node until every client is answered again.

Three network namespaces of our own (`vr-<pid>-c`, `-a`, `-b`): a LAN bridge in the
client namespace `c`, and two servers `a` and `b` on it, each running keepalived
(VRRPv3, `vrrp_version 3`) with the smallest advert interval it accepts for v3
(`advert_int 0.01`: the v3 field counts centiseconds, and keepalived rejects less)
and a UDP echo service on the VIP. `a` has priority 200 and is MASTER, `b` 100.
Nothing else is tuned: keepalived's defaults (gratuitous ARPs on takeover, no
virtual MAC, no real-time scheduling).

`clients` UDP sockets in `c` (one source port each) send a request to the VIP every
`interval_s` (staggered), and record when each is answered and by which server.

Each run: (re)start `a`'s echo service and keepalived, wait until `a` holds the VIP,
`b` does not, and every client has been answered by `a` for `STABLE_S`; then the
node dies: SIGKILL of all of `a`'s processes (keepalived's VRRP child first, so
that no dying process sends a priority-0 advert that would let `b` take over early)
and `a`'s link set down (a killed keepalived leaves the VIP configured, and the
kernel would keep answering ARP for it). `takeover_s`: until `b` holds the VIP
(polled every millisecond: binding a socket to the VIP in `b` succeeds).
`clients_s`: until every client got an answer to a request sent after the kill (it
includes up to one request interval of the clients' own pacing). Medians and
nearest-rank p95 over the runs; `backup_spurious_takeovers`: times `b` became master
with `a` alive (late adverts on a busy machine at these timers).

RFC 5798 section 6.1: Master_Down_Interval = 3 * Master_Adver_Interval + Skew_Time,
Skew_Time = (256 - priority) * Master_Adver_Interval / 256 (priority: the backup's).

Needs root and keepalived (`make lab-deps`); elsewhere it prints one JSON line saying
why it did not run. Progress goes to stderr.

Its last line on stdout is one json object (`_common.run_and_emit`): the result,
or why it stopped (an error, a missing package, SIGTERM or Ctrl-C).
"""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
import argparse
import contextlib
import math
import os
import re
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import _plots
from _common import progress, run_and_emit

PREFIX = "vr"
LAN = "10.77.0"
VIP = f"{LAN}.100"
CLIENT_ADDRESS = f"{LAN}.10"
SERVERS = {"a": (f"{LAN}.1", 200, "MASTER"), "b": (f"{LAN}.2", 100, "BACKUP")}
PORT = 7077
VRID = 51
ADVERT_INT = 0.01  # seconds; VRRPv3's field is in centiseconds, keepalived's minimum
IP_FREEBIND = 15  # linux/in.h: bind to an address the namespace may not hold (yet)

CLIENTS = 40
INTERVAL_S = 0.005  # each client's request interval
STABLE_S = 1.0  # `a` serving every client, `b` silent, this long before a kill
SETTLE_TIMEOUT_S = 30.0
LIMIT_S = 5.0  # after the kill: a figure not reached by then is null
POLL_S = 0.001

REQUEST = struct.Struct("!Id")  # client index, send time (CLOCK_MONOTONIC)

# Each server's echo service: answers on the VIP (IP_FREEBIND: the VIP is not
# configured on a backup) with the request and the server's name. An answer sent
# just as keepalived removes the VIP fails (ENETUNREACH): the service carries on.
ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_IP, 15, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
name = sys.argv[3].encode()
while True:
    data, peer = s.recvfrom(2048)
    try:
        s.sendto(data + name, peer)
    except OSError:
        pass
"""


def keepalived_binary() -> str | None:
    found = shutil.which("keepalived")
    if found:
        return found
    return "/usr/sbin/keepalived" if os.access("/usr/sbin/keepalived", os.X_OK) else None


def skip_reason() -> str | None:
    """Why the anchor cannot be measured here (None: it can)."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return "the VRRP anchor needs root and network namespaces"
    if keepalived_binary() is None:
        return "keepalived is not installed (as root: make lab-deps)"
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed"
    return None


def keepalived_version() -> str:
    binary = keepalived_binary()
    if binary is None:
        return "missing"
    done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    found = re.search(r"Keepalived (v[\w.\-]+)", done.stdout + done.stderr)
    return found.group(1) if found else (done.stdout + done.stderr).strip()[:80]


def master_down_interval(advert_int: float, priority: int) -> float:
    """RFC 5798 section 6.1: 3 * advert + (256 - priority) * advert / 256."""
    return 3 * advert_int + (256 - priority) * advert_int / 256


def keepalived_conf(node: str, advert_int: float) -> str:
    _, priority, state = SERVERS[node]
    return f"""global_defs {{
    router_id {PREFIX}-{node}
    vrrp_version 3
}}
vrrp_instance VI_1 {{
    state {state}
    interface eth0
    virtual_router_id {VRID}
    priority {priority}
    advert_int {advert_int:g}
    virtual_ipaddress {{
        {VIP}/24 dev eth0
    }}
}}
"""


def _percentile(values: list[float], pct: float) -> float | None:
    """Nearest rank (the definition bench/_pool.py and the runtime use)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(pct / 100 * len(ordered)) - 1))]


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


# -- the namespaces -------------------------------------------------------------------


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _clean_stale() -> None:
    """Namespaces of earlier runs whose process is gone (a crash, a kill -9)."""
    from manycast.drivers import netns

    try:
        entries = os.listdir(netns.NETNS_DIR)
    except FileNotFoundError:
        return
    stale = []
    for name in entries:
        found = re.fullmatch(rf"{PREFIX}-(\d+)-\w+", name)
        if found and not Path(f"/proc/{found.group(1)}").exists():
            stale.append(name)
    _remove(stale)


def _remove(names: list[str]) -> None:
    from manycast.drivers import netns

    for pid in netns.pids_in(names):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for name in names:
        netns.remove(name)


class Lab:
    """The three namespaces, the LAN and the servers' processes; `close()` removes all."""

    def __init__(self, advert_int: float, workdir: Path) -> None:
        self.tag = f"{PREFIX}-{os.getpid()}"
        self.ns = {node: f"{self.tag}-{node}" for node in ("c", "a", "b")}
        self.advert_int = advert_int
        self.workdir = workdir
        # Per node: its running processes by role ("echo", "keepalived").
        self.procs: dict[str, dict[str, subprocess.Popen[bytes]]] = {"a": {}, "b": {}}
        self.starts = {"a": 0, "b": 0}

    def build(self) -> None:
        from manycast.drivers import netns

        _clean_stale()
        for name in self.ns.values():
            netns.create(name)
        c = self.ns["c"]
        for name in self.ns.values():
            netns.sysctl(name, {"net.ipv6.conf.all.disable_ipv6": "1"})
            _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", c, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", c, "addr", "add", f"{CLIENT_ADDRESS}/24", "dev", "br0")
        _ip("-n", c, "link", "set", "br0", "up")
        for node, (address, _, _) in SERVERS.items():
            _ip("-n", c, "link", "add", f"v{node}", "type", "veth", "peer", "name", "eth0",
                "netns", self.ns[node])  # fmt: skip
            _ip("-n", c, "link", "set", f"v{node}", "master", "br0", "up")
            _ip("-n", self.ns[node], "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", self.ns[node], "link", "set", "eth0", "up")

    def close(self) -> None:
        for procs in self.procs.values():
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        _remove(list(self.ns.values()))

    def config_accepts(self, advert_int: float) -> bool:
        """Whether keepalived's config check takes `advert_int` without complaint."""
        conf = self.workdir / f"check-{advert_int:g}.conf"
        conf.write_text(keepalived_conf("b", advert_int))
        done = subprocess.run(
            ["ip", "netns", "exec", self.ns["b"], str(keepalived_binary()), "-t", "-f", str(conf)],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return done.returncode == 0 and "not valid" not in done.stdout + done.stderr

    def start(self, node: str) -> None:
        """`node` boots: a clean interface (no VIP left from a killed keepalived), link up,
        its echo service and its keepalived."""
        ns = self.ns[node]
        subprocess.run(
            ["ip", "-n", ns, "addr", "del", f"{VIP}/24", "dev", "eth0"],
            capture_output=True,
            timeout=20,
        )
        _ip("-n", ns, "link", "set", "eth0", "up")
        self.starts[node] += 1
        n = self.starts[node]
        conf = self.workdir / f"{node}.conf"
        conf.write_text(keepalived_conf(node, self.advert_int))
        log = (self.workdir / f"{node}-{n}.log").open("wb")
        echo = [sys.executable, "-c", ECHO, VIP, str(PORT), node]
        keepalived = [
            str(keepalived_binary()),
            "--dont-fork", "--log-console", "--log-detail", "--no-syslog",
            "--vrrp", "--dont-respawn", "--use-file", str(conf),
            # Fresh pid files: a killed daemon's child lingers as a zombie until init
            # reaps it, and keepalived would take its old pid file for a live daemon.
            "--pid", str(self.workdir / f"{node}-{n}.pid"),
            "--vrrp_pid", str(self.workdir / f"{node}-{n}-vrrp.pid"),
        ]  # fmt: skip
        for role, argv in (("echo", echo), ("keepalived", keepalived)):
            self.procs[node][role] = subprocess.Popen(
                ["ip", "netns", "exec", ns, *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        log.close()

    def kill(self, node: str, at_kill: Callable[[float], None]) -> float:
        """The node dies: SIGKILL every process in its namespace, children before their
        parents, then its link goes down. `at_kill(t)` is called with the time of the
        first SIGKILL just before it; returns that time."""
        from manycast.drivers import netns

        pids = sorted(netns.pids_in([self.ns[node]]), reverse=True)  # children: higher pids
        parents = {p.pid for p in self.procs[node].values()}
        order = [p for p in pids if p not in parents] + [p for p in pids if p in parents]
        killed = time.monotonic()
        at_kill(killed)
        for pid in order:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _ip("-n", self.ns[node], "link", "set", "eth0", "down")
        for proc in self.procs[node].values():
            proc.wait(10)
        self.procs[node] = {}
        return killed

    def check_alive(self) -> None:
        """Every echo service and keepalived started is still running."""
        for node, procs in self.procs.items():
            for role, proc in procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{node}'s {role} exited ({proc.returncode}): {self.log_tail(node)}"
                    )

    def log_count(self, node: str, text: str) -> int:
        """Lines with `text` in all of `node`'s keepalived and echo logs so far."""
        return sum(
            path.read_text(errors="replace").count(text)
            for path in self.workdir.glob(f"{node}-*.log")
        )

    def log_tail(self, node: str, lines: int = 8) -> str:
        path = self.workdir / f"{node}-{self.starts[node]}.log"
        if not path.exists():
            return ""
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])


class VipWatch:
    """Whether a namespace holds the VIP, polled every `POLL_S` by a thread living in it
    (a bind to the VIP succeeds only while the address is configured there)."""

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.holds = False
        self.since: float | None = None  # when it last began holding the VIP
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, name=f"vip-{ns}", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error:
            raise self._error[0]

    def _run(self) -> None:
        from manycast.drivers import netns

        try:
            netns.enter(self.ns)
        except OSError as exc:
            self._error.append(exc)
            self._ready.set()
            return
        self._ready.set()
        while not self._stop.is_set():
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                try:
                    s.bind((VIP, 0))
                    holds = True
                except OSError:
                    holds = False
            now = time.monotonic()
            if holds and not self.holds:
                self.since = now
            self.holds = holds
            time.sleep(POLL_S)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


class Clients:
    """`count` UDP sockets in the client namespace, each sending a request to the VIP every
    `interval_s` (staggered evenly), and what answered them."""

    def __init__(self, ns: str, count: int, interval_s: float) -> None:
        from manycast.drivers import netns

        self.count = count
        self.interval_s = interval_s
        self.socks: list[socket.socket] = []
        for _ in range(count):
            s = netns.socket_in(ns, socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((CLIENT_ADDRESS, 0))
            s.connect((VIP, PORT))
            s.setblocking(False)
            self.socks.append(s)
        # Per client: the latest answer (send time, answer time, server).
        self.latest: list[tuple[float, float, str] | None] = [None] * count
        # Per client: the first answer to a request sent after `mark` (answer time, server).
        self.mark = math.inf
        self.first_after: list[tuple[float, str] | None] = [None] * count
        self.last_from: dict[str, float] = {}
        self.sent = 0
        self.answered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vrrp-clients", daemon=True)
        self._thread.start()

    def set_mark(self, t: float) -> None:
        self.first_after = [None] * self.count
        self.mark = t

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        for i, s in enumerate(self.socks):
            sel.register(s, selectors.EVENT_READ, i)
        slot = self.interval_s / self.count
        due = time.monotonic()
        turn = 0
        while not self._stop.is_set():
            now = time.monotonic()
            while due <= now:
                with contextlib.suppress(OSError):  # ECONNREFUSED from a dying node
                    self.socks[turn].send(REQUEST.pack(turn, time.monotonic()))
                    self.sent += 1
                turn = (turn + 1) % self.count
                due += slot
                if now - due > 0.5:  # starved for long: skip rather than burst
                    due = now
            for key, _ in sel.select(max(0.0, due - time.monotonic())):
                self._receive(key.fileobj, key.data)  # type: ignore[arg-type]
        sel.close()

    def _receive(self, s: socket.socket, index: int) -> None:
        while True:
            try:
                data = s.recv(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ECONNREFUSED: ICMP port unreachable from a dying node
                continue
            now = time.monotonic()
            if len(data) <= REQUEST.size:
                continue
            _, sent = REQUEST.unpack_from(data)
            server = data[REQUEST.size :].decode(errors="replace")
            self.answered += 1
            self.latest[index] = (sent, now, server)
            self.last_from[server] = now
            if sent > self.mark and self.first_after[index] is None:
                self.first_after[index] = (now, server)

    def all_answered_by(self, server: str, since: float) -> bool:
        return all(x is not None and x[2] == server and x[0] > since for x in self.latest)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for s in self.socks:
            s.close()


def _wait(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _settle(lab: Lab, clients: Clients, watch: Mapping[str, VipWatch]) -> float:
    """Wait until `a` holds the VIP, `b` does not, and every client was answered by `a`
    throughout the last STABLE_S; returns when that began."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:
        began = time.monotonic()

        def serving(began: float = began) -> bool:
            lab.check_alive()
            return watch["a"].holds and not watch["b"].holds and clients.all_answered_by("a", began)

        if not _wait(serving, max(0.0, deadline - time.monotonic())):
            break
        time.sleep(STABLE_S)
        lab.check_alive()
        if (
            watch["a"].holds
            and not watch["b"].holds
            and clients.last_from.get("b", 0.0) < began
            and clients.all_answered_by("a", time.monotonic() - 0.2)
            and (watch["b"].since or 0.0) < began
        ):
            return began
    raise RuntimeError(
        f"a did not settle as the serving master within {SETTLE_TIMEOUT_S} s "
        f"(a holds VIP: {watch['a'].holds}, b holds VIP: {watch['b'].holds}; "
        f"a's log: {lab.log_tail('a')}; b's log: {lab.log_tail('b')})"
    )


def _one_run(
    index: int, lab: Lab, clients: Clients, watch: Mapping[str, VipWatch]
) -> dict[str, Any]:
    lab.start("a")
    _settle(lab, clients, watch)
    b_since = watch["b"].since  # before the kill: b may take over before kill() returns
    killed = lab.kill("a", clients.set_mark)

    def done() -> bool:
        took = watch["b"].holds and watch["b"].since != b_since
        return took and all(x is not None for x in clients.first_after)

    _wait(done, LIMIT_S)
    took_at = watch["b"].since if watch["b"].holds and watch["b"].since != b_since else None
    firsts = list(clients.first_after)
    answered = [x for x in firsts if x is not None]
    clients_at = max(x[0] for x in answered) if len(answered) == len(firsts) else None
    return {
        "run": index + 1,
        "takeover_s": _round(None if took_at is None else took_at - killed),
        "clients_s": _round(None if clients_at is None else clients_at - killed),
        "first_client_s": _round(min(x[0] for x in answered) - killed) if answered else None,
        "clients_answered": len(answered),
        "answered_by": sorted({x[1] for x in answered}),
    }


@contextlib.contextmanager
def _lab(advert_int: float) -> Iterator[Lab]:
    with tempfile.TemporaryDirectory(prefix="vrrp-anchor-") as tmp:
        lab = Lab(advert_int, Path(tmp))
        try:
            lab.build()
            yield lab
        finally:
            lab.close()


def measure_vrrp(
    runs: int = 10,
    clients: int = CLIENTS,
    interval_s: float = INTERVAL_S,
    advert_int: float = ADVERT_INT,
) -> dict[str, Any]:
    """keepalived's failover as the clients see it, `runs` SIGKILLs of the master; a dict
    with `skipped` (and nothing measured) when it cannot run here."""
    reason = skip_reason()
    if reason is not None:
        return {"skipped": reason}
    backup_priority = SERVERS["b"][1]
    out: dict[str, Any] = {
        "keepalived_version": keepalived_version(),
        "vrrp_version": 3,
        "advert_int_s": advert_int,
        "priorities": {node: prio for node, (_, prio, _) in SERVERS.items()},
        "master_down_interval_s": round(master_down_interval(advert_int, backup_priority), 6),
        "clients": clients,
        "request_interval_s": interval_s,
        "kill": "SIGKILL of the master's keepalived and echo service, then its link down",
    }
    per_run: list[dict[str, Any]] = []
    began = time.monotonic()
    with _lab(advert_int) as lab:
        out["advert_int_accepted"] = lab.config_accepts(advert_int)
        # The smallest: keepalived refuses anything below (v3 counts centiseconds).
        out["advert_int_below_refused"] = not lab.config_accepts(round(advert_int / 2, 4))
        watch = {node: VipWatch(lab.ns[node]) for node in SERVERS}
        crowd: Clients | None = None
        try:
            lab.start("b")
            crowd = Clients(lab.ns["c"], clients, interval_s)
            for index in range(runs):
                one = _one_run(index, lab, crowd, watch)
                progress(
                    f"vrrp run {index + 1}/{runs}: takeover {one['takeover_s']} s, every client "
                    f"answered {one['clients_s']} s (first {one['first_client_s']} s, "
                    f"{one['clients_answered']}/{clients} by {','.join(one['answered_by'])})"
                )
                per_run.append(one)
            out["requests_sent"] = crowd.sent
            out["requests_answered"] = crowd.answered
            # b becomes master once alone at the start and once per kill; any more is a
            # false takeover (adverts late on a busy machine at these timers).
            entered = lab.log_count("b", "Entering MASTER STATE")
            taken = sum(r["takeover_s"] is not None for r in per_run)
            out["backup_spurious_takeovers"] = entered - 1 - taken
        finally:
            if crowd is not None:
                crowd.close()
            for w in watch.values():
                w.close()
    for key in ("takeover_s", "clients_s"):
        values = [r[key] for r in per_run]
        done = [v for v in values if v is not None]
        complete = len(done) == len(values)
        out[f"{key}_median"] = _round(_median(done)) if complete else None
        out[f"{key}_p95"] = _round(_percentile(done, 95)) if complete else None
        out[key] = values
    out["runs"] = per_run
    out["seconds"] = round(time.monotonic() - began, 1)
    return out


def plot(result: Mapping[str, Any], directory: Path) -> list[Path]:
    """The CDF over the runs of keepalived's takeover and of every client answered again,
    with RFC 5798's master-down interval for the timers used."""
    if "clients_s" not in result:
        return []
    fig, ax = _plots.figure(
        f"keepalived {result.get('keepalived_version', '')} VRRPv3 failover, advert "
        f"{result['advert_int_s']} s ({len(result['clients_s'])} SIGKILLs)"
    )
    _plots.cdf(
        ax,
        {
            "backup holds the VIP": result["takeover_s"],
            "every client answered again": result["clients_s"],
        },
        xlabel="seconds after the kill",
    )
    _plots.vertical(ax, result["master_down_interval_s"], "RFC 5798 master-down interval")
    ax.legend(fontsize=8)
    return [_plots.save(fig, directory, "vrrp_anchor_cdf")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    _plots.add_argument(parser)
    parser.add_argument("--runs", type=int, default=10, help="SIGKILLs of the master")
    parser.add_argument("--clients", type=int, default=CLIENTS, help="client sockets")
    parser.add_argument(
        "--interval", type=float, default=INTERVAL_S, help="each client's request interval, s"
    )
    args = parser.parse_args()  # before run_and_emit, so that --help prints on stdout

    def run() -> dict[str, Any]:
        result = {"bench": "vrrp_anchor", **measure_vrrp(args.runs, args.clients, args.interval)}
        if "skipped" in result:
            progress(f"bench/vrrp_anchor.py: {result['skipped']}; skipped")
        else:
            _plots.write(result, args.plots, plot)
        return result

    run_and_emit("vrrp_anchor", run)


if __name__ == "__main__":
    main()
