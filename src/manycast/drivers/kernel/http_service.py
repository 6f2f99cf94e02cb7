"""The VIP pool's service in the lab: a real HTTP/1.1 server bound to the VIP.

Python's `http.server` (threaded, keep-alive), listening on the pool's VIP and
port. The VIP is on the server's loopback, so it answers clients straight from
the VIP (direct server return) and knows nothing of how their packets reached
it. Every answer says who served it (`X-Served-By` and the first word of the
body, `<server> <total> <path>`), so a client can check that each of its
connections stays on one server; per-source counts go to `<node>.counts.json`
as the UDP responder's do. A dual-stack pool's service listens on both VIPs
(`address6`: the IPv6 one), counting both families' requests together.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

from manycast.drivers.kernel.loop import KernelLoop
from manycast.drivers.kernel.responder import DUMP_EVERY, write_counts

BACKLOG = 1024  # wrk opens many connections at once
BODY_LIMIT = 1 << 20  # bytes of a request body read (and ignored)


class _Server(ThreadingHTTPServer):
    request_queue_size = BACKLOG
    daemon_threads = True
    service: _Counter

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        if ":" in address[0]:  # an IPv6 VIP
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer's own looks the address's name up (getfqdn): in a lab namespace an
        # IPv6 VIP's PTR query waits 5 s on a resolver it cannot reach, and a server
        # added to a running pool refused IPv6 connections until then.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: one flow carries many requests
    # The headers and the body are two writes: with Nagle on, the body would wait for
    # the client's delayed ACK (40 ms) on every keep-alive request.
    disable_nagle_algorithm = True
    server: _Server

    def do_GET(self) -> None:
        self._answer(head=False)

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_POST(self) -> None:
        length = min(int(self.headers.get("Content-Length") or 0), BODY_LIMIT)
        self.rfile.read(length)
        self._answer(head=False)

    def _answer(self, head: bool) -> None:
        service = self.server.service
        total = service.count(self.client_address[0])
        name = service.name
        body = f"{name} {total} {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Served-By", name)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request would be the log's whole content


class _Counter(Protocol):
    name: str

    def count(self, source: str) -> int: ...


@dataclass
class PlainCounter:
    """The counting part alone, for `serve`."""

    name: str
    total: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, source: str) -> int:
        with self._lock:
            self.total += 1
            return self.total


def serve(name: str, address: str, port: int) -> None:
    """Only the HTTP server, in the foreground, on any address: a benchmark's baseline
    (the same server on a server's own address, no VIP)."""
    httpd = _Server((address, port), _Handler)
    httpd.service = PlainCounter(name)
    httpd.serve_forever()


@dataclass
class HttpService:
    name: str
    address: str
    port: int
    run_dir: Path
    address6: str | None = None  # a dual-stack pool's IPv6 VIP, served beside `address`
    counts: Counter[str] = field(default_factory=Counter)
    total: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, source: str) -> int:
        with self._lock:
            self.total += 1
            self.counts[source] += 1
            return self.total

    def run(self) -> None:
        """Serve until SIGTERM; the counts file is written once more on the way out."""
        loop = KernelLoop(self.run_dir, self.name, "service")
        servers = []
        for address in (self.address, self.address6):
            if address is None:
                continue
            httpd = _Server((address, self.port), _Handler)
            httpd.service = self
            servers.append(httpd)
            threading.Thread(target=httpd.serve_forever, name="http", daemon=True).start()

        def dump_every() -> None:
            self.dump()
            loop.call_at(loop.now + DUMP_EVERY, dump_every)

        loop.handlers["status"] = lambda _: {"server": self.name, "total": self.total}
        loop.call_at(0.0, dump_every)
        loop.ready()
        try:
            loop.run_until(float("inf"))
        finally:
            for httpd in servers:
                httpd.shutdown()
                httpd.server_close()
            self.dump()
            loop.close()

    def dump(self) -> None:
        with self._lock:
            total, counts = self.total, Counter(self.counts)
        write_counts(self.run_dir, self.name, total, counts)
