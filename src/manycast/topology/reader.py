"""Reading TOML tables with types and bounds, naming the file's line of every problem."""

from __future__ import annotations

import ipaddress
import re
from typing import Any, NoReturn

from manycast.errors import ConfigError

NAME = re.compile(r"^[a-z][a-z0-9_-]{0,30}$")


class TopologyError(ConfigError):
    """A topology file that cannot be used; the message names the line."""


def fail_at(source: str, line: int, message: str) -> NoReturn:
    """Raise a TopologyError for `line` of `source` (0: the file as a whole)."""
    where = f"{source}:{line}" if line else source
    raise TopologyError(f"{where}: {message}")


class Lines:
    """Finds the line of a table or key in the source, for error messages.

    tomllib returns plain data without positions, so the lines are found again in
    the text: the `index`-th `[[kind]]` header (or `[kind]`), then a key below it."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()

    def table(self, kind: str, index: int | None = None) -> int:
        pattern = re.compile(
            rf"^\s*\[\[\s*{re.escape(kind)}\s*\]\]"
            if index is not None
            else rf"^\s*\[\s*{re.escape(kind)}\s*\]"
        )
        seen = -1
        for number, line in enumerate(self.lines, 1):
            if pattern.match(line):
                seen += 1
                if index is None or seen == index:
                    return number
        return 0

    def key(self, kind: str, index: int | None, key: str) -> int:
        start = self.table(kind, index)
        pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
        for number in range(start + 1 if start else 1, len(self.lines) + 1):
            line = self.lines[number - 1]
            if start and number > start and re.match(r"^\s*\[", line):
                break
            if pattern.match(line):
                return number
        return start


class TableReader:
    """Typed access to one TOML table, raising TopologyError with a line.

    Every key read is remembered, so `done()` can refuse the ones nobody asked for
    (a misspelt key is an error, not a silent default)."""

    def __init__(self, source: str, lines: Lines, kind: str, index: int | None, table: Any):
        self.source, self.lines, self.kind, self.index = source, lines, kind, index
        where = f"[[{kind}]] #{index + 1}" if index is not None else f"[{kind}]"
        if not isinstance(table, dict):
            self.fail(f"{where} must be a table")
        self.table: dict[str, Any] = table
        self.used: set[str] = set()

    def line(self, key: str | None = None) -> int:
        """The line of `key` in this table, or of the table's header."""
        if key:
            return self.lines.key(self.kind, self.index, key)
        return self.lines.table(self.kind, self.index)

    def fail(self, message: str, key: str | None = None) -> NoReturn:
        fail_at(self.source, self.line(key), message)

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        self.used.add(key)
        if key not in self.table:
            if default is ...:
                self.fail(f"[{self.kind}] needs '{key}'")
            return default
        value = self.table[key]
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            self.fail(f"'{key}' must be {kind_name(kind)}, not a boolean", key)
        if not isinstance(value, kind):
            self.fail(f"'{key}' must be {kind_name(kind)}, not {type(value).__name__}", key)
        return value

    def number(
        self, key: str, default: Any = ..., low: float | None = None, high: float | None = None
    ) -> float:
        value = float(self.get(key, (int, float), default))
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = (
                f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
            )
            self.fail(f"'{key}' = {value} is outside {bounds}", key)
        return value

    def whole(
        self, key: str, default: Any = ..., low: float | None = None, high: float | None = None
    ) -> int:
        """`number`, which must also be a whole number (3.0 is 3; 2.5 is refused)."""
        value = self.number(key, default, low, high)
        if value != int(value):
            self.fail(f"'{key}' = {value} must be a whole number", key)
        return int(value)

    def name(self, key: str = "name") -> str:
        value: str = self.get(key, str)
        if not NAME.match(value):
            self.fail(
                f"'{key}' = {value!r}: use lower-case letters, digits, '-' or '_' (max 31)", key
            )
        return value

    def address(
        self, key: str, default: Any = ..., family: int = 4
    ) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        """An address of `family` (the pool's: its space's)."""
        text = self.get(key, str, default)
        try:
            return ipaddress.IPv4Address(text) if family == 4 else ipaddress.IPv6Address(text)
        except ValueError:
            self.fail(f"'{key}' = {text!r} is not an IPv{family} address{_WHY[family]}", key)

    def network(
        self, key: str, default: Any = ..., family: int = 4
    ) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
        """A network of `family` (the pool's: its space's; 0, a dual-stack pool's:
        either), or None when absent."""
        text = self.get(key, str, default)
        if text is None:
            return None
        try:
            network = ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            self.fail(f"'{key}' = {text!r}: {exc}", key)
        if family and network.version != family:
            self.fail(f"'{key}' = {text!r} is not an IPv{family} network{_WHY[family]}", key)
        return network

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            self.fail(f"unknown key '{unknown[0]}' in [{self.kind}]", unknown[0])


# Why a value must be of one family: every address of a topology is of its pool's.
_WHY = {4: "", 6: " (the pool's space is IPv6: every address of the topology is IPv6)"}


def kind_name(kind: type | tuple[type, ...]) -> str:
    """How an error message names a TOML type: 'a number', 'a string or a table'."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {
        int: "a number",
        float: "a number",
        str: "a string",
        bool: "true or false",
        list: "a list",
        dict: "a table",
    }
    return " or ".join(sorted({names.get(k, k.__name__) for k in kinds}))
