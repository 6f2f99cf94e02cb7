"""The kernel driver: manycast nodes on real Linux networking.

The lab (`manycast.lab`) runs three programs, each inside one node's network
namespace (`python -m manycast.drivers.kernel ROLE --netns NS --run-dir DIR ...`):

* `router` hosts the same sans-I/O `Router` as every other driver and maps its
  decisions onto the kernel's multicast forwarding table. It opens the MRT
  socket, adds a VIF per interface and joins 224.0.0.22 on each (reports are
  sent there, and a host only accepts a group it joined). Extended membership
  reports go to `Router.receive`; the frames the core sends (relayed joins,
  relayed pins) go out of the interface it names. On a NOCACHE upcall for
  (S, G) the daemon installs the entry toward the interfaces `Router.resolve`
  names, possibly none (then the kernel drops (S, G) quietly instead of asking
  again). When the membership of G changes, exactly the entries of G whose
  outgoing interfaces differ are rewritten. The kernel alone forwards
  established sources; the daemon only decides.

  Plain IGMP reports (no RFC 9279 extension flag) are ignored. Linux sends
  them by itself whenever a socket joins a group, the service's and the agent's
  own sockets included; such a join names no mask and, for an any-source join,
  means "every source", so honouring it would hand every client to whichever
  server happened to open a socket. Only the agent's extended report says which
  portions a server serves.

  Pinned paths (R4) are per source here: when a change would move an (S, G)
  entry away from an owner that is still a member (take an outgoing interface
  away, not only add one), the old entry stays while its kernel packet counter
  keeps increasing, and is rewritten once it has been idle for `pin_idle`
  seconds.

* `server` hosts the `Server` agent: coordination and membership exactly as in
  the overlay. Its reports leave on a raw IGMP socket (Router Alert, TTL 1, to
  224.0.0.22) as built by the core; control messages travel on an ordinary UDP
  socket joined to the control group.

* `serve` is the service itself, a program that knows nothing of manycast: a
  UDP counter on the group port, receiving with an ordinary socket joined to
  the group, answering `<server> <count>` to each datagram and keeping
  per-source counts in `<node>.counts.json`. Any other program (socat, iperf)
  can stand in for it.

Each program writes `<node>.<role>.ready` once set up and answers one-line JSON
requests on the unix socket `<node>.<role>.sock` (`status`, and for servers
`set_share`, `rebalance`, `owners`).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

from manycast.drivers import netns
from manycast.drivers.mroute import (
    ALL_V3_ROUTERS,
    IGMPMSG_NOCACHE,
    IP_PKTINFO,
    MrouteSocket,
    Received,
    mreqn,
)

if TYPE_CHECKING:
    from manycast.protocol.router import Router
    from manycast.protocol.server import Server
    from manycast.topology import Topology

log = logging.getLogger("manycast.kernel")

KEY_TTL = 300.0
CONTROL_TTL = 16
IGMP_V3_REPORT = 0x22
EXTENSION_FLAG = 0x80  # high bit of the report's flags field (RFC 9279)
_PKTINFO = struct.Struct("@i4s4s")
_IDLE_WAKE = 1.0


def ready_path(run_dir: Path, node: str, role: str) -> Path:
    return run_dir / f"{node}.{role}.ready"


def command_path(run_dir: Path, node: str, role: str) -> Path:
    return run_dir / f"{node}.{role}.sock"


def counts_path(run_dir: Path, node: str) -> Path:
    return run_dir / f"{node}.counts.json"


def ask(run_dir: Path, node: str, role: str, request: dict[str, Any], timeout: float = 2.0) -> Any:
    """One request to a node's program (`role`: router, server, service); its JSON answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(command_path(run_dir, node, role)))
        sock.sendall(json.dumps(request).encode() + b"\n")
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return json.loads(b"".join(chunks))


def _udp_packet(src: str, sport: int, dst: str, dport: int, payload: bytes) -> bytes:
    """A datagram an ordinary socket received, as the inner IPv4 packet the core reads."""
    from manycast.wire.ip import IPPROTO_UDP, IPv4Packet, UDPDatagram

    s, d = ipaddress.IPv4Address(src), ipaddress.IPv4Address(dst)
    segment = UDPDatagram(sport, dport, payload).to_wire(s, d)
    return IPv4Packet.make(s, d, IPPROTO_UDP, segment).to_wire()


def _recv_pktinfo(sock: socket.socket) -> tuple[bytes, tuple[str, int], int, str] | None:
    """(payload, sender, ifindex, destination address) of one datagram, or None."""
    try:
        data, ancdata, _, sender = sock.recvmsg(65535, 64)
    except BlockingIOError:
        return None
    ifindex, dst = 0, "0.0.0.0"
    for level, kind, value in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
            ifindex, _, addr = _PKTINFO.unpack_from(value)
            dst = socket.inet_ntoa(addr)
    return data, sender, ifindex, dst


class _Loop:
    """A small select loop shared by the programs: sockets, one deadline, the
    command socket, and a clean stop on SIGTERM."""

    def __init__(self, run_dir: Path, node: str, role: str) -> None:
        self.run_dir = run_dir
        self.node = node
        self.role = role
        self.t0 = time.monotonic()
        self.selector = selectors.DefaultSelector()
        self.running = True
        path = command_path(run_dir, node, role)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self.command = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.command.bind(str(path))
        self.command.listen(8)
        self.command.setblocking(False)
        self.handlers: dict[str, Callable[[dict[str, Any]], Any]] = {}
        self.watch(self.command, self._on_command)
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def watch(self, sock: socket.socket, callback: Callable[[], None]) -> None:
        sock.setblocking(False)
        self.selector.register(sock, selectors.EVENT_READ, callback)

    def _stop(self, *_: object) -> None:
        self.running = False

    def _on_command(self) -> None:
        try:
            conn, _ = self.command.accept()
        except BlockingIOError:
            return
        with conn:
            conn.settimeout(1.0)
            try:
                line = conn.makefile("rb").readline()
                request = json.loads(line)
                handler = self.handlers.get(request.get("op", ""))
                if handler is None:
                    answer: Any = {"error": f"unknown op {request.get('op')!r}"}
                else:
                    answer = handler(request)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                answer = {"error": str(exc)}
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(answer).encode() + b"\n")

    def ready(self) -> None:
        ready_path(self.run_dir, self.node, self.role).write_text(str(os.getpid()))

    def run(self, deadline: Callable[[], float | None], tick: Callable[[], None]) -> None:
        while self.running:
            due = deadline()
            timeout = _IDLE_WAKE if due is None else max(0.0, min(_IDLE_WAKE, due - self.now()))
            try:
                events = self.selector.select(timeout)
            except InterruptedError:
                continue
            for key, _ in events:
                key.data()
            tick()

    def close(self) -> None:
        self.selector.close()
        self.command.close()
        with contextlib.suppress(FileNotFoundError):
            command_path(self.run_dir, self.node, self.role).unlink()


# -- the router daemon -----------------------------------------------------------------


@dataclass
class _Entry:
    """What the daemon installed for one (S, G)."""

    parent: int
    outs: frozenset[int]
    owners: frozenset[int]  # the members whose filters matched S at install time
    held: int | None = None  # the packet counter when a move was postponed (R4)


@dataclass
class RouterDaemonStats:
    upcalls: int = 0
    installed: int = 0
    rewritten: int = 0
    held: int = 0
    released: int = 0
    reports: int = 0
    plain_reports_ignored: int = 0
    install_seconds: float = 0.0  # upcall read to entry installed, summed
    first_upcall: float | None = None
    last_install: float | None = None


class RouterDaemon:
    def __init__(
        self, topology: Topology, name: str, run_dir: Path, seed: int, pin_idle: float | None
    ) -> None:
        from manycast.pool import build

        self.loop = _Loop(run_dir, name, "router")
        nodes = build(topology, seed=seed, wall_base=time.time(), only={name})
        self.router: Router = nodes.routers[name]
        self.directory = nodes.directory
        self.pin_idle = pin_idle
        self.stats = RouterDaemonStats()
        interfaces = topology.interfaces[name]
        self.vif_of: dict[str, int] = {}
        self.iface_of_vif: dict[int, str] = {}
        self.iface_of_index: dict[int, str] = {}
        self.own = {i.address.packed for i in interfaces.values()}
        self.mroute = MrouteSocket()
        self.send_socks: dict[str, socket.socket] = {}
        for vif, iface in enumerate(sorted(interfaces)):
            ifindex = socket.if_nametoindex(iface)
            self.mroute.add_vif(vif, ifindex)
            self.mroute.join(ifindex)
            self.vif_of[iface], self.iface_of_vif[vif] = vif, iface
            self.iface_of_index[ifindex] = iface
            out = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            out.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.encode())
            out.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
            out.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn("0.0.0.0", ifindex))
            self.send_socks[iface] = out
        # Pin requests and other unicast control messages for the router itself.
        self.control = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.control.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.control.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        self.control.bind(("0.0.0.0", topology.pool.control_port))
        self.entries: dict[int, dict[int, _Entry]] = {}  # group -> source -> entry
        self.dirty: set[int] = set()
        self.seen: dict[int, tuple[Any, ...]] = {}  # group -> membership last acted on
        self.senders: dict[int, frozenset[int]] = {}  # group -> admitted senders acted on
        self.key_requests: list[int] = []
        self.next_pin_check: float | None = None
        self.router.on_group_change = self.dirty.add
        self.router.on_key_request = self.key_requests.append
        self.loop.watch(self.mroute.sock, self._on_mroute)
        self.loop.watch(self.control, self._on_control)
        self.loop.handlers["status"] = self._status
        self.router.start(self.loop.now())

    # events ------------------------------------------------------------------------
    def _on_mroute(self) -> None:
        for item in self.mroute.read():
            if isinstance(item, Received):
                self._on_igmp(item)
            elif item.kind == IGMPMSG_NOCACHE:
                self._on_nocache(item.vif, item.source, item.group)
        self._after()

    def _on_igmp(self, item: Received) -> None:
        packet = item.packet
        iface = self.iface_of_index.get(item.ifindex)
        if iface is None or len(packet) < 20 or packet[12:16] in self.own:
            return
        igmp = packet[(packet[0] & 0x0F) * 4 :]
        if len(igmp) < 8 or igmp[0] != IGMP_V3_REPORT:
            return
        if not igmp[4] & EXTENSION_FLAG:
            self.stats.plain_reports_ignored += 1
            return
        self.stats.reports += 1
        self.router.receive(iface, packet, self.loop.now())

    def _on_control(self) -> None:
        while (got := _recv_pktinfo(self.control)) is not None:
            data, (src, sport), ifindex, dst = got
            iface = self.iface_of_index.get(ifindex)
            if iface is not None:
                packet = _udp_packet(src, sport, dst, self.control.getsockname()[1], data)
                self.router.receive(iface, packet, self.loop.now())
        self._after()

    def _on_nocache(self, vif: int, source: int, group: int) -> None:
        start = time.monotonic()
        self.stats.upcalls += 1
        if self.stats.first_upcall is None:
            self.stats.first_upcall = start
        if vif not in self.iface_of_vif:
            return
        if group not in self.seen:
            self.seen[group] = self._membership(group)
        outs, owners = self._decide(source, group, vif, upcall=True)
        self.mroute.set_entry(source, group, vif, outs)
        self.entries.setdefault(group, {})[source] = _Entry(vif, outs, owners)
        done = time.monotonic()
        self.stats.installed += 1
        self.stats.install_seconds += done - start
        self.stats.last_install = done

    def _tick(self) -> None:
        now = self.loop.now()
        due = self.router.next_deadline()
        if due is not None and due <= now:
            self.router.on_timer(now)
        if self.next_pin_check is not None and self.next_pin_check <= now:
            self._check_pins(now)
        self._after()

    def _deadline(self) -> float | None:
        dues = [d for d in (self.router.next_deadline(), self.next_pin_check) if d is not None]
        return min(dues, default=None)

    def _after(self) -> None:
        """Answer key lookups, send the core's frames, re-resolve changed groups."""
        now = self.loop.now()
        while self.key_requests:
            group = self.key_requests.pop(0)
            raw = self.directory.get(group)
            self.router.provide_key(group, raw, KEY_TTL, now, None if raw else "no key")
        if self.router.admission is not None:
            # A participant's registration admits it as a sender without changing the
            # membership (and the core forgets it on expiry): an entry installed while
            # it was refused must be rewritten all the same.
            for group, senders in self.router.senders.items():
                current = frozenset(senders)
                if self.senders.get(group, frozenset()) != current:
                    self.senders[group] = current
                    self.dirty.add(group)
        for frame in self.router.take_frames():
            sock = self.send_socks.get(frame.iface)
            if sock is None:
                continue
            hop = frame.next_hop
            dst = socket.inet_ntoa(frame.packet[16:20]) if hop is None else _ntoa(hop)
            try:
                sock.sendto(frame.packet, (dst, 0))
            except OSError as exc:
                log.warning("send on %s to %s failed: %s", frame.iface, dst, exc)
        while self.dirty:
            self._refresh(self.dirty.pop(), now)

    # decisions -----------------------------------------------------------------------
    def _membership(self, group: int) -> tuple[Any, ...]:
        members = self.router.members.get(group, {})
        return (
            tuple(sorted((o, m.iface, m.neighbor, m.filter) for o, m in members.items())),
            self.senders.get(group, frozenset()),
        )

    def _decide(
        self, source: int, group: int, parent: int, *, upcall: bool = False
    ) -> tuple[frozenset[int], frozenset[int]]:
        """The core's decision for (source, group) arriving on VIF `parent`, as VIFs."""
        members = self.router.members.get(group, {})
        owners = frozenset(o for o, m in members.items() if m.filter.matches(source))
        iface = self.iface_of_vif[parent]
        if self.router.admission is not None and not self.router.sender_allowed(
            iface, source, group
        ):
            if upcall:
                # The kernel drops the source's later packets by the empty entry,
                # unseen: the refusal is counted once per source, here.
                self.router.stats.rejected["unauthorized sender"] += 1
            return frozenset(), owners
        outs = frozenset(
            self.vif_of[i] for i, _ in self.router.resolve(source, group) if i in self.vif_of
        )
        return outs - {parent}, owners

    def _refresh(self, group: int, now: float) -> None:
        """Membership of `group` changed: rewrite exactly the entries that move."""
        membership = self._membership(group)
        if self.seen.get(group) == membership:
            return  # a refresh that changed nothing
        self.seen[group] = membership
        live = set(self.router.members.get(group, {}))
        for source, entry in self.entries.get(group, {}).items():
            outs, owners = self._decide(source, group, entry.parent)
            if outs == entry.outs:
                entry.owners, entry.held = owners, None
                continue
            # Pin (R4) only a move: an entry that merely gains interfaces (a new
            # member of the control channel, say) is rewritten at once.
            moving = bool(entry.outs - outs)
            if self.pin_idle is not None and moving and entry.owners <= live:
                if entry.held is None:
                    entry.held = self.mroute.packets(source, group) or 0
                    self.stats.held += 1
                    if self.next_pin_check is None:
                        self.next_pin_check = now + self.pin_idle
                continue
            self._write(source, group, entry, outs, owners)

    def _write(
        self, source: int, group: int, entry: _Entry, outs: frozenset[int], owners: frozenset[int]
    ) -> None:
        self.mroute.set_entry(source, group, entry.parent, outs)
        entry.outs, entry.owners, entry.held = outs, owners, None
        self.stats.rewritten += 1

    def _check_pins(self, now: float) -> None:
        """Release the held entries whose counter stopped increasing."""
        waiting = False
        for group, sources in self.entries.items():
            live = set(self.router.members.get(group, {}))
            for source, entry in sources.items():
                if entry.held is None:
                    continue
                count = self.mroute.packets(source, group) or 0
                if count == entry.held or not entry.owners <= live:
                    outs, owners = self._decide(source, group, entry.parent)
                    self._write(source, group, entry, outs, owners)
                    self.stats.released += 1
                else:
                    entry.held = count
                    waiting = True
        assert self.pin_idle is not None
        self.next_pin_check = now + self.pin_idle if waiting else None

    # views ---------------------------------------------------------------------------
    def _status(self, _: dict[str, Any]) -> dict[str, Any]:
        stats = self.router.stats
        return {
            "node": self.router.name,
            "pid": os.getpid(),
            "membership": self.router.membership(),
            "entries": sum(len(s) for s in self.entries.values()),
            "held": sum(1 for s in self.entries.values() for e in s.values() if e.held is not None),
            "daemon": asdict(self.stats),
            "joins_accepted": stats.joins_accepted,
            "joins_relayed": stats.joins_relayed,
            "rejected": dict(stats.rejected),
            "vifs": {str(v): i for v, i in self.iface_of_vif.items()},
        }

    def run(self) -> None:
        self.loop.ready()
        try:
            self.loop.run(self._deadline, self._tick)
        finally:
            self.mroute.close()
            self.loop.close()


def _ntoa(address: int) -> str:
    return socket.inet_ntoa(address.to_bytes(4, "big"))


# -- the server agent ------------------------------------------------------------------


@dataclass
class AgentStats:
    reports_sent: int = 0
    control_sent: int = 0
    control_received: int = 0
    session_frames_dropped: int = 0  # the lab's service is a separate program


class ServerAgent:
    def __init__(self, topology: Topology, name: str, run_dir: Path, seed: int) -> None:
        from manycast.pool import build

        self.loop = _Loop(run_dir, name, "server")
        nodes = build(topology, seed=seed, wall_base=time.time(), only={name})
        server = nodes.servers.get(name) or nodes.standby.get(name)
        if server is None:
            raise SystemExit(f"{name} is not a server of this topology")
        self.server: Server = server
        self.stats = AgentStats()
        self.pool = topology.pool
        self.iface, _ = topology.gateways[name]
        ifindex = socket.if_nametoindex(self.iface)
        self.igmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_IGMP)
        self.igmp.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
        self.igmp.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.iface.encode())
        self.igmp.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn("0.0.0.0", ifindex))
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.udp.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        self.udp.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn("0.0.0.0", ifindex))
        self.udp.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, CONTROL_TTL)
        self.udp.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        self.udp.bind(("0.0.0.0", self.pool.control_port))
        self.udp.setsockopt(
            socket.IPPROTO_IP,
            socket.IP_ADD_MEMBERSHIP,
            mreqn(str(self.pool.control_group), ifindex),
        )
        self.loop.watch(self.udp, self._on_udp)
        self.loop.watch(self.igmp, self._drain_igmp)
        self.loop.handlers.update(
            status=self._status, set_share=self._set_share, rebalance=self._rebalance
        )
        self.loop.handlers["owners"] = self._owners
        self.server.start(self.loop.now())
        self._after()

    def _drain_igmp(self) -> None:
        # The raw IGMP socket also sees the host's own IGMP traffic: nothing to do with it.
        with contextlib.suppress(BlockingIOError):
            while self.igmp.recv(65535):
                pass

    def _on_udp(self) -> None:
        port = self.pool.control_port
        while (got := _recv_pktinfo(self.udp)) is not None:
            data, (src, sport), _, dst = got
            self.stats.control_received += 1
            packet = _udp_packet(src, sport, dst, port, data)
            self.server.receive(self.iface, packet, self.loop.now())
        self._after()

    def _tick(self) -> None:
        now = self.loop.now()
        due = self.server.next_deadline()
        if due is not None and due <= now:
            self.server.on_timer(now)
        self._after()

    def _after(self) -> None:
        from manycast.wire.errors import WireError
        from manycast.wire.ip import IPPROTO_IGMP, IPPROTO_UDP, IPv4Packet, UDPDatagram

        for frame in self.server.take_frames():
            packet = frame.packet
            try:
                if packet[9] == IPPROTO_IGMP:
                    self.igmp.sendto(packet, (ALL_V3_ROUTERS, 0))
                    self.stats.reports_sent += 1
                elif packet[9] == IPPROTO_UDP:
                    ip = IPv4Packet.from_wire(packet)
                    udp = UDPDatagram.from_wire(ip.payload, ip.header.src, ip.header.dst)
                    self.udp.sendto(udp.payload, (str(ip.header.dst), udp.dst_port))
                    self.stats.control_sent += 1
                else:
                    self.stats.session_frames_dropped += 1
            except (OSError, WireError) as exc:
                log.warning("%s: cannot send a frame: %s", self.server.name, exc)

    def _status(self, _: dict[str, Any]) -> dict[str, Any]:
        now = self.loop.now()
        coordinator = self.server.coordinator
        allocation = coordinator.allocation
        portions = self.server.portions
        name = self.server.name
        return {
            "node": name,
            "pid": os.getpid(),
            "epoch": coordinator.epoch,
            "state": coordinator.state.name,
            "alive": coordinator.alive(now),
            "coordinator": coordinator.coordinator(now),
            "digest": coordinator.digest,
            "portions": str(portions) if portions is not None else "",
            "share": str(allocation.share(name))
            if allocation is not None and name in allocation.servers
            else "0",
            "shares": {s: str(f) for s, f in allocation.shares().items()} if allocation else {},
            "agent": asdict(self.stats),
        }

    def _owners(self, request: dict[str, Any]) -> dict[str, Any]:
        allocation = self.server.coordinator.allocation
        if allocation is None:
            return {"epoch": 0, "owners": {}}
        return {
            "epoch": self.server.coordinator.epoch,
            "owners": {a: allocation.owner(ipaddress.IPv4Address(a)) for a in request["addresses"]},
        }

    def _set_share(self, request: dict[str, Any]) -> dict[str, Any]:
        from manycast.wire import control

        op = control.SetShareOp(request["server"], Fraction(request["share"]))
        self.server.command(op, self.loop.now())
        self._after()
        return {"ok": True}

    def _rebalance(self, request: dict[str, Any]) -> dict[str, Any]:
        from manycast.wire import control

        self.server.command(control.RebalanceOp(float(request["target"]), ()), self.loop.now())
        self._after()
        return {"ok": True}

    def _deadline(self) -> float | None:
        return self.server.next_deadline()

    def run(self) -> None:
        self.loop.ready()
        try:
            self.loop.run(self._deadline, self._tick)
        finally:
            self.loop.close()


# -- the service -----------------------------------------------------------------------


@dataclass
class Responder:
    """A UDP counter on the group port: `<name> <n>` back to each datagram's sender."""

    name: str
    group: str
    port: int
    iface: str
    run_dir: Path
    counts: Counter[str] = field(default_factory=Counter)
    total: int = 0

    def run(self) -> None:
        loop = _Loop(self.run_dir, self.name, "service")
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind(("0.0.0.0", self.port))
        ifindex = socket.if_nametoindex(self.iface)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn(self.group, ifindex))
        name = self.name.encode()
        path = counts_path(self.run_dir, self.name)
        next_dump = [0.0]

        def readable() -> None:
            for _ in range(1024):
                try:
                    _, sender = sock.recvfrom(65535)
                except BlockingIOError:
                    break
                self.total += 1
                self.counts[sender[0]] += 1
                with contextlib.suppress(OSError):
                    sock.sendto(b"%s %d\n" % (name, self.total), sender)

        def tick() -> None:
            if loop.now() >= next_dump[0]:
                next_dump[0] = loop.now() + 0.5
                tmp = path.with_suffix(".tmp")
                body = {"server": self.name, "total": self.total, "sources": self.counts}
                tmp.write_text(json.dumps(body))
                os.replace(tmp, path)

        loop.handlers["status"] = lambda _: {"server": self.name, "total": self.total}
        loop.watch(sock, readable)
        loop.ready()
        try:
            loop.run(lambda: loop.now() + 0.5, tick)
        finally:
            tick()
            loop.close()


# -- entry point -----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m manycast.drivers.kernel")
    parser.add_argument("role", choices=("router", "server", "serve"))
    parser.add_argument("--node", required=True)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--netns", help="the network namespace to enter first")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--pin-idle", type=float, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s {args.role} {args.node}: %(message)s"
    )
    if args.netns:
        netns.enter(args.netns)
    from manycast.topology import load

    topology = load(args.run_dir / "topology.toml")
    if args.role == "router":
        RouterDaemon(topology, args.node, args.run_dir, args.seed, args.pin_idle).run()
    elif args.role == "server":
        ServerAgent(topology, args.node, args.run_dir, args.seed).run()
    else:
        iface, _ = topology.gateways[args.node]
        pool = topology.pool
        Responder(args.node, str(pool.group), pool.port, iface, args.run_dir).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
