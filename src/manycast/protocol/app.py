"""The served application as the core sees it: the interface server agents and clients are given.

The core moves connections between servers; what a connection carries is the
application's business. A server agent is given a `Service` (one state per
connection, exportable for a state transfer); a client is given a factory of
`Session`s (one per connection it opens). `apps.counter` is one implementation.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, MutableMapping
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Answer:
    """The outcome of one request, as the client's session judged it."""

    sequence: int
    ok: bool
    latency: float
    reason: str = ""  # why not ok; "state lost: ..." when the server forgot the connection


class Service(Protocol):
    """Server side: application state per connection, keyed by the transport's key."""

    @property
    def requests(self) -> int:
        """Requests answered so far (the load the pool balances)."""

    def __contains__(self, key: Hashable) -> bool: ...

    def __len__(self) -> int: ...

    def open(self, key: Hashable) -> None: ...

    def close(self, key: Hashable) -> None: ...

    def on_data(self, key: Hashable, data: bytes) -> bytes:
        """What to send back for `data` received on connection `key`."""

    def export(self, key: Hashable) -> bytes:
        """The connection's state, for a transfer to another server (R3)."""

    def restore(self, key: Hashable, state: bytes) -> None:
        """Take over a connection from its exported state (WireError if malformed)."""


class Session(Protocol):
    """Client side of one connection: builds requests and judges the answers."""

    @property
    def outstanding(self) -> MutableMapping[int, tuple[float, int]]:
        """sequence -> (time sent, request detail) of every request still unanswered."""

    def request(self, size: int, now: float) -> bytes: ...

    def on_data(self, data: bytes, now: float) -> list[Answer]: ...


SessionFactory = Callable[[], Session]
