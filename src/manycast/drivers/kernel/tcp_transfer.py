"""A connection's handover between servers: its state out and in, and the signed frames carrying it.

The movable TCP service (`tcp_service.py`) keeps each connection as a
`Connection`: the kernel socket, the service's app (`tcp_apps.py`) and the
output the app gave that the socket has not taken yet. `capture` makes a frozen
connection's `TcpState` (socket and service state, `wire/tcpstate.py`);
`import_connection` rebuilds the service's side from one. Between agents a
state travels in a `StateTransfer`, answered by a `TransferReply`, each one
length-prefixed frame on a TCP connection, Ed25519-signed with the pool key
over a SHA-256 of its bytes (`sign`, `verify`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import socket
import struct
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from manycast.drivers.kernel import tcp_hold, tcp_repair
from manycast.drivers.kernel.tcp_apps import APPS, AppStateError, ConnectionApp
from manycast.wire.tcpstate import SIGNATURE_BYTES, StateTransfer, TcpState, TransferReply, Window

MESSAGE_LIMIT = 256 << 20
SIGNING_CONTEXT = b"manycast tcp state transfer v1\0"
_LENGTH = struct.Struct("!I")
Flow = tcp_hold.Flow


def _signed_digest(signed: bytes) -> bytes:
    # Ed25519 over a SHA-256 of the bytes, not the bytes: a state carries its socket's
    # queues (up to megabytes), and Ed25519 hashes its message twice, with SHA-512.
    return SIGNING_CONTEXT + hashlib.sha256(signed).digest()


def sign(message: StateTransfer | TransferReply, key: Ed25519PrivateKey) -> bytes:
    """The message's wire bytes with its Ed25519 signature filled in."""
    signed = message.signed_bytes()
    return signed + bytes([SIGNATURE_BYTES]) + key.sign(_signed_digest(signed))


def verify(data: bytes, message: StateTransfer | TransferReply, key: Ed25519PublicKey) -> bool:
    """Whether `message`, decoded from `data`, carries the pool key's signature. The
    codec accepts only bytes it encodes identically, so the bytes before the signature
    are the signed bytes: no need to encode the message again."""
    if not message.signature:
        return False
    signed = data[: len(data) - 1 - len(message.signature)]
    try:
        key.verify(message.signature, _signed_digest(signed))
    except InvalidSignature:
        return False
    return True


def frame(data: bytes) -> bytes:
    return _LENGTH.pack(len(data)) + data


def read_frame(sock: socket.socket, limit: int = MESSAGE_LIMIT) -> bytes:
    """One length-prefixed message from a blocking socket (OSError on EOF or timeout)."""
    head = _read_exactly(sock, _LENGTH.size)
    (length,) = _LENGTH.unpack(head)
    if length > limit:
        raise OSError(f"a message of {length} bytes, at most {limit}")
    return _read_exactly(sock, length)


def _read_exactly(sock: socket.socket, length: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < length:
        chunk = sock.recv(min(length - len(chunks), 1 << 20))
        if not chunk:
            raise OSError(f"the peer closed after {len(chunks)} of {length} bytes")
        chunks += chunk
    return bytes(chunks)


@dataclass
class Connection:
    sock: socket.socket
    flow: Flow
    app: ConnectionApp | None = None
    pending: bytearray = field(default_factory=bytearray)
    writing: bool = False
    bytes_in: int = 0
    bytes_out: int = 0
    restored: TcpState | None = None  # moved in, not yet thawed
    window: Window | None = None  # its send window while frozen on the way out


_PENDING = struct.Struct("!I")


def export_connection(conn: Connection) -> tuple[str, bytes]:
    """(app name, state): what the framework holds (output not yet written) and the app's."""
    if conn.app is None:
        return "new", _PENDING.pack(len(conn.pending)) + bytes(conn.pending)
    return conn.app.name, _PENDING.pack(len(conn.pending)) + bytes(
        conn.pending
    ) + conn.app.export_state()


def capture(conn: Connection, window: Window, unsent: int | None = None) -> TcpState:
    """A frozen connection's state, its socket's and its service's. What the app can give
    again (its output not yet written, and the socket's bytes not yet sent) stays
    behind: the move carries the bytes in flight only. The app itself is untouched
    (the move may fail): a copy of it takes the bytes back."""
    state = tcp_repair.dump(conn.sock, window, unsent=unsent)
    app = conn.app
    if app is not None and (conn.pending or state.unsent):
        copy = APPS[app.name].import_state(app.export_state())
        if copy.take_back(len(conn.pending) + state.unsent):
            return dataclasses.replace(
                state,
                write_seq=(state.write_seq - state.unsent) & 0xFFFFFFFF,
                unsent=0,
                send_queue=state.send_queue[: len(state.send_queue) - state.unsent],
                app=app.name,
                app_state=_PENDING.pack(0) + copy.export_state(),
            )
    name, data = export_connection(conn)
    return dataclasses.replace(state, app=name, app_state=data)


def import_connection(state: TcpState) -> tuple[ConnectionApp | None, bytes]:
    data = state.app_state
    if len(data) < _PENDING.size:
        raise AppStateError("app state without its pending output")
    (length,) = _PENDING.unpack_from(data)
    pending = data[_PENDING.size : _PENDING.size + length]
    if len(pending) != length:
        raise AppStateError("pending output cut short")
    rest = data[_PENDING.size + length :]
    if state.app == "new":
        if rest:
            raise AppStateError("a new connection with app state")
        return None, pending
    kind = APPS.get(state.app)
    if kind is None:
        raise AppStateError(f"no app {state.app!r} here")
    return kind.import_state(rest), pending


__all__ = [
    "Connection",
    "capture",
    "export_connection",
    "frame",
    "import_connection",
    "read_frame",
    "sign",
    "verify",
]
