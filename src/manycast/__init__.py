"""manycast: one service on many servers behind one multicast address.

The public API, for scripts and notebooks:

    from manycast import AddressSpace, equal_split, set_share, diff
    space = AddressSpace.create()                      # 2**16 interleaved buckets of IPv4
    before = equal_split(space, ["s1", "s2", "s3", "s4"])
    after = set_share(before, "s1", 0.20)              # Fig 11: only 5% moves
    print(after.portions("s1"), diff(before, after))

    from manycast import PoolRun, builtin
    run = PoolRun(builtin("demo"), "memory", seed=1)   # the demo on the virtual clock
    run.run(20.0)
    print(run.summary())

Names load on first use, so `import manycast` (or `from manycast import
AddressSpace`) loads no asyncio, sockets or DNS library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    # the address space and policies
    "AddressSpace": "manycast.space",
    "Allocation": "manycast.space",
    "Move": "manycast.space",
    "Portion": "manycast.space",
    "PortionSet": "manycast.space",
    "diff": "manycast.space",
    "moved_share": "manycast.space",
    "PolicyName": "manycast.policy",
    "add_server": "manycast.policy",
    "apportion": "manycast.policy",
    "balance_loads": "manycast.policy",
    "equal_split": "manycast.policy",
    "reassign": "manycast.policy",
    "rebalance": "manycast.policy",
    "remove_server": "manycast.policy",
    "set_share": "manycast.policy",
    "striped": "manycast.policy",
    "weighted_split": "manycast.policy",
    # nodes (sans-I/O)
    "Client": "manycast.protocol.client",
    "Coordinator": "manycast.protocol.coordination",
    "PoolSettings": "manycast.protocol.coordination",
    "Router": "manycast.protocol.router",
    "Server": "manycast.protocol.server",
    "Technique": "manycast.protocol.technique",
    # topology, scenario, runs
    "Topology": "manycast.topology",
    "builtin": "manycast.topology",
    "load": "manycast.topology",
    "loads": "manycast.topology",
    "Action": "manycast.steps",
    "Step": "manycast.steps",
    "ScenarioEngine": "manycast.scenario",
    "PoolRun": "manycast.runtime",
    "summarize": "manycast.summary",
    # drivers
    "Network": "manycast.drivers.contract",
    "MemoryNetwork": "manycast.drivers.memory",
    "OverlayNetwork": "manycast.drivers.overlay_network",
    # errors
    "ManycastError": "manycast.errors",
    "ConfigError": "manycast.errors",
    "DriverError": "manycast.errors",
    "LabError": "manycast.errors",
    "AuthError": "manycast.auth",
    "NamingError": "manycast.naming",
    "PolicyError": "manycast.policy",
    "SpaceError": "manycast.space",
    "TopologyError": "manycast.topology",
    "WireError": "manycast.wire.errors",
}

__all__ = [
    "Action",
    "AddressSpace",
    "Allocation",
    "AuthError",
    "Client",
    "ConfigError",
    "Coordinator",
    "DriverError",
    "LabError",
    "ManycastError",
    "MemoryNetwork",
    "Move",
    "NamingError",
    "Network",
    "OverlayNetwork",
    "PolicyError",
    "PolicyName",
    "PoolRun",
    "PoolSettings",
    "Portion",
    "PortionSet",
    "Router",
    "ScenarioEngine",
    "Server",
    "SpaceError",
    "Step",
    "Technique",
    "Topology",
    "TopologyError",
    "WireError",
    "__version__",
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
    "summarize",
    "weighted_split",
]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("manycast")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0.0.0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":  # read from the package metadata on first use (slow-ish)
        globals()[name] = value = _version()
        return value
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'manycast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:
    __version__: str
    from manycast.auth import AuthError
    from manycast.drivers.contract import Network
    from manycast.drivers.memory import MemoryNetwork
    from manycast.drivers.overlay_network import OverlayNetwork
    from manycast.errors import ConfigError, DriverError, LabError, ManycastError
    from manycast.naming import NamingError
    from manycast.policy import (
        PolicyError,
        PolicyName,
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
    from manycast.protocol.technique import Technique
    from manycast.runtime import PoolRun
    from manycast.scenario import ScenarioEngine
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
    from manycast.steps import Action, Step
    from manycast.summary import summarize
    from manycast.topology import Topology, TopologyError, builtin, load, loads
    from manycast.wire.errors import WireError
