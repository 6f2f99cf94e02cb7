"""The one summary schema every run fills, whatever driver hosted it (docs/summary.md).

`manycast demo --json`, `manycast run` and `manycast lab run --json` all print
`summarize(...)`: the same keys, computed the same way from the same records of
what each client saw and what each server did.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from manycast.protocol.client import ClientStats
from manycast.scenario import EventRecord

# Every summary has exactly these keys, in this order.
SUMMARY_KEYS = (
    "driver",
    "duration_s",
    "clients",
    "clients_served_at_end",
    "requests_ok",
    "requests_failed",
    "resets",
    "reconnects",
    "state_lost",
    "recovery_s",
    "latency_ms",
    "events",
    "servers",
    "outsiders",
    "outsider_answers",
    "vip",
    "kernel",
)
EVENT_KEYS = ("at", "what", "affected_clients", "recovery_s")
SERVER_KEYS = ("status", "share", "requests", "sessions_reset", "epoch")


@dataclass(frozen=True)
class ClientRecord:
    """What one client saw. `authorized`: holds the pool's key (an outsider does not)."""

    name: str
    authorized: bool
    rate: float
    stats: ClientStats


@dataclass(frozen=True)
class ServerRecord:
    """One server at the end: `share` of the space while up, requests it answered,
    sessions it reset when their portion moved, its allocation epoch."""

    status: str  # up, dead, standby, outsider
    share: float
    requests: int
    sessions_reset: int
    epoch: int


def served_window(rates: Iterable[float]) -> float:
    """How recent a client's last answer must be for it to count as served now:
    three of the slowest client's request intervals, at least 1.5 s."""
    positive = [rate for rate in rates if rate > 0]
    return max(1.5, 3.0 / min(positive)) if positive else 1.5


def served_recently(clients: Iterable[ClientRecord], now: float, window: float) -> int:
    return sum(
        1
        for c in clients
        if c.rate <= 0 or (c.stats.ok_times and c.stats.ok_times[-1] >= now - window)
    )


def recovery(
    clients: Iterable[ClientRecord], start: float, until: float
) -> tuple[float | None, int]:
    """How long after `start` the last client disrupted in [start, until) was answered
    again (None if one never was), and how many clients were disrupted."""
    worst = 0.0
    affected = 0
    never = False
    for client in clients:
        hits = [t for t in client.stats.disruptions if start <= t < until]
        if not hits:
            continue
        affected += 1
        back = client.stats.first_ok_after(hits[-1])
        if back is None:
            never = True
        else:
            worst = max(worst, back - start)
    return (None if never else round(worst, 3)), affected


def percentile_ms(values: Sequence[float], pct: float) -> float | None:
    if not values:
        return None
    index = min(len(values) - 1, max(0, math.ceil(pct / 100 * len(values)) - 1))
    return round(values[index] * 1000, 3)


def summarize(
    driver: str,
    now: float,
    clients: Sequence[ClientRecord],
    servers: Mapping[str, ServerRecord],
    events: Sequence[EventRecord],
    kernel: Mapping[str, Any] | None = None,
    vip: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The run's outcome as plain data (the `--json` line)."""
    members = [c for c in clients if c.authorized]
    outsiders = [c for c in clients if not c.authorized]
    window = served_window(c.rate for c in clients)
    disruptive = [e for e in events if e.disruptive]
    rows: list[dict[str, Any]] = []
    for index, event in enumerate(disruptive):
        until = disruptive[index + 1].at if index + 1 < len(disruptive) else now
        took, affected = recovery(members, event.at, until)
        rows.append(
            {
                "at": round(event.at, 3),
                "what": event.what,
                "affected_clients": affected,
                "recovery_s": took,
            }
        )
    took_all = [row["recovery_s"] for row in rows]
    recovery_s = None if any(t is None for t in took_all) else round(max(took_all, default=0.0), 3)
    latencies = sorted(x for c in members for x in c.stats.latencies)
    return {
        "driver": driver,
        "duration_s": round(now, 3),
        "clients": len(members),
        "clients_served_at_end": served_recently(members, now, window),
        "requests_ok": sum(c.stats.requests_ok for c in members),
        "requests_failed": sum(c.stats.requests_failed for c in members),
        "resets": sum(c.stats.resets for c in members),
        "reconnects": sum(c.stats.reconnects for c in members),
        "state_lost": sum(c.stats.state_lost for c in members),
        "recovery_s": recovery_s,
        "latency_ms": {"p50": percentile_ms(latencies, 50), "p99": percentile_ms(latencies, 99)},
        "events": rows,
        "servers": {
            name: {
                "status": record.status,
                "share": record.share if record.status == "up" else 0.0,
                "requests": record.requests,
                "sessions_reset": record.sessions_reset,
                "epoch": record.epoch,
            }
            for name, record in sorted(servers.items())
        },
        "outsiders": len(outsiders),
        "outsider_answers": sum(c.stats.requests_ok for c in outsiders),
        "vip": dict(vip) if vip is not None else None,
        "kernel": dict(kernel) if kernel is not None else None,
    }
