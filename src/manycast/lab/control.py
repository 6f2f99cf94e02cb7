"""`LabControl`: the scenario engine's `PoolControl` for a pool running in the lab.

Servers are programs in namespaces: killed with SIGKILL (agent and service),
started from standby, and handed an operator's policy change as a JSON request
on their agent's command socket. Client rates are the prober's.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from manycast.errors import LabError
from manycast.lab.build import Lab
from manycast.lab.daemons import READY_TIMEOUT, ROLES_OF, SERVER_START
from manycast.lab.http_prober import HttpProber
from manycast.lab.prober import Prober
from manycast.wire import control


def agent_request(op: control.PolicyOp) -> dict[str, Any]:
    """The server agent's command-socket request for `op` (`drivers/kernel.py` reads it)."""
    if isinstance(op, control.SetShareOp):
        return {"op": "set_share", "server": op.server, "share": str(op.share)}
    if isinstance(op, control.RebalanceOp) and not op.loads:
        return {"op": "rebalance", "target": op.target}
    raise LabError(f"the lab's agents take no {type(op).__name__} from an operator: {op}")


@dataclass
class LabControl:
    """The lab as the engine sees it: this process controls every server."""

    lab: Lab
    prober: Prober | HttpProber
    # Servers started and not known ready yet: name -> deadline (time.monotonic()).
    starting: dict[str, float] = field(default_factory=dict)
    # What a program said of itself just before it was killed (its figures die with it).
    last_status: dict[str, Any] = field(default_factory=dict)

    def hosts(self, server: str) -> bool:
        return True

    def kill_server(self, server: str) -> None:
        self.starting.pop(server, None)
        self.lab.kill_server(server)

    def start_server(self, server: str) -> None:
        # No waiting here: starting a program takes a second or more on a busy
        # machine, and the clients must keep asking meanwhile (`check_started`).
        self.lab.start_server(server, wait=False)
        self.starting[server] = time.monotonic() + READY_TIMEOUT

    def check_started(self, wait: bool = False) -> None:
        """Forget the started servers whose programs are ready; LabError for one that
        died or is late. With `wait`, until every started server is ready."""
        ready = self.lab.daemons.ready
        for server, deadline in list(self.starting.items()):
            while not all(ready(server, role, deadline) for role in SERVER_START):
                if not wait:
                    break
                time.sleep(0.02)
            else:
                del self.starting[server]

    def command(self, server: str, op: control.PolicyOp) -> None:
        if server in self.starting:
            self.check_started(wait=True)  # it must be listening to take the request
        self.lab.ask(server, "server", agent_request(op))

    def set_client_rate(self, group: str, rate: float) -> None:
        self.prober.set_rate(group, rate)

    def hosts_node(self, name: str) -> bool:
        return True

    def kill_node(self, name: str) -> None:
        """Every program of `name` dies at once (SIGKILL)."""
        kind = self.prober.topology.kind(name)
        if kind not in ROLES_OF:
            raise LabError(f"the lab runs no program for {kind} {name}")
        for role in ROLES_OF[kind]:
            with contextlib.suppress(OSError, ValueError):
                self.last_status[name] = self.lab.ask(name, role, {"op": "status"})
            self.lab.kill(name, role)
