"""TSIG keys (RFC 8945) that sign pool-record updates, in the text form kdig and nsupdate take."""

from __future__ import annotations

import base64
import binascii
import secrets
from dataclasses import dataclass, field
from typing import Final

import dns.tsig

from manycast.addressplan import NamingError, show
from manycast.naming.records import dns_name

__all__ = ["Keyring", "TsigKey"]

TSIG_ALGORITHMS: Final = ("hmac-sha256", "hmac-sha384", "hmac-sha512")


@dataclass(frozen=True)
class TsigKey:
    """A TSIG key: name, secret, HMAC algorithm.

    Text form, as `kdig -y` and `nsupdate -y` take it: "hmac-sha256:name:base64secret".
    """

    name: str
    secret: bytes = field(repr=False)
    algorithm: str = "hmac-sha256"

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", dns_name(self.name, "TSIG key name").to_text())
        if self.algorithm not in TSIG_ALGORITHMS:
            raise NamingError(
                f"bad TSIG algorithm {show(self.algorithm)}: one of {', '.join(TSIG_ALGORITHMS)}"
            )
        if not isinstance(self.secret, bytes) or len(self.secret) < 16:
            raise NamingError("bad TSIG secret: at least 16 bytes")

    @classmethod
    def generate(cls, name: str = "manycast-update.") -> TsigKey:
        return cls(name, secrets.token_bytes(32))

    @classmethod
    def from_text(cls, text: str) -> TsigKey:
        parts = text.strip().split(":")
        if len(parts) == 2:
            parts.insert(0, "hmac-sha256")
        if len(parts) != 3:
            raise NamingError("bad TSIG key: expected [algorithm:]name:base64secret")
        try:
            secret = base64.b64decode(parts[2], validate=True)
        except (binascii.Error, ValueError):
            raise NamingError("bad TSIG key: the secret is not base64") from None
        return cls(parts[1], secret, parts[0].lower())

    def to_text(self) -> str:
        return f"{self.algorithm}:{self.name}:{self.secret_b64}"

    @property
    def secret_b64(self) -> str:
        return base64.b64encode(self.secret).decode("ascii")

    def dns_key(self) -> dns.tsig.Key:
        return dns.tsig.Key(self.name, self.secret, self.algorithm + ".")


Keyring = TsigKey | dns.tsig.Key


def dns_key(keyring: Keyring | None) -> dns.tsig.Key | None:
    """The dnspython key to sign with (None: unsigned)."""
    return keyring.dns_key() if isinstance(keyring, TsigKey) else keyring
