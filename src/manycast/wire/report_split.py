"""A membership report cut into reports that each fit one packet (RFC 3376 §4.2.16).

RFC 3376 §4.2.16 (and RFC 3810 §5.2.15): group records that do not fit in one
report go in as many reports as needed, and a record with too many sources to
fit is cut into several records of the same type, each in its own report.
Manycast's records also carry value/mask pairs (the GROUP MASKS extension, one
TLV per record), and a server whose portions are fragmented names thousands of
them (a space of 65 536 buckets cut by hundreds of reallocations): a record's
pairs are cut the same way.

A record's pieces keep its order: its sources, then its include pairs, then its
exclude pairs, each piece a consecutive run of that list, and the pieces follow
one another at the end of one report and the start of the next. So the records
of all the parts, each piece joined to the next piece of the same record, are
the original records again; a router acts on a split report only once it has
every part (`protocol/reassembly.py`), so a piece need not mean anything on its
own (a piece of exclude pairs alone is not a leave). For the same reason an
EXCLUDE-mode record is cut like the others, where RFC 3376 would send it
truncated, its other sources unreported: nothing is lost here.

A record that fits whole in an empty report is never cut; a longer one fills
what is left of the current report first, so the parts are as few as the
budget allows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from manycast.wire.ip import Address
from manycast.wire.membership import GroupRecord, MaskPair, RecordType

# Reports leave with Don't Fragment set (as Linux sends IGMP) and link-local, so a
# report must fit the link's MTU: 1500 bytes, Ethernet's, the smallest MTU of the
# links manycast runs on (veth pairs and the overlay's loopback UDP allow more).
LINK_MTU = 1500
IGMP_BUDGET = LINK_MTU - 24  # IPv4 header with the 4-byte Router Alert option
MLD_BUDGET = LINK_MTU - 48  # IPv6 header and the 8-byte Hop-by-Hop Router Alert

REPORT_HEADER = 8  # type, reserved, checksum, flags, number of records
_TLV_HEAD = 4  # type, length
_MASKS_HEAD = 4  # record index, include count (then the group)


@dataclass(frozen=True, slots=True)
class WholeRecord:
    """A group record of any length, before `split_records` cuts it into
    `GroupRecord`s that fit (a `GroupRecord` must fit one extension TLV)."""

    record_type: RecordType
    group: Address
    sources: tuple[Address, ...] = ()
    include_masks: tuple[MaskPair, ...] = ()
    exclude_masks: tuple[MaskPair, ...] = ()
    aux: bytes = b""


def piece_length(width: int, aux: int, sources: int, pairs: int) -> int:
    """Bytes a record with that many sources and pairs takes in a report, its
    GROUP MASKS TLV included (addresses `width` bytes long)."""
    length = 4 + width + aux + sources * width
    if pairs:
        length += _TLV_HEAD + _MASKS_HEAD + width + pairs * 2 * width
    return length


def split_records(
    records: Sequence[GroupRecord | WholeRecord], budget: int, trailer: int = 0
) -> list[tuple[GroupRecord, ...]]:
    """The records cut into parts, each a report of at most `budget` bytes when it
    carries a trailer of `trailer` bytes (the SIGNED JOIN TLV, header included).

    One part, with the records unchanged, when they fit. ValueError when the budget
    cannot hold even the smallest piece of some record.
    """
    parts: list[tuple[GroupRecord, ...]] = []
    current: list[GroupRecord] = []
    empty = budget - REPORT_HEADER - trailer  # room in a report with no record yet
    room = empty
    for record in records:
        width = record.group.max_prefixlen // 8
        aux = len(record.aux)
        sources = tuple(record.sources)
        includes, excludes = tuple(record.include_masks), tuple(record.exclude_masks)
        pairs = includes + excludes
        smallest = piece_length(
            width, aux, 1 if sources else 0, 0 if sources else min(1, len(pairs))
        )
        if smallest > empty:
            raise ValueError(
                f"a report budget of {budget} bytes cannot hold a record for {record.group}"
            )
        s = p = 0  # the sources and pairs already placed
        while True:
            left_s, left_p = len(sources) - s, len(pairs) - p
            whole = piece_length(width, aux, left_s, left_p)
            if whole <= room:
                take_s, take_p = left_s, left_p
            elif s == p == 0 and whole <= empty and current:
                parts.append(tuple(current))  # kept whole, in the next report
                current, room = [], empty
                continue
            else:
                take_s, take_p = _head(room, width, aux, left_s, left_p)
                if take_s + take_p == 0:
                    parts.append(tuple(current))
                    current, room = [], empty
                    continue
            current.append(
                GroupRecord(
                    record.record_type,
                    record.group,
                    sources[s : s + take_s],
                    includes[p : p + take_p],
                    excludes[max(p - len(includes), 0) : max(p + take_p - len(includes), 0)],
                    record.aux,
                )
            )
            room -= piece_length(width, aux, take_s, take_p)
            s, p = s + take_s, p + take_p
            if s == len(sources) and p == len(pairs):
                break
            parts.append(tuple(current))
            current, room = [], empty
    if current or not parts:
        parts.append(tuple(current))
    return parts


def _head(room: int, width: int, aux: int, sources: int, pairs: int) -> tuple[int, int]:
    """How many sources and then pairs of a record's rest fit in `room` bytes."""
    avail = room - (4 + width + aux)
    if avail < 0:
        return 0, 0
    take_s = min(sources, avail // width)
    if take_s < sources:
        return take_s, 0
    avail -= take_s * width + _TLV_HEAD + _MASKS_HEAD + width
    take_p = min(pairs, avail // (2 * width)) if avail >= 2 * width else 0
    return take_s, take_p
