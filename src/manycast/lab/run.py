"""`LabRun`: a topology's scenario on a lab that is up, with the prober as its clients.

The steps are carried out by the one `ScenarioEngine` through `LabControl`, and
the run ends in the one summary (`manycast.summary`), as on every driver; what
only the lab can tell (the kernel's forwarding entries, whether each client's
last answer came from its owner) goes under the summary's `kernel` key.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from manycast.lab.build import Lab
from manycast.lab.control import LabControl
from manycast.lab.http_prober import HttpProber
from manycast.lab.prober import Prober
from manycast.lab.tcp_moves import TcpMoves
from manycast.scenario import ScenarioEngine
from manycast.summary import ClientRecord, ServerRecord, summarize
from manycast.topology import Topology

PROGRESS_EVERY = 1.0


@dataclass
class Progress:
    """Once a second while the scenario runs."""

    now: float
    served: int  # participants answered within the last `window` seconds
    clients: int
    answers: dict[str, int]  # answers so far, by server
    entries: int  # the routers' kernel forwarding entries
    vip_packets: int | None = None  # a VIP pool: packets its live VIP routers have seen
    # A scenario that moves live TCP connections: moved so far, downloads broken, and
    # the pause (ms) the moved ones saw: p50, p99, max.
    tcp_moved: int | None = None
    tcp_broken: int | None = None
    tcp_pause_ms: dict[str, float | None] | None = None
    # With `LabRun.detail` (the web dashboard): the steps carried out, each server's
    # status and share, who answered each client last, the routers' refused joins.
    events: tuple[tuple[float, str], ...] = ()
    status: dict[str, str] = field(default_factory=dict)
    shares: dict[str, float] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)
    refusals: dict[str, int] = field(default_factory=dict)


@dataclass
class LabRun:
    """The topology's scenario on a lab that is up, with the prober as its clients."""

    lab: Lab
    topology: Topology
    detail: bool = False  # fill Progress's dashboard fields (asks the daemons each second)

    def owners(
        self, addresses: list[str], servers: list[str] | None = None
    ) -> dict[str, str | None]:
        """Who the pool's allocation says serves each address, asked of the first of
        `servers` (default: the pool's running members) that answers."""
        if servers is None:
            servers = sorted(
                s
                for s, spec in self.topology.servers.items()
                if spec.authorized and self.lab.pid(s, "server")
            )
        for server in servers:
            with contextlib.suppress(OSError, ValueError):
                answer = self.lab.ask(server, "server", {"op": "owners", "addresses": addresses})
                return dict(answer["owners"])
        return {}

    def run(
        self,
        duration: float,
        on_progress: Callable[[Progress], None] | None = None,
        window: float = 1.5,
        settle: float = 0.0,
    ) -> dict[str, Any]:
        """Run the scenario for `duration` seconds; the summary (`summary.SUMMARY_KEYS`).
        `on_progress` is called every second; its `served` counts the clients
        answered within the last `window` seconds. With `settle`, the clients go on
        (`settle` seconds at most) until the pool has settled after the last step:
        the live servers' agents at one epoch, each with a share, and every client
        answered lately by its owner (starting a server takes seconds on a busy
        machine)."""
        # A scenario that moves live TCP connections: the movable service and a
        # download from every client, beside the pool's own service and clients.
        moves: TcpMoves | None = None
        if self.topology.tcp_moves:
            moves = TcpMoves(self.lab, self.topology)
            try:
                moves.start()
            except BaseException:
                moves.close()
                raise
        prober: Prober | HttpProber
        if self.topology.pool.vip is not None:
            prober = HttpProber(self.lab, self.topology)
        else:
            prober = Prober(self.lab, self.topology)
        control = LabControl(self.lab, prober)
        engine = ScenarioEngine(self.topology, control, connections=moves)
        pending = engine.steps()
        try:
            next_report = PROGRESS_EVERY
            while prober.now() < duration:
                until = min(duration, next_report, pending[0].at if pending else duration)
                # While a server starts, look at its ready files every tenth of a second.
                prober.run_until(min(until, prober.now() + 0.1) if control.starting else until)
                control.check_started()
                now = prober.now()
                engine.carry_out_due(pending, now)
                if now >= next_report:
                    next_report += PROGRESS_EVERY
                    if on_progress is not None:
                        on_progress(
                            Progress(
                                now,
                                prober.served_since(now - window),
                                len(prober.participants()),
                                dict(prober.answers),
                                self._entries(),
                                self._vip_packets(engine),
                                *(moves.live() if moves is not None else (None, None, None)),
                                **(self._detail(prober, engine) if self.detail else {}),
                            )
                        )
            control.check_started(wait=True)
            deadline = prober.now() + settle
            while prober.now() < deadline and not self._settled(prober, engine, window):
                prober.run_until(min(deadline, prober.now() + 0.5))
            summary = self._summary(prober, engine, control)
            if moves is not None:
                moves.close()
                summary["kernel"]["tcp"] = moves.summary()
            return summary
        finally:
            if moves is not None:
                moves.close()
            prober.close()

    def _summary(
        self, prober: Prober | HttpProber, engine: ScenarioEngine, control: LabControl
    ) -> dict[str, Any]:
        end = prober.now()
        clients = [
            ClientRecord(c.name, self.topology.clients[c.name].authorized, c.rate, c.stats)
            for c in prober.clients.values()
        ]
        servers = {
            name: self._server_record(name, engine.status(name), prober.answers[name])
            for name in self.topology.servers
        }
        # Outsiders (`authorized = false`) are not the pool's clients: the summary
        # reports them apart, and they should have had no answer at all.
        participants = prober.participants()
        owners = self.owners([c.address for c in participants], engine.live_servers())
        wrong = sorted(
            c.name
            for c in participants
            if c.server is not None and owners and owners.get(c.address) != c.server
        )
        kernel: dict[str, Any] = {
            "clients_not_at_owner": wrong,
            "clients_by_server": dict(
                sorted(Counter(c.server for c in participants if c.server).items())
            ),
            "mfc_entries": {r: len(self.lab.mfc(r)) for r in self.topology.routers},
        }
        vip = None
        if isinstance(prober, HttpProber):
            kernel["connections"] = prober.connections
            kernel["flows_split"] = prober.flows_split
            kernel["wrong_answers"] = prober.wrong_answers
            vip = self._vip_summary(engine, control)
        return summarize("kernel", end, clients, servers, engine.events, kernel=kernel, vip=vip)

    def _vip_summary(self, engine: ScenarioEngine, control: LabControl) -> dict[str, Any]:
        """The VIP routers' and edges' figures, as `PoolRun.vip_summary` gives them; a
        killed VIP router's are those it gave just before it died."""
        routers: dict[str, dict[str, Any]] = {}
        repeats = 0
        for name in sorted(self.topology.vip_routers):
            status = control.last_status.get(name) if name in engine.dead else None
            if status is None:
                with contextlib.suppress(OSError, ValueError):
                    status = self.lab.ask(name, "vip_router", {"op": "status"})
            stats = (status or {}).get("stats", {})
            routers[name] = {
                "status": "dead" if name in engine.dead else "up",
                "packets": stats.get("first_packets", 0),
                "flows": stats.get("flows", 0),
                "flows_by_server": dict(sorted(stats.get("picks", {}).items())),
            }
            repeats += stats.get("repeat_packets", 0)
        tagged = pushed = 0
        # A dual-stack pool's routers: each family's daemon tags its family's flows.
        roles = ("router", "router6") if self.topology.pool.dual else ("router",)
        for router, role in itertools.product(self.topology.routers, roles):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                edge = self.lab.ask(router, role, {"op": "status"})["vip"]
                tagged += edge["plane"]["flows_tagged"]
                pushed += edge["pushed"]
        return {
            "vip_routers": routers,
            "flows": sum(r["flows"] for r in routers.values()),
            "packets_after_first": repeats,
            "flows_tagged_at_edges": tagged,
            "packets_labelled_at_edges": pushed,
        }

    def _settled(self, prober: Prober | HttpProber, engine: ScenarioEngine, window: float) -> bool:
        live = engine.live_servers()
        try:
            agents = [self.lab.ask(s, "server", {"op": "status"}) for s in live]
        except (OSError, ValueError):
            return False
        if len({a.get("epoch") for a in agents}) != 1 or any(
            Fraction(a.get("share", "0")) <= 0 for a in agents
        ):
            return False
        participants = prober.participants()
        owners = self.owners([c.address for c in participants], live)
        recent = prober.now() - window
        return all(
            c.server == owners.get(c.address) and c.last_reply >= recent for c in participants
        )

    def _server_record(self, name: str, status: str, answers: int) -> ServerRecord:
        """`name` at the end, with its share and epoch as its agent reports them."""
        share, epoch = 0.0, 0
        if status == "up":
            with contextlib.suppress(OSError, ValueError, KeyError, ZeroDivisionError):
                agent = self.lab.ask(name, "server", {"op": "status"})
                share = float(Fraction(agent.get("share", "0")))
                epoch = int(agent.get("epoch", 0))
        return ServerRecord(status, share, answers, 0, epoch)

    def _detail(self, prober: Prober | HttpProber, engine: ScenarioEngine) -> dict[str, Any]:
        """Progress's dashboard fields: one live agent's view of the shares, the
        routers' refusal counters, who answered each client last."""
        shares: dict[str, float] = {}
        for server in engine.live_servers():
            with contextlib.suppress(OSError, ValueError, KeyError, ZeroDivisionError):
                answer = self.lab.ask(server, "server", {"op": "status"})
                shares = {s: float(Fraction(f)) for s, f in answer["shares"].items()}
                break
        refusals: Counter[str] = Counter()
        for router in self.topology.routers:
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                refusals.update(self.lab.ask(router, "router", {"op": "status"})["rejected"])
        return {
            "events": tuple((e.at, e.what) for e in engine.events),
            "status": {name: engine.status(name) for name in sorted(self.topology.servers)},
            "shares": shares,
            "owners": {c.name: c.server for c in prober.participants() if c.server is not None},
            "refusals": dict(refusals),
        }

    def _vip_packets(self, engine: ScenarioEngine) -> int | None:
        if not self.topology.vip_routers:
            return None
        total = 0
        for name in self.topology.vip_routers:
            if name not in engine.dead:
                with contextlib.suppress(OSError, ValueError, KeyError):
                    status = self.lab.ask(name, "vip_router", {"op": "status"})
                    total += int(status["stats"]["first_packets"])
        return total

    def _entries(self) -> int:
        total = 0
        for router in self.topology.routers:
            with contextlib.suppress(OSError):
                total += len(self.lab.mfc(router))
        return total
