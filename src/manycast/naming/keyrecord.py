"""The key record: the TXT text carrying a pool's owner, public key and flag.

In the tag=value style of DKIM key records (RFC 6376 §3.6.1):

* `v=manycast1` first; another version is refused.
* `k=ed25519`; the only key type.
* `p=` the 32-byte Ed25519 public key (RFC 8032), standard base64 with padding
  (44 characters, canonical: no whitespace, zero pad bits).
* `o=` the owner: 1-255 printable ASCII characters except space, `;`, `"` and `\\`
  (an address such as `abc123@host.sponsor.com`).
* `f=private` or `f=public`, which must agree with the address plan (Fig 2).

Tags are separated by `;` with optional spaces or tabs around tags and `=`, a
trailing `;` is allowed, and every tag appears exactly once; unknown tags are
refused (a new tag means a new version). The text is at most 1024 bytes and
may be split into several TXT strings, which are concatenated (RFC 6376
§3.6.2.2). Other TXT records at the same names are left alone; a TXT is
manycast's when its first tag is `v=manycast...`. Every defect is a `BadRecord`.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from manycast.addressplan import BadRecord, show

__all__ = ["KeyRecord", "format_key_txt", "is_key_txt", "parse_key_txt"]

VERSION: Final = "manycast1"
KEY_TYPE: Final = "ed25519"
KEY_BYTES: Final = 32
MAX_TXT: Final = 1024
MAX_OWNER: Final = 255

_TAGS: Final = ("v", "k", "p", "o", "f")
_FWS: Final = " \t"
ALNUM: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_TAG_CHARS: Final = ALNUM | {"_"}
_B64_CHARS: Final = ALNUM | {"+", "/"}
_OWNER_CHARS: Final = frozenset(chr(c) for c in range(0x21, 0x7F)) - {";", '"', "\\"}


@dataclass(frozen=True)
class KeyRecord:
    """What the TXT carries: owner, Ed25519 public key, private flag."""

    owner: str
    public_key: bytes
    private: bool


def check_owner(owner: str) -> str:
    if not 1 <= len(owner) <= MAX_OWNER or any(c not in _OWNER_CHARS for c in owner):
        raise BadRecord(
            f"bad owner {show(owner)}: 1-{MAX_OWNER} printable ASCII characters "
            "without space, ';', '\"' or '\\'"
        )
    return owner


def check_key(key: object) -> bytes:
    """32 raw bytes from raw bytes or a `cryptography` Ed25519 public key."""
    if isinstance(key, Ed25519PublicKey):
        return key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    if not isinstance(key, bytes | bytearray):
        raise BadRecord(f"bad public key: {type(key).__name__}, expected 32 raw bytes")
    if len(key) != KEY_BYTES:
        raise BadRecord(f"bad public key: {len(key)} bytes, expected {KEY_BYTES}")
    return bytes(key)


def format_key_txt(owner: str, public_key: bytes, private: bool) -> str:
    """The key record's text (see the module docstring)."""
    key = base64.b64encode(check_key(public_key)).decode("ascii")
    flag = "private" if private else "public"
    return f"v={VERSION}; k={KEY_TYPE}; p={key}; o={check_owner(owner)}; f={flag}"


def is_key_txt(text: bytes) -> bool:
    """Whether a TXT is manycast's (first tag v=manycast...), valid or not."""
    head = text[:64].split(b";", 1)[0]
    name, eq, value = head.partition(b"=")
    return bool(eq) and name.strip(b" \t") == b"v" and value.lstrip(b" \t").startswith(b"manycast")


def parse_key_txt(text: bytes) -> KeyRecord:
    """Decodes a key record strictly; any defect raises BadRecord("bad key record: ...")."""

    def bad(why: str) -> BadRecord:
        return BadRecord(f"bad key record: {why}")

    if len(text) > MAX_TXT:
        raise bad(f"{len(text)} bytes, at most {MAX_TXT}")
    for offset, byte in enumerate(text):
        if not (0x20 <= byte <= 0x7E or byte == 0x09):
            raise bad(f"control or non-ASCII byte 0x{byte:02x} at offset {offset}")
    parts = text.decode("ascii").split(";")
    if len(parts) > 1 and not parts[-1].strip(_FWS):
        parts.pop()  # a trailing ';'
    if len(parts) > len(_TAGS):
        raise bad(f"{len(parts)} tags, expected {len(_TAGS)}")
    tags: dict[str, str] = {}
    for part in parts:
        spec = part.strip(_FWS)
        if not spec:
            raise bad("empty tag")
        name, eq, value = spec.partition("=")
        name, value = name.rstrip(_FWS), value.lstrip(_FWS)
        if not eq:
            raise bad(f"tag {show(spec)} has no '='")
        if not name or name[0] not in ALNUM or any(c not in _TAG_CHARS for c in name):
            raise bad(f"bad tag name {show(name)}")
        if name in tags:
            raise bad(f"duplicate tag {name}=")
        if name not in _TAGS:
            raise bad(f"unknown tag {name}=")
        if not tags and name != "v":
            raise bad("the first tag must be v=")
        tags[name] = value
    if tags.get("v") != VERSION:
        raise bad(f"unknown version {show(tags.get('v', ''))}, expected {VERSION}")
    for name in _TAGS:
        if name not in tags:
            raise bad(f"missing tag {name}=")
    if tags["k"] != KEY_TYPE:
        raise bad(f"unsupported key type {show(tags['k'])}, expected {KEY_TYPE}")
    encoded = tags["p"]
    if not encoded:
        raise bad("empty key (p=)")
    body = encoded.rstrip("=")
    if len(encoded) % 4 or len(encoded) - len(body) > 2 or any(c not in _B64_CHARS for c in body):
        raise bad("p= is not canonical base64")
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise bad("p= is not canonical base64") from None
    if base64.b64encode(key).decode("ascii") != encoded:
        raise bad("p= is not canonical base64 (nonzero pad bits)")
    if len(key) != KEY_BYTES:
        raise bad(f"key is {len(key)} bytes, expected {KEY_BYTES}")
    try:
        owner = check_owner(tags["o"])
    except BadRecord as exc:
        raise bad(str(exc)) from None
    if tags["f"] not in ("private", "public"):
        raise bad(f"flag f={show(tags['f'])}, expected private or public")
    return KeyRecord(owner, key, tags["f"] == "private")
