"""Moving live kernel TCP connections between the lab's servers: hold, hand over, release.

`TcpMover` runs beside a lab whose pool has a VIP (`lab/vipnet.py`), or a
manycast pool, whose TCP clients reach the group through a unicast address
(`tcp_manycast.py`; there the path is the routers' (client, group) entry, and
step 3 first steers it to the new server at every router). It starts
the movable TCP service (`tcp_service.py`) on the servers, holds the pool's
key, and opens at each client edge router the NFQUEUE and conntrack sockets of
`tcp_hold.EdgeHold`. A move of some flows from `old` to `new`:

1. the edge holds the flows (their conntrack mark becomes `HOLD_MARK`: their
   packets wait in the queue from now on);
2. `old`'s service freezes and dumps the sockets and hands them, signed, to
   `new`'s agent, which restores them; `old` closes its copies silently;
3. the edge gives each flow the mark of the server that now has it (`new`, or
   `old` again for a flow whose move failed) and lets its held packets go.

In a manycast pool the routers are steered toward `new` during step 2, from a
thread (the edge holds the packets, so none takes the new path early); a client
none of whose flows moved is steered back to `old` before step 3.

The pause a flow sees is the time between 1 and 3 (`MoveResult.pause_ms`),
plus at most one round trip for the new socket's window probe.

A dual-stack manycast pool has a TCP address of each family, each mapped onto
its family's group: a connection stays in its client's family throughout (the
edge holds it in its family's queue, the servers mark it with its family's
tuple, and the routers' daemon of that family steers its (client, group)
entry); the servers' agents hand the states over on their IPv4 addresses.
"""

from __future__ import annotations

import contextlib
import ipaddress
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from manycast import auth
from manycast.drivers import netns
from manycast.drivers.kernel import srv6, tcp_hold, tcp_manycast
from manycast.drivers.kernel.control import ask, ready_path
from manycast.drivers.kernel.tcp_service import AGENT_PORT, PORT, ROLE
from manycast.errors import LabError

if TYPE_CHECKING:
    from manycast.topology import Topology

Flow = tcp_hold.Flow
KEY_FILE = "tcp_pool.key"
READY_TIMEOUT_S = 20.0
MOVE_TIMEOUT_S = 30.0


class Lab(Protocol):
    """What a mover needs of `manycast.lab.Lab` (the lab sits above the drivers)."""

    @property
    def run_dir(self) -> Path: ...

    def ns(self, node: str) -> str: ...

    def popen(self, node: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]: ...


@dataclass
class MoveResult:
    moved: list[Flow] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    pause_ms: float = 0.0  # from the hold to the release at the edge
    dump_ms: float = 0.0
    transfer_ms: float = 0.0
    bytes: int = 0  # queued bytes that moved with the sockets
    packets_held: int = 0
    steer_failed: dict[str, str] = field(default_factory=dict)  # manycast: router -> why
    vip_routers_told: int = 0  # a VIP pool: the VIP routers that recorded the move


class TcpMover:
    """The movable TCP service on a lab's servers, and the moves between them."""

    def __init__(
        self, lab: Lab, topology: Topology, port: int = PORT, agent_port: int = AGENT_PORT
    ) -> None:
        self.lab = lab
        self.topology = topology
        # A manycast pool: its TCP service's unicast address, mapped onto the group
        # (a dual-stack pool's: one of each, by IP version, in `addresses` and `groups`).
        pool = topology.pool
        self.group: str | None = None
        self.groups: dict[int, str] = {}
        if pool.vip is None:
            self.groups = {v: str(pool.group_of(v)) for v in pool.families}
            self.group = self.groups[pool.space.family]
            self.addresses = {v: str(tcp_manycast.tcp_address(v)) for v in pool.families}
            self.vip = self.addresses[pool.space.family]
        else:
            self.addresses = {pool.vip.version: str(pool.vip)}
            self.vip = str(pool.vip)
        self.port = port
        self.agent_port = agent_port
        self.marks = srv6.server_marks(topology.servers)
        self.key_path = lab.run_dir / KEY_FILE
        self.edges: dict[tuple[str, int], tcp_hold.EdgeHold] = {}  # (edge, IP version)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        # Manycast: the routers are steered from here while a move's sockets travel.
        self._steerer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="steer")

    # -- set-up ----------------------------------------------------------------------------
    def start(self, servers: Iterable[str] | None = None) -> None:
        """The pool key, the edges' rules and sockets, and the service on `servers` (by
        default every server that is not a standby)."""
        if not self.key_path.exists():
            auth.save_private(auth.generate(), self.key_path)
        topology = self.topology
        for edge, version in sorted(
            {(topology.router_of(c), topology.address(c).version) for c in topology.clients}
        ):
            if (edge, version) in self.edges or version not in self.addresses:
                continue
            name = self.lab.ns(edge)
            address = self.addresses[version]
            tcp_hold.install(
                partial(netns.enter, name),
                tcp_hold.edge_rules(address, self.port),
                tcp_hold.iptables_for(address),
            )
            if self.groups:
                tcp_manycast.set_up_edge(name, address, self.groups[version], self.port)
            self.edges[edge, version] = netns.run_in(
                name, partial(tcp_hold.EdgeHold, address, self.port)
            )
        chosen = (
            [s.name for s in self.topology.servers.values() if not s.standby]
            if servers is None
            else list(servers)
        )
        for server in chosen:
            self.start_server(server, wait=False)
        for server in chosen:
            self.wait_ready(server)

    def start_server(self, server: str, wait: bool = True) -> None:
        ready_path(self.lab.run_dir, server, ROLE).unlink(missing_ok=True)
        for version, group in self.groups.items():
            address = self.addresses[version]
            tcp_manycast.set_up_server(self.lab.ns(server), address, group, self.port)
        vips = [word for address in self.addresses.values() for word in ("--vip", address)]
        argv = [
            sys.executable, "-m", "manycast.drivers.kernel.tcp_service",
            "--name", server, *vips, "--port", str(self.port),
            "--address", str(self.topology.address(server)),
            "--agent-port", str(self.agent_port),
            "--run-dir", str(self.lab.run_dir), "--key", str(self.key_path),
        ]  # fmt: skip
        log = open(self.lab.run_dir / f"{server}.{ROLE}.log", "ab")  # noqa: SIM115 - the child's
        with log:
            self.processes[server] = self.lab.popen(server, argv, stdout=log, stderr=log)
        if wait:
            self.wait_ready(server)

    def wait_ready(self, server: str) -> None:
        path = ready_path(self.lab.run_dir, server, ROLE)
        process = self.processes[server]
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not path.exists():
            if process.poll() is not None:
                log = self.lab.run_dir / f"{server}.{ROLE}.log"
                raise LabError(f"{server}'s TCP service exited: {_tail(log)}")
            if time.monotonic() > deadline:
                raise LabError(f"{server}'s TCP service did not get ready")
            time.sleep(0.02)

    def kill_server(self, server: str) -> None:
        """The service dies at once (SIGKILL), its connections with it."""
        process = self.processes.pop(server, None)
        if process is not None:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)

    def close(self) -> None:
        for server in list(self.processes):
            process = self.processes.pop(server)
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for edge in self.edges.values():
            edge.close()
        self.edges.clear()
        self._steerer.shutdown(wait=True)

    # -- asking ----------------------------------------------------------------------------
    def ask(self, server: str, request: dict[str, Any], timeout: float = 5.0) -> Any:
        return ask(self.lab.run_dir, server, ROLE, request, timeout)

    def live(self) -> list[str]:
        """The servers whose service is running."""
        return [name for name, process in self.processes.items() if process.poll() is None]

    def status(self, server: str) -> dict[str, Any]:
        answer: dict[str, Any] = self.ask(server, {"op": "status"})
        return answer

    def connections(self, server: str) -> list[Flow]:
        return [(str(c[0]), int(c[1])) for c in self.status(server)["connections"]]

    def where(self, flows: Iterable[Flow]) -> dict[Flow, str]:
        """Which server holds each flow now (a flow no server holds is left out)."""
        wanted = set(flows)
        found: dict[Flow, str] = {}
        for server in self.live():
            try:
                held = self.connections(server)
            except (OSError, ValueError):  # dying, or gone since live() looked
                continue
            for flow in held:
                if flow in wanted:
                    found[flow] = server
        return found

    def edge_of(self, flow: Flow) -> str:
        client = ipaddress.ip_address(flow[0])
        edge = self.topology.edge_router(client)
        if edge is None or (edge, client.version) not in self.edges:
            raise LabError(f"no edge router holds the flows of {flow[0]}")
        return edge

    def address_for(self, client: str) -> str:
        """The pool's TCP address (or VIP) a client connects to: its family's."""
        return self.addresses[ipaddress.ip_address(client).version]

    # -- moving ----------------------------------------------------------------------------
    def move(self, flows: Iterable[Flow], old: str, new: str) -> MoveResult:
        """Move `flows` (clients' address and port) from `old` to `new`. In a manycast
        pool the path is the client's, so every flow `old` holds of the same clients
        moves with them."""
        flows = list(flows)
        if self.group is not None:
            clients = {flow[0] for flow in flows}
            flows += [f for f in self.connections(old) if f[0] in clients and f not in flows]
        result = MoveResult()
        by_edge: dict[tuple[str, int], list[Flow]] = defaultdict(list)
        for flow in flows:
            by_edge[self.edge_of(flow), ipaddress.ip_address(flow[0]).version].append(flow)
        began = time.perf_counter()
        held: list[Flow] = []
        for edge, group in by_edge.items():
            held += self.edges[edge].hold(group)
        for flow in set(flows) - set(held):
            result.refused[f"{flow[0]}:{flow[1]}"] = "the edge knows no such flow"
        answer: dict[str, Any] = {}
        # Manycast: the path switch goes while `old` hands the sockets over (the edge
        # holds the clients' packets, so no packet takes the new path before then).
        steering = None
        if self.group is not None and held:
            steering = self._steer_async({f[0] for f in held}, new)
        if held:
            request = {
                "op": "move",
                "flows": [list(f) for f in held],
                "to": [str(self.topology.address(new)), self.agent_port],
            }
            try:
                answer = self.ask(old, request, timeout=MOVE_TIMEOUT_S)
            except (OSError, ValueError) as exc:
                answer = {"error": f"{old} did not answer: {exc}"}
        moved = {(str(f[0]), int(f[1])) for f in answer.get("moved", [])}
        if steering is not None:
            result.steer_failed.update(steering.result())
            # A client none of whose flows moved goes back to the server holding them.
            stuck = {f[0] for f in held} - {f[0] for f in moved}
            if stuck:
                result.steer_failed.update(self._steer_async(stuck, old).result())
        for edge, group in by_edge.items():
            hold = self.edges[edge]
            going = [f for f in group if f in moved]
            staying = [f for f in group if f in held and f not in moved]
            if going:
                result.packets_held += hold.release(going, self._mark(new))
            if staying:
                result.packets_held += hold.release(staying, self._mark(old))
        result.pause_ms = (time.perf_counter() - began) * 1e3
        result.moved = [f for f in held if f in moved]
        if self.group is None and result.moved:
            result.vip_routers_told = self._tell_vip_routers(result.moved, new)
        result.refused.update(answer.get("refused", {}))
        if "error" in answer:
            for flow in held:
                result.refused.setdefault(f"{flow[0]}:{flow[1]}", str(answer["error"]))
        result.dump_ms = float(answer.get("dump_ms", 0.0))
        result.transfer_ms = float(answer.get("transfer_ms", 0.0))
        result.bytes = int(answer.get("bytes", 0))
        return result

    def _steer_async(self, clients: Iterable[str], server: str) -> Future[dict[str, str]]:
        """`steer` toward `server`, in a thread."""
        return self._steerer.submit(self.steer, sorted(clients), server, server)

    def steer(self, clients: Iterable[str], toward: str, to: str | None) -> dict[str, str]:
        """Every router on the way from each client's edge to `toward` points the
        (client, group) entry toward the server `to` (None: back to the pool's
        allocation); the routers that refused, with why. A dual-stack pool's clients
        are steered by their family's daemons, on their family's group, toward the
        server's address of their family."""
        assert self.groups
        by_version: dict[int, list[str]] = defaultdict(list)
        for client in clients:
            by_version[ipaddress.ip_address(client).version].append(client)

        def one(version: int) -> dict[str, str]:
            routes: dict[str, list[str]] = defaultdict(list)
            for client in sorted(by_version[version]):
                edge = self.edge_of((client, 0))
                for router in tcp_manycast.path(self.topology, edge, toward):
                    routes[router].append(client)
            role = "router6" if self.topology.pool.dual and version == 6 else "router"
            return tcp_manycast.steer(
                tcp_manycast.router_asker(self.lab.run_dir, role),
                routes,
                self.groups[version],
                None if to is None else self._address_of(to, version),
            )

        if len(by_version) <= 1:
            return one(next(iter(by_version))) if by_version else {}
        # Both families at once: each asks its own daemons.
        with ThreadPoolExecutor(max_workers=len(by_version)) as families:
            answers = list(families.map(one, sorted(by_version)))
        return {router: why for answer in answers for router, why in answer.items()}

    def _address_of(self, server: str, version: int) -> str:
        """`server`'s address of IP `version` (a dual-stack server has one of each)."""
        iface = next(iter(self.topology.interfaces[server].values()))
        if version == 6 and iface.address6 is not None:
            return str(iface.address6)
        return str(iface.address)

    def _tell_vip_routers(self, flows: list[Flow], server: str) -> int:
        """Every VIP router records the flows as `server`'s (after the release: not part
        of the pause), so that a packet of one that reaches a VIP router (its edge lost
        the tag) goes on to `server`, not to the server it left; the routers told."""
        request: dict[str, Any] = {"op": "moved", "flows": [list(f) for f in flows]}
        request.update(server=server, port=self.port)
        told = 0
        for name in sorted(self.topology.vip_routers):
            with contextlib.suppress(OSError, ValueError):  # a dead VIP router
                ask(self.lab.run_dir, name, "vip_router", request, 2.0)
                told += 1
        return told

    def _mark(self, server: str) -> int:
        """The conntrack mark a released flow gets at the edge: the server's segment in
        a VIP pool; none in a manycast pool (the routers' entries are the path)."""
        return 0 if self.group is not None else self.marks[server]

    def drain(self, server: str, to: list[str], batch: int = 100) -> list[MoveResult]:
        """Move every connection of `server` to the servers `to`, spread in turn,
        `batch` connections per move."""
        if not to:
            raise LabError("a drain needs at least one other server")
        flows = self.connections(server)
        shares: dict[str, list[Flow]] = defaultdict(list)
        for i, flow in enumerate(flows):
            shares[to[i % len(to)]].append(flow)
        results = []
        for target, group in shares.items():
            for start in range(0, len(group), batch):
                results.append(self.move(group[start : start + batch], server, target))
        return results


def _tail(path: Path) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-600:]
    return "(no log)"


__all__ = ["MoveResult", "TcpMover"]
