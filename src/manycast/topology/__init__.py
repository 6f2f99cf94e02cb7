"""Topology as data (the Mininet model): one TOML file names the routers, servers,
VIP routers, clients, links, the pool (approach, address, name, service, policy) and a
timed scenario.

`load(path)` parses and checks a file, naming the line of every problem, and
compiles it: addresses for every interface, the links a driver needs, and each
router's unicast routes (shortest paths by link delay). The same compiled
topology runs in the memory driver, the overlay and the kernel lab.

    spec.py        the compiled Topology (with hops, edge_router), Approach, PoolSpec, ...
    links.py       LinkSpec and Attachment: what a driver needs to know about a link
    reader.py      typed TOML tables whose errors name the line (TopologyError)
    compiler.py    checking each section, [[scenario]] tables into typed steps
    addressing.py  interface addresses and the overlay's endpoint map
    routing.py     shortest-path routes, hop counts and reachability
    loading.py     load, loads, builtin, bundled
"""

from manycast.steps import Step
from manycast.topology.addressing import assign_endpoints
from manycast.topology.links import Attachment, LinkSpec
from manycast.topology.loading import builtin, bundled, load, loads
from manycast.topology.reader import TopologyError
from manycast.topology.spec import (
    Approach,
    ClientSpec,
    PoolSpec,
    Route,
    RouterSpec,
    ServerSpec,
    Topology,
    VipRouterSpec,
)

__all__ = [
    "Approach",
    "Attachment",
    "ClientSpec",
    "LinkSpec",
    "PoolSpec",
    "Route",
    "RouterSpec",
    "ServerSpec",
    "Step",
    "Topology",
    "TopologyError",
    "VipRouterSpec",
    "assign_endpoints",
    "builtin",
    "bundled",
    "load",
    "loads",
]
