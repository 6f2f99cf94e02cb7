"""The server agent: the sans-I/O `Server` (coordination and membership) on a server's namespace.

Coordination and membership run exactly as in the overlay, through the host's
`ControlEndpoint` (reports and control messages). The service itself is a
separate program (`responder`, or in a VIP pool `http`), so the session frames
the core would send are dropped and counted.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

from manycast.drivers.kernel.control import counts_path
from manycast.drivers.kernel.endpoint import ControlEndpoint
from manycast.drivers.kernel.loop import KernelLoop
from manycast.errors import ConfigError
from manycast.protocol.dualstack import in_space
from manycast.protocol.node import Frame
from manycast.wire import control

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

    from manycast.protocol.server import Server
    from manycast.topology import Topology

log = logging.getLogger("manycast.kernel.server")


@dataclass
class AgentStats:
    session_frames_dropped: int = 0  # the lab's service is a separate program


class ServerAgent:
    def __init__(self, topology: Topology, name: str, run_dir: Path, seed: int) -> None:
        from manycast.pool import build

        self.loop = KernelLoop(run_dir, name, "server", send=self._send)
        nodes = build(topology, seed=seed, wall_base=self.loop.wall_base, only={name})
        server = nodes.servers.get(name) or nodes.standby.get(name)
        if server is None:
            self.loop.close()
            raise ConfigError(f"{name} is not a server of this topology")
        self.server: Server = server
        self.stats = AgentStats()
        self.pool = topology.pool
        self.iface, _ = topology.gateways[name]
        self.endpoint = ControlEndpoint(
            self.loop,
            self.iface,
            str(self.pool.control_group),
            self.pool.control_port,
            lambda packet: self.server.receive(self.iface, packet, self.loop.now),
            dual=self.pool.dual,
        )
        self.loop.handlers.update(
            status=self._status,
            set_share=self._set_share,
            rebalance=self._rebalance,
            owners=self._owners,
            changes=self._changes,
            metrics=self._metrics,
        )
        self._registry: CollectorRegistry | None = None  # metrics, made when first asked
        self.loop.add(self.server)

    def _send(self, frame: Frame) -> None:
        if not self.endpoint.send(frame):
            self.stats.session_frames_dropped += 1

    # control requests (the loop sends what they produce before answering) -------------
    def _status(self, _: dict[str, Any]) -> dict[str, Any]:
        now = self.loop.now
        coordinator = self.server.coordinator
        allocation = coordinator.allocation
        portions = self.server.portions
        name = self.server.name
        return {
            "node": name,
            "pid": os.getpid(),
            "epoch": coordinator.epoch,
            "state": coordinator.state.name,
            "alive": coordinator.alive(now),
            "coordinator": coordinator.coordinator(now),
            "digest": coordinator.digest,
            "portions": str(portions) if portions is not None else "",
            "share": str(allocation.share(name))
            if allocation is not None and name in allocation.servers
            else "0",
            "shares": {s: str(f) for s, f in allocation.shares().items()} if allocation else {},
            "agent": {**asdict(self.endpoint.stats), **asdict(self.stats)},
        }

    def _owners(self, request: dict[str, Any]) -> dict[str, Any]:
        allocation = self.server.coordinator.allocation
        if allocation is None:
            return {"epoch": 0, "owners": {}}
        spaces = {space.family: space for space in (self.pool.space, self.pool.space6) if space}
        owners = {}
        for text in request["addresses"]:
            address = ipaddress.ip_address(text)
            space = spaces.get(address.version)
            # (A dual-stack pool: the same buckets of the client's family's space.)
            owners[text] = in_space(allocation, space).owner(address) if space else None
        return {"epoch": self.server.coordinator.epoch, "owners": owners}

    def _changes(self, _: dict[str, Any]) -> dict[str, Any]:
        """The allocation changes this server adopted (`Coordinator.changes`: its latest
        4096), as [monotonic time, epoch, why]: on this host's monotonic clock, which
        every namespace shares, so another program can place them on its own clock."""
        offset = time.monotonic() - self.loop.now
        return {
            "changes": [
                [round(t + offset, 6), epoch, why]
                for t, epoch, why in self.server.coordinator.changes
            ]
        }

    def _set_share(self, request: dict[str, Any]) -> dict[str, Any]:
        op = control.SetShareOp(request["server"], Fraction(request["share"]))
        self.server.command(op, self.loop.now)
        return {"ok": True}

    def _rebalance(self, request: dict[str, Any]) -> dict[str, Any]:
        self.server.command(control.RebalanceOp(float(request["target"]), ()), self.loop.now)
        return {"ok": True}

    def _metrics(self, _: dict[str, Any]) -> dict[str, Any]:
        """Prometheus text of this server (docs/metrics.md): the agent's counters, and
        the requests its service answered (the service's counts file; no sessions: the
        service is another program)."""
        from manycast.observe import metrics

        if self._registry is None:
            path = counts_path(self.loop.run_dir, self.server.name)

            def servers() -> list[metrics.ServerItem]:
                try:
                    counts = json.loads(path.read_text())
                    answered: int | None = int(counts["total"])
                except (OSError, ValueError, KeyError, TypeError):
                    answered = None  # no answer written yet
                return [metrics.ServerItem(self.server, own_service=False, requests=answered)]

            self._registry = metrics.registry(
                metrics.PoolCollector(now=lambda: self.loop.now, servers=servers)
            )
        return {"text": metrics.exposition(self._registry)}

    def run(self) -> None:
        """Serve until SIGTERM."""
        self.loop.ready()
        try:
            self.loop.run_until(float("inf"))
        finally:
            self.loop.close()
