"""The one place that turns a driver's name into a `Network`: memory or overlay."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal, get_args

from manycast.drivers.contract import Network
from manycast.drivers.links import LinkSpec
from manycast.drivers.memory import MemoryNetwork
from manycast.drivers.overlay import Endpoint
from manycast.drivers.overlay_network import OverlayNetwork
from manycast.errors import ConfigError

DriverName = Literal["memory", "overlay"]
DRIVERS: tuple[str, ...] = get_args(DriverName)


def open_network(
    driver: str,
    links: Iterable[LinkSpec],
    *,
    seed: int,
    endpoints: Mapping[tuple[str, str], Endpoint | int] | None = None,
) -> Network:
    """An empty network of the named driver (nodes are added to it afterwards).
    The overlay needs every attachment's UDP endpoint."""
    if driver == "memory":
        return MemoryNetwork({link.name: link for link in links}, seed=seed)
    if driver == "overlay":
        if endpoints is None:
            raise ConfigError("the overlay driver needs an endpoint for every attachment")
        return OverlayNetwork(links, endpoints, seed=seed)
    raise ConfigError(f"no driver named {driver!r}: expected one of {', '.join(DRIVERS)}")
