"""A router's fast path: forwarding decisions a driver may apply without calling into the router.

The router's forwarding cache (`Router._mfc`) answers "where do copies of a packet
from S to G go"; a driver still pays a call into the node, a header peek, a
`Frame` per copy and the outbox hand-over for every packet. For the packets whose
fate depends on nothing but their addresses, the router also publishes that answer
here, keyed by the addresses as they sit in the packet, so that a driver reading a
batch of datagrams can look each one up and send the copies itself, as a kernel
serves its multicast forwarding cache without an upcall.

An entry exists only while the router would do exactly this with the packet:
- installed when the router forwards such a packet itself: a multicast group
  (not link-local), not the VIP, not a group whose packets R4 may pin to a server's
  tree, sent from a source whose right to send does not depend on time (no
  admission, a router-facing interface, or a public group), with at least one copy
  to send on an interface other than the arrival one;
- dropped, with every other entry, when the router's membership of any group
  changes (`invalidate`): a join, a leave, an expiry, a member-down notice.

Entries are kept per portion, not per client: a packet's fate depends only on the
bits of its source that some member's mask looks at (`source_mask`, the union of
every mask the router's members joined with), so the key is the source with the
other bits cleared, then the group. A pool's portions cut the space on a few index
bits: a million client addresses fill as many entries as the portions' cells, not
a million. A source-specific join (a whole address) makes the mask whole again.

The rules a driver follows (`lookup` states them in code):
- the key of a datagram is its addresses (IPv4: bytes 12-19; IPv6, `family` 6:
  bytes 8-39), source then destination, as one big-endian number, ANDed with
  `key_mask`;
- only a datagram that hits the table of its arrival interface, is of the
  family with a header the router accepts (IPv4: a first byte 0x45-0x4F; IPv6:
  version 6, 40 bytes at least) and has a TTL or hop limit above 1 is served
  here; every other datagram goes to `Router.receive` as before (so the router
  still counts no-member, TTL-expired and malformed packets, and sees every join);
- each copy is `forward_copy(packet)` (the TTL or hop limit one less, the IPv4
  checksum patched, after those checks) sent on the pair's interface to the
  pair's neighbour, exactly the frames the router would have queued;
- `credit(n)` after the batch: `n` copies sent, counted in the router's
  `multicast_forwarded` as if it had queued them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from manycast.wire.ip import IPV6_HEADER_LEN, forward_copy_v4

Outs = tuple[tuple[str, int], ...]  # (interface, neighbour address) of each copy

# Entries per interface before the table starts afresh (as the router's own caches).
FAST_PATH_LIMIT = 1 << 16


class _Counted(Protocol):
    multicast_forwarded: int


FULL_KEY = (1 << 64) - 1
# Per family: the width of an address, in bits, and where the addresses start.
_ADDRESS_BITS = {4: 32, 6: 128}
_ADDRESSES_AT = {4: 12, 6: 8}


class FastPath:
    """Arrival interface -> the packet's key (its source's masked bits, then its
    destination) -> the copies to send. The per-interface tables are created once
    and only ever cleared in place, so a driver may hold one across a batch."""

    __slots__ = ("_at", "_bits", "_stats", "family", "generation", "key_mask", "served", "tables")

    def __init__(self, interfaces: Iterable[str], stats: _Counted, family: int = 4) -> None:
        self.tables: dict[str, dict[int, Outs]] = {name: {} for name in interfaces}
        self.family = family
        self._bits = _ADDRESS_BITS[family]
        self._at = _ADDRESSES_AT[family]
        self.key_mask = (1 << 2 * self._bits) - 1
        self._stats = stats
        # Set by a driver that serves the tables; until then nothing is installed
        # (a driver that hands every packet to the router pays nothing for them).
        self.served = False
        # Counts `invalidate` calls: a driver that keeps its own copy of the tables
        # (translated to its sockets) drops it when this moves.
        self.generation = 0

    def install(self, iface: str, packet: bytes, outs: Outs) -> None:
        """The router forwarded `packet`, arrived on `iface`, to `outs` (the arrival
        interface already left out), and would do so again for any packet with the
        same addresses until `invalidate`."""
        table = self.tables.get(iface)
        if table is None or not outs or not self.served:
            return
        if len(table) >= FAST_PATH_LIMIT:
            table.clear()
        table[self.key(packet)] = outs

    def key(self, packet: bytes) -> int:
        at = self._at
        return int.from_bytes(packet[at : at + self._bits // 4], "big") & self.key_mask

    def invalidate(self, source_mask: int = -1) -> None:
        """Membership changed: every entry goes; `source_mask` is the union of the
        masks the router's members now join with (-1: every bit)."""
        for table in self.tables.values():
            table.clear()
        whole = (1 << self._bits) - 1
        self.key_mask = (source_mask & whole) << self._bits | whole
        self.generation += 1

    def credit(self, copies: int) -> None:
        """A driver sent `copies` forwarded copies from the tables."""
        self._stats.multicast_forwarded += copies

    def lookup(self, table: dict[int, Outs], packet: bytes) -> Outs | None:
        """The copies of `packet` the fast path may send, or None: hand it to the
        router. (Drivers inline this test on their per-datagram path.)"""
        outs = table.get(self.key(packet))
        return outs if outs is not None and self.forward_copy(packet) is not None else None

    def forward_copy(self, packet: bytes) -> bytearray | None:
        """What the router sends on for a packet with an entry, or None (not of the
        family, a header the router refuses, TTL or hop limit 1 or less)."""
        if self.family == 4:
            return forward_copy_v4(packet)
        if len(packet) < IPV6_HEADER_LEN or packet[0] >> 4 != 6 or packet[7] <= 1:
            return None
        copy = bytearray(packet)
        copy[7] -= 1
        return copy
