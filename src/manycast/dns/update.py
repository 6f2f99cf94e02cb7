"""Applying a DNS UPDATE (RFC 2136 §3) to a zone: prerequisites, prescan, then the changes.

Each step raises `Reply(rcode)` to stop; the caller runs them inside one zone
transaction, so a refused update rolls back and changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rrset
import dns.transaction

__all__ = ["Reply", "apply_update", "check_prerequisites", "prescan"]

IN: Final = dns.rdataclass.IN
ANY: Final = dns.rdatatype.ANY
SOA: Final = dns.rdatatype.SOA
NS: Final = dns.rdatatype.NS
CNAME: Final = dns.rdatatype.CNAME


class Reply(Exception):
    """Ends processing with this rcode (the transaction, if any, rolls back)."""

    def __init__(self, rcode: dns.rcode.Rcode) -> None:
        super().__init__(dns.rcode.to_text(rcode))
        self.rcode = rcode


def _in_use(txn: dns.transaction.Transaction, name: dns.name.Name) -> bool:
    node = txn.get_node(name)
    return node is not None and len(node.rdatasets) > 0


def check_prerequisites(
    txn: dns.transaction.Transaction, origin: dns.name.Name, prereqs: Iterable[dns.rrset.RRset]
) -> None:
    exact: dict[tuple[dns.name.Name, dns.rdatatype.RdataType], set[dns.rdata.Rdata]] = {}
    for rrset in prereqs:
        name, rdtype = rrset.name, rrset.rdtype
        if not name.is_subdomain(origin):
            raise Reply(dns.rcode.NOTZONE)
        if rrset.ttl != 0:
            raise Reply(dns.rcode.FORMERR)
        if rrset.deleting == dns.rdataclass.ANY:
            if rdtype == ANY:
                if not _in_use(txn, name):
                    raise Reply(dns.rcode.NXDOMAIN)
            elif txn.get(name, rdtype) is None:
                raise Reply(dns.rcode.NXRRSET)
        elif rrset.deleting == dns.rdataclass.NONE:
            if rdtype == ANY:
                if _in_use(txn, name):
                    raise Reply(dns.rcode.YXDOMAIN)
            elif txn.get(name, rdtype) is not None:
                raise Reply(dns.rcode.YXRRSET)
        elif rrset.deleting is None and rrset.rdclass == IN:
            exact.setdefault((name, rdtype), set()).update(rrset)
        else:
            raise Reply(dns.rcode.FORMERR)
    for (name, rdtype), wanted in exact.items():
        current = txn.get(name, rdtype)
        if current is None or set(current) != wanted:
            raise Reply(dns.rcode.NXRRSET)


def prescan(origin: dns.name.Name, updates: Iterable[dns.rrset.RRset]) -> None:
    for rrset in updates:
        if not rrset.name.is_subdomain(origin):
            raise Reply(dns.rcode.NOTZONE)
        meta = dns.rdatatype.is_metatype(rrset.rdtype)
        if rrset.deleting is None:
            if rrset.rdclass != IN or meta:
                raise Reply(dns.rcode.FORMERR)
        elif rrset.deleting == dns.rdataclass.ANY:
            if rrset.ttl != 0 or len(rrset) or (meta and rrset.rdtype != ANY):
                raise Reply(dns.rcode.FORMERR)
        elif rrset.deleting == dns.rdataclass.NONE:
            if rrset.ttl != 0 or meta:
                raise Reply(dns.rcode.FORMERR)
        else:
            raise Reply(dns.rcode.FORMERR)


def apply_update(
    txn: dns.transaction.Transaction, origin: dns.name.Name, updates: Iterable[dns.rrset.RRset]
) -> None:
    for rrset in updates:
        name, rdtype = rrset.name, rrset.rdtype
        apex = name == origin
        if rrset.deleting is None:
            if rdtype == SOA:
                continue  # the serial is this server's business
            has_cname = txn.get(name, CNAME) is not None
            if (rdtype == CNAME) != has_cname and _in_use(txn, name):
                continue  # CNAME and other data do not mix (RFC 2136 §3.4.2.2)
            merged = dns.rdataset.Rdataset(IN, rdtype)
            for rdata in [*(txn.get(name, rdtype) or ()), *rrset]:
                merged.add(rdata)
            merged.ttl = rrset.ttl
            txn.replace(name, merged)
        elif rrset.deleting == dns.rdataclass.ANY:
            if rdtype == ANY:
                node = txn.get_node(name)
                for rds in [] if node is None else list(node.rdatasets):
                    if not (apex and rds.rdtype in (SOA, NS)):
                        txn.delete(name, rds.rdtype)
            elif not (apex and rdtype in (SOA, NS)) and txn.get(name, rdtype) is not None:
                txn.delete(name, rdtype)
        else:  # class NONE: delete these records
            current = txn.get(name, rdtype)
            if rdtype == SOA or current is None:
                continue
            doomed = [r for r in rrset if r in current]
            if apex and rdtype == NS and len(doomed) >= len(current):
                continue  # never the zone's last NS
            if doomed:
                txn.delete(name, dns.rdataset.from_rdata_list(0, doomed))
