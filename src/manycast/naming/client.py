"""Reading and publishing pool records on a DNS server: lookups, signed updates, withdrawal.

Publishing uses DNS UPDATE (RFC 2136) signed with TSIG (RFC 8945), one message
per zone, each guarded by prerequisites on what was read first, so a
concurrent change makes the update fail (`BadRecord`, "conflict: ...") instead
of being overwritten. Every call has a sync and an async form over the same
steps (see `transport`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import TypeVar

import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdatatype
import dns.rdtypes.ANY.PTR
import dns.rrset
import dns.tsig
import dns.update

from manycast.addressplan import (
    DEFAULT_PLAN,
    AddressPlan,
    BadRecord,
    Group,
    NamingError,
    NamingRefused,
    multicast_address,
)
from manycast.naming.keyrecord import is_key_txt
from manycast.naming.records import (
    ADDRESS_TYPES,
    PTR,
    SOA,
    TXT,
    PoolRecord,
    ReverseRRsets,
    a_rdata,
    address_type,
    alias_groups,
    assemble,
    dns_name,
    in_zone,
    one_key,
    one_target,
    ptr_rdata,
    reverse_name,
    txt_bytes,
    txt_rdata,
)
from manycast.naming.transport import (
    Op,
    Query,
    Server,
    Steps,
    Update,
    answer_rrset,
    drive,
    drive_async,
    update_refusal,
    zone_of,
)
from manycast.naming.tsig import Keyring, dns_key

__all__ = [
    "LOOKUP_TIMEOUT",
    "UPDATE_TIMEOUT",
    "lookup_alias",
    "lookup_alias_async",
    "lookup_group",
    "lookup_group_async",
    "publish",
    "publish_async",
    "withdraw",
    "withdraw_async",
]

_log = logging.getLogger(__name__)

T = TypeVar("T")

LOOKUP_TIMEOUT = 2.0
UPDATE_TIMEOUT = 5.0


# lookups ------------------------------------------------------------------------------


def _reverse_ops(groups: Iterable[Group]) -> list[Op]:
    return [Query(reverse_name(g), t) for g in groups for t in (PTR, TXT)]


def _reverse_answers(
    ops: list[Op], answers: list[dns.message.Message]
) -> dict[dns.name.Name, ReverseRRsets]:
    """PTR and TXT by reverse name, from the answers to `_reverse_ops`."""
    found = [answer_rrset(ans, op) for ans, op in zip(answers, ops, strict=True)]
    names = [op.name for op in ops[::2] if isinstance(op, Query)]
    return {name: (found[2 * i], found[2 * i + 1]) for i, name in enumerate(names)}


def _alias_ops(alias: dns.name.Name) -> list[Op]:
    return [*(Query(alias, t) for t in ADDRESS_TYPES), Query(alias, TXT)]


def _lookup_steps(start: dns.name.Name | Group, plan: AddressPlan) -> Steps[PoolRecord]:
    """By alias: its A, AAAA and TXT, then each group's reverse name. By group: its
    reverse name first, then the alias it names, then the alias's other group."""
    reverse: dict[dns.name.Name, ReverseRRsets] = {}
    if isinstance(start, IPv4Address | IPv6Address):
        ops = _reverse_ops([start])
        reverse.update(_reverse_answers(ops, (yield ops)))
        rev = reverse_name(start)
        alias = one_target(rev, reverse[rev][0])
    else:
        alias = start
    ops = _alias_ops(alias)
    answers = yield ops
    *addresses, txt = (answer_rrset(ans, op) for ans, op in zip(answers, ops, strict=True))
    groups = alias_groups(alias, addresses)
    if isinstance(start, IPv4Address | IPv6Address) and start not in groups:
        kind = dns.rdatatype.to_text(address_type(start))
        same = [str(g) for g in groups if g.version == start.version]
        has = f"has address {same[0]}" if same else f"has no {kind} record"
        raise BadRecord(f"record mismatch: {alias} {has}, not {start}")
    one_key(alias, txt)  # report a bad forward key before looking further
    ops = _reverse_ops(g for g in groups if reverse_name(g) not in reverse)
    if ops:
        reverse.update(_reverse_answers(ops, (yield ops)))
    return assemble(alias, addresses, txt, reverse, plan)


def lookup_alias(
    alias: str,
    server: Server,
    *,
    timeout: float = LOOKUP_TIMEOUT,
    plan: AddressPlan = DEFAULT_PLAN,
) -> PoolRecord:
    """The whole record for an alias (Fig 4), checked both ways; `timeout` bounds the lookup."""
    return drive(_lookup_steps(dns_name(alias, "alias"), plan), server, timeout)


def lookup_group(
    group: Group | str,
    server: Server,
    *,
    timeout: float = LOOKUP_TIMEOUT,
    plan: AddressPlan = DEFAULT_PLAN,
) -> PoolRecord:
    """The whole record for a group address, found through its reverse name."""
    return drive(_lookup_steps(multicast_address(group), plan), server, timeout)


async def lookup_alias_async(
    alias: str,
    server: Server,
    *,
    timeout: float = LOOKUP_TIMEOUT,
    plan: AddressPlan = DEFAULT_PLAN,
) -> PoolRecord:
    return await drive_async(_lookup_steps(dns_name(alias, "alias"), plan), server, timeout)


async def lookup_group_async(
    group: Group | str,
    server: Server,
    *,
    timeout: float = LOOKUP_TIMEOUT,
    plan: AddressPlan = DEFAULT_PLAN,
) -> PoolRecord:
    return await drive_async(_lookup_steps(multicast_address(group), plan), server, timeout)


# publishing ---------------------------------------------------------------------------


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
    return [] if rrset is None else [r for r in rrset if is_key_txt(txt_bytes(r))]


def _check_update(answer: dns.message.Message, zone: dns.name.Name, signed: bool) -> None:
    if answer.rcode() != dns.rcode.NOERROR:
        raise update_refusal(answer.rcode(), zone, "" if signed else "the update was not signed")


def _drop_reverse_steps(
    alias: dns.name.Name, group: Group, key: dns.tsig.Key | None
) -> Steps[bool]:
    """Removes group's PTR and key record if they still name `alias`."""
    rev = reverse_name(group)
    ops: list[Op] = [Query(rev, PTR), Query(rev, TXT), Query(rev, SOA)]
    ptr_answer, txt_answer, soa_answer = yield ops
    ptr = answer_rrset(ptr_answer, ops[0], missing_ok=True)
    txt = answer_rrset(txt_answer, ops[1], missing_ok=True)
    if ptr is None or _targets(ptr) != {alias}:
        return False
    zone = zone_of(soa_answer, ops[2])
    up = _update(zone, key)
    _guard(up, rev, PTR, ptr)
    up.delete(rev, PTR)
    for rdata in _key_txts(txt):
        up.delete(rev, rdata)
    (answer,) = yield [Update(up)]
    _check_update(answer, zone, key is not None)
    return True


def _targets(ptr: dns.rrset.RRset | None) -> set[dns.name.Name]:
    return (
        set() if ptr is None else {r.target for r in ptr if isinstance(r, dns.rdtypes.ANY.PTR.PTR)}
    )


def _addresses(rrset: dns.rrset.RRset | None) -> list[str]:
    return [] if rrset is None else [str(r.address) for r in rrset if hasattr(r, "address")]


@dataclass
class _Reverse:
    """One reverse name of a record being published: what was read there, and its zone."""

    group: Group
    name: dns.name.Name
    zone: dns.name.Name
    ptr: dns.rrset.RRset | None
    txt: dns.rrset.RRset | None

    def update(
        self, key: dns.tsig.Key | None, new_ptr: dns.rdata.Rdata, new_txt: dns.rdata.Rdata, ttl: int
    ) -> dns.update.UpdateMessage:
        up = _update(self.zone, key)
        _guard(up, self.name, PTR, self.ptr)
        _guard(up, self.name, TXT, self.txt)
        up.replace(self.name, ttl, new_ptr)
        for rdata in _key_txts(self.txt):
            up.delete(self.name, rdata)
        up.add(self.name, ttl, new_txt)
        return up

    def undo(
        self, key: dns.tsig.Key | None, new_ptr: dns.rdata.Rdata, new_txt: dns.rdata.Rdata, ttl: int
    ) -> dns.update.UpdateMessage:
        """Puts the name back as it was read, if it is still ours."""
        back = _update(self.zone, key)
        back.present(self.name, new_ptr)
        back.delete(self.name, PTR)
        back.delete(self.name, new_txt)
        for rdata in () if self.ptr is None else self.ptr:
            back.add(self.name, self.ptr.ttl if self.ptr else ttl, rdata)
        for rdata in _key_txts(self.txt):
            back.add(self.name, self.txt.ttl if self.txt else ttl, rdata)
        return back


def _reverse_zones_arg(
    record: PoolRecord, reverse_zones: Sequence[dns.name.Name]
) -> list[dns.name.Name | None]:
    """The given zone of each reverse name (None: ask the server for its SOA)."""
    if not reverse_zones:
        return [None] * len(record.groups)
    zones: list[dns.name.Name | None] = []
    for rev in record.reverse_names:
        found = next((z for z in reverse_zones if rev.is_subdomain(z)), None)
        if found is None:
            in_zone(rev, reverse_zones[0], "reverse name")  # raises, naming the zone
        zones.append(found)
    return zones


def _publish_steps(
    record: PoolRecord,
    zone: dns.name.Name,
    key: dns.tsig.Key | None,
    reverse_zones: Sequence[dns.name.Name],
    plan: AddressPlan,
) -> Steps[None]:
    for group in record.groups:
        plan.check(group, record.private)
    alias, ttl = record.alias_name, record.ttl
    in_zone(alias, zone, "alias")
    given = _reverse_zones_arg(record, reverse_zones)
    ops: list[Op] = [*_alias_ops(alias)]
    for rev, rzone in zip(record.reverse_names, given, strict=True):
        ops += [Query(rev, PTR), Query(rev, TXT)] + ([Query(rev, SOA)] if rzone is None else [])
    answers = iter(zip((yield ops), ops, strict=True))
    *addresses, txt = (answer_rrset(ans, op, missing_ok=True) for ans, op in _take(answers, 3))
    reverses: list[_Reverse] = []
    for group, rev, rzone in zip(record.groups, record.reverse_names, given, strict=True):
        ptr, rtxt = (answer_rrset(ans, op, missing_ok=True) for ans, op in _take(answers, 2))
        if rzone is None:
            rzone = zone_of(*next(answers))
        reverses.append(_Reverse(group, rev, rzone, ptr, rtxt))
    for rv in reverses:
        owners = _targets(rv.ptr) - {alias}
        if owners:
            names = ", ".join(sorted(n.to_text() for n in owners))
            raise BadRecord(f"conflict: group {rv.group} is already published as {names}")
    new_txt = txt_rdata(record.txt())
    new_ptr = ptr_rdata(alias)

    # Reverse side first: until the forward side follows, readers see a mismatch.
    done: list[_Reverse] = []
    try:
        for rv in reverses:
            (answer,) = yield [Update(rv.update(key, new_ptr, new_txt, ttl))]
            _check_update(answer, rv.zone, key is not None)
            done.append(rv)
        up = _update(zone, key)
        for rdtype, rrset in zip(ADDRESS_TYPES, addresses, strict=True):
            _guard(up, alias, rdtype, rrset)
            ours = [g for g in record.groups if address_type(g) == rdtype]
            if ours:
                up.replace(alias, ttl, a_rdata(ours[0]))
            elif rrset is not None:
                up.delete(alias, rdtype)  # a dual-stack pool that now has one family
        _guard(up, alias, TXT, txt)
        for rdata in _key_txts(txt):
            up.delete(alias, rdata)
        up.add(alias, ttl, new_txt)
        (answer,) = yield [Update(up)]
        _check_update(answer, zone, key is not None)
    except NamingError as exc:
        # Put the reverse names back as they were, if they are still ours.
        for rv in reversed(done):
            try:
                (undo,) = yield [Update(rv.undo(key, new_ptr, new_txt, ttl))]
                _check_update(undo, rv.zone, key is not None)
            except NamingError as undo_exc:
                raise type(exc)(f"{exc}; the reverse records stay published: {undo_exc}") from None
        raise

    new = {str(g) for g in record.groups}
    old = [a for rrset in addresses for a in _addresses(rrset) if a not in new]
    for address in sorted(old):
        try:
            yield from _drop_reverse_steps(alias, multicast_address(address, "old address"), key)
        except NamingError as exc:
            _log.warning(
                "published %s; the reverse records of its old group %s remain: %s",
                alias,
                address,
                exc,
            )
    return None


def _take(items: Iterator[T], count: int) -> list[T]:
    return [next(items) for _ in range(count)]


def _withdraw_steps(
    alias: dns.name.Name, zone: dns.name.Name, key: dns.tsig.Key | None
) -> Steps[None]:
    in_zone(alias, zone, "alias")
    ops = _alias_ops(alias)
    answers = yield ops
    *addresses, txt = (
        answer_rrset(ans, op, missing_ok=True) for ans, op in zip(answers, ops, strict=True)
    )
    if not any(addresses):
        raise NamingRefused(f"not found: {alias} has no address record")
    up = _update(zone, key)
    for rdtype, rrset in zip(ADDRESS_TYPES, addresses, strict=True):
        _guard(up, alias, rdtype, rrset)
        if rrset is not None:
            up.delete(alias, rdtype)
    _guard(up, alias, TXT, txt)
    for rdata in _key_txts(txt):
        up.delete(alias, rdata)
    (answer,) = yield [Update(up)]
    _check_update(answer, zone, key is not None)
    for address in (a for rrset in addresses for a in _addresses(rrset)):
        try:
            group = multicast_address(address, "address record")
        except NamingError:
            continue  # not ours to clean: no reverse record was ever published for it
        try:
            yield from _drop_reverse_steps(alias, group, key)
        except NamingError as exc:
            raise type(exc)(
                f"withdrew {alias}; the reverse records of {group} remain: {exc}"
            ) from None
    return None


def _zone_arg(zone: str) -> dns.name.Name:
    return dns_name(zone, "zone")


def _reverse_zone_args(reverse_zone: str | Sequence[str] | None) -> list[dns.name.Name]:
    if not reverse_zone:
        return []
    given = [reverse_zone] if isinstance(reverse_zone, str) else list(reverse_zone)
    return [dns_name(z, "reverse zone") for z in given]


def publish(
    record: PoolRecord,
    server: Server,
    zone: str,
    keyring: Keyring | None,
    *,
    reverse_zone: str | Sequence[str] | None = None,
    timeout: float = UPDATE_TIMEOUT,
    plan: AddressPlan = DEFAULT_PLAN,
) -> None:
    """Publishes (or replaces) a record with signed UPDATEs: each reverse zone, then `zone`.

    A dual-stack record has two reverse names (in-addr.arpa. and ip6.arpa.),
    each updated in its zone before the alias. The reverse zones are found by
    asking the server for the SOA of each reverse name unless given
    (`reverse_zone`: one zone, or one per family). A group already published
    under another alias is refused; moving an alias to new groups removes its
    old groups' reverse records. `keyring=None` sends unsigned updates (which
    servers refuse).
    """
    rzones = _reverse_zone_args(reverse_zone)
    steps = _publish_steps(record, _zone_arg(zone), dns_key(keyring), rzones, plan)
    drive(steps, server, timeout)


async def publish_async(
    record: PoolRecord,
    server: Server,
    zone: str,
    keyring: Keyring | None,
    *,
    reverse_zone: str | Sequence[str] | None = None,
    timeout: float = UPDATE_TIMEOUT,
    plan: AddressPlan = DEFAULT_PLAN,
) -> None:
    rzones = _reverse_zone_args(reverse_zone)
    steps = _publish_steps(record, _zone_arg(zone), dns_key(keyring), rzones, plan)
    await drive_async(steps, server, timeout)


def _alias_of(record: PoolRecord | str) -> dns.name.Name:
    return record.alias_name if isinstance(record, PoolRecord) else dns_name(record, "alias")


def withdraw(
    record: PoolRecord | str,
    server: Server,
    zone: str,
    keyring: Keyring | None,
    *,
    timeout: float = UPDATE_TIMEOUT,
) -> None:
    """Removes an alias's A, AAAA and key record, then its groups' PTR and key records."""
    drive(_withdraw_steps(_alias_of(record), _zone_arg(zone), dns_key(keyring)), server, timeout)


async def withdraw_async(
    record: PoolRecord | str,
    server: Server,
    zone: str,
    keyring: Keyring | None,
    *,
    timeout: float = UPDATE_TIMEOUT,
) -> None:
    steps = _withdraw_steps(_alias_of(record), _zone_arg(zone), dns_key(keyring))
    await drive_async(steps, server, timeout)
