"""Serving metrics: registries, their text, other processes' texts merged, the HTTP server.

`observe.metrics` makes the families of a pool's nodes; this module puts
collectors in a registry (with this process's own `process_*` figures), writes
the Prometheus text format (`exposition`), merges the texts of several processes
under a label (`federate`: the kernel lab's daemons, `node="r1"`), and serves a
registry with prometheus_client's HTTP server on a thread of its own.
"""

from __future__ import annotations

import contextlib
import ipaddress
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server
from prometheus_client.core import Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from manycast.errors import ManycastError

DEFAULT_HOST = "127.0.0.1"


class MetricsError(ManycastError, OSError):
    """The metrics cannot be served as asked (a bad address, a port in use)."""


def registry(*collectors: Collector, process: bool = True) -> CollectorRegistry:
    """A registry of `collectors` (and this process's CPU and memory unless told not)."""
    reg = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        reg.register(collector)
    if process:
        ProcessCollector(registry=reg)
    return reg


def exposition(reg: CollectorRegistry) -> str:
    """The registry's metrics in the Prometheus text format."""
    return generate_latest(reg).decode()


def federate(texts: Mapping[str, str], label: str = "node") -> list[Metric]:
    """Several processes' exposition texts as one set of families, each sample with
    `label` naming the process it came from (the lab's daemons: `node="r1"`)."""
    merged: dict[str, Metric] = {}
    for source, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(family.name, family.documentation, family.type)
                into.unit = family.unit
            elif into.type != family.type:
                continue  # the same name typed otherwise elsewhere: keep the first
            for sample in family.samples:
                into.samples.append(sample._replace(labels={label: source, **sample.labels}))
    return list(merged.values())


@dataclass(eq=False)
class FederatedCollector(Collector):
    """Collects by `fetch()`-ing other processes' texts ({source: text}) at each scrape."""

    fetch: Callable[[], Mapping[str, str]]
    label: str = "node"

    def collect(self) -> Iterator[Metric]:
        yield from federate(self.fetch(), self.label)


def parse_address(text: str) -> tuple[str, int]:
    """`[HOST:]PORT` -> (host, port); the host defaults to 127.0.0.1 and may be an
    IPv6 address in brackets (`[::1]:9100`). Port 0 picks a free one."""
    host, sep, port = text.strip().rpartition(":")
    if not sep:
        host = DEFAULT_HOST
    elif host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise MetricsError(f"--metrics {text!r}: write an IPv6 host in brackets, [::1]:9100")
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise MetricsError(f"--metrics {text!r}: expected [HOST:]PORT with a port 0-65535")
    if not host:
        raise MetricsError(f"--metrics {text!r}: empty host")
    return host, int(port)


class MetricsServer:
    """prometheus_client's HTTP server for one registry, on a thread of its own."""

    def __init__(self, reg: CollectorRegistry, address: str) -> None:
        self.registry = reg
        self.host, self.port = parse_address(address)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> MetricsServer:
        try:
            self._server, self._thread = start_http_server(
                self.port, addr=self.host, registry=self.registry
            )
        except OSError as exc:
            raise MetricsError(
                f"cannot serve metrics on {self.host}:{self.port}: {exc.strerror or exc}"
            ) from None
        self.port = int(self._server.server_address[1])
        return self

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if _is_v6(self.host) else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _is_v6(host: str) -> bool:
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).version == 6
    return False
