"""The kernel driver: manycast nodes on real Linux networking, one program per namespace.

The lab (`manycast.lab`) runs three programs, each inside one node's network
namespace, started as `python -m manycast daemon ROLE --node N --run-dir DIR
--netns NS` (`cli`):

* `router` (`router_daemon`): the sans-I/O `Router` driving the kernel's
  multicast forwarding table through the MRT socket (`drivers.mroute`);
* `server` (`server_agent`): the `Server` agent, reports on a raw IGMP socket,
  coordination on the control group;
* `responder` (`responder`): the service itself, a UDP counter that knows
  nothing of manycast.

Each runs one `KernelLoop` (`loop`), the kernel driver's implementation of the
driver contract, hosting the one node of its process. Each writes
`<node>.<role>.ready` once set up and answers one-line JSON requests on the unix
socket `<node>.<role>.sock` (`control`: `status`, and for servers `set_share`,
`rebalance`, `owners`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from manycast.drivers.kernel.control import ask, command_path, counts_path, ready_path

if TYPE_CHECKING:
    from manycast.drivers.kernel.loop import KernelLoop
    from manycast.drivers.kernel.responder import Responder
    from manycast.drivers.kernel.router_daemon import RouterDaemon
    from manycast.drivers.kernel.server_agent import ServerAgent

__all__ = [
    "KernelLoop",
    "Responder",
    "RouterDaemon",
    "ServerAgent",
    "ask",
    "command_path",
    "counts_path",
    "ready_path",
]

# The programs load sockets, the MRT API and the pool builder: only when asked for.
_LAZY = {
    "KernelLoop": "manycast.drivers.kernel.loop",
    "Responder": "manycast.drivers.kernel.responder",
    "RouterDaemon": "manycast.drivers.kernel.router_daemon",
    "ServerAgent": "manycast.drivers.kernel.server_agent",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
