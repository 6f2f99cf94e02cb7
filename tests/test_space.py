"""Portions, address spaces and allocations (seed Fig 7C, 9)."""

from __future__ import annotations

import ipaddress
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from manycast.space import (
    AddressSpace,
    Allocation,
    Portion,
    PortionSet,
    SpaceError,
    _TrieCosts,
    address_to_int,
    diff,
    moved_share,
    owner_dtype,
)

U64 = (1 << 64) - 1

# Spaces of every shape the tests care about: both families, /0 and narrower
# prefixes, index on the low bits (interleaved) and right after the prefix
# (contiguous), and an IPv6 field that straddles the two 64-bit halves.
SPACES = [
    AddressSpace.create("0.0.0.0/0", 8),
    AddressSpace.create("10.0.0.0/8", 8),
    AddressSpace.create("10.0.0.0/8", 8, "high"),
    AddressSpace.create("192.168.0.0/16", 6, "high"),
    AddressSpace.create("::/0", 8),
    AddressSpace.create("2001:db8::/32", 8),
    AddressSpace.create("2001:db8::/60", 8, "high"),
    AddressSpace.create("2001:db8::/48", 8, "high"),
]


def addresses_in(space: AddressSpace) -> st.SearchStrategy[int]:
    """Addresses of the space's family forced inside its prefix."""
    width = space.prefix.width
    inside = st.integers(0, (1 << width) - 1).map(
        lambda a: (a & ~space.prefix.mask) | space.prefix.value
    )
    return inside


def select(space: AddressSpace, portions: PortionSet) -> np.ndarray:
    chosen = np.zeros(space.buckets, dtype=bool)
    for p in portions.include:
        chosen |= space.buckets_of(p)
    for p in portions.exclude:
        chosen &= ~space.buckets_of(p)
    return chosen


def as_halves(values: list[int]) -> np.ndarray:
    return np.array([[v >> 64, v & U64] for v in values], dtype=np.uint64).reshape(-1, 2)


# Portion ----------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "10.0.0.0/8",
        "0.0.0.0/0",
        "1.2.3.4/32",
        "0.0.0.1/0.0.0.3",
        "10.0.0.2/255.0.0.3",
        "2001:db8::/32",
        "::/0",
        "::1/::3",
        "2001:db8::5/ffff:ffff::7",
    ],
)
def test_portion_text_round_trip(text: str) -> None:
    portion = Portion.parse(text)
    assert str(portion) == text
    assert Portion.parse(str(portion)) == portion


@given(st.sampled_from([4, 6]), st.data())
def test_portion_round_trip_any_mask(family: int, data: st.DataObject) -> None:
    width = 32 if family == 4 else 128
    mask = data.draw(st.integers(0, (1 << width) - 1))
    value = data.draw(st.integers(0, (1 << width) - 1)) & mask
    portion = Portion(family, value, mask)
    assert Portion.parse(str(portion)) == portion
    assert portion.fraction() == Fraction(1, 1 << bin(mask).count("1"))


def test_portion_prefix_prints_as_prefix_length() -> None:
    assert str(Portion(4, 0x0A000000, 0xFF000000)) == "10.0.0.0/8"
    assert str(Portion(4, 1, 3)) == "0.0.0.1/0.0.0.3"


def test_portion_contains() -> None:
    odd = Portion.parse("0.0.0.1/0.0.0.1")
    assert odd.contains("10.0.0.1") and odd.contains(0x0A000003)
    assert not odd.contains("10.0.0.2")
    net = Portion.parse("2001:db8::/32")
    assert net.contains(ipaddress.IPv6Address("2001:db8::1"))
    assert not net.contains("2001:db9::1")
    with pytest.raises(SpaceError, match="not an IPv4 address"):
        odd.contains("::1")


@given(st.integers(0, (1 << 32) - 1), st.integers(0, (1 << 32) - 1), st.integers(0, 2**32 - 1))
def test_portion_contains_is_value_mask_match(value: int, mask: int, addr: int) -> None:
    portion = Portion(4, value & mask, mask)
    assert portion.contains(addr) == (addr & mask == value & mask)


def test_portion_fraction() -> None:
    assert Portion.parse("10.0.0.0/8").fraction() == Fraction(1, 256)
    assert Portion.parse("0.0.0.1/0.0.0.3").fraction() == Fraction(1, 4)
    assert Portion.parse("::/0").fraction() == 1
    assert Portion.parse("::/128").fraction() == Fraction(1, 1 << 128)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10.0.0.0", "expected VALUE/PREFIXLEN or VALUE/MASK"),
        ("10.0.0.0/33", "prefix length 33 > 32"),
        ("::/129", "prefix length 129 > 128"),
        ("10.0.0.1/8", "value has bits outside the mask"),
        ("0.0.0.3/0.0.0.1", "value has bits outside the mask"),
        ("banana/8", "portion 'banana/8'"),
        ("10.0.0.0/banana", "portion '10.0.0.0/banana'"),
        ("10.0.0.0/", "portion '10.0.0.0/'"),
        ("10.0.0.0/::1", "not an IPv4 address"),
        # Non-ASCII digits are digits to str.isdigit() but not to int().
        ("10.0.0.0/²", "portion '10.0.0.0/²'"),
        ("10.0.0.0/-8", "portion '10.0.0.0/-8'"),
    ],
)
def test_portion_parse_errors(text: str, message: str) -> None:
    with pytest.raises(SpaceError, match=message):
        Portion.parse(text)


def test_portion_constructor_checks() -> None:
    with pytest.raises(SpaceError, match="family must be 4 or 6"):
        Portion(5, 0, 0)
    with pytest.raises(SpaceError, match="out of range"):
        Portion(4, 0, 1 << 32)
    with pytest.raises(SpaceError, match="has bits outside mask"):
        Portion(4, 1, 2)


def test_address_to_int() -> None:
    assert address_to_int("0.0.0.1", 4) == 1
    assert address_to_int(ipaddress.IPv6Address("::2"), 6) == 2
    with pytest.raises(SpaceError, match="not an IPv4 address"):
        address_to_int(1 << 32, 4)
    with pytest.raises(SpaceError, match="does not appear to be"):
        address_to_int("nope", 4)
    with pytest.raises(SpaceError, match="::2 is not an IPv4 address"):
        address_to_int(ipaddress.IPv6Address("::2"), 4)
    with pytest.raises(SpaceError, match=r"10\.0\.0\.1 is not an IPv6 address"):
        address_to_int(ipaddress.IPv4Address("10.0.0.1"), 6)


# AddressSpace -----------------------------------------------------------


def test_low_index_field_interleaves() -> None:
    space = AddressSpace.create("10.0.0.0/8", 4)
    assert (space.shift, space.bits, space.interleave) == (0, 4, True)
    assert space.index_mask == 0xF
    # Consecutive buckets fix the lowest address bits: bucket 1 is addr & 0xF == 8.
    assert space.bucket("10.0.0.8") == 1
    assert space.block(0, 8) == Portion.parse("10.0.0.0/255.0.0.1")
    assert space.block(8, 8) == Portion.parse("10.0.0.1/255.0.0.1")


def test_high_index_field_is_contiguous() -> None:
    space = AddressSpace.create("10.0.0.0/8", 4, "high")
    assert (space.shift, space.interleave) == (20, False)
    assert space.bucket("10.16.0.0") == 1
    assert space.block(0, 8) == Portion.parse("10.0.0.0/9")
    assert space.block(8, 8) == Portion.parse("10.128.0.0/9")
    assert str(space) == "10.0.0.0/8 in 16 buckets (address bits 20..23)"


def test_ipv6_index_fields() -> None:
    low = AddressSpace.create("2001:db8::/32", 16)
    assert low.bucket("2001:db8::8000") == 1
    high = AddressSpace.create("2001:db8::/48", 16, "high")
    assert high.shift == 64
    assert high.bucket("2001:db8:0:1::") == 1


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: AddressSpace.create("10.0.0.0/24", 16), "overlap the prefix"),
        (lambda: AddressSpace(Portion.parse("10.0.0.0/8"), 16, 16), "overlap the prefix"),
        (lambda: AddressSpace.create("10.0.0.0/24", 16, "high"), "does not fit 32 bits"),
        (lambda: AddressSpace.create(bits=25), "index bits must be 1..24"),
        (lambda: AddressSpace.create(bits=0), "index bits must be 1..24"),
        (lambda: AddressSpace(Portion.parse("::/0"), 8, 121), "does not fit 128 bits"),
        (lambda: AddressSpace.create("0.0.0.1/0.0.0.1"), "must be a prefix"),
        (lambda: AddressSpace(Portion.parse("0.0.0.0/1.0.0.0"), 8), "must be a prefix"),
        (lambda: AddressSpace.create(index="middle"), "index must be 'low' or 'high'"),  # type: ignore[arg-type]
        (lambda: AddressSpace.create("10.0.0.0/8x"), "portion"),
    ],
)
def test_bad_spaces_refused(build: object, message: str) -> None:
    with pytest.raises(SpaceError, match=message):
        build()  # type: ignore[operator]


def test_buckets_of() -> None:
    space = AddressSpace.create("10.0.0.0/8", 4)
    odd = space.buckets_of(Portion.parse("0.0.0.1/0.0.0.1"))
    assert odd.sum() == 8 and odd[8:].all()
    # A portion coarser than the prefix holds every bucket; a disjoint one none.
    assert space.buckets_of(Portion.parse("0.0.0.0/0")).all()
    assert not space.buckets_of(Portion.parse("11.0.0.0/8")).any()
    with pytest.raises(SpaceError, match="finer than this space's buckets"):
        space.buckets_of(Portion.parse("0.0.0.16/0.0.0.16"))
    with pytest.raises(SpaceError, match="finer than this space's buckets"):
        space.buckets_of(Portion.parse("10.0.0.0/16"))
    with pytest.raises(SpaceError, match="is not IPv4"):
        space.buckets_of(Portion.parse("::/0"))


def random_selection(space: AddressSpace, seed: int, density: float, blocks: int) -> np.ndarray:
    """Random buckets, or a union of aligned runs and stripes with holes punched in
    (the shapes that need both include and exclude portions)."""
    rng = np.random.default_rng(seed)
    if not blocks:
        return rng.random(space.buckets) < density
    selected = np.zeros(space.buckets, dtype=bool)
    for _ in range(blocks):
        size = 1 << int(rng.integers(0, space.bits))
        start = int(rng.integers(0, space.buckets // size)) * size
        if rng.random() < 0.5:
            selected[start : start + size] = True
        else:
            selected[start % (space.buckets // size) :: space.buckets // size] = True
    selected[rng.random(space.buckets) < density / 20] ^= True
    return selected


@pytest.mark.parametrize("space", SPACES, ids=str)
@settings(max_examples=40)
@given(st.integers(0, 2**32 - 1), st.floats(0, 1), st.integers(0, 6))
def test_cover_selects_exactly(space: AddressSpace, seed: int, density: float, blocks: int) -> None:
    selected = random_selection(space, seed, density, blocks)
    cover = space.cover(selected)
    assert np.array_equal(select(space, cover), selected)
    for portion in (*cover.include, *cover.exclude):
        assert Portion.parse(str(portion)) == portion


def _fewest_runs(selected: list[bool], inside: bool) -> int:
    """The definition the trie costs compute, by plain recursion: the fewest
    include/exclude runs selecting exactly `selected`, starting inside an include
    or not (one flip each way on any root-to-leaf path)."""
    n, count = len(selected), sum(selected)
    if inside:
        if count == n:
            return 0
        if count == 0:
            return 1
    else:
        if count == 0:
            return 0
        if count == n:
            return 1
    half = n // 2
    split = _fewest_runs(selected[:half], inside) + _fewest_runs(selected[half:], inside)
    if inside:
        return split
    flip = 1 + _fewest_runs(selected[:half], True) + _fewest_runs(selected[half:], True)
    return min(split, flip)


@settings(max_examples=200)
@given(st.integers(0, 6), st.integers(0, 2**32 - 1), st.floats(0, 1))
def test_trie_costs_match_the_definition(bits: int, seed: int, density: float) -> None:
    selected = np.random.default_rng(seed).random(1 << bits) < density
    assert _TrieCosts(selected).total == _fewest_runs(selected.tolist(), False)


def test_cover_is_small_for_aligned_sets() -> None:
    space = AddressSpace.create()
    evens = np.zeros(space.buckets, dtype=bool)
    evens[: space.buckets // 2] = True
    assert str(space.cover(evens)) == "0.0.0.0/0.0.0.1"
    all_but_one = np.ones(space.buckets, dtype=bool)
    all_but_one[5] = False
    cover = space.cover(all_but_one)
    assert len(cover.include) == 1 and len(cover.exclude) == 1
    with pytest.raises(SpaceError, match="must have 65536 entries"):
        space.cover(np.ones(4, dtype=bool))


# Allocation -------------------------------------------------------------


def test_allocation_refuses_holes_and_bad_lists() -> None:
    space = AddressSpace.create(bits=2)
    with pytest.raises(SpaceError, match="every bucket of the space must be served"):
        Allocation(space, ("a",), np.array([0, 0, 0, -1], dtype=np.int32))
    with pytest.raises(SpaceError, match="duplicate server ids"):
        Allocation(space, ("a", "a"), np.zeros(4, dtype=np.int32))
    with pytest.raises(SpaceError, match="sorted order"):
        Allocation(space, ("b", "a"), np.zeros(4, dtype=np.int32))
    with pytest.raises(SpaceError, match="must have 4 entries"):
        Allocation(space, ("a",), np.zeros(3, dtype=np.int32))
    with pytest.raises(SpaceError, match="add up to 3"):
        Allocation.from_counts(space, [("a", 3)])


def test_from_portions_refuses_overlap_and_gaps() -> None:
    space = AddressSpace.create(bits=4)
    odd = PortionSet((Portion.parse("0.0.0.1/0.0.0.1"),))
    low = PortionSet((Portion.parse("0.0.0.0/0.0.0.3"),))
    with pytest.raises(SpaceError, match="overlap"):
        Allocation.from_portions(space, {"a": odd, "b": odd})
    with pytest.raises(SpaceError, match=r"no server serves 0\.0\.0\.2/0\.0\.0\.3"):
        Allocation.from_portions(space, {"a": odd, "b": low})
    everything = PortionSet((Portion.parse("0.0.0.0/0"),), (Portion.parse("0.0.0.1/0.0.0.1"),))
    alloc = Allocation.from_portions(space, {"a": odd, "b": everything})
    assert alloc.shares() == {"a": Fraction(1, 2), "b": Fraction(1, 2)}
    assert alloc.owner("1.2.3.5") == "a" and alloc.owner("1.2.3.4") == "b"


def test_owner_outside_prefix_is_none() -> None:
    space = AddressSpace.create("10.0.0.0/8", 4)
    alloc = Allocation.from_counts(space, [("a", 8), ("b", 8)])
    assert alloc.owner("10.0.0.1") == "b"
    assert alloc.owner("11.0.0.1") is None
    found = alloc.owner_many(np.array([0x0A000001, 0x0B000001], dtype=np.uint32))
    assert found.tolist() == [1, -1]


@pytest.mark.parametrize(
    ("servers", "dtype"),
    [(1, np.int8), (127, np.int8), (128, np.int16), (32767, np.int16), (32768, np.int32)],
)
def test_owners_take_the_narrowest_type_that_holds_every_index(servers: int, dtype: type) -> None:
    assert owner_dtype(servers) is dtype
    assert np.iinfo(dtype).max >= servers and np.iinfo(dtype).min <= -1


def test_an_allocation_of_a_few_servers_keeps_a_byte_a_bucket() -> None:
    """A server keeps its last few allocations and a router one or two: on 2**16
    buckets, 64 KiB each rather than 256 (docs/soak.md, finding 32)."""
    space = AddressSpace(Portion(4, 0, 0), bits=16)
    alloc = Allocation.from_counts(space, [(f"s{i}", 2**16 // 8) for i in range(8)])
    assert alloc.owners.dtype == np.int8 and alloc.owners.nbytes == 2**16
    assert not alloc.owners.flags.writeable
    assert alloc.count("s7") == 2**13 and alloc.owner("0.0.0.7") == "s7"
    rebuilt = Allocation(space, alloc.servers, alloc.owners.astype(np.int64))
    assert rebuilt == alloc and rebuilt.digest() == alloc.digest()


def test_an_index_past_the_servers_is_refused_before_it_is_narrowed() -> None:
    space = AddressSpace(Portion(4, 0, 0), bits=8)
    servers = tuple(f"s{i:03}" for i in range(200))
    owners = np.arange(256, dtype=np.int64) % 200
    wide = Allocation(space, servers, owners)
    assert wide.owners.dtype == np.int16 and wide.owners.tolist() == owners.tolist()
    owners[5] = 300  # 44 as an int8: it must not wrap into a valid index
    with pytest.raises(SpaceError, match="no owner"):
        Allocation(space, servers, owners)
    with pytest.raises(SpaceError, match="no owner"):
        Allocation(space, servers[:10], np.where(owners == 300, -1, owners % 10))


@pytest.mark.parametrize("space", SPACES, ids=str)
@settings(max_examples=40)
@given(seed=st.integers(0, 2**32 - 1), data=st.data())
def test_owner_many_agrees_with_owner(space: AddressSpace, seed: int, data: st.DataObject) -> None:
    width = space.prefix.width
    owners = np.random.default_rng(seed).integers(0, 5, space.buckets).astype(np.int32)
    alloc = Allocation(space, tuple("abcde"), owners)
    inside = data.draw(st.lists(addresses_in(space), min_size=1, max_size=40))
    anywhere = data.draw(st.lists(st.integers(0, (1 << width) - 1), max_size=40))
    addrs = inside + anywhere
    expected = [
        -1 if (name := alloc.owner(a)) is None else alloc.servers.index(name) for a in addrs
    ]
    batch = np.array(addrs, dtype=np.uint32) if width == 32 else as_halves(addrs)
    assert alloc.owner_many(batch).tolist() == expected
    assert all(e >= 0 for e in expected[: len(inside)])


def test_owner_many_large_random_batches() -> None:
    rng = np.random.default_rng(7)
    for space in SPACES:
        owners = rng.integers(0, 5, space.buckets).astype(np.int32)
        alloc = Allocation(space, tuple("abcde"), owners)
        if space.family == 4:
            batch = rng.integers(0, 1 << 32, 2000, dtype=np.uint64).astype(np.uint32)
            if space.prefix.mask:
                batch[::2] = (batch[::2] & ~np.uint32(space.prefix.mask)) | np.uint32(
                    space.prefix.value
                )
            values = [int(a) for a in batch]
        else:
            batch = rng.integers(0, 1 << 63, (2000, 2), dtype=np.uint64) * np.uint64(2) + (
                rng.integers(0, 2, (2000, 2), dtype=np.uint64)
            )
            hi, lo = space.prefix.value >> 64, space.prefix.value & U64
            hm, lm = space.prefix.mask >> 64, space.prefix.mask & U64
            batch[::2, 0] = (batch[::2, 0] & np.uint64(~hm & U64)) | np.uint64(hi)
            batch[::2, 1] = (batch[::2, 1] & np.uint64(~lm & U64)) | np.uint64(lo)
            values = [(int(h) << 64) | int(low) for h, low in batch]
        found = alloc.owner_many(batch)
        expected = [-1 if (n := alloc.owner(v)) is None else "abcde".index(n) for v in values]
        assert found.tolist() == expected, space
        if space.prefix.mask:
            assert (found[::2] >= 0).all() and (found == -1).any()


def test_owner_many_refuses_bad_ipv6_shape() -> None:
    alloc = Allocation.from_counts(AddressSpace.create("::/0", 2), [("a", 4)])
    with pytest.raises(SpaceError, match=r"\(n, 2\) array"):
        alloc.owner_many(np.zeros(3, dtype=np.uint64))


def test_portions_name_what_the_server_owns() -> None:
    space = AddressSpace.create(bits=16)
    alloc = Allocation.from_counts(space, [("a", 16384), ("b", 16384), ("c", 32768)])
    assert str(alloc.portions("a")) == "0.0.0.0/0.0.0.3"
    assert str(alloc.portions("b")) == "0.0.0.2/0.0.0.3"
    assert str(alloc.portions("c")) == "0.0.0.1/0.0.0.1"
    assert alloc.portions("a") is alloc.portions("a")
    with pytest.raises(SpaceError, match="'z' is not a server"):
        alloc.portions("z")


def test_diff_and_moved_share() -> None:
    space = AddressSpace.create(bits=4, index="high")
    old = Allocation.from_counts(space, [("a", 8), ("b", 8)])
    new = Allocation.from_counts(space, [("a", 6), ("b", 8), ("c", 2)])
    moves = diff(old, new)
    assert [(m.source, m.target, m.buckets) for m in moves] == [("a", "b", 2), ("b", "c", 2)]
    assert str(moves[0].portions) == "96.0.0.0/3"
    assert moved_share(old, new) == Fraction(4, 16) == sum(m.share for m in moves)
    other = Allocation.from_counts(AddressSpace.create(bits=4), [("a", 16)])
    with pytest.raises(SpaceError, match="different address spaces"):
        diff(old, other)
    with pytest.raises(SpaceError, match="different address spaces"):
        moved_share(old, other)


def test_digest_and_equality() -> None:
    space = AddressSpace.create(bits=8)
    one = Allocation.from_counts(space, [("a", 100), ("b", 156)])
    two = Allocation.from_counts(space, [("a", 100), ("b", 156)])
    three = Allocation.from_counts(space, [("a", 101), ("b", 155)])
    assert one == two and one.digest() == two.digest() and hash(one) == hash(two)
    assert one != three and one.digest() != three.digest()
    assert len(one.digest()) == 16


def test_digest_tells_bucket_orders_apart() -> None:
    # The same owners over the same bits mean different clients when the bucket
    # order differs, so servers comparing digests must see a difference.
    prefix = Portion.parse("0.0.0.0/0")
    owners = np.repeat(np.array([0, 1], dtype=np.int32), 128)
    interleaved = Allocation(AddressSpace(prefix, 8, 0, True), ("a", "b"), owners)
    ordered = Allocation(AddressSpace(prefix, 8, 0, False), ("a", "b"), owners)
    assert interleaved.owner("0.0.0.1") != ordered.owner("0.0.0.1")
    assert interleaved.digest() != ordered.digest()


def test_owners_are_read_only() -> None:
    alloc = Allocation.from_counts(AddressSpace.create(bits=2), [("a", 4)])
    with pytest.raises(ValueError, match="read-only"):
        alloc.owners[0] = 1


def test_a_cover_leaves_nothing_for_the_cycle_collector() -> None:
    """Every server covers its share at every allocation change. A cover that left a
    reference cycle kept its tries' arrays (some MB on 2**16 buckets) until the
    collector's oldest generation ran: the infrastructure's memory grew over a D
    soak's first ten minutes (docs/soak.md, finding 32; seed 20261201)."""
    import gc

    space = AddressSpace(Portion(4, 0, 0), bits=16)
    selected = np.zeros(space.buckets, dtype=bool)
    selected[::3] = True
    selected[1000:9000] = True
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        cover = space.cover(selected)
        assert gc.collect() == 0
    finally:
        if was:
            gc.enable()
    assert np.array_equal(
        np.logical_or.reduce([space.buckets_of(p) for p in cover.include])
        & ~np.logical_or.reduce(
            [space.buckets_of(p) for p in cover.exclude] or [np.zeros(1, bool)]
        ),
        selected,
    )
