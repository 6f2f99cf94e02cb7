"""Byte-exact, symmetric codecs. Every decoder raises only `WireError` on bad input."""

from manycast.wire.cursor import Reader, Writer, internet_checksum
from manycast.wire.errors import WireError

__all__ = ["Reader", "WireError", "Writer", "internet_checksum"]
