"""A VIP pool's clients in the lab: HTTP/1.1 over real TCP connections from each client's namespace.

Each client asks `GET /<client>/<seq>` of the VIP `rate` times a second, one
request at a time on a keep-alive connection, and opens a new connection (a new
flow) after `requests_per_connection` answers (0: one connection for good). It
keeps a `ClientStats` as the UDP prober does: an answer within `timeout` is a
success with its latency; a timeout, a reset, a refused or closed connection is
a failure, and the connection is dropped (the next request opens another).

Every answer names its server (`<server> <total> <path>`, `http_service.py`), so
the prober also checks what only a VIP pool promises: each connection is served
by one server from its first answer to its last (`flows_split` counts those that
were not) and each answer is to the request just sent.
"""

from __future__ import annotations

import contextlib
import errno
import math
import selectors
import socket
import time
from collections import Counter
from dataclasses import dataclass, field

from manycast.drivers import netns
from manycast.lab.build import Lab
from manycast.protocol.client import ClientStats
from manycast.topology import Topology

# A TCP client retransmits a lost SYN after 1 s by itself: a request fails only if
# that does not save it either (a VIP router dies with a SYN in flight, say).
REQUEST_TIMEOUT = 3.0
MAX_RESPONSE = 64 * 1024


def _interval(rate: float) -> float:
    return 1.0 / rate if rate > 0 else math.inf


@dataclass
class HttpClient:
    """One client: its namespace, its schedule, its connection and what it saw."""

    name: str
    address: str
    namespace: str
    interval: float
    next_send: float
    per_connection: int
    stats: ClientStats = field(default_factory=ClientStats)
    seq: int = 0
    sock: socket.socket | None = None
    connected: bool = False
    answers_on_connection: int = 0
    connection_server: str | None = None
    sent_at: float | None = None  # the request in flight (one at a time)
    buffer: bytes = b""
    last_reply: float = -1.0
    server: str | None = None
    replies: int = 0

    @property
    def rate(self) -> float:
        return 0.0 if math.isinf(self.interval) else 1.0 / self.interval


class HttpProber:
    """The topology's clients of a VIP pool (or those named in `clients`) on a lab that is up."""

    def __init__(
        self,
        lab: Lab,
        topology: Topology,
        clients: list[str] | None = None,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        vip = topology.pool.vip
        if vip is None:
            raise ValueError("the HTTP prober asks a VIP pool")
        self.lab = lab
        self.topology = topology
        self.target = (str(vip), topology.pool.port)
        # Each client asks its family's VIP (a dual-stack pool has one of each).
        self.targets = {
            version: (str(topology.pool.group_of(version)), topology.pool.port)
            for version in topology.pool.families
        }
        self.timeout = timeout
        self.selector = selectors.DefaultSelector()
        self.clients: dict[str, HttpClient] = {}
        self.answers: Counter[str] = Counter()
        self.connections = 0
        self.flows_split = 0  # connections answered by more than one server
        self.wrong_answers = 0  # an answer to another request than the one sent
        self.t0 = time.monotonic()
        names = sorted(topology.clients) if clients is None else clients
        for index, name in enumerate(names):
            spec = topology.clients[name]
            interval = _interval(spec.rate)
            start = interval * index / max(1, len(names)) if spec.rate > 0 else math.inf
            self.clients[name] = HttpClient(
                name,
                str(topology.address(name)),
                lab.ns(name),
                interval,
                start,
                spec.requests_per_connection,
            )

    def now(self) -> float:
        return time.monotonic() - self.t0

    def set_rate(self, group: str, rate: float) -> None:
        for client in self.clients.values():
            if self.topology.clients[client.name].group == group:
                client.interval = _interval(rate)
                client.next_send = self.now()

    def run_until(self, until: float) -> None:
        """Send, read answers and expire requests until `until` (prober time)."""
        while True:
            self._poll(0.0)
            now = self.now()
            self._expire(now)
            if now >= until:
                return
            for client in self.clients.values():
                if client.sent_at is None and client.next_send <= now:
                    self._send(client, now)
            soonest = until
            for client in self.clients.values():
                if client.sent_at is None:
                    soonest = min(soonest, client.next_send)
                else:
                    soonest = min(soonest, client.sent_at + self.timeout)
            self._poll(max(0.0, soonest - self.now()))

    # -- one client ------------------------------------------------------------------
    def _send(self, client: HttpClient, now: float) -> None:
        client.seq += 1
        client.sent_at = now
        client.next_send = now + client.interval
        if client.sock is None:
            self._connect(client)
            return  # the request goes once the connection is up
        if client.connected:
            self._write_request(client)

    def _connect(self, client: HttpClient) -> None:
        try:
            target = self.targets[6 if ":" in client.address else 4]
            family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
            sock = netns.socket_in(client.namespace, family, socket.SOCK_STREAM)
        except OSError as exc:
            self._fail(client, f"socket: {exc.strerror}")
            return
        sock.setblocking(False)
        sock.bind((client.address, 0))
        code = sock.connect_ex(target)
        client.sock, client.connected, client.buffer = sock, False, b""
        client.answers_on_connection, client.connection_server = 0, None
        self.connections += 1
        client.stats.connects += 1
        if code not in (0, errno.EINPROGRESS):
            self._fail(client, f"connect: {errno.errorcode.get(code, code)}")
            return
        self.selector.register(sock, selectors.EVENT_WRITE, client)

    def _write_request(self, client: HttpClient) -> None:
        assert client.sock is not None
        request = f"GET /{client.name}/{client.seq} HTTP/1.1\r\nHost: vip\r\n\r\n".encode()
        try:
            client.sock.send(request)  # small: fits the empty send buffer whole
        except OSError as exc:
            self._fail(client, _reason(exc))

    def _on_event(self, client: HttpClient, events: int) -> None:
        sock = client.sock
        if sock is None:
            return
        if not client.connected:
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self._fail(client, f"connect: {errno.errorcode.get(code, code)}")
                return
            client.connected = True
            self.selector.modify(sock, selectors.EVENT_READ, client)
            if client.sent_at is not None:
                self._write_request(client)
            return
        try:
            data = sock.recv(MAX_RESPONSE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(client, _reason(exc))
            return
        if not data:
            self._fail(client, "closed by the server")
            return
        client.buffer += data
        self._parse(client)

    def _parse(self, client: HttpClient) -> None:
        head, sep, rest = client.buffer.partition(b"\r\n\r\n")
        if not sep:
            return
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip() or 0)
        if len(rest) < length:
            return
        body, client.buffer = rest[:length], rest[length:]
        status = head.split(b" ", 2)[1:2]
        parts = body.split()
        if status != [b"200"] or len(parts) < 3:
            self._fail(client, f"answer {status[0].decode() if status else '?'}")
            return
        server = parts[0].decode(errors="replace")
        if parts[2] != f"/{client.name}/{client.seq}".encode():
            self.wrong_answers += 1
            self._fail(client, "wrong answer")
            return
        now = self.now()
        assert client.sent_at is not None
        client.stats.requests_ok += 1
        client.stats.latencies.append(now - client.sent_at)
        client.stats.ok_times.append(now)
        client.sent_at = None
        client.last_reply, client.server = now, server
        client.replies += 1
        self.answers[server] += 1
        if client.connection_server is None:
            client.connection_server = server
        elif client.connection_server != server:
            self.flows_split += 1
            client.connection_server = server
        client.answers_on_connection += 1
        if client.per_connection and client.answers_on_connection >= client.per_connection:
            self._close(client)

    def _fail(self, client: HttpClient, reason: str) -> None:
        now = self.now()
        if client.sent_at is not None:
            client.stats.requests_failed += 1
            client.stats.failures.append((now, reason))
            client.stats.disruptions.append(client.sent_at)
            if reason == "timeout":
                client.stats.timeouts += 1
            elif "reset" in reason:
                client.stats.resets += 1
            client.sent_at = None
        self._close(client)

    def _close(self, client: HttpClient) -> None:
        sock, client.sock, client.connected = client.sock, None, False
        if sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(sock)
            sock.close()

    def _expire(self, now: float) -> None:
        for client in self.clients.values():
            if client.sent_at is not None and now >= client.sent_at + self.timeout:
                self._fail(client, "timeout")

    def _poll(self, timeout: float) -> None:
        for key, events in self.selector.select(timeout):
            self._on_event(key.data, events)

    # -- views -----------------------------------------------------------------------
    def participants(self) -> list[HttpClient]:
        return [c for c in self.clients.values() if self.topology.clients[c.name].authorized]

    def outsiders(self) -> list[HttpClient]:
        return [c for c in self.clients.values() if not self.topology.clients[c.name].authorized]

    def served_since(self, since: float) -> int:
        return sum(1 for c in self.participants() if c.last_reply >= since)

    def close(self) -> None:
        for client in self.clients.values():
            self._close(client)
        self.selector.close()


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ECONNRESET:
        return "reset"
    return errno.errorcode.get(exc.errno or 0, str(exc))
