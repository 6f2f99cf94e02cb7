"""`LabControl`: the scenario engine's `PoolControl` for a pool running in the lab.

Servers are programs in namespaces: killed with SIGKILL (agent and service),
started from standby, and handed an operator's policy change as a JSON request
on their agent's command socket. Client rates are the prober's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from manycast.errors import LabError
from manycast.lab.build import Lab
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
    prober: Prober

    def hosts(self, server: str) -> bool:
        return True

    def kill_server(self, server: str) -> None:
        self.lab.kill_server(server)

    def start_server(self, server: str) -> None:
        self.lab.start_server(server)

    def command(self, server: str, op: control.PolicyOp) -> None:
        self.lab.ask(server, "server", agent_request(op))

    def set_client_rate(self, group: str, rate: float) -> None:
        self.prober.set_rate(group, rate)
