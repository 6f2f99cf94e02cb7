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
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address

from manycast.wire.cursor import Reader, Writer, internet_checksum
from manycast.wire.errors import WireError
from manycast.wire.ip import IPPROTO_IGMP, ROUTER_ALERT_V4, IPv4Packet

IGMP_QUERY = 0x11
ALL_SYSTEMS = IPv4Address("224.0.0.1")
ANY_GROUP = IPv4Address("0.0.0.0")
_V1_V2_LENGTH = 8
_MAX_SOURCES = 0xFFFF


def code_value(code: int) -> int:
    """The value a Max Resp Code or QQIC stands for (RFC 3376 §4.1.1, §4.1.7)."""
    if not 0 <= code <= 0xFF:
        raise ValueError(f"code {code} does not fit in 8 bits")
    if code < 0x80:
        return code
    exponent, mantissa = (code >> 4) & 0x07, code & 0x0F
    return (mantissa | 0x10) << (exponent + 3)


def value_code(value: int) -> int:
    """The code for `value`, exact below 128; above, the largest value the
    floating-point form holds that is not more than `value` (up to 31 744)."""
    if value < 0:
        raise ValueError(f"negative value {value}")
    if value < 0x80:
        return value
    exponent = min(7, value.bit_length() - 8)
    mantissa = min(0x0F, (value >> (exponent + 3)) - 0x10)
    return 0x80 | exponent << 4 | mantissa


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
