"""The client address space, its portions and their allocation among servers.

A *portion* is what a server's join names (seed Fig 7C): the source addresses `a`
with `a & mask == value`, where the mask is any bit mask, not only a prefix. A
server's share is a `PortionSet`: include portions minus exclude portions.

An `AddressSpace` declares the clients (a prefix) and the *index field*: a run of
`bits` address bits whose value, the bucket index, selects one of 2**bits
equal buckets. Every allocation is exact at that granularity: a server owns a
set of buckets, its share is (buckets / 2**bits) as a `Fraction`, and any set of
buckets is written as value/mask portions by `cover()`. With the default field
(the low-order bits) neighbouring hosts land in different buckets, so a busy
subnet is spread over all servers (Fig 10).
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property, lru_cache
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from manycast.errors import ManycastError

AddressLike = int | str | ipaddress.IPv4Address | ipaddress.IPv6Address
IntArray = npt.NDArray[np.integer]
WIDTH = {4: 32, 6: 128}


class SpaceError(ManycastError, ValueError):
    """An address space, portion or allocation that breaks an invariant."""


def address_to_int(addr: AddressLike, family: int) -> int:
    """An address of `family` as an integer; strings and ipaddress objects accepted."""
    if isinstance(addr, int):
        if not 0 <= addr < (1 << WIDTH[family]):
            raise SpaceError(f"{addr} is not an IPv{family} address")
        return addr
    if isinstance(addr, ipaddress.IPv4Address | ipaddress.IPv6Address):
        # Its number as it is: `ip_address` would format it as text and parse that
        # back, ten times dearer for an IPv6 address than for an IPv4 one.
        if addr.version != family:
            raise SpaceError(f"{addr} is not an IPv{family} address")
        return int(addr)
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError as exc:
        raise SpaceError(str(exc)) from None
    if ip.version != family:
        raise SpaceError(f"{ip} is not an IPv{family} address")
    return int(ip)


def int_to_address(value: int, family: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.IPv4Address(value) if family == 4 else ipaddress.IPv6Address(value)


def _prefix_length(mask: int, width: int) -> int | None:
    """The prefix length of `mask` if it is a prefix mask, else None."""
    inverted = ~mask & ((1 << width) - 1)
    if inverted & (inverted + 1):
        return None
    return width - inverted.bit_length()


@dataclass(frozen=True, slots=True, order=True)
class Portion:
    """Source addresses `a` with `a & mask == value` (a value/mask pair, Fig 7C)."""

    family: int
    value: int
    mask: int

    def __post_init__(self) -> None:
        if self.family not in WIDTH:
            raise SpaceError(f"family must be 4 or 6, not {self.family}")
        top = 1 << WIDTH[self.family]
        if not (0 <= self.mask < top and 0 <= self.value < top):
            raise SpaceError(f"value/mask out of range for IPv{self.family}")
        if self.value & ~self.mask:
            raise SpaceError(
                f"value {self._fmt(self.value)} has bits outside mask {self._fmt(self.mask)}"
            )

    @classmethod
    def parse(cls, text: str) -> Portion:
        """`10.0.0.0/8` (a prefix) or `0.0.0.1/0.0.0.3` (value/mask, any mask)."""
        value_text, sep, mask_text = text.strip().partition("/")
        if not sep:
            raise SpaceError(f"portion {text!r}: expected VALUE/PREFIXLEN or VALUE/MASK")
        try:
            value_ip = ipaddress.ip_address(value_text)
        except ValueError as exc:
            raise SpaceError(f"portion {text!r}: {exc}") from None
        family, width = value_ip.version, WIDTH[value_ip.version]
        # isascii: str.isdigit() accepts digits such as '²' that int() refuses.
        if mask_text.isascii() and mask_text.isdigit():
            length = int(mask_text)
            if length > width:
                raise SpaceError(f"portion {text!r}: prefix length {length} > {width}")
            mask = ((1 << width) - 1) ^ ((1 << (width - length)) - 1)
        else:
            try:
                mask = address_to_int(mask_text, family)
            except SpaceError as exc:
                raise SpaceError(f"portion {text!r}: bad mask: {exc}") from None
        value = int(value_ip)
        if value & ~mask:
            raise SpaceError(f"portion {text!r}: value has bits outside the mask")
        return cls(family, value, mask)

    @classmethod
    def everything(cls, family: int) -> Portion:
        return cls(family, 0, 0)

    @property
    def width(self) -> int:
        return WIDTH[self.family]

    def contains(self, addr: AddressLike) -> bool:
        return address_to_int(addr, self.family) & self.mask == self.value

    def fraction(self) -> Fraction:
        """The share of the whole address family this portion holds."""
        return Fraction(1, 1 << bin(self.mask).count("1"))

    def intersects(self, other: Portion) -> bool:
        common = self.mask & other.mask
        return self.family == other.family and self.value & common == other.value & common

    def _fmt(self, number: int) -> str:
        return str(int_to_address(number, self.family))

    def __str__(self) -> str:
        length = _prefix_length(self.mask, self.width)
        suffix = str(length) if length is not None else self._fmt(self.mask)
        return f"{self._fmt(self.value)}/{suffix}"


@dataclass(frozen=True, slots=True)
class PortionSet:
    """Addresses matching any include portion and no exclude portion (Fig 7B/7C lists)."""

    include: tuple[Portion, ...] = ()
    exclude: tuple[Portion, ...] = ()

    def contains(self, addr: AddressLike) -> bool:
        return any(p.contains(addr) for p in self.include) and not any(
            p.contains(addr) for p in self.exclude
        )

    def __len__(self) -> int:
        return len(self.include) + len(self.exclude)

    def __str__(self) -> str:
        text = " ".join(str(p) for p in self.include) or "(none)"
        if self.exclude:
            text += " except " + " ".join(str(p) for p in self.exclude)
        return text


@dataclass(frozen=True)
class AddressSpace:
    """Declared clients (`prefix`) cut into 2**bits buckets by an index field.

    With `interleave` (the default, index on the low-order bits) the bucket number
    is the field's bits in reverse order, so a run of consecutive buckets fixes
    the lowest address bits: an equal split among four servers is `addr & 3`, and
    every server gets a slice of every subnet. Without it, buckets follow the
    field's natural order and runs are contiguous address ranges.
    """

    prefix: Portion
    bits: int = 16
    shift: int = 0
    interleave: bool = True

    def __post_init__(self) -> None:
        width = self.prefix.width
        if _prefix_length(self.prefix.mask, width) is None:
            raise SpaceError(f"declared space {self.prefix} must be a prefix")
        if not 1 <= self.bits <= 24:
            raise SpaceError(f"index bits must be 1..24, not {self.bits}")
        if self.shift < 0 or self.shift + self.bits > width:
            raise SpaceError(f"index field at bit {self.shift} does not fit {width} bits")
        if self.index_mask & self.prefix.mask:
            raise SpaceError(
                f"index field bits {self.shift}..{self.shift + self.bits - 1} "
                f"overlap the prefix {self.prefix}"
            )

    @classmethod
    def create(
        cls,
        prefix: str = "0.0.0.0/0",
        bits: int = 16,
        index: Literal["low", "high"] = "low",
    ) -> AddressSpace:
        """A space over `prefix`; the index is its low-order bits (interleaved) or the
        bits right after the prefix (contiguous ranges)."""
        portion = Portion.parse(prefix)
        length = _prefix_length(portion.mask, portion.width)
        if length is None:
            raise SpaceError(f"declared space {prefix!r} must be a prefix")
        if index == "low":
            return cls(portion, bits, 0, interleave=True)
        if index == "high":
            return cls(portion, bits, portion.width - length - bits, interleave=False)
        raise SpaceError(f"index must be 'low' or 'high', not {index!r}")

    @property
    def family(self) -> int:
        return self.prefix.family

    @property
    def buckets(self) -> int:
        return 1 << self.bits

    @property
    def index_mask(self) -> int:
        return (self.buckets - 1) << self.shift

    def contains(self, addr: AddressLike) -> bool:
        return self.prefix.contains(addr)

    def _swap(self, number: int) -> int:
        """Bucket bits <-> field bits (an involution)."""
        return _reverse_bits(number, self.bits) if self.interleave else number

    def bucket(self, addr: AddressLike) -> int:
        value = address_to_int(addr, self.family)
        return self._swap((value >> self.shift) & (self.buckets - 1))

    def _pattern(self, value: int, mask: int) -> Portion:
        """The portion of addresses whose bucket number matches value/mask."""
        return Portion(
            self.family,
            self.prefix.value | (self._swap(value) << self.shift),
            self.prefix.mask | (self._swap(mask) << self.shift),
        )

    def block(self, start: int, size: int) -> Portion:
        """The portion of an aligned run of `size` (a power of two) buckets from `start`."""
        return self._pattern(start, (self.buckets - 1) & ~(size - 1))

    def stripe(self, start: int, size: int) -> Portion:
        """Like `block`, in bit-reversed bucket order: every (buckets/size)-th bucket,
        those whose low bucket bits equal the reversal of `start`."""
        fixed = self.bits - (size.bit_length() - 1)
        return self._pattern(_reverse_bits(start, self.bits), (1 << fixed) - 1)

    def buckets_of(self, portion: Portion) -> npt.NDArray[np.bool_]:
        """Which buckets `portion` holds whole; SpaceError if it cuts one in part."""
        if portion.family != self.family:
            raise SpaceError(f"portion {portion} is not IPv{self.family}")
        if not portion.intersects(self.prefix):
            return np.zeros(self.buckets, dtype=bool)
        stray = portion.mask & ~(self.prefix.mask | self.index_mask)
        if stray:
            raise SpaceError(
                f"portion {portion} selects address bits outside the index field "
                f"{self.shift}..{self.shift + self.bits - 1}: finer than this space's buckets"
            )
        mask = self._swap((portion.mask & self.index_mask) >> self.shift)
        value = self._swap((portion.value & self.index_mask) >> self.shift)
        index = np.arange(self.buckets, dtype=np.int64)
        selected: npt.NDArray[np.bool_] = (index & mask) == value
        return selected

    def field_order(self) -> npt.NDArray[np.int64]:
        """bucket_of_field[f]: the bucket of index-field value f (for table lookups)."""
        if self.interleave:
            return bit_reversal(self.bits)
        return np.arange(self.buckets, dtype=np.int64)

    def cover(self, selected: npt.NDArray[np.bool_]) -> PortionSet:
        """The fewest aligned include/exclude portions that select exactly `selected`."""
        return _cover(self, selected)

    def __str__(self) -> str:
        last = self.shift + self.bits - 1
        return f"{self.prefix} in {self.buckets} buckets (address bits {self.shift}..{last})"


# A plan is the include and exclude blocks, as (start, size) runs of buckets.
_Plan = tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]
_EMPTY: _Plan = ((), ())


def _cover(space: AddressSpace, selected: npt.NDArray[np.bool_]) -> PortionSet:
    """The smaller of two aligned covers: blocks that fix the high index bits
    (contiguous runs) and blocks that fix the low index bits (interleaved stripes)."""
    if selected.shape != (space.buckets,):
        raise SpaceError(f"bucket selection must have {space.buckets} entries")
    high = _TrieCosts(selected)
    low = _TrieCosts(selected[bit_reversal(space.bits)])
    if low.total < high.total:
        low_include, low_exclude = low.plan()
        return PortionSet(
            tuple(space.stripe(s, n) for s, n in low_include),
            tuple(space.stripe(s, n) for s, n in low_exclude),
        )
    high_include, high_exclude = high.plan()
    return PortionSet(
        tuple(space.block(s, n) for s, n in high_include),
        tuple(space.block(s, n) for s, n in high_exclude),
    )


class _TrieCosts:
    """Fewest include/exclude aligned runs selecting exactly `selected`.

    A dynamic programme over the binary trie of the index: flat include/exclude
    lists allow one flip from out to in (an include) and one from in to out (an
    exclude) on any root-to-leaf path, so each node has two costs, from outside
    any include and from inside one. The costs are computed a level at a time
    with numpy, bottom up (`total`); `plan()` reads the runs top down through the
    nodes the optimum actually splits.
    """

    def __init__(self, selected: npt.NDArray[np.bool_]) -> None:
        # int32 and the fewest array passes: this runs on every server at every
        # allocation change, over 2**bits leaves (twice: high and low order).
        count = selected.astype(np.int32)
        out_cost = count  # a selected leaf takes one include; an empty one nothing
        in_cost = 1 - count  # inside an include, an empty leaf takes one exclude
        self.counts, self.outs, self.ins = [count], [out_cost], [in_cost]
        while len(count) > 1:
            count = count[0::2] + count[1::2]
            inside = self.ins[-1][0::2] + self.ins[-1][1::2]
            split = self.outs[-1][0::2] + self.outs[-1][1::2]
            self.counts.append(count)
            # An empty node inside an include takes one exclude (its children's sum
            # would be two); a full one already sums to 0 inside and 2 outside, so
            # `min(1 + inside, split)` gives 0 for an empty node and 1 for a full one.
            self.ins.append(np.where(count == 0, np.int32(1), inside))
            self.outs.append(np.minimum(inside + 1, split))
        self.total = int(self.outs[-1][0])

    def plan(self) -> _Plan:
        include: list[tuple[int, int]] = []
        exclude: list[tuple[int, int]] = []
        counts, outs, ins = self.counts, self.outs, self.ins

        # Depth first, left child first, on a stack of its own: a nested function
        # calling itself would be a reference cycle (function, closure cell) that holds
        # every level's arrays until the collector's oldest generation runs, some MB a
        # cover (docs/soak.md, finding 32).
        stack = [(len(counts) - 1, 0, False)]
        while stack:
            level, index, inside = stack.pop()
            width = 1 << level
            n = int(counts[level][index])
            if inside:
                if n == width:
                    continue
                if n == 0:
                    exclude.append((index * width, width))
                    continue
            else:
                if n == 0:
                    continue
                if n == width:
                    include.append((index * width, width))
                    continue
                split = int(outs[level - 1][2 * index] + outs[level - 1][2 * index + 1])
                if 1 + int(ins[level][index]) < split:
                    include.append((index * width, width))
                    inside = True
            stack.append((level - 1, 2 * index + 1, inside))
            stack.append((level - 1, 2 * index, inside))
        return tuple(include), tuple(exclude)


def _trie_cover(selected: npt.NDArray[np.bool_]) -> _Plan:
    return _TrieCosts(selected).plan()


def _reverse_bits(number: int, bits: int) -> int:
    return int(format(number, f"0{bits}b")[::-1], 2)


@lru_cache(maxsize=8)
def _bit_reversal_cached(bits: int) -> npt.NDArray[np.int64]:
    index = np.arange(1 << bits, dtype=np.int64)
    reversed_index = np.zeros_like(index)
    for bit in range(bits):
        reversed_index |= ((index >> bit) & 1) << (bits - 1 - bit)
    reversed_index.flags.writeable = False
    return reversed_index


def bit_reversal(bits: int) -> npt.NDArray[np.int64]:
    """reversed[i] = i with its `bits` low bits in reverse order (read-only, cached)."""
    return _bit_reversal_cached(bits)


@dataclass(frozen=True, slots=True)
class Move:
    """Part of the space that changes hands between two allocations."""

    source: str
    target: str
    buckets: int
    share: Fraction
    portions: PortionSet


def owner_dtype(servers: int) -> type[np.signedinteger[Any]]:
    """The narrowest signed integer type that holds an index into `servers` servers
    and -1 (`Allocation.owner_many`'s "outside the space")."""
    if servers <= np.iinfo(np.int8).max:
        return np.int8
    if servers <= np.iinfo(np.int16).max:
        return np.int16
    return np.int32


@dataclass(frozen=True, eq=False)
class Allocation:
    """Which server owns each bucket of `space`: disjoint and covering by construction.

    `owners[i]` is the index in `servers` of bucket i's owner. Servers with no
    bucket may be listed (pool members currently serving nothing).
    """

    space: AddressSpace
    servers: tuple[str, ...]
    # In the narrowest signed type that holds every index (`owner_dtype`): a server
    # keeps its last few allocations, a router one or two, of 2**16 buckets each.
    owners: npt.NDArray[np.signedinteger[Any]] = field(repr=False)

    def __post_init__(self) -> None:
        if len(set(self.servers)) != len(self.servers):
            raise SpaceError(f"duplicate server ids in {self.servers}")
        if list(self.servers) != sorted(self.servers):
            raise SpaceError("servers must be listed in sorted order")
        if any(not s for s in self.servers):
            raise SpaceError("server ids must be non-empty")
        given = np.asarray(self.owners)
        if given.dtype.kind not in "iu":
            given = given.astype(np.int64)
        if given.shape != (self.space.buckets,):
            raise SpaceError(f"owners must have {self.space.buckets} entries, not {given.shape}")
        if given.size and (given.min() < 0 or given.max() >= len(self.servers)):
            raise SpaceError("a bucket has no owner: every bucket of the space must be served")
        owners = given.astype(owner_dtype(len(self.servers)))  # a copy of its own
        owners.flags.writeable = False
        object.__setattr__(self, "owners", owners)

    # construction -------------------------------------------------------
    @classmethod
    def from_counts(
        cls, space: AddressSpace, counts: Sequence[tuple[str, int]], extra: Iterable[str] = ()
    ) -> Allocation:
        """Consecutive runs of buckets, in the order given."""
        if sum(n for _, n in counts) != space.buckets:
            raise SpaceError(f"counts add up to {sum(n for _, n in counts)}, not {space.buckets}")
        servers = tuple(sorted({s for s, _ in counts} | set(extra)))
        position = {s: i for i, s in enumerate(servers)}
        owners = np.repeat(
            np.array([position[s] for s, _ in counts], dtype=np.int32),
            [n for _, n in counts],
        )
        return cls(space, servers, owners)

    @classmethod
    def from_bucket_owners(cls, space: AddressSpace, owner_ids: Sequence[str]) -> Allocation:
        servers = tuple(sorted(set(owner_ids)))
        position = {s: i for i, s in enumerate(servers)}
        return cls(space, servers, np.array([position[s] for s in owner_ids], dtype=np.int32))

    @classmethod
    def from_portions(cls, space: AddressSpace, shares: Mapping[str, PortionSet]) -> Allocation:
        """Check that the portion sets are disjoint and cover the space, then build."""
        servers = tuple(sorted(shares))
        owners = np.full(space.buckets, -1, dtype=np.int32)
        for index, server in enumerate(servers):
            chosen = np.zeros(space.buckets, dtype=bool)
            for portion in shares[server].include:
                chosen |= space.buckets_of(portion)
            for portion in shares[server].exclude:
                chosen &= ~space.buckets_of(portion)
            clash = chosen & (owners >= 0)
            if clash.any():
                other = servers[int(owners[np.argmax(clash)])]
                overlap = space.cover(clash)
                raise SpaceError(f"servers {other} and {server} overlap on {overlap}")
            owners[chosen] = index
        if (owners < 0).any():
            raise SpaceError(f"no server serves {space.cover(owners < 0)}")
        return cls(space, servers, owners)

    def with_owners(
        self, servers: Iterable[str], owner_ids: npt.NDArray[np.signedinteger[Any]]
    ) -> Allocation:
        """A new allocation from owner indices into `servers` (re-sorted here)."""
        listed = list(servers)
        ordered = tuple(sorted(listed))
        remap = np.array([ordered.index(s) for s in listed], dtype=np.int32)
        return Allocation(self.space, ordered, remap[owner_ids])

    # queries -------------------------------------------------------------
    @cached_property
    def _counts(self) -> npt.NDArray[np.int64]:
        return np.bincount(self.owners, minlength=len(self.servers))

    def count(self, server: str) -> int:
        return int(self._counts[self.index_of(server)])

    def counts(self) -> dict[str, int]:
        return {s: int(n) for s, n in zip(self.servers, self._counts, strict=True)}

    def share(self, server: str) -> Fraction:
        return Fraction(self.count(server), self.space.buckets)

    def shares(self) -> dict[str, Fraction]:
        return {s: Fraction(n, self.space.buckets) for s, n in self.counts().items()}

    def index_of(self, server: str) -> int:
        try:
            return self.servers.index(server)
        except ValueError:
            raise SpaceError(f"{server!r} is not a server of this allocation") from None

    def buckets(self, server: str) -> npt.NDArray[np.bool_]:
        selected: npt.NDArray[np.bool_] = self.owners == self.index_of(server)
        return selected

    def portions(self, server: str) -> PortionSet:
        """What `server` names in its join: the fewest include/exclude value/mask pairs."""
        cache: dict[str, PortionSet] = self.__dict__.setdefault("_portion_cache", {})
        if server not in cache:
            cache[server] = self.space.cover(self.buckets(server))
        return cache[server]

    def owner(self, addr: AddressLike) -> str | None:
        """The server for one source address, or None outside the declared space."""
        if not self.space.contains(addr):
            return None
        return self.servers[int(self.owners[self.space.bucket(addr)])]

    @cached_property
    def _by_field(self) -> npt.NDArray[np.signedinteger[Any]]:
        """Owners indexed by the raw index field, so a lookup is one gather."""
        table: npt.NDArray[np.signedinteger[Any]] = self.owners[self.space.field_order()]
        return table

    def owner_many(self, addrs: IntArray) -> npt.NDArray[np.signedinteger[Any]]:
        """Owner indices (into `servers`) for many addresses; -1 outside the space.

        IPv4: a 1-D integer array. IPv6: an (n, 2) uint64 array of (high, low) halves.
        """
        space = self.space
        if space.family == 4:
            a = np.asarray(addrs)
            index = (a >> space.shift) & (space.buckets - 1)
            found: npt.NDArray[np.signedinteger[Any]] = self._by_field.take(index)
            if space.prefix.mask:
                inside = (a & space.prefix.mask) == space.prefix.value
                found = np.where(inside, found, found.dtype.type(-1))
            return found
        halves = np.asarray(addrs, dtype=np.uint64)
        if halves.ndim != 2 or halves.shape[1] != 2:
            raise SpaceError("IPv6 addresses must be an (n, 2) array of (high, low) uint64 halves")
        low_mask = (1 << 64) - 1
        found = self._by_field.take(_field(halves, space.shift, space.bits).astype(np.int64))
        if space.prefix.mask:
            hi_m, lo_m = np.uint64(space.prefix.mask >> 64), np.uint64(space.prefix.mask & low_mask)
            hi_v, lo_v = (
                np.uint64(space.prefix.value >> 64),
                np.uint64(space.prefix.value & low_mask),
            )
            inside = ((halves[:, 0] & hi_m) == hi_v) & ((halves[:, 1] & lo_m) == lo_v)
            found = np.where(inside, found, found.dtype.type(-1))
        return found

    def runs(self) -> Iterator[tuple[int, int, str]]:
        """Maximal runs of consecutive buckets with one owner: (start, stop, server)."""
        edges = np.flatnonzero(np.diff(self.owners)) + 1
        starts = np.concatenate(([0], edges))
        stops = np.concatenate((edges, [self.space.buckets]))
        for start, stop in zip(starts, stops, strict=True):
            yield int(start), int(stop), self.servers[int(self.owners[start])]

    @cached_property
    def _digest(self) -> str:
        # str(space) does not show the bucket order, which changes what a bucket holds.
        order = "interleaved" if self.space.interleave else "ordered"
        h = hashlib.sha256(f"{self.space} {order}".encode())
        # Servers holding nothing are pool members too: they count.
        h.update(("servers:" + ",".join(self.servers) + ";").encode())
        for start, stop, server in self.runs():
            h.update(f"{start}:{stop}:{server};".encode())
        return h.hexdigest()[:16]

    def digest(self) -> str:
        """A stable fingerprint: equal allocations have equal digests on every host.
        Computed once per allocation (it is immutable): every heartbeat carries it."""
        return self._digest

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Allocation):
            return NotImplemented
        return (
            self.space == other.space
            and self.servers == other.servers
            and bool(np.array_equal(self.owners, other.owners))
        )

    def __hash__(self) -> int:
        return hash(self.digest())

    def __str__(self) -> str:
        parts = ", ".join(f"{s} {float(f):.2%}" for s, f in self.shares().items())
        return f"Allocation({parts})"


SHARE_SCALE = 1 << 64
"""Shares of the space kept beside an allocation (`policy.Apportionment`) are whole
multiples of 1/SHARE_SCALE: exact integers every server computes alike."""
SHARE_BYTES = 9  # a share in 1/SHARE_SCALE, 0..SHARE_SCALE, as an unsigned integer


def held_weights(alloc: Allocation) -> dict[str, int]:
    """The shares `alloc`'s servers hold, in 1/SHARE_SCALE of the space."""
    unit = SHARE_SCALE // alloc.space.buckets
    return {s: n * unit for s, n in alloc.counts().items()}


def shares_digest(alloc: Allocation, weights: Mapping[str, int]) -> str:
    """A fingerprint of an allocation and the shares its servers should hold
    (`weights`: one for each of its servers, in 1/SHARE_SCALE of the space). Two
    pools whose servers hold the same buckets but should hold different shares
    differ here, where `Allocation.digest` would call them equal."""
    if set(weights) != set(alloc.servers):
        raise SpaceError("the shares must name exactly the allocation's servers")
    h = hashlib.sha256(f"{alloc.digest()} shares:".encode())
    for server in alloc.servers:
        weight = weights[server]
        if not 0 <= weight <= SHARE_SCALE:
            raise SpaceError(f"{server}'s share {weight} is outside 0..{SHARE_SCALE}")
        h.update(weight.to_bytes(SHARE_BYTES, "big"))
    return h.hexdigest()[:16]


def address_array(addresses: Sequence[int], family: int) -> IntArray:
    """Integer addresses as `Allocation.owner_many` takes them: IPv4 one int64 each,
    IPv6 an (n, 2) uint64 array of (high, low) halves."""
    if family == 4:
        return np.array(addresses, dtype=np.int64)
    low = (1 << 64) - 1
    pairs = [(a >> 64, a & low) for a in addresses]
    return np.array(pairs, dtype=np.uint64).reshape(len(pairs), 2)


def _field(halves: npt.NDArray[np.uint64], shift: int, bits: int) -> npt.NDArray[np.uint64]:
    """Bits [shift, shift+bits) of 128-bit addresses held as (high, low) uint64 halves."""
    mask = np.uint64((1 << bits) - 1)
    if shift >= 64:
        out: npt.NDArray[np.uint64] = (halves[:, 0] >> np.uint64(shift - 64)) & mask
        return out
    low = halves[:, 1] >> np.uint64(shift)
    if shift + bits > 64:
        low = low | (halves[:, 0] << np.uint64(64 - shift))
    out = low & mask
    return out


def diff(old: Allocation, new: Allocation) -> list[Move]:
    """Exactly which buckets change owner, grouped by (from, to), as portions."""
    if old.space != new.space:
        raise SpaceError("allocations over different address spaces cannot be compared")
    old_ids = np.array((*old.servers, ""), dtype=object)[old.owners]
    new_ids = np.array((*new.servers, ""), dtype=object)[new.owners]
    changed = old_ids != new_ids
    moves: list[Move] = []
    pairs = sorted(set(zip(old_ids[changed], new_ids[changed], strict=True)))
    for source, target in pairs:
        selected = changed & (old_ids == source) & (new_ids == target)
        n = int(selected.sum())
        moves.append(
            Move(
                str(source),
                str(target),
                n,
                Fraction(n, old.space.buckets),
                old.space.cover(selected),
            )
        )
    return moves


def moved_share(old: Allocation, new: Allocation) -> Fraction:
    """The share of the space whose owner differs between two allocations."""
    if old.space != new.space:
        raise SpaceError("allocations over different address spaces cannot be compared")
    old_ids = np.array(old.servers, dtype=object)[old.owners]
    new_ids = np.array(new.servers, dtype=object)[new.owners]
    return Fraction(int((old_ids != new_ids).sum()), old.space.buckets)
