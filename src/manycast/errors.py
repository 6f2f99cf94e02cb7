"""The one base of every error manycast raises on purpose, and its typed families.

A caller that wants "anything manycast refused" catches `ManycastError`; one that
cares which part refused catches a family. Each family also subclasses the
builtin a caller would have caught before (ValueError, OSError, ...), so code
written against those keeps working.
"""

from __future__ import annotations


class ManycastError(Exception):
    """Base of every error manycast raises on purpose."""


class ConfigError(ManycastError, ValueError):
    """A configuration, argument or file that cannot be used as given."""


class LabError(ManycastError, RuntimeError):
    """The kernel lab cannot do what was asked (not root, not up, a daemon failed)."""


class DriverError(ManycastError, OSError):
    """A driver cannot host a node (a port that will not bind, a closed network)."""


class NamingError(ManycastError, ValueError):
    """A pool name that cannot be published or read: the message says why."""


class NamingTimeout(NamingError):
    """The DNS server did not answer within the lookup's or update's timeout."""


class NamingRefused(NamingError):
    """The DNS server answered no: the name or record is not there, or it refused."""


class BadRecord(NamingError):
    """A record that is there but does not validate (encoding, mismatch, conflict)."""
