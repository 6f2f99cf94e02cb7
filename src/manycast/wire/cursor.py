"""A bounded read cursor and a growable writer: the only way decoders touch bytes.

Every read checks the remaining length first, so a decoder built on `Reader`
can only fail with `WireError`, never with `IndexError` or `struct.error`.
"""

from __future__ import annotations

import builtins
import struct

from manycast.wire.errors import WireError


class Reader:
    """Reads big-endian fields from a byte string, never past its end."""

    __slots__ = ("_data", "_end", "_pos", "what")

    def __init__(self, data: bytes | bytearray | memoryview, what: str = "message") -> None:
        self._data = bytes(data)
        self._pos = 0
        self._end = len(self._data)
        self.what = what

    @property
    def offset(self) -> int:
        return self._pos

    @property
    def remaining(self) -> int:
        return self._end - self._pos

    def at_end(self) -> bool:
        return self._pos >= self._end

    def _take(self, n: int, field: str) -> bytes:
        if n < 0:
            raise WireError(f"{self.what}: negative length {n} for {field}")
        if self._pos + n > self._end:
            raise WireError(
                f"{self.what}: truncated at offset {self._pos}: {field} needs {n} bytes, "
                f"{self._end - self._pos} left"
            )
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def u8(self, field: str = "u8") -> int:
        return self._take(1, field)[0]

    def u16(self, field: str = "u16") -> int:
        return int.from_bytes(self._take(2, field), "big")

    def u32(self, field: str = "u32") -> int:
        return int.from_bytes(self._take(4, field), "big")

    def u64(self, field: str = "u64") -> int:
        return int.from_bytes(self._take(8, field), "big")

    def uint(self, width: int, field: str = "uint") -> int:
        return int.from_bytes(self._take(width, field), "big")

    def f64(self, field: str = "f64") -> float:
        value: float = struct.unpack("!d", self._take(8, field))[0]
        return value

    def bytes(self, n: int, field: str = "bytes") -> builtins.bytes:
        return self._take(n, field)

    def rest(self) -> builtins.bytes:
        return self._take(self.remaining, "rest")

    def sub(self, n: int, field: str) -> Reader:
        """A reader over the next `n` bytes (for length-prefixed sections)."""
        return Reader(self._take(n, field), f"{self.what}/{field}")

    def expect_end(self) -> None:
        if self._pos != self._end:
            extra = self._end - self._pos
            raise WireError(f"{self.what}: {extra} trailing bytes at offset {self._pos}")


class Writer:
    """Appends big-endian fields; range errors here are programming errors (ValueError)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def __len__(self) -> int:
        return len(self._buf)

    def u8(self, v: int) -> Writer:
        self._buf += v.to_bytes(1, "big")
        return self

    def u16(self, v: int) -> Writer:
        self._buf += v.to_bytes(2, "big")
        return self

    def u32(self, v: int) -> Writer:
        self._buf += v.to_bytes(4, "big")
        return self

    def u64(self, v: int) -> Writer:
        self._buf += v.to_bytes(8, "big")
        return self

    def uint(self, width: int, v: int) -> Writer:
        self._buf += v.to_bytes(width, "big")
        return self

    def f64(self, v: float) -> Writer:
        self._buf += struct.pack("!d", v)
        return self

    def bytes(self, b: builtins.bytes) -> Writer:
        self._buf += b
        return self

    def patch_u16(self, offset: int, v: int) -> None:
        self._buf[offset : offset + 2] = v.to_bytes(2, "big")

    def getvalue(self) -> builtins.bytes:
        return bytes(self._buf)


def internet_checksum(data: bytes | bytearray | memoryview) -> int:
    """RFC 1071 one's-complement sum of 16-bit words, complemented.

    Uses 2**16 == 1 (mod 0xFFFF): the one's-complement sum of the words equals the
    whole big-endian number mod 0xFFFF, with 0xFFFF standing for a non-zero multiple.
    """
    raw = bytes(data)
    if len(raw) % 2:
        raw += b"\x00"
    number = int.from_bytes(raw, "big")
    folded = number % 0xFFFF
    if folded == 0 and number:
        folded = 0xFFFF
    return ~folded & 0xFFFF
