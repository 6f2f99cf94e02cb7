"""Signed change-destination messages (seed Fig 21): signed by a pool's servers, checked by clients.

Every server of a pool holds the pool's Ed25519 private key; the public key is
published in DNS in the pool's record (docs/naming.md). A server that takes over
a connection tells the client where to send with a `ChangeDestination` it signs
(`sign_change`). The client's `DestinationGuard` accepts one only when, in this
order: it is signed at all, its timestamp lies within a window around the
client's wall clock, its serial is above the last one the connection accepted
(or it is that very message again, which changes nothing), the destination is a
unicast address of the connection's family, and the signature verifies with the
pool's key. The key comes from the client's owner (a DNS lookup: the client
hands out `PoolKeyNeeded`, its owner answers with `provide_key`), cached for the
record's TTL; a message waits meanwhile, and a key that cannot be had means
refuse, never accept. Every refusal is counted by its `RedirectRefusal`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from manycast.auth import AuthError, public_key
from manycast.protocol.refusal import RedirectRefusal
from manycast.wire.transport import ChangeDestination, IPAddress

WINDOW = 30.0  # seconds a change-destination's timestamp may be off the client's clock
NEGATIVE_TTL = 5.0  # seconds a failed key lookup is remembered (then asked again)
MAX_WAITING = 16  # messages held while the key is looked up


@dataclass(frozen=True, slots=True)
class PoolKeyNeeded:
    """A client's effect: look up the public key published for `group` (its reverse
    name's record, docs/naming.md) and answer with `Client.provide_key`."""

    group: int


def sign_change(message: ChangeDestination, key: Ed25519PrivateKey) -> ChangeDestination:
    """`message` with its signature made with the pool's private key (Fig 21, 2120)."""
    return dataclasses.replace(message, signature=key.sign(message.signed_bytes()))


def verify_change(message: ChangeDestination, key: Ed25519PublicKey) -> bool:
    """Whether `message` is signed with `key`'s private half (Fig 21, 2130)."""
    if not message.signature:
        return False
    try:
        key.verify(message.signature, message.signed_bytes())
    except InvalidSignature:
        return False
    return True


class Verdict(Enum):
    ACCEPT = "accept"  # move the connection to the message's destination
    SAME = "same"  # the message accepted last, again: nothing to do
    WAIT = "wait"  # held until the pool's key is known


@dataclass
class _Key:
    key: Ed25519PublicKey | None
    expires: float
    error: RedirectRefusal


@dataclass
class GuardStats:
    accepted: int = 0
    repeated: int = 0  # the last accepted message again (a retransmission)
    refused: Counter[RedirectRefusal] = field(default_factory=Counter)
    key_lookups: int = 0


class DestinationGuard:
    """A client's checks on change-destination messages, for one pool's key.

    `begin()` starts a new connection (serials are per connection). `check` gives a
    `Verdict` or the reason to refuse; `WAIT` means the message is held
    (`waiting`), and `take_lookup()` says whether to ask for the key now."""

    def __init__(self, wall_base: float, window: float = WINDOW) -> None:
        self.wall_base = wall_base
        self.window = window
        self.stats = GuardStats()
        self._key: _Key | None = None
        self._asked = False
        self._want_lookup = False
        self.waiting: list[ChangeDestination] = []
        self.last_serial = 0
        self.last: ChangeDestination | None = None

    def begin(self) -> None:
        """A new connection: no serial accepted yet, nothing waiting."""
        self.last_serial = 0
        self.last = None
        self.waiting.clear()

    # -- the key ------------------------------------------------------------------------
    def fresh(self, now: float) -> bool:
        return self._key is not None and self._key.expires > now

    def prefetch(self, now: float) -> None:
        """Ask for the key ahead of need (a connection that may be moved opened)."""
        if not self.fresh(now) and not self._asked:
            self._asked = self._want_lookup = True

    def take_lookup(self) -> bool:
        """True once per lookup the owner should start."""
        want, self._want_lookup = self._want_lookup, False
        if want:
            self.stats.key_lookups += 1
        return want

    def provide_key(self, raw: bytes | None, ttl: float, now: float, error: str | None) -> None:
        """The owner's answer: the key and how long to keep it, or none and why."""
        self._asked = False
        if raw is None:
            reason = (
                RedirectRefusal.BAD_KEY_RECORD
                if error == RedirectRefusal.BAD_KEY_RECORD.value
                else RedirectRefusal.NO_KEY
            )
            self._key = _Key(None, now + NEGATIVE_TTL, reason)
            return
        try:
            key = public_key(raw)
        except AuthError:
            self._key = _Key(None, now + NEGATIVE_TTL, RedirectRefusal.BAD_KEY_RECORD)
            return
        self._key = _Key(key, now + max(ttl, 1.0), RedirectRefusal.NO_KEY)

    # -- messages -----------------------------------------------------------------------
    def check(
        self, message: ChangeDestination, remote: IPAddress, now: float
    ) -> Verdict | RedirectRefusal:
        """The fate of `message` for a connection now sending to `remote`. Refusals
        are counted here; an accepted message becomes the connection's last."""
        verdict = self._judge(message, remote, now)
        if isinstance(verdict, RedirectRefusal):
            self.stats.refused[verdict] += 1
        elif verdict is Verdict.WAIT:
            if len(self.waiting) >= MAX_WAITING:
                self.stats.refused[RedirectRefusal.TOO_MANY_WAITING] += 1
                return RedirectRefusal.TOO_MANY_WAITING
            self.waiting.append(message)
            if not self._asked:
                self._asked = self._want_lookup = True
        elif verdict is Verdict.SAME:
            self.stats.repeated += 1
        else:
            self.last_serial, self.last = message.serial, message
            self.stats.accepted += 1
        return verdict

    def _judge(
        self, message: ChangeDestination, remote: IPAddress, now: float
    ) -> Verdict | RedirectRefusal:
        if not message.signature:
            return RedirectRefusal.UNSIGNED
        if message == self.last:
            return Verdict.SAME
        if abs(self.wall_base + now - message.timestamp_ms / 1000) > self.window:
            return RedirectRefusal.STALE
        if message.serial <= self.last_serial:
            return RedirectRefusal.REPLAYED
        address = message.address
        if (
            address.version != remote.version
            or address.is_multicast
            or address.is_unspecified
            or address == ipaddress.ip_address("255.255.255.255")
        ):
            return RedirectRefusal.BAD_DESTINATION
        if not self.fresh(now):
            return Verdict.WAIT
        assert self._key is not None
        if self._key.key is None:
            return self._key.error
        if not verify_change(message, self._key.key):
            return RedirectRefusal.BAD_SIGNATURE
        return Verdict.ACCEPT

    def release(self, remote: IPAddress, now: float) -> list[ChangeDestination]:
        """Once the key is known (or known to be missing): judge the held messages in
        the order they came; the accepted ones, in order."""
        held, self.waiting = self.waiting, []
        out: list[ChangeDestination] = []
        for message in held:
            if self.check(message, remote, now) is Verdict.ACCEPT:
                out.append(message)
                remote = message.address
        return out


__all__ = [
    "DestinationGuard",
    "GuardStats",
    "PoolKeyNeeded",
    "Verdict",
    "sign_change",
    "verify_change",
]
