"""The lab's one scrape target: every daemon's Prometheus text, gathered from the host.

The lab's namespaces have no management link to the host: a daemon is reached
only through its command socket in the run directory. `gather` asks each running
daemon (router, VIP router, server agent) for `{"op": "metrics"}`; served by
`manycast lab metrics`, `observe.metrics.FederatedCollector` merges the texts
with a `node` label.
"""

from __future__ import annotations

import logging

from manycast.lab.build import Lab
from manycast.topology import Topology

log = logging.getLogger("manycast.lab.metrics")


def gather(lab: Lab, topology: Topology | None = None) -> dict[str, str]:
    """node -> its daemon's exposition text, for every daemon that runs and answers
    (`topology`: the lab's, read from its run directory unless given)."""
    topology = topology or lab.topology()
    # The programs that keep a sans-I/O node (not the services): role by node kind.
    nodes = [
        *((name, "router") for name in sorted(topology.routers)),
        *((name, "vip_router") for name in sorted(topology.vip_routers)),
        *((name, "server") for name in sorted(topology.servers)),
    ]
    texts: dict[str, str] = {}
    for node, role in nodes:
        if lab.pid(node, role) is None:
            continue  # not running: a dead or standby server
        try:
            answer = lab.ask(node, role, {"op": "metrics"})
        except (OSError, ValueError) as exc:
            log.warning("no metrics from %s: %s", node, exc)
            continue
        if isinstance(answer, dict) and isinstance(answer.get("text"), str):
            texts[node] = answer["text"]
        else:
            log.warning("no metrics from %s: %s", node, answer)
    return texts
