"""A router's pool keys kept on disk across its restarts, as a resolver's cache.

A router that starts knows no key. If the DNS server is down at that moment, it
could admit no signed join until DNS answered again (docs/soak.md, finding 8),
although it had validated the keys before it died. With a key cache, each key the
router gets from DNS is written to a small JSON file, and a router that starts
loads the file: each key it finds is past its TTL at once (asked for again at the
first join that needs it) but stays in use while DNS gives no answer, up to the
time the file says (RFC 8767's serve-stale limit, counted from the answer). An
answer that the record is gone or bad ends it, as for a key held since the start.

The file holds public keys, nothing secret; whoever can write it can already run
the router. A file that cannot be read is reported and left out (the router then
starts with no key, as without a cache), and is replaced at the next answer.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any

_log = logging.getLogger(__name__)

FORMAT = 1


@dataclass(frozen=True)
class CachedKey:
    group: int
    public_key: bytes
    stale_until: float  # wall-clock time (seconds since the epoch)


class KeyCacheError(ValueError):
    """The cache file is not one this version wrote."""


class KeyCache:
    """The keys of one router, in `path` (written whole, atomically, at each change)."""

    def __init__(self, path: Path, max_stale: float, clock: Any = time.time) -> None:
        self.path = path
        self.max_stale = max_stale
        self._clock = clock
        self._keys: dict[int, CachedKey] = {}

    def load(self) -> list[CachedKey]:
        """The keys the file holds that may still be served stale (none if there is no
        file; a file that cannot be read is logged and left out)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        except OSError as exc:
            _log.warning("key cache %s cannot be read: %s", self.path, exc)
            return []
        try:
            keys = decode(text)
        except KeyCacheError as exc:
            _log.warning("key cache %s is left out: %s", self.path, exc)
            return []
        now = self._clock()
        self._keys = {k.group: k for k in keys if k.stale_until > now}
        return list(self._keys.values())

    def remember(self, group: int, public_key: bytes, ttl: float) -> None:
        """A key DNS gave (valid `ttl` seconds from now): kept until its stale limit."""
        until = self._clock() + max(ttl, 0.0) + self.max_stale
        held = self._keys.get(group)
        if held is not None and held.public_key == public_key and held.stale_until >= until - 60:
            return  # the same key, its limit moved by less than a minute: no write
        self._keys[group] = CachedKey(group, public_key, until)
        self._write()

    def forget(self, group: int) -> None:
        """DNS said the record is gone or bad: the key must not outlive a restart."""
        if self._keys.pop(group, None) is not None:
            self._write()

    def _write(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_name(self.path.name + ".new")
            partial.write_text(encode(self._keys.values()))
            os.replace(partial, self.path)
        except OSError as exc:  # a full disk must not stop the router
            _log.warning("key cache %s cannot be written: %s", self.path, exc)


def encode(keys: Any) -> str:
    return json.dumps(
        {
            "format": FORMAT,
            "keys": {
                str(ip_address(k.group)): {"key": k.public_key.hex(), "stale_until": k.stale_until}
                for k in sorted(keys, key=lambda k: k.group)
            },
        },
        indent=1,
    )


def decode(text: str) -> list[CachedKey]:
    """The keys in a cache file's text; `KeyCacheError` saying what is wrong."""
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise KeyCacheError(f"not JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise KeyCacheError(f"not a key cache of format {FORMAT}")
    entries = document.get("keys")
    if not isinstance(entries, dict):
        raise KeyCacheError('"keys" is not a table')
    keys = []
    for group, entry in entries.items():
        try:
            address = int(ip_address(group))
            raw = bytes.fromhex(entry["key"])
            until = float(entry["stale_until"])
        except (ValueError, TypeError, KeyError) as exc:
            raise KeyCacheError(f"entry {group!r}: {exc}") from None
        if len(raw) != 32:
            raise KeyCacheError(f"entry {group!r}: a key of {len(raw)} bytes, not 32")
        keys.append(CachedKey(address, raw, until))
    return keys
