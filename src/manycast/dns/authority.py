"""An authoritative DNS server's logic, sans I/O: a wire message in, a wire message out.

Answers are authoritative (AA; NXDOMAIN or NODATA with the SOA in the authority
section, TTL per RFC 2308); updates must be signed with the one TSIG key (RFC
8945), unsigned ones get NOTAUTH as knot answers, and are applied atomically
with the SOA serial moved on every applied change (see `update`). No zone
transfers, wildcards or delegations (pool zones have none). Any input, however
malformed, is counted and answered with FORMERR or dropped; it never raises.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rdtypes.ANY.SOA
import dns.rrset
import dns.tsig
import dns.update
import dns.versioned
import dns.zone

from manycast.dns.errors import DnsServerError
from manycast.dns.update import Reply, apply_update, check_prerequisites, prescan
from manycast.naming import TsigKey

__all__ = ["UDP_PAYLOAD", "Authority", "DnsStats", "load_zone"]

_log = logging.getLogger(__name__)

IN: Final = dns.rdataclass.IN
ANY: Final = dns.rdatatype.ANY
SOA: Final = dns.rdatatype.SOA
CNAME: Final = dns.rdatatype.CNAME
UDP_PAYLOAD: Final = 1232  # the DNS flag day 2020 size: no IP fragmentation


@dataclass
class DnsStats:
    """What a DNS server has received and how it answered, counted by kind."""

    received: int = 0  # messages of any kind
    queries: int = 0
    updates: int = 0  # update messages that parsed
    applied: int = 0  # updates that changed or confirmed a zone
    refused: int = 0  # updates refused: unsigned, bad key, not authoritative, prerequisites
    garbage: int = 0  # messages that did not parse, responses, truncated TCP frames
    errors: int = 0  # internal errors (answered SERVFAIL)


def load_zone(origin: str, text: str) -> tuple[dns.name.Name, dns.versioned.Zone]:
    try:
        name = dns.name.from_text(origin)
        zone = dns.zone.from_text(
            text, origin=name, relativize=False, zone_factory=dns.versioned.Zone
        )
    except (dns.exception.DNSException, ValueError, UnicodeError) as exc:
        raise DnsServerError(f"zone {origin}: {exc}") from None
    assert isinstance(zone, dns.versioned.Zone)
    return name, zone


def _unchecked_key(message: dns.message.Message, name: dns.name.Name) -> bool:
    return False  # parse the TSIG record without checking it (for error replies)


class Authority:
    """An authoritative server's logic: wire message in, wire message (or nothing) out."""

    def __init__(self, zones: Mapping[str, str], tsig_key: TsigKey | None) -> None:
        if not zones:
            raise DnsServerError("no zones to serve")
        self._zones: dict[dns.name.Name, dns.versioned.Zone] = dict(
            load_zone(origin, text) for origin, text in zones.items()
        )
        self._names: dict[dns.name.Name, frozenset[dns.name.Name]] = {}
        for origin in self._zones:
            if self._soa(origin) is None:
                raise DnsServerError(f"zone {origin} has no SOA record at its apex")
            self._index(origin)
        self._keyring: dict[dns.name.Name, dns.tsig.Key] = {}
        if tsig_key is not None:
            key = tsig_key.dns_key()
            self._keyring[key.name] = key
        self.stats = DnsStats()

    @property
    def origins(self) -> list[str]:
        return sorted(o.to_text() for o in self._zones)

    def zone_text(self, origin: str) -> str:
        """The zone as it is now, as a master file."""
        zone = self._zones.get(dns.name.from_text(origin))
        if zone is None:
            raise DnsServerError(f"not serving {origin}")
        text = zone.to_text(want_origin=True)
        assert isinstance(text, str)
        return text

    # index of existing names, so empty non-terminals answer NODATA, not NXDOMAIN
    def _index(self, origin: dns.name.Name) -> None:
        names: set[dns.name.Name] = set()
        with self._zones[origin].reader() as txn:
            for name in txn.iterate_names():
                while name not in names and name.is_subdomain(origin):
                    names.add(name)
                    if name == origin:
                        break
                    name = name.parent()
        self._names[origin] = frozenset(names)

    def _soa(self, origin: dns.name.Name) -> dns.rdataset.Rdataset | None:
        with self._zones[origin].reader() as txn:
            soa: dns.rdataset.Rdataset | None = txn.get(origin, SOA)
        return soa

    def _zone_for(self, name: dns.name.Name) -> dns.name.Name | None:
        best: dns.name.Name | None = None
        for origin in self._zones:
            if name.is_subdomain(origin) and (best is None or len(origin) > len(best)):
                best = origin
        return best

    # entry point
    def handle(self, wire: bytes, *, udp: bool = True) -> bytes | None:
        self.stats.received += 1
        try:
            return self._handle(wire, udp)
        except Exception:  # a responder must outlive any input
            self.stats.errors += 1
            _log.exception("internal error on a %d-byte message", len(wire))
            return _header_reply(wire, dns.rcode.SERVFAIL)

    def _handle(self, wire: bytes, udp: bool) -> bytes | None:
        try:
            msg = dns.message.from_wire(wire, keyring=self._keyring)
        except dns.message.UnknownTSIGKey:
            return self._tsig_refusal(wire, dns.rcode.BADKEY)
        except (dns.tsig.BadKey, dns.tsig.BadAlgorithm):
            return self._tsig_refusal(wire, dns.rcode.BADKEY)
        except dns.tsig.BadSignature:
            return self._tsig_refusal(wire, dns.rcode.BADSIG)
        except dns.tsig.BadTime:
            return self._tsig_refusal(wire, dns.rcode.BADTIME)
        except Exception:  # anything else that does not parse is garbage
            self.stats.garbage += 1
            return _header_reply(wire, dns.rcode.FORMERR)
        if msg.flags & dns.flags.QR:
            self.stats.garbage += 1  # never answer a response
            return None
        opcode = msg.opcode()
        if opcode == dns.opcode.QUERY:
            self.stats.queries += 1
            reply = self._query(msg)
        elif opcode == dns.opcode.UPDATE:
            self.stats.updates += 1
            assert isinstance(msg, dns.update.UpdateMessage)
            reply = self._update(msg)
        else:
            reply = dns.message.make_response(msg, our_payload=UDP_PAYLOAD)
            reply.set_rcode(dns.rcode.NOTIMP)
        return _render(reply, msg, udp)

    def _tsig_refusal(self, wire: bytes, error: int) -> bytes | None:
        """NOTAUTH with a TSIG record carrying the error and no MAC (RFC 8945 §5.3.2)."""
        self.stats.refused += 1
        try:
            msg = dns.message.from_wire(wire, keyring=_unchecked_key)
        except Exception:
            self.stats.garbage += 1
            return _header_reply(wire, dns.rcode.FORMERR)
        if msg.tsig is None or msg.flags & dns.flags.QR:
            return None
        rdata = msg.tsig[0]
        reply = dns.message.make_response(msg)
        reply.set_rcode(dns.rcode.NOTAUTH)
        out = bytearray(reply.to_wire())
        tsig = (
            _name_wire(rdata.algorithm)
            + int(time.time()).to_bytes(6, "big")
            + struct.pack("!HHHHH", rdata.fudge, 0, rdata.original_id, error, 0)
        )
        assert msg.keyname is not None
        out += _name_wire(msg.keyname) + struct.pack(
            "!HHIH", dns.rdatatype.TSIG, dns.rdataclass.ANY, 0, len(tsig)
        )
        out += tsig
        out[10:12] = (int.from_bytes(out[10:12], "big") + 1).to_bytes(2, "big")
        return bytes(out)

    # queries
    def _query(self, query: dns.message.Message) -> dns.message.Message:
        reply = dns.message.make_response(query, our_payload=UDP_PAYLOAD)
        if query.edns > 0:
            reply.set_rcode(dns.rcode.BADVERS)  # RFC 6891 §6.1.3
            return reply
        if len(query.question) != 1:
            reply.set_rcode(dns.rcode.FORMERR)
            return reply
        question = query.question[0]
        qname, qtype = question.name, question.rdtype
        if question.rdclass != IN or qtype in (dns.rdatatype.AXFR, dns.rdatatype.IXFR):
            reply.set_rcode(dns.rcode.REFUSED)
            return reply
        if dns.rdatatype.is_metatype(qtype) and qtype != ANY:
            reply.set_rcode(dns.rcode.FORMERR)
            return reply
        origin = self._zone_for(qname)
        if origin is None:
            reply.set_rcode(dns.rcode.REFUSED)
            return reply
        reply.flags |= dns.flags.AA
        with self._zones[origin].reader() as txn:
            node = txn.get_node(qname)
            rdatasets = list(node.rdatasets) if node is not None else []
            if rdatasets:
                if qtype == ANY:
                    wanted = rdatasets
                else:
                    wanted = [r for r in rdatasets if r.rdtype == qtype]
                    if not wanted and qtype != CNAME:
                        wanted = [r for r in rdatasets if r.rdtype == CNAME]
                for rds in wanted:
                    reply.answer.append(dns.rrset.from_rdata_list(qname, rds.ttl, list(rds)))
            elif qname not in self._names[origin]:
                reply.set_rcode(dns.rcode.NXDOMAIN)
            if not reply.answer:
                soa = txn.get(origin, SOA)
                assert soa is not None
                first = soa[0]
                assert isinstance(first, dns.rdtypes.ANY.SOA.SOA)
                ttl = min(soa.ttl, first.minimum)  # RFC 2308 §3
                reply.authority.append(dns.rrset.from_rdata_list(origin, ttl, list(soa)))
        return reply

    # updates (RFC 2136 §3)
    def _update(self, msg: dns.update.UpdateMessage) -> dns.message.Message:
        reply = dns.message.make_response(msg)
        try:
            if not self._keyring:
                raise Reply(dns.rcode.REFUSED)  # no key configured: read-only
            if not msg.had_tsig:
                raise Reply(dns.rcode.NOTAUTH)  # as knot answers an unsigned update
            if len(msg.zone) != 1:
                raise Reply(dns.rcode.FORMERR)
            zone_rrset = msg.zone[0]
            origin = zone_rrset.name
            if zone_rrset.rdclass != IN or origin not in self._zones:
                raise Reply(dns.rcode.NOTAUTH)
            with self._zones[origin].writer() as txn:
                check_prerequisites(txn, origin, msg.prerequisite)
                prescan(origin, msg.update)
                apply_update(txn, origin, msg.update)
                if txn.changed():
                    txn.update_serial(name=origin)
        except Reply as stop:
            self.stats.refused += 1
            reply.set_rcode(stop.rcode)
            return reply
        self._index(origin)
        self.stats.applied += 1
        return reply


def _render(reply: dns.message.Message, query: dns.message.Message, udp: bool) -> bytes:
    limit = 65535
    if udp:
        limit = max(512, min(query.payload, UDP_PAYLOAD)) if query.edns >= 0 else 512
    try:
        return reply.to_wire(max_size=limit)
    except dns.exception.TooBig:
        # RFC 2181 §9: an answer that does not fit is sent truncated, without data
        reply.answer, reply.authority, reply.additional = [], [], []
        reply.flags |= dns.flags.TC
        return reply.to_wire(max_size=limit)


def _name_wire(name: dns.name.Name) -> bytes:
    wire = name.to_wire()
    assert wire is not None
    return wire


def _header_reply(wire: bytes, rcode: dns.rcode.Rcode) -> bytes | None:
    """A bare header for a message that did not parse (nothing if it is a response)."""
    if len(wire) < 12:
        return None
    ident, flags = struct.unpack("!HH", wire[:4])
    if flags & dns.flags.QR:
        return None
    return struct.pack("!HHHHHH", ident, dns.flags.QR | (flags & 0x7800) | int(rcode), 0, 0, 0, 0)
