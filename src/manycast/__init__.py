"""manycast: one service on many servers behind one multicast address.

The public API, for scripts and notebooks:

    from manycast import AddressSpace, equal_split, set_share, diff
    space = AddressSpace.create()                      # 2**16 interleaved buckets of IPv4
    before = equal_split(space, ["s1", "s2", "s3", "s4"])
    after = set_share(before, "s1", 0.20)              # Fig 11: only 5% moves
    print(after.portions("s1"), diff(before, after))

    from manycast import PoolRun, builtin
    run = PoolRun(builtin("demo"), "memory", seed=1)   # the demo on the virtual clock
    run.run_sync(20.0)
    print(run.summary())
"""

from manycast.drivers.memory import MemoryNetwork
from manycast.drivers.overlay import OverlayNetwork
from manycast.policy import (
    PolicyError,
    add_server,
    apportion,
    balance_loads,
    equal_split,
    reassign,
    rebalance,
    remove_server,
    set_share,
    striped,
    weighted_split,
)
from manycast.protocol.client import Client
from manycast.protocol.coordination import Coordinator, PoolSettings
from manycast.protocol.router import Router
from manycast.protocol.server import Server
from manycast.runtime import PoolRun
from manycast.space import (
    AddressSpace,
    Allocation,
    Move,
    Portion,
    PortionSet,
    SpaceError,
    diff,
    moved_share,
)
from manycast.topology import Topology, TopologyError, builtin, load, loads
from manycast.wire.errors import WireError

__version__ = "0.1.0"

__all__ = [
    "AddressSpace",
    "Allocation",
    "Client",
    "Coordinator",
    "MemoryNetwork",
    "Move",
    "OverlayNetwork",
    "PolicyError",
    "PoolRun",
    "PoolSettings",
    "Portion",
    "PortionSet",
    "Router",
    "Server",
    "SpaceError",
    "Topology",
    "TopologyError",
    "WireError",
    "add_server",
    "apportion",
    "balance_loads",
    "builtin",
    "diff",
    "equal_split",
    "load",
    "loads",
    "moved_share",
    "reassign",
    "rebalance",
    "remove_server",
    "set_share",
    "striped",
    "weighted_split",
]
