"""Field checks and field codecs shared by every control message and policy operation.

Each `check_*` validates a dataclass field and raises `WireError`, so a message
that cannot be decoded cannot be built either; each `read_*` / `write_*` pair is
one field's layout (see the package docstring).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from enum import IntEnum
from fractions import Fraction
from ipaddress import IPv4Address, IPv6Address
from typing import TypeAlias, TypeVar

from manycast.wire.cursor import Reader, Writer
from manycast.wire.errors import WireError

MAX_ID_BYTES = 64
# Lists a receiver must hold in memory are capped well below what their u16
# counts allow, so one datagram cannot make a server allocate much.
MAX_BUCKET_LOADS = 1024
MAX_PACKET = 0xFFFF

U16 = 0xFFFF
U32 = 0xFFFFFFFF
U64 = (1 << 64) - 1

Address: TypeAlias = IPv4Address | IPv6Address


def check_uint(what: str, name: str, value: object, top: int, low: int = 0) -> None:
    # bool is an int subclass, but True for a port is a caller's mistake.
    if isinstance(value, bool) or not isinstance(value, int):
        raise WireError(f"{what}: {name} must be an int, not {type(value).__name__}")
    if not low <= value <= top:
        raise WireError(f"{what}: {name} {value} out of range {low}..{top}")


def check_id(what: str, name: str, value: object) -> None:
    if not isinstance(value, str):
        raise WireError(f"{what}: {name} must be a str, not {type(value).__name__}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise WireError(f"{what}: {name} {value!r} is not encodable as UTF-8") from None
    if not 1 <= size <= MAX_ID_BYTES:
        raise WireError(f"{what}: {name} {value!r} is {size} bytes of UTF-8, not 1..{MAX_ID_BYTES}")


def check_address(what: str, name: str, value: object) -> None:
    if not isinstance(value, IPv4Address | IPv6Address):
        raise WireError(f"{what}: {name} must be an IPv4Address or IPv6Address, not {value!r}")


def check_digest(what: str, name: str, value: object) -> None:
    if not (
        isinstance(value, str) and len(value) == 16 and all(c in "0123456789abcdef" for c in value)
    ):
        raise WireError(f"{what}: {name} must be 16 lowercase hex characters, not {value!r}")


def as_share(what: str, value: object) -> Fraction:
    # Floats are refused: a share must mean the same on every server.
    if isinstance(value, bool) or not isinstance(value, Fraction | int):
        raise WireError(f"{what}: share must be a Fraction, not {type(value).__name__}")
    share = Fraction(value)
    if not 0 <= share <= 1:
        raise WireError(f"{what}: share {share} is not between 0 and 1")
    if share.denominator > U32:
        raise WireError(f"{what}: share {share} has a denominator wider than 32 bits")
    return share


_T = TypeVar("_T")


def set_field(obj: object, name: str, value: object) -> None:
    """Store a normalised field value on a frozen dataclass during validation."""
    object.__setattr__(obj, name, value)


def records(
    what: str, name: str, values: Iterable[Iterable[object]], kind: Callable[..., _T]
) -> tuple[_T, ...]:
    """`values` as a tuple of records, so lists and plain tuples compare like decoded ones."""
    try:
        return tuple(kind(*v) for v in values)
    except TypeError:
        raise WireError(f"{what}: {name} must be a sequence of records, not {values!r}") from None


def as_bytes(what: str, name: str, value: object) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise WireError(f"{what}: {name} must be bytes, not {type(value).__name__}")
    return bytes(value)


def check_real(what: str, name: str, value: object, low: float) -> None:
    if isinstance(value, bool) or not isinstance(value, float | int):
        raise WireError(f"{what}: {name} must be a float, not {type(value).__name__}")
    if not (math.isfinite(value) and value >= low):
        raise WireError(f"{what}: {name} {value} must be finite and at least {low}")


def write_id(w: Writer, value: str) -> None:
    raw = value.encode("utf-8")
    w.u8(len(raw)).bytes(raw)


def read_id(r: Reader, name: str) -> str:
    size = r.u8(f"{name} length")
    if not 1 <= size <= MAX_ID_BYTES:
        raise WireError(f"{r.what}: {name} length {size} is not 1..{MAX_ID_BYTES}")
    raw = r.bytes(size, name)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise WireError(f"{r.what}: {name} {raw!r} is not valid UTF-8") from None


def write_address(w: Writer, value: Address) -> None:
    w.u8(value.version).bytes(value.packed)


def read_address(r: Reader, name: str) -> Address:
    family = r.u8(f"{name} family")
    if family == 4:
        return IPv4Address(r.bytes(4, name))
    if family == 6:
        return IPv6Address(r.bytes(16, name))
    raise WireError(f"{r.what}: {name} family {family} is neither 4 nor 6")


def write_digest(w: Writer, value: str) -> None:
    w.bytes(bytes.fromhex(value))


def read_digest(r: Reader, name: str) -> str:
    return r.bytes(8, name).hex()


def write_share(w: Writer, value: Fraction) -> None:
    w.u32(value.numerator).u32(value.denominator)


def read_share(r: Reader) -> Fraction:
    numerator, denominator = r.u32("share numerator"), r.u32("share denominator")
    if denominator == 0:
        raise WireError(f"{r.what}: share denominator is zero")
    if math.gcd(numerator, denominator) != 1:
        raise WireError(f"{r.what}: share {numerator}/{denominator} is not in lowest terms")
    return Fraction(numerator, denominator)


def read_flag(r: Reader, name: str) -> bool:
    value = r.u8(name)
    if value > 1:
        raise WireError(f"{r.what}: {name} must be 0 or 1, not {value}")
    return value == 1


def read_count(r: Reader, name: str, item_min: int, limit: int) -> int:
    """A u16 list count, checked against `limit` and the bytes left before any allocation."""
    count = r.u16(f"{name} count")
    if count > limit:
        raise WireError(f"{r.what}: {count} {name}, at most {limit}")
    if count * item_min > r.remaining:
        raise WireError(
            f"{r.what}: {count} {name} need at least {count * item_min} bytes, {r.remaining} left"
        )
    return count


_E = TypeVar("_E", bound=IntEnum)


def read_enum(r: Reader, kind: type[_E], value: int, name: str) -> _E:
    try:
        return kind(value)
    except ValueError:
        raise WireError(f"{r.what}: unknown {name} {value}") from None
