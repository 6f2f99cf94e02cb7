"""The error a DNS server for pool names raises when it cannot be started or configured."""

from __future__ import annotations

from manycast.errors import ManycastError


class DnsServerError(ManycastError, RuntimeError):
    """A DNS server that cannot be started or configured: the message says why."""
