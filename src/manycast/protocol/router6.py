"""The manycast router of an IPv6 network: MLDv2 membership, the same forwarding.

Everything that decides (admission by link, masked source-specific membership,
the forwarding cache, relaying each member's own report to the other routers,
General Queries after a start) is `router.Router`'s; this class reads and writes
the IPv6 forms: packets peeked at fixed offsets (`peek_v6`), the hop limit
decremented (IPv6 has no header checksum to patch), members' MLDv2 reports
(RFC 3810, ICMPv6 type 143 to ff02::16 behind a Hop-by-Hop Router Alert) with
the seed's masks as 128-bit value/mask pairs, and MLDv2 General Queries to ff02::1.

Multicast scope (RFC 4291 §2.7): groups of scope 1 and 2 (interface- and
link-local: ff02::16, ff02::1) stay on the link; every wider scope is routed,
by membership, as IPv4's 224.0.0.0/4 outside 224.0.0.0/24.

A private pool's signed MLDv2 joins are admitted as IGMPv3's are (`admission.py`:
the same checks, the SIGNED JOIN TLV with a 16-byte requester), and a relayed one
stays checkable: the signature leaves out the checksum, which the relaying router
recomputes for its own address.

The fast path (`fastpath.py`) is published as IPv4's, keyed by the 32 bytes of
the two addresses; the overlay serves it.

Label switching (a VIP pool, Fig 17-18; R4's pinned paths, Fig 16) is
`vipplane.py`'s, as on IPv4: packets to the VIP, and labelled packets to one of
our addresses, MPLS-in-UDP over IPv6 with its UDP checksum (`wire/label6.py`).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from manycast.protocol.fastpath import FastPath
from manycast.protocol.refusal import Refusal
from manycast.protocol.router import Router
from manycast.wire.cursor import internet_checksum
from manycast.wire.errors import WireError
from manycast.wire.ip import (
    IPPROTO_HOPOPTS,
    IPPROTO_ICMPV6,
    IPPROTO_UDP,
    Address,
    HopByHop,
    IPv6Packet,
    decrement_hop_limit_v6,
    peek_v6,
    pseudo_header,
)
from manycast.wire.label import MPLS_UDP_PORT
from manycast.wire.membership import MLD_V2_REPORT, MLD_V2_ROUTERS, MLDv2Report
from manycast.wire.membership_query import ALL_NODES

_MULTICAST = 0xFF  # the top byte of every IPv6 multicast address
_LINK_SCOPE = 2  # scopes 0-2 never leave the link
_MLD_V2_ROUTERS = int(MLD_V2_ROUTERS)
_ALL_NODES = int(ALL_NODES)
_MPLS_DPORT = MPLS_UDP_PORT.to_bytes(2, "big")


def _ipv6(number: int) -> Address:
    return ipaddress.IPv6Address(number)


class Router6(Router):
    """A router of an IPv6 network (every interface address IPv6)."""

    _address = staticmethod(_ipv6)
    _full_mask = (1 << 128) - 1

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """`Router`'s arguments (a VIP and an R4 group, when given, are IPv6)."""
        super().__init__(*args, **kwargs)
        self._decrement = decrement_hop_limit_v6
        self.fast_path = FastPath(self.interfaces, self.stats, family=6)

    def receive(self, iface: str, packet: bytes, now: float) -> None:
        try:
            src, dst, next_header, hop_limit = peek_v6(packet)
        except WireError:
            self.stats.malformed += 1
            return
        if dst == self._vip and self.vip is not None:
            self.vip.on_vip_packet(iface, packet, hop_limit, now)
            self._vip_changed(now)
        elif dst >> 120 == _MULTICAST:
            if (dst >> 112) & 0xF <= _LINK_SCOPE:
                if dst == _MLD_V2_ROUTERS and next_header == IPPROTO_HOPOPTS:
                    self._on_report(iface, packet, now)
                elif dst == _ALL_NODES and next_header == IPPROTO_HOPOPTS:
                    self.querier.on_query(iface, packet, now)
                return
            self._forward_multicast(iface, src, dst, packet, hop_limit, now)
        elif dst in self._own:
            self.stats.local += 1
            if next_header == IPPROTO_UDP:
                # MPLS-in-UDP, by its UDP destination port (no extension headers)
                if self.vip is not None and packet[42:44] == _MPLS_DPORT:
                    self.vip.on_labelled(packet, now)
                else:
                    self._on_control(iface, packet, now)
        else:
            self._forward_unicast(dst, packet, hop_limit)

    def _on_report(self, iface: str, packet: bytes, now: float) -> None:
        try:
            ip = IPv6Packet.from_wire(packet)
            if ip.protocol != IPPROTO_ICMPV6 or ip.payload[:1] != bytes((MLD_V2_REPORT,)):
                raise WireError("not an MLDv2 report")
            # RFC 3810 §5: link-local, with a Router Alert for MLD, or discarded.
            if ip.header.hop_limit != 1 or ip.hop_by_hop is None or ip.hop_by_hop.router_alert != 0:
                raise WireError("an MLDv2 report needs hop limit 1 and a Router Alert (MLD)")
            report = MLDv2Report.from_wire(ip.payload, ip.header.src, ip.header.dst)
        except WireError:
            self.stats.malformed += 1
            self.stats.rejected[Refusal.MALFORMED] += 1
            return
        self._admit(iface, ip, report, now)

    def _relay(self, arrived_on: str, mld: bytes) -> None:
        """The member's report, unchanged but for the checksum, which covers our
        address (the IPv6 pseudo-header) where IGMP's covers the message alone."""
        for out in sorted(self.router_ifaces - {arrived_on}):
            src = self.interfaces[out].address
            assert isinstance(src, ipaddress.IPv6Address)
            unsummed = mld[:2] + b"\0\0" + mld[4:]
            prefix = pseudo_header(src, MLD_V2_ROUTERS, IPPROTO_ICMPV6, len(mld))
            message = unsummed[:2] + internet_checksum(prefix + unsummed).to_bytes(2, "big")
            relayed = IPv6Packet.make(
                src,
                MLD_V2_ROUTERS,
                IPPROTO_ICMPV6,
                message + unsummed[4:],
                hop_limit=1,
                hop_by_hop=HopByHop.with_router_alert(IPPROTO_ICMPV6),
            )
            self.send(out, relayed.to_wire(), None)
            self.stats.joins_relayed += 1
