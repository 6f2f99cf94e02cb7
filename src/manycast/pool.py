"""Build a running pool from a topology: routers, servers and clients as nodes.

The same builder serves every driver; `PoolRun` adds the scenario and the
measurements a user sees (per-server share, sessions and request rate; the
clients' outcomes; the recovery time after each disruption).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from manycast import policy
from manycast.auth import load_private, public_bytes
from manycast.drivers.links import LinkSpec
from manycast.naming import AddressPlan
from manycast.protocol.admission import Admission
from manycast.protocol.client import Client
from manycast.protocol.coordination import PoolSettings, initial_allocation
from manycast.protocol.node import Node
from manycast.protocol.router import Router
from manycast.protocol.server import Server
from manycast.space import Allocation
from manycast.topology import Step, Topology
from manycast.wire import control


def settings_for(topology: Topology, wall_base: float = 1.7e9) -> PoolSettings:
    pool = topology.pool
    return PoolSettings(
        group=pool.group,
        port=pool.port,
        control_group=pool.control_group,
        control_port=pool.control_port,
        space=pool.space,
        members=tuple(
            sorted(s.name for s in topology.servers.values() if not s.standby and s.authorized)
        ),
        policy=pool.policy,
        portions=pool.portions,
        weights={s.name: s.weight for s in topology.servers.values()},
        technique=pool.technique,
        close_after_transaction=pool.close_after_transaction,
        heartbeat=pool.heartbeat_s,
        misses=pool.heartbeat_misses,
        report_interval=pool.report_interval_s,
        rebalance_above=pool.rebalance_above,
        rebalance_target=pool.rebalance_target,
        rebalance_hold=pool.rebalance_hold_s,
        wall_base=wall_base,
    )


def pool_keys(topology: Topology, seed: int) -> tuple[Ed25519PrivateKey, Ed25519PrivateKey]:
    """The private pool's key and an outsider's key.

    From `[pool] key_file` when given; otherwise derived from the seed, so that the
    processes of one pool split with `manycast run --nodes` agree without files.
    """
    if topology.pool.key_file is not None:
        key = load_private(Path(topology.pool.key_file))
    else:
        key = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"pool:{seed}".encode()).digest())
    outsider = Ed25519PrivateKey.from_private_bytes(
        hashlib.sha256(f"outsider:{seed}".encode()).digest()
    )
    return key, outsider


@dataclass
class Nodes:
    routers: dict[str, Router]
    servers: dict[str, Server]
    standby: dict[str, Server]
    clients: dict[str, Client]
    links: list[LinkSpec]
    # group -> the public key published for it (private pools), what DNS serves
    directory: dict[int, bytes] = field(default_factory=dict)

    def running(self) -> list[Node]:
        return [*self.routers.values(), *self.servers.values(), *self.clients.values()]


def build(
    topology: Topology, seed: int = 0, wall_base: float = 1.7e9, only: set[str] | None = None
) -> Nodes:
    """The nodes of the topology (those in `only`, when a process hosts part of a pool),
    each with its own random stream from `seed`."""
    unknown = sorted((only or set()) - set(topology.interfaces))
    if unknown:
        raise ValueError(f"no such node in the topology: {', '.join(unknown)}")

    def hosted(name: str) -> bool:
        return only is None or name in only

    settings = settings_for(topology, wall_base)
    initial = initial_allocation(settings)
    pool = topology.pool
    key: Ed25519PrivateKey | None = None
    outsider: Ed25519PrivateKey | None = None
    directory: dict[int, bytes] = {}
    plan = AddressPlan.from_text(pool.private_ranges)
    if pool.private:
        key, outsider = pool_keys(topology, seed)
        # What the routers will be told is the pool's key: DNS serves this, or the
        # topology names it outright (`public_key`, a certification authority's word).
        published = pool.public_key or public_bytes(key)
        directory = {int(pool.group): published, int(pool.control_group): published}

    def key_of(authorized: bool) -> Ed25519PrivateKey | None:
        return key if authorized else outsider

    def rng(name: str) -> random.Random:
        return random.Random(f"{seed}:{name}")

    routers = {
        name: Router(
            name,
            topology.interfaces[name],
            [(r.network, r.iface, r.next_hop) for r in topology.routes[name]],
            topology.router_ifaces[name],
            hold_time=pool.report_interval_s * 3.5,
            control_port=pool.control_port,
            neighbors=topology.router_neighbors(name),
            admission=Admission(plan.is_private_int, wall_base=wall_base) if pool.private else None,
        )
        for name in topology.routers
        if hosted(name)
    }
    servers: dict[str, Server] = {}
    standby: dict[str, Server] = {}
    for spec in topology.servers.values():
        if not hosted(spec.name):
            continue
        if not spec.authorized:
            # An outsider that knows the group: it claims every source for itself.
            start: Allocation | None = policy.equal_split(pool.space, [spec.name])
        else:
            start = None if spec.standby else initial
        server = Server(
            spec.name,
            topology.interfaces[spec.name],
            topology.gateways[spec.name],
            settings,
            rng(spec.name),
            initial=start,
            key=key_of(spec.authorized),
        )
        (standby if spec.standby else servers)[spec.name] = server

    def resolve(name: str) -> tuple[Any, int]:
        if name != pool.name:
            raise LookupError(f"unknown service {name!r}")
        return pool.group, pool.port

    clients = {
        spec.name: Client(
            spec.name,
            topology.interfaces[spec.name],
            topology.gateways[spec.name],
            pool.name,
            resolve,
            spec.rate,
            rng(spec.name),
            key=key_of(spec.authorized),
            wall_base=wall_base,
            register_every=pool.report_interval_s,
        )
        for spec in topology.clients.values()
        if hosted(spec.name)
    }
    return Nodes(routers, servers, standby, clients, list(topology.links.values()), directory)


class Host(Protocol):
    """What the scenario needs of a driver."""

    @property
    def now(self) -> float: ...

    def add(self, node: Node) -> None: ...

    def kill(self, name: str) -> Node: ...


@dataclass
class EventRecord:
    at: float
    what: str


@dataclass
class Scenario:
    """Carries out the topology's timed steps on a running pool."""

    topology: Topology
    nodes: Nodes
    host: Host
    events: list[EventRecord] = field(default_factory=list)
    dead: set[str] = field(default_factory=set)

    def step(self, step: Step) -> None:
        now = self.host.now
        action, args = step.action, step.args
        if action == "kill":
            name = args["server"]
            if name in self.nodes.servers and name not in self.dead:
                self.host.kill(name)
                self.dead.add(name)
        elif action == "add":
            name = args["server"]
            server = self.nodes.standby.pop(name, None)
            if server is not None:
                self.nodes.servers[name] = server
                self.host.add(server)
        elif action == "set_share":
            self._command(control.SetShareOp(args["server"], args["share"]), now, args["server"])
        elif action == "rebalance":
            self._command(control.RebalanceOp(float(args["target"]), ()), now, None)
        elif action == "client_rate":
            for client in self.nodes.clients.values():
                if client.name.rstrip("0123456789") == args["clients"]:
                    client.set_rate(float(args["rate"]), now)
        self.events.append(EventRecord(now, step.describe()))

    def _command(self, op: control.PolicyOp, now: float, about: str | None) -> None:
        """Hand an operator's change to one server here: the one it is about if we
        host it (so a pool split over processes issues it once), else our first."""
        live = sorted(n for n in self.nodes.servers if n not in self.dead)
        if about is not None and about in live:
            self.nodes.servers[about].command(op, now)
        elif live and (about is None or about not in self.topology.servers or about in self.dead):
            self.nodes.servers[live[0]].command(op, now)
