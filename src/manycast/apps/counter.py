"""A stateful session service: every connection keeps a running total.

The client sends (sequence, increment); the server adds the increment to the
connection's total and answers (sequence, total). The client knows what the
total must be, so a connection that lost its state (moved to a server that
never saw it) is caught at the next answer: the loss is visible, as the
pool's techniques must avoid.
"""

from __future__ import annotations

import struct
from collections.abc import Hashable
from dataclasses import dataclass, field

from manycast.protocol.app import Answer
from manycast.wire.errors import WireError

REQUEST = struct.Struct("!II")  # sequence, increment
RESPONSE = struct.Struct("!IQ")  # sequence, running total
_STATE = struct.Struct("!BQI")  # version, total, buffered byte count
_STATE_VERSION = 1


@dataclass
class _Conn:
    total: int = 0
    pending: bytearray = field(default_factory=bytearray)


class CounterService:
    """Server side (a `protocol.app.Service`): one running total per connection."""

    def __init__(self) -> None:
        self._conns: dict[Hashable, _Conn] = {}
        self.requests = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._conns

    def __len__(self) -> int:
        return len(self._conns)

    def open(self, key: Hashable) -> None:
        self._conns.setdefault(key, _Conn())

    def close(self, key: Hashable) -> None:
        self._conns.pop(key, None)

    def on_data(self, key: Hashable, data: bytes) -> bytes:
        """Answers for every complete request in `data` (partial requests wait)."""
        conn = self._conns.setdefault(key, _Conn())
        conn.pending += data
        answers = bytearray()
        size = REQUEST.size
        while len(conn.pending) >= size:
            sequence, increment = REQUEST.unpack_from(conn.pending)
            del conn.pending[:size]
            conn.total += increment
            answers += RESPONSE.pack(sequence, conn.total & 0xFFFFFFFFFFFFFFFF)
            self.requests += 1
        return bytes(answers)

    def export(self, key: Hashable) -> bytes:
        """The connection's application state, for a state transfer to another server."""
        conn = self._conns[key]
        return _STATE.pack(_STATE_VERSION, conn.total, len(conn.pending)) + bytes(conn.pending)

    def restore(self, key: Hashable, state: bytes) -> None:
        if len(state) < _STATE.size:
            raise WireError(f"counter state: {len(state)} bytes, need at least {_STATE.size}")
        version, total, pending = _STATE.unpack_from(state)
        if version != _STATE_VERSION:
            raise WireError(f"counter state: version {version}, expected {_STATE_VERSION}")
        if len(state) != _STATE.size + pending:
            raise WireError("counter state: buffered byte count does not match")
        self._conns[key] = _Conn(total, bytearray(state[_STATE.size :]))


class CounterSession:
    """Client side of one connection (a `protocol.app.Session`): what the total must
    be, and when each request left."""

    def __init__(self) -> None:
        self.total = 0
        self.next_sequence = 1
        self.outstanding: dict[int, tuple[float, int]] = {}
        self._pending = bytearray()

    def request(self, increment: int, now: float) -> bytes:
        sequence = self.next_sequence
        self.next_sequence += 1
        self.outstanding[sequence] = (now, increment)
        return REQUEST.pack(sequence, increment)

    def on_data(self, data: bytes, now: float) -> list[Answer]:
        self._pending += data
        answers: list[Answer] = []
        while len(self._pending) >= RESPONSE.size:
            sequence, total = RESPONSE.unpack_from(self._pending)
            del self._pending[: RESPONSE.size]
            sent = self.outstanding.pop(sequence, None)
            if sent is None:
                answers.append(Answer(sequence, False, 0.0, "answer to no request"))
                continue
            sent_at, increment = sent
            self.total += increment
            if total != self.total:
                answers.append(
                    Answer(
                        sequence,
                        False,
                        now - sent_at,
                        f"state lost: total {total}, expected {self.total}",
                    )
                )
                self.total = total
            else:
                answers.append(Answer(sequence, True, now - sent_at))
        return answers
