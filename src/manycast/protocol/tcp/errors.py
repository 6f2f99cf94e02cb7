"""The error a connection or demultiplexer raises for a call its state does not allow."""

from manycast.errors import ManycastError


class SessionError(ManycastError):
    """A call that the connection's (or demultiplexer's) current state does not allow."""
