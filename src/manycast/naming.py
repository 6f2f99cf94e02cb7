"""Pool names on DNS: the seed's extended record (Fig 3, 4) on a real DNS server.

The seed's record maps an alias to a multicast group address and carries the
owner, the public key and a private/public flag; a query by the alias or by the
address returns the whole record (Fig 4). Routers fetch the key from it to
check signed joins (Fig 6, 8), clients to check a change of destination
(Fig 21). Here the record is four ordinary resource records, so any
authoritative server (knot, or the embedded responder in `dnsserver.py`)
serves it and standard tools show it:

    <alias>                  A    <group>
    <alias>                  TXT  "v=manycast1; k=ed25519; p=<key>; o=<owner>; f=<flag>"
    <reverse name of group>  PTR  <alias>
    <reverse name of group>  TXT  (the same key record)

The reverse name is the standard one (group 232.1.2.3 -> 3.2.1.232.in-addr.arpa.),
so a router that knows only the group address can find the record without
knowing the pool's zone, and `kdig -x 232.1.2.3` shows it. The servers here
serve the sixteen reverse zones 224.in-addr.arpa. ... 239.in-addr.arpa., which
cover the multicast space and nothing else, beside the pool zone.

Key record (TXT), in the tag=value style of DKIM key records (RFC 6376 §3.6.1):

* `v=manycast1` first; another version is refused.
* `k=ed25519`; the only key type.
* `p=` the 32-byte Ed25519 public key (RFC 8032), standard base64 with padding
  (44 characters, canonical: no whitespace, zero pad bits).
* `o=` the owner: 1-255 printable ASCII characters except space, `;`, `"` and `\\`
  (an address such as `abc123@host.sponsor.com`).
* `f=private` or `f=public`, which must agree with the address plan (Fig 2).

Tags are separated by `;` with optional spaces or tabs around tags and `=`, a
trailing `;` is allowed, and every tag appears exactly once; unknown tags are
refused (a new tag means a new version). The text is at most 1024 bytes and
may be split into several TXT strings, which are concatenated (RFC 6376
§3.6.2.2). Other TXT records at the same names are left alone; a TXT is
manycast's when its first tag is `v=manycast...`.

Reading is strict: exactly one A (a multicast address), exactly one manycast TXT
at each name, a PTR naming the alias, the same key record at both names, and the
flag consistent with the plan; anything else raises `NamingError` saying what is
wrong. Publishing uses DNS UPDATE (RFC 2136) signed with TSIG (RFC 8945),
one message per zone, each guarded by prerequisites on what was read first, so
a concurrent change makes the update fail instead of being overwritten.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging
import secrets
import socket
import time
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Final, TypeVar

import dns.asyncquery
import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rdtypes.ANY.PTR
import dns.rdtypes.ANY.TXT
import dns.rdtypes.IN.A
import dns.reversename
import dns.rrset
import dns.tsig
import dns.update
import dns.zone
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = [
    "DEFAULT_PLAN",
    "MULTICAST_REVERSE_ZONES",
    "AddressPlan",
    "KeyRecord",
    "NamingError",
    "PoolRecord",
    "TsigKey",
    "decode_rrsets",
    "format_key_txt",
    "is_key_txt",
    "lookup_alias",
    "lookup_alias_async",
    "lookup_group",
    "lookup_group_async",
    "parse_key_txt",
    "pool_zones",
    "publish",
    "publish_async",
    "record_rrsets",
    "reverse_name",
    "withdraw",
    "withdraw_async",
    "zone_text",
]

_log = logging.getLogger(__name__)

IN: Final = dns.rdataclass.IN
A: Final = dns.rdatatype.A
TXT: Final = dns.rdatatype.TXT
PTR: Final = dns.rdatatype.PTR
SOA: Final = dns.rdatatype.SOA

MULTICAST: Final = IPv4Network("224.0.0.0/4")
VERSION: Final = "manycast1"
KEY_TYPE: Final = "ed25519"
KEY_BYTES: Final = 32
MAX_TXT: Final = 1024
MAX_OWNER: Final = 255
MAX_TTL: Final = 2**31 - 1  # RFC 2181 §8

MULTICAST_REVERSE_ZONES: Final[tuple[str, ...]] = tuple(
    f"{octet}.in-addr.arpa." for octet in range(224, 240)
)

_TAGS: Final = ("v", "k", "p", "o", "f")
_FWS: Final = " \t"
_ALNUM: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_TAG_CHARS: Final = _ALNUM | {"_"}
_B64_CHARS: Final = _ALNUM | {"+", "/"}
_LABEL_CHARS: Final = frozenset(c.encode() for c in _ALNUM | {"-", "_"})
_OWNER_CHARS: Final = frozenset(chr(c) for c in range(0x21, 0x7F)) - {";", '"', "\\"}
_TSIG_ALGORITHMS: Final = ("hmac-sha256", "hmac-sha384", "hmac-sha512")


class NamingError(ValueError):
    """A pool name that cannot be published or read: the message says why."""


def _show(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


# address plan (Fig 2) ------------------------------------------------------------


def _multicast(address: object, what: str = "group") -> IPv4Address:
    try:
        addr = address if isinstance(address, IPv4Address) else IPv4Address(str(address))
    except ValueError:
        raise NamingError(f"bad {what} {_show(str(address))}: not an IPv4 address") from None
    if addr not in MULTICAST:
        raise NamingError(f"bad {what} {addr}: not a multicast address (224.0.0.0/4)")
    return addr


@dataclass(frozen=True)
class AddressPlan:
    """Which multicast groups are private (Fig 2): the rest of 224.0.0.0/4 is public.

    The seed splits the space at 232.0.0.0: 224-231 public, 232-239 private;
    `AddressPlan.from_prefixes([...])` makes any other split.
    """

    private: tuple[IPv4Network, ...]

    def __post_init__(self) -> None:
        for net in self.private:
            if not isinstance(net, IPv4Network) or not net.subnet_of(MULTICAST):
                raise NamingError(f"bad private prefix {net}: not inside 224.0.0.0/4")

    @classmethod
    def from_prefixes(cls, prefixes: Iterable[str | IPv4Network]) -> AddressPlan:
        nets: list[IPv4Network] = []
        for prefix in prefixes:
            try:
                net = IPv4Network(prefix, strict=True)
            except ValueError as exc:
                raise NamingError(f"bad private prefix {_show(str(prefix))}: {exc}") from None
            if not net.subnet_of(MULTICAST):
                raise NamingError(f"bad private prefix {net}: not inside 224.0.0.0/4")
            nets.append(net)
        return cls(tuple(ipaddress.collapse_addresses(nets)))

    @classmethod
    def from_text(cls, text: str) -> AddressPlan:
        """Comma- or space-separated private prefixes, e.g. "232.0.0.0/5"."""
        return cls.from_prefixes(p for p in text.replace(",", " ").split() if p)

    def is_private(self, group: IPv4Address | str) -> bool:
        addr = _multicast(group)
        return any(addr in net for net in self.private)

    def is_private_int(self, group: int) -> bool:
        """`is_private` for an integer address, cheap enough for a router's fast path."""
        return any(group & int(net.netmask) == int(net.network_address) for net in self.private)

    def is_public(self, group: IPv4Address | str) -> bool:
        return not self.is_private(group)

    def check(self, group: IPv4Address, private: bool) -> None:
        """Raises unless the flag agrees with the plan."""
        actual = self.is_private(group)
        if actual != private:
            space = "private" if actual else "public"
            flag = "private" if private else "public"
            raise NamingError(
                f"record mismatch: {group} is in the {space} space of the address plan "
                f"but flagged {flag}"
            )

    def __str__(self) -> str:
        return ", ".join(str(n) for n in self.private) or "(no private space)"


DEFAULT_PLAN: Final = AddressPlan.from_prefixes(["232.0.0.0/5"])


# names --------------------------------------------------------------------------


def _dns_name(text: str | dns.name.Name, what: str) -> dns.name.Name:
    if isinstance(text, dns.name.Name):
        name = text if text.is_absolute() else text.concatenate(dns.name.root)
    else:
        try:
            name = dns.name.from_text(text)
        except (dns.exception.DNSException, UnicodeError, ValueError) as exc:
            raise NamingError(f"bad {what} {_show(text)}: {exc}") from None
    if name == dns.name.root:
        raise NamingError(f"bad {what}: the root name")
    for label in name.labels[:-1]:
        if not label or any(bytes((b,)) not in _LABEL_CHARS for b in label):
            raise NamingError(
                f"bad {what} {_show(name.to_text())}: labels are letters, digits, '-' and '_'"
            )
    return name.canonicalize()


def reverse_name(group: IPv4Address | str) -> dns.name.Name:
    """3.2.1.232.in-addr.arpa. for group 232.1.2.3."""
    return dns.reversename.from_address(str(_multicast(group)))


def _in_zone(name: dns.name.Name, zone: dns.name.Name, what: str) -> None:
    if not name.is_subdomain(zone):
        raise NamingError(f"{what} {name} is outside zone {zone}")


# key record (TXT) ------------------------------------------------------------------


@dataclass(frozen=True)
class KeyRecord:
    """What the TXT carries: owner, Ed25519 public key, private flag."""

    owner: str
    public_key: bytes
    private: bool


def _check_owner(owner: str) -> str:
    if not 1 <= len(owner) <= MAX_OWNER or any(c not in _OWNER_CHARS for c in owner):
        raise NamingError(
            f"bad owner {_show(owner)}: 1-{MAX_OWNER} printable ASCII characters "
            "without space, ';', '\"' or '\\'"
        )
    return owner


def _check_key(key: object) -> bytes:
    if isinstance(key, Ed25519PublicKey):
        return key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    if not isinstance(key, bytes | bytearray):
        raise NamingError(f"bad public key: {type(key).__name__}, expected 32 raw bytes")
    if len(key) != KEY_BYTES:
        raise NamingError(f"bad public key: {len(key)} bytes, expected {KEY_BYTES}")
    return bytes(key)


def format_key_txt(owner: str, public_key: bytes, private: bool) -> str:
    """The key record's text (see the module docstring)."""
    key = base64.b64encode(_check_key(public_key)).decode("ascii")
    flag = "private" if private else "public"
    return f"v={VERSION}; k={KEY_TYPE}; p={key}; o={_check_owner(owner)}; f={flag}"


def is_key_txt(text: bytes) -> bool:
    """Whether a TXT is manycast's (first tag v=manycast...), valid or not."""
    head = text[:64].split(b";", 1)[0]
    name, eq, value = head.partition(b"=")
    return bool(eq) and name.strip(b" \t") == b"v" and value.lstrip(b" \t").startswith(b"manycast")


def parse_key_txt(text: bytes) -> KeyRecord:
    """Decodes a key record strictly; any defect raises NamingError("bad key record: ...")."""

    def bad(why: str) -> NamingError:
        return NamingError(f"bad key record: {why}")

    if len(text) > MAX_TXT:
        raise bad(f"{len(text)} bytes, at most {MAX_TXT}")
    for offset, byte in enumerate(text):
        if not (0x20 <= byte <= 0x7E or byte == 0x09):
            raise bad(f"control or non-ASCII byte 0x{byte:02x} at offset {offset}")
    parts = text.decode("ascii").split(";")
    if len(parts) > 1 and not parts[-1].strip(_FWS):
        parts.pop()  # a trailing ';'
    if len(parts) > len(_TAGS):
        raise bad(f"{len(parts)} tags, expected {len(_TAGS)}")
    tags: dict[str, str] = {}
    for part in parts:
        spec = part.strip(_FWS)
        if not spec:
            raise bad("empty tag")
        name, eq, value = spec.partition("=")
        name, value = name.rstrip(_FWS), value.lstrip(_FWS)
        if not eq:
            raise bad(f"tag {_show(spec)} has no '='")
        if not name or name[0] not in _ALNUM or any(c not in _TAG_CHARS for c in name):
            raise bad(f"bad tag name {_show(name)}")
        if name in tags:
            raise bad(f"duplicate tag {name}=")
        if name not in _TAGS:
            raise bad(f"unknown tag {name}=")
        if not tags and name != "v":
            raise bad("the first tag must be v=")
        tags[name] = value
    if tags.get("v") != VERSION:
        raise bad(f"unknown version {_show(tags.get('v', ''))}, expected {VERSION}")
    for name in _TAGS:
        if name not in tags:
            raise bad(f"missing tag {name}=")
    if tags["k"] != KEY_TYPE:
        raise bad(f"unsupported key type {_show(tags['k'])}, expected {KEY_TYPE}")
    encoded = tags["p"]
    if not encoded:
        raise bad("empty key (p=)")
    body = encoded.rstrip("=")
    if len(encoded) % 4 or len(encoded) - len(body) > 2 or any(c not in _B64_CHARS for c in body):
        raise bad("p= is not canonical base64")
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise bad("p= is not canonical base64") from None
    if base64.b64encode(key).decode("ascii") != encoded:
        raise bad("p= is not canonical base64 (nonzero pad bits)")
    if len(key) != KEY_BYTES:
        raise bad(f"key is {len(key)} bytes, expected {KEY_BYTES}")
    try:
        owner = _check_owner(tags["o"])
    except NamingError as exc:
        raise bad(str(exc)) from None
    if tags["f"] not in ("private", "public"):
        raise bad(f"flag f={_show(tags['f'])}, expected private or public")
    return KeyRecord(owner, key, tags["f"] == "private")


def _txt_rdata(text: str) -> dns.rdtypes.ANY.TXT.TXT:
    raw = text.encode("ascii")
    chunks = [raw[i : i + 255] for i in range(0, len(raw), 255)]  # RFC 1035 character-string
    return dns.rdtypes.ANY.TXT.TXT(IN, TXT, chunks)


def _a_rdata(group: IPv4Address) -> dns.rdata.Rdata:
    return dns.rdata.from_text(IN, A, str(group))


def _ptr_rdata(target: dns.name.Name) -> dns.rdata.Rdata:
    return dns.rdata.from_text(IN, PTR, target.to_text())


def _txt_bytes(rdata: dns.rdata.Rdata) -> bytes:
    assert isinstance(rdata, dns.rdtypes.ANY.TXT.TXT)
    return b"".join(rdata.strings)


# the record -----------------------------------------------------------------------


@dataclass(frozen=True)
class PoolRecord:
    """The seed's extended DNS record (Fig 4): alias, group, owner, key, flag, TTL.

    The alias is kept in canonical form: absolute, lower case, "name.zone.".
    """

    alias: str
    group: IPv4Address
    owner: str
    public_key: bytes = field(repr=False)
    private: bool
    ttl: int = 300

    def __post_init__(self) -> None:
        object.__setattr__(self, "alias", _dns_name(self.alias, "alias").to_text())
        object.__setattr__(self, "group", _multicast(self.group))
        _check_owner(self.owner)
        object.__setattr__(self, "public_key", _check_key(self.public_key))
        if not isinstance(self.private, bool):
            raise NamingError(f"bad private flag {self.private!r}")
        if not isinstance(self.ttl, int) or not 0 <= self.ttl <= MAX_TTL:
            raise NamingError(f"bad ttl {self.ttl!r}: 0..{MAX_TTL}")

    @classmethod
    def create(
        cls,
        alias: str,
        group: IPv4Address | str,
        owner: str,
        public_key: bytes | Ed25519PublicKey,
        *,
        private: bool | None = None,
        ttl: int = 300,
        plan: AddressPlan = DEFAULT_PLAN,
    ) -> PoolRecord:
        """A record whose flag follows the plan unless given (and then must agree)."""
        addr = _multicast(group)
        flag = plan.is_private(addr) if private is None else private
        record = cls(alias, addr, owner, _check_key(public_key), flag, ttl)
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
    alias, rev, txt = record.alias_name, record.reverse_name, _txt_rdata(record.txt())
    return [
        dns.rrset.from_rdata(alias, record.ttl, _a_rdata(record.group)),
        dns.rrset.from_rdata(alias, record.ttl, txt),
        dns.rrset.from_rdata(rev, record.ttl, _ptr_rdata(alias)),
        dns.rrset.from_rdata(rev, record.ttl, txt),
    ]


# strict decoding ---------------------------------------------------------------------

_RRset = dns.rrset.RRset | dns.rdataset.Rdataset


def _one_group(alias: dns.name.Name, rrset: _RRset | None) -> IPv4Address:
    if rrset is None or len(rrset) == 0:
        raise NamingError(f"no address record at {alias}")
    if len(rrset) != 1:
        raise NamingError(f"bad address record at {alias}: {len(rrset)} A records, expected 1")
    rdata = next(iter(rrset))
    assert isinstance(rdata, dns.rdtypes.IN.A.A)
    try:
        return _multicast(rdata.address, "address record")
    except NamingError as exc:
        raise NamingError(f"bad address record at {alias}: {exc}") from None


def _one_key(name: dns.name.Name, rrset: _RRset | None) -> KeyRecord:
    texts = [] if rrset is None else [_txt_bytes(r) for r in rrset]
    ours = [t for t in texts if is_key_txt(t)]
    if not ours:
        raise NamingError(f"no key record at {name}")
    if len(ours) != 1:
        raise NamingError(f"bad key record at {name}: {len(ours)} manycast TXT records")
    try:
        return parse_key_txt(ours[0])
    except NamingError as exc:
        why = str(exc).removeprefix("bad key record: ")
        raise NamingError(f"bad key record at {name}: {why}") from None


def _one_target(rev: dns.name.Name, rrset: _RRset | None) -> dns.name.Name:
    if rrset is None or len(rrset) == 0:
        raise NamingError(f"no PTR record at {rev}")
    if len(rrset) != 1:
        raise NamingError(f"bad PTR record at {rev}: {len(rrset)} PTR records, expected 1")
    rdata = next(iter(rrset))
    assert isinstance(rdata, dns.rdtypes.ANY.PTR.PTR)
    return rdata.target


def _assemble(
    alias: dns.name.Name,
    a: _RRset | None,
    txt: _RRset | None,
    ptr: _RRset | None,
    rtxt: _RRset | None,
    plan: AddressPlan,
) -> PoolRecord:
    group = _one_group(alias, a)
    key = _one_key(alias, txt)
    rev = reverse_name(group)
    target = _one_target(rev, ptr)
    if target != alias:
        raise NamingError(f"record mismatch: {rev} points to {target}, not {alias}")
    if _one_key(rev, rtxt) != key:
        raise NamingError(f"record mismatch: the key record at {rev} differs from {alias}'s")
    plan.check(group, key.private)
    ttls = [r.ttl for r in (a, txt, ptr, rtxt) if r is not None]
    return PoolRecord(alias.to_text(), group, key.owner, key.public_key, key.private, min(ttls))


def decode_rrsets(
    alias: str | dns.name.Name,
    rrsets: Iterable[dns.rrset.RRset],
    plan: AddressPlan = DEFAULT_PLAN,
) -> PoolRecord:
    """The record for `alias` from a bag of RRsets, checked as strictly as a lookup."""
    name = _dns_name(alias, "alias")
    found: dict[tuple[dns.name.Name, int], dns.rrset.RRset] = {}
    for rrset in rrsets:
        key = (rrset.name, int(rrset.rdtype))
        merged = found.setdefault(key, dns.rrset.RRset(rrset.name, IN, rrset.rdtype))
        for rdata in rrset:
            merged.add(rdata, rrset.ttl)
    a = found.get((name, A))
    group = _one_group(name, a)
    rev = reverse_name(group)
    return _assemble(
        name, a, found.get((name, TXT)), found.get((rev, PTR)), found.get((rev, TXT)), plan
    )


# zone files ---------------------------------------------------------------------------


def _check_unique(records: Sequence[PoolRecord], plan: AddressPlan) -> None:
    aliases: dict[str, PoolRecord] = {}
    groups: dict[IPv4Address, PoolRecord] = {}
    for record in records:
        plan.check(record.group, record.private)
        if record.alias in aliases:
            raise NamingError(f"alias {record.alias} appears twice")
        if record.group in groups:
            raise NamingError(
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
    ttl: int = 300,
    negative_ttl: int = 60,
    plan: AddressPlan = DEFAULT_PLAN,
) -> str:
    """A master file (RFC 1035 §5) for zone `origin`: SOA, NS and every record name inside it.

    A record contributes its A and TXT when its alias is in the zone and its PTR
    and TXT when its reverse name is, so the same list builds the pool zone and
    the reverse zones. `nameserver` defaults to ns.<origin>; `nameserver_address`
    adds its glue A when it is inside the zone. The SOA minimum (negative
    caching TTL) is short so that a new or withdrawn pool shows up soon.
    """
    zone_name = _dns_name(origin, "zone")
    recs = list(records)
    _check_unique(recs, plan)
    ns = _dns_name(nameserver, "nameserver") if nameserver else dns.name.from_text("ns", zone_name)
    rname = (
        _dns_name(hostmaster, "hostmaster")
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
                raise NamingError(f"bad nameserver address {_show(nameserver_address)}") from None
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
    zone_name = _dns_name(origin, "zone")
    ns = nameserver or dns.name.from_text("ns", zone_name).to_text()
    reverse = [_dns_name(z, "reverse zone") for z in reverse_zones]
    recs = list(records)
    for record in recs:
        _in_zone(record.alias_name, zone_name, "alias")
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


# TSIG ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TsigKey:
    """A TSIG key (RFC 8945): name, secret, HMAC algorithm.

    Text form, as `kdig -y` and `nsupdate -y` take it: "hmac-sha256:name:base64secret".
    """

    name: str
    secret: bytes = field(repr=False)
    algorithm: str = "hmac-sha256"

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", _dns_name(self.name, "TSIG key name").to_text())
        if self.algorithm not in _TSIG_ALGORITHMS:
            raise NamingError(
                f"bad TSIG algorithm {_show(self.algorithm)}: one of {', '.join(_TSIG_ALGORITHMS)}"
            )
        if not isinstance(self.secret, bytes) or len(self.secret) < 16:
            raise NamingError("bad TSIG secret: at least 16 bytes")

    @classmethod
    def generate(cls, name: str = "manycast-update.") -> TsigKey:
        return cls(name, secrets.token_bytes(32))

    @classmethod
    def from_text(cls, text: str) -> TsigKey:
        parts = text.strip().split(":")
        if len(parts) == 2:
            parts.insert(0, "hmac-sha256")
        if len(parts) != 3:
            raise NamingError("bad TSIG key: expected [algorithm:]name:base64secret")
        try:
            secret = base64.b64decode(parts[2], validate=True)
        except (binascii.Error, ValueError):
            raise NamingError("bad TSIG key: the secret is not base64") from None
        return cls(parts[1], secret, parts[0].lower())

    def to_text(self) -> str:
        return f"{self.algorithm}:{self.name}:{self.secret_b64}"

    @property
    def secret_b64(self) -> str:
        return base64.b64encode(self.secret).decode("ascii")

    def dns_key(self) -> dns.tsig.Key:
        return dns.tsig.Key(self.name, self.secret, self.algorithm + ".")


Keyring = TsigKey | dns.tsig.Key


def _dns_key(keyring: Keyring | None) -> dns.tsig.Key | None:
    return keyring.dns_key() if isinstance(keyring, TsigKey) else keyring


# talking to a server: sans-I/O steps and two drivers ---------------------------------------

Server = str | tuple[str, int]


@dataclass(frozen=True)
class _Query:
    name: dns.name.Name
    rdtype: dns.rdatatype.RdataType


@dataclass(frozen=True)
class _Update:
    message: dns.update.UpdateMessage


_Op = _Query | _Update
_T = TypeVar("_T")
# A lookup or an update is a generator of batches of operations; a driver runs
# each batch (the sync one in turn, the async one concurrently) and sends the
# answers back in, or throws the driver's NamingError in so steps can undo.
_Steps = Generator[list[_Op], list[dns.message.Message], _T]


def _endpoint(server: Server) -> tuple[str, int]:
    host, port = (server, 53) if isinstance(server, str) else server
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise NamingError(f"bad server {_show(str(host))}: an IP address is needed") from None
    if not isinstance(port, int) or not 0 < port < 65536:
        raise NamingError(f"bad server port {port!r}")
    return host, port


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _what(op: _Op) -> str:
    if isinstance(op, _Query):
        return f"{op.name} {dns.rdatatype.to_text(op.rdtype)}"
    return f"the update of zone {op.message.origin}"


def _remaining(deadline: float, op: _Op, where: str, timeout: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise NamingError(f"timeout after {timeout:g}s asking {where} for {_what(op)}")
    return left


def _make_query(op: _Query) -> dns.message.Message:
    return dns.message.make_query(op.name, op.rdtype, use_edns=0, payload=1232)


def _transport_error(exc: BaseException, op: _Op, where: str, timeout: float) -> NamingError:
    if isinstance(exc, dns.exception.Timeout | TimeoutError):
        return NamingError(f"timeout after {timeout:g}s asking {where} for {_what(op)}")
    if isinstance(exc, dns.exception.DNSException | EOFError | ValueError | UnicodeError):
        detail = str(exc) or type(exc).__name__
        return NamingError(f"garbage answer from {where} for {_what(op)}: {detail}")
    return NamingError(f"cannot ask {where} for {_what(op)}: {exc}")


_TRANSPORT = (dns.exception.DNSException, OSError, EOFError, ValueError, UnicodeError)


def _decode_update_answer(wire: bytes, request: dns.update.UpdateMessage) -> dns.message.Message:
    """Parses the answer to an update, checking its TSIG; refusals become NamingError."""
    zone = request.origin
    try:
        answer = dns.message.from_wire(wire, keyring=request.keyring, request_mac=request.mac)
    except dns.tsig.PeerBadKey:
        raise NamingError(
            f"update of {zone} refused: the server does not know the TSIG key "
            f"{request.keyname} (NOTAUTH/BADKEY)"
        ) from None
    except dns.tsig.PeerBadSignature:
        raise NamingError(
            f"update of {zone} refused: bad TSIG signature (NOTAUTH/BADSIG)"
        ) from None
    except dns.tsig.PeerBadTime:
        raise NamingError(
            f"update of {zone} refused: clocks differ too much (NOTAUTH/BADTIME)"
        ) from None
    except dns.exception.DNSException as exc:
        # An unsigned answer to a signed update: report its rcode when the header reads.
        try:
            head = dns.message.from_wire(wire, question_only=True)
        except dns.exception.DNSException:
            raise NamingError(f"garbage answer to the update of {zone}: {exc}") from None
        if head.rcode() != dns.rcode.NOERROR and request.is_response(head):
            raise _update_refusal(head.rcode(), zone) from None
        raise NamingError(f"bad answer to the update of {zone}: {exc}") from None
    if not request.is_response(answer):
        raise NamingError(f"bad answer to the update of {zone}: not a response to it")
    if request.keyring is not None and not answer.had_tsig:
        raise NamingError(f"bad answer to the update of {zone}: not signed")
    return answer


def _update_refusal(rcode: dns.rcode.Rcode, zone: object, why: str = "") -> NamingError:
    text = dns.rcode.to_text(rcode)
    if rcode in (dns.rcode.NOTAUTH, dns.rcode.REFUSED):
        why = why or "the server is not authoritative for the zone or does not accept this key"
        return NamingError(f"update of {zone} refused ({text}): {why}")
    if rcode in (dns.rcode.YXDOMAIN, dns.rcode.YXRRSET, dns.rcode.NXDOMAIN, dns.rcode.NXRRSET):
        return NamingError(f"conflict: records in {zone} changed during the update ({text}); retry")
    if rcode == dns.rcode.NOTZONE:
        return NamingError(f"update of {zone} refused ({text}): a name is outside the zone")
    return NamingError(f"update of {zone} failed ({text})")


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    data = bytearray()
    while len(data) < n:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("the server closed the connection")
        data += chunk
    return bytes(data)


def _exchange_sync(
    op: _Op, host: str, port: int, deadline: float, timeout: float
) -> dns.message.Message:
    where = _where(host, port)
    left = _remaining(deadline, op, where, timeout)
    try:
        if isinstance(op, _Query):
            answer, _ = dns.query.udp_with_fallback(_make_query(op), host, left, port)
            return answer
        wire = op.message.to_wire()
        with socket.create_connection((host, port), timeout=left) as sock:
            sock.sendall(len(wire).to_bytes(2, "big") + wire)
            size = int.from_bytes(_recv_exact(sock, 2, deadline), "big")
            reply = _recv_exact(sock, size, deadline)
    except NamingError:
        raise
    except _TRANSPORT as exc:
        raise _transport_error(exc, op, where, timeout) from None
    return _decode_update_answer(reply, op.message)


async def _exchange_async(
    op: _Op, host: str, port: int, deadline: float, timeout: float
) -> dns.message.Message:
    where = _where(host, port)
    left = _remaining(deadline, op, where, timeout)
    try:
        if isinstance(op, _Query):
            answer, _ = await dns.asyncquery.udp_with_fallback(_make_query(op), host, left, port)
            return answer
        wire = op.message.to_wire()

        async def exchange() -> bytes:
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(len(wire).to_bytes(2, "big") + wire)
                await writer.drain()
                size = int.from_bytes(await reader.readexactly(2), "big")
                return await reader.readexactly(size)
            finally:
                writer.close()

        reply = await asyncio.wait_for(exchange(), left)
    except NamingError:
        raise
    except asyncio.IncompleteReadError:
        raise NamingError(f"garbage answer from {where} for {_what(op)}: truncated") from None
    except (TimeoutError, *_TRANSPORT) as exc:
        raise _transport_error(exc, op, where, timeout) from None
    return _decode_update_answer(reply, op.message)


def _drive(steps: _Steps[_T], server: Server, timeout: float) -> _T:
    host, port = _endpoint(server)
    deadline = time.monotonic() + timeout
    try:
        ops = next(steps)
        while True:
            try:
                replies = [_exchange_sync(op, host, port, deadline, timeout) for op in ops]
            except NamingError as exc:
                ops = steps.throw(exc)
            else:
                ops = steps.send(replies)
    except StopIteration as done:
        result: _T = done.value
        return result


async def _drive_async(steps: _Steps[_T], server: Server, timeout: float) -> _T:
    host, port = _endpoint(server)
    deadline = time.monotonic() + timeout
    try:
        ops = next(steps)
        while True:
            outcomes = await asyncio.gather(
                *(_exchange_async(op, host, port, deadline, timeout) for op in ops),
                return_exceptions=True,
            )
            errors = [o for o in outcomes if isinstance(o, BaseException)]
            if errors:
                if not isinstance(errors[0], NamingError):
                    raise errors[0]
                ops = steps.throw(errors[0])
            else:
                ops = steps.send([o for o in outcomes if isinstance(o, dns.message.Message)])
    except StopIteration as done:
        result: _T = done.value
        return result


# reading answers --------------------------------------------------------------------------


def _rrset(
    answer: dns.message.Message, op: _Op, missing_ok: bool = False
) -> dns.rrset.RRset | None:
    """The answer's RRset for op; NXDOMAIN is "none" when missing_ok, else an error."""
    assert isinstance(op, _Query)
    rcode = answer.rcode()
    if rcode == dns.rcode.NXDOMAIN:
        if not missing_ok:
            raise NamingError(f"not found: {op.name} does not exist (NXDOMAIN)")
        return None
    if rcode != dns.rcode.NOERROR:
        text = dns.rcode.to_text(rcode)
        why = {
            dns.rcode.SERVFAIL: "server failure",
            dns.rcode.REFUSED: "refused, the server does not serve this name",
        }.get(rcode, "error")
        raise NamingError(f"{why} ({text}) for {_what(op)}")
    return answer.get_rrset(answer.answer, op.name, IN, op.rdtype)


def _zone_of(answer: dns.message.Message, op: _Op) -> dns.name.Name:
    """The zone holding op.name, from the SOA in an answer to an SOA query."""
    assert isinstance(op, _Query)
    if answer.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        raise NamingError(
            f"cannot find the zone of {op.name}: the server answered "
            f"{dns.rcode.to_text(answer.rcode())}"
        )
    for rrset in (*answer.answer, *answer.authority):
        if rrset.rdtype == SOA and op.name.is_subdomain(rrset.name):
            return rrset.name
    raise NamingError(f"cannot find the zone of {op.name}: no SOA in the answer")


def _lookup_steps(start: dns.name.Name | IPv4Address, plan: AddressPlan) -> _Steps[PoolRecord]:
    if isinstance(start, IPv4Address):
        rev = reverse_name(start)
        ops: list[_Op] = [_Query(rev, PTR), _Query(rev, TXT)]
        ptr_answer, rtxt_answer = yield ops
        ptr, rtxt = _rrset(ptr_answer, ops[0]), _rrset(rtxt_answer, ops[1])
        alias = _one_target(rev, ptr)
        ops = [_Query(alias, A), _Query(alias, TXT)]
        a_answer, txt_answer = yield ops
        a, txt = _rrset(a_answer, ops[0]), _rrset(txt_answer, ops[1])
        group = _one_group(alias, a)
        if group != start:
            raise NamingError(f"record mismatch: {alias} has address {group}, not {start}")
    else:
        alias = start
        ops = [_Query(alias, A), _Query(alias, TXT)]
        a_answer, txt_answer = yield ops
        a, txt = _rrset(a_answer, ops[0]), _rrset(txt_answer, ops[1])
        rev = reverse_name(_one_group(alias, a))
        _one_key(alias, txt)  # report a bad forward key before looking further
        ops = [_Query(rev, PTR), _Query(rev, TXT)]
        ptr_answer, rtxt_answer = yield ops
        ptr, rtxt = _rrset(ptr_answer, ops[0]), _rrset(rtxt_answer, ops[1])
    return _assemble(alias, a, txt, ptr, rtxt, plan)


def lookup_alias(
    alias: str,
    server: Server,
    *,
    timeout: float = 2.0,
    plan: AddressPlan = DEFAULT_PLAN,
) -> PoolRecord:
    """The whole record for an alias (Fig 4), checked both ways; `timeout` bounds the lookup."""
    return _drive(_lookup_steps(_dns_name(alias, "alias"), plan), server, timeout)


def lookup_group(
    group: IPv4Address | str,
    server: Server,
    *,
    timeout: float = 2.0,
    plan: AddressPlan = DEFAULT_PLAN,
) -> PoolRecord:
    """The whole record for a group address, found through its reverse name."""
    return _drive(_lookup_steps(_multicast(group), plan), server, timeout)


async def lookup_alias_async(
    alias: str,
    server: Server,
    *,
    timeout: float = 2.0,
    plan: AddressPlan = DEFAULT_PLAN,
) -> PoolRecord:
    return await _drive_async(_lookup_steps(_dns_name(alias, "alias"), plan), server, timeout)


async def lookup_group_async(
    group: IPv4Address | str,
    server: Server,
    *,
    timeout: float = 2.0,
    plan: AddressPlan = DEFAULT_PLAN,
) -> PoolRecord:
    return await _drive_async(_lookup_steps(_multicast(group), plan), server, timeout)


# publishing ---------------------------------------------------------------------------------


def _update(zone: dns.name.Name, key: dns.tsig.Key | None) -> dns.update.UpdateMessage:
    if key is None:
        return dns.update.UpdateMessage(zone)
    return dns.update.UpdateMessage(zone, keyring=key, keyalgorithm=key.algorithm)


def _guard(
    up: dns.update.UpdateMessage, name: dns.name.Name, rdtype: int, rrset: dns.rrset.RRset | None
) -> None:
    """Prerequisite: the RRset is still exactly what was read (RFC 2136 §2.4.2, §2.4.5)."""
    if rrset is None:
        up.absent(name, dns.rdatatype.RdataType.make(rdtype))
    else:
        up.present(name, *rrset)  # rdata, not the rdataset: prerequisites carry TTL 0


def _key_txts(rrset: dns.rrset.RRset | None) -> list[dns.rdata.Rdata]:
    return [] if rrset is None else [r for r in rrset if is_key_txt(_txt_bytes(r))]


def _check_update(answer: dns.message.Message, zone: dns.name.Name, signed: bool) -> None:
    if answer.rcode() != dns.rcode.NOERROR:
        raise _update_refusal(answer.rcode(), zone, "" if signed else "the update was not signed")


def _drop_reverse_steps(
    alias: dns.name.Name, group: IPv4Address, key: dns.tsig.Key | None
) -> _Steps[bool]:
    """Removes group's PTR and key record if they still name `alias`."""
    rev = reverse_name(group)
    ops: list[_Op] = [_Query(rev, PTR), _Query(rev, TXT), _Query(rev, SOA)]
    ptr_answer, txt_answer, soa_answer = yield ops
    ptr = _rrset(ptr_answer, ops[0], missing_ok=True)
    txt = _rrset(txt_answer, ops[1], missing_ok=True)
    if ptr is None or {r.target for r in ptr if isinstance(r, dns.rdtypes.ANY.PTR.PTR)} != {alias}:
        return False
    zone = _zone_of(soa_answer, ops[2])
    up = _update(zone, key)
    _guard(up, rev, PTR, ptr)
    up.delete(rev, PTR)
    for rdata in _key_txts(txt):
        up.delete(rev, rdata)
    (answer,) = yield [_Update(up)]
    _check_update(answer, zone, key is not None)
    return True


def _publish_steps(
    record: PoolRecord,
    zone: dns.name.Name,
    key: dns.tsig.Key | None,
    reverse_zone: dns.name.Name | None,
    plan: AddressPlan,
) -> _Steps[None]:
    plan.check(record.group, record.private)
    alias, rev, ttl = record.alias_name, record.reverse_name, record.ttl
    _in_zone(alias, zone, "alias")
    if reverse_zone is not None:
        _in_zone(rev, reverse_zone, "reverse name")
    ops: list[_Op] = [_Query(rev, PTR), _Query(rev, TXT), _Query(alias, A), _Query(alias, TXT)]
    ops += [_Query(rev, SOA)] if reverse_zone is None else []
    answers = yield ops
    ptr, rtxt, a, txt = (
        _rrset(ans, op, missing_ok=True) for ans, op in zip(answers[:4], ops[:4], strict=True)
    )
    rzone = reverse_zone or _zone_of(answers[4], ops[4])
    owners = (
        set() if ptr is None else {r.target for r in ptr if isinstance(r, dns.rdtypes.ANY.PTR.PTR)}
    )
    if owners - {alias}:
        names = ", ".join(sorted(n.to_text() for n in owners))
        raise NamingError(f"conflict: group {record.group} is already published as {names}")
    new_txt = _txt_rdata(record.txt())
    new_ptr = _ptr_rdata(alias)

    # Reverse side first: until the forward side follows, readers see a mismatch.
    up = _update(rzone, key)
    _guard(up, rev, PTR, ptr)
    _guard(up, rev, TXT, rtxt)
    up.replace(rev, ttl, new_ptr)
    for rdata in _key_txts(rtxt):
        up.delete(rev, rdata)
    up.add(rev, ttl, new_txt)
    (answer,) = yield [_Update(up)]
    _check_update(answer, rzone, key is not None)

    up = _update(zone, key)
    _guard(up, alias, A, a)
    _guard(up, alias, TXT, txt)
    up.replace(alias, ttl, _a_rdata(record.group))
    for rdata in _key_txts(txt):
        up.delete(alias, rdata)
    up.add(alias, ttl, new_txt)
    try:
        (answer,) = yield [_Update(up)]
        _check_update(answer, zone, key is not None)
    except NamingError as exc:
        # Put the reverse side back as it was, if it is still ours.
        back = _update(rzone, key)
        back.present(rev, new_ptr)
        back.delete(rev, PTR)
        back.delete(rev, new_txt)
        for rdata in () if ptr is None else ptr:
            back.add(rev, ptr.ttl if ptr else ttl, rdata)
        for rdata in _key_txts(rtxt):
            back.add(rev, rtxt.ttl if rtxt else ttl, rdata)
        try:
            (undo,) = yield [_Update(back)]
            _check_update(undo, rzone, key is not None)
        except NamingError as undo_exc:
            raise NamingError(f"{exc}; the reverse records stay published: {undo_exc}") from None
        raise

    old = set() if a is None else {r.address for r in a if isinstance(r, dns.rdtypes.IN.A.A)}
    for address in sorted(old - {str(record.group)}):
        try:
            yield from _drop_reverse_steps(alias, _multicast(address, "old address"), key)
        except NamingError as exc:
            _log.warning(
                "published %s; the reverse records of its old group %s remain: %s",
                alias,
                address,
                exc,
            )
    return None


def _withdraw_steps(
    alias: dns.name.Name, zone: dns.name.Name, key: dns.tsig.Key | None
) -> _Steps[None]:
    _in_zone(alias, zone, "alias")
    ops: list[_Op] = [_Query(alias, A), _Query(alias, TXT)]
    a_answer, txt_answer = yield ops
    a = _rrset(a_answer, ops[0], missing_ok=True)
    txt = _rrset(txt_answer, ops[1], missing_ok=True)
    if a is None:
        raise NamingError(f"not found: {alias} has no address record")
    up = _update(zone, key)
    _guard(up, alias, A, a)
    _guard(up, alias, TXT, txt)
    up.delete(alias, A)
    for rdata in _key_txts(txt):
        up.delete(alias, rdata)
    (answer,) = yield [_Update(up)]
    _check_update(answer, zone, key is not None)
    for rdata in a:
        assert isinstance(rdata, dns.rdtypes.IN.A.A)
        try:
            group = _multicast(rdata.address, "address record")
        except NamingError:
            continue  # not ours to clean: no reverse record was ever published for it
        try:
            yield from _drop_reverse_steps(alias, group, key)
        except NamingError as exc:
            raise NamingError(
                f"withdrew {alias}; the reverse records of {group} remain: {exc}"
            ) from None
    return None


def _zone_arg(zone: str) -> dns.name.Name:
    return _dns_name(zone, "zone")


def publish(
    record: PoolRecord,
    server: Server,
    zone: str,
    keyring: Keyring | None,
    *,
    reverse_zone: str | None = None,
    timeout: float = 5.0,
    plan: AddressPlan = DEFAULT_PLAN,
) -> None:
    """Publishes (or replaces) a record with two signed UPDATEs: reverse zone, then `zone`.

    The reverse zone is found by asking the server for the SOA of the reverse
    name unless given. A group already published under another alias is
    refused; moving an alias to a new group removes the old group's reverse
    records. `keyring=None` sends unsigned updates (which servers refuse).
    """
    rzone = _zone_arg(reverse_zone) if reverse_zone else None
    steps = _publish_steps(record, _zone_arg(zone), _dns_key(keyring), rzone, plan)
    _drive(steps, server, timeout)


async def publish_async(
    record: PoolRecord,
    server: Server,
    zone: str,
    keyring: Keyring | None,
    *,
    reverse_zone: str | None = None,
    timeout: float = 5.0,
    plan: AddressPlan = DEFAULT_PLAN,
) -> None:
    rzone = _zone_arg(reverse_zone) if reverse_zone else None
    steps = _publish_steps(record, _zone_arg(zone), _dns_key(keyring), rzone, plan)
    await _drive_async(steps, server, timeout)


def _alias_of(record: PoolRecord | str) -> dns.name.Name:
    return record.alias_name if isinstance(record, PoolRecord) else _dns_name(record, "alias")


def withdraw(
    record: PoolRecord | str,
    server: Server,
    zone: str,
    keyring: Keyring | None,
    *,
    timeout: float = 5.0,
) -> None:
    """Removes an alias's A and key record, then its group's PTR and key record."""
    _drive(_withdraw_steps(_alias_of(record), _zone_arg(zone), _dns_key(keyring)), server, timeout)


async def withdraw_async(
    record: PoolRecord | str,
    server: Server,
    zone: str,
    keyring: Keyring | None,
    *,
    timeout: float = 5.0,
) -> None:
    steps = _withdraw_steps(_alias_of(record), _zone_arg(zone), _dns_key(keyring))
    await _drive_async(steps, server, timeout)
