"""The pool record (Fig 3, 4) as four DNS resource records, and their strict decoding.

The seed's record maps an alias to a multicast group address and carries the
owner, the public key and a private/public flag; a query by the alias or by the
address returns the whole record (Fig 4). Here it is four ordinary RRsets, so
any authoritative server (knot, or the embedded responder in `manycast.dns`)
serves it and standard tools show it:

    <alias>                  A    <group>
    <alias>                  TXT  "v=manycast1; k=ed25519; p=<key>; o=<owner>; f=<flag>"
    <reverse name of group>  PTR  <alias>
    <reverse name of group>  TXT  (the same key record, see `keyrecord`)

The reverse name is the standard one (group 232.1.2.3 -> 3.2.1.232.in-addr.arpa.),
so a router that knows only the group address can find the record without
knowing the pool's zone, and `kdig -x 232.1.2.3` shows it.

Reading is strict: exactly one A (a multicast address), exactly one manycast TXT
at each name, a PTR naming the alias, the same key record at both names, and the
flag consistent with the plan. A missing RRset raises `NamingRefused` ("no ...
record at"), anything else wrong `BadRecord`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Final

import dns.exception
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rdtypes.ANY.PTR
import dns.rdtypes.ANY.TXT
import dns.rdtypes.IN.A
import dns.reversename
import dns.rrset
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from manycast.addressplan import (
    DEFAULT_PLAN,
    AddressPlan,
    BadRecord,
    NamingError,
    NamingRefused,
    multicast_address,
    show,
)
from manycast.naming.keyrecord import (
    ALNUM,
    KeyRecord,
    check_key,
    check_owner,
    format_key_txt,
    is_key_txt,
    parse_key_txt,
)

__all__ = [
    "DEFAULT_TTL",
    "MAX_TTL",
    "PoolRecord",
    "decode_rrsets",
    "record_rrsets",
    "reverse_name",
]

IN: Final = dns.rdataclass.IN
A: Final = dns.rdatatype.A
TXT: Final = dns.rdatatype.TXT
PTR: Final = dns.rdatatype.PTR
SOA: Final = dns.rdatatype.SOA

DEFAULT_TTL: Final = 300
MAX_TTL: Final = 2**31 - 1  # RFC 2181 §8

_LABEL_CHARS: Final = frozenset(c.encode() for c in ALNUM | {"-", "_"})


# names ---------------------------------------------------------------------------


def dns_name(
    text: str | dns.name.Name, what: str, error: type[NamingError] = NamingError
) -> dns.name.Name:
    """An absolute, canonical name of letters, digits, '-' and '_' labels, or `error`."""
    if isinstance(text, dns.name.Name):
        name = text if text.is_absolute() else text.concatenate(dns.name.root)
    else:
        try:
            name = dns.name.from_text(text)
        except (dns.exception.DNSException, UnicodeError, ValueError) as exc:
            raise error(f"bad {what} {show(text)}: {exc}") from None
    if name == dns.name.root:
        raise error(f"bad {what}: the root name")
    for label in name.labels[:-1]:
        if not label or any(bytes((b,)) not in _LABEL_CHARS for b in label):
            raise error(
                f"bad {what} {show(name.to_text())}: labels are letters, digits, '-' and '_'"
            )
    return name.canonicalize()


def reverse_name(group: IPv4Address | str) -> dns.name.Name:
    """3.2.1.232.in-addr.arpa. for group 232.1.2.3."""
    return dns.reversename.from_address(str(multicast_address(group)))


def in_zone(name: dns.name.Name, zone: dns.name.Name, what: str) -> None:
    if not name.is_subdomain(zone):
        raise NamingError(f"{what} {name} is outside zone {zone}")


# rdata ---------------------------------------------------------------------------


def txt_rdata(text: str) -> dns.rdtypes.ANY.TXT.TXT:
    raw = text.encode("ascii")
    chunks = [raw[i : i + 255] for i in range(0, len(raw), 255)]  # RFC 1035 character-string
    return dns.rdtypes.ANY.TXT.TXT(IN, TXT, chunks)


def a_rdata(group: IPv4Address) -> dns.rdata.Rdata:
    return dns.rdata.from_text(IN, A, str(group))


def ptr_rdata(target: dns.name.Name) -> dns.rdata.Rdata:
    return dns.rdata.from_text(IN, PTR, target.to_text())


def txt_bytes(rdata: dns.rdata.Rdata) -> bytes:
    assert isinstance(rdata, dns.rdtypes.ANY.TXT.TXT)
    return b"".join(rdata.strings)


# the record ----------------------------------------------------------------------


@dataclass(frozen=True)
class PoolRecord:
    """The seed's extended DNS record (Fig 4): alias, group, owner, key, flag, TTL.

    The alias is kept in canonical form: absolute, lower case, "name.zone.".
    A field that does not validate raises `BadRecord`.
    """

    alias: str
    group: IPv4Address
    owner: str
    public_key: bytes = field(repr=False)
    private: bool
    ttl: int = DEFAULT_TTL

    def __post_init__(self) -> None:
        object.__setattr__(self, "alias", dns_name(self.alias, "alias", BadRecord).to_text())
        object.__setattr__(self, "group", multicast_address(self.group, "group", BadRecord))
        check_owner(self.owner)
        object.__setattr__(self, "public_key", check_key(self.public_key))
        if not isinstance(self.private, bool):
            raise BadRecord(f"bad private flag {self.private!r}")
        if not isinstance(self.ttl, int) or not 0 <= self.ttl <= MAX_TTL:
            raise BadRecord(f"bad ttl {self.ttl!r}: 0..{MAX_TTL}")

    @classmethod
    def create(
        cls,
        alias: str,
        group: IPv4Address | str,
        owner: str,
        public_key: bytes | Ed25519PublicKey,
        *,
        private: bool | None = None,
        ttl: int = DEFAULT_TTL,
        plan: AddressPlan = DEFAULT_PLAN,
    ) -> PoolRecord:
        """A record whose flag follows the plan unless given (and then must agree)."""
        addr = multicast_address(group, "group", BadRecord)
        flag = plan.is_private(addr) if private is None else private
        record = cls(alias, addr, owner, check_key(public_key), flag, ttl)
        plan.check(addr, flag)
        return record

    @property
    def alias_name(self) -> dns.name.Name:
        return dns.name.from_text(self.alias)

    @property
    def reverse_name(self) -> dns.name.Name:
        return reverse_name(self.group)

    @property
    def key_record(self) -> KeyRecord:
        return KeyRecord(self.owner, self.public_key, self.private)

    def txt(self) -> str:
        return format_key_txt(self.owner, self.public_key, self.private)

    def ed25519(self) -> Ed25519PublicKey:
        """The key as a `cryptography` object, ready to verify signatures."""
        return Ed25519PublicKey.from_public_bytes(self.public_key)


def record_rrsets(record: PoolRecord) -> list[dns.rrset.RRset]:
    """The four RRsets of a record: A and TXT at the alias, PTR and TXT at the reverse name."""
    alias, rev, txt = record.alias_name, record.reverse_name, txt_rdata(record.txt())
    return [
        dns.rrset.from_rdata(alias, record.ttl, a_rdata(record.group)),
        dns.rrset.from_rdata(alias, record.ttl, txt),
        dns.rrset.from_rdata(rev, record.ttl, ptr_rdata(alias)),
        dns.rrset.from_rdata(rev, record.ttl, txt),
    ]


# strict decoding -----------------------------------------------------------------

AnyRRset = dns.rrset.RRset | dns.rdataset.Rdataset


def one_group(alias: dns.name.Name, rrset: AnyRRset | None) -> IPv4Address:
    if rrset is None or len(rrset) == 0:
        raise NamingRefused(f"no address record at {alias}")
    if len(rrset) != 1:
        raise BadRecord(f"bad address record at {alias}: {len(rrset)} A records, expected 1")
    rdata = next(iter(rrset))
    assert isinstance(rdata, dns.rdtypes.IN.A.A)
    try:
        return multicast_address(rdata.address, "address record")
    except NamingError as exc:
        raise BadRecord(f"bad address record at {alias}: {exc}") from None


def one_key(name: dns.name.Name, rrset: AnyRRset | None) -> KeyRecord:
    texts = [] if rrset is None else [txt_bytes(r) for r in rrset]
    ours = [t for t in texts if is_key_txt(t)]
    if not ours:
        raise NamingRefused(f"no key record at {name}")
    if len(ours) != 1:
        raise BadRecord(f"bad key record at {name}: {len(ours)} manycast TXT records")
    try:
        return parse_key_txt(ours[0])
    except BadRecord as exc:
        why = str(exc).removeprefix("bad key record: ")
        raise BadRecord(f"bad key record at {name}: {why}") from None


def one_target(rev: dns.name.Name, rrset: AnyRRset | None) -> dns.name.Name:
    if rrset is None or len(rrset) == 0:
        raise NamingRefused(f"no PTR record at {rev}")
    if len(rrset) != 1:
        raise BadRecord(f"bad PTR record at {rev}: {len(rrset)} PTR records, expected 1")
    rdata = next(iter(rrset))
    assert isinstance(rdata, dns.rdtypes.ANY.PTR.PTR)
    return rdata.target


def assemble(
    alias: dns.name.Name,
    a: AnyRRset | None,
    txt: AnyRRset | None,
    ptr: AnyRRset | None,
    rtxt: AnyRRset | None,
    plan: AddressPlan,
) -> PoolRecord:
    """The record from its four RRsets, each checked and all checked against each other."""
    group = one_group(alias, a)
    key = one_key(alias, txt)
    rev = reverse_name(group)
    target = one_target(rev, ptr)
    if target != alias:
        raise BadRecord(f"record mismatch: {rev} points to {target}, not {alias}")
    if one_key(rev, rtxt) != key:
        raise BadRecord(f"record mismatch: the key record at {rev} differs from {alias}'s")
    plan.check(group, key.private)
    ttls = [r.ttl for r in (a, txt, ptr, rtxt) if r is not None]
    return PoolRecord(alias.to_text(), group, key.owner, key.public_key, key.private, min(ttls))


def decode_rrsets(
    alias: str | dns.name.Name,
    rrsets: Iterable[dns.rrset.RRset],
    plan: AddressPlan = DEFAULT_PLAN,
) -> PoolRecord:
    """The record for `alias` from a bag of RRsets, checked as strictly as a lookup."""
    name = dns_name(alias, "alias")
    found: dict[tuple[dns.name.Name, int], dns.rrset.RRset] = {}
    for rrset in rrsets:
        key = (rrset.name, int(rrset.rdtype))
        merged = found.setdefault(key, dns.rrset.RRset(rrset.name, IN, rrset.rdtype))
        for rdata in rrset:
            merged.add(rdata, rrset.ttl)
    a = found.get((name, A))
    group = one_group(name, a)
    rev = reverse_name(group)
    return assemble(
        name, a, found.get((name, TXT)), found.get((rev, PTR)), found.get((rev, TXT)), plan
    )
