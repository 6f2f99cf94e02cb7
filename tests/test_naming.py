"""Pool names on DNS: the record's encoding, strict decoding, and real servers.

The server tests run against the embedded responder and against Debian's knot
(skipped when knotd is not installed); both get the same publish, lookup and
refusal checks.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.update
import dns.zone
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from manycast.dns import (
    DnsServerError,
    EmbeddedServer,
    KnotServer,
    knot_available,
    serve,
)
from manycast.naming import (
    DEFAULT_PLAN,
    AddressPlan,
    BadRecord,
    NamingError,
    NamingRefused,
    NamingTimeout,
    PoolRecord,
    TsigKey,
    decode_rrsets,
    format_key_txt,
    lookup_alias,
    lookup_alias_async,
    lookup_group,
    lookup_group_async,
    parse_key_txt,
    pool_zones,
    publish,
    publish_async,
    record_rrsets,
    reverse_name,
    withdraw,
    withdraw_async,
    zone_text,
)

ZONE = "pool.example."
# A deadline for anything a busy machine may be slow to do: the tests wait for the
# event (an answer, an exit), so a fast machine never waits this long.
WAIT = 30.0
KNOT_MISSING = "knot is not installed; `make dns-deps` installs it (root)"


def key_bytes(seed: int) -> bytes:
    return bytes((seed + i) % 256 for i in range(32))


def make(alias: str, group: str | list[str], seed: int = 1, **kw: Any) -> PoolRecord:
    return PoolRecord.create(alias, group, "abc123@host.sponsor.com", key_bytes(seed), **kw)


VIDEO = make("video.pool.example.", "232.1.2.3")
VIDEO6 = make("video.pool.example.", "ff3e::8001:203")  # the same record, IPv6
DUAL = make("dual.pool.example.", ["ff3e::8001:205", "232.1.2.5"], seed=3)
WEB = make("web.pool.example.", "224.5.6.7", seed=7)


# address plan (Fig 2) --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("publics", "privates"),
    [
        (
            ("224.0.0.0", "224.0.0.251", "231.255.255.255"),
            ("232.0.0.0", "235.1.2.3", "239.255.255.255"),
        ),
        (
            ("ff3e::1", "ff3e::7fff:ffff", "ff02::1", "ff35::8000:1", "ff3e:0:0:1::8000:1"),
            ("ff3e::8000:0", "ff3e::8000:1", "ff3e::ffff:ffff", "ff15::77:1"),
        ),
    ],
    ids=["ipv4", "ipv6"],
)
def test_default_plan_is_the_seed_split(
    publics: tuple[str, ...], privates: tuple[str, ...]
) -> None:
    for public in publics:
        assert DEFAULT_PLAN.is_public(public) and not DEFAULT_PLAN.is_private(public)
        assert not DEFAULT_PLAN.is_private_int(int(ip_address(public)))
    for private in privates:
        assert DEFAULT_PLAN.is_private(ip_address(private))
        assert DEFAULT_PLAN.is_private_int(int(ip_address(private)))
    for bad, why in (
        ("10.0.0.1", "not a multicast"),
        ("240.0.0.1", "not a multicast"),
        ("hello", "not an IPv4"),
        ("2001:db8::1", r"not a multicast address \(ff00::/8\)"),
        ("::ffff:232.1.2.3", "not a multicast"),
        ("ff02::1%eth0", "with a zone"),
    ):
        with pytest.raises(NamingError, match=why):
            DEFAULT_PLAN.is_private(bad)


def test_custom_plans() -> None:
    admin = AddressPlan.from_prefixes(["239.0.0.0/8"])
    assert admin.is_public("232.1.1.1") and admin.is_private("239.9.9.9")
    assert AddressPlan.from_text("232.0.0.0/8, 239.0.0.0/8").is_private("232.0.0.1")
    assert AddressPlan.from_text("232.0.0.0/8 239.0.0.0/8").is_public("233.0.0.1")
    nothing = AddressPlan.from_prefixes([])
    assert nothing.is_public("239.1.1.1")
    assert AddressPlan.from_prefixes(["232.0.0.0/8", "232.1.0.0/16"]).private == (
        AddressPlan.from_prefixes(["232.0.0.0/8"]).private
    )
    both = AddressPlan.from_text("239.0.0.0/8, ff3e::/32")
    assert both.is_private("ff3e::1") and both.is_public("ff35::8000:1")
    assert both.is_private_int(int(ip_address("ff3e::1")))
    assert both.is_private("239.1.1.1") and both.is_public("232.1.1.1")
    assert AddressPlan.from_text("232.0.0.0/5").is_public("ff3e::8000:1")  # none listed
    for bad, why in (
        ("10.0.0.0/8", "not inside 224.0.0.0/4"),
        ("239.0.0.1/8", "host bits"),
        ("garbage", "garbage"),
        ("224.0.0.0/3", "not inside"),
        ("2001:db8::/32", "not inside ff00::/8"),
        ("ff3e::1/32", "host bits"),
    ):
        with pytest.raises(NamingError, match=why):
            AddressPlan.from_prefixes([bad])


# the record and its key record (TXT) ---------------------------------------------------------


def test_record_is_canonical_and_checked() -> None:
    rec = PoolRecord.create("Video.Pool.Example", "232.1.2.3", "a@b", key_bytes(1))
    assert rec.alias == "video.pool.example." and rec.private and rec.ttl == 300
    assert reverse_name(rec.group) == dns.name.from_text("3.2.1.232.in-addr.arpa.")
    assert "public_key" not in repr(rec)
    signer = Ed25519PrivateKey.generate()
    rec = PoolRecord.create("a.pool.example", "224.1.1.1", "a@b", signer.public_key())
    rec.ed25519().verify(signer.sign(b"hello"), b"hello")
    assert VIDEO6.group == IPv6Address("ff3e::8001:203") and VIDEO6.private
    assert VIDEO6.group6 is None and VIDEO6.groups == (VIDEO6.group,)
    assert reverse_name("FF3E::8001:203") == dns.name.from_text(
        "3.0.2.0.1.0.0.8." + "0." * 20 + "e.3.f.f.ip6.arpa."
    )
    # a dual-stack record: its IPv4 group first, whatever order it was given in
    assert (DUAL.group, DUAL.group6) == (IPv4Address("232.1.2.5"), IPv6Address("ff3e::8001:205"))
    assert DUAL.groups == (DUAL.group, DUAL.group6) and DUAL.group_of(6) == DUAL.group6
    assert DUAL.reverse_names == tuple(reverse_name(g) for g in DUAL.groups)
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: make("bad..name", "232.1.1.1"), "bad alias"),
        (lambda: make("sp ace.example", "232.1.1.1"), "bad alias"),
        (lambda: make("*.pool.example", "232.1.1.1"), "bad alias"),
        (lambda: make(".", "232.1.1.1"), "root"),
        (lambda: make("a.example", "10.1.1.1"), "not a multicast"),
        (lambda: make("a.example", "2001:db8::1"), "not a multicast"),
        (lambda: make("a.example", ["232.1.1.1", "232.1.1.2"]), "one group, or one per family"),
        (lambda: make("a.example", []), "one group, or one per family"),
        (lambda: make("a.example", ["232.1.1.1", "ff3e::1"]), "ff3e::1 is in the public space"),
        (
            lambda: PoolRecord(
                "a.example",
                IPv6Address("ff3e::8000:1"),
                "a@b",
                key_bytes(1),
                True,
                300,
                IPv6Address("ff3e::8000:2"),
            ),
            "its IPv4 group in `group`",
        ),
        (
            lambda: PoolRecord.create("a.example", "232.1.1.1", "has space", key_bytes(1)),
            "bad owner",
        ),
        (
            lambda: PoolRecord.create("a.example", "232.1.1.1", "semi;colon", key_bytes(1)),
            "bad owner",
        ),
        (lambda: PoolRecord.create("a.example", "232.1.1.1", "", key_bytes(1)), "bad owner"),
        (lambda: PoolRecord.create("a.example", "232.1.1.1", "a@b", b"x" * 31), "31 bytes"),
        (lambda: make("a.example", "232.1.1.1", ttl=-1), "bad ttl"),
        (lambda: make("a.example", "224.1.1.1", private=True), "public space"),
        (lambda: make("a.example", "232.1.1.1", private=False), "private space"),
    ]
    for build, why in cases:
        with pytest.raises(BadRecord, match=why):
            build()
    assert make("a.example", "224.1.1.1", private=True, plan=AddressPlan.from_text("224.0.0.0/8"))


def test_key_record_round_trip() -> None:
    text = VIDEO.txt()
    assert text == (
        "v=manycast1; k=ed25519; p="
        + base64.b64encode(key_bytes(1)).decode()
        + "; o=abc123@host.sponsor.com; f=private"
    )
    parsed = parse_key_txt(text.encode())
    assert (parsed.owner, parsed.public_key, parsed.private) == (
        VIDEO.owner,
        VIDEO.public_key,
        True,
    )
    # DKIM-style whitespace and a trailing ';' are fine
    loose = text.replace("; ", " ;\t").replace("=", " = ", 1) + ";"
    assert parse_key_txt(loose.encode()) == parsed


GROUPS4 = st.integers(0xE0000000, 0xEFFFFFFF).map(IPv4Address)
GROUPS6 = st.one_of(
    st.integers(0xFF << 120, 2**128 - 1),  # anywhere in ff00::/8: nearly all public
    st.integers(0, 2**31 - 1).map(lambda i: int(IPv6Address("ff3e::8000:0")) + i),  # private
).map(IPv6Address)


@given(
    owner=st.text(
        alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=';"\\'),
        min_size=1,
        max_size=255,
    ),
    key=st.binary(min_size=32, max_size=32),
    groups=st.one_of(
        GROUPS4.map(lambda g: [g]),
        GROUPS6.map(lambda g: [g]),
        st.tuples(GROUPS6, GROUPS4)
        .filter(lambda gs: DEFAULT_PLAN.is_private(gs[0]) == DEFAULT_PLAN.is_private(gs[1]))
        .map(list),
    ),
    ttl=st.integers(0, 2**31 - 1),
)
def test_record_round_trips_through_rrsets(
    owner: str, key: bytes, groups: list[IPv4Address | IPv6Address], ttl: int
) -> None:
    rec = PoolRecord.create("x.pool.example", [str(g) for g in groups], owner, key, ttl=ttl)
    assert parse_key_txt(format_key_txt(owner, key, rec.private).encode()) == rec.key_record
    assert decode_rrsets(rec.alias, record_rrsets(rec)) == rec


@given(st.binary(max_size=300))
def test_key_record_parser_only_raises_naming_error(data: bytes) -> None:
    with contextlib.suppress(BadRecord):
        parse_key_txt(data)


@given(
    st.lists(
        st.sampled_from(
            [
                "v=manycast1",
                "k=ed25519",
                "p=" + "A" * 43 + "=",
                "o=a@b",
                "f=public",
                "f=private",
                "x=1",
                " ",
                "v=manycast2",
                "p=",
                "=",
                "k=rsa",
                "o=",
                ";",
            ]
        ),
        max_size=8,
    )
)
def test_key_record_parser_on_tag_soup(tags: list[str]) -> None:
    try:
        parse_key_txt("; ".join(tags).encode())
    except NamingError as exc:
        assert str(exc).startswith("bad key record: ")


GOOD_P = base64.b64encode(key_bytes(1)).decode()


@pytest.mark.parametrize(
    ("text", "why"),
    [
        (f"v=manycast2; k=ed25519; p={GOOD_P}; o=a@b; f=public", "unknown version 'manycast2'"),
        (f"v=MANYCAST1; k=ed25519; p={GOOD_P}; o=a@b; f=public", "unknown version"),
        (f"k=ed25519; v=manycast1; p={GOOD_P}; o=a@b; f=public", "first tag must be v="),
        (f"v=manycast1; k=rsa; p={GOOD_P}; o=a@b; f=public", "unsupported key type 'rsa'"),
        (f"v=manycast1; k=ed25519; p={GOOD_P[:-4]}; o=a@b; f=public", "key is 30 bytes"),
        (
            "v=manycast1; k=ed25519; p="
            + base64.b64encode(bytes(33)).decode()
            + "; o=a@b; f=public",
            "key is 33 bytes",
        ),
        (f"v=manycast1; k=ed25519; p={GOOD_P[:-1]}; o=a@b; f=public", "not canonical base64"),
        (f"v=manycast1; k=ed25519; p={GOOD_P[:-2]}F=; o=a@b; f=public", "nonzero pad bits"),
        (
            f"v=manycast1; k=ed25519; p={GOOD_P[:10]} {GOOD_P[10:]}; o=a@b; f=public",
            "not canonical base64",
        ),
        (f"v=manycast1; k=ed25519; p=!{GOOD_P[1:]}; o=a@b; f=public", "not canonical base64"),
        ("v=manycast1; k=ed25519; p=; o=a@b; f=public", "empty key"),
        (f"v=manycast1; k=ed25519; p={GOOD_P}; o=a@b", "missing tag f="),
        (f"v=manycast1; k=ed25519; p={GOOD_P}; f=public", "missing tag o="),
        (f"v=manycast1; k=ed25519; k=ed25519; p={GOOD_P}; o=a@b", "duplicate tag k="),
        (f"v=manycast1; k=ed25519; p={GOOD_P}; o=a@b; f=public; x=1", "6 tags"),
        (f"v=manycast1; k=ed25519; p={GOOD_P}; o=a@b; x=public", "unknown tag x="),
        (f"v=manycast1; k=ed25519; p={GOOD_P}; o=a@b; f=maybe", "flag f='maybe'"),
        (f"v=manycast1; k=ed25519; p={GOOD_P}; o=a b; f=public", "bad owner"),
        (f"v=manycast1;; k=ed25519; p={GOOD_P}; o=a@b", "empty tag"),
        (f"v=manycast1; k ed25519; p={GOOD_P}; o=a@b; f=public", "has no '='"),
        (f"v=manycast1; k-1=ed25519; p={GOOD_P}; o=a@b; f=public", "bad tag name"),
        (f"v=manycast1; k=ed25519; p={GOOD_P}; o=a@b; f=public\n", "control or non-ASCII"),
        (f"v=manycast1; k=ed25519; p={GOOD_P}; o=\u00e9@b; f=public", "non-ASCII"),
        ("v=manycast1; o=" + "a" * 1100, "at most 1024"),
        ("hello world", "has no '='"),
    ],
)
def test_bad_key_records(text: str, why: str) -> None:
    with pytest.raises(BadRecord, match="^bad key record: .*" + re.escape(why)):
        parse_key_txt(text.encode())


def test_long_owner_is_split_over_txt_strings() -> None:
    rec = PoolRecord.create("long.pool.example", "232.4.4.4", "o" * 255, key_bytes(3))
    txt = record_rrsets(rec)[1]
    (rdata,) = txt
    assert [len(s) for s in rdata.strings] == [255, len(rec.txt()) - 255]
    assert decode_rrsets(rec.alias, record_rrsets(rec)) == rec


# strict decoding of the record's RRsets ----------------------------------------------------------

ALIAS = dns.name.from_text(VIDEO.alias)
REV = reverse_name(VIDEO.group)


def rr(name: dns.name.Name | str, rdtype: str, *texts: str) -> dns.rrset.RRset:
    return dns.rrset.from_text_list(name, 300, "IN", rdtype, list(texts))


def quoted(text: str) -> str:
    return f'"{text}"'


def variant(
    record: PoolRecord = VIDEO, /, **change: dns.rrset.RRset | None
) -> list[dns.rrset.RRset]:
    """A record's RRsets with some replaced or left out: `a` (its A or AAAA), `txt`, `ptr`,
    `rtxt`, and a dual-stack record's `aaaa`, `ptr6`, `rtxt6`."""
    names = ["a", "txt", "ptr", "rtxt", "aaaa", "ptr6", "rtxt6"]
    parts: dict[str, dns.rrset.RRset | None] = dict(zip(names, record_rrsets(record), strict=False))
    parts.update(change)
    return [r for r in parts.values() if r is not None]


TAMPERED = VIDEO.txt().replace(GOOD_P, base64.b64encode(key_bytes(9)).decode())


@dataclass(frozen=True)
class Family:
    """What the strict-decoding cases need of an address family."""

    record: PoolRecord
    rdtype: str
    other: str  # a second multicast group of the family
    unicast: str

    @property
    def rev(self) -> dns.name.Name:
        return reverse_name(self.record.group)


FAMILIES = [
    pytest.param(Family(VIDEO, "A", "232.1.2.4", "10.1.2.3"), id="ipv4"),
    pytest.param(Family(VIDEO6, "AAAA", "ff3e::8001:204", "2001:db8::3"), id="ipv6"),
]
Case = Callable[[Family], list[dns.rrset.RRset]]
# (the RRsets, what the error says: {rev} is the reverse name, {type} A or AAAA)
STRICT: dict[str, tuple[Case, str]] = {
    "no alias key": (lambda f: variant(f.record, txt=None), "no key record at video.pool.example."),
    "no reverse key": (lambda f: variant(f.record, rtxt=None), "no key record at {rev}"),
    "no address": (lambda f: variant(f.record, a=None), "no address record at video.pool.example."),
    "two addresses": (
        lambda f: variant(f.record, a=rr(ALIAS, f.rdtype, str(f.record.group), f.other)),
        "2 {type} records",
    ),
    "not multicast": (
        lambda f: variant(f.record, a=rr(ALIAS, f.rdtype, f.unicast)),
        "bad address record .* not a multicast",
    ),
    "two keys": (
        lambda f: variant(f.record, txt=rr(ALIAS, "TXT", quoted(f.record.txt()), quoted(TAMPERED))),
        "2 manycast TXT records",
    ),
    "foreign txt only": (
        lambda f: variant(f.record, txt=rr(ALIAS, "TXT", quoted("hello, garbage"))),
        "no key record",
    ),
    "bad base64": (
        lambda f: variant(
            f.record,
            txt=rr(ALIAS, "TXT", quoted("v=manycast1; k=ed25519; p=@@; o=a@b; f=private")),
        ),
        "bad key record at video.pool.example.: p= is not canonical base64",
    ),
    "unknown version": (
        lambda f: variant(
            f.record, txt=rr(ALIAS, "TXT", quoted(f.record.txt().replace("manycast1", "manycast9")))
        ),
        "unknown version",
    ),
    "short key": (
        lambda f: variant(
            f.record, txt=rr(ALIAS, "TXT", quoted(f.record.txt().replace(GOOD_P, GOOD_P[:-4])))
        ),
        "key is 30 bytes",
    ),
    "reverse key differs": (
        lambda f: variant(f.record, rtxt=rr(f.rev, "TXT", quoted(TAMPERED))),
        "record mismatch: the key record",
    ),
    "no ptr": (lambda f: variant(f.record, ptr=None), "no PTR record at {rev}"),
    "ptr to another alias": (
        lambda f: variant(f.record, ptr=rr(f.rev, "PTR", "other.pool.example.")),
        "record mismatch: {rev} points to other.pool.example.",
    ),
    "two ptrs": (
        lambda f: variant(
            f.record, ptr=rr(f.rev, "PTR", "video.pool.example.", "other.pool.example.")
        ),
        "2 PTR records",
    ),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", list(STRICT))
def test_strict_decoding(case: str, family: Family) -> None:
    build, why = STRICT[case]
    why = why.format(rev=re.escape(family.rev.to_text()), type=family.rdtype)
    kind = NamingRefused if why.startswith("no ") else BadRecord  # missing, or there but bad
    with pytest.raises(kind, match=why):
        decode_rrsets(VIDEO.alias, build(family))


DUAL_ALIAS = dns.name.from_text(DUAL.alias)
REV6 = re.escape(reverse_name(DUAL.groups[1]).to_text())
DUAL_TAMPERED = DUAL.txt().replace(
    base64.b64encode(key_bytes(3)).decode(), base64.b64encode(key_bytes(9)).decode()
)


@pytest.mark.parametrize(
    ("rrsets", "why"),
    [
        (variant(DUAL, aaaa=None), None),  # an IPv4 pool, with a stray reverse name
        (
            variant(DUAL, rtxt6=rr(reverse_name(DUAL.groups[1]), "TXT", quoted(DUAL_TAMPERED))),
            f"record mismatch: the key record at {REV6} differs",
        ),
        (
            variant(DUAL, ptr6=rr(reverse_name(DUAL.groups[1]), "PTR", "video.pool.example.")),
            f"record mismatch: {REV6} points to video.pool.example., not dual.pool.example.",
        ),
        (variant(DUAL, ptr6=None), f"no PTR record at {REV6}"),
        (variant(DUAL, rtxt6=None), f"no key record at {REV6}"),
        (
            variant(DUAL, aaaa=rr(DUAL_ALIAS, "AAAA", "ff3e::8001:205", "ff3e::8001:206")),
            "2 AAAA records",
        ),
        (variant(DUAL, aaaa=rr(DUAL_ALIAS, "AAAA", "::ffff:232.1.2.5")), "not a multicast"),
    ],
    ids=[
        "ipv4 only",
        "reverse keys differ",
        "ptr to another alias",
        "no ptr",
        "no key",
        "two",
        "mapped",
    ],
)
def test_strict_decoding_of_dual_stack_records(
    rrsets: list[dns.rrset.RRset], why: str | None
) -> None:
    assert decode_rrsets(DUAL.alias, variant(DUAL)) == DUAL
    if why is None:
        assert decode_rrsets(DUAL.alias, rrsets).groups == (DUAL.group,)
        return
    kind = NamingRefused if why.startswith("no ") else BadRecord
    with pytest.raises(kind, match=why):
        decode_rrsets(DUAL.alias, rrsets)


SOUP_VALUES = {
    "A": ["232.1.2.5", "10.0.0.1", "224.1.1.1"],
    "AAAA": ["ff3e::8001:205", "::ffff:232.1.2.5", "2001:db8::1", "ff3e::1"],
    "PTR": ["dual.pool.example.", "other.pool.example.", "."],
    "TXT": [quoted(DUAL.txt()), quoted(DUAL_TAMPERED), quoted("v=manycast1; junk"), '"hi"'],
}


@given(
    keep=st.lists(st.booleans(), min_size=7, max_size=7),
    extra=st.lists(
        st.tuples(
            st.sampled_from([DUAL_ALIAS, *DUAL.reverse_names]),
            st.sampled_from(list(SOUP_VALUES)),
            st.integers(0, 3),
            st.booleans(),
        ),
        max_size=3,
    ),
)
def test_a_dual_stack_record_soup_raises_only_naming_errors(
    keep: list[bool], extra: list[tuple[dns.name.Name, str, int, bool]]
) -> None:
    """Any mix of a dual-stack record's RRsets, some left out, others added (a second
    address, a foreign PTR, another key): the record, or a NamingError."""
    rrsets = [r for r, kept in zip(record_rrsets(DUAL), keep, strict=True) if kept]
    for name, rdtype, index, two in extra:
        values = SOUP_VALUES[rdtype]
        texts = [values[index % len(values)]] + ([values[(index + 1) % len(values)]] if two else [])
        rrsets.append(rr(name, rdtype, *texts))
    try:
        assert decode_rrsets(DUAL.alias, rrsets).alias == DUAL.alias
    except NamingError as exc:
        assert type(exc) in (NamingRefused, BadRecord)


@pytest.mark.parametrize(
    ("public", "private", "plan"),
    [
        (["224.1.2.3"], ["238.1.2.3"], "224.0.0.0/8"),
        (["ff3e::1:2:3"], ["ff3e::8001:203"], "ff3e::/32"),
        (["238.1.2.4", "ff3e::1:2:3"], ["238.1.2.4", "ff15::2"], "224.0.0.0/4, ff00::/8"),
    ],
    ids=["ipv4", "ipv6", "dual"],
)
def test_flag_must_agree_with_the_plan(public: list[str], private: list[str], plan: str) -> None:
    """A record flagged private with a public group, and the other way round: refused
    unless the plan makes them so. A dual-stack record's groups are each checked."""

    def record(alias: str, groups: list[str], flag: bool) -> PoolRecord:
        first, *more = (ip_address(g) for g in groups)
        group6 = more[0] if more else None
        assert group6 is None or isinstance(group6, IPv6Address)
        return PoolRecord(alias, first, "a@b", key_bytes(1), flag, 300, group6)

    public_group = record("pub.pool.example.", public, True)
    with pytest.raises(
        BadRecord, match=re.escape(public[-1]) + " is in the public space .* flagged private"
    ):
        decode_rrsets(public_group.alias, record_rrsets(public_group))
    private_group = record("prv.pool.example.", private, False)
    with pytest.raises(NamingError, match=r"private space .* flagged public"):
        decode_rrsets(private_group.alias, record_rrsets(private_group))
    wide = AddressPlan.from_text(plan)
    assert decode_rrsets(public_group.alias, record_rrsets(public_group), wide) == public_group


def test_foreign_txt_records_are_ignored() -> None:
    spf = rr(ALIAS, "TXT", quoted(VIDEO.txt()), quoted("v=spf1 -all"))
    assert decode_rrsets(VIDEO.alias, variant(txt=spf)) == VIDEO


# zone files -----------------------------------------------------------------------------------


def test_zone_text_loads_and_holds_the_records() -> None:
    text = zone_text(ZONE, [VIDEO, WEB, DUAL], nameserver_address="127.0.0.1")
    zone = dns.zone.from_text(text, ZONE, relativize=False)
    assert zone.get_rdataset(ZONE, "SOA") is not None
    assert zone.get_rdataset(ZONE, "NS") is not None
    assert zone.get_rdataset("ns." + ZONE, "A") is not None
    assert zone.get_rdataset(VIDEO.alias, "A") is not None
    assert zone.get_rdataset(VIDEO.alias, "PTR") is None  # reverse names live elsewhere
    assert zone.get_rdataset(VIDEO.alias, "AAAA") is None
    assert zone.get_rdataset(DUAL.alias, "A") and zone.get_rdataset(DUAL.alias, "AAAA")
    rev = zone_text("232.in-addr.arpa.", [VIDEO, WEB, DUAL])
    rzone = dns.zone.from_text(rev, "232.in-addr.arpa.", relativize=False)
    assert rzone.get_rdataset(REV, "PTR") is not None
    assert rzone.get_rdataset(reverse_name(DUAL.group), "PTR") is not None
    assert rzone.get_rdataset(reverse_name(WEB.group), "PTR") is None
    zones = pool_zones(ZONE, [VIDEO, WEB, DUAL])
    # the pool zone, 224-239.in-addr.arpa. and f.f.ip6.arpa. (all of ff00::/8)
    assert next(iter(zones)) == ZONE and len(zones) == 18
    rzone6 = dns.zone.from_text(zones["f.f.ip6.arpa."], "f.f.ip6.arpa.", relativize=False)
    assert rzone6.get_rdataset(reverse_name(DUAL.groups[1]), "PTR") is not None
    assert rzone6.get_rdataset(reverse_name(DUAL.groups[1]), "TXT") is not None
    served = [
        dns.rrset.from_rdata_list(name, rds.ttl, list(rds))
        for z in (zone, rzone, rzone6)
        for name, rds in z.iterate_rdatasets()
    ]
    assert decode_rrsets(DUAL.alias, served) == DUAL


def test_zone_generation_refuses_bad_input() -> None:
    with pytest.raises(NamingError, match="appears twice"):
        zone_text(ZONE, [VIDEO, VIDEO])
    with pytest.raises(NamingError, match="used by"):
        zone_text(ZONE, [VIDEO, make("dup.pool.example", "232.1.2.3")])
    with pytest.raises(NamingError, match=r"ff3e::8001:205 is used by dual\.pool\.example\."):
        zone_text(ZONE, [DUAL, make("dup.pool.example", "ff3e::8001:205")])
    with pytest.raises(NamingError, match="in none of the zones"):
        pool_zones(ZONE, [DUAL], reverse_zones=[f"{n}.in-addr.arpa." for n in range(224, 240)])
    with pytest.raises(NamingError, match="outside zone"):
        pool_zones("other.example.", [VIDEO])
    with pytest.raises(NamingError, match="in none of the zones"):
        pool_zones(ZONE, [VIDEO], reverse_zones=["224.in-addr.arpa."])
    with pytest.raises(NamingError, match="flagged private"):
        zone_text(ZONE, [VIDEO], plan=AddressPlan.from_prefixes([]))


def test_tsig_key_text() -> None:
    key = TsigKey.generate("update.example.")
    assert TsigKey.from_text(key.to_text()) == key
    assert key.secret_b64 not in repr(key)
    assert TsigKey.from_text("k:" + key.secret_b64).algorithm == "hmac-sha256"
    for bad, why in (
        ("nope", "expected"),
        ("k:!!!", "not base64"),
        ("hmac-md5:k:" + key.secret_b64, "bad TSIG algorithm"),
        ("k:" + base64.b64encode(b"short").decode(), "at least 16"),
    ):
        with pytest.raises(NamingError, match=why):
            TsigKey.from_text(bad)


# live servers ---------------------------------------------------------------------------------

KEY = TsigKey.generate("manycast-update.")
SEEDED = make("seeded.pool.example", "232.0.0.9", seed=5)
SEEDED_DUAL = make("seeded-dual.pool.example", ["232.0.0.10", "ff3e::8000:10"], seed=6)


@pytest.fixture(scope="module", params=["embedded", "knot"])
def server(request: pytest.FixtureRequest) -> Iterator[tuple[str, int]]:
    if request.param == "knot":
        if not knot_available():
            pytest.skip(KNOT_MISSING)
        with KnotServer.for_pool(ZONE, [SEEDED, SEEDED_DUAL], KEY) as knot:
            yield knot.address
    else:
        with EmbeddedServer.for_pool(ZONE, [SEEDED, SEEDED_DUAL], KEY) as embedded:
            yield embedded.address


def test_lookup_seeded_record(server: tuple[str, int]) -> None:
    assert lookup_alias("seeded.pool.example", server, timeout=WAIT) == SEEDED
    assert lookup_group("232.0.0.9", server, timeout=WAIT) == SEEDED
    # Fig 4 for a dual-stack pool: the alias, or either group, gives the whole record
    assert lookup_alias(SEEDED_DUAL.alias, server, timeout=WAIT) == SEEDED_DUAL
    for group in ("232.0.0.10", "ff3e::8000:10"):
        assert lookup_group(group, server, timeout=WAIT) == SEEDED_DUAL


@pytest.mark.parametrize(
    "groups",
    [["232.10.0.1"], ["ff3e::8000:a01"], ["232.10.0.11", "ff3e::8000:a0b"]],
    ids=["ipv4", "ipv6", "dual"],
)
def test_publish_lookup_withdraw(server: tuple[str, int], groups: list[str]) -> None:
    rec = make("pub.pool.example", groups, seed=11)
    publish(rec, server, ZONE, KEY, timeout=WAIT)
    assert lookup_alias("pub.pool.example.", server, timeout=WAIT) == rec
    for group in groups:
        assert lookup_group(ip_address(group), server, timeout=WAIT) == rec
    publish(rec, server, ZONE, KEY, timeout=WAIT)  # idempotent
    assert lookup_alias(rec.alias, server, timeout=WAIT) == rec
    rekeyed = make("pub.pool.example", groups, seed=12, ttl=60)
    publish(rekeyed, server, ZONE, KEY, timeout=WAIT)
    assert lookup_group(groups[-1], server, timeout=WAIT) == rekeyed
    withdraw(rec, server, ZONE, KEY, timeout=WAIT)
    with pytest.raises(
        NamingRefused, match=r"not found: pub.pool.example. does not exist \(NXDOMAIN\)"
    ):
        lookup_alias(rec.alias, server, timeout=WAIT)
    for group in groups:
        rev = re.escape(reverse_name(group).to_text())
        with pytest.raises(NamingRefused, match=rf"not found: {rev} .*NXDOMAIN"):
            lookup_group(group, server, timeout=WAIT)
    with pytest.raises(
        NamingRefused, match=re.escape("not found: pub.pool.example. has no address record")
    ):
        withdraw(rec.alias, server, ZONE, KEY, timeout=WAIT)


def test_dual_stack_moves_and_conflicts(server: tuple[str, int]) -> None:
    """An alias moves between one family and both; each group it leaves is free again."""
    v4, v6, v6_next = "232.10.1.1", "ff3e::800a:101", "ff3e::800a:102"
    owner = make("mover.pool.example", [v4, v6], seed=21)
    publish(owner, server, ZONE, KEY, timeout=WAIT)
    thief = make("thief6.pool.example", v6, seed=22)
    with pytest.raises(
        BadRecord,
        match=re.escape(f"conflict: group {v6} is already published as mover.pool.example."),
    ):
        publish(thief, server, ZONE, KEY, timeout=WAIT)
    ipv4_only = make("mover.pool.example", v4, seed=21)
    publish(ipv4_only, server, ZONE, KEY, timeout=WAIT)
    assert lookup_alias(owner.alias, server, timeout=WAIT) == ipv4_only
    with pytest.raises(NamingRefused, match="NXDOMAIN"):
        lookup_group(v6, server, timeout=WAIT)
    publish(thief, server, ZONE, KEY, timeout=WAIT)  # the IPv6 group is free again
    assert lookup_group(v6, server, timeout=WAIT) == thief
    moved = make("mover.pool.example", [v4, v6_next], seed=21)
    publish(moved, server, ZONE, KEY, timeout=WAIT)
    assert lookup_group(v6_next, server, timeout=WAIT) == moved
    assert lookup_group(v4, server, timeout=WAIT) == moved
    for rec in (moved, thief):
        withdraw(rec, server, ZONE, KEY, timeout=WAIT)
    for group in (v4, v6, v6_next):
        with pytest.raises(NamingRefused, match="NXDOMAIN"):
            lookup_group(group, server, timeout=WAIT)


@pytest.mark.parametrize(
    "groups", [["224.10.0.2"], ["ff3e::10:2", "224.10.0.12"]], ids=["ipv4", "dual"]
)
def test_public_group_and_async_api(server: tuple[str, int], groups: list[str]) -> None:
    rec = make("async.pool.example", groups, seed=13)
    assert not rec.private

    async def session() -> None:
        await publish_async(rec, server, ZONE, KEY, timeout=WAIT)
        found = await asyncio.gather(
            lookup_alias_async(rec.alias, server, timeout=WAIT),
            *(lookup_group_async(g, server, timeout=WAIT) for g in rec.groups),
        )
        assert found == [rec] * (1 + len(groups))
        await withdraw_async(rec.alias, server, ZONE, KEY, timeout=WAIT)
        with pytest.raises(NamingError, match="NXDOMAIN"):
            await lookup_alias_async(rec.alias, server, timeout=WAIT)

    asyncio.run(session())


def test_unsigned_and_badly_signed_updates_are_refused(server: tuple[str, int]) -> None:
    rec = make("refused.pool.example", "232.10.0.3", seed=14)
    with pytest.raises(NamingRefused, match=r"refused \(NOTAUTH\): the update was not signed"):
        publish(rec, server, ZONE, None, timeout=WAIT)
    wrong_secret = TsigKey(KEY.name, os.urandom(32))
    with pytest.raises(NamingRefused, match=r"bad TSIG signature .*BADSIG"):
        publish(rec, server, ZONE, wrong_secret, timeout=WAIT)
    unknown = TsigKey("stranger.", os.urandom(32))
    with pytest.raises(NamingRefused, match=r"does not know the TSIG key stranger\. .*BADKEY"):
        publish(rec, server, ZONE, unknown, timeout=WAIT)
    with pytest.raises(NamingError, match="not found"):
        lookup_alias(rec.alias, server, timeout=WAIT)
    # nor may anyone withdraw an existing record without the key
    with pytest.raises(NamingError, match="refused"):
        withdraw(SEEDED.alias, server, ZONE, wrong_secret, timeout=WAIT)
    assert lookup_alias(SEEDED.alias, server, timeout=WAIT) == SEEDED
    # and a raw dnspython update without TSIG gets NOTAUTH, as knot answers
    up = dns.update.UpdateMessage(ZONE)
    up.add("raw.pool.example.", 300, "A", "232.10.0.4")
    assert dns.query.tcp(up, server[0], port=server[1], timeout=WAIT).rcode() == dns.rcode.NOTAUTH


def test_conflicts_and_moves(server: tuple[str, int]) -> None:
    owner = make("owner.pool.example", "232.10.0.5", seed=15)
    publish(owner, server, ZONE, KEY, timeout=WAIT)
    thief = make("thief.pool.example", "232.10.0.5", seed=16)
    with pytest.raises(
        BadRecord,
        match=re.escape("conflict: group 232.10.0.5 is already published as owner.pool.example."),
    ):
        publish(thief, server, ZONE, KEY, timeout=WAIT)
    moved = make("owner.pool.example", "232.10.0.6", seed=15)
    publish(moved, server, ZONE, KEY, timeout=WAIT)
    assert lookup_group("232.10.0.6", server, timeout=WAIT) == moved
    with pytest.raises(NamingError, match="NXDOMAIN"):
        lookup_group("232.10.0.5", server, timeout=WAIT)
    publish(thief, server, ZONE, KEY, timeout=WAIT)  # the old group is free again
    assert lookup_group("232.10.0.5", server, timeout=WAIT) == thief
    with pytest.raises(NamingError, match="outside zone"):
        publish(make("x.other.example", "232.10.0.7"), server, ZONE, KEY, timeout=WAIT)
    with pytest.raises(NamingError, match="REFUSED"):
        publish(make("x.other.example", "232.10.0.7"), server, "other.example.", KEY, timeout=WAIT)
    for rec in (moved, thief):
        withdraw(rec, server, ZONE, KEY, timeout=WAIT)


def test_answers_are_authoritative(server: tuple[str, int]) -> None:
    host, port = server

    def ask(name: str, rdtype: str) -> dns.message.Message:
        return dns.query.udp(dns.message.make_query(name, rdtype), host, timeout=WAIT, port=port)

    answer = ask(SEEDED.alias, "A")
    assert answer.flags & dns.flags.AA and answer.rcode() == dns.rcode.NOERROR
    missing = ask("missing.pool.example.", "A")
    assert missing.rcode() == dns.rcode.NXDOMAIN and missing.flags & dns.flags.AA
    assert missing.authority[0].rdtype == dns.rdatatype.SOA
    nodata = ask(SEEDED.alias, "MX")
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
    assert nodata.authority[0].rdtype == dns.rdatatype.SOA
    empty_non_terminal = ask("0.232.in-addr.arpa.", "PTR")
    assert empty_non_terminal.rcode() == dns.rcode.NOERROR and not empty_non_terminal.answer
    assert ask("elsewhere.example.", "A").rcode() == dns.rcode.REFUSED
    serial = ask(ZONE, "SOA").answer[0][0].serial
    publish(make("serial.pool.example", "232.10.0.8"), server, ZONE, KEY, timeout=WAIT)
    assert ask(ZONE, "SOA").answer[0][0].serial > serial
    withdraw("serial.pool.example", server, ZONE, KEY, timeout=WAIT)


def test_garbage_does_not_stop_the_server(server: tuple[str, int]) -> None:
    junk = [
        b"",
        b"\x00",
        os.urandom(11),
        os.urandom(12),
        os.urandom(100),
        b"\xff" * 512,
        bytes(12),
        b"\x12\x34\x01\x00\x00\x01" + bytes(6) + b"\x07garbage",
    ]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for packet in junk:
            udp.sendto(packet, server)
    for packet in junk[1:4]:
        with socket.create_connection(server, timeout=WAIT) as tcp:
            tcp.sendall(len(packet).to_bytes(2, "big") + packet)
    with socket.create_connection(server, timeout=WAIT) as tcp:
        tcp.sendall(b"\x01\x00abc")  # a frame cut short
    assert lookup_alias(SEEDED.alias, server, timeout=WAIT) == SEEDED


# embedded-server specifics -------------------------------------------------------------------


def test_embedded_counts_garbage_and_answers_formerr() -> None:
    with EmbeddedServer.for_pool(ZONE, [SEEDED], KEY) as srv:
        query = dns.message.make_query(SEEDED.alias, "A")
        wire = bytearray(query.to_wire())
        wire[5] = 2  # claims two questions, carries one
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.settimeout(WAIT)
            udp.sendto(bytes(wire), srv.address)
            reply, _ = udp.recvfrom(512)
            assert reply[:2] == wire[:2] and reply[3] & 0x0F == dns.rcode.FORMERR
            for size in (0, 5, 12, 300):
                udp.sendto(os.urandom(size), srv.address)
        assert lookup_alias(SEEDED.alias, srv.address, timeout=WAIT) == SEEDED
        assert srv.stats.garbage >= 2 and srv.stats.errors == 0


@pytest.mark.parametrize(
    ("record", "zone"),
    [(VIDEO, "232.in-addr.arpa."), (DUAL, "f.f.ip6.arpa.")],
    ids=["ipv4", "dual"],
)
def test_embedded_serves_what_it_is_given(record: PoolRecord, zone: str) -> None:
    """A zone with a tampered reverse key record is served as is, and lookups refuse it
    (for a dual-stack pool, by its alias and by either group)."""
    zones = pool_zones(ZONE, [record])
    p = base64.b64encode(record.public_key).decode()
    zones[zone] = zones[zone].replace(p, base64.b64encode(key_bytes(9)).decode())
    rev = re.escape(
        next(r for r in record.reverse_names if r.is_subdomain(dns.name.from_text(zone))).to_text()
    )
    with EmbeddedServer(zones, None) as srv:
        with pytest.raises(BadRecord, match=f"record mismatch: the key record at {rev}"):
            lookup_alias(record.alias, srv.address, timeout=WAIT)
        for group in record.groups:
            with pytest.raises(BadRecord, match=f"record mismatch: the key record at {rev}"):
                lookup_group(group, srv.address, timeout=WAIT)
        with pytest.raises(NamingError, match="refused"):  # no key: read-only
            publish(WEB, srv.address, ZONE, KEY, timeout=WAIT)
        with pytest.raises(NamingError, match=r"refused \(REFUSED\)"):
            publish(WEB, srv.address, ZONE, None, timeout=WAIT)


@pytest.mark.parametrize(
    ("record", "why"),
    [
        (VIDEO, "web.pool.example. has address 224.5.6.7, not 232.1.2.3"),
        (VIDEO6, "web.pool.example. has no AAAA record, not ff3e::8001:203"),
    ],
    ids=["ipv4", "ipv6"],
)
def test_a_reverse_name_naming_another_alias_is_refused(record: PoolRecord, why: str) -> None:
    """A router that knows only the group follows its PTR to an alias that does not
    have the group: a mismatch, whatever the alias's own record holds."""
    zones = pool_zones(ZONE, [record, WEB])
    zone = next(z for z in zones if record.reverse_name.is_subdomain(dns.name.from_text(z)))
    zones[zone] = zones[zone].replace(record.alias, WEB.alias)
    with EmbeddedServer(zones, None) as srv:
        with pytest.raises(BadRecord, match=re.escape(f"record mismatch: {why}")):
            lookup_group(record.group, srv.address, timeout=WAIT)
        with pytest.raises(BadRecord, match=r"record mismatch: .* points to web\.pool\.example\."):
            lookup_alias(record.alias, srv.address, timeout=WAIT)


def test_a_refused_forward_update_puts_the_reverse_side_back() -> None:
    with EmbeddedServer.for_pool(ZONE, [SEEDED], KEY) as srv:
        authority = srv.authority
        apply_update = authority._update

        def refuse_pool_zone(msg: dns.update.UpdateMessage) -> dns.message.Message:
            if msg.zone[0].name == dns.name.from_text(ZONE):
                reply = dns.message.make_response(msg)
                reply.set_rcode(dns.rcode.REFUSED)
                return reply
            return apply_update(msg)

        authority._update = refuse_pool_zone  # type: ignore[method-assign]
        fresh = make("fresh.pool.example", "232.10.0.9")
        with pytest.raises(NamingRefused, match=re.escape(f"update of {ZONE} refused (REFUSED)")):
            publish(fresh, srv.address, ZONE, KEY, timeout=WAIT)
        with pytest.raises(NamingError, match="NXDOMAIN"):
            lookup_group(fresh.group, srv.address, timeout=WAIT)
        rekeyed = make(SEEDED.alias, str(SEEDED.group), seed=99)
        with pytest.raises(NamingError, match="REFUSED"):
            asyncio.run(publish_async(rekeyed, srv.address, ZONE, KEY, timeout=WAIT))
        assert lookup_group(SEEDED.group, srv.address, timeout=WAIT) == SEEDED


def test_serve_coroutine() -> None:
    async def session() -> None:
        srv = await serve(ZONE, [SEEDED], "127.0.0.1", 0, KEY)
        try:
            assert await lookup_group_async(SEEDED.group, srv.address, timeout=WAIT) == SEEDED
        finally:
            await srv.close()

    asyncio.run(session())


def test_run_serves_until_sigterm(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from manycast.dns import run\n"
        "from manycast.naming import PoolRecord, TsigKey\n"
        f"rec = PoolRecord.create('seeded.pool.example', '232.0.0.9', 'a@b', bytes(range(32)))\n"
        f"run('{ZONE}', [rec], '127.0.0.1', 0, TsigKey.from_text('{KEY.to_text()}'),\n"
        "    ready=lambda s: print(s.port, flush=True))\n"
        "print('stopped', flush=True)\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            port = int(proc.stdout.readline())
            assert (
                lookup_alias("seeded.pool.example", ("127.0.0.1", port), timeout=WAIT).owner
                == "a@b"
            )
            proc.terminate()
            assert proc.stdout.readline().strip() == "stopped"
            assert proc.wait(WAIT) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


# lookups against broken servers -------------------------------------------------------------


class FakeServer:
    """A UDP socket on loopback answering every query with `answer(query_wire)` (or not at all)."""

    def __init__(self, answer: Callable[[bytes], bytes | None]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.address: tuple[str, int] = self.sock.getsockname()
        self.answer = answer
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.done.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            reply = self.answer(data)
            if reply is not None:
                self.sock.sendto(reply, peer)

    def __enter__(self) -> tuple[str, int]:
        self.thread.start()
        return self.address

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()
        self.sock.close()


def _with_rcode(rcode: dns.rcode.Rcode) -> Callable[[bytes], bytes]:
    def answer(wire: bytes) -> bytes:
        reply = dns.message.make_response(dns.message.from_wire(wire))
        reply.set_rcode(rcode)
        return reply.to_wire()

    return answer


def _truncated(wire: bytes) -> bytes:
    reply = dns.message.make_response(dns.message.from_wire(wire))
    reply.flags |= dns.flags.TC
    return reply.to_wire()


SILENT = 0.3  # the timeout a lookup of a silent server runs into


@pytest.mark.parametrize(
    ("answer", "kind", "why"),
    [
        (lambda wire: None, NamingTimeout, f"timeout after {SILENT:g}s asking 127.0.0.1:"),
        (
            lambda wire: wire[:2] + b"\x80\x00garbage",
            NamingError,
            "garbage answer from 127.0.0.1:",
        ),
        (lambda wire: wire[:2] + b"\x80\x00\x00\x01" + b"\xff" * 30, NamingError, "garbage answer"),
        (
            _with_rcode(dns.rcode.SERVFAIL),
            NamingRefused,
            r"server failure \(SERVFAIL\) for video.pool.example. A",
        ),
        (_with_rcode(dns.rcode.REFUSED), NamingRefused, r"\(REFUSED\)"),
        (
            _with_rcode(dns.rcode.NXDOMAIN),
            NamingRefused,
            r"not found: video.pool.example. .*\(NXDOMAIN\)",
        ),
        (_with_rcode(dns.rcode.NOERROR), NamingRefused, "no address record at video.pool.example."),
        # TC, then no TCP listener
        (_truncated, NamingError, "cannot ask 127.0.0.1:.* for video.pool.example. A"),
    ],
)
def test_lookup_failures(
    answer: Callable[[bytes], bytes | None], kind: type[NamingError], why: str
) -> None:
    """Each failure has its type. A server that answers is waited for as long as a busy
    machine needs (its answer ends the lookup, long before the deadline); a silent one
    runs into a short timeout, and the lookup gives up then rather than hang."""
    timeout = SILENT if kind is NamingTimeout else WAIT
    with FakeServer(answer) as address:
        started = time.monotonic()
        with pytest.raises(kind, match=why) as caught:
            lookup_alias(VIDEO.alias, address, timeout=timeout)
        assert time.monotonic() - started < timeout + WAIT
        assert type(caught.value) is kind
        with pytest.raises(kind, match=why.replace("video.pool.example.", ".*")) as caught:
            asyncio.run(lookup_alias_async(VIDEO.alias, address, timeout=timeout))
        assert type(caught.value) is kind


def test_bad_arguments() -> None:
    with pytest.raises(NamingError, match="an IP address is needed"):
        lookup_alias(VIDEO.alias, "dns.example")
    with pytest.raises(NamingError, match="bad server port"):
        lookup_alias(VIDEO.alias, ("127.0.0.1", 0))
    with pytest.raises(NamingError, match="not a multicast"):
        lookup_group("10.0.0.1", "127.0.0.1")
    with pytest.raises(NamingError, match=r"not a multicast address \(ff00::/8\)"):
        lookup_group("2001:db8::1", "127.0.0.1")
    with pytest.raises(NamingError, match="bad alias"):
        lookup_alias("bad alias", "127.0.0.1")


# knot specifics -----------------------------------------------------------------------------


@pytest.mark.skipif(not knot_available(), reason=KNOT_MISSING)
def test_knot_start_failure_reports_its_log(tmp_path: Path) -> None:
    busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    busy.bind(("127.0.0.1", 0))
    try:
        port = busy.getsockname()[1]
        knot = KnotServer.for_pool(ZONE, [], KEY, port=port, start_timeout=WAIT)
        with pytest.raises(DnsServerError, match=r"(?s)knotd exited .*its log:.*cannot bind"):
            knot.start()
        assert not knot.running and knot.workdir is None
    finally:
        busy.close()
    with pytest.raises(DnsServerError, match="its log"):
        KnotServer.for_pool(ZONE, [], KEY, knotd="/bin/false").start()


def test_knot_start_without_knotd_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("manycast.dns.knot.knotd_path", lambda: None)
    with pytest.raises(DnsServerError, match=re.escape(KNOT_MISSING)):
        KnotServer.for_pool(ZONE, [], KEY).start()
