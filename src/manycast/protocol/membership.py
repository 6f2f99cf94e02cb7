"""Masked source-specific membership: what each member asked for, and who gets a packet.

A member (a server, identified by its unicast address: the `requester` of its
join) holds, per group, one *filter*: include value/mask pairs minus exclude
pairs (Fig 7C), or "any source" for an any-source join (the control channel).
A report's records change the member's filter as one step (claim 3: a server
leaves old portions and joins new ones together):

* MODE_IS_INCLUDE, CHANGE_TO_INCLUDE_MODE, ALLOW_NEW_SOURCES: the filter becomes
  the record's sources and include masks, minus its exclude masks; empty means leave.
* MODE_IS_EXCLUDE, CHANGE_TO_EXCLUDE_MODE: any source except the record's
  sources and exclude masks.
* BLOCK_OLD_SOURCES: leave, unless the same report also carries one of the above
  for the group, which then wins (a leave-and-join in one message).

Adjacent records of one type for one group count as one record, their sources
and pairs taken together: that is how a record cut over the parts of a split
report (`wire/report_split.py`) reads once the router has every part
(`reassembly.py`). `report_packets` sends a report that way.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from manycast.auth import sign_join
from manycast.space import Portion, PortionSet
from manycast.wire.ip import Address
from manycast.wire.membership import (
    GroupRecord,
    IGMPv3Report,
    MaskPair,
    MLDv2Report,
    RecordType,
    SignedJoin,
    igmp_packet,
    mld_packet,
    signed_join_length,
)
from manycast.wire.report_split import IGMP_BUDGET, MLD_BUDGET, WholeRecord, split_records

_FULL = 0xFFFFFFFF
_FULL_V6 = (1 << 128) - 1
_INCLUDE_TYPES = (
    RecordType.MODE_IS_INCLUDE,
    RecordType.CHANGE_TO_INCLUDE_MODE,
    RecordType.ALLOW_NEW_SOURCES,
)
_EXCLUDE_TYPES = (RecordType.MODE_IS_EXCLUDE, RecordType.CHANGE_TO_EXCLUDE_MODE)


@dataclass(frozen=True, slots=True)
class SourceFilter:
    """Sources `s` with some include pair matching and no exclude pair matching."""

    include: tuple[tuple[int, int], ...]
    exclude: tuple[tuple[int, int], ...] = ()

    @classmethod
    def any_source(cls) -> SourceFilter:
        return cls(((0, 0),))

    @classmethod
    def of(cls, portions: PortionSet) -> SourceFilter:
        return cls(
            tuple((p.value, p.mask) for p in portions.include),
            tuple((p.value, p.mask) for p in portions.exclude),
        )

    def matches(self, source: int) -> bool:
        for value, mask in self.include:
            if source & mask == value:
                break
        else:
            return False
        return all(source & mask != value for value, mask in self.exclude)

    @property
    def empty(self) -> bool:
        return not self.include

    def portions(self, family: int = 4) -> PortionSet:
        return PortionSet(
            tuple(Portion(family, v, m) for v, m in self.include),
            tuple(Portion(family, v, m) for v, m in self.exclude),
        )

    def describe(self, family: int = 4) -> str:
        """The filter as portions of `family` addresses, or "any source"."""
        if self.include == ((0, 0),) and not self.exclude:
            return "any source"
        return str(self.portions(family))

    def owns(self, address: Address) -> bool:
        """Whether the source `address` (of this filter's family) is ours."""
        return self.matches(int(address))

    def __str__(self) -> str:
        return self.describe()


@dataclass(frozen=True, slots=True)
class FamilyFilters:
    """What a dual-stack pool's server serves: its buckets as a filter in each family."""

    v4: SourceFilter | None
    v6: SourceFilter | None

    def owns(self, address: Address) -> bool:
        held = self.v4 if address.version == 4 else self.v6
        return held is not None and held.matches(int(address))


# What a server holds, for its technique: one family's filter, or a dual-stack pool's.
Held = SourceFilter | FamilyFilters


def record_for(group: Address, portions: PortionSet, record_type: RecordType) -> GroupRecord:
    """A group record naming `portions` as include and exclude masks (as many as one
    extension TLV holds; `whole_record_for` has no such limit)."""
    whole = whole_record_for(group, portions, record_type)
    return GroupRecord(
        record_type, group, include_masks=whole.include_masks, exclude_masks=whole.exclude_masks
    )


def whole_record_for(group: Address, portions: PortionSet, record_type: RecordType) -> WholeRecord:
    """`record_for` of any length, for `report_packets` to cut."""
    return WholeRecord(
        record_type,
        group,
        include_masks=tuple(MaskPair(p.value, p.mask) for p in portions.include),
        exclude_masks=tuple(MaskPair(p.value, p.mask) for p in portions.exclude),
    )


def any_source_record(group: Address, record_type: RecordType) -> GroupRecord:
    """An any-source join (EXCLUDE mode, nothing excluded) or, with an include type, a leave."""
    return GroupRecord(record_type, group)


ED25519_SIGNATURE = 64  # bytes (RFC 8032)
RANDOM_KEY = 8  # bytes of a join's random key


def report_packets(
    records: Sequence[GroupRecord | WholeRecord],
    requester: Address,
    wall_ms: int,
    generation: int,
    rng: random.Random,
    key: Ed25519PrivateKey | None = None,
) -> list[bytes]:
    """One report as the IGMPv3 (or, from an IPv6 requester, MLDv2) packets a host
    sends, each within the link MTU.

    The records are cut over as many reports as needed (`split_records`), parts 0
    to n - 1 of the requester's report `generation`. Each part has its own signed
    join: the timestamp `wall_ms`, a random key of its own from `rng` (so that no
    part is a copy of another to a router's replay cache), and, with `key`, its own
    signature.
    """
    signature = ED25519_SIGNATURE if key is not None else 0
    trailer = 4 + signed_join_length(requester, RANDOM_KEY, signature)
    v6 = isinstance(requester, ipaddress.IPv6Address)
    pieces = split_records(records, MLD_BUDGET if v6 else IGMP_BUDGET, trailer)
    packets = []
    for part, piece in enumerate(pieces):
        signed = SignedJoin(
            wall_ms, requester, rng.randbytes(RANDOM_KEY), b"", generation, part, len(pieces)
        )
        if isinstance(requester, ipaddress.IPv6Address):
            mld = MLDv2Report(piece, signed)
            if key is not None:
                mld = sign_join(mld, key)
            packets.append(mld_packet(mld, requester).to_wire())
        else:
            igmp = IGMPv3Report(piece, signed)
            if key is not None:
                igmp = sign_join(igmp, key)
            packets.append(igmp_packet(igmp, requester).to_wire())
    return packets


def _filter_of(records: Sequence[GroupRecord]) -> SourceFilter | None:
    """The filter of a record, given as its pieces (one or more records of one type)."""
    pinned = tuple(
        (int(s), _FULL if s.version == 4 else _FULL_V6) for r in records for s in r.sources
    )
    masks_in = tuple((p.value, p.mask) for r in records for p in r.include_masks)
    masks_out = tuple((p.value, p.mask) for r in records for p in r.exclude_masks)
    if records[0].record_type in _EXCLUDE_TYPES:
        return SourceFilter(((0, 0), *masks_in), pinned + masks_out)
    include = pinned + masks_in
    return SourceFilter(include, masks_out) if include else None


def _runs(
    records: Iterable[GroupRecord],
) -> Iterator[tuple[Address, list[GroupRecord]]]:
    """The records in order, adjacent records of one type for one group together (a
    report carries one family: IGMPv3 IPv4, MLDv2 IPv6)."""
    run: list[GroupRecord] = []
    for record in records:
        if run and (record.record_type, record.group) != (run[0].record_type, run[0].group):
            yield run[0].group, run
            run = []
        run.append(record)
    if run:
        yield run[0].group, run


def changes(
    records: Iterable[GroupRecord],
) -> Iterator[tuple[Address, SourceFilter | None]]:
    """(group, new filter or None for a leave) for each group a report touches."""
    outcome: dict[Address, SourceFilter | None] = {}
    joined: set[Address] = set()
    for group, run in _runs(records):
        if run[0].record_type == RecordType.BLOCK_OLD_SOURCES:
            if group not in joined:
                outcome[group] = None
            continue
        outcome[group] = _filter_of(run)
        joined.add(group)
    yield from outcome.items()
