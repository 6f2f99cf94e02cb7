"""Authoritative DNS servers for pool names: Debian's knot, or a small embedded one.

Both serve the zones `naming.pool_zones()` writes (the pool zone and the
reverse zones of the multicast space) on a loopback port and accept DNS UPDATE
(RFC 2136) signed with one TSIG key (RFC 8945), refusing unsigned updates with
NOTAUTH as knot does, so `naming.publish()` and the lookups behave the same on
either. By concept:

* `authority`: the server's logic, sans I/O (queries, and `update` for UPDATE).
* `embedded`: `EmbeddedServer`, that logic on asyncio UDP and TCP, or in a thread.
* `knot`: `KnotServer`, knotd configured, started and stopped.
"""

from manycast.dns.authority import Authority, DnsStats
from manycast.dns.embedded import EmbeddedServer, run, serve
from manycast.dns.errors import DnsServerError
from manycast.dns.knot import KnotServer, knot_available, knotd_path

__all__ = [
    "Authority",
    "DnsServerError",
    "DnsStats",
    "EmbeddedServer",
    "KnotServer",
    "knot_available",
    "knotd_path",
    "run",
    "serve",
]
