"""The one exception every wire decoder raises on malformed input."""


class WireError(ValueError):
    """Bytes that do not decode: truncated, inconsistent, out of range or failing a checksum."""
