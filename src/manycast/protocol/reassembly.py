"""A router's reassembly of split membership reports, sans-I/O.

A server whose portions do not fit one packet sends its report as parts 0 to
n - 1 of one generation (`wire/report_split.py`, RFC 3376 §4.2.16), each signed
on its own. The router holds the admitted parts and acts on the report only when
it has them all, as the one report they were cut from.

Why assemble rather than apply each part as it comes (RFC 3376's reading, where
a current-state record adds its sources, refreshes their timers and lets the
others age out): a member's filter here is *replaced* by its current-state
report, and a Claim 3 change (leave the old portions, join the new ones) must
happen at once. Applied part by part, the first part of a current-state report
would drop every portion named in the later parts, and a change would pass
through states that are neither the old filter nor the new one (some of the
clients forwarded to nobody, or to two servers) until the last part came. Held
and applied whole, the change happens when the last part arrives, the moment the
unsplit report would have been complete, and the filter is exactly the unsplit
report's. A lost part loses that generation, as a lost fragment would lose an
unsplit report; the next current-state report, sent every report interval,
repairs it, and meanwhile each part that does arrive keeps the member's existing
membership alive (`Router._keep_alive`).

Parts are matched by requester, generation, timestamp and part count (a restarted
server counting generations from 0 again has a new timestamp). A generation not
complete within `hold` seconds is dropped, and so is the oldest when more than
`limit` parts are held, so a sender of endless first parts holds little.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from manycast.wire.membership import GroupRecord, SignedJoin

MAX_HELD_PARTS = 4096  # ~6 MB of 1500-byte reports at most


@dataclass
class _Held:
    expires: float
    parts: dict[int, tuple[GroupRecord, ...]] = field(default_factory=dict)


@dataclass
class ReassemblyStats:
    completed: int = 0  # split reports whose parts all came
    expired: int = 0  # generations dropped before their last part
    evicted: int = 0  # generations dropped to stay within the limit


class Reassembly:
    def __init__(self, hold: float, limit: int = MAX_HELD_PARTS) -> None:
        self.hold = hold
        self.limit = limit
        self.stats = ReassemblyStats()
        self._held: dict[tuple[int, int, int, int], _Held] = {}
        self._count = 0  # parts held

    def add(
        self, origin: int, signed: SignedJoin, records: tuple[GroupRecord, ...], now: float
    ) -> tuple[GroupRecord, ...] | None:
        """One admitted part of `origin`'s report: the whole report's records, in
        part order, once every part has come; None until then."""
        self._sweep(now)
        key = (origin, signed.generation, signed.timestamp, signed.parts)
        held = self._held.get(key)
        if held is None:
            held = self._held[key] = _Held(now + self.hold)
        if signed.part not in held.parts:
            self._count += 1
        held.parts[signed.part] = records
        if len(held.parts) < signed.parts:
            while self._count > self.limit:
                self._drop(next(iter(self._held)))
                self.stats.evicted += 1
            return None
        self._drop(key)
        self.stats.completed += 1
        return tuple(record for part in range(signed.parts) for record in held.parts[part])

    def __len__(self) -> int:
        """Generations waiting for parts."""
        return len(self._held)

    def _sweep(self, now: float) -> None:
        lapsed = [key for key, held in self._held.items() if held.expires <= now]
        for key in lapsed:
            self._drop(key)
        self.stats.expired += len(lapsed)

    def _drop(self, key: tuple[int, int, int, int]) -> None:
        self._count -= len(self._held.pop(key).parts)
