"""TCP segments (RFC 9293 header layout) with the manycast session options.

The session transport of manycast is TCP-shaped so that its segments read as
TCP in any packet dump: the same header, the same pseudo-header checksum, the
same option framing.  The dynamic-destination extension of the seed (Fig 20-21)
rides in RFC 6994 shared experimental options (kind 253 or 254 followed by a
16-bit ExID), all under the one ExID `MANYCAST_EXID`, with a one-byte subtype
after it so that one experiment can carry several option types:

    kind    | length | ExID   | subtype                  | body
    --------+--------+--------+--------------------------+--------------------------------
    253/254 | 17     | 0x4D43 | 1 TAG_COOKIE             | tag u32, cookie u64
    253/254 | 11, 23 | 0x4D43 | 2 DESTINATION            | port u16, IPv4 or IPv6 address
    253/254 | 5      | 0x4D43 | 3 CHANGE_DESTINATION mark| (none)

Either experimental kind is accepted and kept, so bytes round-trip; 253 is sent.
A SYN-ACK with TAG_COOKIE (17), an IPv6 DESTINATION (23) and MSS (4) would need
44 bytes of the 40 there are, so the session leaves MSS out in that one case.

0x4D43 is "MC" in ASCII.  It is not registered with IANA (RFC 6994 ExIDs are
registered first come, first served); the experimental kinds are meant for
explicitly configured experiments, which a manycast deployment is, and the
value lives in this one constant should it ever be registered.

A change-destination message (Fig 21) carries an Ed25519 signature (64 bytes),
more than the 40 bytes of option space a segment has, so it is not an option:
it is a `ChangeDestination` message in the payload of a segment marked by the
CHANGE_DESTINATION option.  The payload of such a segment is not part of the
byte stream.

EOL is not an option object: the option area is the encoded options followed by
the minimal zero padding to a 4-byte boundary (a zero byte is EOL), and a
decoder accepts exactly that, so bytes and objects round-trip both ways.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass
from typing import TypeVar

from manycast.wire.cursor import Reader, Writer, internet_checksum
from manycast.wire.errors import WireError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

PROTO_TCP = 6
HEADER_LEN = 20
MAX_OPTIONS_LEN = 40

KIND_EOL = 0
KIND_NOP = 1
KIND_MSS = 2
KIND_EXP1 = 253  # RFC 4727 experimental kinds, shared per RFC 6994
KIND_EXP2 = 254
EXPERIMENTAL_KINDS = (KIND_EXP1, KIND_EXP2)

MANYCAST_EXID = 0x4D43

SUBTYPE_TAG_COOKIE = 1
SUBTYPE_DESTINATION = 2
SUBTYPE_CHANGE_DESTINATION = 3
_KNOWN_SUBTYPES = (SUBTYPE_TAG_COOKIE, SUBTYPE_DESTINATION, SUBTYPE_CHANGE_DESTINATION)


class TcpFlags(enum.IntFlag):
    FIN = 0x01
    SYN = 0x02
    RST = 0x04
    PSH = 0x08
    ACK = 0x10
    URG = 0x20
    ECE = 0x40
    CWR = 0x80


def _check_uint(value: int, bits: int, field: str) -> None:
    if not 0 <= value < (1 << bits):
        raise ValueError(f"{field} {value} does not fit in {bits} bits")


def _check_exp_kind(kind: int) -> None:
    if kind not in EXPERIMENTAL_KINDS:
        raise ValueError(f"experimental option kind must be 253 or 254, not {kind}")


# --- options -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Nop:
    """One byte of NOP padding (kind 1), kept so that option areas round-trip."""

    def encode(self) -> bytes:
        return bytes([KIND_NOP])


@dataclass(frozen=True, slots=True)
class Mss:
    """Maximum segment size (kind 2, length 4)."""

    value: int

    def __post_init__(self) -> None:
        _check_uint(self.value, 16, "MSS")

    def encode(self) -> bytes:
        return bytes([KIND_MSS, 4]) + self.value.to_bytes(2, "big")


def _exp_option(kind: int, subtype: int, body: bytes) -> bytes:
    return bytes([kind, 5 + len(body)]) + MANYCAST_EXID.to_bytes(2, "big") + bytes([subtype]) + body


@dataclass(frozen=True, slots=True)
class TagCookie:
    """TAG_COOKIE: sent by the client on its SYN, echoed unchanged on the SYN-ACK (Fig 20)."""

    tag: int
    cookie: int
    kind: int = KIND_EXP1

    def __post_init__(self) -> None:
        _check_uint(self.tag, 32, "tag")
        _check_uint(self.cookie, 64, "cookie")
        _check_exp_kind(self.kind)

    def encode(self) -> bytes:
        body = self.tag.to_bytes(4, "big") + self.cookie.to_bytes(8, "big")
        return _exp_option(self.kind, SUBTYPE_TAG_COOKIE, body)


@dataclass(frozen=True, slots=True)
class Destination:
    """DESTINATION: the address and port the client should send to from now on (Fig 20)."""

    address: IPAddress
    port: int
    kind: int = KIND_EXP1

    def __post_init__(self) -> None:
        _check_uint(self.port, 16, "port")
        _check_exp_kind(self.kind)

    def encode(self) -> bytes:
        body = self.port.to_bytes(2, "big") + self.address.packed
        return _exp_option(self.kind, SUBTYPE_DESTINATION, body)


@dataclass(frozen=True, slots=True)
class ChangeDestinationMark:
    """Marks a segment whose payload is a `ChangeDestination` message, not stream data."""

    kind: int = KIND_EXP1

    def __post_init__(self) -> None:
        _check_exp_kind(self.kind)

    def encode(self) -> bytes:
        return _exp_option(self.kind, SUBTYPE_CHANGE_DESTINATION, b"")


@dataclass(frozen=True, slots=True)
class UnknownOption:
    """Any other option, kept raw so that it round-trips: kind and the bytes after the length."""

    kind: int
    data: bytes

    def __post_init__(self) -> None:
        _check_uint(self.kind, 8, "option kind")
        if self.kind in (KIND_EOL, KIND_NOP, KIND_MSS):
            raise ValueError(f"option kind {self.kind} has its own class")
        if len(self.data) > MAX_OPTIONS_LEN - 2:
            raise ValueError(f"option data of {len(self.data)} bytes does not fit")
        if (
            self.kind in EXPERIMENTAL_KINDS
            and self.data[:2] == MANYCAST_EXID.to_bytes(2, "big")
            and len(self.data) >= 3
            and self.data[2] in _KNOWN_SUBTYPES
        ):
            raise ValueError("a manycast experimental option has its own class")

    def encode(self) -> bytes:
        return bytes([self.kind, 2 + len(self.data)]) + self.data


TcpOption = Nop | Mss | TagCookie | Destination | ChangeDestinationMark | UnknownOption


def _decode_address(raw: bytes, what: str) -> IPAddress:
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw)
    if len(raw) == 16:
        return ipaddress.IPv6Address(raw)
    raise WireError(f"{what}: address of {len(raw)} bytes is neither IPv4 nor IPv6")


def _decode_experimental(kind: int, data: bytes) -> TcpOption:
    if len(data) < 2:
        raise WireError(f"TCP option {kind}: {len(data)} bytes is too short for an ExID")
    if int.from_bytes(data[:2], "big") != MANYCAST_EXID or len(data) < 3:
        return UnknownOption(kind, data)
    subtype, body = data[2], data[3:]
    if subtype == SUBTYPE_TAG_COOKIE:
        if len(body) != 12:
            raise WireError(f"TAG_COOKIE option: body of {len(body)} bytes, expected 12")
        return TagCookie(int.from_bytes(body[:4], "big"), int.from_bytes(body[4:], "big"), kind)
    if subtype == SUBTYPE_DESTINATION:
        if len(body) not in (6, 18):
            raise WireError(f"DESTINATION option: body of {len(body)} bytes, expected 6 or 18")
        address = _decode_address(body[2:], "DESTINATION option")
        return Destination(address, int.from_bytes(body[:2], "big"), kind)
    if subtype == SUBTYPE_CHANGE_DESTINATION:
        if body:
            raise WireError(f"CHANGE_DESTINATION option: unexpected body of {len(body)} bytes")
        return ChangeDestinationMark(kind)
    return UnknownOption(kind, data)  # a later subtype of our own experiment


def encode_options(options: tuple[TcpOption, ...]) -> bytes:
    """The option area: encoded options and zero padding (EOL) to a 4-byte boundary."""
    raw = b"".join(option.encode() for option in options)
    padded = raw + bytes(-len(raw) % 4)
    if len(padded) > MAX_OPTIONS_LEN:
        raise ValueError(f"TCP options take {len(padded)} bytes, at most 40 fit")
    return padded


def decode_options(area: bytes) -> tuple[TcpOption, ...]:
    """Parse an option area; it must end with the minimal EOL padding `encode_options` writes."""
    if len(area) % 4 or len(area) > MAX_OPTIONS_LEN:
        raise WireError(f"TCP options: an area of {len(area)} bytes (a multiple of 4, at most 40)")
    reader = Reader(area, "TCP options")
    options: list[TcpOption] = []
    while not reader.at_end():
        start = reader.offset
        kind = reader.u8("option kind")
        if kind == KIND_EOL:
            padding = area[start:]
            if any(padding):
                raise WireError(f"TCP options: non-zero byte after EOL at offset {start}")
            if len(padding) >= 4:
                raise WireError(f"TCP options: {len(padding)} bytes of padding past a boundary")
            break
        if kind == KIND_NOP:
            options.append(Nop())
            continue
        length = reader.u8("option length")
        if length < 2:
            raise WireError(f"TCP options: option {kind} has length {length} < 2")
        data = reader.bytes(length - 2, f"option {kind} data")
        if kind == KIND_MSS:
            if length != 4:
                raise WireError(f"TCP options: MSS option has length {length}, expected 4")
            options.append(Mss(int.from_bytes(data, "big")))
        elif kind in EXPERIMENTAL_KINDS:
            options.append(_decode_experimental(kind, data))
        else:
            options.append(UnknownOption(kind, data))
    return tuple(options)


_O = TypeVar("_O", bound=TcpOption)


# --- checksum ----------------------------------------------------------------


def pseudo_header(src: IPAddress, dst: IPAddress, length: int) -> bytes:
    """The RFC 9293 (IPv4) or RFC 8200 (IPv6) pseudo-header for a TCP segment."""
    if src.version != dst.version:
        raise WireError(f"TCP pseudo-header: {src} and {dst} are of different IP versions")
    if src.version == 4:
        if length > 0xFFFF:
            raise WireError(f"TCP segment of {length} bytes is too long for IPv4")
        return src.packed + dst.packed + bytes([0, PROTO_TCP]) + length.to_bytes(2, "big")
    if length > 0xFFFFFFFF:
        raise WireError(f"TCP segment of {length} bytes is too long for IPv6")
    return src.packed + dst.packed + length.to_bytes(4, "big") + bytes([0, 0, 0, PROTO_TCP])


# --- segment -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TcpSegment:
    """One TCP segment.  The checksum and data offset are derived, not stored:
    `to_wire(src, dst)` computes them and `from_wire(data, src, dst)` checks them.

    The 4 reserved bits must be zero; a segment with any of them set is refused
    rather than silently changed.
    """

    src_port: int
    dst_port: int
    seq: int
    ack: int
    flags: TcpFlags
    window: int
    urgent: int = 0
    options: tuple[TcpOption, ...] = ()
    payload: bytes = b""

    def __post_init__(self) -> None:
        _check_uint(self.src_port, 16, "source port")
        _check_uint(self.dst_port, 16, "destination port")
        _check_uint(self.seq, 32, "sequence number")
        _check_uint(self.ack, 32, "acknowledgment number")
        _check_uint(int(self.flags), 8, "flags")
        _check_uint(self.window, 16, "window")
        _check_uint(self.urgent, 16, "urgent pointer")

    @property
    def data_offset(self) -> int:
        """Header length in 32-bit words."""
        return (HEADER_LEN + len(encode_options(self.options))) // 4

    @property
    def seq_length(self) -> int:
        """Sequence space the segment occupies: payload bytes plus one for SYN and FIN."""
        return (
            len(self.payload)
            + (1 if self.flags & TcpFlags.SYN else 0)
            + (1 if self.flags & TcpFlags.FIN else 0)
        )

    def option(self, cls: type[_O]) -> _O | None:
        """The first option of a type, if present."""
        for option in self.options:
            if isinstance(option, cls):
                return option
        return None

    def to_wire(self, src: IPAddress, dst: IPAddress) -> bytes:
        area = encode_options(self.options)
        offset = (HEADER_LEN + len(area)) // 4
        w = Writer()
        w.u16(self.src_port).u16(self.dst_port).u32(self.seq).u32(self.ack)
        w.u8(offset << 4).u8(int(self.flags)).u16(self.window)
        w.u16(0).u16(self.urgent).bytes(area).bytes(self.payload)
        raw = w.getvalue()
        w.patch_u16(16, internet_checksum(pseudo_header(src, dst, len(raw)) + raw))
        return w.getvalue()

    @classmethod
    def from_wire(cls, data: bytes, src: IPAddress, dst: IPAddress) -> TcpSegment:
        r = Reader(data, "TCP segment")
        src_port = r.u16("source port")
        dst_port = r.u16("destination port")
        seq = r.u32("sequence number")
        ack = r.u32("acknowledgment number")
        offset_byte = r.u8("data offset")
        flags = TcpFlags(r.u8("flags"))
        window = r.u16("window")
        checksum = r.u16("checksum")
        urgent = r.u16("urgent pointer")
        if offset_byte & 0x0F:
            raise WireError(f"TCP segment: reserved bits set ({offset_byte & 0x0F:#x})")
        header_len = (offset_byte >> 4) * 4
        if header_len < HEADER_LEN:
            raise WireError(f"TCP segment: data offset {header_len // 4} is below 5")
        options = decode_options(r.bytes(header_len - HEADER_LEN, "options"))
        payload = r.rest()
        # Compare with what the encoder writes, not "sums to zero": 0x0000 and 0xFFFF
        # both sum to zero, and only one of them re-encodes identically.
        zeroed = bytes(data[:16]) + b"\0\0" + bytes(data[18:])
        expected = internet_checksum(pseudo_header(src, dst, len(data)) + zeroed)
        if checksum != expected:
            raise WireError(f"TCP segment: bad checksum {checksum:#06x}, expected {expected:#06x}")
        return cls(src_port, dst_port, seq, ack, flags, window, urgent, options, payload)

    def __str__(self) -> str:
        names = "".join(c for i, c in enumerate("FSRPAUEC") if int(self.flags) >> i & 1)
        return (
            f"{self.src_port}>{self.dst_port} [{names or '.'}] seq={self.seq} ack={self.ack} "
            f"win={self.window} len={len(self.payload)}"
        )


# --- change destination (Fig 21) -----------------------------------------------

CHANGE_DESTINATION_VERSION = 1
CHANGE_DESTINATION_CONTEXT = b"manycast change-destination v1\x00"


@dataclass(frozen=True, slots=True)
class ChangeDestination:
    """A server's instruction to the client to send to a new destination (Fig 20-21).

    Layout (big-endian): version u8 (1), tag u32, cookie u64, serial u32,
    timestamp_ms u64, address length u8 (4 or 16), address, port u16,
    signature length u16, signature.  The signature covers
    `CHANGE_DESTINATION_CONTEXT` followed by every field before the signature
    length (`signed_bytes()`); making and checking it belongs to the key holder.
    `serial` grows per connection so that a client can refuse a replayed
    instruction; `timestamp_ms` lets it refuse a stale one.
    """

    tag: int
    cookie: int
    address: IPAddress
    port: int
    serial: int
    timestamp_ms: int
    signature: bytes = b""

    def __post_init__(self) -> None:
        _check_uint(self.tag, 32, "tag")
        _check_uint(self.cookie, 64, "cookie")
        _check_uint(self.port, 16, "port")
        _check_uint(self.serial, 32, "serial")
        _check_uint(self.timestamp_ms, 64, "timestamp")
        _check_uint(len(self.signature), 16, "signature length")

    def _body(self) -> bytes:
        w = Writer()
        w.u8(CHANGE_DESTINATION_VERSION).u32(self.tag).u64(self.cookie)
        w.u32(self.serial).u64(self.timestamp_ms)
        w.u8(len(self.address.packed)).bytes(self.address.packed).u16(self.port)
        return w.getvalue()

    def signed_bytes(self) -> bytes:
        return CHANGE_DESTINATION_CONTEXT + self._body()

    def to_wire(self) -> bytes:
        return self._body() + len(self.signature).to_bytes(2, "big") + self.signature

    @classmethod
    def from_wire(cls, data: bytes) -> ChangeDestination:
        r = Reader(data, "change-destination")
        version = r.u8("version")
        if version != CHANGE_DESTINATION_VERSION:
            raise WireError(f"change-destination: unsupported version {version}")
        tag = r.u32("tag")
        cookie = r.u64("cookie")
        serial = r.u32("serial")
        timestamp_ms = r.u64("timestamp")
        address = _decode_address(r.bytes(r.u8("address length"), "address"), "change-destination")
        port = r.u16("port")
        signature = r.bytes(r.u16("signature length"), "signature")
        r.expect_end()
        return cls(tag, cookie, address, port, serial, timestamp_ms, signature)
