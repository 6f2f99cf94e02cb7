"""Zone master files (RFC 1035 §5) for a pool zone and the multicast reverse zones.

The servers here serve the sixteen reverse zones 224.in-addr.arpa. ...
239.in-addr.arpa., which cover the multicast space and nothing else, beside the
pool zone; `pool_zones` writes all of them from one list of records.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address
from typing import Final

import dns.exception
import dns.name
import dns.rdata
import dns.rdatatype
import dns.zone

from manycast.addressplan import DEFAULT_PLAN, AddressPlan, BadRecord, NamingError, show
from manycast.naming.records import (
    DEFAULT_TTL,
    IN,
    SOA,
    A,
    PoolRecord,
    dns_name,
    in_zone,
    record_rrsets,
)

__all__ = ["MULTICAST_REVERSE_ZONES", "NEGATIVE_TTL", "pool_zones", "zone_text"]

MULTICAST_REVERSE_ZONES: Final[tuple[str, ...]] = tuple(
    f"{octet}.in-addr.arpa." for octet in range(224, 240)
)
# The SOA minimum (negative caching TTL): short, so a new or withdrawn pool shows up soon.
NEGATIVE_TTL: Final = 60


def _check_unique(records: Sequence[PoolRecord], plan: AddressPlan) -> None:
    aliases: dict[str, PoolRecord] = {}
    groups: dict[IPv4Address, PoolRecord] = {}
    for record in records:
        plan.check(record.group, record.private)
        if record.alias in aliases:
            raise BadRecord(f"alias {record.alias} appears twice")
        if record.group in groups:
            raise BadRecord(
                f"group {record.group} is used by {groups[record.group].alias} and {record.alias}"
            )
        aliases[record.alias] = groups[record.group] = record


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

    A record contributes its A and TXT when its alias is in the zone and its PTR
    and TXT when its reverse name is, so the same list builds the pool zone and
    the reverse zones. `nameserver` defaults to ns.<origin>; `nameserver_address`
    adds its glue A when it is inside the zone.
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
                glue = dns.rdata.from_text(IN, A, nameserver_address)
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
        if not any(record.reverse_name.is_subdomain(z) for z in reverse):
            raise NamingError(f"reverse name {record.reverse_name} is in none of the zones")
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
