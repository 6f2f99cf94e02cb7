"""What a pool process's live objects are, by owner (`soak.py --census-heap`).

`_heap_trace` says which lines allocated what a process grew by, but tracing every
allocation slows a busy process several fold, and the faults it then meets (clients
timing out, reconnecting) are not the run's. A census costs nothing between its
two counts: at `mark` and at the end it walks every object the collector tracks and
the untracked objects they hold (strings, numbers, numpy arrays), and adds up
their shallow sizes (`sys.getsizeof`) by owner: an object held in an attribute of
one of our objects counts under that attribute (`Demultiplexer._conns`, the
dict's table; `Allocation.owners`, the array), one a function of ours closes over
under the function and the variable (`...<locals>.sample.epochs`), an untracked one held elsewhere
under its type and its holder's name ("ndarray in list"), any other under its
type. Garbage the cycle collector has not yet reached counts too: the process
holds it (finding 32 was such). Each count takes some 0.3 to 0.5 s and a few MB
for every 400 000 objects, given back after.

Run alone, it prints one json object, its last line on stdout, naming the bench
to run (`_common.not_a_bench`).
"""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
import gc
import sys
import time
from collections.abc import Iterator
from functools import cached_property
from types import CodeType, FunctionType
from typing import Any

TOP = 15  # owners kept in `growth`, the largest growth first
OURS = ("manycast", "_soak", "_pool")  # the modules whose objects' attributes name owners


def census(earlier: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    """Every live object's owner -> [objects, bytes] (module docstring), but the
    census's own: `earlier` (the count it is compared with), the names it made and
    what it knows of each class. Its working dicts are its frame's locals, which no
    object it walks holds. An object with several holders (a client's generator,
    held by the client, its endpoint and its query responder) counts under the
    least of their attributes' names, or its first holder's by address: two counts
    name what both hold alike, whatever order the collector lists objects in."""
    tracked = gc.get_objects()
    tracked.sort(key=id)  # the order the collector lists them in changes between counts
    mine = _own(earlier)
    owners: dict[int, str] = {}
    for obj in tracked:
        if id(obj) in mine:
            continue
        if type(obj) is FunctionType:
            holder, named = obj.__qualname__, _closure(obj)
        else:
            holder, named = type(obj).__qualname__, _attributes(obj)
        for attribute, value in named:
            _claim(owners, id(value), _name(holder, ".", attribute))
    counts: dict[str, list[int]] = {}
    seen = mine  # the walk below never enters the census's own objects

    for obj in tracked:
        if id(obj) in mine:
            continue
        _add(counts, owners.get(id(obj)) or type(obj).__qualname__, sys.getsizeof(obj, 0))
        # Untracked containers (a dict of numbers and arrays, a tuple of strings) hold
        # untracked objects in turn: walked to the end. One no attribute of ours holds
        # is named by its type and the first holder's name ("ndarray in tuple").
        below: list[tuple[object, object]] = []
        _below(below, obj)
        while below:
            held, holder = below.pop()
            if id(held) not in seen:
                seen.add(id(held))
                if id(held) not in owners:
                    name = owners.get(id(holder)) or type(holder).__qualname__
                    owners[id(held)] = _name(type(held).__qualname__, " in ", name)
                _add(counts, owners[id(held)], sys.getsizeof(held, 0))
                _below(below, held)
    del tracked
    return counts


def _below(below: list[tuple[object, object]], holder: object) -> None:
    """The untracked objects `holder` holds, onto `below` with it. Not a comprehension:
    one would close over `holder`, and that cell of the census's frame would count."""
    for held in gc.get_referents(holder):
        if not gc.is_tracked(held):
            below.append((held, holder))


def _claim(owners: dict[int, str], key: int, name: str) -> None:
    """`name` for the object `key` unless it has a lesser one already."""
    held = owners.get(key)
    if held is None or name < held:
        owners[key] = name


def _add(counts: dict[str, list[int]], name: str, size: int) -> None:
    entry = counts.setdefault(name, [0, 0])
    entry[0] += 1
    entry[1] += size


def _own(earlier: dict[str, list[int]] | None) -> set[int]:
    """The ids of the census's own objects: `earlier` and its entries, and the
    module's records of names and classes with what they hold."""
    mine = {id(_NAMED), id(_NAMES), id(_CACHED)}
    for key, name in _NAMED.items():
        mine.update((id(key), id(name)))
    for table in (_NAMES, _CACHED):
        mine.update(id(names) for names in table.values())
    if earlier is not None:
        mine.add(id(earlier))
        mine.update(id(entry) for entry in earlier.values())
    return mine


_NAMED: dict[tuple[str, str, str], str] = {}


def _name(first: str, joint: str, second: str) -> str:
    """One string for each name, not one for each object named by it: a count walks
    some 400 000 objects, and their names would be memory of its own."""
    key = (first, joint, second)
    name = _NAMED.get(key)
    if name is None:
        name = _NAMED[key] = first + joint + second
    return name


def _attributes(obj: object) -> Iterator[tuple[str, object]]:
    """(name, value) of an instance attribute of one of our objects; nothing for any
    other object. Read by name, never through `__dict__`: asking for it would give
    each instance a dict of its own, and so change the memory being counted."""
    kind = type(obj)
    for name in _instance_names(kind):
        try:
            yield name, object.__getattribute__(obj, name)
        except AttributeError:
            continue
    cached = _CACHED.get(kind)
    if cached:  # computed values live in the instance's dict, which they made
        for held in gc.get_referents(obj):
            if type(held) is dict and any(name in held for name in cached):
                yield "__dict__", held
                yield from ((name, held[name]) for name in cached if name in held)
                break


def _closure(function: FunctionType) -> Iterator[tuple[str, object]]:
    """(name, value) of each variable a function of ours closes over: what a nested
    function keeps alive is named after it (`setup.<locals>.sample.epochs`), not
    "dict in cell"."""
    if not function.__closure__ or not str(function.__module__).startswith(OURS):
        return
    for name, cell in zip(function.__code__.co_freevars, function.__closure__, strict=True):
        try:
            yield name, cell.cell_contents
        except ValueError:  # a cell not yet filled
            continue


_NAMES: dict[type, tuple[str, ...]] = {}
_CACHED: dict[type, tuple[str, ...]] = {}  # a class's cached_property names


def _instance_names(kind: type) -> tuple[str, ...]:
    """The names an instance of `kind` may hold values under: slots, dataclass
    fields, and every name its methods use that the class does not define (the
    `self.x` they set), so reading one runs no code of the class; none for a type
    not ours, a class itself, or a class with `__getattr__`."""
    names = _NAMES.get(kind)
    if names is not None:
        return names
    if (
        issubclass(kind, type)
        or not kind.__module__.startswith(OURS)
        or any("__getattr__" in klass.__dict__ for klass in kind.__mro__[:-1])
    ):
        _NAMES[kind] = ()
        return ()
    used: set[str] = set(getattr(kind, "__dataclass_fields__", ()))
    defined: set[str] = set()
    slots: set[str] = set()
    cached: list[str] = []
    for klass in kind.__mro__[:-1]:
        defined.update(klass.__dict__)
        cached.extend(n for n, v in klass.__dict__.items() if isinstance(v, cached_property))
        slots.update(klass.__dict__.get("__slots__", ()))
        for value in klass.__dict__.values():
            for function in (value, getattr(value, "__func__", None), getattr(value, "fget", None)):
                code = getattr(function, "__code__", None)
                if code is not None:
                    used.update(_code_names(code))
    names = tuple(sorted((used - defined) | (slots - {"__dict__", "__weakref__"})))
    _NAMES[kind] = names
    _CACHED[kind] = tuple(cached)
    return names


def _code_names(code: CodeType) -> Iterator[str]:
    """The attribute names a function's code uses or passes as strings, its nested
    functions' too."""
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, str) and const.isidentifier():
            yield const
        elif isinstance(const, CodeType):
            yield from _code_names(const)


class HeapCensus:
    """`mark` then `growth`: the owners whose live bytes grew most between them."""

    def __init__(self) -> None:
        self.marked_at: float | None = None
        self.paused_s: float | None = None  # how long `mark` stopped the process
        self.total: list[Any] | None = None  # every owner's growth: [KiB, objects]
        self._first: dict[str, list[int]] | None = None

    def mark(self, at: float) -> None:
        """The census `growth` compares with, taken at bench time `at`."""
        began = time.monotonic()
        self._first = census()
        self.marked_at = at
        self.paused_s = round(time.monotonic() - began, 2)

    def growth(self, top: int = TOP) -> list[list[Any]]:
        """The `top` owners whose live bytes grew most since `mark`, as [owner, KiB,
        objects]; [] when `mark` never ran (the run ended first)."""
        if self._first is None:
            return []
        rows = []
        now = census(self._first)
        for name, (objects, size) in now.items():
            was_objects, was_size = self._first.get(name, (0, 0))
            rows.append([name, round((size - was_size) / 1024, 1), objects - was_objects])
        rows.sort(key=lambda row: row[1], reverse=True)
        self.total = [
            round((_sum(now, 1) - _sum(self._first, 1)) / 1024, 1),
            _sum(now, 0) - _sum(self._first, 0),
        ]
        return rows[:top]


def _sum(counts: dict[str, list[int]], column: int) -> int:
    """Every owner's objects (0) or bytes (1) together."""
    total = 0
    for entry in counts.values():
        total += entry[column]
    return total


if __name__ == "__main__":
    from _common import not_a_bench

    not_a_bench(__file__, "bench/soak.py")
