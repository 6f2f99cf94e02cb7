"""Zone master files (RFC 1035 §5) for a pool zone and the multicast reverse zones.

The servers here serve, beside the pool zone, the sixteen reverse zones
224.in-addr.arpa. ... 239.in-addr.arpa. and f.f.ip6.arpa., which cover the IPv4
and IPv6 multicast spaces (224.0.0.0/4, ff00::/8) and nothing else; `pool_zones`
writes all of them from one list of records.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import Final

import dns.exception
import dns.name
import dns.rdata
import dns.rdatatype
import dns.zone

from manycast.addressplan import DEFAULT_PLAN, AddressPlan, BadRecord, Group, NamingError, show
from manycast.naming.records import (
    AAAA,
    DEFAULT_TTL,
    IN,
    SOA,
    A,
    PoolRecord,
    dns_name,
    in_zone,
    record_rrsets,
)

__all__ = [
    "MULTICAST_REVERSE_ZONE6",
    "MULTICAST_REVERSE_ZONES",
    "MULTICAST_REVERSE_ZONES4",
    "NEGATIVE_TTL",
    "pool_zones",
    "zone_text",
]

MULTICAST_REVERSE_ZONES4: Final[tuple[str, ...]] = tuple(
    f"{octet}.in-addr.arpa." for octet in range(224, 240)
)
MULTICAST_REVERSE_ZONE6: Final = "f.f.ip6.arpa."  # ff00::/8 ends on its first two nibbles
MULTICAST_REVERSE_ZONES: Final = (*MULTICAST_REVERSE_ZONES4, MULTICAST_REVERSE_ZONE6)
# The SOA minimum (negative caching TTL): short, so a new or withdrawn pool shows up soon.
NEGATIVE_TTL: Final = 60


def _check_unique(records: Sequence[PoolRecord], plan: AddressPlan) -> None:
    aliases: dict[str, PoolRecord] = {}
    groups: dict[Group, PoolRecord] = {}
    for record in records:
        if record.alias in aliases:
            raise BadRecord(f"alias {record.alias} appears twice")
        aliases[record.alias] = record
        for group in record.groups:
            plan.check(group, record.private)
            if group in groups:
                raise BadRecord(
                    f"group {group} is used by {groups[group].alias} and {record.alias}"
                )
            groups[group] = record


def zone_text(
    origin: str,
    records: Iterable[PoolRecord] = (),
    *,
    nameserver: str | None = None,
    nameserver_address: str | None = None,
    hostmaster: str | None = None,
    serial: int = 1,
    ttl: int = DEFAULT_TTL,
    negative_ttl: int = NEGATIVE_TTL,
    plan: AddressPlan = DEFAULT_PLAN,
) -> str:
    """A master file for zone `origin`: SOA, NS and every record name inside it.

    A record contributes its A (or AAAA, or both) and TXT when its alias is in
    the zone and its PTR and TXT at each reverse name that is, so the same list
    builds the pool zone and the reverse zones. `nameserver` defaults to
    ns.<origin>; `nameserver_address` adds its glue A (AAAA for an IPv6 address)
    when it is inside the zone.
    """
    zone_name = dns_name(origin, "zone")
    recs = list(records)
    _check_unique(recs, plan)
    ns = dns_name(nameserver, "nameserver") if nameserver else dns.name.from_text("ns", zone_name)
    rname = (
        dns_name(hostmaster, "hostmaster")
        if hostmaster
        else dns.name.from_text("hostmaster", zone_name)
    )
    if not 0 < serial < 2**32:
        raise NamingError(f"bad serial {serial}")
    zone = dns.zone.Zone(zone_name, relativize=False)
    with zone.writer() as txn:
        soa = f"{ns} {rname} {serial} 3600 600 86400 {negative_ttl}"
        txn.add(zone_name, ttl, dns.rdata.from_text(IN, SOA, soa))
        txn.add(zone_name, ttl, dns.rdata.from_text(IN, dns.rdatatype.NS, ns.to_text()))
        if nameserver_address is not None and ns.is_subdomain(zone_name):
            try:
                kind = AAAA if ipaddress.ip_address(nameserver_address).version == 6 else A
                glue = dns.rdata.from_text(IN, kind, nameserver_address)
            except (dns.exception.DNSException, ValueError):
                raise NamingError(f"bad nameserver address {show(nameserver_address)}") from None
            txn.add(ns, ttl, glue)
        for record in recs:
            for rrset in record_rrsets(record):
                if rrset.name.is_subdomain(zone_name):
                    txn.add(rrset)
    text = zone.to_text(want_origin=True)
    assert isinstance(text, str)
    return f"; manycast pool names (see docs/naming.md)\n{text}"


def pool_zones(
    origin: str,
    records: Iterable[PoolRecord] = (),
    *,
    reverse_zones: Iterable[str] = MULTICAST_REVERSE_ZONES,
    nameserver: str | None = None,
    nameserver_address: str | None = None,
    plan: AddressPlan = DEFAULT_PLAN,
) -> dict[str, str]:
    """Zone name -> master file for the pool zone and the reverse zones, all of them
    checked to hold every record: what `KnotServer` and `EmbeddedServer` load."""
    zone_name = dns_name(origin, "zone")
    ns = nameserver or dns.name.from_text("ns", zone_name).to_text()
    reverse = [dns_name(z, "reverse zone") for z in reverse_zones]
    recs = list(records)
    for record in recs:
        in_zone(record.alias_name, zone_name, "alias")
        for rev in record.reverse_names:
            if not any(rev.is_subdomain(z) for z in reverse):
                raise NamingError(f"reverse name {rev} is in none of the zones")
    zones = {
        zone_name.to_text(): zone_text(
            zone_name.to_text(),
            recs,
            nameserver=ns,
            nameserver_address=nameserver_address,
            plan=plan,
        )
    }
    for z in reverse:
        if z.to_text() in zones:
            raise NamingError(f"zone {z} given twice")
        zones[z.to_text()] = zone_text(
            z.to_text(), recs, nameserver=ns, hostmaster=f"hostmaster.{zone_name}", plan=plan
        )
    return zones
