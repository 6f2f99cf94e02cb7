"""The simulator's presets: generated pools with a scenario and a modelled population.

Each preset is a `PoolShape` (a generated topology, `generate.py`) and the
simulator's settings. The scenario is the same shape at every size: at
`change_at` one server in a hundred (at least two) is given 1.5 times an equal
share; at `deaths_at` a tenth of the servers (at least one, chosen by the seed,
the coordinator among the candidates) crash at once; at `joins_at` as many
standby servers start. Every share change is a change of the pool's state of its
own (one epoch each); the deaths the coordinator finds together go in one change,
and so do the joins it hears of together.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from manycast.errors import ConfigError
from manycast.sim.generate import PoolShape
from manycast.sim.run import SimSettings

DEFAULT_MEMBERSHIP = "swim"  # what the large presets ask for when the pool has it


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    shape: PoolShape
    settings: SimSettings


def scenario(
    servers: int, standby: int, change_at: float, deaths_at: float, joins_at: float, seed: int
) -> list[tuple[float, str, dict[str, Any]]]:
    """Shares change, a tenth of the servers die, the standbys join."""
    tenth = max(1, servers // 10)
    changed = min(servers, max(2, servers // 100))
    names = [f"s{i}" for i in range(1, servers + 1)]
    steps: list[tuple[float, str, dict[str, Any]]] = []
    share = Fraction(3, 2 * servers).limit_denominator(1 << 20)
    for name in names[1 : 1 + changed]:
        steps.append((change_at, "set_share", {"server": name, "share": float(share)}))
    for name in sorted(random.Random(seed).sample(names, tenth), key=lambda n: int(n[1:])):
        steps.append((deaths_at, "kill", {"server": name}))
    for index in range(servers + 1, servers + standby + 1):
        steps.append((joins_at, "add", {"server": f"s{index}"}))
    return steps


def _preset(
    name: str,
    description: str,
    *,
    servers: int,
    server_routers: int,
    client_routers: int,
    sample_clients: int,
    addresses: int,
    duration: float,
    times: tuple[float, float, float],
    membership: str | None,
    seed: int = 1,
    sample_every: float = 0.5,
    pool: dict[str, Any] | None = None,
) -> Preset:
    standby = max(1, servers // 10)
    keys: dict[str, Any] = {"technique": "R3", **(pool or {})}
    if membership is not None:
        keys["membership"] = membership
    shape = PoolShape(
        servers=servers,
        standby=standby,
        server_routers=server_routers,
        client_routers=client_routers,
        sample_clients=sample_clients,
        client_rate=1.0,
        router_delays_ms=(1.0, 2.0, 3.0),
        pool=keys,
        steps=scenario(servers, standby, *times, seed=seed),
        duration=duration,
    )
    settings = SimSettings(duration, addresses, seed=seed, sample_every=sample_every)
    return Preset(name, description, shape, settings)


def presets(membership: str | None = None, large: str | None = None) -> dict[str, Preset]:
    """Every preset by name. `membership` sets `[pool] membership` of every preset;
    without it the large ones take `large` (None: the pool's default), pool-20 the
    pool's default."""
    large = membership or large
    return {
        p.name: p
        for p in (
            _preset(
                "pool-20",
                "20 servers (2 more on standby), 4 routers, 40 sample clients, 10^4"
                " addresses, 5 s: 2 share changes at 0.5 s, 2 deaths at 1 s, 2 joins at 4 s",
                servers=20,
                server_routers=2,
                client_routers=1,
                sample_clients=40,
                addresses=10_000,
                duration=5.0,
                # the joins after the dead servers' sessions have timed out (2 s), so
                # each step's breaks are its own
                times=(0.5, 1.0, 4.0),
                membership=membership,
                sample_every=0.1,
            ),
            _preset(
                "pool-100",
                "100 servers (10 more on standby), 8 routers, 100 sample clients, 10^5"
                " addresses, 20 s: 2 share changes at 4 s, 10 deaths at 8 s, 10 joins at 13 s",
                servers=100,
                server_routers=5,
                client_routers=2,
                sample_clients=100,
                addresses=100_000,
                duration=20.0,
                times=(4.0, 8.0, 13.0),
                membership=large,
                sample_every=0.25,
            ),
            _preset(
                "pool-1000",
                "1000 servers (100 more on standby), 14 routers, 300 sample clients, 10^6"
                " addresses, 60 s: 10 share changes at 10 s, 100 deaths at 20 s, 100 joins"
                " at 35 s",
                servers=1000,
                server_routers=10,
                client_routers=3,
                sample_clients=300,
                addresses=1_000_000,
                duration=60.0,
                times=(10.0, 20.0, 35.0),
                membership=large,
                # Membership refreshes every 10 s (routers forget a member after 35 s):
                # every report reaches each of the 14 routers. The gossip membership
                # probes every second, as memberlist's LAN configuration does (its
                # ProbeInterval; 100 ms is for small pools on a quiet network).
                pool={"report_interval_ms": 10000, "heartbeat_ms": 1000},
            ),
        )
    }


def preset(name: str, membership: str | None = None, large: str | None = None) -> Preset:
    """The preset `name`; ConfigError naming the presets there are when none is called so."""
    found = presets(membership, large).get(name)
    if found is None:
        known = ", ".join(presets())
        raise ConfigError(f"no preset named {name!r} (presets: {known}), nor a file of that name")
    return found
