"""The kernel lab: a topology on real Linux networking, one namespace per node.

`Lab.up` builds, from the same compiled topology the other drivers run, a
network namespace per node (`<prefix>-<node>`), a veth pair per point-to-point
link, a bridge in the router's namespace for each client LAN (multicast
snooping off, so reports and the clients' multicast reach the router as sent),
every address and route, IP forwarding in the routers, then starts the
programs of `drivers/kernel.py`: a router daemon per router, and per server the
manycast agent and the service. Their pid files, logs, command sockets and a
copy of the topology live in the run directory (`/run/manycast/<prefix>`).

`Lab.down` finds everything by name: the pid files' processes (checked to be
ours before a signal is sent), then any other process left inside one of our
namespaces, then the namespaces themselves (their interfaces, veth peers and
multicast tables go with them). It works after a crash and when nothing is up.

`LabRun` is the demo scenario on the lab: a prober that plays the topology's
clients (one UDP socket inside each client's namespace, asking the service at
the client's rate; in a private pool also a raw socket there, for the client's
signed registration every report interval), the timed scenario (a share change
through a server agent, a server killed with SIGKILL, a standby server started)
and a summary of what the clients saw.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from manycast.drivers import kernel, mroute, netns
from manycast.drivers.links import Attachment
from manycast.pool import pool_keys
from manycast.protocol.client import registration
from manycast.topology import Step, Topology, TopologyError, load, loads

PREFIX = "mc"
RUN_ROOT = Path(os.environ.get("MANYCAST_LAB_RUN_ROOT", "/run/manycast"))
ROLES_OF = {"router": ("router",), "server": ("server", "service")}
READY_TIMEOUT = 20.0
NEEDS_ROOT = "the kernel lab needs root and network namespaces; CI runs as root"
CLIENT_TTL = 16


class LabError(RuntimeError):
    """The lab cannot do what was asked; the message says why."""


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError(f"{NEEDS_ROOT} (run it as root, e.g. with sudo)")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def _ours(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"manycast.drivers.kernel" in cmdline


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


@dataclass
class Lab:
    prefix: str = PREFIX
    run_root: Path = RUN_ROOT

    def __post_init__(self) -> None:
        if not self.prefix or not self.prefix.replace("_", "").isalnum():
            raise LabError(f"prefix {self.prefix!r}: use letters and digits")

    @property
    def run_dir(self) -> Path:
        return self.run_root / self.prefix

    def ns(self, node: str) -> str:
        return f"{self.prefix}-{node}"

    def namespaces(self) -> list[str]:
        return netns.names(self.prefix)

    def is_up(self) -> bool:
        return bool(self.namespaces())

    def state(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads((self.run_dir / "lab.json").read_text())
        except (OSError, ValueError):
            return {}
        return data

    def topology(self) -> Topology:
        try:
            return load(self.run_dir / "topology.toml")
        except TopologyError as exc:
            raise LabError(f"no lab is up with prefix {self.prefix!r} ({exc})") from None

    # -- up --------------------------------------------------------------------------
    def up(
        self,
        text: str,
        source: str = "<topology>",
        *,
        seed: int = 1,
        start_servers: bool = True,
        pin_idle: float | None = None,
    ) -> Topology:
        """Build the topology `text` and start its programs; on failure, tear down."""
        require_root()
        topology = loads(text, source)
        if self.is_up():
            raise LabError(
                f"a lab with prefix {self.prefix!r} is already up "
                f"({len(self.namespaces())} namespaces): run `manycast lab down` first"
            )
        for node in topology.interfaces:
            if len(self.ns(node)) > 60:
                raise LabError(f"namespace name for {node} is too long")
        if pin_idle is None and topology.pool.technique == "R4":
            pin_idle = 1.0
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.run_dir.mkdir(parents=True)
        (self.run_dir / "topology.toml").write_text(text)
        state = {"prefix": self.prefix, "source": source, "seed": seed, "pin_idle": pin_idle}
        (self.run_dir / "lab.json").write_text(json.dumps(state))
        try:
            self._build(topology)
            for router in topology.routers:
                self.start(router, "router")
            for router in topology.routers:
                self.wait_ready(router, "router")
            if start_servers:
                for server in topology.servers.values():
                    if not server.standby:
                        self.start_server(server.name, wait=False)
                for server in topology.servers.values():
                    if not server.standby:
                        for role in ROLES_OF["server"]:
                            self.wait_ready(server.name, role)
        except BaseException:
            self.down()
            raise
        return topology

    def _build(self, topology: Topology) -> None:
        for node in sorted(topology.interfaces):
            netns.create(self.ns(node))
        # Links are made from one end: a veth's peer is created directly in the
        # other namespace; a LAN is a bridge in its router's namespace.
        for link in topology.links.values():
            members = link.members
            if any(topology.kind(m.node) == "client" for m in members):
                router = next(m for m in members if topology.kind(m.node) == "router")
                hosts = [m for m in members if m is not router]

                def lan(
                    ipr: Any, router: Attachment = router, hosts: list[Attachment] = hosts
                ) -> None:
                    bridge = netns.bridge(ipr, router.iface)
                    for i, member in enumerate(hosts):
                        port = f"{router.iface}p{i}"
                        netns.veth(ipr, port, self.ns(member.node), member.iface)
                        netns.enslave(ipr, port, bridge)
                        netns.up(ipr, port)

                netns.configure(self.ns(router.node), lan)
            else:
                a, b = members

                def pair(ipr: Any, a: Attachment = a, b: Attachment = b) -> None:
                    netns.veth(ipr, a.iface, self.ns(b.node), b.iface)

                netns.configure(self.ns(a.node), pair)
        for node in topology.interfaces:

            def setup(ipr: Any, node: str = node) -> None:
                netns.up(ipr, "lo")
                for iface in topology.interfaces[node].values():
                    netns.address(ipr, iface.name, str(iface.address), iface.network.prefixlen)
                    netns.up(ipr, iface.name)
                for route in topology.routes.get(node, ()):
                    if route.next_hop is not None:
                        netns.route(ipr, str(route.network), str(route.next_hop))
                if node in topology.gateways:
                    netns.route(ipr, "0.0.0.0/0", str(topology.gateways[node][1]))

            netns.configure(self.ns(node), setup)
        for name in topology.routers:
            # Forwarding on; no reverse-path filter (the benchmark's sources are
            # many addresses behind one client interface).
            values = {
                "net.ipv4.ip_forward": "1",
                "net.ipv4.conf.all.rp_filter": "0",
                "net.ipv4.conf.default.rp_filter": "0",
            }
            for ifname in topology.interfaces[name]:
                values[f"net.ipv4.conf.{ifname}.rp_filter"] = "0"
            netns.sysctl(self.ns(name), values)

    # -- programs --------------------------------------------------------------------
    def _pidfile(self, node: str, role: str) -> Path:
        return self.run_dir / f"{node}.{role}.pid"

    def start(self, node: str, role: str) -> int:
        state = self.state()
        argv = [
            sys.executable,
            "-m",
            "manycast.drivers.kernel",
            "serve" if role == "service" else role,
            "--node",
            node,
            "--run-dir",
            str(self.run_dir),
            "--netns",
            self.ns(node),
            "--seed",
            str(state.get("seed", 1)),
        ]
        if role == "router" and state.get("pin_idle") is not None:
            argv += ["--pin-idle", str(state["pin_idle"])]
        with contextlib.suppress(FileNotFoundError):
            kernel.ready_path(self.run_dir, node, role).unlink()
        with open(self.run_dir / f"{node}.{role}.log", "ab") as logfile:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._pidfile(node, role).write_text(str(proc.pid))
        return proc.pid

    def pid(self, node: str, role: str) -> int | None:
        try:
            pid = int(self._pidfile(node, role).read_text())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) and _ours(pid) else None

    def wait_ready(self, node: str, role: str, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        ready = kernel.ready_path(self.run_dir, node, role)
        pidfile = self._pidfile(node, role)
        while not ready.exists():
            # Only alive, not yet "ours": just after the fork the child's command
            # line is still the parent's.
            started = pidfile.exists() and _alive(int(pidfile.read_text()))
            if not started or time.monotonic() > deadline:
                log = self.run_dir / f"{node}.{role}.log"
                tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
                raise LabError(f"{role} of {node} did not start:\n{tail}")
            time.sleep(0.02)

    def start_server(self, name: str, wait: bool = True) -> None:
        for role in ROLES_OF["server"]:
            self.start(name, role)
        if wait:
            for role in ROLES_OF["server"]:
                self.wait_ready(name, role)

    def kill(self, node: str, role: str, sig: int = signal.SIGKILL) -> bool:
        pid = self.pid(node, role)
        if pid is None:
            return False
        _kill(pid, sig)
        deadline = time.monotonic() + 2.0
        while _alive(pid) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.01)
        _reap(pid)
        return True

    def kill_server(self, name: str) -> None:
        """A server dies at once: its agent and its service, SIGKILL."""
        for role in ROLES_OF["server"]:
            self.kill(name, role)

    def ask(self, node: str, role: str, request: dict[str, Any]) -> Any:
        return kernel.ask(self.run_dir, node, role, request)

    # -- down ------------------------------------------------------------------------
    def down(self) -> dict[str, int]:
        """Remove everything of ours with this prefix; safe to repeat."""
        require_root()
        stopped = 0
        pids = []
        for pidfile in self.run_dir.glob("*.pid") if self.run_dir.exists() else []:
            with contextlib.suppress(OSError, ValueError):
                pid = int(pidfile.read_text())
                _reap(pid)  # a daemon of this process that already died
                if _alive(pid) and _ours(pid):
                    _kill(pid, signal.SIGTERM)
                    pids.append(pid)
        deadline = time.monotonic() + 1.5
        for pid in pids:
            while _alive(pid) and time.monotonic() < deadline:
                _reap(pid)
                time.sleep(0.01)
            if _alive(pid):
                _kill(pid, signal.SIGKILL)
            _reap(pid)
            stopped += 1
        names = self.namespaces()
        for pid in netns.pids_in(names):
            # Anything else still inside one of our namespaces (`lab exec` programs).
            _kill(pid, signal.SIGKILL)
            _reap(pid)
            stopped += 1
        for name in names:
            netns.remove(name)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        return {"namespaces": len(names), "processes": stopped}

    # -- exec and status --------------------------------------------------------------
    def exec(self, node: str, argv: list[str]) -> None:
        """Replace this process with `argv` run inside `node`'s namespace."""
        require_root()
        if not argv:
            raise LabError("nothing to run: give a command after --")
        name = self.ns(node)
        if not netns.exists(name):
            nodes = ", ".join(n.removeprefix(f"{self.prefix}-") for n in self.namespaces())
            raise LabError(f"no node {node!r} in the lab (nodes: {nodes or 'none, lab is down'})")
        netns.enter(name)
        try:
            os.execvp(argv[0], argv)
        except OSError as exc:
            raise LabError(f"cannot run {argv[0]}: {exc.strerror}") from None

    def popen(self, node: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start `argv` inside `node`'s namespace (entered between fork and exec)."""
        name = self.ns(node)
        if not netns.exists(name):
            raise LabError(f"no node {node!r} in the lab")
        return subprocess.Popen(argv, preexec_fn=lambda: netns.enter(name), **kwargs)

    def mfc(self, router: str) -> list[mroute.CacheEntry]:
        """The kernel's multicast forwarding entries in `router`'s namespace."""
        return mroute.parse_cache(netns.read_in(self.ns(router), "/proc/net/ip_mr_cache"))

    def vifs(self, router: str) -> list[mroute.Vif]:
        return mroute.parse_vifs(netns.read_in(self.ns(router), "/proc/net/ip_mr_vif"))

    def status(self) -> LabStatus:
        require_root()
        names = self.namespaces()
        try:
            topology: Topology | None = self.topology()
        except LabError:
            topology = None
        nodes: list[NodeStatus] = []
        routers: dict[str, RouterTables] = {}
        known = set()
        if topology is not None:
            for node in sorted(topology.interfaces, key=lambda n: (topology.kind(n), n)):
                kind = topology.kind(node)
                known.add(self.ns(node))
                processes = {role: self.pid(node, role) for role in ROLES_OF.get(kind, ())}
                addresses = [
                    f"{i.name} {i.address}/{i.network.prefixlen}"
                    for i in topology.interfaces[node].values()
                ]
                nodes.append(
                    NodeStatus(node, kind, netns.exists(self.ns(node)), processes, addresses)
                )
                if kind == "router" and netns.exists(self.ns(node)):
                    routers[node] = RouterTables(self.vifs(node), self.mfc(node))
        for name in names:
            if name not in known:
                nodes.append(NodeStatus(name.removeprefix(f"{self.prefix}-"), "?", True, {}, []))
        links = (
            {
                name: [f"{m.node}/{m.iface}" for m in link.members]
                for name, link in topology.links.items()
            }
            if topology is not None
            else {}
        )
        return LabStatus(self.prefix, bool(names), nodes, links, routers)


@dataclass
class NodeStatus:
    name: str
    kind: str
    namespace: bool
    processes: dict[str, int | None]
    addresses: list[str]


@dataclass
class RouterTables:
    vifs: list[mroute.Vif]
    entries: list[mroute.CacheEntry]


@dataclass
class LabStatus:
    prefix: str
    up: bool
    nodes: list[NodeStatus]
    links: dict[str, list[str]]
    routers: dict[str, RouterTables]


# -- the clients -------------------------------------------------------------------------


@dataclass
class _Client:
    name: str
    address: str
    sock: socket.socket
    interval: float
    next_send: float
    seq: int = 0
    last_reply: float = -1.0
    server: str | None = None
    replies: int = 0
    # Private pools: the key the client signs its registration with, and the raw
    # socket it leaves on.
    key: Ed25519PrivateKey | None = None
    igmp: socket.socket | None = None
    next_register: float = float("inf")
    registrations: int = 0


class Prober:
    """The topology's clients: each asks the service from its own namespace and
    address, `rate` times a second, and notes which server answered.

    In a private pool each client also registers as a sender, as `Client` does: a
    signed join naming only itself, at start and every report interval, signed with
    the pool's key (an outsider, `authorized = false`, with the outsider's key, so
    its registrations are refused). Without one, its first-hop router drops its
    packets to the group."""

    def __init__(self, lab: Lab, topology: Topology, clients: list[str] | None = None) -> None:
        self.topology = topology
        self.group = str(topology.pool.group)
        self.port = topology.pool.port
        self.register_every = topology.pool.report_interval_s
        self.rng = random.Random()
        self.selector = selectors.DefaultSelector()
        self.clients: dict[str, _Client] = {}
        self.answers: Counter[str] = Counter()
        self.t0 = time.monotonic()
        keys: tuple[Ed25519PrivateKey, Ed25519PrivateKey] | None = None
        if topology.pool.private:
            # The keys the lab's daemons were built with (same seed, same derivation).
            keys = pool_keys(topology, lab.state().get("seed", 1))
        names = sorted(topology.clients) if clients is None else clients
        try:
            for index, name in enumerate(names):
                spec = topology.clients[name]
                address = str(topology.address(name))
                sock = netns.socket_in(lab.ns(name), socket.AF_INET, socket.SOCK_DGRAM)
                sock.bind((address, 0))
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, CLIENT_TTL)
                sock.setblocking(False)
                interval = 1.0 / spec.rate if spec.rate > 0 else float("inf")
                # Spread the first requests over one interval.
                start = interval * index / max(1, len(names)) if spec.rate > 0 else float("inf")
                client = _Client(name, address, sock, interval, start)
                self.clients[name] = client
                self.selector.register(sock, selectors.EVENT_READ, client)
                if keys is not None:
                    client.key = keys[0] if spec.authorized else keys[1]
                    client.igmp = _report_socket(lab.ns(name), topology.gateways[name][0])
                    client.next_register = 0.0
        except BaseException:
            self.close()
            raise

    def now(self) -> float:
        return time.monotonic() - self.t0

    def set_rate(self, group: str, rate: float) -> None:
        for client in self.clients.values():
            if self.topology.clients[client.name].group == group:
                client.interval = 1.0 / rate if rate > 0 else float("inf")
                client.next_send = self.now()

    def run_until(self, until: float) -> None:
        while True:
            now = self.now()
            if now >= until:
                return
            for client in self.clients.values():
                if client.next_register <= now:
                    self._register(client)
                    client.next_register = now + self.register_every
                if client.next_send <= now:
                    client.seq += 1
                    with contextlib.suppress(OSError):
                        client.sock.sendto(
                            f"{client.name} {client.seq}".encode(), (self.group, self.port)
                        )
                    client.next_send = now + client.interval
            soonest = min(
                (min(c.next_send, c.next_register) for c in self.clients.values()), default=until
            )
            for key, _ in self.selector.select(max(0.0, min(until, soonest) - self.now())):
                self._read(key.data)

    def _register(self, client: _Client) -> None:
        assert client.key is not None and client.igmp is not None
        packet = registration(
            ipaddress.IPv4Address(client.address),
            self.topology.pool.group,
            client.key,
            time.time(),  # the routers check it against their wall clock
            self.rng,
        )
        with contextlib.suppress(OSError):
            client.igmp.sendto(packet, (mroute.ALL_V3_ROUTERS, 0))
            client.registrations += 1

    def _read(self, client: _Client) -> None:
        while True:
            try:
                data = client.sock.recv(2048)
            except (BlockingIOError, ConnectionRefusedError):
                return
            server = data.split(b" ", 1)[0].decode(errors="replace")
            client.last_reply = self.now()
            client.server = server
            client.replies += 1
            self.answers[server] += 1

    def participants(self) -> list[_Client]:
        """The clients that hold the pool's key (all of them, in a public pool)."""
        return [c for c in self.clients.values() if self.topology.clients[c.name].authorized]

    def outsiders(self) -> list[_Client]:
        return [c for c in self.clients.values() if not self.topology.clients[c.name].authorized]

    def served_since(self, since: float) -> int:
        return sum(1 for c in self.participants() if c.last_reply >= since)

    def close(self) -> None:
        self.selector.close()
        for client in self.clients.values():
            client.sock.close()
            if client.igmp is not None:
                client.igmp.close()


def _report_socket(ns: str, iface: str) -> socket.socket:
    """A raw socket inside `ns` that sends whole IGMP packets (header, Router Alert
    and all, as `registration` builds them) out of `iface`. IPPROTO_RAW implies
    IP_HDRINCL and receives nothing, so it never needs draining."""
    sock = netns.socket_in(ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        # Device names are looked up in the socket's own namespace.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.encode())
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


# -- the scenario ------------------------------------------------------------------------


@dataclass
class Progress:
    now: float
    served: int
    clients: int
    answers: dict[str, int]
    entries: int


@dataclass
class LabRun:
    """The topology's scenario on a lab that is up, with the prober as its clients."""

    lab: Lab
    topology: Topology
    events: list[dict[str, Any]] = field(default_factory=list)
    dead: set[str] = field(default_factory=set)

    def live_servers(self) -> list[str]:
        """The pool's running servers; an outsider (`authorized = false`) is none of
        them: its allocation is its own claim, and it takes no operator's command."""
        return sorted(
            s
            for s, spec in self.topology.servers.items()
            if spec.authorized and s not in self.dead and self.lab.pid(s, "server")
        )

    def step(self, step: Step, prober: Prober) -> None:
        action, args = step.action, step.args
        self.events.append({"at": round(prober.now(), 2), "what": step.describe()})
        if action == "kill":
            self.lab.kill_server(args["server"])
            self.dead.add(args["server"])
        elif action == "add":
            self.lab.start_server(args["server"])
        elif action in ("set_share", "rebalance"):
            live = self.live_servers()
            about = args.get("server")
            target = about if about in live else (live[0] if live else None)
            if target is not None:
                request: dict[str, Any] = (
                    {"op": "set_share", "server": about, "share": str(Fraction(args["share"]))}
                    if action == "set_share"
                    else {"op": "rebalance", "target": args["target"]}
                )
                self.lab.ask(target, "server", request)
        elif action == "client_rate":
            prober.set_rate(args["clients"], float(args["rate"]))

    def owners(self, addresses: list[str]) -> dict[str, str | None]:
        """Who the pool's allocation says serves each address (asked of a live agent)."""
        for server in self.live_servers():
            with contextlib.suppress(OSError, ValueError):
                answer = self.lab.ask(server, "server", {"op": "owners", "addresses": addresses})
                return dict(answer["owners"])
        return {}

    def run(
        self,
        duration: float,
        on_progress: Callable[[Progress], None] | None = None,
        window: float = 1.5,
    ) -> dict[str, Any]:
        prober = Prober(self.lab, self.topology)
        steps = list(self.topology.scenario)
        recovery: list[float | None] = []
        try:
            next_report = 1.0
            while prober.now() < duration:
                until = min(duration, next_report, steps[0].at if steps else duration)
                prober.run_until(until)
                now = prober.now()
                while steps and steps[0].at <= now:
                    self.step(steps.pop(0), prober)
                    recovery.append(None)
                participants = prober.participants()
                for i, event in enumerate(self.events):
                    if recovery[i] is None and all(
                        c.last_reply > event["at"] for c in participants
                    ):
                        recovery[i] = round(
                            max((c.last_reply for c in participants), default=now) - event["at"], 2
                        )
                if now >= next_report:
                    next_report += 1.0
                    if on_progress is not None:
                        on_progress(
                            Progress(
                                now,
                                prober.served_since(now - window),
                                len(participants),
                                dict(prober.answers),
                                self._entries(),
                            )
                        )
            end = prober.now()
            # Outsiders (`authorized = false`) are not the pool's clients: they are
            # reported apart, and should have had no answer at all.
            clients = prober.participants()
            outsiders = prober.outsiders()
            owners = self.owners([c.address for c in clients])
            wrong = sorted(
                c.name
                for c in clients
                if c.server is not None and owners and owners.get(c.address) != c.server
            )
            served = prober.served_since(end - window)
            for event, took in zip(self.events, recovery, strict=True):
                event["all_clients_answered_after_s"] = took
            return {
                "driver": "kernel",
                "duration_s": round(end, 2),
                "clients": len(clients),
                "clients_served_at_end": served,
                "answers_by_server": dict(sorted(prober.answers.items())),
                "clients_by_server": dict(
                    sorted(Counter(c.server for c in clients if c.server).items())
                ),
                "clients_not_at_owner": wrong,
                "outsiders": len(outsiders),
                "outsider_answers": sum(c.replies for c in outsiders),
                "events": self.events,
                "mfc_entries": {r: len(self.lab.mfc(r)) for r in self.topology.routers},
            }
        finally:
            prober.close()

    def _entries(self) -> int:
        total = 0
        for router in self.topology.routers:
            with contextlib.suppress(OSError):
                total += len(self.lab.mfc(router))
        return total


def topology_text(path: Path | None) -> tuple[str, str]:
    """(TOML text, name for messages) of a topology file, or of the built-in demo."""
    if path is None:
        from importlib.resources import files

        resource = files("manycast").joinpath("topologies", "demo.toml")
        return resource.read_text(encoding="utf-8"), "<built-in demo>"
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except OSError as exc:
        raise LabError(f"{path}: cannot read: {exc.strerror}") from None
