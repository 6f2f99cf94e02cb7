"""The simulator's report: one JSON object and a summary a person reads.

What a user checks is at the top of the JSON: at the end, is every address of the
population served by exactly one live server, does every server hold its agreed
share to within one bucket; how many sample sessions broke; how much control
traffic each server handled; how long each step of the scenario took to settle.
The time series (one value per sample) are under `series`, for the plots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, fields
from itertools import groupby
from typing import Any

from manycast.sim.run import SimResult
from manycast.sim.watch import Sample

SERIES = tuple(f.name for f in fields(Sample))


def settled(sample: Sample) -> bool:
    """Every address served exactly once and every share within one bucket."""
    return sample.unserved == 0 and sample.served_twice == 0 and sample.share_error_buckets <= 1


def recovery(
    samples: Sequence[Sample], events: Sequence[tuple[float, str, bool]]
) -> list[dict[str, Any]]:
    """For each instant the scenario did something disruptive: how long until the pool
    was settled again (the first sample after it; None: not before the next step or the
    end), the addresses left unserved at worst, and the sessions broken, until the next
    step (a session on a dead server breaks when its client's request times out)."""
    out = []
    disruptive = [e for e in events if e[2]]
    instants = [
        (at, [what for _, what, _ in group])
        for at, group in groupby(disruptive, key=lambda e: e[0])
    ]
    for index, (at, whats) in enumerate(instants):
        until = instants[index + 1][0] if index + 1 < len(instants) else float("inf")
        window = [s for s in samples if at < s.t < until]
        done = next((s for s in window if settled(s)), None)
        before = max((s for s in samples if s.t <= at), key=lambda s: s.t, default=None)
        last = window[-1] if window else None
        out.append(
            {
                "at": at,
                "steps": len(whats),
                "what": whats[0] if len(whats) == 1 else f"{whats[0]} and {len(whats) - 1} more",
                "settled_s": None if done is None else round(done.t - at, 6),
                "worst_unserved": max((s.unserved for s in window), default=0.0),
                "worst_share_error_buckets": max(
                    (s.share_error_buckets for s in window), default=0.0
                ),
                "sessions_broken": (last.sessions_broken if last else 0)
                - (before.sessions_broken if before else 0),
            }
        )
    return out


def build_report(result: SimResult, name: str) -> dict[str, Any]:
    samples = result.samples
    end = samples[-1]
    topology = result.topology
    settings = result.settings
    first_step = min((at for at, _, _ in result.events), default=settings.duration)
    # Idle: the second half of the time before the first step (the start, when every
    # server announces itself and reports its portions, is not idle).
    idle = [s.control_per_server_per_s for s in samples if first_step / 2 < s.t <= first_step]
    rates = [s.control_per_server_per_s for s in samples[1:]]
    standby = sum(1 for s in topology.servers.values() if s.standby)
    stopped = result.extra.get("stopped")
    return {
        "sim": name,
        "ok": settled(end) and stopped is None,
        "stopped": stopped,  # why the run ended before its duration (None: it did not)
        "every_address_served_once": end.unserved == 0 and end.served_twice == 0,
        "share_error_within_one_bucket": end.share_error_buckets <= 1,
        "end": asdict(end),
        "sessions": {
            "sample_clients": result.extra.get("sample_clients", 0),
            "broken": end.sessions_broken,
            "clients_broken": result.extra.get("clients_broken", 0),
            "requests_ok": end.requests_ok,
            "requests_failed": end.requests_failed,
        },
        "control_per_server_per_s": {
            "idle": round(sum(idle) / len(idle), 3) if idle else None,
            "mean": round(sum(rates) / len(rates), 3) if rates else None,
            "max": max(rates, default=None),
        },
        "recovery": recovery(samples, result.events),
        "pool": {
            "servers": len(topology.servers) - standby,
            "standby": standby,
            "routers": len(topology.routers),
            "links": len(topology.links),
            "buckets": topology.pool.space.buckets,
            "technique": str(topology.pool.technique),
            "membership": result.membership,
        },
        "population": {
            "addresses": len(result.population.addresses),
            "requests_per_s": round(result.population.total_rate, 1),
        },
        "settings": asdict(settings),
        "scenario": [{"at": at, "what": what} for at, what, _ in result.events],
        "wall_s": round(result.wall_s, 2),
        "build_s": round(result.build_s, 2),
        "cpu_s": round(result.cpu_s, 2),
        "simulated_s": end.t,
        "network_events": result.network_events,
        "load_average": [round(x, 2) for x in result.load_average],
        "series": {key: [getattr(s, key) for s in samples] for key in SERIES},
    }


def summary_text(report: dict[str, Any]) -> str:
    """The report as a person reads it."""
    pool, end, sessions = report["pool"], report["end"], report["sessions"]
    control = report["control_per_server_per_s"]

    def yes(flag: bool) -> str:
        return "yes" if flag else "NO"

    stopped = (
        [f"STOPPED by {report['stopped']}: the figures are those of that moment", ""]
        if report.get("stopped")
        else []
    )
    lines = [
        *stopped,
        f"simulation {report['sim']}: {pool['servers']} servers (+{pool['standby']} standby),"
        f" {pool['routers']} routers, {report['population']['addresses']} client addresses"
        f" ({report['population']['requests_per_s']:g} requests/s),"
        f" {sessions['sample_clients']} sample clients; technique {pool['technique']},"
        f" membership {pool['membership']}",
        f"simulated {report['simulated_s']:g} s in {report['wall_s']:g} s wall"
        f" ({report['network_events']} network events; load average"
        f" {', '.join(str(x) for x in report['load_average'])})",
        "",
        "at the end:",
        "  every address served by exactly one live server: "
        f"{yes(report['every_address_served_once'])} (unserved {end['unserved']:.4%},"
        f" served twice {end['served_twice']:.4%})",
        "  every share within one bucket of the agreed one:  "
        f"{yes(report['share_error_within_one_bucket'])} (largest error"
        f" {end['share_error_buckets']:g} of {pool['buckets']} buckets)",
        f"  live servers {end['live_servers']}, epoch {end['epoch']},"
        f" load max/mean {end['load_max_over_mean']:g}",
        f"sample sessions broken: {sessions['broken']} ({sessions['clients_broken']} of"
        f" {sessions['sample_clients']} clients); requests answered {sessions['requests_ok']},"
        f" failed {sessions['requests_failed']}",
        f"control datagrams per server per second: idle {control['idle']},"
        f" mean {control['mean']}, peak {control['max']}",
        "",
        "scenario (settled: every address served once, shares within one bucket):",
    ]
    for step in report["recovery"]:
        settled_s = (
            "not within the run" if step["settled_s"] is None else f"{step['settled_s']:g} s"
        )
        lines.append(
            f"  {step['at']:7.2f} s  {step['what']}: settled after {settled_s};"
            f" worst unserved {step['worst_unserved']:.2%},"
            f" sessions broken {step['sessions_broken']}"
        )
    if not report["recovery"]:
        lines.append("  (no disruptive steps)")
    return "\n".join(lines)
