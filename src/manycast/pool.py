"""Build a pool's nodes from a topology: routers, servers and clients, for any driver."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from manycast import policy
from manycast.addressplan import AddressPlan
from manycast.apps.counter import CounterService, CounterSession
from manycast.auth import load_private, public_bytes
from manycast.protocol.admission import Admission
from manycast.protocol.app import Service, SessionFactory
from manycast.protocol.client import Client
from manycast.protocol.coordination import PoolSettings, initial_allocation
from manycast.protocol.dualstack import DualStackRouter
from manycast.protocol.leased import lease_coordination
from manycast.protocol.node import Node
from manycast.protocol.router import Router
from manycast.protocol.router6 import Router6
from manycast.protocol.server import Server
from manycast.protocol.tcp.config import client_session
from manycast.protocol.technique import Technique
from manycast.protocol.vip import VipRouter
from manycast.protocol.vipdual import DualStackVipRouter
from manycast.space import Allocation
from manycast.topology import PoolSpec, Topology
from manycast.topology.coordination import Coordination
from manycast.topology.links import LinkSpec
from manycast.wire.ip import Address, Network


def settings_for(topology: Topology, wall_base: float) -> PoolSettings:
    """What every server of the topology's pool is configured with: the pool's own
    settings (the fields `PoolSpec` and `PoolSettings` share, by name), its members
    and their weights, and the wall clock the driver gives."""
    shared = {f.name for f in fields(PoolSettings)} & {f.name for f in fields(PoolSpec)}
    servers = topology.servers.values()
    return PoolSettings(
        **{name: getattr(topology.pool, name) for name in shared},
        members=tuple(sorted(s.name for s in servers if not s.standby and s.authorized)),
        member_addresses={
            s.name: topology.interfaces[s.name][topology.gateways[s.name][0]].address
            for s in servers
            if not s.standby and s.authorized
        },
        weights={s.name: s.weight for s in servers},
        wall_base=wall_base,
        member_addresses6={
            s.name: address6
            for s in servers
            if (address6 := topology.interfaces[s.name][topology.gateways[s.name][0]].address6)
        },
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
    vip_routers: dict[str, VipRouter] = field(default_factory=dict)
    # group -> the public key published for it (private pools), what DNS serves
    directory: dict[int, bytes] = field(default_factory=dict)

    def running(self) -> list[Node]:
        return [
            *self.routers.values(),
            *self.vip_routers.values(),
            *self.servers.values(),
            *self.clients.values(),
        ]


def build(
    topology: Topology,
    seed: int,
    wall_base: float,
    only: set[str] | None = None,
    service: Callable[[], Service] = CounterService,
    session: SessionFactory = CounterSession,
) -> Nodes:
    """The nodes of the topology (those in `only`, when a process hosts part of a pool),
    each with its own random stream from `seed`, serving `service` to clients that
    open `session`s (the counter application unless told otherwise)."""
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
    dynamic = pool.technique is Technique.D and pool.vip is None
    if pool.private or dynamic:
        key, outsider = pool_keys(topology, seed)
        # What the routers (and, under D, the clients) will be told is the pool's key:
        # DNS serves this, or the topology names it outright (`public_key`, a
        # certification authority's word).
        published = pool.public_key or public_bytes(key)
        directory = {int(pool.group): published}
        if pool.group6 is not None:  # a dual-stack pool: its IPv6 group has the same key
            directory[int(pool.group6)] = published
        if pool.private:
            directory[int(pool.control_group)] = published

    def key_of(authorized: bool) -> Ed25519PrivateKey | None:
        """What a participant signs its joins with (private pools only)."""
        if not pool.private:
            return None
        return key if authorized else outsider

    def signing_key(authorized: bool) -> Ed25519PrivateKey | None:
        """What a server signs change-destinations with (technique D, Fig 21)."""
        if not dynamic:
            return None
        return key if authorized else outsider

    def rng(name: str) -> random.Random:
        return random.Random(f"{seed}:{name}")

    # An IPv6 pool's network is IPv6 throughout: its routers read MLDv2. A dual-stack
    # pool's routers run both families' logic side by side.
    router_class: type[Router] = Router6 if pool.space.family == 6 else Router
    if pool.dual:
        router_class = DualStackRouter
    routers = {
        name: router_class(
            name,
            topology.interfaces[name],
            [(r.network, r.iface, r.next_hop) for r in topology.routes[name]],
            topology.router_ifaces[name],
            hold_time=pool.report_interval_s * 3.5,
            sender_hold=max(pool.register_interval_s, pool.report_interval_s) * 3.5,
            control_port=pool.control_port,
            neighbors=topology.router_neighbors(name),
            **_dual_options(topology, name, wall_base),
            admission=Admission(plan.is_private_int, wall_base=wall_base) if pool.private else None,
            **_label_options(topology, name),
        )
        for name in topology.routers
        if hosted(name)
    }
    edges = _edges(topology)

    def vip_router(name: str) -> VipRouter:
        """A VIP router; a dual-stack pool's places both families' flows (`vipdual.py`)."""
        args = (name, topology.interfaces[name], topology.gateways[name], settings, rng(name))
        if pool.group6 is None or pool.space6 is None:
            return VipRouter(*args, vip=pool.group, initial=initial, edges=edges)
        return DualStackVipRouter(
            *args,
            vip=pool.group,
            initial=initial,
            edges=edges,
            gateway6=topology.gateways6[name],
            vip6=pool.group6,
            space6=pool.space6,
            server_addresses6=settings.member_addresses6,
        )

    vip_routers = {
        spec.name: vip_router(spec.name)
        for spec in topology.vip_routers.values()
        if hosted(spec.name)
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
            service=service(),
            key=key_of(spec.authorized),
            edges=edges,
            pool_key=signing_key(spec.authorized),
            redirect_above=pool.redirect_above,
            gateway6=topology.gateways6.get(spec.name) if pool.dual else None,
        )
        if pool.coordination is Coordination.ETCD and spec.authorized:
            # Liveness and the allocation in etcd: the I/O that feeds it is the runtime's.
            lease_coordination(server, start, pool.lease_s)
        (standby if spec.standby else servers)[spec.name] = server

    def resolver(version: int) -> Callable[[str], tuple[Any, int]]:
        """A client's name service: the pool's group of the client's family (a
        dual-stack pool's name has an address of each)."""

        def resolve(name: str) -> tuple[Any, int]:
            if name != pool.name:
                raise LookupError(f"unknown service {name!r}")
            return pool.group_of(version), pool.port

        return resolve

    clients = {
        spec.name: Client(
            spec.name,
            topology.interfaces[spec.name],
            topology.gateways[spec.name],
            pool.name,
            resolver(topology.address(spec.name).version),
            spec.rate,
            rng(spec.name),
            app=session,
            key=key_of(spec.authorized),
            wall_base=wall_base,
            register_every=pool.register_interval_s,
            requests_per_connection=spec.requests_per_connection,
            dynamic_destination=spec.dynamic_destination,
            session=client_session(spec.thin_stream, spec.rto_max, spec.max_retries),
            request_timeout=spec.request_timeout,
            abandon_after=spec.abandon_after,
        )
        for spec in topology.clients.values()
        if hosted(spec.name)
    }
    links = list(topology.links.values())
    return Nodes(routers, servers, standby, clients, links, vip_routers, directory)


def _dual_options(topology: Topology, router: str, wall_base: float) -> dict[str, Any]:
    """What a dual-stack pool's router is told beside `Router`'s options: its neighbour
    routers' IPv6 addresses and, in a private pool, its IPv6 logic's own admission."""
    pool = topology.pool
    if not pool.dual:
        return {}
    admission6 = None
    if pool.private:
        admission6 = Admission(
            AddressPlan.from_text(pool.private_ranges).is_private_int, wall_base=wall_base
        )
    options: dict[str, Any] = {
        "neighbors6": topology.router_neighbors(router, 6),
        "admission6": admission6,
    }
    if pool.vip is not None and pool.group6 is not None:
        # A dual-stack VIP pool: the IPv6 logic routes the IPv6 VIP to the VIP routers'
        # IPv6 addresses and builds the servers' IPv6 trees.
        options.update(_label_options(topology, router, 6))
    elif pool.technique is Technique.R4 and pool.group6 is not None:
        # R4's trees in the IPv6 logic: the IPv6 group's connections, tagged by the
        # servers from their IPv6 addresses.
        options["r4_group6"] = pool.group6
        options["vip_servers6"] = [
            int(address6)
            for name in topology.servers
            if (address6 := topology.interfaces[name][topology.gateways[name][0]].address6)
        ]
    return options


def _label_options(topology: Topology, router: str, version: int = 0) -> dict[str, Any]:
    """What a router is told to build label-switched trees, one per server, and take
    flow tags. A VIP pool's router (Fig 17-18): the VIP, every VIP router with its
    distance from here, and which of its links lead to a VIP router. A manycast
    pool's under R4 (Fig 16): the group, whose connections the servers tag.
    `version` 6: a dual-stack VIP pool's IPv6 logic's, its options named `*6`."""
    servers = [int(_address_of(topology, name, version)) for name in topology.servers]
    if topology.pool.vip is None:
        if topology.pool.technique is not Technique.R4:
            return {}
        return {"r4_group": topology.pool.group, "vip_servers": servers}
    distances = {
        int(_address_of(topology, name, version)): topology.distance(router, name)
        for name in topology.vip_routers
    }
    links: dict[str, tuple[int, ...]] = {}
    for name, spec in topology.vip_routers.items():
        if spec.router != router:
            continue
        address = _address_of(topology, name, version)
        for iface in topology.interfaces[router].values():
            network = iface.network6 if version == 6 else iface.network
            if network is not None and address in network:
                links[iface.name] = (*links.get(iface.name, ()), int(address))
    options = {
        "vip": topology.pool.vip if version != 6 else topology.pool.group6,
        "vip_routers": distances,
        "vip_router_links": links,
        "vip_servers": servers,
    }
    return options if version != 6 else {f"{key}6": value for key, value in options.items()}


def _address_of(topology: Topology, node: str, version: int) -> Address:
    """A node's address (`version` 6: its IPv6 one, on a dual-stack link)."""
    if version == 6:
        address6 = next(iter(topology.interfaces[node].values())).address6
        if address6 is not None:
            return address6
    return topology.address(node)


def _edges(topology: Topology) -> list[tuple[Network, Address]]:
    """Every network a client may be on, with the address of the router it is
    attached to there: where a VIP router, or a server under R4, sends a flow's tag."""
    edges = []
    for router in topology.routers:
        for iface in topology.interfaces[router].values():
            if iface.name not in topology.router_ifaces[router]:
                edges.append((iface.network, iface.address))
    return edges
