"""Generated topologies for large pools: a tree of routers, many servers, one sample
of real clients, and a scenario.

    clients (per client router) -- cN --+
                                        +-- core -- rs1 .. rsK -- servers
    ...                                 +

Servers are spread over the server routers in turn (`s1` on `rs1`, `s2` on `rs2`,
...), each on its own link; standby servers come after the configured ones. The
text is an ordinary topology file: `manycast topology check` reads it, and so
does every driver.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from manycast.errors import ConfigError

MAX_ROUTERS = 100
MAX_SERVERS = 1024


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def toml_table(kind: str, keys: Mapping[str, Any], array: bool = True) -> str:
    """One TOML table: `[[kind]]` (or `[kind]`) and its keys, in the order given."""
    body = "".join(f"{k} = {toml_value(v)}\n" for k, v in keys.items())
    return f"[[{kind}]]\n{body}" if array else f"[{kind}]\n{body}"


@dataclass(frozen=True)
class PoolShape:
    """A generated pool. `pool` holds extra `[pool]` keys (heartbeat_ms, technique,
    membership, ...); `steps` the scenario, each `(at, action, arguments)`.
    `router_delays_ms` gives the delay of each server router's uplink in turn
    (repeated), so paths differ in length."""

    servers: int
    standby: int = 0
    server_routers: int = 2
    client_routers: int = 1
    sample_clients: int = 0
    client_rate: float = 1.0
    client_subnet: str = "10.0.0.0/12"
    client_uplink_ms: float = 2.0
    router_delays_ms: Sequence[float] = (1.0, 3.0)
    pool: Mapping[str, Any] = field(default_factory=dict)
    steps: Sequence[tuple[float, str, Mapping[str, Any]]] = ()
    duration: float = 3600.0
    thin_stream: bool = False

    def check(self) -> None:
        routers = 1 + self.server_routers + self.client_routers
        if not 1 <= self.servers <= MAX_SERVERS or not 0 <= self.standby <= self.servers:
            raise ConfigError(
                f"{self.servers} servers and {self.standby} on standby: a generated pool has"
                f" 1..{MAX_SERVERS} servers and at most as many on standby"
            )
        if self.server_routers < 1 or self.client_routers < 1 or routers > MAX_ROUTERS:
            raise ConfigError(
                f"{routers} routers: a generated pool has at most {MAX_ROUTERS}"
                " (a core, at least one server router and one client router)"
            )

    def server_names(self) -> list[str]:
        return [f"s{i}" for i in range(1, self.servers + 1)]

    def standby_names(self) -> list[str]:
        return [f"s{i}" for i in range(self.servers + 1, self.servers + self.standby + 1)]


def client_router_names(shape: PoolShape) -> list[str]:
    """`ra` alone, or `ra`, `rb`, ... (then `c27`, `c28`, ... past the alphabet)."""
    return [f"r{chr(97 + i)}" if i < 26 else f"c{i + 1}" for i in range(shape.client_routers)]


def topology_text(shape: PoolShape) -> str:
    """The topology file of `shape`."""
    shape.check()
    client_routers = client_router_names(shape)
    server_routers = [f"rs{i}" for i in range(1, shape.server_routers + 1)]
    parts = [
        toml_table("pool", {"group": "232.1.1.1", **shape.pool}, array=False),
        *(toml_table("router", {"name": r}) for r in (*client_routers, "core", *server_routers)),
    ]
    for router in client_routers:
        parts.append(
            toml_table("link", {"between": [router, "core"], "delay_ms": shape.client_uplink_ms})
        )
    delays = list(shape.router_delays_ms) or [1.0]
    for index, router in enumerate(server_routers):
        delay = delays[index % len(delays)]
        parts.append(toml_table("link", {"between": ["core", router], "delay_ms": delay}))
    names = shape.server_names() + shape.standby_names()
    for index, name in enumerate(names):
        keys: dict[str, Any] = {"name": name, "router": server_routers[index % len(server_routers)]}
        if index >= shape.servers:
            keys["standby"] = True
        parts.append(toml_table("server", keys))
    if shape.sample_clients:
        parts.extend(_client_tables(shape, client_routers))
    for at, action, arguments in shape.steps:
        parts.append(toml_table("scenario", {"at": round(at, 3), "action": action, **arguments}))
    parts.append(toml_table("run", {"duration": shape.duration}, array=False))
    return "\n".join(parts)


def _client_tables(shape: PoolShape, routers: Sequence[str]) -> list[str]:
    """The sample clients, split over the client routers: with one router, the whole
    subnet; with more, a /16 of it per router, in order. Groups `a`, `a2_`, `a3_`, ...
    (members `a1`, `a2_1`, ...)."""
    subnet = ipaddress.IPv4Network(shape.client_subnet)
    if len(routers) == 1:
        lans: list[ipaddress.IPv4Network] = [subnet]
    else:
        lans = list(subnet.subnets(new_prefix=max(16, subnet.prefixlen + 1)))
        if len(lans) < len(routers):
            raise ConfigError(f"client subnet {subnet} has too few /16s for {len(routers)} routers")
    tables = []
    remaining = shape.sample_clients
    for index, (router, lan) in enumerate(zip(routers, lans, strict=False)):
        count = remaining // (len(routers) - index)
        remaining -= count
        if count == 0:
            continue
        keys: dict[str, Any] = {
            "name": "a" if index == 0 else f"a{index + 1}_",
            "count": count,
            "router": router,
            "subnet": str(lan),
            "rate": shape.client_rate,
        }
        if shape.thin_stream:
            keys["thin_stream"] = True
        tables.append(toml_table("clients", keys))
    return tables
