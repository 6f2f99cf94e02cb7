"""The one exception every wire decoder raises on malformed input."""

from manycast.errors import ManycastError


class WireError(ManycastError, ValueError):
    """Bytes that do not decode: truncated, inconsistent, out of range or failing a checksum."""
