"""The host's neighbour tables (ARP, and IPv6's neighbour discovery), made large
enough for a lab's namespaces.

Linux keeps one ARP table for all network namespaces, with one set of limits
(`net.ipv4.neigh.default.gc_thresh1..3`, 128 / 512 / 1024 by default). Every lab
namespace adds entries to it: a client one for its gateway and one for the pool's
multicast group (a multicast destination gets a neighbour entry too), a router one
per host of its LANs. A lab of 1000 clients needs some 3000; at the default hard
limit of 1024 the table stays full, and a packet whose neighbour cannot be created
is dropped where it is sent: a client's request never reaches its router (no
NOCACHE upcall, so no forwarding entry), a router's answer never reaches the
client, a server's control message never reaches its gateway.

IPv6 keeps its own table with its own limits (`net.ipv6.neigh.default.*`, the
same defaults); an IPv6 lab raises those the same way.

The limits are raised for the lab, never lowered (other labs may share the host),
and left raised: they are limits, not reservations.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("manycast.lab")

NEIGH = Path("/proc/sys/net/ipv4/neigh/default")
NEIGH6 = Path("/proc/sys/net/ipv6/neigh/default")
STATS = Path("/proc/net/stat/arp_cache")
PER_NAMESPACE = 4  # entries a lab namespace may hold, with room to spare


def wanted_limits(namespaces: int) -> dict[str, int]:
    """gc_thresh2 (GC works hard above it) and gc_thresh3 (the hard limit) for a lab."""
    soft = PER_NAMESPACE * namespaces
    return {"gc_thresh2": soft, "gc_thresh3": 2 * soft}


def fit_neighbour_table(namespaces: int, table: Path = NEIGH) -> dict[str, int]:
    """Raise the table's limits to fit `namespaces` more; the limits changed, with
    their new values (none if they already fit). The hard limit first: the soft one
    is then never above it."""
    raised: dict[str, int] = {}
    wanted = wanted_limits(namespaces)
    for name in ("gc_thresh3", "gc_thresh2"):
        path = table / name
        try:
            if int(path.read_text()) < wanted[name]:
                path.write_text(str(wanted[name]))
                raised[name] = wanted[name]
        except (OSError, ValueError) as exc:
            # A read-only /proc/sys (a container): small labs fit the defaults anyway.
            log.warning("cannot raise %s to %d (%s): packets may be lost", name, wanted[name], exc)
    if raised:
        log.info("neighbour table limits raised for %d namespaces: %s", namespaces, raised)
    return raised


def table_fulls(stats: Path = STATS) -> int | None:
    """How often the host's ARP table refused a new entry since boot (every
    namespace's, summed over CPUs; None where the kernel does not say). A UDP
    sender is not told (the kernel drops the packet and counts ENOBUFS unless the
    socket set IP_RECVERR): this counter is where a full table shows."""
    try:
        header, *rows = stats.read_text().split("\n")
        column = header.split().index("table_fulls")
        return sum(int(row.split()[column], 16) for row in rows if row.strip())
    except (OSError, ValueError, IndexError):
        return None
