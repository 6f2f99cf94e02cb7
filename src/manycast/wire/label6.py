"""MPLS-in-UDP over IPv6 (RFC 7510) on a router's fast path: an IPv6 pool's label switching.

`label.py` holds the label stack codecs and the strict `encapsulate` and
`decapsulate` for either family, and IPv4's fast path. This module is IPv6's:

    outer     IPv6 header (40 bytes: no extension headers, hop limit 1) from the
              router to the next one, then UDP to port 6635 from an entropy port
    payload   the label stack entry, then the inner IPv6 packet

Over IPv6 the UDP checksum is required (RFC 7510 §3 allows a zero checksum over
IPv4 only, RFC 6935/6936 conditions aside): a packet that arrives without one,
or with a wrong one, is refused. Writing one costs a pass over the inner packet
when a label is pushed; a swap changes only the addresses and the label entry,
so the checksum is patched (RFC 1624) from the one just checked.

The sums use 2**16 == 1 (mod 0xFFFF), as `cursor.internet_checksum` does: the
one's-complement sum of a run of 16-bit words is the run's big-endian number
mod 0xFFFF.
"""

from __future__ import annotations

import struct

from manycast.wire.errors import WireError
from manycast.wire.ip import IPPROTO_UDP, IPV4_HEADER_LEN, IPV6_HEADER_LEN, UDP_HEADER_LEN
from manycast.wire.label import (
    _EXPLICIT_NULL_FAMILY,
    ENTRY_LEN,
    MPLS_UDP_PORT,
    ROUTER_ALERT,
    _check_bottom,
    _check_inner,
    _check_int,
    _check_label,
    entropy_port,
)

OUTER_V6_LEN = IPV6_HEADER_LEN + UDP_HEADER_LEN  # 48
LABELLED_V6_LEN = OUTER_V6_LEN + ENTRY_LEN  # 52: headers and one entry
_MAX_ADDRESS = (1 << 128) - 1

# The outer headers as written: version 6 (class and flow label 0), payload length,
# next header UDP, hop limit; addresses; UDP ports, length, checksum; the top entry.
_OUTER_V6 = struct.Struct("!IHBB32sHHHHI")
# The same read back: the first word, payload length, next header, (hop limit and
# addresses); source port, destination port, length, checksum, the top entry.
_READ_V6 = struct.Struct("!IHB33xHHHHI")


def _sum16(data: bytes) -> int:
    """The one's-complement sum of `data`'s 16-bit words, as a number mod 0xFFFF."""
    if len(data) % 2:
        data += b"\0"
    return int.from_bytes(data, "big") % 0xFFFF


def _udp_checksum(partial: int) -> int:
    """The UDP checksum field for a sum (mod 0xFFFF) of everything it covers with
    the field zero: the sum never is zero (port 6635 is in it), so 0xFFFF stands for
    a multiple; a checksum that comes out 0 is sent as 0xFFFF (RFC 768)."""
    folded = partial % 0xFFFF or 0xFFFF
    return 0xFFFF - folded or 0xFFFF


def wrap_v6(src: int, dst: int, payload: bytes, sport: int, hop_limit: int = 1) -> bytes:
    """An MPLS-in-UDP `payload` (label stack and inner packet) in IPv6 + UDP from `src`
    to `dst` (addresses as ints), with its UDP checksum."""
    length = UDP_HEADER_LEN + len(payload)
    if length > 0xFFFF:
        raise WireError(f"MPLS-in-UDP: {length} bytes of UDP do not fit one IPv6 packet")
    if len(payload) < ENTRY_LEN:
        raise WireError("MPLS-in-UDP: no label stack entry in the payload")
    addresses = src.to_bytes(16, "big") + dst.to_bytes(16, "big")
    word = int.from_bytes(payload[:ENTRY_LEN], "big")
    partial = (
        int.from_bytes(addresses, "big")
        + IPPROTO_UDP
        + 2 * length
        + sport
        + MPLS_UDP_PORT
        + word
        + _sum16(payload[ENTRY_LEN:])
    )
    head = _OUTER_V6.pack(
        6 << 28, length, IPPROTO_UDP, hop_limit, addresses,
        sport, MPLS_UDP_PORT, length, _udp_checksum(partial), word,
    )  # fmt: skip
    return head + payload[ENTRY_LEN:]


def read_labelled_v6(packet: bytes) -> tuple[int, int]:
    """(UDP source port, top label stack entry as a 32-bit word) of an IPv6 MPLS-in-UDP
    packet without extension headers, its lengths, port and UDP checksum (required)
    checked, with room for one entry. `WireError` otherwise (`decapsulate` says more)."""
    n = len(packet)
    if n < LABELLED_V6_LEN:
        raise WireError(f"MPLS-in-UDP packet: {n} bytes, shorter than its headers")
    first, payload_length, next_header, sport, dport, udp_length, checksum, word = (
        _READ_V6.unpack_from(packet)
    )
    if first >> 28 != 6 or next_header != IPPROTO_UDP or dport != MPLS_UDP_PORT:
        raise WireError("not an MPLS-in-UDP packet over IPv6 without extension headers")
    if payload_length != n - IPV6_HEADER_LEN or udp_length != payload_length:
        raise WireError("MPLS-in-UDP packet: lengths disagree")
    if not checksum:
        raise WireError("MPLS-in-UDP packet over IPv6 without a UDP checksum")
    # The pseudo-header (the addresses, which the UDP segment follows at once: one
    # number from byte 8 on; the length, the next header), then the UDP segment.
    covered = int.from_bytes(packet[8:], "big")
    if n & 1:
        covered <<= 8  # the last byte padded to a word
    if (covered + udp_length + IPPROTO_UDP) % 0xFFFF:
        raise WireError("MPLS-in-UDP packet: bad UDP checksum")
    return sport, word


class LabelledReaderV6:
    """`read_labelled_v6` with the shape of `label.LabelledReaderV4` (a router holds
    one reader of its family). Every packet's checksum is checked: it covers the
    inner packet, so nothing can be skipped for a header seen before."""

    __slots__ = ()

    def read(self, packet: bytes) -> tuple[int, int]:
        return read_labelled_v6(packet)


class TunnelV6:
    """One next hop of a label-switched path over MPLS-in-UDP and IPv6: from `src` to
    `dst` (addresses as ints), labelled `label`, outer hop limit `hop_limit`. Bytes
    are exactly those of `wrap_v6` on `label.swap_top` or `label.push`."""

    __slots__ = (
        "_addresses", "_checked", "_fixed", "_hop_limit", "_sum", "_word", "dst", "label", "src",
    )  # fmt: skip

    def __init__(self, src: int, dst: int, label: int, hop_limit: int = 1) -> None:
        _check_int("tunnel", "source address", src, _MAX_ADDRESS)
        _check_int("tunnel", "destination address", dst, _MAX_ADDRESS)
        _check_label("tunnel", label)
        _check_int("tunnel", "hop limit", hop_limit, 0xFF)
        self.src, self.dst, self.label = src, dst, label
        self._word = label << 12
        self._hop_limit = hop_limit
        self._addresses = src.to_bytes(16, "big") + dst.to_bytes(16, "big")
        # What every packet's checksum holds of this hop: the addresses, UDP's number
        # and the destination port.
        self._sum = int.from_bytes(self._addresses, "big") % 0xFFFF  # the addresses' words
        self._fixed = (self._sum + IPPROTO_UDP + MPLS_UDP_PORT) % 0xFFFF
        self._checked = label in _EXPLICIT_NULL_FAMILY or label == ROUTER_ALERT

    def swap(self, packet: bytes, sport: int, word: int) -> bytes | None:
        """The packet that leaves for a labelled `packet` (read, checksum included, by
        `read_labelled_v6`, which gave `sport` and `word`): our label on top, its TTL
        one less, same source port, the checksum patched for the new addresses and
        entry. None when the TTL runs out here (RFC 3032 §2.4.1: dropped)."""
        if self._checked and word & 0x100:
            _check_bottom("label swap", self.label, packet[LABELLED_V6_LEN:])
        ttl = word & 0xFF
        if ttl <= 1:
            return None
        new_word = self._word | word & 0xF00 | ttl - 1
        # RFC 1624: the sum the old checksum stood for, less what left (the addresses,
        # the entry), plus what came.
        partial = (
            0xFFFF - (packet[46] << 8 | packet[47])
            - int.from_bytes(packet[8:40], "big") - word + self._sum + new_word
        ) % 0xFFFF or 0xFFFF  # fmt: skip
        length = len(packet) - IPV6_HEADER_LEN
        head = _OUTER_V6.pack(
            6 << 28, length, IPPROTO_UDP, self._hop_limit, self._addresses,
            sport, MPLS_UDP_PORT, length, 0xFFFF - partial or 0xFFFF, new_word,
        )  # fmt: skip
        return head + packet[LABELLED_V6_LEN:]

    def push(self, inner: bytes) -> bytes:
        """An unlabelled `inner` packet (IPv6, or IPv4) on the path: one entry with its
        TTL or hop limit and traffic class 0, from the flow's entropy port."""
        _check_inner("label push", inner)
        v6 = inner[0] >> 4 == 6
        if len(inner) < (IPV6_HEADER_LEN if v6 else IPV4_HEADER_LEN):
            raise WireError("label push: the fast path carries whole IP packets only")
        length = UDP_HEADER_LEN + ENTRY_LEN + len(inner)
        if length > 0xFFFF:
            raise WireError(f"label push: {length} bytes of UDP do not fit one IPv6 packet")
        if self._checked:
            _check_bottom("label push", self.label, inner)
        word = self._word | 0x100 | inner[7 if v6 else 8]  # its hop limit, or TTL
        sport = entropy_port(inner)
        partial = self._fixed + 2 * length + sport + word + _sum16(inner)
        head = _OUTER_V6.pack(
            6 << 28, length, IPPROTO_UDP, self._hop_limit, self._addresses,
            sport, MPLS_UDP_PORT, length, _udp_checksum(partial), word,
        )  # fmt: skip
        return head + inner
