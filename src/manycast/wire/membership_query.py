"""IGMPv3 Membership Query (RFC 3376 §4.1): what a router asks its hosts.

    type 0x11(8) max-resp-code(8) checksum(16)
    group(32)
    resv(4) S(1) QRV(3) QQIC(8) number-of-sources(16)
    sources

The checksum covers the IGMP message. A General Query names group 0.0.0.0 and no
source and goes to 224.0.0.1 (all systems); a Group-Specific Query names a group,
a Group-and-Source-Specific Query a group and sources. Members answer within the
Max Resp Time the code gives (§4.1.1: below 128 in tenths of a second, from 128 on
a floating-point form); QQIC is the querier's query interval in seconds, in the
same form (§4.1.7).

Strictness, as for reports (`membership.py`): decoding succeeds only on bytes that
re-encode identically, so the reserved bits must be zero and nothing may follow
the sources (§4.1.10 would ignore both; RFC 9279 gives the reserved bits a meaning
this codec does not take). An 8-byte query is IGMPv1/v2 (§7.1) and is refused.

The MLDv2 Query (RFC 3810 §5.1) is the IPv6 counterpart, an ICMPv6 message whose
checksum covers the IPv6 pseudo-header (hence src/dst, as for `MLDv2Report`):

    type 130(8) code(8) checksum(16)
    max-resp-code(16) reserved(16)
    multicast-address(128)
    resv(4) S(1) QRV(3) QQIC(8) number-of-sources(16)
    sources

Its Max Resp Code is in milliseconds, below 32768 exactly, from 32768 on a
floating-point form with a 12-bit mantissa (§5.1.3); QQIC is coded as IGMPv3's.
The same strictness holds: the code byte, the reserved field and bits are zero,
nothing follows the sources, and a 24-byte query is MLDv1 (§8.1) and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from manycast.wire.cursor import Reader, Writer, internet_checksum
from manycast.wire.errors import WireError
from manycast.wire.ip import (
    IPPROTO_ICMPV6,
    IPPROTO_IGMP,
    ROUTER_ALERT_V4,
    HopByHop,
    IPv4Packet,
    IPv6Packet,
    pseudo_header,
)

IGMP_QUERY = 0x11
ALL_SYSTEMS = IPv4Address("224.0.0.1")
ANY_GROUP = IPv4Address("0.0.0.0")
_V1_V2_LENGTH = 8
_MAX_SOURCES = 0xFFFF
MLD_QUERY = 130
ALL_NODES = IPv6Address("ff02::1")
ANY_ADDRESS = IPv6Address("::")
_MLD_V1_LENGTH = 24
# Router Alert, MLD (RFC 2711), then two Pad1, as the Linux bridge's querier pads it
# (Linux hosts pad their reports with PadN instead: HopByHop.with_router_alert).
_ROUTER_ALERT_PAD1 = bytes((5, 2, 0, 0, 0, 0))


def _float_value(code: int, mantissa_bits: int) -> int:
    # 1 exp(3) mant(mantissa_bits) stands for (mant | 1 << mantissa_bits) << (exp + 3).
    if code < 1 << (mantissa_bits + 3):
        return code
    exponent, mantissa = (code >> mantissa_bits) & 0x07, code & ((1 << mantissa_bits) - 1)
    return (mantissa | 1 << mantissa_bits) << (exponent + 3)


def _float_code(value: int, mantissa_bits: int) -> int:
    if value < 0:
        raise ValueError(f"negative value {value}")
    if value < 1 << (mantissa_bits + 3):
        return value
    top = (1 << mantissa_bits) - 1
    exponent = min(7, value.bit_length() - mantissa_bits - 4)
    mantissa = min(top, (value >> (exponent + 3)) - (1 << mantissa_bits))
    return 1 << (mantissa_bits + 3) | exponent << mantissa_bits | mantissa


def code_value(code: int) -> int:
    """The value a Max Resp Code or QQIC stands for (RFC 3376 §4.1.1, §4.1.7)."""
    if not 0 <= code <= 0xFF:
        raise ValueError(f"code {code} does not fit in 8 bits")
    return _float_value(code, 4)


def value_code(value: int) -> int:
    """The code for `value`, exact below 128; above, the largest value the
    floating-point form holds that is not more than `value` (up to 31 744)."""
    return _float_code(value, 4)


def mld_code_value(code: int) -> int:
    """The milliseconds an MLDv2 Maximum Response Code stands for (RFC 3810 §5.1.3)."""
    if not 0 <= code <= 0xFFFF:
        raise ValueError(f"code {code} does not fit in 16 bits")
    return _float_value(code, 12)


def mld_value_code(value: int) -> int:
    """The MLDv2 code for `value` ms, exact below 32768; above, the largest value the
    floating-point form holds that is not more than `value` (up to 8 387 584)."""
    return _float_code(value, 12)


@dataclass(frozen=True, slots=True)
class IGMPv3Query:
    """An IGMPv3 Membership Query; `max_resp_code` and `qqic` are kept as coded."""

    group: IPv4Address = ANY_GROUP
    sources: tuple[IPv4Address, ...] = ()
    max_resp_code: int = 100  # 10 s, RFC 3376's default Query Response Interval
    suppress: bool = False  # S: routers do not lower their timers on this query
    qrv: int = 2  # the querier's Robustness Variable (0: above 7)
    qqic: int = 125  # the querier's Query Interval, 125 s by default

    def __post_init__(self) -> None:
        for name, value in (("max resp code", self.max_resp_code), ("QQIC", self.qqic)):
            if not 0 <= value <= 0xFF:
                raise ValueError(f"{name} {value} does not fit in 8 bits")
        if not 0 <= self.qrv <= 7:
            raise ValueError(f"QRV {self.qrv} does not fit in 3 bits")
        if len(self.sources) > _MAX_SOURCES:
            raise ValueError(f"{len(self.sources)} sources, at most {_MAX_SOURCES}")
        if self.sources and self.group == ANY_GROUP:
            raise ValueError("a General Query names no source (RFC 3376 §4.1.8)")
        if not all(isinstance(a, IPv4Address) for a in (self.group, *self.sources)):
            raise ValueError("an IGMPv3 query carries IPv4 addresses only")

    @property
    def general(self) -> bool:
        return self.group == ANY_GROUP

    @property
    def max_response(self) -> float:
        """Seconds within which a member answers."""
        return code_value(self.max_resp_code) / 10

    def to_wire(self) -> bytes:
        w = Writer().u8(IGMP_QUERY).u8(self.max_resp_code).u16(0).bytes(self.group.packed)
        w.u8(0x08 * self.suppress | self.qrv).u8(self.qqic).u16(len(self.sources))
        for source in self.sources:
            w.bytes(source.packed)
        message = w.getvalue()
        checksum = internet_checksum(message)
        return message[:2] + checksum.to_bytes(2, "big") + message[4:]

    @classmethod
    def from_wire(cls, data: bytes) -> IGMPv3Query:
        data = bytes(data)
        what = "IGMPv3 query"
        if len(data) == _V1_V2_LENGTH and data[:1] == bytes([IGMP_QUERY]):
            raise WireError(f"{what}: {len(data)} bytes is an IGMPv1/v2 query (RFC 3376 §7.1)")
        r = Reader(data, what)
        if (kind := r.u8("type")) != IGMP_QUERY:
            raise WireError(f"{what}: type {kind:#04x}, expected {IGMP_QUERY:#04x}")
        max_resp_code = r.u8("max resp code")
        stored = r.u16("checksum")
        group = IPv4Address(r.bytes(4, "group"))
        flags = r.u8("flags")
        if flags & 0xF0:
            raise WireError(f"{what}: reserved bits {flags >> 4:#x} at offset 8 are not zero")
        qqic = r.u8("QQIC")
        sources = tuple(IPv4Address(r.bytes(4, f"source {i}")) for i in range(r.u16("sources")))
        r.expect_end()
        expected = internet_checksum(data[:2] + b"\0\0" + data[4:])
        if stored != expected:
            raise WireError(f"{what}: bad checksum {stored:#06x}, expected {expected:#06x}")
        if sources and group == ANY_GROUP:
            raise WireError(f"{what}: a general query (group 0.0.0.0) with {len(sources)} sources")
        return cls(group, sources, max_resp_code, bool(flags & 0x08), flags & 0x07, qqic)


def igmp_query_packet(query: IGMPv3Query, src: IPv4Address) -> IPv4Packet:
    """The query as Linux sends it: a General Query to 224.0.0.1, a specific one to its
    group; TTL 1, Router Alert, DSCP CS6, DF (RFC 3376 §4)."""
    return IPv4Packet.make(
        src,
        ALL_SYSTEMS if query.general else query.group,
        IPPROTO_IGMP,
        query.to_wire(),
        ttl=1,
        dscp=48,
        dont_fragment=True,
        options=ROUTER_ALERT_V4,
    )


@dataclass(frozen=True, slots=True)
class MLDv2Query:
    """An MLDv2 Query; `max_resp_code` (ms, 16-bit form) and `qqic` are kept as coded."""

    group: IPv6Address = ANY_ADDRESS
    sources: tuple[IPv6Address, ...] = ()
    max_resp_code: int = 10_000  # 10 s, RFC 3810's default Query Response Interval
    suppress: bool = False
    qrv: int = 2
    qqic: int = 125

    def __post_init__(self) -> None:
        if not 0 <= self.max_resp_code <= 0xFFFF:
            raise ValueError(f"max resp code {self.max_resp_code} does not fit in 16 bits")
        if not 0 <= self.qqic <= 0xFF:
            raise ValueError(f"QQIC {self.qqic} does not fit in 8 bits")
        if not 0 <= self.qrv <= 7:
            raise ValueError(f"QRV {self.qrv} does not fit in 3 bits")
        if len(self.sources) > _MAX_SOURCES:
            raise ValueError(f"{len(self.sources)} sources, at most {_MAX_SOURCES}")
        if self.sources and self.group == ANY_ADDRESS:
            raise ValueError("a General Query names no source (RFC 3810 §5.1.10)")
        if not all(isinstance(a, IPv6Address) for a in (self.group, *self.sources)):
            raise ValueError("an MLDv2 query carries IPv6 addresses only")

    @property
    def general(self) -> bool:
        return self.group == ANY_ADDRESS

    @property
    def max_response(self) -> float:
        """Seconds within which a listener answers."""
        return mld_code_value(self.max_resp_code) / 1000

    def to_wire(self, src: IPv6Address, dst: IPv6Address) -> bytes:
        w = Writer().u8(MLD_QUERY).u8(0).u16(0).u16(self.max_resp_code).u16(0)
        w.bytes(self.group.packed)
        w.u8(0x08 * self.suppress | self.qrv).u8(self.qqic).u16(len(self.sources))
        for source in self.sources:
            w.bytes(source.packed)
        message = w.getvalue()
        prefix = pseudo_header(src, dst, IPPROTO_ICMPV6, len(message))
        checksum = internet_checksum(prefix + message)
        return message[:2] + checksum.to_bytes(2, "big") + message[4:]

    @classmethod
    def from_wire(cls, data: bytes, src: IPv6Address, dst: IPv6Address) -> MLDv2Query:
        data = bytes(data)
        what = "MLDv2 query"
        if len(data) == _MLD_V1_LENGTH and data[:1] == bytes([MLD_QUERY]):
            raise WireError(f"{what}: {len(data)} bytes is an MLDv1 query (RFC 3810 §8.1)")
        r = Reader(data, what)
        if (kind := r.u8("type")) != MLD_QUERY:
            raise WireError(f"{what}: type {kind}, expected {MLD_QUERY}")
        if code := r.u8("code"):
            raise WireError(f"{what}: code {code} at offset 1 is not zero")
        stored = r.u16("checksum")
        max_resp_code = r.u16("max resp code")
        if reserved := r.u16("reserved"):
            raise WireError(f"{what}: reserved field {reserved:#06x} at offset 6 is not zero")
        group = IPv6Address(r.bytes(16, "multicast address"))
        flags = r.u8("flags")
        if flags & 0xF0:
            raise WireError(f"{what}: reserved bits {flags >> 4:#x} at offset 24 are not zero")
        qqic = r.u8("QQIC")
        sources = tuple(IPv6Address(r.bytes(16, f"source {i}")) for i in range(r.u16("sources")))
        r.expect_end()
        prefix = pseudo_header(src, dst, IPPROTO_ICMPV6, len(data))
        expected = internet_checksum(prefix + data[:2] + b"\0\0" + data[4:])
        if stored != expected:
            raise WireError(f"{what}: bad checksum {stored:#06x}, expected {expected:#06x}")
        if sources and group == ANY_ADDRESS:
            raise WireError(f"{what}: a general query (address ::) with {len(sources)} sources")
        return cls(group, sources, max_resp_code, bool(flags & 0x08), flags & 0x07, qqic)


def mld_query_packet(query: MLDv2Query, src: IPv6Address) -> IPv6Packet:
    """The query as the Linux bridge's querier sends it: a General Query to ff02::1, a
    specific one to its address; hop limit 1, Router Alert (RFC 3810 §5), and from a
    link-local address, without which listeners ignore it (§5.1.14)."""
    if not src.is_link_local:
        raise ValueError(f"an MLDv2 query goes out from a link-local address, not {src}")
    dst = ALL_NODES if query.general else query.group
    return IPv6Packet.make(
        src,
        dst,
        IPPROTO_ICMPV6,
        query.to_wire(src, dst),
        hop_limit=1,
        hop_by_hop=HopByHop(IPPROTO_ICMPV6, _ROUTER_ALERT_PAD1),
    )
