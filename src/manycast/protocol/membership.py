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
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from manycast.space import Portion, PortionSet
from manycast.wire.membership import GroupRecord, MaskPair, RecordType

_FULL = 0xFFFFFFFF
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

    def portions(self) -> PortionSet:
        return PortionSet(
            tuple(Portion(4, v, m) for v, m in self.include),
            tuple(Portion(4, v, m) for v, m in self.exclude),
        )

    def __str__(self) -> str:
        return str(self.portions()) if self.include != ((0, 0),) or self.exclude else "any source"


def record_for(
    group: ipaddress.IPv4Address, portions: PortionSet, record_type: RecordType
) -> GroupRecord:
    """A group record naming `portions` as include and exclude masks."""
    return GroupRecord(
        record_type,
        group,
        include_masks=tuple(MaskPair(p.value, p.mask) for p in portions.include),
        exclude_masks=tuple(MaskPair(p.value, p.mask) for p in portions.exclude),
    )


def any_source_record(group: ipaddress.IPv4Address, record_type: RecordType) -> GroupRecord:
    """An any-source join (EXCLUDE mode, nothing excluded) or, with an include type, a leave."""
    return GroupRecord(record_type, group)


def _filter_of(record: GroupRecord) -> SourceFilter | None:
    pinned = tuple((int(s), _FULL) for s in record.sources)
    masks_in = tuple((p.value, p.mask) for p in record.include_masks)
    masks_out = tuple((p.value, p.mask) for p in record.exclude_masks)
    if record.record_type in _EXCLUDE_TYPES:
        return SourceFilter(((0, 0), *masks_in), pinned + masks_out)
    include = pinned + masks_in
    return SourceFilter(include, masks_out) if include else None


def changes(
    records: Iterable[GroupRecord],
) -> Iterator[tuple[ipaddress.IPv4Address, SourceFilter | None]]:
    """(group, new filter or None for a leave) for each group a report touches."""
    outcome: dict[ipaddress.IPv4Address, SourceFilter | None] = {}
    joined: set[ipaddress.IPv4Address] = set()
    for record in records:
        group = record.group
        if not isinstance(group, ipaddress.IPv4Address):
            continue
        if record.record_type == RecordType.BLOCK_OLD_SOURCES:
            if group not in joined:
                outcome[group] = None
            continue
        outcome[group] = _filter_of(record)
        joined.add(group)
    yield from outcome.items()
