"""The etcd sessions of the servers one process hosts (`[pool] coordination = "etcd"`),
on the overlay's event loop: started with the network, one stopped when its server is
killed (a crash: its lease runs out), all closed with the run (leases given back)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from manycast.drivers.contract import Network
from manycast.drivers.etcd.client import EtcdClient
from manycast.drivers.etcd.session import EtcdSession
from manycast.drivers.overlay_network import OverlayNetwork
from manycast.errors import ConfigError
from manycast.protocol.leased import LeasedCoordinator
from manycast.protocol.server import Server
from manycast.space import AddressSpace


def key_prefix(pool_name: str) -> str:
    """Where a pool's keys live in etcd."""
    return f"/manycast/{pool_name.rstrip('.')}/"


class EtcdSessions:
    def __init__(self, network: Network, *, pool_name: str, space: AddressSpace, ttl: int) -> None:
        if not isinstance(network, OverlayNetwork):
            raise ConfigError(
                'coordination = "etcd" runs on the overlay driver (--driver overlay): '
                "etcd's leases run on real time, not on the memory driver's virtual clock"
            )
        self.network = network
        self.prefix = key_prefix(pool_name)
        self.space = space
        self.ttl = ttl
        self.sessions: dict[str, EtcdSession] = {}
        self._stopped: list[EtcdSession] = []

    def start(self, server: Server, endpoints: Sequence[str]) -> None:
        """Link `server` to etcd once the network runs (its coordination must be leased)."""
        core = server.coordinator
        if not isinstance(core, LeasedCoordinator):
            return  # an outsider: no member of the pool, no etcd
        network = self.network
        session = EtcdSession(
            core,
            EtcdClient(endpoints, timeout=self.ttl / 3),
            prefix=self.prefix,
            space=self.space,
            ttl=self.ttl,
            clock=lambda: network.now,
            schedule=lambda callback: network.call_at(network.now, callback),
        )
        self.sessions[server.name] = session
        network.call_at(network.now, lambda: session.start(network.loop))

    def crash(self, name: str) -> None:
        session = self.sessions.pop(name, None)
        if session is not None:
            session.cancel()
            self._stopped.append(session)

    def close(self) -> None:
        """Stop every session, giving the live ones' leases back."""
        loop = self.network.loop
        closing = [s.close(revoke=True) for s in self.sessions.values()]
        closing += [s.close(revoke=False) for s in self._stopped]
        self.sessions.clear()
        self._stopped.clear()
        if closing and not loop.is_closed() and not loop.is_running():

            async def every() -> None:
                await asyncio.gather(*closing, return_exceptions=True)

            loop.run_until_complete(every())
        else:
            for coroutine in closing:
                coroutine.close()
