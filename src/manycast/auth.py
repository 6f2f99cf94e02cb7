"""Keys, signed joins and the checks a router makes before admitting one (Fig 5, 6, 8).

A private pool has one Ed25519 key pair: the public key is published in DNS,
the private key is given to every authorized participant. A participant's join
carries a timestamp, its address and a random key, and a signature over the
whole report (`signed_bytes()` of an IGMPv3 or, in an IPv6 pool, MLDv2 report:
the same fields, with a 16-byte requester). A router admits a join to a
private group only if, in the seed's order (Fig 6): it is not a duplicate, it
is timely, it came from the right link (checked by the router's routing), and
its signature verifies with the group's public key.
"""

from __future__ import annotations

import base64
import os
import stat
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from manycast.errors import ManycastError
from manycast.wire.membership import IGMPv3Report, MLDv2Report, SignedJoin

PUBLIC_KEY_BYTES = 32

Report = TypeVar("Report", IGMPv3Report, MLDv2Report)


class AuthError(ManycastError, ValueError):
    """A key that cannot be read or used."""


def generate() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key(raw: bytes) -> Ed25519PublicKey:
    if len(raw) != PUBLIC_KEY_BYTES:
        raise AuthError(f"an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes, not {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def save_private(key: Ed25519PrivateKey, path: Path) -> None:
    """Write a private key as PKCS#8 PEM, readable by its owner only (mode 0600)."""
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created 0600 from the start: the key is never readable by others, even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    os.chmod(path, 0o600)


def load_private(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
        mode = path.stat().st_mode
    except OSError as exc:
        raise AuthError(f"{path}: cannot read: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise AuthError(f"{path}: private key is readable by others (chmod 600 {path})")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise AuthError(f"{path}: not a PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise AuthError(f"{path}: not an Ed25519 key")
    return key


def encode_public(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def sign_join(report: Report, key: Ed25519PrivateKey) -> Report:
    """The report with its signed-join signature filled in."""
    if report.signed is None:
        raise AuthError("the report carries no signed-join fields to sign")
    signature = key.sign(report.signed_bytes())
    return replace(report, signed=replace(report.signed, signature=signature))


def verify_join(report: IGMPv3Report | MLDv2Report, key: Ed25519PublicKey) -> bool:
    if report.signed is None or not report.signed.signature:
        return False
    try:
        key.verify(report.signed.signature, report.signed_bytes())
    except InvalidSignature:
        return False
    return True


class ReplayCache:
    """Signed messages seen within the time window, so a copy of one is refused (Fig 6,
    610): joins, and the pool's notices to its routers (by their signed bytes).

    Entries older than the window can go: a message that old is refused as stale anyway.
    """

    def __init__(self, window: float, limit: int = 100_000) -> None:
        self.window = window
        self.limit = limit
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    @staticmethod
    def _fingerprint(seen: SignedJoin | bytes) -> bytes:
        if isinstance(seen, bytes):
            return seen
        return seen.requester.packed + seen.timestamp.to_bytes(8, "big") + seen.random_key

    def __contains__(self, seen: SignedJoin | bytes) -> bool:
        return self._fingerprint(seen) in self._seen

    def remember(self, seen: SignedJoin | bytes, now: float) -> None:
        self._forget(now)
        self._seen[self._fingerprint(seen)] = now
        if len(self._seen) > self.limit:
            self._seen.popitem(last=False)

    def _forget(self, now: float) -> None:
        while self._seen:
            first, at = next(iter(self._seen.items()))
            if now - at <= 2 * self.window:
                break
            del self._seen[first]
