"""The lab TCP service's per-connection state hook, and its two services: a line counter and HTTP.

A connection that moves between servers carries its kernel socket
(`tcp_repair.py`) and its service's state with it. A service plugs in as a
`ConnectionApp`: the framework (`tcp_service.py`) owns the socket and hands the
app the bytes it received; the app answers with bytes to send, and may offer
more when the socket has room (a stream). To move, the app says what it is in
bytes (`export_state`), and the new server's framework rebuilds it from them
(`APPS[name].import_state`) and lets it set the new socket up (`configure`).
An app that can give its output again (a download can, from any offset) takes
back what the old socket had not sent yet (`take_back`): the move then carries
only the bytes in flight, not the queued ones.
Everything the app does not export is lost in a move, so an app keeps no
state outside itself (no thread, no file, no clock reading it relies on later).

The two apps, picked by a connection's first bytes:

* `echo` (`LineCounter`): every line comes back numbered, `<n> <line>`, with `n`
  counting the connection's lines: a client sees at once if a line was lost,
  doubled or reordered across a move.
* `http` (`HttpApp`): HTTP/1.1 keep-alive. `GET /bytes/<n>` answers `n` bytes of
  a fixed pseudo-random pattern (`body`, `digest`), optionally paced by the
  kernel (`?rate=<bytes per second>`, SO_MAX_PACING_RATE) and from an offset
  (`&from=<k>`, to resume after a reset); any other path gets
  `<server> <count> <path>`, as the lab's HTTP service does (wrk, curl).
"""

from __future__ import annotations

import hashlib
import socket
import struct
from abc import ABC, abstractmethod
from typing import ClassVar
from urllib.parse import parse_qs, urlsplit

PATTERN = hashlib.shake_256(b"manycast tcp move").digest(1 << 20)
SO_MAX_PACING_RATE = 47
LINE_LIMIT = 1 << 16  # a line longer than this is cut (and answered) in pieces
REQUEST_LIMIT = 1 << 16
CHUNK = 1 << 18  # bytes of a stream offered at once
HTTP_METHODS = (b"GET ", b"HEAD", b"POST", b"PUT ", b"DELE", b"OPTI")


class AppStateError(ValueError):
    """Exported state an app cannot take back."""


def body(offset: int, length: int) -> bytes:
    """`length` bytes of the download's content from `offset`: the pattern, repeated."""
    out = bytearray()
    size = len(PATTERN)
    while length > 0:
        start = offset % size
        piece = PATTERN[start : start + length]
        out += piece
        offset += len(piece)
        length -= len(piece)
    return bytes(out)


def digest(length: int) -> str:
    """The sha256 (hex) of a whole `/bytes/<length>` body."""
    h = hashlib.sha256()
    whole, rest = divmod(length, len(PATTERN))
    for _ in range(whole):
        h.update(PATTERN)
    h.update(PATTERN[:rest])
    return h.hexdigest()


class ConnectionApp(ABC):
    """One connection's service state: what a move carries besides the socket."""

    name: ClassVar[str]
    server: str = ""  # the server it runs on (set by the framework, not exported)
    closing: bool = False  # close the connection once the output is written

    @abstractmethod
    def received(self, data: bytes) -> bytes:
        """Bytes from the client; the answer to send (may be empty)."""

    def more(self, room: int) -> bytes:
        """Up to `room` further bytes to send (a stream); empty when none are due."""
        return b""

    @property
    def streaming(self) -> bool:
        """Whether `more` has bytes to offer (the framework then waits for room)."""
        return False

    def configure(self, sock: socket.socket) -> None:  # noqa: B027 - most apps set nothing
        """Set the (new) socket up as this app needs it (after a move too)."""

    def take_back(self, count: int) -> bool:
        """Take back the last `count` bytes this app gave out (not yet sent when the
        connection moves) and give them again later: a move then need not carry them.
        False (the default) when the app cannot; the bytes then move as they are."""
        return count == 0

    @abstractmethod
    def export_state(self) -> bytes:
        """Everything of this connection's state, to rebuild it elsewhere."""

    @classmethod
    @abstractmethod
    def import_state(cls, data: bytes) -> ConnectionApp:
        """The app again from `export_state`'s bytes; `AppStateError` if they do not fit."""


class LineCounter(ConnectionApp):
    """`echo`: each line back, numbered."""

    name = "echo"

    def __init__(self, count: int = 0, partial: bytes = b"") -> None:
        self.count = count
        self.partial = partial

    def received(self, data: bytes) -> bytes:
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        while len(self.partial) > LINE_LIMIT:
            lines.append(self.partial[:LINE_LIMIT])
            self.partial = self.partial[LINE_LIMIT:]
        out = bytearray()
        for line in lines:
            self.count += 1
            out += b"%d %s\n" % (self.count, line)
        return bytes(out)

    def export_state(self) -> bytes:
        return struct.pack("!Q", self.count) + self.partial

    @classmethod
    def import_state(cls, data: bytes) -> LineCounter:
        if len(data) < 8 or len(data) > 8 + LINE_LIMIT:
            raise AppStateError(f"echo state of {len(data)} bytes")
        return cls(struct.unpack_from("!Q", data)[0], data[8:])


_HTTP = struct.Struct("!QQQQQQB")  # served, skip, body start, offset, end, rate, flags
_STREAM, _CLOSE = 1, 2


class HttpApp(ConnectionApp):
    """`http`: keep-alive HTTP/1.1, small answers and `/bytes/<n>` downloads."""

    name = "http"

    def __init__(self) -> None:
        self.inbuf = b""
        self.served = 0
        self.skip = 0  # request body bytes still to ignore
        self.stream: tuple[int, int] | None = None  # (next offset, end) of a download
        self.stream_from = 0  # where the download's body began
        self.rate = 0  # bytes per second the kernel paces the connection at (0: not)
        self.close_after_stream = False
        self._sock: socket.socket | None = None

    @property
    def streaming(self) -> bool:
        return self.stream is not None

    def received(self, data: bytes) -> bytes:
        self.inbuf += data
        return self._answer()

    def _answer(self) -> bytes:
        out = bytearray()
        while self.stream is None and not self.closing:
            if self.skip:
                dropped = min(self.skip, len(self.inbuf))
                self.inbuf, self.skip = self.inbuf[dropped:], self.skip - dropped
                if self.skip:
                    break
            end = self.inbuf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.inbuf) > REQUEST_LIMIT:
                    out += self._response(400, b"request too long\n", close=True)
                break
            head, self.inbuf = self.inbuf[:end], self.inbuf[end + 4 :]
            out += self._request(head)
        return bytes(out)

    def _request(self, head: bytes) -> bytes:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return self._response(400, b"bad request\n", close=True)
        method, target, version = parts
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        try:
            self.skip = int(headers.get("content-length", "0"))
        except ValueError:
            return self._response(400, b"bad content-length\n", close=True)
        close = headers.get("connection", "").lower() == "close" or version == "HTTP/1.0"
        self.served += 1
        url = urlsplit(target)
        if url.path.startswith("/bytes/"):
            try:
                query = {k: int(v[-1]) for k, v in parse_qs(url.query).items()}
                length = int(url.path.removeprefix("/bytes/"))
                start = query.get("from", 0)
                rate = query.get("rate", 0)
            except ValueError:
                return self._response(400, b"bad number\n", close=True)
            if not 0 <= start <= length or rate < 0:
                return self._response(416, b"bad range\n", close=True)
            if method != "HEAD" and length > start:
                self.stream = (start, length)
                self.stream_from = start
            if rate != self.rate:
                self.rate = rate
                if self._sock is not None:
                    self.configure(self._sock)
            return self._head(200, length - start, close)
        answer = f"{self.server} {self.served} {url.path}\n".encode()
        return self._response(200, b"" if method == "HEAD" else answer, close, len(answer))

    def _head(self, status: int, length: int, close: bool) -> bytes:
        self.closing = self.closing or (close and self.stream is None)
        self.close_after_stream = close
        reason = {200: "OK", 400: "Bad Request", 416: "Range Not Satisfiable"}[status]
        return (
            f"HTTP/1.1 {status} {reason}\r\nContent-Length: {length}\r\n"
            f"Content-Type: application/octet-stream\r\nX-Served-By: {self.server}\r\n"
            + ("Connection: close\r\n" if close else "")
            + "\r\n"
        ).encode()

    def _response(
        self, status: int, content: bytes, close: bool = False, length: int | None = None
    ) -> bytes:
        return self._head(status, len(content) if length is None else length, close) + content

    def more(self, room: int) -> bytes:
        if self.stream is None:
            return b""
        offset, end = self.stream
        piece = body(offset, min(room, CHUNK, end - offset))
        offset += len(piece)
        if offset < end:
            self.stream = (offset, end)
            return piece
        self.stream = None
        if self.close_after_stream:
            self.closing = True
            return piece
        return piece + self._answer()  # requests that waited behind the download

    def take_back(self, count: int) -> bool:
        """A download can give its body again from any offset: its unsent tail goes back
        (not the headers, nor what follows a finished body)."""
        if self.stream is None:
            return count == 0
        offset, end = self.stream
        if count > offset - self.stream_from:
            return False
        self.stream = (offset - count, end)
        return True

    def configure(self, sock: socket.socket) -> None:
        self._sock = sock
        rate = self.rate or 0xFFFFFFFF  # ~0U: not paced
        sock.setsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, struct.pack("=I", rate))

    def export_state(self) -> bytes:
        offset, end = self.stream or (0, 0)
        flags = (_STREAM if self.stream is not None else 0) | (
            _CLOSE if self.close_after_stream else 0
        )
        fixed = _HTTP.pack(self.served, self.skip, self.stream_from, offset, end, self.rate, flags)
        return fixed + self.inbuf

    @classmethod
    def import_state(cls, data: bytes) -> HttpApp:
        if len(data) < _HTTP.size or len(data) > _HTTP.size + REQUEST_LIMIT * 2:
            raise AppStateError(f"http state of {len(data)} bytes")
        served, skip, start, offset, end, rate, flags = _HTTP.unpack_from(data)
        if flags & ~(_STREAM | _CLOSE) or not start <= offset <= end or rate > 0xFFFFFFFF:
            raise AppStateError("http state fields do not fit")
        app = cls()
        app.served, app.skip, app.rate, app.stream_from = served, skip, rate, start
        app.stream = (offset, end) if flags & _STREAM else None
        app.close_after_stream = bool(flags & _CLOSE)
        app.inbuf = data[_HTTP.size :]
        return app


APPS: dict[str, type[ConnectionApp]] = {"echo": LineCounter, "http": HttpApp}


def choose(first: bytes) -> ConnectionApp:
    """The app for a connection whose client spoke first with `first`."""
    return HttpApp() if first[:4] in HTTP_METHODS else LineCounter()


__all__ = [
    "APPS",
    "AppStateError",
    "ConnectionApp",
    "HttpApp",
    "LineCounter",
    "body",
    "choose",
    "digest",
]
