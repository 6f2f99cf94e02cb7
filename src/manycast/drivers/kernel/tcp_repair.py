"""Freezing a live kernel TCP socket, dumping it, restoring it elsewhere (TCP_REPAIR, as CRIU).

A socket in repair mode is frozen: it sends nothing on its own, closing it
sends no FIN nor RST (`tcp_disconnect` is silent in repair mode), and its
sequence numbers, queues, options and windows can be read (`dump`) and set on
a new socket (`restore`), which `connect()` then puts straight into
ESTABLISHED without a handshake. Taking the new socket out of repair mode
(`thaw`) makes the kernel send a window probe, so the peer answers at once
with its current ACK and window instead of the new socket waiting for a
retransmission timeout.

What is moved: the send queue (sent and unacknowledged, then not yet sent:
only the sent part goes back in repair mode, the rest is written normally
after `thaw`, so it is sent and not taken for sent), the receive queue (data
the service has not read), `write_seq` / `rcv_nxt`, MSS, window scaling,
SACK, timestamps (the TCP timestamp clock carries on from where the old
socket was: both sockets must see the same clock, as namespaces of one host
do; between hosts the offset moves with it), and TCP_REPAIR_WINDOW. Not
moved: congestion state and RTT estimates (the new socket starts them
afresh), out-of-order data (the peer sends it again), urgent data. Only an
ESTABLISHED socket moves; anything else is refused with `RepairError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import ipaddress
import socket
import struct

from manycast.errors import DriverError
from manycast.wire.tcpstate import TcpState, Window

SOL_TCP = socket.IPPROTO_TCP
TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_REPAIR_OPTIONS = 22
TCP_TIMESTAMP = 24
TCP_REPAIR_WINDOW = 29
TCP_REPAIR_ON, TCP_REPAIR_OFF = 1, 0
TCP_NO_QUEUE, TCP_RECV_QUEUE, TCP_SEND_QUEUE = 0, 1, 2
TCPOPT_MAXSEG, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE = 1, 2, 4
SIOCINQ, SIOCOUTQ, SIOCOUTQNSD = 0x541B, 0x5411, 0x894B
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
TCP_ESTABLISHED = 1
TCP_INFO_BYTES = 104
_WINDOW = struct.Struct("=5I")
_CHUNK = 1 << 16  # bytes per repair-mode write (one skb each; the kernel splits by MSS)


class RepairError(DriverError):
    """A socket that cannot be frozen, dumped or restored (the message says which step)."""


def _u32(sock: socket.socket, option: int) -> int:
    value: int = struct.unpack("=I", sock.getsockopt(SOL_TCP, option, 4))[0]
    return value


def _ioctl(sock: socket.socket, request: int) -> int:
    value: int = struct.unpack("=i", fcntl.ioctl(sock.fileno(), request, b"\0" * 4))[0]
    return value


def tcp_info(sock: socket.socket) -> bytes:
    return sock.getsockopt(SOL_TCP, socket.TCP_INFO, TCP_INFO_BYTES)


def rtt_us(sock: socket.socket) -> int:
    """The kernel's smoothed round-trip time of `sock` (tcpi_rtt), in microseconds."""
    value: int = struct.unpack_from("=I", tcp_info(sock), 68)[0]
    return value


def is_established(sock: socket.socket) -> bool:
    try:
        return tcp_info(sock)[0] == TCP_ESTABLISHED
    except OSError:
        return False


def _window(sock: socket.socket) -> Window:
    return Window(*_WINDOW.unpack(sock.getsockopt(SOL_TCP, TCP_REPAIR_WINDOW, _WINDOW.size)))


def _set_window(sock: socket.socket, window: Window) -> None:
    packed = _WINDOW.pack(
        window.snd_wl1, window.snd_wnd, window.max_window, window.rcv_wnd, window.rcv_wup
    )
    sock.setsockopt(SOL_TCP, TCP_REPAIR_WINDOW, packed)


def freeze(sock: socket.socket) -> Window:
    """Put `sock` in repair mode and close its send window; the window it had.

    Repair mode alone does not stop a socket: its pacing timer or a deferred
    transmission still sends queued data (when the syscall that holds the socket
    releases it), so a dump could take for unsent what the peer already has.
    With the window shut the socket sends no new data; what it sent before is
    in the dump as sent. `dump` carries the real window, `thaw` puts it back."""
    if not is_established(sock):
        raise RepairError("only an established connection can be moved")
    try:
        sock.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_ON)
        window = _window(sock)
        _set_window(sock, dataclasses.replace(window, snd_wnd=0))
    except OSError as exc:
        raise RepairError(
            f"cannot freeze the socket (TCP_REPAIR needs CAP_NET_ADMIN): {exc}"
        ) from None
    return window


def thaw(sock: socket.socket, window: Window | None = None) -> None:
    """Take `sock` out of repair mode (with its send `window` back, if `freeze` shut
    it); the kernel sends a window probe at once."""
    if window is not None:
        _set_window(sock, window)
    sock.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
    sock.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_OFF)
    # Leaving repair mode clears the forced address reuse; without reuse this socket
    # would keep a restarted service's listener (SO_REUSEADDR) off the address.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)


def discard(sock: socket.socket) -> None:
    """Close a frozen socket: in repair mode the kernel drops it without a FIN or RST,
    and it leaves no TIME_WAIT behind."""
    with contextlib.suppress(OSError):
        sock.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_ON)
    sock.close()


def _peek(sock: socket.socket, queue: int, length: int) -> bytes:
    sock.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, queue)
    data = b""
    if length:
        # MSG_PEEK of the selected queue, in repair mode: the whole queue at once.
        data = sock.recv(length, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    if len(data) != length:
        raise RepairError(f"queue {queue}: read {len(data)} of {length} bytes")
    return data


def unsent_now(sock: socket.socket) -> int:
    """Bytes of the frozen socket's send queue not sent yet, read without selecting a
    repair queue (see `dump`)."""
    try:
        return _ioctl(sock, SIOCOUTQNSD)
    except OSError as exc:
        raise RepairError(f"cannot read the socket's send queue: {exc}") from None


def dump(
    sock: socket.socket,
    window: Window,
    app: str = "none",
    app_state: bytes = b"",
    unsent: int | None = None,
) -> TcpState:
    """The state of the socket `sock`, frozen by `freeze` (which gave `window`), with
    the service's own `app_state`.

    Reading the send queue selects it (TCP_REPAIR_QUEUE), and while it is selected
    the kernel marks as sent, without sending it, whatever the socket would send
    (a pacing timer, an ACK that comes in): its snd_nxt runs ahead of what the
    peer got. So the count of bytes not yet sent is read before (`unsent_now`,
    best just after the caller starts dropping what the socket sends) and given
    here; the socket itself is not to be thawed again after a dump (restore a new
    one from the dump instead). Without `unsent` the dump reads it itself, after
    the queue was selected."""
    try:
        info = tcp_info(sock)
        if info[0] != TCP_ESTABLISHED:
            raise RepairError(f"socket in TCP state {info[0]}, not established")
        local = sock.getsockname()[:2]
        remote = sock.getpeername()[:2]
        sock.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        write_seq = _u32(sock, TCP_QUEUE_SEQ)
        outq = _ioctl(sock, SIOCOUTQ)
        unsent = min(outq, _ioctl(sock, SIOCOUTQNSD) if unsent is None else unsent)
        send_queue = _peek(sock, TCP_SEND_QUEUE, outq)
        sock.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
        rcv_nxt = _u32(sock, TCP_QUEUE_SEQ)
        recv_queue = _peek(sock, TCP_RECV_QUEUE, _ioctl(sock, SIOCINQ))
        sock.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
        mss = _u32(sock, socket.TCP_MAXSEG)  # in repair mode: the clamp the peer allowed
        # Freeze shut the send window; an ACK since may have opened it again, with the
        # peer's newer window.
        now = _window(sock)
        window = dataclasses.replace(now, snd_wnd=now.snd_wnd or window.snd_wnd)
        options, scales = info[5], info[6]
        timestamps = bool(options & TCPI_OPT_TIMESTAMPS)
        timestamp = _u32(sock, TCP_TIMESTAMP) if timestamps else 0
    except OSError as exc:
        raise RepairError(f"cannot dump the socket: {exc}") from None
    return TcpState(
        local=(ipaddress.ip_address(local[0]), local[1]),
        remote=(ipaddress.ip_address(remote[0]), remote[1]),
        write_seq=write_seq,
        unsent=unsent,
        send_queue=send_queue,
        rcv_nxt=rcv_nxt,
        recv_queue=recv_queue,
        mss=mss,
        window=window,
        sack=bool(options & TCPI_OPT_SACK),
        timestamps=timestamps,
        wscale=(scales & 0xF, scales >> 4) if options & TCPI_OPT_WSCALE else None,
        timestamp=timestamp,
        app=app,
        app_state=app_state,
    )


def _fill(sock: socket.socket, queue: int, data: bytes) -> None:
    sock.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, queue)
    view = memoryview(data)
    while view:
        sent = sock.send(view[:_CHUNK])
        if sent <= 0:
            raise RepairError(f"queue {queue}: the kernel took no more data")
        view = view[sent:]


def _buffers(sock: socket.socket, state: TcpState) -> None:
    """Room for the queues: a new socket's buffers start small (autotuning grows them
    later), and a repair-mode write beyond them fails."""
    for option, force, need in (
        (socket.SO_SNDBUF, SO_SNDBUFFORCE, len(state.send_queue)),
        (socket.SO_RCVBUF, SO_RCVBUFFORCE, len(state.recv_queue)),
    ):
        wanted = need + (64 << 10)  # the kernel doubles it: room for the skbs' overhead
        if need and sock.getsockopt(socket.SOL_SOCKET, option) < 2 * wanted:
            sock.setsockopt(socket.SOL_SOCKET, force, wanted)


def restore(state: TcpState) -> socket.socket:
    """A new socket in the calling thread's namespace, bound to `state.local` (the
    listener there may hold the same address: repair mode forces the bind) and
    ESTABLISHED to `state.remote`, still frozen: `thaw` it, then write `unsent(state)`."""
    family = socket.AF_INET if state.local[0].version == 4 else socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_ON)
        _buffers(sock, state)
        sock.bind((str(state.local[0]), state.local[1]))
        sock.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
        sock.setsockopt(SOL_TCP, TCP_QUEUE_SEQ, _seq(state.rcv_nxt - len(state.recv_queue)))
        sock.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        sock.setsockopt(SOL_TCP, TCP_QUEUE_SEQ, _seq(state.snd_una))
        # The MSS before connect: connect computes the segment size from it once, and
        # TCP_REPAIR_OPTIONS after it would only raise the clamp (536 bytes stay).
        sock.setsockopt(SOL_TCP, socket.TCP_MAXSEG, state.mss)
        sock.connect((str(state.remote[0]), state.remote[1]))
        options = [(TCPOPT_MAXSEG, state.mss)]
        if state.sack:
            options.append((TCPOPT_SACK_PERM, 0))
        if state.wscale is not None:
            options.append((TCPOPT_WINDOW, state.wscale[0] | state.wscale[1] << 16))
        if state.timestamps:
            options.append((TCPOPT_TIMESTAMP, 0))
        packed = b"".join(struct.pack("=II", code, value) for code, value in options)
        sock.setsockopt(SOL_TCP, TCP_REPAIR_OPTIONS, packed)
        if state.timestamps:
            sock.setsockopt(SOL_TCP, TCP_TIMESTAMP, struct.pack("=I", state.timestamp))
        _fill(sock, TCP_RECV_QUEUE, state.recv_queue)
        _set_window(sock, state.window)
        sent = len(state.send_queue) - state.unsent
        _fill(sock, TCP_SEND_QUEUE, state.send_queue[:sent])
        sock.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
    except OSError as exc:
        discard(sock)
        raise RepairError(f"cannot restore {_flow(state)}: {exc}") from None
    return sock


def unsent(state: TcpState) -> bytes:
    """The part of the send queue the old socket had not sent yet: the caller writes it
    to the new socket after `thaw`, before anything else, as the service would have."""
    return state.send_queue[len(state.send_queue) - state.unsent :] if state.unsent else b""


def _seq(value: int) -> int:
    """A sequence number as setsockopt takes it (a C int)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _flow(state: TcpState) -> str:
    return f"{state.remote[0]}:{state.remote[1]} -> {state.local[0]}:{state.local[1]}"


__all__ = [
    "RepairError",
    "discard",
    "dump",
    "freeze",
    "is_established",
    "restore",
    "rtt_us",
    "tcp_info",
    "thaw",
    "unsent",
    "unsent_now",
]
