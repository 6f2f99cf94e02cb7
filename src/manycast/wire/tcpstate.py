"""The kernel TCP state format ("MCK1"): a live Linux TCP socket frozen with TCP_REPAIR, moved.

The lab moves a real kernel connection from one server to another
(`drivers/kernel/tcp_repair.py` dumps and restores it): `TcpState` is what the
kernel's repair interface gives out and takes back, plus the service's own
per-connection state (`app`, `app_state`, opaque here). `StateTransfer` carries
one or more of them from the old server's agent to the new one, signed with the
pool key; `TransferReply` answers, one result per state, signed too.

Layout of a state, big-endian:

    magic "MCK1" (the 1 is the format version)
    u8 flags: 1 SACK, 2 timestamps, 4 window scaling; the rest zero
    local address, remote address: u8 length (4|16), address, u16 port
    u32 write_seq, u32 unsent, u32 length + send queue
    u32 rcv_nxt, u32 length + receive queue
    u16 mss, u8 snd_wscale, u8 rcv_wscale, u32 timestamp
    u32 snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup (TCP_REPAIR_WINDOW)
    u8 length + app name (ASCII), u32 length + app state

A transfer: magic "MCKT", u8 length + sender, 16-byte nonce, u64 issued (ms
since the Unix epoch), u16 count, per state u32 length + state; then u8
signature length (0 or 64) + signature. A reply: magic "MCKR", sender, nonce
(the transfer's), issued, u16 count, per state u8 length + refusal ("" when
restored), then the signature. The signature covers every byte before it.

Sequence numbers are the kernel's 32-bit ones, compared modulo 2**32 as the
kernel does when it takes them back. Strict as every codec: fields that do not
fit each other or the kernel's checks, and bytes that do not re-encode
identically, raise `TcpStateError`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from manycast.wire.cursor import Reader, Writer
from manycast.wire.errors import WireError

MAGIC = b"MCK1"
TRANSFER_MAGIC = b"MCKT"
REPLY_MAGIC = b"MCKR"
NONCE_BYTES = 16
SIGNATURE_BYTES = 64  # Ed25519
QUEUE_LIMIT = 64 << 20  # bytes of one queue; a kernel's queues stay far below
APP_STATE_LIMIT = 16 << 20
MAX_WSCALE = 14  # RFC 7323
NAME_LIMIT = 64

_U16 = 0xFFFF
_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1
_SACK, _TIMESTAMPS, _WSCALE = 1, 2, 4

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class TcpStateError(WireError):
    """A TCP state, transfer or reply that does not decode, or fields that do not fit."""


def _fail(what: str, problem: str) -> TcpStateError:
    return TcpStateError(f"{what}: {problem}")


def _uint(what: str, name: str, value: object, top: int, low: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(what, f"{name} must be an int, not {type(value).__name__}")
    if not low <= value <= top:
        raise _fail(what, f"{name} {value} out of range {low}..{top}")


def _blob(what: str, name: str, value: object, top: int) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise _fail(what, f"{name} must be bytes, not {type(value).__name__}")
    if len(value) > top:
        raise _fail(what, f"{name} of {len(value)} bytes, at most {top}")
    return bytes(value)


def _name(what: str, label: str, value: object, low: int = 1) -> None:
    if not isinstance(value, str) or not low <= len(value) <= NAME_LIMIT:
        raise _fail(what, f"{label} must be {low}..{NAME_LIMIT} characters, not {value!r}")
    if not value.isascii() or not value.isprintable():
        raise _fail(what, f"{label} {value!r} is not printable ASCII")


def _socket(what: str, name: str, value: object) -> None:
    if not (
        isinstance(value, tuple)
        and len(value) == 2
        and isinstance(value[0], ipaddress.IPv4Address | ipaddress.IPv6Address)
    ):
        raise _fail(what, f"{name} must be an (address, port) pair, not {value!r}")
    _uint(what, f"{name} port", value[1], _U16)


def _after(a: int, b: int) -> bool:
    """Sequence number `a` is after `b` (the kernel's `after()`, modulo 2**32)."""
    return 0 < (a - b) & _U32 < 1 << 31


def _write_socket(w: Writer, value: tuple[IPAddress, int]) -> None:
    w.u8(len(value[0].packed)).bytes(value[0].packed).u16(value[1])


def _read_socket(r: Reader, what: str, name: str) -> tuple[IPAddress, int]:
    length = r.u8(f"{name} address length")
    if length not in (4, 16):
        raise _fail(what, f"{name} address of {length} bytes")
    raw = r.bytes(length, f"{name} address")
    ip: IPAddress = ipaddress.IPv4Address(raw) if length == 4 else ipaddress.IPv6Address(raw)
    return ip, r.u16(f"{name} port")


def _read_name(r: Reader, what: str, label: str, low: int = 1) -> str:
    raw = r.bytes(r.u8(f"{label} length"), label)
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise _fail(what, f"{label} is not ASCII") from None
    _name(what, label, text, low)
    return text


@dataclass(frozen=True, slots=True)
class Window:
    """TCP_REPAIR_WINDOW: what the socket knows of both windows."""

    snd_wl1: int
    snd_wnd: int
    max_window: int
    rcv_wnd: int
    rcv_wup: int

    def __post_init__(self) -> None:
        for name in ("snd_wl1", "snd_wnd", "max_window", "rcv_wnd", "rcv_wup"):
            _uint("tcp window", name, getattr(self, name), _U32)


@dataclass(frozen=True, slots=True)
class TcpState:
    """One established kernel TCP connection, as TCP_REPAIR reads it.

    `write_seq` is the sequence number after the last byte of `send_queue` (the
    data not yet acknowledged, the last `unsent` bytes of it not yet sent);
    `rcv_nxt` the one after the last byte of `recv_queue` (received, not yet read
    by the service). `wscale` is (ours to send with, the peer's) or None without
    window scaling; `timestamp` the socket's TCP timestamp clock when dumped."""

    local: tuple[IPAddress, int]
    remote: tuple[IPAddress, int]
    write_seq: int
    unsent: int
    send_queue: bytes
    rcv_nxt: int
    recv_queue: bytes
    mss: int
    window: Window
    sack: bool = True
    timestamps: bool = True
    wscale: tuple[int, int] | None = (7, 7)
    timestamp: int = 0
    app: str = "none"
    app_state: bytes = b""

    def __post_init__(self) -> None:
        what = "tcp state"
        _socket(what, "local", self.local)
        _socket(what, "remote", self.remote)
        if self.local[0].version != self.remote[0].version:
            raise _fail(what, "local and remote addresses of different IP versions")
        _uint(what, "write_seq", self.write_seq, _U32)
        _uint(what, "rcv_nxt", self.rcv_nxt, _U32)
        send = _blob(what, "send queue", self.send_queue, QUEUE_LIMIT)
        object.__setattr__(self, "send_queue", send)
        object.__setattr__(
            self, "recv_queue", _blob(what, "receive queue", self.recv_queue, QUEUE_LIMIT)
        )
        _uint(what, "unsent", self.unsent, len(send))
        _uint(what, "mss", self.mss, _U16, low=1)
        if not isinstance(self.window, Window):
            raise _fail(what, f"window must be a Window, not {self.window!r}")
        for name in ("sack", "timestamps"):
            if not isinstance(getattr(self, name), bool):
                raise _fail(what, f"{name} must be a bool")
        if self.wscale is not None:
            if not (isinstance(self.wscale, tuple) and len(self.wscale) == 2):
                raise _fail(what, f"wscale must be a (send, receive) pair, not {self.wscale!r}")
            _uint(what, "send window scale", self.wscale[0], MAX_WSCALE)
            _uint(what, "receive window scale", self.wscale[1], MAX_WSCALE)
        _uint(what, "timestamp", self.timestamp, _U32)
        if not self.timestamps and self.timestamp:
            raise _fail(what, "a timestamp clock without timestamps")
        # The kernel's own checks when the window is set back (tcp_repair_set_window).
        window = self.window
        if _after(window.snd_wl1, (self.rcv_nxt + window.rcv_wnd) & _U32):
            raise _fail(what, "snd_wl1 after the receive window's end")
        if _after(window.rcv_wup, self.rcv_nxt):
            raise _fail(what, "rcv_wup after rcv_nxt")
        _name(what, "app name", self.app)
        object.__setattr__(
            self, "app_state", _blob(what, "app state", self.app_state, APP_STATE_LIMIT)
        )

    @property
    def snd_una(self) -> int:
        """The sequence number of the first unacknowledged byte."""
        return (self.write_seq - len(self.send_queue)) & _U32

    @property
    def snd_nxt(self) -> int:
        """The sequence number after the last byte sent."""
        return (self.write_seq - self.unsent) & _U32

    def to_wire(self) -> bytes:
        flags = (
            (_SACK if self.sack else 0)
            | (_TIMESTAMPS if self.timestamps else 0)
            | (_WSCALE if self.wscale is not None else 0)
        )
        w = Writer().bytes(MAGIC).u8(flags)
        _write_socket(w, self.local)
        _write_socket(w, self.remote)
        w.u32(self.write_seq).u32(self.unsent)
        w.u32(len(self.send_queue)).bytes(self.send_queue)
        w.u32(self.rcv_nxt).u32(len(self.recv_queue)).bytes(self.recv_queue)
        snd_wscale, rcv_wscale = self.wscale or (0, 0)
        w.u16(self.mss).u8(snd_wscale).u8(rcv_wscale).u32(self.timestamp)
        window = self.window
        for value in (window.snd_wl1, window.snd_wnd, window.max_window):
            w.u32(value)
        w.u32(window.rcv_wnd).u32(window.rcv_wup)
        app = self.app.encode("ascii")
        w.u8(len(app)).bytes(app).u32(len(self.app_state)).bytes(self.app_state)
        return w.getvalue()

    @classmethod
    def from_wire(cls, data: bytes | bytearray | memoryview) -> TcpState:
        what = "tcp state"
        r = Reader(data, what)
        try:
            return cls._read(r, what)
        except TcpStateError:
            raise
        except WireError as exc:  # the cursor's truncation errors, under our own name
            raise TcpStateError(str(exc)) from None

    @classmethod
    def _read(cls, r: Reader, what: str) -> TcpState:
        if r.bytes(len(MAGIC), "magic") != MAGIC:
            raise _fail(what, "bad magic or unsupported version")
        flags = r.u8("flags")
        if flags & ~(_SACK | _TIMESTAMPS | _WSCALE):
            raise _fail(what, f"unknown flags {flags:#x}")
        local = _read_socket(r, what, "local")
        remote = _read_socket(r, what, "remote")
        write_seq, unsent = r.u32("write_seq"), r.u32("unsent")
        send_queue = r.bytes(_queue_length(r, what, "send queue"), "send queue")
        rcv_nxt = r.u32("rcv_nxt")
        recv_queue = r.bytes(_queue_length(r, what, "receive queue"), "receive queue")
        mss, snd_wscale, rcv_wscale = r.u16("mss"), r.u8("snd_wscale"), r.u8("rcv_wscale")
        timestamp = r.u32("timestamp")
        if not flags & _WSCALE and (snd_wscale or rcv_wscale):
            raise _fail(what, "window scales without window scaling")
        window = Window(
            *(r.u32(name) for name in ("snd_wl1", "snd_wnd", "max_window", "rcv_wnd", "rcv_wup"))
        )
        app = _read_name(r, what, "app name")
        length = r.u32("app state length")
        if length > APP_STATE_LIMIT:
            raise _fail(what, f"app state of {length} bytes, at most {APP_STATE_LIMIT}")
        app_state = r.bytes(length, "app state")
        r.expect_end()
        return cls(
            local=local,
            remote=remote,
            write_seq=write_seq,
            unsent=unsent,
            send_queue=send_queue,
            rcv_nxt=rcv_nxt,
            recv_queue=recv_queue,
            mss=mss,
            window=window,
            sack=bool(flags & _SACK),
            timestamps=bool(flags & _TIMESTAMPS),
            wscale=(snd_wscale, rcv_wscale) if flags & _WSCALE else None,
            timestamp=timestamp,
            app=app,
            app_state=app_state,
        )


def _queue_length(r: Reader, what: str, name: str) -> int:
    length = r.u32(f"{name} length")
    if length > QUEUE_LIMIT:
        raise _fail(what, f"{name} of {length} bytes, at most {QUEUE_LIMIT}")
    return length


def _check_envelope(
    what: str, sender: object, nonce: object, issued_ms: object, signature: object
) -> None:
    _name(what, "sender", sender)
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
        raise _fail(what, f"nonce must be {NONCE_BYTES} bytes")
    _uint(what, "issued", issued_ms, _U64)
    if not isinstance(signature, bytes) or len(signature) not in (0, SIGNATURE_BYTES):
        raise _fail(what, f"signature must be empty or {SIGNATURE_BYTES} bytes")


def _write_envelope(magic: bytes, sender: str, nonce: bytes, issued_ms: int) -> Writer:
    name = sender.encode("ascii")
    return Writer().bytes(magic).u8(len(name)).bytes(name).bytes(nonce).u64(issued_ms)


def _read_signature(r: Reader, what: str) -> bytes:
    length = r.u8("signature length")
    if length not in (0, SIGNATURE_BYTES):
        raise _fail(what, f"signature of {length} bytes")
    signature = r.bytes(length, "signature")
    r.expect_end()
    return signature


@dataclass(frozen=True, slots=True)
class StateTransfer:
    """The old server's agent to the new one: restore these connections (signed)."""

    sender: str
    nonce: bytes
    issued_ms: int
    states: tuple[TcpState, ...]
    signature: bytes = field(default=b"", compare=False)

    def __post_init__(self) -> None:
        what = "state transfer"
        _check_envelope(what, self.sender, self.nonce, self.issued_ms, self.signature)
        states: object = self.states
        if not isinstance(states, tuple | list) or not 1 <= len(states) <= _U16:
            raise _fail(what, f"1..{_U16} states, not {states!r:.60}")
        for state in states:
            if not isinstance(state, TcpState):
                raise _fail(what, f"a state must be a TcpState, not {type(state).__name__}")
        object.__setattr__(self, "states", tuple(states))

    def signed_bytes(self) -> bytes:
        w = _write_envelope(TRANSFER_MAGIC, self.sender, self.nonce, self.issued_ms)
        w.u16(len(self.states))
        for state in self.states:
            raw = state.to_wire()
            w.u32(len(raw)).bytes(raw)
        return w.getvalue()

    def to_wire(self) -> bytes:
        return self.signed_bytes() + bytes([len(self.signature)]) + self.signature

    @classmethod
    def from_wire(cls, data: bytes | bytearray | memoryview) -> StateTransfer:
        what = "state transfer"
        r = Reader(data, what)
        try:
            if r.bytes(len(TRANSFER_MAGIC), "magic") != TRANSFER_MAGIC:
                raise _fail(what, "bad magic or unsupported version")
            sender = _read_name(r, what, "sender")
            nonce, issued = r.bytes(NONCE_BYTES, "nonce"), r.u64("issued")
            count = r.u16("state count")
            states = tuple(
                TcpState.from_wire(r.bytes(r.u32(f"state {i} length"), f"state {i}"))
                for i in range(count)
            )
            signature = _read_signature(r, what)
            return cls(sender, nonce, issued, states, signature)
        except TcpStateError:
            raise
        except WireError as exc:
            raise TcpStateError(str(exc)) from None


@dataclass(frozen=True, slots=True)
class TransferReply:
    """The new server's agent's answer: per state, "" (restored) or why it refused it."""

    sender: str
    nonce: bytes
    issued_ms: int
    refused: tuple[str, ...]
    signature: bytes = field(default=b"", compare=False)

    def __post_init__(self) -> None:
        what = "transfer reply"
        _check_envelope(what, self.sender, self.nonce, self.issued_ms, self.signature)
        refused: object = self.refused
        if not isinstance(refused, tuple | list) or len(refused) > _U16:
            raise _fail(what, "refusals must be a sequence of at most 65535 strings")
        for reason in refused:
            if reason:
                _name(what, "refusal", reason)
            elif not isinstance(reason, str):
                raise _fail(what, f"a refusal must be a str, not {type(reason).__name__}")
        object.__setattr__(self, "refused", tuple(refused))

    @property
    def restored(self) -> int:
        return sum(1 for reason in self.refused if not reason)

    def signed_bytes(self) -> bytes:
        w = _write_envelope(REPLY_MAGIC, self.sender, self.nonce, self.issued_ms)
        w.u16(len(self.refused))
        for reason in self.refused:
            raw = reason.encode("ascii")
            w.u8(len(raw)).bytes(raw)
        return w.getvalue()

    def to_wire(self) -> bytes:
        return self.signed_bytes() + bytes([len(self.signature)]) + self.signature

    @classmethod
    def from_wire(cls, data: bytes | bytearray | memoryview) -> TransferReply:
        what = "transfer reply"
        r = Reader(data, what)
        try:
            if r.bytes(len(REPLY_MAGIC), "magic") != REPLY_MAGIC:
                raise _fail(what, "bad magic or unsupported version")
            sender = _read_name(r, what, "sender")
            nonce, issued = r.bytes(NONCE_BYTES, "nonce"), r.u64("issued")
            refused = tuple(
                _read_name(r, what, f"refusal {i}", low=0) for i in range(r.u16("count"))
            )
            signature = _read_signature(r, what)
            return cls(sender, nonce, issued, refused, signature)
        except TcpStateError:
            raise
        except WireError as exc:
            raise TcpStateError(str(exc)) from None


__all__ = [
    "MAGIC",
    "NONCE_BYTES",
    "SIGNATURE_BYTES",
    "StateTransfer",
    "TcpState",
    "TcpStateError",
    "TransferReply",
    "Window",
]
