"""The pool record (Fig 3, 4) as ordinary DNS resource records, and their strict decoding.

The seed's record maps an alias to a multicast group address and carries the
owner, the public key and a private/public flag; a query by the alias or by the
address returns the whole record (Fig 4). Here it is ordinary RRsets, so any
authoritative server (knot, or the embedded responder in `manycast.dns`) serves
it and standard tools show it. An IPv4 pool is four:

    <alias>                  A    <group>
    <alias>                  TXT  "v=manycast1; k=ed25519; p=<key>; o=<owner>; f=<flag>"
    <reverse name of group>  PTR  <alias>
    <reverse name of group>  TXT  (the same key record, see `keyrecord`)

An IPv6 pool is the same four with AAAA for A (its group in ff00::/8, its reverse
name in ip6.arpa). A dual-stack pool has one group per family: A and AAAA at the
alias beside the one key record, and PTR and the same key record at both
reverse names.

The reverse name is the standard one (group 232.1.2.3 -> 3.2.1.232.in-addr.arpa.,
ff3e::8000:1 -> 1.0.0.0.0.0.0.8...e.3.f.f.ip6.arpa.), so a router that knows only
a group address can find the record without knowing the pool's zone, and
`kdig -x 232.1.2.3` shows it.

Reading is strict: at most one A and one AAAA, at least one of them, each a
multicast address of its family; exactly one manycast TXT at each name; at each
group's reverse name a PTR naming the alias and the same key record as the
alias's; the flag consistent with the plan for every group. A missing RRset
raises `NamingRefused` ("no ... record at"), anything else wrong `BadRecord`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
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
import dns.rdtypes.IN.AAAA
import dns.reversename
import dns.rrset
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from manycast.addressplan import (
    DEFAULT_PLAN,
    AddressPlan,
    BadRecord,
    Group,
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
AAAA: Final = dns.rdatatype.AAAA
ADDRESS_TYPES: Final = (A, AAAA)  # the address record of each family, IPv4 first
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


def reverse_name(group: Group | str) -> dns.name.Name:
    """3.2.1.232.in-addr.arpa. for group 232.1.2.3; the ip6.arpa. nibble name for IPv6."""
    return dns.reversename.from_address(str(multicast_address(group)))


def address_type(group: Group) -> dns.rdatatype.RdataType:
    """A for an IPv4 group, AAAA for an IPv6 one."""
    return A if group.version == 4 else AAAA


def in_zone(name: dns.name.Name, zone: dns.name.Name, what: str) -> None:
    if not name.is_subdomain(zone):
        raise NamingError(f"{what} {name} is outside zone {zone}")


# rdata ---------------------------------------------------------------------------


def txt_rdata(text: str) -> dns.rdtypes.ANY.TXT.TXT:
    raw = text.encode("ascii")
    chunks = [raw[i : i + 255] for i in range(0, len(raw), 255)]  # RFC 1035 character-string
    return dns.rdtypes.ANY.TXT.TXT(IN, TXT, chunks)


def a_rdata(group: Group) -> dns.rdata.Rdata:
    """The address record's rdata: an A for an IPv4 group, an AAAA for an IPv6 one."""
    return dns.rdata.from_text(IN, address_type(group), str(group))


def ptr_rdata(target: dns.name.Name) -> dns.rdata.Rdata:
    return dns.rdata.from_text(IN, PTR, target.to_text())


def txt_bytes(rdata: dns.rdata.Rdata) -> bytes:
    assert isinstance(rdata, dns.rdtypes.ANY.TXT.TXT)
    return b"".join(rdata.strings)


# the record ----------------------------------------------------------------------

GroupArg = Group | str


def _groups_arg(group: GroupArg | Sequence[GroupArg]) -> tuple[Group, ...]:
    """One group, or one per family in any order, as addresses with IPv4 first."""
    given = [group] if isinstance(group, IPv4Address | IPv6Address | str) else list(group)
    groups = [multicast_address(g, "group", BadRecord) for g in given]
    if not 1 <= len(groups) <= 2 or len({g.version for g in groups}) != len(groups):
        shown = ", ".join(str(g) for g in groups) or "none"
        raise BadRecord(f"bad groups ({shown}): one group, or one per family")
    return tuple(sorted(groups, key=lambda g: g.version))


@dataclass(frozen=True)
class PoolRecord:
    """The seed's extended DNS record (Fig 4): alias, group, owner, key, flag, TTL.

    `group` is the pool's group, IPv4 or IPv6; a dual-stack pool has its IPv4
    group there and its IPv6 group in `group6` (None otherwise). `groups` has
    every group, IPv4 first. The alias is kept in canonical form: absolute,
    lower case, "name.zone.". A field that does not validate raises `BadRecord`.
    """

    alias: str
    group: Group
    owner: str
    public_key: bytes = field(repr=False)
    private: bool
    ttl: int = DEFAULT_TTL
    group6: IPv6Address | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "alias", dns_name(self.alias, "alias", BadRecord).to_text())
        object.__setattr__(self, "group", multicast_address(self.group, "group", BadRecord))
        if self.group6 is not None:
            group6 = multicast_address(self.group6, "IPv6 group", BadRecord)
            if group6.version != 6 or self.group.version != 4:
                raise BadRecord(
                    f"bad groups {self.group}, {group6}: a dual-stack record has its IPv4 "
                    "group in `group` and its IPv6 group in `group6`"
                )
            object.__setattr__(self, "group6", group6)
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
        group: GroupArg | Sequence[GroupArg],
        owner: str,
        public_key: bytes | Ed25519PublicKey,
        *,
        private: bool | None = None,
        ttl: int = DEFAULT_TTL,
        plan: AddressPlan = DEFAULT_PLAN,
    ) -> PoolRecord:
        """A record whose flag follows the plan unless given (and then must agree).

        `group` is one address, or a dual-stack pool's two (one per family, in
        any order); every group must be on the same side of the plan.
        """
        groups = _groups_arg(group)
        flag = plan.is_private(groups[0]) if private is None else private
        group6 = groups[1] if len(groups) == 2 else None
        assert group6 is None or isinstance(group6, IPv6Address)
        record = cls(alias, groups[0], owner, check_key(public_key), flag, ttl, group6)
        for addr in groups:
            plan.check(addr, flag)
        return record

    @property
    def groups(self) -> tuple[Group, ...]:
        """Every group of the pool, IPv4 first: one, or two for a dual-stack pool."""
        return (self.group,) if self.group6 is None else (self.group, self.group6)

    def group_of(self, version: int) -> Group | None:
        """The pool's group of one family (4 or 6), or None when it has none."""
        return next((g for g in self.groups if g.version == version), None)

    @property
    def alias_name(self) -> dns.name.Name:
        return dns.name.from_text(self.alias)

    @property
    def reverse_name(self) -> dns.name.Name:
        """The reverse name of `group` (see `reverse_names` for a dual-stack pool's two)."""
        return reverse_name(self.group)

    @property
    def reverse_names(self) -> tuple[dns.name.Name, ...]:
        return tuple(reverse_name(g) for g in self.groups)

    @property
    def key_record(self) -> KeyRecord:
        return KeyRecord(self.owner, self.public_key, self.private)

    def txt(self) -> str:
        return format_key_txt(self.owner, self.public_key, self.private)

    def ed25519(self) -> Ed25519PublicKey:
        """The key as a `cryptography` object, ready to verify signatures."""
        return Ed25519PublicKey.from_public_bytes(self.public_key)


def record_rrsets(record: PoolRecord) -> list[dns.rrset.RRset]:
    """The record's RRsets: its address record and TXT at the alias, then PTR and TXT at
    its reverse name; a dual-stack record adds its AAAA and the IPv6 reverse name's pair."""
    alias, txt, ttl = record.alias_name, txt_rdata(record.txt()), record.ttl
    first, *more = record.groups
    rrsets = [
        dns.rrset.from_rdata(alias, ttl, a_rdata(first)),
        dns.rrset.from_rdata(alias, ttl, txt),
    ]
    for group in (first, *more):
        if group is not first:
            rrsets.append(dns.rrset.from_rdata(alias, ttl, a_rdata(group)))
        rev = reverse_name(group)
        rrsets += [
            dns.rrset.from_rdata(rev, ttl, ptr_rdata(alias)),
            dns.rrset.from_rdata(rev, ttl, txt),
        ]
    return rrsets


# strict decoding -----------------------------------------------------------------

AnyRRset = dns.rrset.RRset | dns.rdataset.Rdataset


def one_group(alias: dns.name.Name, rrset: AnyRRset | None) -> Group:
    """The one address of an A or AAAA RRset, a multicast address of its family."""
    if rrset is None or len(rrset) == 0:
        raise NamingRefused(f"no address record at {alias}")
    kind = dns.rdatatype.to_text(rrset.rdtype)
    if len(rrset) != 1:
        raise BadRecord(f"bad address record at {alias}: {len(rrset)} {kind} records, expected 1")
    rdata = next(iter(rrset))
    assert isinstance(rdata, dns.rdtypes.IN.A.A | dns.rdtypes.IN.AAAA.AAAA)
    try:
        return multicast_address(rdata.address, "address record")
    except NamingError as exc:
        raise BadRecord(f"bad address record at {alias}: {exc}") from None


def alias_groups(alias: dns.name.Name, addresses: Sequence[AnyRRset | None]) -> tuple[Group, ...]:
    """The groups of the A and AAAA RRsets at an alias (None or empty where absent),
    IPv4 first; `NamingRefused` when there is neither."""
    present = [r for r in addresses if r is not None and len(r) > 0]
    if not present:
        raise NamingRefused(f"no address record at {alias}")
    return tuple(sorted((one_group(alias, r) for r in present), key=lambda g: g.version))


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


ReverseRRsets = tuple[AnyRRset | None, AnyRRset | None]  # PTR and TXT at a reverse name


def assemble(
    alias: dns.name.Name,
    addresses: Sequence[AnyRRset | None],
    txt: AnyRRset | None,
    reverse: Mapping[dns.name.Name, ReverseRRsets],
    plan: AddressPlan,
) -> PoolRecord:
    """The record from its RRsets (A and AAAA at the alias, its TXT, and PTR and TXT by
    reverse name), each checked and all checked against each other."""
    groups = alias_groups(alias, addresses)
    key = one_key(alias, txt)
    ttls = [r.ttl for r in (*addresses, txt) if r is not None and len(r) > 0]
    for group in groups:
        rev = reverse_name(group)
        ptr, rtxt = reverse.get(rev, (None, None))
        target = one_target(rev, ptr)
        if target != alias:
            raise BadRecord(f"record mismatch: {rev} points to {target}, not {alias}")
        if one_key(rev, rtxt) != key:
            raise BadRecord(f"record mismatch: the key record at {rev} differs from {alias}'s")
        plan.check(group, key.private)
        ttls += [r.ttl for r in (ptr, rtxt) if r is not None]
    group6 = groups[1] if len(groups) == 2 else None
    assert group6 is None or isinstance(group6, IPv6Address)
    return PoolRecord(
        alias.to_text(), groups[0], key.owner, key.public_key, key.private, min(ttls), group6
    )


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
    addresses = [found.get((name, t)) for t in ADDRESS_TYPES]
    reverse = {
        rev: (found.get((rev, PTR)), found.get((rev, TXT)))
        for rev in (reverse_name(g) for g in alias_groups(name, addresses))
    }
    return assemble(name, addresses, found.get((name, TXT)), reverse, plan)
