"""Inner IP packets: IPv4 (RFC 791), IPv6 (RFC 8200) with Hop-by-Hop options, UDP (RFC 768).

Decoders are strict: a packet decodes only if re-encoding it gives the same bytes
back (lengths must match the data exactly, checksums must be the ones we would
write), so a decoded packet can be re-signed, forwarded or compared byte for byte.

Routers use the fast path at the bottom (`peek_v4`, `decrement_ttl_v4`, ...),
which reads fixed offsets from raw bytes without building dataclasses and does
not verify the header checksum.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import TypeVar

from manycast.wire.cursor import Reader, Writer, internet_checksum
from manycast.wire.errors import WireError

IPPROTO_HOPOPTS = 0
IPPROTO_IGMP = 2
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58

IPV4_HEADER_LEN = 20
IPV6_HEADER_LEN = 40
UDP_HEADER_LEN = 8

_V4_FIXED = struct.Struct("!BBHHHBBH4s4s")
_V4_WIDTHS = (
    ("protocol", 8),
    ("ttl", 8),
    ("total_length", 16),
    ("identification", 16),
    ("dscp", 6),
    ("ecn", 2),
    ("fragment_offset", 13),
)
_V6_WIDTHS = (
    ("next_header", 8),
    ("hop_limit", 8),
    ("payload_length", 16),
    ("traffic_class", 8),
    ("flow_label", 20),
)

# RFC 2113: type 148 (copied, class 0, number 20), length 4, value 0 ("examine packet").
ROUTER_ALERT_V4 = b"\x94\x04\x00\x00"
# RFC 2711 Hop-by-Hop option type 5; value 0 means MLD.
_HBH_ROUTER_ALERT = 5
_HBH_PAD1 = 0
_HBH_PADN = 1

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network
T = TypeVar("T")


def _check_range(name: str, value: int, bits: int) -> None:
    if not 0 <= value < 1 << bits:
        raise ValueError(f"{name} {value} does not fit in {bits} bits")


def _check_fields(obj: object, widths: tuple[tuple[str, int], ...]) -> None:
    for name, bits in widths:
        _check_range(name, getattr(obj, name), bits)


def _decoded(what: str, build: Callable[..., T], **fields: object) -> T:
    """Construct a decoded message, reporting a failed invariant as WireError."""
    try:
        return build(**fields)
    except WireError:
        raise
    except ValueError as exc:
        raise WireError(f"{what}: {exc}") from None


# --- IPv4 -----------------------------------------------------------------------------


def _walk_v4_options(options: bytes) -> Iterator[tuple[int, bytes]]:
    """Yield (type, data) for each RFC 791 option; raises WireError if malformed."""
    pos = 0
    while pos < len(options):
        kind = options[pos]
        if kind == 0:  # end of option list: the rest is padding
            return
        if kind == 1:  # no-operation
            pos += 1
            continue
        if pos + 1 >= len(options) or not 2 <= options[pos + 1] <= len(options) - pos:
            raise WireError(f"IPv4 header: option {kind} at options offset {pos} has a bad length")
        length = options[pos + 1]
        yield kind, options[pos + 2 : pos + length]
        pos += length


@dataclass(frozen=True, slots=True)
class IPv4Header:
    """An RFC 791 header; `total_length` covers header and payload (see `IPv4Packet.make`)."""

    src: IPv4Address
    dst: IPv4Address
    protocol: int
    ttl: int = 64
    total_length: int = IPV4_HEADER_LEN
    identification: int = 0
    dscp: int = 0
    ecn: int = 0
    dont_fragment: bool = False
    more_fragments: bool = False
    fragment_offset: int = 0
    options: bytes = b""

    def __post_init__(self) -> None:
        _check_fields(self, _V4_WIDTHS)
        if len(self.options) % 4 or len(self.options) > 40:
            raise ValueError(f"options length {len(self.options)} is not a multiple of 4 up to 40")
        for _ in _walk_v4_options(self.options):  # malformed options raise here
            pass
        if self.total_length < self.header_length:
            raise ValueError(
                f"total_length {self.total_length} < header length {self.header_length}"
            )

    @property
    def header_length(self) -> int:
        return IPV4_HEADER_LEN + len(self.options)

    @property
    def router_alert(self) -> bool:
        return any(kind == ROUTER_ALERT_V4[0] for kind, _ in _walk_v4_options(self.options))

    def _pack(self, checksum: int) -> bytes:
        flags = (0x4000 if self.dont_fragment else 0) | (0x2000 if self.more_fragments else 0)
        return (
            _V4_FIXED.pack(
                0x40 | self.header_length // 4,
                self.dscp << 2 | self.ecn,
                self.total_length,
                self.identification,
                flags | self.fragment_offset,
                self.ttl,
                self.protocol,
                checksum,
                self.src.packed,
                self.dst.packed,
            )
            + self.options
        )

    def to_wire(self) -> bytes:
        unsummed = self._pack(0)
        return self._pack(internet_checksum(unsummed))

    @classmethod
    def read(cls, r: Reader) -> IPv4Header:
        """Read a header from `r`, verifying version, lengths and checksum."""
        start = r.offset
        fixed = r.bytes(IPV4_HEADER_LEN, "IPv4 header")
        ver_ihl, tos, total_length, ident, frag, ttl, proto, checksum, src, dst = _V4_FIXED.unpack(
            fixed
        )
        if ver_ihl >> 4 != 4:
            raise WireError(f"IPv4 header: version {ver_ihl >> 4} at offset {start}, expected 4")
        header_length = (ver_ihl & 0x0F) * 4
        if header_length < IPV4_HEADER_LEN:
            raise WireError(f"IPv4 header: IHL {header_length // 4} < 5")
        if frag & 0x8000:
            raise WireError("IPv4 header: reserved flag bit set")
        options = r.bytes(header_length - IPV4_HEADER_LEN, "options")
        if total_length < header_length:
            raise WireError(
                f"IPv4 header: total length {total_length} < header length {header_length}"
            )
        expected = internet_checksum(fixed[:10] + b"\0\0" + fixed[12:] + options)
        if checksum != expected:
            raise WireError(
                f"IPv4 header: bad header checksum {checksum:#06x}, expected {expected:#06x}"
            )
        return _decoded(
            "IPv4 header",
            cls,
            src=IPv4Address(src),
            dst=IPv4Address(dst),
            protocol=proto,
            ttl=ttl,
            total_length=total_length,
            identification=ident,
            dscp=tos >> 2,
            ecn=tos & 3,
            dont_fragment=bool(frag & 0x4000),
            more_fragments=bool(frag & 0x2000),
            fragment_offset=frag & 0x1FFF,
            options=options,
        )

    @classmethod
    def from_wire(cls, data: bytes) -> IPv4Header:
        r = Reader(data, "IPv4 header")
        header = cls.read(r)
        r.expect_end()
        return header


@dataclass(frozen=True, slots=True)
class IPv4Packet:
    """A whole IPv4 packet; the header's total length must match the payload."""

    header: IPv4Header
    payload: bytes

    def __post_init__(self) -> None:
        if self.header.total_length != self.header.header_length + len(self.payload):
            raise ValueError(
                f"total_length {self.header.total_length} != header {self.header.header_length}"
                f" + payload {len(self.payload)}"
            )

    @classmethod
    def make(
        cls,
        src: IPv4Address,
        dst: IPv4Address,
        protocol: int,
        payload: bytes,
        *,
        ttl: int = 64,
        identification: int = 0,
        dscp: int = 0,
        ecn: int = 0,
        dont_fragment: bool = False,
        options: bytes = b"",
    ) -> IPv4Packet:
        """An unfragmented packet with the total length filled in."""
        header = IPv4Header(
            src,
            dst,
            protocol,
            ttl,
            IPV4_HEADER_LEN + len(options) + len(payload),
            identification,
            dscp,
            ecn,
            dont_fragment,
            False,
            0,
            options,
        )
        return cls(header, payload)

    @property
    def protocol(self) -> int:
        """The payload's protocol (as `IPv6Packet.protocol`, so code reads either)."""
        return self.header.protocol

    def to_wire(self) -> bytes:
        return self.header.to_wire() + self.payload

    @classmethod
    def from_wire(cls, data: bytes) -> IPv4Packet:
        r = Reader(data, "IPv4 packet")
        header = IPv4Header.read(r)
        if header.total_length != len(data):
            raise WireError(
                f"IPv4 packet: total length {header.total_length} but {len(data)} bytes"
            )
        return cls(header, r.rest())


# --- IPv6 -----------------------------------------------------------------------------


def _walk_hbh_options(options: bytes) -> Iterator[tuple[int, bytes]]:
    """Yield (type, data) for each RFC 8200 §4.2 option, padding included."""
    pos = 0
    while pos < len(options):
        kind = options[pos]
        if kind == _HBH_PAD1:
            yield kind, b""
            pos += 1
            continue
        if pos + 2 > len(options) or pos + 2 + options[pos + 1] > len(options):
            raise WireError(f"Hop-by-Hop header: option {kind} at options offset {pos} overruns")
        length = options[pos + 1]
        yield kind, options[pos + 2 : pos + 2 + length]
        pos += 2 + length


@dataclass(frozen=True, slots=True)
class HopByHop:
    """The RFC 8200 Hop-by-Hop Options header; `options` is its raw, padded option area."""

    next_header: int
    options: bytes

    def __post_init__(self) -> None:
        _check_range("next_header", self.next_header, 8)
        if (len(self.options) + 2) % 8 or len(self.options) > 2046:
            raise ValueError(f"Hop-by-Hop options length {len(self.options)} is not 8n+6")
        for _ in _walk_hbh_options(self.options):  # malformed options raise here
            pass

    @classmethod
    def with_router_alert(cls, next_header: int, value: int = 0) -> HopByHop:
        """Router Alert (RFC 2711) padded with PadN, as Linux sends with MLD."""
        option = bytes((_HBH_ROUTER_ALERT, 2)) + value.to_bytes(2, "big")
        return cls(next_header, option + bytes((_HBH_PADN, 0)))

    @property
    def router_alert(self) -> int | None:
        for kind, data in _walk_hbh_options(self.options):
            if kind == _HBH_ROUTER_ALERT and len(data) == 2:
                return int.from_bytes(data, "big")
        return None

    def to_wire(self) -> bytes:
        return bytes((self.next_header, (len(self.options) + 2) // 8 - 1)) + self.options

    @classmethod
    def read(cls, r: Reader) -> HopByHop:
        next_header = r.u8("Hop-by-Hop next header")
        length = (r.u8("Hop-by-Hop length") + 1) * 8
        return _decoded(
            "Hop-by-Hop header",
            cls,
            next_header=next_header,
            options=r.bytes(length - 2, "Hop-by-Hop options"),
        )

    @classmethod
    def from_wire(cls, data: bytes) -> HopByHop:
        r = Reader(data, "Hop-by-Hop header")
        hbh = cls.read(r)
        r.expect_end()
        return hbh


@dataclass(frozen=True, slots=True)
class IPv6Header:
    """The RFC 8200 fixed header; `payload_length` counts extension headers too."""

    src: IPv6Address
    dst: IPv6Address
    next_header: int
    hop_limit: int = 64
    payload_length: int = 0
    traffic_class: int = 0
    flow_label: int = 0

    def __post_init__(self) -> None:
        _check_fields(self, _V6_WIDTHS)

    def to_wire(self) -> bytes:
        return (
            Writer()
            .u32(6 << 28 | self.traffic_class << 20 | self.flow_label)
            .u16(self.payload_length)
            .u8(self.next_header)
            .u8(self.hop_limit)
            .bytes(self.src.packed)
            .bytes(self.dst.packed)
            .getvalue()
        )

    @classmethod
    def read(cls, r: Reader) -> IPv6Header:
        first = r.u32("version/class/flow")
        if first >> 28 != 6:
            raise WireError(f"IPv6 header: version {first >> 28}, expected 6")
        payload_length = r.u16("payload length")
        next_header = r.u8("next header")
        hop_limit = r.u8("hop limit")
        src = IPv6Address(r.bytes(16, "source address"))
        dst = IPv6Address(r.bytes(16, "destination address"))
        return cls(
            src, dst, next_header, hop_limit, payload_length, (first >> 20) & 0xFF, first & 0xFFFFF
        )

    @classmethod
    def from_wire(cls, data: bytes) -> IPv6Header:
        r = Reader(data, "IPv6 header")
        header = cls.read(r)
        r.expect_end()
        return header


@dataclass(frozen=True, slots=True)
class IPv6Packet:
    """A whole IPv6 packet, with an optional Hop-by-Hop header before the payload.

    Other extension headers stay inside `payload` (`protocol` then names the first).
    """

    header: IPv6Header
    payload: bytes
    hop_by_hop: HopByHop | None = None

    def __post_init__(self) -> None:
        hbh_length = len(self.hop_by_hop.options) + 2 if self.hop_by_hop else 0
        if self.header.payload_length != hbh_length + len(self.payload):
            raise ValueError(
                f"payload_length {self.header.payload_length} != extension headers {hbh_length}"
                f" + payload {len(self.payload)}"
            )
        if (self.hop_by_hop is not None) != (self.header.next_header == IPPROTO_HOPOPTS):
            raise ValueError("next_header must be 0 exactly when a Hop-by-Hop header is present")

    @property
    def protocol(self) -> int:
        """The protocol of `payload`: after the Hop-by-Hop header if there is one."""
        return self.hop_by_hop.next_header if self.hop_by_hop else self.header.next_header

    @classmethod
    def make(
        cls,
        src: IPv6Address,
        dst: IPv6Address,
        protocol: int,
        payload: bytes,
        *,
        hop_limit: int = 64,
        traffic_class: int = 0,
        flow_label: int = 0,
        hop_by_hop: HopByHop | None = None,
    ) -> IPv6Packet:
        """A packet with the payload length and next header chain filled in."""
        if hop_by_hop is not None and hop_by_hop.next_header != protocol:
            raise ValueError("hop_by_hop.next_header must be the payload protocol")
        hbh_length = len(hop_by_hop.options) + 2 if hop_by_hop else 0
        header = IPv6Header(
            src,
            dst,
            IPPROTO_HOPOPTS if hop_by_hop else protocol,
            hop_limit,
            hbh_length + len(payload),
            traffic_class,
            flow_label,
        )
        return cls(header, payload, hop_by_hop)

    def to_wire(self) -> bytes:
        hbh = self.hop_by_hop.to_wire() if self.hop_by_hop else b""
        return self.header.to_wire() + hbh + self.payload

    @classmethod
    def from_wire(cls, data: bytes) -> IPv6Packet:
        r = Reader(data, "IPv6 packet")
        header = IPv6Header.read(r)
        if header.payload_length != r.remaining:
            raise WireError(
                f"IPv6 packet: payload length {header.payload_length}"
                f" but {r.remaining} bytes follow"
            )
        hbh = HopByHop.read(r) if header.next_header == IPPROTO_HOPOPTS else None
        return cls(header, r.rest(), hbh)


# --- either family ----------------------------------------------------------------

InnerPacket = IPv4Packet | IPv6Packet


def parse_packet(data: bytes) -> InnerPacket:
    """An IPv4 or IPv6 packet, by its version nibble; WireError if it is neither."""
    if data[:1] and data[0] >> 4 == 6:
        return IPv6Packet.from_wire(data)
    return IPv4Packet.from_wire(data)


def make_packet(
    src: Address,
    dst: Address,
    protocol: int,
    payload: bytes,
    *,
    ttl: int = 64,
    identification: int = 0,
) -> InnerPacket:
    """A packet of the addresses' family (`ttl` is IPv6's hop limit; IPv6 has no
    identification field outside fragments)."""
    if isinstance(src, IPv6Address) and isinstance(dst, IPv6Address):
        return IPv6Packet.make(src, dst, protocol, payload, hop_limit=ttl)
    if isinstance(src, IPv4Address) and isinstance(dst, IPv4Address):
        return IPv4Packet.make(src, dst, protocol, payload, ttl=ttl, identification=identification)
    raise ValueError(f"a packet needs two addresses of one family, got {src!r}, {dst!r}")


# --- UDP and the pseudo-header --------------------------------------------------------


def pseudo_header(src: Address, dst: Address, proto: int, length: int) -> bytes:
    """The pseudo-header transports checksum: RFC 768 for IPv4, RFC 8200 §8.1 for IPv6."""
    if isinstance(src, IPv4Address) and isinstance(dst, IPv4Address):
        return src.packed + dst.packed + struct.pack("!BBH", 0, proto, length)
    if isinstance(src, IPv6Address) and isinstance(dst, IPv6Address):
        return src.packed + dst.packed + struct.pack("!I3xB", length, proto)
    raise ValueError(f"pseudo-header needs two addresses of one family, got {src!r}, {dst!r}")


@dataclass(frozen=True, slots=True)
class UDPHeader:
    """The 8-byte RFC 768 header as it appears on the wire (nothing verified)."""

    src_port: int
    dst_port: int
    length: int
    checksum: int

    def __post_init__(self) -> None:
        _check_fields(self, (("src_port", 16), ("dst_port", 16), ("length", 16), ("checksum", 16)))

    def to_wire(self) -> bytes:
        return struct.pack("!HHHH", self.src_port, self.dst_port, self.length, self.checksum)

    @classmethod
    def from_wire(cls, data: bytes) -> UDPHeader:
        r = Reader(data, "UDP header")
        header = cls(
            r.u16("source port"), r.u16("destination port"), r.u16("length"), r.u16("checksum")
        )
        r.expect_end()
        return header


def _udp_checksum(src: Address, dst: Address, segment: bytes) -> int:
    # Computed zero is sent as 0xFFFF: zero on the wire means "no checksum" (RFC 768).
    return internet_checksum(pseudo_header(src, dst, IPPROTO_UDP, len(segment)) + segment) or 0xFFFF


@dataclass(frozen=True, slots=True)
class UDPDatagram:
    """A UDP datagram; the checksum covers the pseudo-header of the addresses given."""

    src_port: int
    dst_port: int
    payload: bytes

    def __post_init__(self) -> None:
        _check_range("src_port", self.src_port, 16)
        _check_range("dst_port", self.dst_port, 16)
        _check_range("length", UDP_HEADER_LEN + len(self.payload), 16)

    def to_wire(self, src: Address, dst: Address, *, checksum: bool = True) -> bytes:
        """Encode; `checksum=False` sends zero ("none"), allowed over IPv4 only."""
        length = UDP_HEADER_LEN + len(self.payload)
        segment = struct.pack("!HHHH", self.src_port, self.dst_port, length, 0) + self.payload
        if not checksum:
            if isinstance(src, IPv6Address):
                raise ValueError("UDP over IPv6 must carry a checksum")
            return segment
        return segment[:6] + _udp_checksum(src, dst, segment).to_bytes(2, "big") + segment[8:]

    @classmethod
    def from_wire(cls, data: bytes, src: Address, dst: Address) -> UDPDatagram:
        data = bytes(data)
        r = Reader(data, "UDP datagram")
        src_port, dst_port = r.u16("source port"), r.u16("destination port")
        length, checksum = r.u16("length"), r.u16("checksum")
        if length != len(data):
            raise WireError(f"UDP datagram: length field {length} but {len(data)} bytes")
        if checksum == 0:
            if isinstance(src, IPv6Address):
                raise WireError("UDP datagram: zero checksum is not allowed over IPv6")
        else:
            expected = _udp_checksum(src, dst, data[:6] + b"\0\0" + data[8:])
            if checksum != expected:
                raise WireError(
                    f"UDP datagram: bad checksum {checksum:#06x}, expected {expected:#06x}"
                )
        return cls(src_port, dst_port, r.rest())


# --- Fast path for routers ------------------------------------------------------------

_PEEK_V4 = struct.Struct("!B7xBB2xII")  # version/IHL, TTL, protocol, src, dst
_TTL_WORD = struct.Struct("!BBH")  # TTL, protocol, header checksum at offset 8
_TTL_FIELDS = struct.Struct("!8xBBH8x")  # the same, read from a whole 20-byte header
_PEEK_V6 = struct.Struct("!B5xBB16s16s")  # version/class, next header, hop limit, src, dst


def peek_v4(packet: bytes) -> tuple[int, int, int, int]:
    """(src, dst, protocol, ttl) of an IPv4 packet, addresses as ints; no checksum check."""
    if len(packet) < IPV4_HEADER_LEN:
        raise WireError(f"IPv4 packet: {len(packet)} bytes, shorter than a header")
    ver_ihl, ttl, proto, src, dst = _PEEK_V4.unpack_from(packet)
    if not 0x45 <= ver_ihl <= 0x4F:
        raise WireError(f"IPv4 packet: bad version/IHL byte {ver_ihl:#04x}")
    return src, dst, proto, ttl


def decrement_ttl_v4(packet: bytes) -> bytes:
    """The packet with TTL one less and the checksum patched (RFC 1624 eqn. 3).

    Routers drop packets whose TTL is 1 or less before calling this. Runs per
    forwarded packet, so it is written for the fewest interpreter steps.
    """
    try:
        ttl, protocol, checksum = _TTL_FIELDS.unpack_from(packet)
    except struct.error:
        raise WireError(f"IPv4 packet: {len(packet)} bytes, shorter than a header") from None
    if ttl == 0:
        raise WireError("IPv4 packet: TTL is already 0")
    # HC' = ~(~HC + ~m + m'); the TTL/protocol word drops by 0x0100, so ~m + m' = 0xFEFF.
    # For every 16-bit HC that equals (HC + 0x0100) mod 0xFFFF (checked for all of
    # them in the tests), one operation instead of five.
    patched = (checksum + 0x100) % 0xFFFF
    return packet[:8] + _TTL_WORD.pack(ttl - 1, protocol, patched) + packet[12:]


def forward_in_place_v4(buffer: bytearray, length: int) -> bool:
    """Patch the IPv4 packet in `buffer[:length]` as a router forwards it (TTL one less,
    the checksum as `decrement_ttl_v4` patches it) when `peek_v4` would accept it and
    its TTL is above 1; say whether it did. A driver that reads into one buffer
    forwards from it with no copy at all."""
    if length >= IPV4_HEADER_LEN and (ttl := buffer[8]) > 1 and 0x45 <= buffer[0] <= 0x4F:
        buffer[8] = ttl - 1
        patched = ((buffer[10] << 8 | buffer[11]) + 0x100) % 0xFFFF  # as in decrement_ttl_v4
        buffer[10] = patched >> 8
        buffer[11] = patched & 0xFF
        return True
    return False


def forward_copy_v4(packet: bytes) -> bytearray | None:
    """What a router sends on for `packet`: `decrement_ttl_v4(packet)` when it is an
    IPv4 packet `peek_v4` accepts with TTL above 1, else None. For a forwarding
    cache hit (the addresses are already known), the checks and the patch in one
    call, on a copy patched in place."""
    copy = bytearray(packet)
    return copy if forward_in_place_v4(copy, len(copy)) else None


def peek_v6(packet: bytes) -> tuple[int, int, int, int]:
    """(src, dst, next header, hop limit) of an IPv6 packet, addresses as ints."""
    if len(packet) < IPV6_HEADER_LEN:
        raise WireError(f"IPv6 packet: {len(packet)} bytes, shorter than a header")
    first, next_header, hop_limit, src, dst = _PEEK_V6.unpack_from(packet)
    if first >> 4 != 6:
        raise WireError(f"IPv6 packet: version {first >> 4}, expected 6")
    return int.from_bytes(src, "big"), int.from_bytes(dst, "big"), next_header, hop_limit


def decrement_hop_limit_v6(packet: bytes) -> bytes:
    """The packet with its hop limit one less (IPv6 has no header checksum)."""
    if len(packet) < IPV6_HEADER_LEN:
        raise WireError(f"IPv6 packet: {len(packet)} bytes, shorter than a header")
    if packet[7] == 0:
        raise WireError("IPv6 packet: hop limit is already 0")
    out = bytearray(packet)
    out[7] -= 1
    return bytes(out)


def complete_l4_checksum_v6(packet: bytes) -> bytes:
    """`complete_l4_checksum_v4` for an IPv6 packet whose transport header follows
    the fixed header (no extension headers): its TCP or UDP checksum in full over the
    IPv6 pseudo-header. Anything else comes back unchanged."""
    if len(packet) < IPV6_HEADER_LEN or packet[0] >> 4 != 6:
        return packet
    protocol = packet[6]
    at = {IPPROTO_TCP: 16, IPPROTO_UDP: 6}.get(protocol)
    total = IPV6_HEADER_LEN + int.from_bytes(packet[4:6], "big")
    if at is None or len(packet) < total or total < IPV6_HEADER_LEN + at + 2:
        return packet
    segment = bytearray(packet[IPV6_HEADER_LEN:total])
    segment[at : at + 2] = b"\0\0"
    length = len(segment)
    pseudo = packet[8:40] + struct.pack("!IxxxB", length, protocol)
    checksum = internet_checksum(pseudo + segment)
    if protocol == IPPROTO_UDP and checksum == 0:
        checksum = 0xFFFF
    segment[at : at + 2] = checksum.to_bytes(2, "big")
    return packet[:IPV6_HEADER_LEN] + bytes(segment) + packet[total:]


def complete_l4_checksum_v4(packet: bytes) -> bytes:
    """`packet` with its TCP or UDP checksum computed in full.

    A packet read from a packet socket on the host that sent it may still carry a
    partial checksum (checksum offload: only the pseudo-header sum, the rest left
    to the device). Forwarded from user space, it needs the whole sum. Other
    protocols, and packets too short for their header, come back unchanged.
    """
    if len(packet) < 20:
        return packet
    header = (packet[0] & 0x0F) * 4
    protocol = packet[9]
    at = {IPPROTO_TCP: 16, IPPROTO_UDP: 6}.get(protocol)
    total = int.from_bytes(packet[2:4], "big")
    if at is None or len(packet) < total or total < header + at + 2:
        return packet
    segment = bytearray(packet[header:total])
    segment[at : at + 2] = b"\0\0"
    length = len(segment)
    pseudo = packet[12:20] + struct.pack("!BBH", 0, protocol, length)
    checksum = internet_checksum(pseudo + segment)
    if protocol == IPPROTO_UDP and checksum == 0:
        checksum = 0xFFFF
    segment[at : at + 2] = checksum.to_bytes(2, "big")
    return packet[:header] + bytes(segment) + packet[total:]
