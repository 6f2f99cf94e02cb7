"""The embedded DNS server: an `Authority` on asyncio UDP and TCP, or in a thread of its own.

`EmbeddedServer` serves the zones `naming.pool_zones()` writes on a loopback
port, as `async with` on a running loop or as a plain `with` (then it runs its
own loop in a thread, for synchronous callers). `serve()` and `run()` are what
`manycast dns serve` runs.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Final, cast

from manycast.dns.authority import Authority, DnsStats
from manycast.dns.errors import DnsServerError
from manycast.naming import DEFAULT_PLAN, AddressPlan, PoolRecord, TsigKey, pool_zones
from manycast.naming.zone import MULTICAST_REVERSE_ZONES

__all__ = ["EmbeddedServer", "run", "serve"]

_log = logging.getLogger(__name__)

TCP_IDLE: Final = 10.0
MAX_TCP_CLIENTS: Final = 64


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, authority: Authority) -> None:
        self.authority = authority
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, int]) -> None:
        reply = self.authority.handle(data, udp=True)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors from clients that went away


class EmbeddedServer:
    """The dnspython responder on host:port (UDP and TCP; port 0 picks a free one).

    Use it as `async with`, or as a plain `with` (it then runs in a thread).
    """

    def __init__(
        self,
        zones: Mapping[str, str],
        tsig_key: TsigKey | None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.authority = Authority(zones, tsig_key)
        self.host, self.port = host, port
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def for_pool(
        cls,
        origin: str,
        records: Iterable[PoolRecord],
        tsig_key: TsigKey | None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        reverse_zones: Iterable[str] = MULTICAST_REVERSE_ZONES,
        plan: AddressPlan = DEFAULT_PLAN,
    ) -> EmbeddedServer:
        zones = pool_zones(
            origin, records, reverse_zones=reverse_zones, nameserver_address=host, plan=plan
        )
        return cls(zones, tsig_key, host=host, port=port)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def stats(self) -> DnsStats:
        return self.authority.stats

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(20):
            try:
                udp, _ = await loop.create_datagram_endpoint(
                    lambda: _Udp(self.authority), local_addr=(self.host, self.port)
                )
            except OSError as exc:
                raise DnsServerError(
                    f"cannot listen on {self.host}:{self.port}/udp: {exc}"
                ) from None
            port = int(udp.get_extra_info("sockname")[1])
            try:
                self._tcp = await asyncio.start_server(self._client, self.host, port)
            except OSError as exc:
                udp.close()
                if self.port:
                    raise DnsServerError(
                        f"cannot listen on {self.host}:{port}/tcp: {exc}"
                    ) from None
                continue  # the free UDP port is taken for TCP: try another
            self._udp, self.port = udp, port
            _log.info("serving %s on %s:%d", ", ".join(self.authority.origins), self.host, port)
            return
        raise DnsServerError(f"no port free for both UDP and TCP on {self.host}")

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            for task in list(self._clients):
                task.cancel()
            await asyncio.gather(*self._clients, return_exceptions=True)
            await self._tcp.wait_closed()
            self._tcp = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._clients) >= MAX_TCP_CLIENTS:
            writer.close()
            return
        self._clients.add(task)
        try:
            while True:
                size = int.from_bytes(
                    await asyncio.wait_for(reader.readexactly(2), TCP_IDLE), "big"
                )
                data = await asyncio.wait_for(reader.readexactly(size), TCP_IDLE)
                reply = self.authority.handle(data, udp=False)
                if reply is not None:
                    writer.write(len(reply).to_bytes(2, "big") + reply)
                    await writer.drain()
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                self.authority.stats.garbage += 1
        except (TimeoutError, OSError):
            pass
        finally:
            self._clients.discard(task)
            writer.close()

    async def __aenter__(self) -> EmbeddedServer:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # thread mode, for synchronous callers
    def __enter__(self) -> EmbeddedServer:
        loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:
                failure.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            try:
                loop.run_forever()
                loop.run_until_complete(self.close())
            finally:
                loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=main, name="manycast-dns", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            raise failure[0]
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = self._thread = None


async def serve(
    zone_origin: str,
    records: Iterable[PoolRecord],
    host: str = "127.0.0.1",
    port: int = 53,
    tsig_key: TsigKey | None = None,
    *,
    plan: AddressPlan = DEFAULT_PLAN,
) -> EmbeddedServer:
    """Starts the embedded server for a pool zone (and the reverse zones); close() stops it."""
    server = EmbeddedServer.for_pool(
        zone_origin, records, tsig_key, host=host, port=port, plan=plan
    )
    await server.start()
    return server


def run(
    zone_origin: str,
    records: Iterable[PoolRecord],
    host: str = "127.0.0.1",
    port: int = 53,
    tsig_key: TsigKey | None = None,
    *,
    plan: AddressPlan = DEFAULT_PLAN,
    ready: Callable[[EmbeddedServer], None] | None = None,
) -> DnsStats:
    """Serves until SIGINT or SIGTERM; `ready` is called once the server listens."""
    recs = list(records)

    async def main() -> DnsStats:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
        server = await serve(zone_origin, recs, host, port, tsig_key, plan=plan)
        try:
            if ready is not None:
                ready(server)
            await stop.wait()
        finally:
            await server.close()
        return server.stats

    return asyncio.run(main())
