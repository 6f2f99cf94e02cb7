"""An asyncio overlay: every (node, interface) is a UDP endpoint on a real host.

A frame for a link goes as one UDP datagram to each receiving member's endpoint;
the payload is the inner packet, unchanged, and the endpoint it arrives on tells
which interface of which node received it. A driver instance hosts only the
nodes it is given but sends to any endpoint of the shared map, so instances in
several processes, on one host or several, form one network.

Delay and loss are emulated at the sender (netem is not available): loss is drawn
from a seeded `random.Random`, delay is a `loop.call_later` before the send.

The hot path avoids asyncio transports: each endpoint is a non-blocking socket
registered with `loop.add_reader`, and one wake-up drains up to `_BATCH`
datagrams straight into the node, sending its frames after each datagram and
re-arming its timer once per batch. A router's forwarding-cache hits
(`protocol/fastpath.py`) are sent from here without calling into the router:
a table look-up on the packet's address bytes, the TTL decrement and the sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import random
import socket
import sys
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType

from manycast.drivers.contract import EffectHandler, carry_out, deliver
from manycast.drivers.links import LinkCounters, LinkSpec
from manycast.errors import DriverError
from manycast.ports import DEFAULT_HOST
from manycast.protocol.fastpath import FAST_PATH_LIMIT, FastPath
from manycast.protocol.node import Frame, Node
from manycast.topology.addressing import assign_endpoints as assign_endpoints  # re-exported
from manycast.wire.ip import IPV6_HEADER_LEN

Endpoint = tuple[str, int]

BUFFER_SIZE = 4 << 20
_MAX_DATAGRAM = 65535
# Datagrams read per wake-up: enough to amortise the loop's cost, few enough that
# one busy endpoint cannot starve the others or the timers.
_BATCH = 256
_IPV4_HEADER_LEN = 20
_NEVER = 1 << 31  # a length no datagram reaches

# Linux reports ICMP errors (port unreachable from a dead peer) on unconnected UDP
# sockets only with IP_RECVERR; they are then queued and must be drained with
# MSG_ERRQUEUE, or they would hold the socket readable and eat its buffer.
_LINUX = sys.platform == "linux"
_IP_RECVERR = 11
_MSG_ERRQUEUE = 0x2000


class OverlayError(DriverError):
    """An endpoint could not be set up (address in use, not a local address)."""


class _Port:
    """One local endpoint: its socket and where its frames go."""

    __slots__ = (
        "counters",
        "delay",
        "emulated",
        "fanout",
        "iface",
        "known",
        "known6",
        "link",
        "loss",
        "open",
        "shortest",
        "sock",
        "unicast",
        "v6",
    )

    def __init__(self, link: LinkSpec, iface: str, sock: socket.socket, counters: LinkCounters):
        self.link = link
        self.iface = iface
        self.sock = sock
        self.counters = counters
        self.delay = link.delay
        self.loss = link.loss
        self.emulated = bool(link.delay or link.loss)
        self.open = True
        self.fanout: tuple[Endpoint, ...] = ()
        # neighbour address -> its endpoint, as a one-receiver tuple (no tuple per frame)
        self.unicast: dict[int, tuple[Endpoint]] = {}
        # The fast path's learnt sends for packets arriving here (its host's), per
        # family: IPv4 datagrams at least `shortest` long are looked up in `known`
        # on the reader's own path, IPv6 ones in `known6` when `v6` (`_Hosted`).
        self.known: dict[int, _Sends] = {}
        self.known6: dict[int, _Sends] = {}
        self.shortest = _NEVER  # a length no datagram reaches
        self.v6 = False


_Send = Callable[[bytes | memoryview, Endpoint], int]
_Direct = tuple[_Send, Endpoint, _Port]
# A fast-path entry: the first copy's send, endpoint, port and counters, then the
# other copies alike (mostly none: one owner per portion).
_Copy = tuple[_Send, Endpoint, _Port]
# A learnt entry: the first copy's send, endpoint and port, then any other copies.
_Sends = tuple[_Send, Endpoint, _Port, tuple[_Copy, ...]]


class _Hosted:
    """A local node with its endpoints, its one armed loop timer, and the driver's
    send and arm callbacks bound to it once (the per-datagram path reuses them)."""

    __slots__ = (
        "arm",
        "armed",
        "direct",
        "fast",
        "fast6",
        "generation",
        "handle",
        "key_mask",
        "known",
        "known6",
        "node",
        "ports",
        "send",
    )

    def __init__(self, node: Node, ports: dict[str, _Port]):
        self.node = node
        self.ports = ports
        # A router's forwarding decisions this driver serves itself (`fastpath.py`):
        # `fast` is the one whose generation is watched and whose counters are
        # credited; `fast6` the IPv6 tables (a dual-stack router's IPv6 logic has
        # its own, `dualstack.py`, which moves `fast`'s generation too).
        fast = getattr(node, "fast_path", None)
        self.fast = fast if isinstance(fast, FastPath) else None
        six = getattr(node, "fast_path6", None)
        if not isinstance(six, FastPath):
            six = self.fast if self.fast is not None and self.fast.family == 6 else None
        self.fast6 = six
        four = self.fast if self.fast is not None and self.fast.family == 4 else None
        # (interface, neighbour) -> its socket's sendto, endpoint and port, for the
        # open ports of links without emulated delay or loss: the fast path's sends.
        self.direct: dict[tuple[str, int], _Direct] = {}
        # The router's fast-path tables translated to those sends, per family and
        # arrival interface; valid while the router's `generation` is this one.
        self.known: dict[str, dict[int, _Sends]] = (
            {name: {} for name in four.tables} if four else {}
        )
        self.known6: dict[str, dict[int, _Sends]] = {name: {} for name in six.tables} if six else {}
        # What `_readable` needs of each port, read once per wake-up: IPv4 datagrams
        # at least a header long are looked up on interfaces with an IPv4 table, under
        # the key's mask as a native word (`_renew` sets it); IPv6 ones apart.
        for name, port in ports.items():
            if name in self.known:
                port.known = self.known[name]
                port.shortest = _IPV4_HEADER_LEN
            if name in self.known6:
                port.known6 = self.known6[name]
                port.v6 = True
        self.key_mask = 0
        self.generation = -1
        self.armed: float | None = None
        self.handle: asyncio.TimerHandle | None = None
        self.send: Callable[[Frame], None] = _unbound
        self.arm: Callable[[Node, float | None], None] = _unbound


def _unbound(*_: object) -> None:
    raise RuntimeError("node is not registered with a running overlay")


def _resolve(host: str) -> str:
    """A numeric IPv4 address for `host`, so that sending never resolves names."""
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise ValueError(f"endpoint host {host!r} does not resolve to an IPv4 address") from exc
    return str(infos[0][4][0])


class AsyncOverlay:
    """Hosts `local_nodes` on UDP endpoints; the links and the endpoint map
    describe the whole network, wherever its other nodes run.

    Use inside a running event loop: `start()` (or `async with`), then
    `await run_until(t)` / `await run_for(s)`; `close()` at the end.
    `run_sync(seconds)` does all of that in a fresh loop.

    An endpoint may be given as a bare port (on 127.0.0.1); port 0 on a local
    endpoint binds a free port and records it in `endpoints`.
    """

    _loop: asyncio.AbstractEventLoop

    def __init__(
        self,
        links: Iterable[LinkSpec] | Mapping[str, LinkSpec],
        endpoints: Mapping[tuple[str, str], Endpoint | int],
        local_nodes: Iterable[Node] = (),
        *,
        seed: int = 0,
        buffer_size: int = BUFFER_SIZE,
    ) -> None:
        specs = links.values() if isinstance(links, Mapping) else links
        self.links: dict[str, LinkSpec] = {link.name: link for link in specs}
        self.buffer_size = buffer_size
        self.nodes: dict[str, Node] = {}
        self.counters: dict[str, LinkCounters] = {name: LinkCounters() for name in self.links}
        self.endpoints: dict[tuple[str, str], Endpoint] = {}
        for key, value in endpoints.items():
            host, port = (DEFAULT_HOST, value) if isinstance(value, int) else value
            if not 0 <= port <= 65535:
                raise ValueError(f"endpoint of {key[0]}/{key[1]}: port {port} is out of range")
            self.endpoints[key] = (_resolve(host), port)
        owners: dict[Endpoint, tuple[str, str]] = {}
        for key, endpoint in self.endpoints.items():
            if endpoint[1] != 0 and owners.setdefault(endpoint, key) != key:
                other = owners[endpoint]
                raise ValueError(
                    f"{key[0]}/{key[1]} and {other[0]}/{other[1]} have the same endpoint "
                    f"{endpoint[0]}:{endpoint[1]}"
                )
        for link in self.links.values():
            for m in link.members:
                if (m.node, m.iface) not in self.endpoints:
                    raise ValueError(f"link {link.name}: no endpoint for {m.node}/{m.iface}")
        self._hosts: dict[str, _Hosted] = {}
        self.on_effect: EffectHandler | None = None
        # A capture sink (`observe.pcap.Capture`): (link, time, packet) of every frame
        # a local node sends (a pool split over processes: each captures its own).
        self.capture: Callable[[str, float, bytes], None] | None = None
        self._rng = random.Random(seed)
        self._started = False
        self._closed = False
        self._t0 = 0.0
        # Every datagram is read into this one buffer: the fast path patches and sends
        # it from there with no copy; anything else gets a copy of its bytes.
        self._buffer = bytearray(_MAX_DATAGRAM)
        self._view = memoryview(self._buffer)
        # The buffer from byte 4 as 64-bit words in the machine's byte order: word 1
        # is bytes 12-19, the fast path's key (source, then destination), read in
        # one step. The driver keys what it learnt by that word (`_native`).
        self._words = self._view[4 : 4 + (_MAX_DATAGRAM - 4) // 8 * 8].cast("Q")
        self._pending: list[Node] = []
        self._calls: list[tuple[float, Callable[[], object]]] = []
        self._handles: set[asyncio.TimerHandle] = set()
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        for node in local_nodes:
            self.add(node)

    # the clock ------------------------------------------------------------
    @property
    def now(self) -> float:
        """Seconds since `start()` on the loop's monotonic clock (0 before)."""
        return self._loop.time() - self._t0 if self._started else 0.0

    @property
    def started(self) -> bool:
        return self._started

    def start(self) -> None:
        """Bind every local endpoint, then start the nodes (needs a running loop)."""
        if self._closed:
            raise RuntimeError("the overlay is closed")
        if self._started:
            return
        loop = asyncio.get_running_loop()
        pending = self._pending
        hosts: list[_Hosted] = []
        try:
            for node in pending:
                hosts.append(self._bind(node))
        except BaseException:
            for host in hosts:
                self._close_ports(host)
            raise
        self._loop = loop
        self._t0 = loop.time()
        self._started = True
        self._pending = []
        for host in hosts:
            self._register(host)
        self._route_all()
        for host in hosts:
            self._start_node(host)
        calls, self._calls = self._calls, []
        for at, callback in calls:
            self.call_at(at, callback)

    async def run_until(
        self, until: float, condition: Callable[[], bool] | None = None, poll: float = 0.005
    ) -> bool:
        """Let the network run until `now` reaches `until`, or until `condition()`
        holds (checked every `poll` seconds); True if it held. Raises the first
        exception a node raised meanwhile (the network keeps its state)."""
        self.start()
        self._raise_error()
        if self._waiter is not None:
            raise RuntimeError("run_until is already waiting")
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._waiter = waiter
        handle = self._loop.call_at(self._t0 + until, _resolve_waiter, waiter)
        checker: asyncio.TimerHandle | None = None
        held = False

        def check() -> None:
            nonlocal checker, held
            if condition is not None and condition():
                held = True
                _resolve_waiter(waiter)
            else:
                checker = self._loop.call_later(poll, check)

        if condition is not None:
            check()
        try:
            await waiter
        finally:
            handle.cancel()
            if checker is not None:
                checker.cancel()
            self._waiter = None
        self._raise_error()
        return held

    async def run_for(self, seconds: float) -> None:
        await self.run_until(self.now + seconds)

    def run_sync(self, seconds: float | None = None) -> None:
        """Run in a fresh event loop for `seconds` (None: until interrupted), then close."""

        async def session() -> None:
            try:
                await self.run_for(float("inf") if seconds is None else seconds)
            finally:
                self.close()

        asyncio.run(session())

    # hosting ------------------------------------------------------------
    def add(self, node: Node) -> None:
        """Bring a node up (before or while running): bind its endpoints, start it."""
        if node.name in self._hosts or any(n.name == node.name for n in self._pending):
            raise ValueError(f"node {node.name} is already running")
        if self._closed:
            raise RuntimeError("the overlay is closed")
        if not self._started:
            self._pending.append(node)
            return
        host = self._bind(node)
        self._register(host)
        self._route_all()
        self._start_node(host)

    def kill(self, name: str) -> Node:
        """Stop a local node at once, as a crash would: its sockets close, its timer
        and its frames still in flight are dropped."""
        host = self._hosts.pop(name, None)
        if host is None:
            for node in self._pending:
                if node.name == name:
                    self._pending.remove(node)
                    return node
            raise KeyError(f"node {name} is not running here")
        del self.nodes[name]
        self._close_ports(host)
        if host.handle is not None:
            host.handle.cancel()
            host.handle = None
        for fast in (host.fast, host.fast6):
            if fast is not None:
                fast.served = False
                fast.invalidate()
        return host.node

    def call_at(self, at: float, callback: Callable[[], object]) -> None:
        """Run `callback` at time `at` (scenario steps, measurements), then send
        whatever the local nodes queued."""
        if not self._started:
            self._calls.append((at, callback))
            return

        def run() -> None:
            self._handles.discard(handle)
            try:
                callback()
                for host in list(self._hosts.values()):
                    self._after(host)
            except Exception as exc:
                self._fail(exc)

        handle = self._loop.call_at(self._t0 + at, run)
        self._handles.add(handle)

    def close(self) -> None:
        """Stop every local node and release every socket and loop timer."""
        for name in list(self._hosts):
            self.kill(name)
        for handle in self._handles:
            handle.cancel()
        self._handles.clear()
        self._pending.clear()
        self._calls.clear()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        self._closed = True

    async def __aenter__(self) -> AsyncOverlay:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # set-up ---------------------------------------------------------------
    def _bind(self, node: Node) -> _Hosted:
        """Open and bind the node's endpoints, all or none; record port-0 choices."""
        ports: dict[str, _Port] = {}
        try:
            for link in self.links.values():
                for m in link.members:
                    if m.node == node.name:
                        sock = self._socket(node.name, m.iface)
                        ports[m.iface] = _Port(link, m.iface, sock, self.counters[link.name])
        except BaseException:
            for port in ports.values():
                port.sock.close()
            raise
        for iface, port in ports.items():
            self.endpoints[(node.name, iface)] = port.sock.getsockname()[:2]
        return _Hosted(node, ports)

    def _socket(self, node: str, iface: str) -> socket.socket:
        address = self.endpoints[(node, iface)]
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            # No SO_REUSEADDR: on Linux it would let two UDP sockets share the port.
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, option, self.buffer_size)
            if _LINUX:
                sock.setsockopt(socket.IPPROTO_IP, _IP_RECVERR, 1)
            sock.setblocking(False)
            sock.bind(address)
        except OSError as exc:
            sock.close()
            raise OverlayError(
                exc.errno,
                f"node {node} interface {iface}: cannot bind {address[0]}:{address[1]}: "
                f"{exc.strerror or exc}",
            ) from exc
        return sock

    def _route_all(self) -> None:
        """Resolve every local port's receivers to endpoints. A member whose
        endpoint is still port 0 is not running anywhere yet: it gets nothing."""
        for host in self._hosts.values():
            sender = host.node.name
            for port in host.ports.values():
                receivers = [
                    (m.address, self.endpoints[(m.node, m.iface)])
                    for m in port.link.members
                    if m.node != sender
                ]
                port.fanout = tuple(ep for _, ep in receivers if ep[1] != 0)
                # A dual-stack link's member is reached by either of its addresses.
                port.unicast = {
                    address: (self.endpoints[(m.node, m.iface)],)
                    for address, m in port.link.by_address.items()
                    if m.node != sender and self.endpoints[(m.node, m.iface)][1] != 0
                }
            host.direct = {
                (port.iface, address): (port.sock.sendto, ep, port)
                for port in host.ports.values()
                if port.open and not port.emulated
                for address, (ep,) in port.unicast.items()
            }
            _forget(host)

    def _register(self, host: _Hosted) -> None:
        host.send = functools.partial(self._send, host)
        host.arm = lambda _node, deadline: self._arm(host, deadline)
        for fast in (host.fast, host.fast6):
            if fast is not None:
                fast.served = True
        name = host.node.name
        self._hosts[name] = host
        self.nodes[name] = host.node
        for port in host.ports.values():
            self._loop.add_reader(port.sock, self._readable, host, port)

    def _start_node(self, host: _Hosted) -> None:
        try:
            host.node.start(self.now)
            self._after(host)
        except Exception:
            self.kill(host.node.name)
            raise

    def _close_ports(self, host: _Hosted) -> None:
        host.direct = {}
        _forget(host)
        for port in host.ports.values():
            if port.open:
                port.open = False
                if self._started:
                    self._loop.remove_reader(port.sock)
                port.sock.close()

    # the per-datagram path --------------------------------------------------
    def _readable(self, host: _Hosted, port: _Port) -> None:
        # Work done once per wake-up is kept small: under light load a wake-up
        # brings one or two datagrams, and anything here is paid per datagram.
        recv_into = port.sock.recv_into
        buffer, view, words = self._buffer, self._view, self._words
        # A router's cache hits for this interface are sent from here (`fastpath.py`
        # states when that is the same as calling the router), through `known`: the
        # router's table for this interface with each copy's socket and endpoint.
        fast = host.fast
        if fast is not None and host.generation != fast.generation:
            self._renew(host)
        # IPv6 datagrams are looked up on ports with an IPv6 table (`_serve_v6`),
        # IPv4 ones inline on ports with an IPv4 table (a dual-stack port has both);
        # shorter ones go to the router (which counts them); with no tables to
        # serve, all do.
        if self.capture is None and port.open:
            shortest, v6 = port.shortest, port.v6
        else:
            shortest, v6 = _NEVER, False
        key_mask = host.key_mask
        known = port.known
        # Packets handed to the router, copies beyond one each, and IPv6 copies.
        handed = extra = six = 0
        # Copies sent, counted per batch for the port they went out on (here they
        # all go the same way): `tally` copies not yet added to `tallied`.
        tallied: _Port | None = None
        tally = 0
        n = 0
        try:
            try:
                while n < _BATCH:
                    try:
                        length = recv_into(buffer)
                    except BlockingIOError:
                        if n == 0:
                            # Woken with nothing to read: ICMP errors are queued.
                            self._drain_errors(port)
                        break
                    except ConnectionRefusedError:
                        # An ICMP error for an earlier send, reported here by the kernel.
                        if not self._drain_errors(port):
                            port.counters.unreachable += 1
                        continue
                    except OSError:
                        port.counters.dropped += 1
                        break
                    n += 1
                    if v6 and buffer[0] >> 4 == 6:
                        copies = self._serve_v6(host, port, length)
                        if copies:
                            extra += copies - 1
                            six += copies
                            continue
                    elif length >= shortest:
                        ttl = buffer[8]
                        # The key: the source under the members' masks, then the group.
                        try:
                            sendto, address, to, more = known[words[1] & key_mask]
                        except KeyError:
                            word = words[1] & key_mask
                            sends = self._learn(host, port.iface, _native(word), word)
                            if sends is None:
                                ttl = 0  # not in the tables: the router's own path
                            else:
                                sendto, address, to, more = sends
                        # `forward_in_place_v4`, inlined (the call was a tenth of the
                        # per-packet cost): only IPv4 as the router takes it, TTL
                        # above 1 (the router counts the others).
                        if ttl > 1 and 0x45 <= buffer[0] <= 0x4F:
                            buffer[8] = ttl - 1
                            # RFC 1624: the checksum goes up by 0x0100; only a high
                            # byte near 0xFF needs the whole sum (end-around carry).
                            high = buffer[10]
                            if high < 0xFE:
                                buffer[10] = high + 1
                            else:
                                patched = ((high << 8 | buffer[11]) + 0x100) % 0xFFFF
                                buffer[10] = patched >> 8
                                buffer[11] = patched & 0xFF
                            forwarded = view[:length]
                            try:  # `_send`, inlined
                                sendto(forwarded, address)
                            except OSError as exc:
                                self._send_failed(to, forwarded, address, exc)
                            else:
                                if to is tallied:
                                    tally += 1
                                else:
                                    if tallied is not None:
                                        tallied.counters.sent += tally
                                    tallied, tally = to, 1
                            if more:
                                for sendto, address, to in more:
                                    try:
                                        sendto(forwarded, address)
                                    except OSError as exc:
                                        self._send_failed(to, forwarded, address, exc)
                                    else:
                                        to.counters.sent += 1
                                extra += len(more)
                            continue
                    handed += 1
                    self._hand(host, port, length)
                    # Membership may have changed, or the port closed.
                    if fast is not None and host.generation != fast.generation:
                        self._renew(host)
                        key_mask = host.key_mask
                    if not (self.capture is None and port.open):
                        shortest, v6 = _NEVER, False
            finally:
                if tallied is not None:
                    tallied.counters.sent += tally
                if fast is not None and n > handed:
                    if six and host.fast6 is not None:
                        # Each family's copies to its own tables (an IPv6 router's
                        # are one): the IPv6 ones, then any IPv4 ones.
                        host.fast6.credit(six)
                        if n - handed + extra > six:
                            fast.credit(n - handed + extra - six)
                    else:
                        fast.credit(n - handed + extra)
                if handed:
                    # Only the router's own path changes its deadlines.
                    node = host.node
                    host.arm(node, node.next_deadline())
        except Exception as exc:
            self._fail(exc)
        finally:
            port.counters.received += n

    def _hand(self, host: _Hosted, port: _Port, length: int) -> None:
        """The datagram in the buffer to the node; its frames and effects out, in
        order (the timer is armed once per batch: none can fire before then)."""
        node = host.node
        node.receive(port.iface, bytes(self._view[:length]), self._loop.time() - self._t0)
        if node.outbox or node.effects:
            deliver(node, host.send, self.on_effect)

    def _renew(self, host: _Hosted) -> None:
        """The router's membership changed: what was learnt is void, and the key's
        mask is the new one."""
        fast = host.fast
        assert fast is not None
        _forget(host)
        host.generation = fast.generation
        host.key_mask = _native(fast.key_mask) if fast.family == 4 else 0

    def _serve_v6(self, host: _Hosted, port: _Port, length: int) -> int:
        """The copies sent of the datagram in the buffer, of version 6, from the
        router's IPv6 fast path (0: none, the router's own path): the rest of
        `FastPath.forward_copy`'s checks and the hop limit, patched in place."""
        buffer = self._buffer
        fast = host.fast6
        if fast is None or length < IPV6_HEADER_LEN or buffer[7] <= 1:
            return 0
        key = int.from_bytes(buffer[8:IPV6_HEADER_LEN], "big") & fast.key_mask
        sends = port.known6.get(key) or self._learn(host, port.iface, key, key, six=True)
        if sends is None:
            return 0
        buffer[7] -= 1
        forwarded = self._view[:length]
        first: _Copy = sends[:3]
        more = sends[3]
        for sendto, address, to in (first, *more):
            try:
                sendto(forwarded, address)
            except OSError as exc:
                self._send_failed(to, forwarded, address, exc)
            else:
                to.counters.sent += 1
        return 1 + len(more)

    def _learn(
        self, host: _Hosted, iface: str, key: int, stored: int, six: bool = False
    ) -> _Sends | None:
        """The sends for a packet the router's fast path (`six`: its IPv6 tables) has
        an entry for under `key`, remembered in `known` under `stored` (IPv4: the key
        as a native word); None (the router's own path) without one, or when a copy
        goes on a link with emulated delay or loss, or to a neighbour with no
        endpoint yet."""
        fast = host.fast6 if six else host.fast
        outs = None if fast is None else fast.tables.get(iface, {}).get(key)
        if not outs:
            return None
        copies: list[_Copy] = []
        for out in outs:
            hop = host.direct.get(out)
            if hop is None:
                return None
            copies.append(hop)
        learnt: _Sends = (*copies[0], tuple(copies[1:]))
        known = (host.known6 if six else host.known)[iface]
        if len(known) >= FAST_PATH_LIMIT:
            known.clear()
        known[stored] = learnt
        return learnt

    def _after(self, host: _Hosted) -> None:
        """Send the node's frames and re-arm its loop timer if the deadline moved."""
        carry_out(host.node, host.send, host.arm, self.on_effect)

    def _send(self, host: _Hosted, frame: Frame) -> None:
        port = host.ports.get(frame.iface)
        if port is None:
            raise ValueError(f"{host.node.name} sent on {frame.iface}, which is on no link")
        if not port.open:
            return
        next_hop = frame.next_hop
        if next_hop is None:
            receivers = port.fanout
        else:
            hop = port.unicast.get(next_hop)
            if hop is None:
                port.counters.dropped += 1
                return
            receivers = hop
        packet = frame.packet
        if self.capture is not None:
            self.capture(port.link.name, self.now, packet)  # once per frame, as on a wire
        if port.emulated:
            self._send_emulated(port, packet, receivers)
            return
        sendto = port.sock.sendto
        sent = 0
        for address in receivers:
            try:
                sendto(packet, address)
            except OSError as exc:
                self._send_failed(port, packet, address, exc)
            else:
                sent += 1
        port.counters.sent += sent

    def _arm(self, host: _Hosted, deadline: float | None) -> None:
        if deadline != host.armed:
            if host.handle is not None:
                host.handle.cancel()
            host.armed = deadline
            host.handle = (
                None
                if deadline is None
                else self._loop.call_at(self._t0 + deadline, self._fire, host)
            )

    def _send_emulated(self, port: _Port, packet: bytes, receivers: tuple[Endpoint, ...]) -> None:
        loop = self._loop
        loss = port.loss
        rng = self._rng
        for address in receivers:
            if loss and rng.random() < loss:
                port.counters.lost += 1
            elif port.delay:
                loop.call_later(port.delay, self._send_later, port, packet, address)
            else:
                self._send_later(port, packet, address)

    def _send_later(self, port: _Port, packet: bytes, address: Endpoint) -> None:
        if not port.open:  # the sender crashed while the frame was in flight
            return
        try:
            port.sock.sendto(packet, address)
        except OSError as exc:
            self._send_failed(port, packet, address, exc)
        else:
            port.counters.sent += 1

    def _send_failed(
        self, port: _Port, packet: bytes | memoryview, address: Endpoint, exc: OSError
    ) -> None:
        """Count a failed send. A refusal belongs to an earlier datagram (the
        kernel reports an ICMP error on the next call), so this one is tried again."""
        if isinstance(exc, ConnectionRefusedError):
            if not self._drain_errors(port):
                port.counters.unreachable += 1
            try:
                port.sock.sendto(packet, address)
            except OSError:
                port.counters.dropped += 1
            else:
                port.counters.sent += 1
        else:
            port.counters.dropped += 1

    def _drain_errors(self, port: _Port) -> int:
        """Read the queued ICMP errors, one per datagram that found no receiver."""
        if not _LINUX or not port.open:
            return 0
        recvmsg = port.sock.recvmsg
        n = 0
        while True:
            try:
                recvmsg(1, 0, _MSG_ERRQUEUE)
            except OSError:
                break
            n += 1
        port.counters.unreachable += n
        return n

    def _fire(self, host: _Hosted) -> None:
        if self._hosts.get(host.node.name) is not host:
            return
        # Never report a time before the deadline itself (float rounding of t0 + d - t0).
        armed = host.armed
        now = self.now if armed is None else max(self.now, armed)
        host.handle = None
        host.armed = None
        try:
            host.node.on_timer(now)
            self._after(host)
        except Exception as exc:
            self._fail(exc)

    # errors from nodes ------------------------------------------------------
    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _raise_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error


def _native(key: int) -> int:
    """A fast-path key (eight bytes read big-endian) as the word `_words` reads from
    the same bytes, and back (swapping bytes undoes itself)."""
    return int.from_bytes(key.to_bytes(8, "big"), sys.byteorder)


def _forget(host: _Hosted) -> None:
    """Drop what the fast path learnt (the router's tables or the endpoints changed)."""
    for family in (host.known, host.known6):
        for known in family.values():
            known.clear()


def _resolve_waiter(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
