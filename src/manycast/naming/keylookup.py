"""One answer to a router's question "what is this group's key?", from a directory or DNS.

A router's admission asks for a group's key and waits for a `KeyAnswer`: the
32-byte key and how long to keep it, or no key and why, in the router's own
refusal words. The reason is decided by the error's type, never its text: a
record that is there but does not validate (`BadRecord`) is "bad key record";
anything else (NXDOMAIN, no record, a refusal, a timeout, garbage, a server
that cannot be reached) is "no key". A lookup that got no word on the key (a
timeout, a server that cannot be reached, garbage) is also `unanswered`: a router
keeps a key it had while DNS is out of reach (RFC 8767's serve-stale).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import Final

from manycast.addressplan import DEFAULT_PLAN, AddressPlan, BadRecord, NamingError, NamingRefused
from manycast.naming.client import LOOKUP_TIMEOUT, lookup_group, lookup_group_async
from manycast.naming.records import PoolRecord
from manycast.naming.transport import Server

__all__ = [
    "BAD_KEY",
    "KEY_TTL",
    "NO_KEY",
    "KeyAnswer",
    "key_from_directory",
    "lookup_key",
    "lookup_key_async",
]

_log = logging.getLogger(__name__)

KEY_TTL: Final = 300.0  # how long a key answered from a directory is kept, as a DNS TTL would
NO_KEY: Final = "no key"
BAD_KEY: Final = "bad key record"


@dataclass(frozen=True)
class KeyAnswer:
    """A group's key (`public_key`, kept `ttl` seconds), or None with a `reason`.

    `reason` is None, "no key" or "bad key record"; `detail` says what the
    lookup found (an error's message) and is for logs and tests only.
    `unanswered`: the DNS server said nothing about the key (no answer in time,
    could not be asked, or garbage), as opposed to "there is no such record".
    """

    public_key: bytes | None
    ttl: float
    reason: str | None
    detail: str | None = field(default=None, compare=False)
    unanswered: bool = False


def key_from_directory(directory: Mapping[int, bytes], group: int) -> KeyAnswer:
    """The answer from an in-process directory of group -> raw public key."""
    raw = directory.get(group)
    if raw is None:
        return KeyAnswer(None, KEY_TTL, NO_KEY)
    return KeyAnswer(raw, KEY_TTL, None)


def _found(record: PoolRecord) -> KeyAnswer:
    return KeyAnswer(record.public_key, float(record.ttl), None)


def _failed(group: int, exc: NamingError) -> KeyAnswer:
    reason = BAD_KEY if isinstance(exc, BadRecord) else NO_KEY
    _log.info("key of group %s: %s (%s)", ip_address(group), reason, exc)
    unanswered = not isinstance(exc, BadRecord | NamingRefused)
    return KeyAnswer(None, 0.0, reason, str(exc), unanswered)


def lookup_key(
    group: int,  # an IPv4 group below 2**32, an IPv6 one above
    server: Server,
    timeout: float = LOOKUP_TIMEOUT,
    *,
    plan: AddressPlan = DEFAULT_PLAN,
) -> KeyAnswer:
    """The answer from DNS, blocking (a daemon's loop or a worker thread); never raises
    a NamingError: every failure is an answer."""
    try:
        return _found(lookup_group(ip_address(group), server, timeout=timeout, plan=plan))
    except NamingError as exc:
        return _failed(group, exc)


async def lookup_key_async(
    group: int,
    server: Server,
    timeout: float = LOOKUP_TIMEOUT,
    *,
    plan: AddressPlan = DEFAULT_PLAN,
) -> KeyAnswer:
    """`lookup_key` on asyncio."""
    try:
        record = await lookup_group_async(ip_address(group), server, timeout=timeout, plan=plan)
    except NamingError as exc:
        return _failed(group, exc)
    return _found(record)
