"""The kernel lab: a topology on real Linux networking, one namespace per node.

`manycast lab` (cli.py) and the tests use it through the names below.

    build.py       Lab: up (namespaces and programs), down, exec, popen, kernel tables
    namespaces.py  the network: namespaces, veth pairs, LAN bridges, addresses, routes
    daemons.py     the programs: start, pid files, readiness, signals, command sockets
    status.py      what a lab looks like now (`manycast lab status`)
    prober.py      one process playing every client, with a ClientStats per client
    control.py     LabControl: the scenario engine's PoolControl for the lab
    run.py         LabRun: the scenario through the one engine, the one summary
"""

from manycast.errors import LabError
from manycast.lab.build import NEEDS_ROOT, PREFIX, RUN_ROOT, Lab, require_root, topology_text
from manycast.lab.control import LabControl, agent_request
from manycast.lab.daemons import READY_TIMEOUT, ROLES_OF
from manycast.lab.prober import CLIENT_TTL, REQUEST_TIMEOUT, ProbeClient, Prober
from manycast.lab.run import LabRun, Progress
from manycast.lab.status import LabStatus, NodeStatus, RouterTables

__all__ = [
    "CLIENT_TTL",
    "NEEDS_ROOT",
    "PREFIX",
    "READY_TIMEOUT",
    "REQUEST_TIMEOUT",
    "ROLES_OF",
    "RUN_ROOT",
    "Lab",
    "LabControl",
    "LabError",
    "LabRun",
    "LabStatus",
    "NodeStatus",
    "ProbeClient",
    "Prober",
    "Progress",
    "RouterTables",
    "agent_request",
    "require_root",
    "topology_text",
]
