"""The lab's movable TCP service: one process per server, serving the VIP and moving connections.

It listens on the pool's address (the VIP and the service port, `tcp_apps.py`
for what it serves; a dual-stack pool's two, one of each family, each
connection staying in its own) and, as the server's agent for moves, on the
server's own address (`agent_port`). A move of some of its connections to another server
(`move`, asked by `tcp_move.TcpMover` once the edge holds the flows):

1. freeze each socket (`tcp_repair.freeze`), mute it (`tcp_hold.ServerGuard`:
   what it sends from now on is dropped), dump it with its app's state, and
   mark the flows gone (a late packet is dropped, never answered with a reset);
2. send them in one `StateTransfer`, signed with the pool key, to the new
   server's agent, and wait for its signed `TransferReply`;
3. commit (the transfer's nonce, on the same connection), wait for the new
   server's "resumed" (it has unmarked and thawed the sockets: the edge may
   release the held packets now), and close each restored socket silently
   (`tcp_repair.discard`: no FIN, no RST, no TIME_WAIT); a socket the new
   server refused, or all of them when it does not answer in time, is thawed
   and served here again, as if nothing happened.

The new server's agent checks the signature (an unsigned or badly signed
transfer is refused and counted), the issue time and the nonce (no replays),
restores the sockets still frozen, answers, and thaws them only once the old
server commits. If it dies before, or the old server gives up waiting, its
frozen sockets vanish silently and the old server keeps the connections: a
connection never lives on two servers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import selectors
import socket
import struct
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from manycast import auth
from manycast.drivers import netns
from manycast.drivers.kernel import tcp_hold, tcp_repair
from manycast.drivers.kernel.loop import KernelLoop
from manycast.drivers.kernel.tcp_apps import AppStateError, choose
from manycast.drivers.kernel.tcp_transfer import (
    Connection,
    capture,
    frame,
    import_connection,
    read_frame,
    sign,
    verify,
)
from manycast.wire.tcpstate import (
    NONCE_BYTES,
    StateTransfer,
    TcpState,
    TcpStateError,
    TransferReply,
)

log = logging.getLogger("manycast.kernel.tcp_service")

ROLE = "tcp_service"
PORT = 7100
AGENT_PORT = 7101
BACKLOG = 1024
TRANSFER_TIMEOUT_S = 2.0
FRESH_S = 30.0  # a transfer issued further than this from our clock is refused
READ_BYTES = 1 << 16
PENDING_LOW = 1 << 16  # ask a streaming app for more below this many pending bytes
SNDBUF = 128 << 10  # each connection's send buffer (the kernel doubles it): what a move carries
Flow = tcp_hold.Flow


@dataclass
class ServiceStats:
    accepted: int = 0
    closed: int = 0
    moved_out: int = 0
    moved_in: int = 0
    moves_aborted: int = 0  # connections that stayed here because their move failed
    transfers_sent: int = 0
    transfers_received: int = 0
    refused_unsigned: int = 0
    refused_bad_signature: int = 0
    refused_malformed: int = 0
    refused_stale: int = 0
    refused_replayed: int = 0
    refused_states: int = 0  # states of accepted transfers that could not be restored
    uncommitted: int = 0  # restored, but the old server did not commit: dropped silently
    lost: int = 0  # a failed move's connection that could not be restored here again
    resets: int = 0


class TcpService:
    """The service and move agent of one server (run inside its namespace)."""

    def __init__(
        self,
        name: str,
        vip: str | list[str],
        port: int,
        address: str,
        agent_port: int,
        run_dir: Path,
        key: Ed25519PrivateKey,
    ) -> None:
        self.name = name
        # Text as the sockets give addresses back (an IPv6 one compressed).
        self.vips = [str(ipaddress.ip_address(v)) for v in ([vip] if isinstance(vip, str) else vip)]
        self.port = port
        self.key = key
        self.public = key.public_key()
        self.stats = ServiceStats()
        self.conns: dict[Flow, Connection] = {}
        self._nonces: OrderedDict[bytes, None] = OrderedDict()
        self.refuse_next = False  # fault injection for tests: refuse the next transfer
        self.die_next = False  # ... or exit (frozen sockets and all) before answering it
        for vip_address in self.vips:
            tcp_hold.install(
                lambda: None,
                tcp_hold.server_rules(vip_address, port),
                tcp_hold.iptables_for(vip_address),
            )
        self.guard = tcp_hold.ServerGuard(self.vips, port)
        self.loop = KernelLoop(run_dir, name, ROLE)
        self.listeners = []
        for vip_address in self.vips:
            listener = socket.socket(tcp_hold.family_of(vip_address), socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((vip_address, port))
            listener.listen(BACKLOG)
            self.loop.watch(listener, partial(self._accept, listener))
            self.listeners.append(listener)
        self.agent = socket.socket(tcp_hold.family_of(address), socket.SOCK_STREAM)
        self.agent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.agent.bind((address, agent_port))
        _unpaced(self.agent)
        self.agent.listen(64)
        self.loop.watch(self.agent, self._on_agent)
        handlers = {
            "status": self._status,
            "move": self._move,
            "reset": self._reset,
            "refuse_next": self._set_fault,
            "die_next": self._set_fault,
        }
        self.loop.handlers.update(handlers)

    # -- serving ---------------------------------------------------------------------------
    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, address = listener.accept()
            except BlockingIOError:
                return
            _tune(sock)
            self.stats.accepted += 1
            self._adopt(Connection(sock, (address[0], address[1])))

    def _adopt(self, conn: Connection) -> None:
        stale = self.conns.get(conn.flow)
        if stale is not None:  # cannot happen while moves commit; never two sockets
            self._forget(stale)
            tcp_repair.discard(stale.sock)
        self.conns[conn.flow] = conn
        if conn.app is not None:
            conn.app.server = self.name
        self.loop.watch(conn.sock, partial(self._on_event, conn))
        self._flush(conn)

    def _forget(self, conn: Connection) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.loop.selector.unregister(conn.sock)
        if self.conns.get(conn.flow) is conn:
            del self.conns[conn.flow]

    def _close(self, conn: Connection) -> None:
        self._forget(conn)
        conn.sock.close()
        self.stats.closed += 1

    def _on_event(self, conn: Connection) -> None:
        try:
            self._serve(conn)
        except Exception:  # one connection's fault must not take the service down
            log.exception("connection %s failed", conn.flow)
            if conn.flow in self.conns:
                self._close(conn)

    def _serve(self, conn: Connection) -> None:
        for _ in range(16):
            try:
                data = conn.sock.recv(READ_BYTES)
            except BlockingIOError:
                break
            except OSError:
                self._close(conn)
                return
            if not data:
                self._flush(conn)
                self._close(conn)
                return
            conn.bytes_in += len(data)
            if conn.app is None:
                conn.app = choose(data)
                conn.app.server = self.name
                conn.app.configure(conn.sock)
            conn.pending += conn.app.received(data)
        self._flush(conn)

    def _flush(self, conn: Connection) -> None:
        app = conn.app
        while True:
            if app is not None and app.streaming and len(conn.pending) < PENDING_LOW:
                conn.pending += app.more(1 << 18)
            if not conn.pending:
                break
            try:
                sent = conn.sock.send(conn.pending)
            except BlockingIOError:
                break
            except OSError:
                self._close(conn)
                return
            conn.bytes_out += sent
            del conn.pending[:sent]
        if app is not None and app.closing and not conn.pending:
            self._close(conn)
            return
        writing = bool(conn.pending) or (app is not None and app.streaming)
        if writing != conn.writing and conn.flow in self.conns:
            conn.writing = writing
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0)
            self.loop.selector.modify(conn.sock, events, partial(self._on_event, conn))

    # -- moving out ------------------------------------------------------------------------
    def _move(self, request: dict[str, Any]) -> dict[str, Any]:
        """Move `flows` to the agent at `to` ([address, port]); what moved, what stayed."""
        began = time.perf_counter()
        flows = [(str(f[0]), int(f[1])) for f in request["flows"]]
        peer = (str(request["to"][0]), int(request["to"][1]))
        refused: dict[str, str] = {}
        frozen: list[Connection] = []
        states: list[TcpState] = []
        for flow in flows:
            conn = self.conns.get(flow)
            if conn is None:
                refused[_key(flow)] = "no such connection here"
                continue
            try:
                conn.window = tcp_repair.freeze(conn.sock)
                # From here on what the socket sends is dropped, and what it had not
                # sent by now counts as not sent (see `tcp_repair.dump`).
                self.guard.mute([flow])
                unsent = tcp_repair.unsent_now(conn.sock)
                states.append(capture(conn, conn.window, unsent))
            except tcp_repair.RepairError as exc:
                self._stay(conn, None)
                refused[_key(flow)] = str(exc)
                continue
            frozen.append(conn)
        self.guard.gone([conn.flow for conn in frozen])
        dumped = time.perf_counter()
        answers: tuple[str, ...] = ()
        if states:
            answers = self._transfer(peer, states)
        moved = []
        for conn, state, reason in zip(frozen, states, answers, strict=True):
            if reason:
                refused[_key(conn.flow)] = reason
                self._stay(conn, state)
            else:
                self._forget(conn)
                tcp_repair.discard(conn.sock)
                self.stats.moved_out += 1
                moved.append(list(conn.flow))
        done = time.perf_counter()
        return {
            "moved": moved,
            "refused": refused,
            "dump_ms": round((dumped - began) * 1e3, 3),
            "transfer_ms": round((done - dumped) * 1e3, 3),
            "bytes": sum(len(s.send_queue) + len(s.recv_queue) for s in states),
        }

    def _stay(self, conn: Connection, state: TcpState | None) -> None:
        """A connection whose move failed carries on here, restored afresh from its own
        `state` as the new server would have (reading the frozen socket's send queue
        may have marked it all sent, unsent or not: that socket is not to be trusted
        again), or, when it was not dumped, thawed."""
        self.stats.moves_aborted += 1
        if state is None:
            # Unmarked first: the window probe the thaw sends must not meet our drop.
            self.guard.back([conn.flow])
            if conn.window is not None:
                with contextlib.suppress(OSError):
                    tcp_repair.thaw(conn.sock, conn.window)
            conn.window = None
            self._flush(conn)
            return
        self._forget(conn)
        tcp_repair.discard(conn.sock)  # silent; the edge holds the flow meanwhile
        try:
            again = self._restore(state)
        except (tcp_repair.RepairError, AppStateError, OSError) as exc:
            log.warning("lost %s: cannot restore it here again: %s", conn.flow, exc)
            self.stats.lost += 1
            return
        self.guard.back([again.flow])
        self._resume(again)

    def _transfer(self, peer: tuple[str, int], states: list[TcpState]) -> tuple[str, ...]:
        """The new agent's answer per state; every state refused when there is none."""
        nonce = os.urandom(NONCE_BYTES)
        message = StateTransfer(self.name, nonce, _now_ms(), tuple(states))
        try:
            with socket.socket(tcp_hold.family_of(peer[0]), socket.SOCK_STREAM) as sock:
                _unpaced(sock)
                sock.settimeout(TRANSFER_TIMEOUT_S)
                sock.connect(peer)
                sock.sendall(frame(sign(message, self.key)))
                self.stats.transfers_sent += 1
                raw = read_frame(sock)
                reply = TransferReply.from_wire(raw)
                if not verify(raw, reply, self.public) or reply.nonce != nonce:
                    return ("the answer is not signed for this transfer",) * len(states)
                if len(reply.refused) != len(states):
                    return ("the answer does not match the transfer",) * len(states)
                if reply.restored:
                    # The commit: from now on the new server serves them, and ours go.
                    sock.sendall(frame(nonce))
                    # Once the new server has unmarked and thawed them (its "resumed"),
                    # the edge may release their packets: one that came before would
                    # meet a frozen socket, or a drop left from when the flow was there.
                    with contextlib.suppress(OSError):
                        read_frame(sock, NONCE_BYTES)
                return reply.refused
        except (OSError, TcpStateError) as exc:
            return (f"no answer from {peer[0]}: {exc}"[:64],) * len(states)

    # -- moving in -------------------------------------------------------------------------
    def _on_agent(self) -> None:
        try:
            sock, _ = self.agent.accept()
        except BlockingIOError:
            return
        with sock:
            sock.settimeout(TRANSFER_TIMEOUT_S)
            try:
                data = read_frame(sock)
            except OSError:
                self.stats.refused_malformed += 1
                return
            self.stats.transfers_received += 1
            restored, reply = self._receive(data)
            try:
                sock.sendall(frame(sign(reply, self.key)))
                committed = not restored or read_frame(sock, NONCE_BYTES) == reply.nonce
            except OSError:
                committed = False
            if not committed:
                # The old server keeps the connections (it gave up, or died): ours
                # vanish silently, still frozen.
                self.stats.uncommitted += len(restored)
                for conn in restored:
                    tcp_repair.discard(conn.sock)
                return
            # A flow that comes back finds its entry marked gone (from when it left):
            # unmark it before the thaw's window probe and the first data go out.
            self.guard.back([conn.flow for conn in restored])
            for conn in restored:
                self._resume(conn)
            self.stats.moved_in += len(restored)
            if restored:
                with contextlib.suppress(OSError):
                    sock.sendall(frame(reply.nonce))  # resumed: the edge may release

    def _receive(self, data: bytes) -> tuple[list[Connection], TransferReply]:
        try:
            transfer = StateTransfer.from_wire(data)
        except TcpStateError as exc:
            self.stats.refused_malformed += 1
            return [], self._reply(os.urandom(NONCE_BYTES), [f"malformed: {exc}"[:64]])
        count = len(transfer.states)
        refusal = self._check(data, transfer)
        if refusal:
            return [], self._reply(transfer.nonce, [refusal] * count)
        if self.die_next:
            os._exit(17)  # fault injection: the new server dies before it answers
        restored: list[Connection] = []
        reasons: list[str] = []
        for state in transfer.states:
            try:
                conn = self._restore(state)
            except (tcp_repair.RepairError, AppStateError, OSError) as exc:
                self.stats.refused_states += 1
                reasons.append(str(exc)[:64] or "cannot restore")
                continue
            restored.append(conn)
            reasons.append("")
        return restored, self._reply(transfer.nonce, reasons)

    def _check(self, data: bytes, transfer: StateTransfer) -> str:
        """Why a transfer is refused as a whole ("": it is not)."""
        if not transfer.signature:
            self.stats.refused_unsigned += 1
            return "unsigned"
        if not verify(data, transfer, self.public):
            self.stats.refused_bad_signature += 1
            return "bad signature"
        if abs(transfer.issued_ms - _now_ms()) > FRESH_S * 1000:
            self.stats.refused_stale += 1
            return "stale"
        if transfer.nonce in self._nonces:
            self.stats.refused_replayed += 1
            return "replayed"
        self._nonces[transfer.nonce] = None
        while len(self._nonces) > 100_000:
            self._nonces.popitem(last=False)
        if self.refuse_next:
            self.refuse_next = False
            return "refused by request"
        return ""

    def _restore(self, state: TcpState) -> Connection:
        if str(state.local[0]) not in self.vips or state.local[1] != self.port:
            raise tcp_repair.RepairError("not the pool's address")
        app, pending = import_connection(state)
        sock = tcp_repair.restore(state)
        flow = (str(state.remote[0]), state.remote[1])
        return Connection(sock, flow, app, bytearray(pending), restored=state)

    def _resume(self, conn: Connection) -> None:
        state, conn.restored = conn.restored, None
        try:
            tcp_repair.thaw(conn.sock)
            _tune(conn.sock)
            if conn.app is not None:
                conn.app.configure(conn.sock)
            if state is not None:
                # Written by the service, not yet sent by the old socket: it goes out
                # first, as the socket has room (never blocking the loop).
                conn.pending[:0] = tcp_repair.unsent(state)
        except OSError as exc:
            log.warning("cannot resume %s: %s", conn.flow, exc)
        self._adopt(conn)
        self._on_event(conn)  # data that waited in the receive queue

    def _reply(self, nonce: bytes, reasons: list[str]) -> TransferReply:
        return TransferReply(self.name, nonce, _now_ms(), tuple(reasons))

    # -- control ---------------------------------------------------------------------------
    def _status(self, _: dict[str, Any]) -> dict[str, Any]:
        return {
            "server": self.name,
            "pid": os.getpid(),
            "connections": [
                [c.flow[0], c.flow[1], c.app.name if c.app else "new", c.bytes_in, c.bytes_out]
                for c in self.conns.values()
            ],
            "stats": asdict(self.stats),
        }

    def _reset(self, request: dict[str, Any]) -> dict[str, Any]:
        """Abort connections with a reset (a benchmark's R1 baseline: reset and reconnect)."""
        done = 0
        for raw in request["flows"]:
            conn = self.conns.get((str(raw[0]), int(raw[1])))
            if conn is None:
                continue
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self._close(conn)
            self.stats.resets += 1
            done += 1
        return {"reset": done}

    def _set_fault(self, request: dict[str, Any]) -> dict[str, Any]:
        if request["op"] == "refuse_next":
            self.refuse_next = True
        else:
            self.die_next = True
        return {"armed": request["op"]}

    def run(self) -> None:
        self.loop.ready()
        try:
            self.loop.run_until(float("inf"))
        finally:
            for conn in list(self.conns.values()):
                self._close(conn)
            for listener in self.listeners:
                listener.close()
            self.agent.close()
            self.guard.close()
            self.loop.close()


def _tune(sock: socket.socket) -> None:
    # A bounded send buffer bounds what a move carries; no Nagle: echo lines go at once.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _unpaced(sock: socket.socket) -> None:
    """A transfer's connection sends at once: a new connection under a pacing congestion
    control (BBR, where it is the default) would spread a 250 kB state over ~6 ms."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"cubic")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _key(flow: Flow) -> str:
    return f"{flow[0]}:{flow[1]}"


def _now_ms() -> int:
    return int(time.time() * 1000)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--name", required=True)
    parser.add_argument(
        "--vip", required=True, action="append", help="the pool's address (one per family)"
    )
    parser.add_argument("--port", type=int, default=PORT)
    parser.add_argument("--address", required=True, help="the server's own address (agent)")
    parser.add_argument("--agent-port", type=int, default=AGENT_PORT)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True, help="the pool's private key (PEM)")
    parser.add_argument("--netns", help="enter this network namespace first")
    args = parser.parse_args(argv)
    if args.netns:
        netns.enter(args.netns)
    logging.basicConfig(level=logging.WARNING, format=f"{args.name} %(levelname)s %(message)s")
    for vip in args.vip:
        ipaddress.ip_address(vip)
    service = TcpService(
        args.name,
        args.vip,
        args.port,
        args.address,
        args.agent_port,
        args.run_dir,
        auth.load_private(args.key),
    )
    service.run()


if __name__ == "__main__":
    main()
