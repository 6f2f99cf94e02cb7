"""`soak.py --census-heap`'s census (`bench/_heap_census.py`): the live bytes that
grew between its mark and its end, by the attribute or type that holds them."""

from __future__ import annotations

import gc
import importlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from manycast.policy import equal_split
from manycast.space import AddressSpace, Allocation, Portion

BENCH = Path(__file__).resolve().parent.parent / "bench"
SPACE = AddressSpace(Portion(4, 0, 0), bits=16)  # 65536 buckets: 64 KiB of owners each


@pytest.fixture
def heap_census(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("_heap_census")


def _allocations(count: int) -> list[Allocation]:
    return [equal_split(SPACE, [f"s{i}", f"t{i}"]) for i in range(count)]


def test_what_an_attribute_of_ours_holds_counts_under_it_and_freed_objects_do_not(
    heap_census: ModuleType,
) -> None:
    before = _allocations(5)  # alive at the mark and at the end: not growth
    gc.collect()  # no earlier test's garbage freed between the counts (the total's)
    census = heap_census.HeapCensus()
    census.mark(at=60.0)
    kept = _allocations(30)
    freed = [bytearray(50_000) for _ in range(40)]  # 2 MB gone before the end
    del freed
    rows = census.growth()
    assert census.marked_at == 60.0
    assert census.paused_s is not None and census.paused_s > 0  # it walked every object
    owner, kib, objects = rows[0]
    assert owner == "Allocation.owners"
    assert objects == 30
    assert 30 * 64 <= kib <= 30 * 65  # each array: a byte a bucket (two servers), a header
    assert not any(name.startswith("bytearray") and grown > 100 for name, grown, _ in rows)
    assert len(before) + len(kept) == 35
    # Every owner's growth together: the kept allocations, and what the freed ones
    # gave back (each Allocation's own table was counted in the first census too).
    total_kib, total_objects = census.total
    assert 30 * 64 <= total_kib <= 40 * 65 and total_objects > 0, census.total


def test_objects_held_elsewhere_count_under_their_type_and_their_holders(
    heap_census: ModuleType,
) -> None:
    census = heap_census.HeapCensus()
    census.mark(at=1.0)
    kept = [bytearray(10_000) for _ in range(100)]  # in a list, no attribute of ours
    rows = {name: (kib, objects) for name, kib, objects in census.growth()}
    kib, objects = rows["bytearray in list"]
    assert objects >= 100 and kib >= 100 * 10_000 / 1024
    assert len(kept) == 100


def test_what_a_cached_property_computed_counts_under_its_name(
    heap_census: ModuleType,
) -> None:
    census = heap_census.HeapCensus()
    census.mark(at=1.0)
    kept = _allocations(10)
    for allocation in kept:
        allocation.owner_many(np.arange(100))  # computes `_by_field`: a second table
    rows = {name: (kib, objects) for name, kib, objects in census.growth()}
    assert rows["Allocation._by_field"][1] == 10
    assert rows["Allocation._by_field"][0] >= 10 * 64


def test_without_a_mark_there_is_no_growth(heap_census: ModuleType) -> None:
    assert heap_census.HeapCensus().growth() == []


def test_counting_gives_no_instance_a_dict_of_its_own(heap_census: ModuleType) -> None:
    """Asking for `__dict__` would make one for every instance that keeps its
    attributes inline: the census would grow what it counts."""
    kept = _allocations(1)[0]
    inline = [type(held) for held in gc.get_referents(kept)]
    heap_census.census()
    assert [type(held) for held in gc.get_referents(kept)] == inline
    assert dict not in inline


def _recorder() -> Callable[[int], None]:
    seen: dict[int, int] = {}

    def record(key: int) -> None:
        seen[key] = key * 1000

    return record


def test_what_a_function_of_ours_closes_over_counts_under_its_name(
    heap_census: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dict a nested function keeps (the soak's own records, a driver's callback)
    is named by the function and the variable, not "dict in cell"."""
    monkeypatch.setattr(heap_census, "OURS", (__name__,))
    record = _recorder()
    census = heap_census.HeapCensus()
    census.mark(at=1.0)
    for key in range(5000):
        record(key)
    rows = {name: (kib, objects) for name, kib, objects in census.growth()}
    assert rows["_recorder.<locals>.record.seen"][0] > 100  # its table grew
    assert rows["int in _recorder.<locals>.record.seen"][1] >= 2 * 5000 - 300
    assert not any(name.endswith("in cell") for name in rows)


def test_a_census_counts_nothing_of_its_own(heap_census: ModuleType) -> None:
    """Its first count (a list per owner), the names it made and the dicts it fills as
    it counts are the census's, not the process's: between a mark and the end that
    nothing else ran between, nothing grew (they were 0.7 MB of "dict in cell", 2000
    to 3000 lists and a dict of 0.4 MB in each pool process of a soak)."""
    heap_census.census()  # a process's first count makes some 15 KiB of code objects, once
    # Counted again up to three times: a thread another test left behind may fill a
    # cache of its own while one count runs (once, 3.7 KiB of tuples in an
    # OrderedDict), while what the census itself keeps would show in every count.
    for _ in range(3):
        census = heap_census.HeapCensus()
        census.mark(at=1.0)
        rows = census.growth(top=10_000)
        grown = [(name, kib, objects) for name, kib, objects in rows if kib > 0]
        if sum(kib for _, kib, _ in grown) < 1:
            break
    assert sum(kib for _, kib, _ in grown) < 1, grown[:10]


class _Holder:
    def __init__(self, held: object) -> None:
        self.held = held


class _Keeper:
    def __init__(self, kept: object) -> None:
        self.kept = kept


def test_an_object_with_two_holders_is_named_alike_in_any_order(
    heap_census: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client's generator is held by the client, its endpoint and its query
    responder; named after whichever the collector listed first, it moved between
    the three from one count to the next and looked like growth ("36 more
    `Client.rng`" in a replay with nothing new)."""
    monkeypatch.setattr(heap_census, "OURS", (__name__,))
    shared = [bytearray(100) for _ in range(1000)]  # a list and what it holds
    holders = (_Holder(shared), _Keeper(shared))
    heap_census.census()  # a process's first count makes some objects of its own, once
    census = heap_census.HeapCensus()
    census.mark(at=1.0)
    listed = gc.get_objects
    monkeypatch.setattr(gc, "get_objects", lambda: list(reversed(listed())))
    rows = census.growth(top=10_000)
    assert [row for row in rows if row[1] > 1] == []
    assert len(holders) == 2
