"""MPLS label stacks (RFC 3032) and their carriage in UDP (RFC 7510): the VIP pool's tags.

Layout, big-endian, field widths in bits:

    entry     label(20) traffic-class(3) bottom-of-stack(1) ttl(8)
    stack     entry... : 1..8 entries, the bottom-of-stack bit set on the last only
    payload   stack, then the inner IPv4 or IPv6 packet (the UDP payload, RFC 7510)
    packet    IPv4 or IPv6 header, UDP header to port 6635 from an entropy port, payload

Strictness: label 3 (implicit null) only ever means "pop" to the control plane
and never appears on the wire; the router alert label (1) is not allowed at the
bottom of a stack (RFC 3032 §2.1); an explicit null at the bottom must sit on an
inner packet of its family (0: IPv4, 2: IPv6). Every check lives in the
dataclasses' `__post_init__`, so a value that cannot be decoded cannot be built
either, and both raise `WireError`.

Routers use the fast path at the bottom (`peek_top`, `swap_top`, `pop`, `push`),
which works on the bytes of a payload without building dataclasses, and over IPv4
`read_labelled_v4` with a `TunnelV4` per next hop (headers precomputed). Labels
follow the pipe model (RFC 3443): a label's TTL counts the hops of its
label-switched path, and the inner packet's own TTL is left alone.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from manycast.wire.cursor import Reader, internet_checksum
from manycast.wire.errors import WireError
from manycast.wire.ip import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPV4_HEADER_LEN,
    UDP_HEADER_LEN,
    IPv4Header,
    IPv4Packet,
    IPv6Header,
    IPv6Packet,
    UDPDatagram,
)

IPV4_EXPLICIT_NULL = 0
ROUTER_ALERT = 1
IPV6_EXPLICIT_NULL = 2
IMPLICIT_NULL = 3
FIRST_UNRESERVED = 16
MAX_LABEL = (1 << 20) - 1
MAX_DEPTH = 8
ENTRY_LEN = 4

MPLS_UDP_PORT = 6635
ENTROPY_PORT_BASE = 49152  # RFC 7510 §3: the source port is an entropy value in 49152..65535
MAX_UDP_PAYLOAD = 0xFFFF - UDP_HEADER_LEN
IPPROTO_SCTP = 132

Address = IPv4Address | IPv6Address

_WORD = struct.Struct("!I")
_EXPLICIT_NULL_FAMILY = {IPV4_EXPLICIT_NULL: 4, IPV6_EXPLICIT_NULL: 6}
_PORTED = frozenset((IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP))


def _check_int(what: str, name: str, value: object, top: int) -> None:
    # bool is an int subclass, but True for a TTL is a caller's mistake.
    if isinstance(value, bool) or not isinstance(value, int):
        raise WireError(f"{what}: {name} must be an int, not {type(value).__name__}")
    if not 0 <= value <= top:
        raise WireError(f"{what}: {name} {value} out of range 0..{top}")


def _check_label(what: str, label: object) -> None:
    _check_int(what, "label", label, MAX_LABEL)
    if label == IMPLICIT_NULL:
        raise WireError(f"{what}: label 3 (implicit null) never appears on the wire")


def _check_bottom(what: str, label: int, inner: bytes | None) -> None:
    """Rules for the bottom entry; `inner` is the packet under it, when known."""
    if label == ROUTER_ALERT:
        raise WireError(f"{what}: router alert label 1 at the bottom of the stack")
    family = _EXPLICIT_NULL_FAMILY.get(label)
    if family is not None and inner is not None and inner and inner[0] >> 4 != family:
        raise WireError(
            f"{what}: explicit null label {label} on an IPv{inner[0] >> 4} packet, not IPv{family}"
        )


def _check_inner(what: str, inner: bytes) -> None:
    if not inner:
        raise WireError(f"{what}: no inner packet under the label stack")
    if inner[0] >> 4 not in (4, 6):
        raise WireError(f"{what}: inner packet is not IPv4 or IPv6 (version {inner[0] >> 4})")


@dataclass(frozen=True, slots=True)
class LabelEntry:
    """One RFC 3032 label stack entry."""

    label: int
    tc: int
    bottom: bool
    ttl: int

    def __post_init__(self) -> None:
        what = "label stack entry"
        _check_label(what, self.label)
        _check_int(what, "tc", self.tc, 7)
        if not isinstance(self.bottom, bool):
            raise WireError(f"{what}: bottom must be a bool, not {self.bottom!r}")
        _check_int(what, "ttl", self.ttl, 0xFF)

    def to_wire(self) -> bytes:
        return _WORD.pack(self.label << 12 | self.tc << 9 | self.bottom << 8 | self.ttl)

    @classmethod
    def read(cls, r: Reader) -> LabelEntry:
        word = r.u32("label stack entry")
        return cls(word >> 12, word >> 9 & 7, bool(word & 0x100), word & 0xFF)

    @classmethod
    def from_wire(cls, data: bytes | bytearray | memoryview) -> LabelEntry:
        r = Reader(data, "label stack entry")
        entry = cls.read(r)
        r.expect_end()
        return entry


@dataclass(frozen=True, slots=True)
class LabelStack:
    """1..8 entries, top first; the bottom-of-stack bit is set on the last one only."""

    entries: tuple[LabelEntry, ...]

    def __post_init__(self) -> None:
        what = "label stack"
        given: object = self.entries
        if isinstance(given, bytes | str) or not isinstance(given, Iterable):
            raise WireError(f"{what}: entries must be a sequence of LabelEntry, not {given!r}")
        entries = tuple(given)
        object.__setattr__(self, "entries", entries)  # lists compare like decoded tuples
        if not 1 <= len(entries) <= MAX_DEPTH:
            raise WireError(f"{what}: {len(entries)} entries, not 1..{MAX_DEPTH}")
        for depth, entry in enumerate(entries):
            if not isinstance(entry, LabelEntry):
                raise WireError(f"{what}: entry {depth} is not a LabelEntry: {entry!r}")
            if entry.bottom != (depth == len(entries) - 1):
                where = "set before the last entry" if entry.bottom else "not set on the last entry"
                raise WireError(f"{what}: bottom-of-stack bit {where} (entry {depth})")
        _check_bottom(what, entries[-1].label, None)

    @classmethod
    def of(cls, *labels: int, ttl: int = 64, tc: int = 0) -> LabelStack:
        """A stack of these labels, top first, each with `ttl` and `tc`."""
        last = len(labels) - 1
        return cls(tuple(LabelEntry(label, tc, i == last, ttl) for i, label in enumerate(labels)))

    @property
    def top(self) -> LabelEntry:
        return self.entries[0]

    @property
    def labels(self) -> tuple[int, ...]:
        return tuple(entry.label for entry in self.entries)

    def to_wire(self) -> bytes:
        return b"".join(entry.to_wire() for entry in self.entries)

    @classmethod
    def read(cls, r: Reader) -> LabelStack:
        """Entries up to and including the first with the bottom-of-stack bit."""
        entries: list[LabelEntry] = []
        while not entries or not entries[-1].bottom:
            if len(entries) == MAX_DEPTH:
                raise WireError(f"{r.what}: no bottom of stack within {MAX_DEPTH} entries")
            entries.append(LabelEntry.read(r))
        return cls(tuple(entries))

    @classmethod
    def from_wire(cls, data: bytes | bytearray | memoryview) -> LabelStack:
        r = Reader(data, "label stack")
        stack = cls.read(r)
        r.expect_end()
        return stack


def split(data: bytes | bytearray | memoryview) -> tuple[LabelStack, bytes]:
    """The label stack at the front of `data`, and the bytes after it (the inner packet)."""
    r = Reader(data, "label stack")
    stack = LabelStack.read(r)
    return stack, r.rest()


@dataclass(frozen=True, slots=True)
class MplsInUdp:
    """An RFC 7510 UDP payload: a label stack on an inner IPv4 or IPv6 packet."""

    stack: LabelStack
    inner: bytes

    def __post_init__(self) -> None:
        what = "MPLS-in-UDP payload"
        if not isinstance(self.stack, LabelStack):
            raise WireError(f"{what}: stack must be a LabelStack, not {self.stack!r}")
        if not isinstance(self.inner, bytes | bytearray | memoryview):
            raise WireError(f"{what}: inner must be bytes, not {type(self.inner).__name__}")
        object.__setattr__(self, "inner", bytes(self.inner))
        _check_inner(what, self.inner)
        _check_bottom(what, self.stack.entries[-1].label, self.inner)
        size = ENTRY_LEN * len(self.stack.entries) + len(self.inner)
        if size > MAX_UDP_PAYLOAD:
            raise WireError(f"{what}: {size} bytes, more than a UDP payload's {MAX_UDP_PAYLOAD}")

    def to_wire(self) -> bytes:
        return self.stack.to_wire() + self.inner

    @classmethod
    def from_wire(cls, payload: bytes | bytearray | memoryview) -> MplsInUdp:
        r = Reader(payload, "MPLS-in-UDP payload")
        stack = LabelStack.read(r)
        return cls(stack, r.rest())


def _flow_bytes(inner: bytes) -> bytes:
    """Addresses, protocol and ports of an IP packet (flow label too for IPv6), by offset."""
    if not inner:
        return b""
    if inner[0] >> 4 == 6:
        protocol = inner[6] if len(inner) > 6 else 0
        ports = inner[40:44] if protocol in _PORTED else b""
        flow_label = int.from_bytes(inner[1:4], "big") & 0xFFFFF
        return flow_label.to_bytes(3, "big") + inner[6:7] + inner[8:40] + ports
    start = (inner[0] & 0x0F) * 4
    protocol = inner[9] if len(inner) > 9 else 0
    first_fragment = int.from_bytes(inner[6:8], "big") & 0x1FFF == 0
    ports = inner[start : start + 4] if protocol in _PORTED and first_fragment else b""
    return inner[9:10] + inner[12:20] + ports


def entropy_port(inner: bytes) -> int:
    """The RFC 7510 source port for `inner`: one flow always gets one port in 49152..65535,
    so links that spread traffic by UDP ports keep each flow on one path, in order."""
    return ENTROPY_PORT_BASE | zlib.crc32(_flow_bytes(inner)) & 0x3FFF


def encapsulate(
    src: Address,
    dst: Address,
    stack: LabelStack,
    inner_packet: bytes,
    ttl: int = 64,
    *,
    checksum: bool = True,
) -> bytes:
    """A whole IP + UDP packet from `src` to `dst`'s port 6635 carrying `stack` on
    `inner_packet`; `checksum=False` sends a zero UDP checksum (IPv4 only, RFC 7510 §3)."""
    payload = MplsInUdp(stack, inner_packet).to_wire()
    udp = UDPDatagram(entropy_port(inner_packet), MPLS_UDP_PORT, payload)
    if isinstance(src, IPv4Address) and isinstance(dst, IPv4Address):
        segment = udp.to_wire(src, dst, checksum=checksum)
        return IPv4Packet.make(src, dst, IPPROTO_UDP, segment, ttl=ttl).to_wire()
    if isinstance(src, IPv6Address) and isinstance(dst, IPv6Address):
        if not checksum:
            raise WireError("MPLS-in-UDP over IPv6 must carry a UDP checksum")
        segment = udp.to_wire(src, dst)
        return IPv6Packet.make(src, dst, IPPROTO_UDP, segment, hop_limit=ttl).to_wire()
    raise WireError(f"MPLS-in-UDP: {src!r} and {dst!r} are not two addresses of one family")


def decapsulate(
    packet: bytes | bytearray | memoryview,
) -> tuple[IPv4Header | IPv6Header, LabelStack, bytes]:
    """The outer header, label stack and inner packet of an MPLS-in-UDP packet, checked
    strictly (checksums included); `WireError` if it is anything else."""
    data = bytes(packet)
    version = data[0] >> 4 if data else 0
    header: IPv4Header | IPv6Header
    if version == 4:
        outer4 = IPv4Packet.from_wire(data)
        header, protocol, payload = outer4.header, outer4.header.protocol, outer4.payload
        if header.more_fragments or header.fragment_offset:
            raise WireError("MPLS-in-UDP packet: a fragment (reassemble first)")
    elif version == 6:
        outer6 = IPv6Packet.from_wire(data)
        header, protocol, payload = outer6.header, outer6.protocol, outer6.payload
    else:
        raise WireError(f"MPLS-in-UDP packet: IP version {version}, neither 4 nor 6")
    if protocol != IPPROTO_UDP:
        raise WireError(f"MPLS-in-UDP packet: protocol {protocol}, not UDP ({IPPROTO_UDP})")
    datagram = UDPDatagram.from_wire(payload, header.src, header.dst)
    if datagram.dst_port != MPLS_UDP_PORT:
        raise WireError(
            f"MPLS-in-UDP packet: UDP destination port {datagram.dst_port}, not {MPLS_UDP_PORT}"
        )
    mpls = MplsInUdp.from_wire(datagram.payload)
    return header, mpls.stack, mpls.inner


# --- Fast path for routers ------------------------------------------------------------
# The payload is an MPLS-in-UDP payload (or what follows a label just popped). These
# read and patch the top entry only; `MplsInUdp.from_wire` is the strict check.


def _top_word(payload: bytes) -> int:
    if len(payload) < ENTRY_LEN:
        raise WireError(f"label stack: {len(payload)} bytes, shorter than one entry")
    word: int = _WORD.unpack_from(payload)[0]
    return word


def peek_top(payload: bytes) -> tuple[int, int, bool, int]:
    """(label, tc, bottom, ttl) of the top entry, unchecked beyond its length."""
    word = _top_word(payload)
    return word >> 12, word >> 9 & 7, bool(word & 0x100), word & 0xFF


def swap_top(payload: bytes, new_label: int) -> bytes | None:
    """The payload with its top label replaced by `new_label` and its TTL one less, or
    None when the TTL runs out here (RFC 3032 §2.4.1: the packet is dropped).

    A caller whose outgoing label is implicit null calls `pop` instead.
    """
    word = _top_word(payload)
    _check_label("label swap", new_label)
    if word & 0x100:
        _check_bottom("label swap", new_label, payload[ENTRY_LEN:])
    ttl = word & 0xFF
    if ttl <= 1:
        return None
    return _WORD.pack(new_label << 12 | word & 0xF00 | ttl - 1) + payload[ENTRY_LEN:]


def pop(payload: bytes) -> bytes | None:
    """The payload without its top entry (the next entry, or the inner packet after the
    bottom one), or None when the popped entry's TTL runs out here."""
    word = _top_word(payload)
    if word & 0xFF <= 1:
        return None
    return payload[ENTRY_LEN:]


def push(packet: bytes, label: int, ttl: int = 64, tc: int = 0) -> bytes:
    """An unlabelled IPv4 or IPv6 packet with one label pushed: an MPLS-in-UDP payload."""
    _check_inner("label push", packet)
    if len(packet) > MAX_UDP_PAYLOAD - ENTRY_LEN:
        raise WireError(f"label push: a packet of {len(packet)} bytes leaves no room for a label")
    _check_label("label push", label)
    _check_bottom("label push", label, packet)
    _check_int("label push", "ttl", ttl, 0xFF)
    _check_int("label push", "tc", tc, 7)
    return _WORD.pack(label << 12 | tc << 9 | 0x100 | ttl) + packet


# --- Fast path for MPLS-in-UDP over IPv4 ------------------------------------------------
# A router switches every labelled packet: these build and read the outer IPv4 + UDP
# headers with struct alone. The UDP checksum is zero (RFC 7510 §3 allows it over IPv4:
# the label and the inner packet's own checks cover what matters); the IPv4 header
# checksum is computed and checked as always.

_OUTER_V4 = struct.Struct("!BBHHHBBHII HHHH")
OUTER_V4_LEN = _OUTER_V4.size  # 28: an IPv4 header without options, then UDP


def wrap_v4(src: int, dst: int, payload: bytes, sport: int, ttl: int = 1) -> bytes:
    """An MPLS-in-UDP `payload` (label stack and inner packet) in IPv4 + UDP from
    `src` to `dst` (addresses as ints), UDP checksum zero."""
    total = OUTER_V4_LEN + len(payload)
    if total > 0xFFFF:
        raise WireError(f"MPLS-in-UDP: {total} bytes do not fit one IPv4 packet")
    udp_len = total - IPV4_HEADER_LEN
    header = _OUTER_V4.pack(
        0x45, 0, total, 0, 0, ttl, IPPROTO_UDP, 0, src, dst, sport, MPLS_UDP_PORT, udp_len, 0
    )
    checksum = internet_checksum(header[:IPV4_HEADER_LEN])
    return header[:10] + checksum.to_bytes(2, "big") + header[12:] + payload


def unwrap_v4(packet: bytes) -> tuple[int, int, bytes]:
    """(outer source, UDP source port, MPLS-in-UDP payload) of an IPv4 MPLS-in-UDP
    packet; checks the header, its checksum, the lengths, the port and a UDP checksum
    when one is sent. `WireError` otherwise (the strict `decapsulate` says more)."""
    if len(packet) < OUTER_V4_LEN:
        raise WireError(f"MPLS-in-UDP packet: {len(packet)} bytes, shorter than its headers")
    (ver_ihl, _, total, _, frag, _, protocol, _, src, dst,
     sport, dport, udp_len, udp_sum) = _OUTER_V4.unpack_from(packet)  # fmt: skip
    if ver_ihl != 0x45 or protocol != IPPROTO_UDP or dport != MPLS_UDP_PORT:
        raise WireError("not an MPLS-in-UDP packet over IPv4 without options")
    if total != len(packet) or udp_len != total - IPV4_HEADER_LEN or frag & 0x3FFF:
        raise WireError("MPLS-in-UDP packet: lengths disagree, or a fragment")
    if internet_checksum(packet[:IPV4_HEADER_LEN]) != 0:
        raise WireError("MPLS-in-UDP packet: bad IPv4 header checksum")
    if udp_sum:
        UDPDatagram.from_wire(packet[IPV4_HEADER_LEN:], IPv4Address(src), IPv4Address(dst))
    return src, sport, packet[OUTER_V4_LEN:]


# --- Switching with precomputed headers (IPv4) -------------------------------------------
# A router's per-packet work on a label-switched path: read the outer headers and the top
# entry of what arrives with one unpack, then write what leaves with one pack and one
# join. Everything that depends only on the next hop (addresses, TTL, protocol, the
# outgoing label) is computed once per hop in a `TunnelV4`.

_LABELLED_V4 = struct.Struct("!5IHIHI")  # IPv4 header as words, UDP (port+length), top entry
_UDP_ENTRY = struct.Struct("!HIHI")  # from byte 20: source port, port+length, sum, top entry
_OUTER_HEAD = struct.Struct("!HH4xHH8s")  # an IPv4 header as written: identification 0, ...
_UDP_TAIL = struct.Struct("!HHH2xI")  # ... then UDP, checksum zero, and the top entry
_DPORT_HIGH = MPLS_UDP_PORT << 16
_REMEMBERED = 4096  # headers a reader or a tunnel keeps (then it forgets them all)
LABELLED_V4_LEN = OUTER_V4_LEN + ENTRY_LEN  # 32: headers and one entry
# CRC-32 of each protocol number, the first byte `_flow_bytes` hashes for IPv4
_PROTOCOL_CRC = tuple(zlib.crc32(bytes((p,))) for p in range(256))


def read_labelled_v4(packet: bytes) -> tuple[int, int]:
    """(UDP source port, top label stack entry as a 32-bit word) of an IPv4 MPLS-in-UDP
    packet, with every check of `unwrap_v4` (header, header checksum, lengths, port, a
    UDP checksum when one is sent) and room for one entry. `WireError` otherwise."""
    n = len(packet)
    if n < LABELLED_V4_LEN:
        raise WireError(f"MPLS-in-UDP packet: {n} bytes, shorter than its headers")
    w0, w1, w2, w3, w4, sport, port_length, udp_sum, word = _LABELLED_V4.unpack_from(packet)
    # Version and header length 0x45, any TOS, total length n; no fragment; UDP; to
    # port 6635 with a UDP length of n - 20: one test of each word for all of them.
    if (
        w0 & 0xFF00FFFF != 0x45000000 | n
        or w1 & 0x3FFF
        or w2 & 0xFF0000 != IPPROTO_UDP << 16
        or port_length != _DPORT_HIGH | n - IPV4_HEADER_LEN
    ):
        if w0 >> 24 != 0x45 or w2 >> 16 & 0xFF != IPPROTO_UDP or port_length >> 16 != MPLS_UDP_PORT:
            raise WireError("not an MPLS-in-UDP packet over IPv4 without options")
        raise WireError("MPLS-in-UDP packet: lengths disagree, or a fragment")
    # RFC 1071 over 32-bit words: 2**32 == 1 (mod 0xFFFF), as in `internet_checksum`. A
    # right header sums to a non-zero multiple of 0xFFFF (its first word is not zero).
    if (w0 + w1 + w2 + w3 + w4) % 0xFFFF:
        raise WireError("MPLS-in-UDP packet: bad IPv4 header checksum")
    if udp_sum:
        UDPDatagram.from_wire(packet[IPV4_HEADER_LEN:], IPv4Address(w3), IPv4Address(w4))
    return sport, word


class LabelledReaderV4:
    """`read_labelled_v4` for one router, remembering the IPv4 headers it has checked.
    What one upstream router sends a tree has one outer header per packet length
    (identification 0, TTL 1, no options: `wrap_v4`, `TunnelV4`), so the header's
    checks (checksum included) run once per upstream router and length, and a packet
    whose first 20 bytes are a header already found good (total length included) has
    only its UDP header checked. Same answers and errors as `read_labelled_v4`."""

    __slots__ = ("_good",)

    def __init__(self) -> None:
        self._good: dict[bytes, int] = {}  # a checked IPv4 header -> its total length

    def read(self, packet: bytes) -> tuple[int, int]:
        n = len(packet)
        if self._good.get(packet[:IPV4_HEADER_LEN]) == n:
            sport, port_length, udp_sum, word = _UDP_ENTRY.unpack_from(packet, IPV4_HEADER_LEN)
            if port_length == _DPORT_HIGH | n - IPV4_HEADER_LEN and not udp_sum:
                return sport, word
        found = read_labelled_v4(packet)  # raises WireError for what is not one
        if len(self._good) >= _REMEMBERED:
            self._good.clear()  # many upstream routers and lengths: stay bounded
        self._good[packet[:IPV4_HEADER_LEN]] = n
        return found


def entropy_port_v4(inner: bytes) -> int:
    """`entropy_port(inner)` for an IPv4 packet, with one slice when it has ports."""
    if (
        len(inner) >= 24
        and inner[0] == 0x45
        and inner[9] in _PORTED
        and not (inner[6] & 0x1F or inner[7])  # no fragment offset
    ):
        crc = zlib.crc32(inner[12:24], _PROTOCOL_CRC[inner[9]])
        return ENTROPY_PORT_BASE | crc & 0x3FFF
    return entropy_port(inner)


class TunnelV4:
    """One next hop of a label-switched path over MPLS-in-UDP and IPv4: from `src` to
    `dst` (addresses as ints), labelled `label`, outer TTL `ttl`, UDP checksum zero
    (RFC 7510 §3). The outer headers are precomputed, the IPv4 header checksum as the
    one's-complement sum of its fixed words, and the IPv4 header for each total length
    met (that sum plus the length, folded): per packet only the UDP header (entropy
    port, length) and the entry (its TTL) are written. Bytes are exactly those of
    `wrap_v4` on `swap_top` or `push`."""

    __slots__ = (
        "_addresses", "_checked", "_heads", "_sum", "_ttl_protocol", "_word", "dst", "label", "src",
    )  # fmt: skip

    def __init__(self, src: int, dst: int, label: int, ttl: int = 1) -> None:
        _check_int("tunnel", "source address", src, 0xFFFFFFFF)
        _check_int("tunnel", "destination address", dst, 0xFFFFFFFF)
        _check_label("tunnel", label)
        _check_int("tunnel", "ttl", ttl, 0xFF)
        self.src, self.dst, self.label = src, dst, label
        self._word = label << 12
        self._ttl_protocol = ttl << 8 | IPPROTO_UDP
        self._addresses = _WORD.pack(src) + _WORD.pack(dst)
        self._heads: dict[int, bytes] = {}  # total length -> the IPv4 header
        fixed = 0x4500 + self._ttl_protocol + (src >> 16) + (src & 0xFFFF)
        fixed += (dst >> 16) + (dst & 0xFFFF)
        self._sum = fixed % 0xFFFF or 0xFFFF  # one's complement: never 0 (0x4500 is in it)
        # Labels with rules for the bottom of a stack are checked per packet.
        self._checked = label in _EXPLICIT_NULL_FAMILY or label == ROUTER_ALERT

    def swap(self, packet: bytes, sport: int, word: int) -> bytes | None:
        """The packet that leaves for a labelled `packet` (read by `read_labelled_v4`,
        which gave `sport` and `word`): our label on top, its TTL one less, same source
        port. None when the TTL runs out here (RFC 3032 §2.4.1: dropped)."""
        if self._checked and word & 0x100:
            _check_bottom("label swap", self.label, packet[LABELLED_V4_LEN:])
        ttl = word & 0xFF
        if ttl <= 1:
            return None
        total = len(packet)
        return b"".join(
            (
                self._heads.get(total) or self._head(total),
                _UDP_TAIL.pack(
                    sport, MPLS_UDP_PORT, total - IPV4_HEADER_LEN,
                    self._word | word & 0xF00 | ttl - 1,
                ),
                packet[LABELLED_V4_LEN:],
            )
        )  # fmt: skip

    def push(self, inner: bytes) -> bytes:
        """An unlabelled IPv4 `inner` packet on the path: one entry with its TTL and
        traffic class 0, from the flow's entropy port."""
        total = len(inner) + LABELLED_V4_LEN
        if total > 0xFFFF or len(inner) < IPV4_HEADER_LEN or inner[0] >> 4 != 4:
            _check_inner("label push", inner)
            if total > 0xFFFF:
                raise WireError(f"label push: {total} bytes do not fit one IPv4 packet")
            raise WireError("label push: the fast path carries whole IPv4 packets only")
        if self._checked:
            _check_bottom("label push", self.label, inner)
        return b"".join(
            (
                self._heads.get(total) or self._head(total),
                _UDP_TAIL.pack(
                    entropy_port_v4(inner), MPLS_UDP_PORT, total - IPV4_HEADER_LEN,
                    self._word | 0x100 | inner[8],
                ),
                inner,
            )
        )  # fmt: skip

    def _head(self, total: int) -> bytes:
        """The IPv4 header of a packet of `total` bytes, remembered."""
        s = self._sum + total  # both <= 0xFFFF: one fold is enough
        s = (s & 0xFFFF) + (s >> 16)
        head = _OUTER_HEAD.pack(0x4500, total, self._ttl_protocol, s ^ 0xFFFF, self._addresses)
        if len(self._heads) >= _REMEMBERED:
            self._heads.clear()
        self._heads[total] = head
        return head
