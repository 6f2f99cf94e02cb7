"""IGMPv3 and MLDv2 membership reports, with manycast's extensions as RFC 9279 TLVs.

Base formats: IGMPv3 Membership Report (RFC 3376 §4.2, type 0x22, checksum over
the IGMP message) and MLDv2 Report (RFC 3810 §5.2, ICMPv6 type 143, checksum
over the IPv6 pseudo-header and the message). Both start with

    type(8) reserved(8) checksum(16) flags(16) number-of-records(16)

followed by the records: type(8) aux-words(8) number-of-sources(16) group,
sources, aux data. Addresses are 4 bytes for IGMP, 16 for MLD ("W" below).

Extensions (RFC 9279): the top bit of the flags field (E, 0x8000) says that the
message's Additional Data, everything after the last record, is a list of TLVs
type(16) length(16) value, without padding. The registry leaves only
65534-65535 for experimental use, so manycast uses exactly those two:

* 65534 GROUP MASKS (Fig 7C), one per record that has masks:

      record-index(16) include-count(16) group(W)
      include-count x (value(W) mask(W)), then the exclude pairs to the end

  A TLV names its record by index because one report may carry several records
  for one group (an ALLOW and a BLOCK, say); the group address is repeated so a
  TLV that lands on the wrong record is refused rather than misapplied. A pair
  matches a source address `a` when `a & mask == value`; masks are arbitrary
  bit masks, not only prefixes. TLVs come in increasing record order, and a TLV
  carries at least one pair.

* 65535 SIGNED JOIN (Fig 5), at most one, always the last TLV:

      timestamp(64) requester(W) generation(32) part(16) parts(16)
      key-length(16) random-key signature

  The timestamp is in milliseconds since the Unix epoch. A report too long for
  one packet goes out as `parts` reports (RFC 3376 §4.2.16; `wire/report_split.py`
  cuts it), numbered `part` 0 to parts - 1 and sharing the requester's
  `generation` number; an unsplit report is part 0 of 1. Every part is signed on
  its own, with its own random key, so a router checks each and refuses a copy
  of any. The signature runs to the end of the TLV, so its length (64 for
  Ed25519) is not fixed here.
  `signed_bytes()` returns what a signature covers: the whole report as
  `to_wire()` writes it, but with the checksum field zero and the signature
  value left out (the TLV length then counts no signature bytes). The signer
  signs those bytes with any signature value in place; the verifier recomputes
  them from the decoded report, which is byte-exact because decoding is strict.

Strictness: decoding succeeds only on bytes that re-encode identically.
Reserved bits must be zero, the record types must be 1-6, extension types other
than the two above are refused (RFC 9279 asks to ignore them, but a signed
report must not carry bytes the router does not understand), and without the E
bit no bytes may follow the records.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from ipaddress import IPv4Address, IPv6Address
from typing import NamedTuple

from manycast.wire.cursor import Reader, Writer, internet_checksum
from manycast.wire.errors import WireError
from manycast.wire.ip import (
    IPPROTO_ICMPV6,
    IPPROTO_IGMP,
    ROUTER_ALERT_V4,
    Address,
    HopByHop,
    IPv4Packet,
    IPv6Packet,
    pseudo_header,
)

IGMP_V3_REPORT = 0x22
MLD_V2_REPORT = 143
EXTENSION_FLAG = 0x8000
EXT_GROUP_MASKS = 65534
EXT_SIGNED_JOIN = 65535

IGMP_V3_ROUTERS = IPv4Address("224.0.0.22")
MLD_V2_ROUTERS = IPv6Address("ff02::16")

_MAX_AUX = 255 * 4
_MAX_U16 = 0xFFFF


class RecordType(IntEnum):
    MODE_IS_INCLUDE = 1
    MODE_IS_EXCLUDE = 2
    CHANGE_TO_INCLUDE_MODE = 3
    CHANGE_TO_EXCLUDE_MODE = 4
    ALLOW_NEW_SOURCES = 5
    BLOCK_OLD_SOURCES = 6


@dataclass(frozen=True, slots=True)
class MaskPair:
    """Source addresses `a` with `a & mask == value` (Fig 7C)."""

    value: int
    mask: int

    def __post_init__(self) -> None:
        if self.mask < 0 or self.value < 0:
            raise ValueError(f"mask pair {self.value:#x}/{self.mask:#x} is negative")
        if self.value & ~self.mask:
            raise ValueError(
                f"mask pair value {self.value:#x} has bits outside mask {self.mask:#x}"
            )

    def matches(self, address: int) -> bool:
        return address & self.mask == self.value


@dataclass(frozen=True, slots=True)
class GroupRecord:
    """One group record (IGMPv3) or multicast address record (MLDv2) with its masks.

    Fig 7C: a source matching any include pair is "permitted to send to this
    address", one matching any exclude pair is "prohibited"; how those combine
    with `record_type` and `sources` is the router's business, not the codec's.
    """

    record_type: RecordType
    group: Address
    sources: tuple[Address, ...] = ()
    include_masks: tuple[MaskPair, ...] = ()
    exclude_masks: tuple[MaskPair, ...] = ()
    aux: bytes = b""

    def __post_init__(self) -> None:
        RecordType(self.record_type)  # an unknown type raises ValueError
        family = type(self.group)
        if any(type(s) is not family for s in self.sources):
            raise ValueError(f"sources of record for {self.group} mix address families")
        if len(self.sources) > _MAX_U16:
            raise ValueError(f"{len(self.sources)} sources, at most {_MAX_U16}")
        if len(self.aux) % 4 or len(self.aux) > _MAX_AUX:
            raise ValueError(f"aux data length {len(self.aux)} is not a multiple of 4 up to 1020")
        limit = 1 << self.group.max_prefixlen
        if any(p.mask >= limit for p in self.include_masks + self.exclude_masks):
            raise ValueError(f"a mask is wider than {self.group.max_prefixlen} bits")
        width = self.group.max_prefixlen // 8
        if 4 + width + 2 * width * len(self.include_masks + self.exclude_masks) > _MAX_U16:
            raise ValueError("too many masks for one extension TLV")


@dataclass(frozen=True, slots=True)
class SignedJoin:
    """The Fig 5 fields: timestamp in ms since the Unix epoch, requester, key, signature."""

    timestamp: int
    requester: Address
    random_key: bytes
    signature: bytes = b""
    generation: int = 0  # the requester's number for the report this is part of
    part: int = 0
    parts: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.timestamp < 1 << 64:
            raise ValueError(f"timestamp {self.timestamp} does not fit in 64 bits")
        if not 0 <= self.generation < 1 << 32:
            raise ValueError(f"generation {self.generation} does not fit in 32 bits")
        if not 0 <= self.part < self.parts <= _MAX_U16:
            raise ValueError(f"part {self.part} of {self.parts}: not 0 <= part < parts <= 65535")
        if signed_join_length(self.requester, len(self.random_key), len(self.signature)) > (
            _MAX_U16
        ):
            raise ValueError("random key and signature too long for one extension TLV")


def signed_join_length(requester: Address, key_length: int, signature_length: int) -> int:
    """The value length of a SIGNED JOIN TLV (the 4-byte TLV header not counted)."""
    return 8 + requester.max_prefixlen // 8 + 8 + 2 + key_length + signature_length


class _Family(NamedTuple):
    name: str
    msg_type: int
    address: type[IPv4Address] | type[IPv6Address]
    width: int


_IGMP = _Family("IGMPv3 report", IGMP_V3_REPORT, IPv4Address, 4)
_MLD = _Family("MLDv2 report", MLD_V2_REPORT, IPv6Address, 16)


def _check_family(
    fam: _Family, records: tuple[GroupRecord, ...], signed: SignedJoin | None
) -> None:
    if len(records) > _MAX_U16:
        raise ValueError(f"{len(records)} records, at most {_MAX_U16}")
    for rec in records:
        if type(rec.group) is not fam.address:
            raise ValueError(f"{fam.name} cannot carry group {rec.group}")
    if signed is not None and type(signed.requester) is not fam.address:
        raise ValueError(f"{fam.name} cannot carry requester {signed.requester}")


# --- encoding -------------------------------------------------------------------------


def _tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!HH", kind, len(value)) + value


def _extensions(
    fam: _Family, records: tuple[GroupRecord, ...], signed: SignedJoin | None, signature: bool
) -> bytes:
    tlvs = []
    for index, rec in enumerate(records):
        if rec.include_masks or rec.exclude_masks:
            pairs = b"".join(
                p.value.to_bytes(fam.width, "big") + p.mask.to_bytes(fam.width, "big")
                for p in rec.include_masks + rec.exclude_masks
            )
            head = struct.pack("!HH", index, len(rec.include_masks)) + rec.group.packed
            tlvs.append(_tlv(EXT_GROUP_MASKS, head + pairs))
    if signed is not None:
        value = (
            signed.timestamp.to_bytes(8, "big")
            + signed.requester.packed
            + struct.pack(
                "!IHHH", signed.generation, signed.part, signed.parts, len(signed.random_key)
            )
            + signed.random_key
            + (signed.signature if signature else b"")
        )
        tlvs.append(_tlv(EXT_SIGNED_JOIN, value))
    return b"".join(tlvs)


def _encode(
    fam: _Family,
    records: tuple[GroupRecord, ...],
    signed: SignedJoin | None,
    *,
    signature: bool = True,
) -> bytes:
    """The report with a zero checksum."""
    ext = _extensions(fam, records, signed, signature)
    w = Writer().u8(fam.msg_type).u8(0).u16(0)
    w.u16(EXTENSION_FLAG if ext else 0).u16(len(records))
    for rec in records:
        w.u8(rec.record_type).u8(len(rec.aux) // 4).u16(len(rec.sources)).bytes(rec.group.packed)
        for source in rec.sources:
            w.bytes(source.packed)
        w.bytes(rec.aux)
    return w.bytes(ext).getvalue()


def _with_checksum(message: bytes, checksum: int) -> bytes:
    return message[:2] + checksum.to_bytes(2, "big") + message[4:]


# --- decoding -------------------------------------------------------------------------


def _read_record(r: Reader, fam: _Family, i: int) -> GroupRecord:
    raw_type = r.u8(f"record {i} type")
    try:
        record_type = RecordType(raw_type)
    except ValueError:
        raise WireError(f"{fam.name}: record {i} has unknown type {raw_type}") from None
    aux_words = r.u8(f"record {i} aux data length")
    count = r.u16(f"record {i} number of sources")
    group = fam.address(r.bytes(fam.width, f"record {i} group"))
    sources = tuple(fam.address(r.bytes(fam.width, f"record {i} source {j}")) for j in range(count))
    return GroupRecord(record_type, group, sources, aux=r.bytes(aux_words * 4, f"record {i} aux"))


def _read_masks(
    v: Reader, fam: _Family, records: list[GroupRecord], after: int
) -> tuple[int, GroupRecord]:
    index = v.u16("masks record index")
    include_count = v.u16("masks include count")
    group = fam.address(v.bytes(fam.width, "masks group"))
    if not after < index < len(records):
        raise WireError(
            f"{fam.name}: masks extension for record {index} is out of order or past"
            f" the {len(records)} records"
        )
    if group != records[index].group:
        raise WireError(
            f"{fam.name}: masks extension for record {index} names group {group},"
            f" the record is for {records[index].group}"
        )
    if v.remaining % (2 * fam.width) or v.at_end():
        raise WireError(
            f"{fam.name}: masks extension for record {index} has {v.remaining} bytes"
            f" of pairs, not a positive multiple of {2 * fam.width}"
        )
    pairs = []
    for j in range(v.remaining // (2 * fam.width)):
        value, mask = v.uint(fam.width, "mask value"), v.uint(fam.width, "mask")
        if value & ~mask:
            raise WireError(
                f"{fam.name}: record {index} mask pair {j}: value {value:#x}"
                f" has bits outside mask {mask:#x}"
            )
        pairs.append(MaskPair(value, mask))
    if include_count > len(pairs):
        raise WireError(
            f"{fam.name}: record {index} include count {include_count} > {len(pairs)} mask pairs"
        )
    rec = records[index]
    try:
        masked = GroupRecord(
            rec.record_type,
            rec.group,
            rec.sources,
            tuple(pairs[:include_count]),
            tuple(pairs[include_count:]),
            rec.aux,
        )
    except ValueError as exc:
        raise WireError(f"{fam.name}: record {index}: {exc}") from None
    return index, masked


def _read_signed(v: Reader, fam: _Family) -> SignedJoin:
    timestamp = v.u64("timestamp")
    requester = fam.address(v.bytes(fam.width, "requester"))
    generation = v.u32("generation")
    part, parts = v.u16("part"), v.u16("parts")
    if not part < parts:
        raise WireError(f"{fam.name}: signed join is part {part} of {parts}")
    key = v.bytes(v.u16("random key length"), "random key")
    return SignedJoin(timestamp, requester, key, v.rest(), generation, part, parts)


def _decode(data: bytes, fam: _Family) -> tuple[tuple[GroupRecord, ...], SignedJoin | None, int]:
    """Records, signed join and the checksum field; the checksum is left to the caller."""
    r = Reader(data, fam.name)
    msg_type = r.u8("type")
    if msg_type != fam.msg_type:
        raise WireError(f"{fam.name}: type {msg_type}, expected {fam.msg_type}")
    if r.u8("reserved"):
        raise WireError(f"{fam.name}: reserved byte at offset 1 is not zero")
    checksum = r.u16("checksum")
    flags = r.u16("flags")
    if flags & ~EXTENSION_FLAG:
        raise WireError(f"{fam.name}: unknown flags {flags & ~EXTENSION_FLAG:#06x} at offset 4")
    records = [_read_record(r, fam, i) for i in range(r.u16("number of records"))]
    signed = None
    if not flags & EXTENSION_FLAG:
        r.expect_end()
        return tuple(records), signed, checksum
    if r.at_end():
        raise WireError(f"{fam.name}: extension flag set but no extension follows the records")
    last_masked = -1
    while not r.at_end():
        offset = r.offset
        kind = r.u16("extension type")
        v = r.sub(r.u16("extension length"), f"extension {kind}")
        if kind == EXT_GROUP_MASKS:
            index, masked = _read_masks(v, fam, records, last_masked)
            records[index] = masked
            last_masked = index
        elif kind == EXT_SIGNED_JOIN:
            signed = _read_signed(v, fam)
            if not r.at_end():
                raise WireError(f"{fam.name}: signed-join extension at offset {offset} is not last")
        else:
            raise WireError(f"{fam.name}: unsupported extension type {kind} at offset {offset}")
    return tuple(records), signed, checksum


def _check_checksum(fam: _Family, data: bytes, stored: int, prefix: bytes = b"") -> None:
    # Compare with the checksum we would write, so only canonical bytes decode.
    expected = internet_checksum(prefix + _with_checksum(data, 0))
    if stored != expected:
        raise WireError(f"{fam.name}: bad checksum {stored:#06x}, expected {expected:#06x}")


# --- the reports ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IGMPv3Report:
    """An IGMPv3 Membership Report; IPv4 addresses throughout."""

    records: tuple[GroupRecord, ...] = ()
    signed: SignedJoin | None = None

    def __post_init__(self) -> None:
        _check_family(_IGMP, self.records, self.signed)

    def to_wire(self) -> bytes:
        message = _encode(_IGMP, self.records, self.signed)
        return _with_checksum(message, internet_checksum(message))

    def signed_bytes(self) -> bytes:
        """What the signature covers: the report, checksum zero, signature value left out."""
        if self.signed is None:
            raise ValueError("report carries no signed join")
        return _encode(_IGMP, self.records, self.signed, signature=False)

    @classmethod
    def from_wire(cls, data: bytes) -> IGMPv3Report:
        data = bytes(data)
        records, signed, checksum = _decode(data, _IGMP)
        _check_checksum(_IGMP, data, checksum)
        return cls(records, signed)


@dataclass(frozen=True, slots=True)
class MLDv2Report:
    """An MLDv2 Report; its checksum covers the IPv6 pseudo-header, hence src/dst."""

    records: tuple[GroupRecord, ...] = ()
    signed: SignedJoin | None = None

    def __post_init__(self) -> None:
        _check_family(_MLD, self.records, self.signed)

    def to_wire(self, src: IPv6Address, dst: IPv6Address = MLD_V2_ROUTERS) -> bytes:
        message = _encode(_MLD, self.records, self.signed)
        prefix = pseudo_header(src, dst, IPPROTO_ICMPV6, len(message))
        return _with_checksum(message, internet_checksum(prefix + message))

    def signed_bytes(self) -> bytes:
        """What the signature covers: the report, checksum zero, signature value left out.

        The pseudo-header is not covered; the requester address inside is.
        """
        if self.signed is None:
            raise ValueError("report carries no signed join")
        return _encode(_MLD, self.records, self.signed, signature=False)

    @classmethod
    def from_wire(
        cls, data: bytes, src: IPv6Address, dst: IPv6Address = MLD_V2_ROUTERS
    ) -> MLDv2Report:
        data = bytes(data)
        records, signed, checksum = _decode(data, _MLD)
        _check_checksum(_MLD, data, checksum, pseudo_header(src, dst, IPPROTO_ICMPV6, len(data)))
        return cls(records, signed)


# --- as hosts send them ---------------------------------------------------------------


def igmp_packet(report: IGMPv3Report, src: IPv4Address) -> IPv4Packet:
    """The report as Linux sends it: to 224.0.0.22, TTL 1, Router Alert, DSCP CS6, DF."""
    return IPv4Packet.make(
        src,
        IGMP_V3_ROUTERS,
        IPPROTO_IGMP,
        report.to_wire(),
        ttl=1,
        dscp=48,
        dont_fragment=True,
        options=ROUTER_ALERT_V4,
    )


def mld_packet(report: MLDv2Report, src: IPv6Address) -> IPv6Packet:
    """The report as Linux sends it: to ff02::16, hop limit 1, Hop-by-Hop Router Alert."""
    return IPv6Packet.make(
        src,
        MLD_V2_ROUTERS,
        IPPROTO_ICMPV6,
        report.to_wire(src, MLD_V2_ROUTERS),
        hop_limit=1,
        hop_by_hop=HopByHop.with_router_alert(IPPROTO_ICMPV6),
    )
