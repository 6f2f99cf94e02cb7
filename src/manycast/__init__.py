"""manycast: one service on many servers behind one multicast address."""

__version__ = "0.1.0"
