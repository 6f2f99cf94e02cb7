"""Finding free local ports: one port free for UDP and TCP, or a run of UDP ports."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable

from manycast.errors import DriverError

DEFAULT_HOST = "127.0.0.1"


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(host: str = DEFAULT_HOST) -> int:
    """A port free for both UDP and TCP right now (a DNS server binds both)."""
    family = _family(host)
    for _ in range(50):
        with socket.socket(family, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(family, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
                return port
    raise DriverError(f"no port free for both UDP and TCP on {host}")


_BASES = range(41000, 60000, 397)


def free_base_port(
    count: int, search: Iterable[int] | None = None, host: str = DEFAULT_HOST
) -> int:
    """A base port with `count` free UDP ports above it on `host` (checked by binding),
    for a pool that runs in one process or on one machine. By default the search
    starts at a place of this process's own, so that pools started at the same time
    by different processes seldom pick the same range between the check and the bind."""
    if search is None:
        start = os.getpid() % len(_BASES)
        search = [*_BASES[start:], *_BASES[:start]]
    for base in search:
        sockets: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                sock = socket.socket(_family(host), socket.SOCK_DGRAM)
                sockets.append(sock)
                sock.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise DriverError(f"no range of {count} free UDP ports on {host}")
