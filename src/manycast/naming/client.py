"""Reading and publishing pool records on a DNS server: lookups, signed updates, withdrawal.

Publishing uses DNS UPDATE (RFC 2136) signed with TSIG (RFC 8945), one message
per zone, each guarded by prerequisites on what was read first, so a
concurrent change makes the update fail (`BadRecord`, "conflict: ...") instead
of being overwritten. Every call has a sync and an async form over the same
steps (see `transport`).
"""

from __future__ import annotations

import logging
from ipaddress import IPv4Address

import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdatatype
import dns.rdtypes.ANY.PTR
import dns.rdtypes.IN.A
import dns.rrset
import dns.tsig
import dns.update

from manycast.addressplan import (
    DEFAULT_PLAN,
    AddressPlan,
    BadRecord,
    NamingError,
    NamingRefused,
    multicast_address,
)
from manycast.naming.keyrecord import is_key_txt
from manycast.naming.records import (
    PTR,
    SOA,
    TXT,
    A,
    PoolRecord,
    a_rdata,
    assemble,
    dns_name,
    in_zone,
    one_group,
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

LOOKUP_TIMEOUT = 2.0
UPDATE_TIMEOUT = 5.0


# lookups ------------------------------------------------------------------------------


def _lookup_steps(start: dns.name.Name | IPv4Address, plan: AddressPlan) -> Steps[PoolRecord]:
    if isinstance(start, IPv4Address):
        rev = reverse_name(start)
        ops: list[Op] = [Query(rev, PTR), Query(rev, TXT)]
        ptr_answer, rtxt_answer = yield ops
        ptr, rtxt = answer_rrset(ptr_answer, ops[0]), answer_rrset(rtxt_answer, ops[1])
        alias = one_target(rev, ptr)
        ops = [Query(alias, A), Query(alias, TXT)]
        a_answer, txt_answer = yield ops
        a, txt = answer_rrset(a_answer, ops[0]), answer_rrset(txt_answer, ops[1])
        group = one_group(alias, a)
        if group != start:
            raise BadRecord(f"record mismatch: {alias} has address {group}, not {start}")
    else:
        alias = start
        ops = [Query(alias, A), Query(alias, TXT)]
        a_answer, txt_answer = yield ops
        a, txt = answer_rrset(a_answer, ops[0]), answer_rrset(txt_answer, ops[1])
        rev = reverse_name(one_group(alias, a))
        one_key(alias, txt)  # report a bad forward key before looking further
        ops = [Query(rev, PTR), Query(rev, TXT)]
        ptr_answer, rtxt_answer = yield ops
        ptr, rtxt = answer_rrset(ptr_answer, ops[0]), answer_rrset(rtxt_answer, ops[1])
    return assemble(alias, a, txt, ptr, rtxt, plan)


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
    group: IPv4Address | str,
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
    group: IPv4Address | str,
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
    alias: dns.name.Name, group: IPv4Address, key: dns.tsig.Key | None
) -> Steps[bool]:
    """Removes group's PTR and key record if they still name `alias`."""
    rev = reverse_name(group)
    ops: list[Op] = [Query(rev, PTR), Query(rev, TXT), Query(rev, SOA)]
    ptr_answer, txt_answer, soa_answer = yield ops
    ptr = answer_rrset(ptr_answer, ops[0], missing_ok=True)
    txt = answer_rrset(txt_answer, ops[1], missing_ok=True)
    if ptr is None or {r.target for r in ptr if isinstance(r, dns.rdtypes.ANY.PTR.PTR)} != {alias}:
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


def _publish_steps(
    record: PoolRecord,
    zone: dns.name.Name,
    key: dns.tsig.Key | None,
    reverse_zone: dns.name.Name | None,
    plan: AddressPlan,
) -> Steps[None]:
    plan.check(record.group, record.private)
    alias, rev, ttl = record.alias_name, record.reverse_name, record.ttl
    in_zone(alias, zone, "alias")
    if reverse_zone is not None:
        in_zone(rev, reverse_zone, "reverse name")
    ops: list[Op] = [Query(rev, PTR), Query(rev, TXT), Query(alias, A), Query(alias, TXT)]
    ops += [Query(rev, SOA)] if reverse_zone is None else []
    answers = yield ops
    ptr, rtxt, a, txt = (
        answer_rrset(ans, op, missing_ok=True) for ans, op in zip(answers[:4], ops[:4], strict=True)
    )
    rzone = reverse_zone or zone_of(answers[4], ops[4])
    owners = (
        set() if ptr is None else {r.target for r in ptr if isinstance(r, dns.rdtypes.ANY.PTR.PTR)}
    )
    if owners - {alias}:
        names = ", ".join(sorted(n.to_text() for n in owners))
        raise BadRecord(f"conflict: group {record.group} is already published as {names}")
    new_txt = txt_rdata(record.txt())
    new_ptr = ptr_rdata(alias)

    # Reverse side first: until the forward side follows, readers see a mismatch.
    up = _update(rzone, key)
    _guard(up, rev, PTR, ptr)
    _guard(up, rev, TXT, rtxt)
    up.replace(rev, ttl, new_ptr)
    for rdata in _key_txts(rtxt):
        up.delete(rev, rdata)
    up.add(rev, ttl, new_txt)
    (answer,) = yield [Update(up)]
    _check_update(answer, rzone, key is not None)

    up = _update(zone, key)
    _guard(up, alias, A, a)
    _guard(up, alias, TXT, txt)
    up.replace(alias, ttl, a_rdata(record.group))
    for rdata in _key_txts(txt):
        up.delete(alias, rdata)
    up.add(alias, ttl, new_txt)
    try:
        (answer,) = yield [Update(up)]
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
            (undo,) = yield [Update(back)]
            _check_update(undo, rzone, key is not None)
        except NamingError as undo_exc:
            raise type(exc)(f"{exc}; the reverse records stay published: {undo_exc}") from None
        raise

    old = set() if a is None else {r.address for r in a if isinstance(r, dns.rdtypes.IN.A.A)}
    for address in sorted(old - {str(record.group)}):
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


def _withdraw_steps(
    alias: dns.name.Name, zone: dns.name.Name, key: dns.tsig.Key | None
) -> Steps[None]:
    in_zone(alias, zone, "alias")
    ops: list[Op] = [Query(alias, A), Query(alias, TXT)]
    a_answer, txt_answer = yield ops
    a = answer_rrset(a_answer, ops[0], missing_ok=True)
    txt = answer_rrset(txt_answer, ops[1], missing_ok=True)
    if a is None:
        raise NamingRefused(f"not found: {alias} has no address record")
    up = _update(zone, key)
    _guard(up, alias, A, a)
    _guard(up, alias, TXT, txt)
    up.delete(alias, A)
    for rdata in _key_txts(txt):
        up.delete(alias, rdata)
    (answer,) = yield [Update(up)]
    _check_update(answer, zone, key is not None)
    for rdata in a:
        assert isinstance(rdata, dns.rdtypes.IN.A.A)
        try:
            group = multicast_address(rdata.address, "address record")
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


def publish(
    record: PoolRecord,
    server: Server,
    zone: str,
    keyring: Keyring | None,
    *,
    reverse_zone: str | None = None,
    timeout: float = UPDATE_TIMEOUT,
    plan: AddressPlan = DEFAULT_PLAN,
) -> None:
    """Publishes (or replaces) a record with two signed UPDATEs: reverse zone, then `zone`.

    The reverse zone is found by asking the server for the SOA of the reverse
    name unless given. A group already published under another alias is
    refused; moving an alias to a new group removes the old group's reverse
    records. `keyring=None` sends unsigned updates (which servers refuse).
    """
    rzone = _zone_arg(reverse_zone) if reverse_zone else None
    steps = _publish_steps(record, _zone_arg(zone), dns_key(keyring), rzone, plan)
    drive(steps, server, timeout)


async def publish_async(
    record: PoolRecord,
    server: Server,
    zone: str,
    keyring: Keyring | None,
    *,
    reverse_zone: str | None = None,
    timeout: float = UPDATE_TIMEOUT,
    plan: AddressPlan = DEFAULT_PLAN,
) -> None:
    rzone = _zone_arg(reverse_zone) if reverse_zone else None
    steps = _publish_steps(record, _zone_arg(zone), dns_key(keyring), rzone, plan)
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
    """Removes an alias's A and key record, then its group's PTR and key record."""
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
