"""The lab's clients: one process that plays every client of the topology.

Each client asks the service from its own namespace and address (IPv4 or IPv6,
the pool's family), `rate` times a second, and keeps a `ClientStats` as an
in-process client does, so the one summary measures the lab exactly as the
memory driver: an answer is a request that succeeded (its latency, its time); a
request with no answer within `timeout` failed, and is a disruption at the time
it was sent.

In a private pool each client also registers as a sender, as `Client` does: a
signed join naming only itself, first when it first asks and then every
`register_interval_ms`, signed with the pool's key (an outsider, `authorized =
false`, with the outsider's key, so its registrations are refused). Without one,
its first-hop router drops its packets to the group. The registration is an
IGMPv3 report to 224.0.0.22 in an IPv4 pool, an MLDv2 report to ff02::16 (out of
the client's interface, from its link-local address) in an IPv6 one.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import math
import random
import selectors
import socket
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from manycast.drivers import mroute, mroute6, netns
from manycast.drivers.kernel.sockets import from_link_local, link_local
from manycast.lab.build import Lab
from manycast.pool import pool_keys
from manycast.protocol.client import ClientStats, registration
from manycast.topology import Topology

CLIENT_TTL = 16
REQUEST_TIMEOUT = 1.0


def _interval(rate: float) -> float:
    return 1.0 / rate if rate > 0 else math.inf


@dataclass
class ProbeClient:
    """One client: its socket, its schedule, and what it saw."""

    name: str
    address: str
    sock: socket.socket
    interval: float
    next_send: float
    stats: ClientStats = field(default_factory=ClientStats)
    seq: int = 0
    # Requests without an answer yet: sequence number -> when it was sent.
    outstanding: dict[int, float] = field(default_factory=dict)
    last_reply: float = -1.0
    server: str | None = None
    replies: int = 0
    # Private pools: the key the client signs its registration with, and the raw
    # socket it leaves on.
    key: Ed25519PrivateKey | None = None
    reports: ReportSender | None = None
    next_register: float = math.inf
    registrations: int = 0

    @property
    def rate(self) -> float:
        return 0.0 if math.isinf(self.interval) else 1.0 / self.interval


class Prober:
    """The topology's clients (or those named in `clients`) on a lab that is up."""

    def __init__(
        self,
        lab: Lab,
        topology: Topology,
        clients: list[str] | None = None,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.topology = topology
        self.group = str(topology.pool.group)
        self.family = topology.pool.group.version
        # Each client's group: its family's (a dual-stack pool has one of each).
        self.group_of: dict[str, str] = {}
        self.port = topology.pool.port
        self.register_every = topology.pool.register_interval_s
        self.timeout = timeout
        self.rng = random.Random()
        self.selector = selectors.DefaultSelector()
        self.clients: dict[str, ProbeClient] = {}
        self.answers: Counter[str] = Counter()
        # Requests the kernel refused to send, by errno name. Not a full neighbour
        # table's drops: UDP keeps that ENOBUFS from the sender (`table_fulls`).
        self.send_errors: Counter[str] = Counter()
        # Every request in the order sent, until answered or expired: (sent, client, seq).
        self._waiting: deque[tuple[float, ProbeClient, int]] = deque()
        self.t0 = time.monotonic()
        keys: tuple[Ed25519PrivateKey, Ed25519PrivateKey] | None = None
        if topology.pool.private:
            # The keys the lab's daemons were built with (same seed, same derivation).
            keys = pool_keys(topology, lab.state().get("seed", 1))
        names = sorted(topology.clients) if clients is None else clients
        try:
            for index, name in enumerate(names):
                spec = topology.clients[name]
                address = str(topology.address(name))
                version = topology.address(name).version
                self.group_of[name] = str(topology.pool.group_of(version))
                sock = _client_socket(lab.ns(name), address)
                sock.setblocking(False)
                interval = _interval(spec.rate)
                # Spread the first requests over one interval.
                start = interval * index / max(1, len(names)) if spec.rate > 0 else math.inf
                client = ProbeClient(name, address, sock, interval, start)
                self.clients[name] = client
                self.selector.register(sock, selectors.EVENT_READ, client)
                if keys is not None:
                    client.key = keys[0] if spec.authorized else keys[1]
                    client.reports = report_sender(
                        lab.ns(name), topology.gateways[name][0], version
                    )
                    # First when it first asks (registrations spread as the
                    # requests are, not all at once every interval).
                    client.next_register = start if math.isfinite(start) else 0.0
        except BaseException:
            self.close()
            raise

    def now(self) -> float:
        return time.monotonic() - self.t0

    def set_rate(self, group: str, rate: float) -> None:
        """Every client of the `[[clients]]` group `group` now asks `rate` times a second."""
        for client in self.clients.values():
            if self.topology.clients[client.name].group == group:
                client.interval = _interval(rate)
                client.next_send = self.now()

    def run_until(self, until: float) -> None:
        """Send, register, read answers and expire requests until `until` (prober time)."""
        while True:
            # Answers already here count before anything is judged late (the
            # scenario may have kept this process busy, e.g. starting a server).
            self._poll(0.0)
            now = self.now()
            self._expire(now)
            if now >= until:
                return
            for client in self.clients.values():
                if client.next_register <= now:
                    self._register(client)
                    client.next_register = now + self.register_every
                if client.next_send <= now:
                    self._send(client, now)
            soonest = min(
                (min(c.next_send, c.next_register) for c in self.clients.values()), default=until
            )
            if self._waiting:
                soonest = min(soonest, self._waiting[0][0] + self.timeout)
            self._poll(max(0.0, min(until, soonest) - self.now()))

    def _send(self, client: ProbeClient, now: float) -> None:
        client.seq += 1
        sent = self.now()
        # A request the kernel refused to send is never answered: it fails like a lost one.
        client.outstanding[client.seq] = sent
        self._waiting.append((sent, client, client.seq))
        try:
            client.sock.sendto(
                f"{client.name} {client.seq}".encode(), (self.group_of[client.name], self.port)
            )
        except OSError as exc:
            self.send_errors[errno.errorcode.get(exc.errno or 0, str(exc.errno))] += 1
        client.next_send = now + client.interval

    def _expire(self, now: float) -> None:
        while self._waiting and now >= self._waiting[0][0] + self.timeout:
            sent, client, seq = self._waiting.popleft()
            if client.outstanding.pop(seq, None) is None:
                continue  # answered
            client.stats.requests_failed += 1
            client.stats.failures.append((now, "no answer"))
            client.stats.disruptions.append(sent)

    def _poll(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout):
            self._read(key.data)

    def _register(self, client: ProbeClient) -> None:
        assert client.key is not None and client.reports is not None
        address = ipaddress.ip_address(client.address)
        packet = registration(
            address,
            self.topology.pool.group_of(address.version),
            client.key,
            time.time(),  # the routers check it against their wall clock
            self.rng,
        )
        with contextlib.suppress(OSError):
            client.reports.send(packet)
            client.registrations += 1

    def _read(self, client: ProbeClient) -> None:
        while True:
            try:
                data = client.sock.recv(2048)
            except (BlockingIOError, ConnectionRefusedError):
                return
            now = self.now()
            server = data.split(b" ", 1)[0].decode(errors="replace")
            client.last_reply = now
            client.server = server
            client.replies += 1
            self.answers[server] += 1
            # The service's answer is `<server> <total> <our request>`: the request
            # (`<name> <seq>`) says which one it answers. An answer after the timeout
            # is late (the request already counted as failed).
            parts = data.split()
            if len(parts) < 4 or not parts[3].isdigit():
                continue
            sent = client.outstanding.pop(int(parts[3]), None)
            if sent is not None:
                client.stats.requests_ok += 1
                client.stats.latencies.append(now - sent)
                client.stats.ok_times.append(now)

    def participants(self) -> list[ProbeClient]:
        """The clients that hold the pool's key (all of them, in a public pool)."""
        return [c for c in self.clients.values() if self.topology.clients[c.name].authorized]

    def outsiders(self) -> list[ProbeClient]:
        return [c for c in self.clients.values() if not self.topology.clients[c.name].authorized]

    def served_since(self, since: float) -> int:
        return sum(1 for c in self.participants() if c.last_reply >= since)

    def close(self) -> None:
        self.selector.close()
        for client in self.clients.values():
            client.sock.close()
            if client.reports is not None:
                client.reports.close()


def _client_socket(ns: str, address: str) -> socket.socket:
    """A UDP socket inside `ns` bound to the client's `address`, whose requests to the
    group may cross CLIENT_TTL routers."""
    if ipaddress.ip_address(address).version == 6:
        sock = netns.socket_in(ns, socket.AF_INET6, socket.SOCK_DGRAM)
        option = (socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS)
    else:
        sock = netns.socket_in(ns, socket.AF_INET, socket.SOCK_DGRAM)
        option = (socket.IPPROTO_IP, socket.IP_MULTICAST_TTL)
    try:
        sock.bind((address, 0))
        sock.setsockopt(*option, CLIENT_TTL)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass
class ReportSender:
    """Where a client's (or a test's) membership reports leave: a raw socket bound to
    its interface, the address they go to, and on IPv6 the link-local source they
    are sent from (`sockets.from_link_local`)."""

    sock: socket.socket
    to: tuple[str, int] | tuple[str, int, int, int]
    link_local: ipaddress.IPv6Address | None = None

    def send(self, packet: bytes) -> None:
        self.sock.sendto(from_link_local(packet, self.link_local), self.to)

    def close(self) -> None:
        self.sock.close()


def report_sender(ns: str, iface: str, family: int) -> ReportSender:
    """A raw socket inside `ns` that sends whole IGMP or MLD packets (header, Router
    Alert and all, as `registration` builds them) out of `iface`, to 224.0.0.22 or
    to ff02::16 on that link. IPPROTO_RAW implies the header is ours (on IPv6 as
    well) and receives nothing, so it never needs draining."""
    v6 = family == 6
    sock = netns.socket_in(
        ns, socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW
    )
    try:
        # Device names are looked up in the socket's own namespace.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.encode())
        sock.setblocking(False)
        if not v6:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
            return ReportSender(sock, (mroute.ALL_V3_ROUTERS, 0))
        ifindex = netns.run_in(ns, lambda: socket.if_nametoindex(iface))
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
        source = link_local(iface, netns.read_in(ns, "/proc/net/if_inet6"))
        return ReportSender(sock, (mroute6.ALL_MLDV2_ROUTERS, 0, 0, ifindex), source)
    except BaseException:
        sock.close()
        raise
