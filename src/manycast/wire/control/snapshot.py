"""The pool's state on the wire: `SnapshotRequest`, and `Snapshot` parts that each fit a
datagram.

The state is an allocation and the share each of its servers should hold (the
`policy.Apportionment` the servers keep). `snapshot_parts` cuts it into parts;
`assemble` checks a complete set and rebuilds allocation and shares, which must
hash to the digest the parts announce (`space.shares_digest`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import numpy as np

from manycast.space import (
    SHARE_BYTES,
    SHARE_SCALE,
    AddressSpace,
    Allocation,
    Portion,
    SpaceError,
    held_weights,
    shares_digest,
)
from manycast.wire.control.envelope import ENVELOPE_FIXED, Envelope, MessageType, control_message
from manycast.wire.control.fields import (
    U16,
    U32,
    U64,
    check_digest,
    check_id,
    check_uint,
    read_count,
    read_digest,
    read_flag,
    read_id,
    records,
    set_field,
    write_digest,
    write_id,
)
from manycast.wire.cursor import Reader, Writer
from manycast.wire.errors import WireError

SNAPSHOT_MAX_BYTES = 1400


class Run(NamedTuple):
    """Buckets start..stop-1 owned by the server at `server` in the part's id list."""

    start: int
    stop: int
    server: int


class SnapshotState(NamedTuple):
    """What a complete snapshot carries: the allocation, and each of its servers'
    share in 1/SHARE_SCALE of the space (summing to SHARE_SCALE)."""

    allocation: Allocation
    weights: dict[str, int]


@control_message
@dataclass(frozen=True, slots=True)
class SnapshotRequest(Envelope):
    """Ask for the allocation of `epoch` (0: the latest), answered by `Snapshot` parts."""

    TYPE: ClassVar[MessageType] = MessageType.SNAPSHOT_REQUEST
    epoch: int = 0

    def _check(self, what: str) -> None:
        check_uint(what, "epoch", self.epoch, U64)

    def _write_body(self, w: Writer) -> None:
        w.u64(self.epoch)

    @classmethod
    def _read_body(cls, sender: str, seq: int, r: Reader) -> SnapshotRequest:
        return cls(sender, seq, r.u64("epoch"))


def _prefix_length(portion: Portion) -> int:
    return bin(portion.mask).count("1")


def _write_space(w: Writer, space: AddressSpace) -> None:
    prefix = space.prefix
    w.u8(prefix.family).uint(prefix.width // 8, prefix.value)
    w.u8(_prefix_length(prefix)).u8(space.bits).u8(space.shift).u8(space.interleave)


def _read_space(r: Reader) -> AddressSpace:
    family = r.u8("space family")
    if family not in (4, 6):
        raise WireError(f"{r.what}: space family {family} is neither 4 nor 6")
    width = 32 if family == 4 else 128
    value = r.uint(width // 8, "space prefix")
    length = r.u8("space prefix length")
    if length > width:
        raise WireError(f"{r.what}: prefix length {length} exceeds {width}")
    bits, shift = r.u8("index bits"), r.u8("index shift")
    interleave = read_flag(r, "interleave flag")
    mask = ((1 << width) - 1) ^ ((1 << (width - length)) - 1)
    try:
        return AddressSpace(Portion(family, value, mask), bits, shift, interleave)
    except SpaceError as exc:
        raise WireError(f"{r.what}: bad address space: {exc}") from None


def _space_bytes(space: AddressSpace) -> int:
    return 1 + space.prefix.width // 8 + 4


@control_message
@dataclass(frozen=True, slots=True)
class Snapshot(Envelope):
    """Part `part` of `count` of the pool's state at `epoch`.

    Each part repeats the space and lists only the server ids its runs name (and,
    in some part, the servers that hold nothing), each with the share that server
    should hold (`shares[i]` for `servers[i]`, in 1/SHARE_SCALE of the space), so
    every part stays one small datagram; `assemble()` puts the parts together and
    checks them.
    """

    TYPE: ClassVar[MessageType] = MessageType.SNAPSHOT
    epoch: int
    digest: str
    part: int
    count: int
    space: AddressSpace
    servers: tuple[str, ...]
    shares: tuple[int, ...]
    runs: tuple[Run, ...]

    def _check(self, what: str) -> None:
        check_uint(what, "epoch", self.epoch, U64)
        check_digest(what, "digest", self.digest)
        check_uint(what, "count", self.count, U16, low=1)
        check_uint(what, "part", self.part, self.count - 1)
        if not isinstance(self.space, AddressSpace):
            raise WireError(f"{what}: space must be an AddressSpace, not {self.space!r}")
        servers: object = self.servers
        if isinstance(servers, str) or not isinstance(servers, Iterable):
            raise WireError(f"{what}: servers must be a sequence of ids, not {servers!r}")
        set_field(self, "servers", tuple(servers))
        shares: object = self.shares
        if isinstance(shares, str | bytes) or not isinstance(shares, Iterable):
            raise WireError(f"{what}: shares must be a sequence of integers, not {shares!r}")
        set_field(self, "shares", tuple(shares))
        if len(self.shares) != len(self.servers):
            raise WireError(f"{what}: {len(self.shares)} shares for {len(self.servers)} servers")
        for share in self.shares:
            check_uint(what, "share", share, SHARE_SCALE)
        set_field(self, "runs", records(what, "runs", self.runs, Run))
        if len(self.servers) > U16 or len(self.runs) > U16:
            raise WireError(f"{what}: at most {U16} servers and {U16} runs per part")
        for name in self.servers:
            check_id(what, "server", name)
        if any(a >= b for a, b in itertools.pairwise(self.servers)):
            raise WireError(f"{what}: server ids must be sorted and distinct")
        buckets = self.space.buckets
        previous = 0
        for start, stop, index in self.runs:
            check_uint(what, "run start", start, U32)
            check_uint(what, "run stop", stop, buckets, low=start + 1)
            check_uint(what, "run server", index, len(self.servers) - 1)
            if start < previous:
                raise WireError(f"{what}: runs must be in order and must not overlap")
            previous = stop

    def _write_body(self, w: Writer) -> None:
        w.u64(self.epoch)
        write_digest(w, self.digest)
        w.u16(self.part).u16(self.count)
        _write_space(w, self.space)
        w.u16(len(self.servers))
        for name, share in zip(self.servers, self.shares, strict=True):
            write_id(w, name)
            w.uint(SHARE_BYTES, share)
        w.u16(len(self.runs))
        for start, stop, index in self.runs:
            w.u32(start).u32(stop).u16(index)

    @classmethod
    def _read_body(cls, sender: str, seq: int, r: Reader) -> Snapshot:
        epoch = r.u64("epoch")
        digest = read_digest(r, "digest")
        part, count = r.u16("part"), r.u16("part count")
        space = _read_space(r)
        entries = [
            (read_id(r, "server"), r.uint(SHARE_BYTES, "share"))
            for _ in range(read_count(r, "servers", 2 + SHARE_BYTES, U16))
        ]
        servers = tuple(name for name, _ in entries)
        shares = tuple(share for _, share in entries)
        runs = tuple(
            Run(r.u32("run start"), r.u32("run stop"), r.u16("run server"))
            for _ in range(read_count(r, "runs", 10, U16))
        )
        return cls(sender, seq, epoch, digest, part, count, space, servers, shares, runs)


def snapshot_parts(
    epoch: int,
    allocation: Allocation,
    max_bytes: int = SNAPSHOT_MAX_BYTES,
    *,
    sender: str,
    seq: int = 0,
    weights: Mapping[str, int] | None = None,
) -> list[Snapshot]:
    """The allocation and the shares its servers should hold (`weights`, in
    1/SHARE_SCALE of the space; by default what they hold) as `Snapshot` parts whose
    encodings are at most `max_bytes` each, announcing `space.shares_digest`.

    Runs are packed in bucket order; each part lists the ids its runs name with
    their shares, and servers holding nothing ride in the last parts. Part i gets
    sequence number seq + i (mod 2**32). ValueError if one run with its id cannot
    fit `max_bytes`, more than 65535 parts are needed or the shares do not fit the
    allocation.
    """
    check_id("snapshot_parts", "sender", sender)
    shares = held_weights(allocation) if weights is None else dict(weights)
    if sum(shares.values()) != SHARE_SCALE:
        raise ValueError(f"the shares add up to {sum(shares.values())}, not {SHARE_SCALE}")
    try:
        digest = shares_digest(allocation, shares)
    except SpaceError as exc:
        raise ValueError(str(exc)) from None
    fixed = (
        ENVELOPE_FIXED
        + len(sender.encode("utf-8"))
        + 8  # epoch
        + 8  # digest
        + 4  # part, count
        + _space_bytes(allocation.space)
        + 2  # server count
        + 2  # run count
    )
    id_bytes = {s: 1 + len(s.encode("utf-8")) + SHARE_BYTES for s in allocation.servers}
    groups: list[tuple[set[str], list[tuple[int, int, str]]]] = []
    names: set[str] = set()
    runs: list[tuple[int, int, str]] = []
    size = fixed

    def place(cost_new: int, cost_known: int, server: str) -> bool:
        """Make room for an item in the current part; True if its id is new there."""
        nonlocal names, runs, size
        new = server not in names
        cost = cost_new if new else cost_known
        if size + cost > max_bytes and (names or runs):
            groups.append((names, runs))
            names, runs, size, new, cost = set(), [], fixed, True, cost_new
        if fixed + cost > max_bytes:
            raise ValueError(f"max_bytes {max_bytes} cannot hold one run of {server!r}")
        size += cost
        names.add(server)
        return new

    for start, stop, server in allocation.runs():
        place(10 + id_bytes[server], 10, server)
        runs.append((start, stop, server))
    owning = {server for _, _, server in allocation.runs()}
    for server in allocation.servers:
        if server not in owning:
            place(id_bytes[server], 0, server)
    groups.append((names, runs))
    if len(groups) > U16:
        raise ValueError(f"{len(groups)} snapshot parts needed, at most {U16}")

    parts = []
    for index, (group_names, group_runs) in enumerate(groups):
        ids = tuple(sorted(group_names))
        position = {s: i for i, s in enumerate(ids)}
        parts.append(
            Snapshot(
                sender,
                (seq + index) & U32,
                epoch,
                digest,
                index,
                len(groups),
                allocation.space,
                ids,
                tuple(shares[s] for s in ids),
                tuple(Run(a, b, position[s]) for a, b, s in group_runs),
            )
        )
    return parts


def assemble(parts: Iterable[Snapshot]) -> SnapshotState:
    """The allocation and shares carried by a complete set of `Snapshot` parts,
    checked: same epoch, digest, space and count in each, every part exactly once,
    runs covering every bucket exactly once, one share for each server (the same in
    every part that names it) adding up to the space, and the result hashing to the
    announced digest."""
    given: Sequence[Snapshot] = list(parts)
    if not given:
        raise WireError("snapshot: no parts")
    first = given[0]
    for part in given:
        if (part.epoch, part.digest, part.count) != (first.epoch, first.digest, first.count):
            raise WireError(
                f"snapshot: part {part.part} is of epoch {part.epoch} digest {part.digest} "
                f"with {part.count} parts, part {first.part} of epoch {first.epoch} "
                f"digest {first.digest} with {first.count}"
            )
        if part.space != first.space:
            raise WireError(f"snapshot: part {part.part} describes another address space")
    indexes = sorted(part.part for part in given)
    duplicates = sorted({i for i, j in itertools.pairwise(indexes) if i == j})
    if duplicates:
        raise WireError(f"snapshot: parts {duplicates} given more than once")
    missing = sorted(set(range(first.count)) - set(indexes))
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise WireError(f"snapshot: {len(missing)} of {first.count} parts missing: {shown}")

    weights: dict[str, int] = {}
    for part in given:
        for name, share in zip(part.servers, part.shares, strict=True):
            if weights.setdefault(name, share) != share:
                raise WireError(f"snapshot: parts give {name} shares {weights[name]} and {share}")
    if sum(weights.values()) != SHARE_SCALE:
        raise WireError(f"snapshot: shares add up to {sum(weights.values())}, not {SHARE_SCALE}")
    servers = tuple(sorted(weights))
    position = {s: i for i, s in enumerate(servers)}
    runs = sorted(
        (start, stop, position[part.servers[server]])
        for part in given
        for start, stop, server in part.runs
    )
    buckets = first.space.buckets
    owners = np.empty(buckets, dtype=np.int32)
    covered = 0
    for start, stop, owner in runs:
        if start != covered:
            problem = "overlap" if start < covered else "leave a gap"
            raise WireError(f"snapshot: runs {problem} at bucket {min(start, covered)}")
        owners[start:stop] = owner
        covered = stop
    if covered != buckets:
        raise WireError(f"snapshot: runs cover {covered} of {buckets} buckets")
    try:
        allocation = Allocation(first.space, servers, owners)
    except SpaceError as exc:
        raise WireError(f"snapshot: {exc}") from None
    digest = shares_digest(allocation, weights)
    if digest != first.digest:
        raise WireError(f"snapshot: parts hash to {digest}, announced {first.digest}")
    return SnapshotState(allocation, weights)
