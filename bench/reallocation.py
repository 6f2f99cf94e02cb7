"""Live reallocation under load, per technique (seed Fig 12-16), and failover.

Part 1-2, for each technique R1..R4: a pool on the overlay (127.0.0.1), two edge
routers with two servers each, and 1000 clients with one session each. Clients run
in one process, routers and servers in another, so the pool's work is spread over
both cores. After a quiet window that checks the pool is healthy (every client
served, no failures, no allocation change) and measures the control traffic of an
idle pool (heartbeats), the operator moves random shares: a random server is set
to a random share in [10%, 40%] every 0.6-0.9 s, the same seeded sequence for every
technique. Measured:

- `broken`: sessions broken, as the clients count them (a reset, a failed request,
  state lost): one per (client, moment), since one break shows as a reset and a
  failed request at the same instant.
- `r1_expected`: for each committed epoch, the clients whose owner changed between
  the allocations before and after it and that had a session open at that moment
  (established or in its handshake: its server holds it either way), summed over
  R1's reallocations: what Fig 12 says R1 must break.
- `moved_latency_p99_over_unmoved`: request latency p99 of moved sessions (those
  answered after the first reallocation that moved their client) over the p99 of
  the others, both in the reallocation window.
- `control_messages_per_reallocation`: control messages sent by the servers during
  the reallocations, counted by type, less the heartbeats and less what an idle pool
  sends besides them (its rate in the quiet window; zero when healthy), over the
  number of committed reallocations.
- `reallocations_committed`: the scheduled share changes each technique's pool
  committed in the window. The bench fails (its JSON line has `error`, exit 1) when a
  technique committed fewer than 90% of those scheduled: its figures would count
  fewer changes than the others'.

The window runs from the first step to the last plus the clients' request deadline
plus their longest pause between requests: a session the last step moves breaks
when its client next sends, and the break shows when that request's deadline passes.

IPv6 beside IPv4 in the same run: the same pool on an IPv6 network (MLDv2 joins,
sessions over IPv6) for R1-R3 and D (R4's label plane is IPv4's), the same schedule;
`ipv6_over_ipv4` gives per technique the IPv6 figure over the IPv4 one for the
requests answered per second in the window and the reallocations committed, and
the IPv4 unmoved sessions' p99 latency over the IPv6 one (so that, for each, 1 is
parity and issue 16 asks for at least 0.9).

Failover (a server SIGKILLed under load, beside a measured keepalived) is
bench/failover.py's.

Its last line on stdout is one json object (`_common.run_and_emit`): the result,
or why it stopped (an error, a missing package, SIGTERM or Ctrl-C).
"""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
import inspect
import os
import random
import time
from collections import defaultdict
from collections.abc import Mapping
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

import _plots
from _common import progress, run_and_emit
from _pool import (
    PORT_SEARCH,
    Transitions,
    host_pool,
    percentile,
    run_together,
    two_router_pool,
)
from _realloc_hooks import (
    client_collect,
    client_line,
    client_setup,
    infra_collect,
    infra_line,
    infra_setup,
)
from manycast.ports import free_base_port
from manycast.protocol.client import Client
from manycast.protocol.technique import Technique
from manycast.space import address_array
from manycast.topology import loads

SEED = 20240611
TECHNIQUES = tuple(Technique)
# The techniques an IPv6 pool runs: every one (R4's trees ride MPLS-in-UDP over IPv6).
TECHNIQUES6 = TECHNIQUES
SERVERS = ("s1", "s2", "s3", "s4")
# Two processes, one per core: the clients, and the routers with the servers.
INFRA = frozenset({"ra", "rb", *SERVERS})

CLIENTS_PER_LAN = 500
RATE = 0.5  # requests/s per client: 500 requests/s over the pool
QUIET = (4.0, 8.0)  # bench time: health check and idle control-traffic baseline
FIRST_STEP = 8.2
REALLOCATIONS = 52  # a few more than 50, in case one is refused or a no-op
GAP = (0.6, 0.9)
SHARE = (0.10, 0.40)
# The clients' request deadline, and their longest pause between requests (uniform in
# [0.5, 1.5] / rate): a break the last step causes shows within their sum of it.
REQUEST_TIMEOUT: float = inspect.signature(Client).parameters["request_timeout"].default
PACING_MAX = 1.5 / RATE
COMMIT_MARGIN = 0.5  # the last step's commit reaching every server, and sampling
TAIL = REQUEST_TIMEOUT + PACING_MAX + COMMIT_MARGIN  # after the last step, still measured
COMMITTED_AT_LEAST = 0.9  # of the scheduled reallocations, or the bench fails
CLIENT_GRACE = 0.5  # clients stop this long after the window, servers later still
INFRA_GRACE = 1.5

HEARTBEAT_MS, HEARTBEAT_MISSES, REPORT_INTERVAL_MS = 100, 3, 1000  # the pool's defaults

# -- part 1-2: one technique --------------------------------------------------------------


def schedule(seed: int) -> list[tuple[float, str, dict[str, Any]]]:
    rng = random.Random(seed)
    steps, at = [], FIRST_STEP
    for _ in range(REALLOCATIONS):
        server = rng.choice(SERVERS)
        share = round(rng.uniform(*SHARE), 4)
        steps.append((at, "set_share", {"server": server, "share": share}))
        at += rng.uniform(*GAP)
    return steps


def _child(
    conn: Connection,
    local: frozenset[str],
    with_clients: bool,
    text: str,
    base: int,
    window: tuple[float, float],
) -> None:
    """Host `local`, and all the clients too when `with_clients`."""
    topo = loads(text)
    technique = topo.pool.technique
    names = sorted(topo.clients)
    if not with_clients:
        state: dict[str, Any] = {
            "epochs": {},
            "changes": [],
            "counters": {},
            "client_addresses": address_array(
                [int(topo.address(n)) for n in names], topo.pool.space.family
            ),
        }
        host_pool(
            conn,
            text,
            set(local),
            base,
            SEED,
            window[1] + INFRA_GRACE,
            f"{technique} {'+'.join(sorted(local))}",
            infra_setup(state, QUIET, window),
            infra_collect(state),
            progress_line=infra_line if local & set(SERVERS) else None,
        )
    else:
        state = {"names": names}
        host_pool(
            conn,
            text,
            set(names) | local,
            base,
            SEED,
            window[1] + CLIENT_GRACE,
            f"{technique} clients{'+' if local else ''}{'+'.join(sorted(local))}",
            client_setup(state),
            client_collect(state),
            progress_line=client_line,
        )


def run_technique(
    technique: str, steps: list[tuple[float, str, dict[str, Any]]], family: int = 4
) -> dict[str, Any]:
    window = (steps[0][0], steps[-1][0] + TAIL)
    text = two_router_pool(
        family=family,
        technique=technique,
        clients_per_lan=CLIENTS_PER_LAN,
        rate=RATE,
        duration=window[1] + INFRA_GRACE,
        steps=steps,
        heartbeat_ms=HEARTBEAT_MS,
        heartbeat_misses=HEARTBEAT_MISSES,
        report_interval_ms=REPORT_INTERVAL_MS,
    )
    topo = loads(text)
    base = free_base_port(topo.attachment_count, PORT_SEARCH)
    results = run_together(
        [
            (f"{technique} {'+'.join(sorted(INFRA))}", _child, (INFRA, False, text, base, window)),
            (f"{technique} clients", _child, (frozenset(), True, text, base, window)),
        ],
        window[1] + INFRA_GRACE + 30,
    )
    label = technique if family == 4 else f"{technique} IPv6"
    return analyse(label, topo, steps, window, merge(results[:-1]), results[-1])


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One view of the servers from the processes that host them: counters taken at
    the same bench time in each are summed."""
    out: dict[str, Any] = {"epochs": {}, "changes": [], "counters": {}, "handover": {}}
    out["cpu_s"] = [part["cpu_s"] for part in parts]
    for part in parts:
        out["epochs"].update(part["epochs"])
        out["changes"].extend(part["changes"])
        for key, value in part["handover"].items():
            out["handover"][key] = out["handover"].get(key, 0) + value
        for label, snap in part["counters"].items():
            into = out["counters"].setdefault(label, {"t": snap["t"], "sent": {}, "sessions": 0})
            into["sessions"] += snap["sessions"]
            for kind, n in snap["sent"].items():
                into["sent"][kind] = into["sent"].get(kind, 0) + n
    return out


def analyse(
    technique: str,
    topo: Any,
    steps: list[Any],
    window: tuple[float, float],
    infra: dict[str, Any],
    clients_out: dict[str, Any],
) -> dict[str, Any]:
    names = sorted(topo.clients)
    clients = clients_out["clients"]
    connected: Transitions = clients_out["connected"]
    opened: Transitions = clients_out["open"]
    start, end = window

    # Epochs and when each took effect (the first server to install it).
    installed: dict[int, float] = {}
    why: dict[int, list[str]] = defaultdict(list)
    for at, _server, epoch, what in infra["changes"]:
        installed[epoch] = min(at, installed.get(epoch, at))
        why[epoch].append(what)
    epochs = sorted(e for e in infra["epochs"] if e > 1)
    in_window = [e for e in epochs if start - 0.05 <= installed.get(e, -1.0) <= end]
    before_window = [e for e in epochs if installed.get(e, end) < start - 0.05]
    # The coordinator names the operation; the others say whom the commit came from.
    descriptions = [
        next((w for w in why[e] if not w.startswith(("commit from", "snapshot"))), None)
        or (why[e] or ["(no record)"])[0]
        for e in epochs
    ]
    unexpected = [d for d in descriptions if not d.startswith("commit set")]
    missing = [e for e in range(2, max(epochs, default=1) + 1) if e not in infra["epochs"]]

    # Which clients each epoch moved, and which of those had a session open then.
    first_move = np.full(len(names), np.inf)
    expected = 0
    moved_per_epoch = []
    for e in in_window:
        previous = infra["epochs"].get(e - 1)
        if previous is None:
            continue
        t = installed[e]
        now_owners = infra["epochs"][e]
        moved = [i for i, (a, b) in enumerate(zip(previous, now_owners, strict=True)) if a != b]
        open_moved = sum(1 for i in moved if opened.at(i, t))
        expected += open_moved
        moved_per_epoch.append(len(moved))
        for i in moved:
            first_move[i] = min(first_move[i], t)

    # Breaks as the clients saw them: one per (client, instant).
    breaks = set()
    quiet_breaks = set()
    failures_kinds: dict[str, int] = defaultdict(int)
    for index, c in enumerate(clients):
        for t in c["disruptions"]:
            if start <= t <= end:
                breaks.add((index, round(t, 6)))
            if QUIET[0] <= t <= QUIET[1]:
                quiet_breaks.add((index, round(t, 6)))
        for t, reason in c["failures"]:
            if start <= t <= end:
                failures_kinds[reason.split(":")[0]] += 1

    # Latencies in the window, split by moved / not yet moved.
    moved_lat: list[float] = []
    unmoved_lat: list[float] = []
    served_quiet = 0
    requests_quiet = 0
    for index, c in enumerate(clients):
        times = np.asarray(c["ok_times"])
        lats = np.asarray(c["latencies"])
        quiet = (times >= QUIET[0]) & (times <= QUIET[1])
        requests_quiet += int(quiet.sum())
        served_quiet += bool(quiet.any())
        inside = (times >= start) & (times <= end)
        moved_mask = inside & (times >= first_move[index])
        moved_lat.extend(lats[moved_mask].tolist())
        unmoved_lat.extend(lats[inside & ~moved_mask].tolist())
    p99_moved = percentile(moved_lat, 99)
    p99_unmoved = percentile(unmoved_lat, 99)

    open_at_start = sum(1 for i in range(len(names)) if connected.at(i, start - 0.01))
    open_min = min(
        sum(1 for i in range(len(names)) if connected.at(i, t)) for t in np.arange(start, end, 0.25)
    )

    counters = infra["counters"]

    def sent(first: str, last: str) -> dict[str, int]:
        kinds = set(counters[first]["sent"]) | set(counters[last]["sent"])
        return {
            k: counters[last]["sent"].get(k, 0) - counters[first]["sent"].get(k, 0) for k in kinds
        }

    quiet_s = counters["quiet_end"]["t"] - counters["quiet_start"]["t"]
    window_s = counters["window_end"]["t"] - counters["window_start"]["t"]
    idle = sent("quiet_start", "quiet_end")
    busy = sent("window_start", "window_end")
    if not idle.get("Heartbeat"):
        raise RuntimeError("no heartbeat counted in the quiet window: the counting hook is stale")
    # The baseline is the heartbeats themselves, counted, plus whatever else an idle
    # pool sends (nothing, when healthy) at its idle rate.
    idle_other = sum(n for k, n in idle.items() if k != "Heartbeat") / quiet_s
    busy_other = {k: n for k, n in busy.items() if k != "Heartbeat" and n}
    extra = sum(busy_other.values()) - idle_other * window_s
    reallocations = len(in_window)
    described = dict(zip(epochs, descriptions, strict=True))
    committed = sum(1 for e in in_window if described[e].startswith("commit set"))
    healthy = (
        served_quiet == len(names)
        and not quiet_breaks
        and not before_window
        and not unexpected
        and not missing
    )
    progress(
        f"{technique}: {reallocations} reallocations, {len(breaks)} sessions broken, "
        f"{open_at_start} sessions open, p99 moved/unmoved "
        f"{_ms(p99_moved)}/{_ms(p99_unmoved)} ms, healthy={healthy}"
    )
    return {
        "healthy": healthy,
        "quiet_window": {
            "clients_served": served_quiet,
            "requests_ok": requests_quiet,
            "sessions_broken": len(quiet_breaks),
            "allocation_changes": len(before_window),
            "heartbeats_per_s": round(idle.get("Heartbeat", 0) / quiet_s, 2),
            "other_control_messages_per_s": round(idle_other, 2),
        },
        "sessions_open_at_first_reallocation": open_at_start,
        "sessions_open_min_during": open_min,
        "server_sessions_at_first_reallocation": counters["window_start"]["sessions"],
        "steps": len(steps),
        "reallocations": reallocations,
        "reallocations_scheduled": len(steps),
        "reallocations_committed": committed,
        "unexpected_changes": unexpected,
        "epochs_not_sampled": missing,
        "clients_moved_per_reallocation_mean": round(float(np.mean(moved_per_epoch)), 1)
        if moved_per_epoch
        else None,
        "clients_ever_moved": int(np.isfinite(first_move).sum()),
        "broken": len(breaks),
        "sessions_expected_broken_by_r1_rule": expected,
        "requests_per_s_in_window": round((len(moved_lat) + len(unmoved_lat)) / (end - start), 1),
        "failed_requests_by_reason": dict(failures_kinds),
        "resets_whole_run": sum(c["resets"] for c in clients),
        "state_lost_whole_run": sum(c["state_lost"] for c in clients),
        "latency_ms": {
            "moved_p50": _ms(percentile(moved_lat, 50)),
            "moved_p99": _ms(p99_moved),
            "unmoved_p50": _ms(percentile(unmoved_lat, 50)),
            "unmoved_p99": _ms(p99_unmoved),
            "moved_samples": len(moved_lat),
            "unmoved_samples": len(unmoved_lat),
        },
        "moved_latency_p99_over_unmoved": round(p99_moved / p99_unmoved, 3)
        if p99_moved and p99_unmoved
        else None,
        "control_messages_per_reallocation": round(extra / reallocations, 1)
        if reallocations
        else None,
        "control_messages_by_type": busy_other,
        "heartbeats_in_window": busy.get("Heartbeat", 0),
        "handover": {k: v for k, v in infra["handover"].items() if v},
        "cpu_s": {
            "clients": clients_out["cpu_s"],
            "routers+servers": infra["cpu_s"][0],
        },
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def plot(result: Mapping[str, Any], directory: Path) -> list[Path]:
    """Sessions broken per technique (with what Fig 12 says R1 must break), and the
    moved sessions' latency cost."""
    fig, axes = _plots.grid("Live reallocation under load (seed Fig 12-16)", 2)
    broken = {t: result["broken"][t] for t in result["broken"]}
    _plots.bars(axes[0], broken, ylabel="sessions broken", fmt="{:.0f}")
    _plots.reference(axes[0], result["r1_expected"], "R1 must break (Fig 12 rule)")
    axes[0].set_title(
        f"{result['clients']} clients, {sum(result['reallocations'].values())} reallocations",
        fontsize=9,
    )
    axes[0].legend(fontsize=8)
    ratio = result["moved_latency_p99_over_unmoved"]
    _plots.bars(axes[1], ratio, ylabel="p99 latency, moved / unmoved sessions", fmt="{:.2f}")
    _plots.reference(axes[1], 1.0, "no cost")
    axes[1].legend(fontsize=8)
    return [_plots.save(fig, directory, "reallocation_breaks")]


def committed_error(committed: Mapping[str, int], scheduled: int) -> str | None:
    """Why the run does not count, when a technique committed fewer than 90% of the
    scheduled reallocations; None when every one committed enough."""
    short = {t: n for t, n in committed.items() if n < COMMITTED_AT_LEAST * scheduled}
    if not short:
        return None
    listed = ", ".join(f"{t} {n}" for t, n in short.items())
    return (
        f"committed fewer than {COMMITTED_AT_LEAST:.0%} of the {scheduled} scheduled "
        f"reallocations: {listed}"
    )


def main() -> None:
    args = _plots.arguments(__doc__)  # before run_and_emit, so that --help prints on stdout

    def run() -> dict[str, Any]:
        result = measure()
        _plots.write(result, args.plots, plot)
        return result

    run_and_emit("reallocation", run)


def measure() -> dict[str, Any]:
    began = time.monotonic()
    # Other work on the machine shows in every figure here: record how busy it was.
    load_start = round(os.getloadavg()[0], 2)
    steps = schedule(SEED)
    result = {"bench": "reallocation", **run_family(4, TECHNIQUES, steps)}
    ipv6 = run_family(6, TECHNIQUES6, steps)
    result["ipv6"] = ipv6
    four, six = result["techniques"], ipv6["techniques"]
    result["ipv6_over_ipv4"] = {
        t: {
            **{
                key: _ratio(six[t][key], four[t][key])
                for key in ("requests_per_s_in_window", "reallocations_committed")
            },
            # inverted, so that above 1 is better here too
            "unmoved_latency_p99_ipv4_over_ipv6": _ratio(
                four[t]["latency_ms"]["unmoved_p99"], six[t]["latency_ms"]["unmoved_p99"]
            ),
        }
        for t in TECHNIQUES6
    }
    result["loadavg_1min_start_end"] = [load_start, round(os.getloadavg()[0], 2)]
    result["seconds"] = round(time.monotonic() - began, 1)
    committed = {
        **result["reallocations_committed"],
        **{f"{t} IPv6": n for t, n in ipv6["reallocations_committed"].items()},
    }
    error = committed_error(committed, len(steps))
    if error:
        result["error"] = error
        progress(f"FAILED: {error}")
    return result


def run_family(
    family: int, techniques: tuple[Technique, ...], steps: list[tuple[float, str, dict[str, Any]]]
) -> dict[str, Any]:
    """Every technique on the pool of one family, and the figures side by side."""
    per: dict[str, dict[str, Any]] = {}
    for technique in techniques:
        progress(
            f"{technique} IPv{family}: {2 * CLIENTS_PER_LAN} clients at {RATE}/s, {len(steps)} "
            f"share changes from t={steps[0][0]:.1f}s to t={steps[-1][0]:.1f}s"
        )
        per[technique] = run_technique(technique, steps, family)

    def each(key: str) -> dict[str, Any]:
        return {t: per[t][key] for t in techniques}

    return {
        "clients": 2 * CLIENTS_PER_LAN,
        "rate_per_client": RATE,
        "sessions": each("sessions_open_at_first_reallocation"),
        "healthy": each("healthy"),
        "reallocations": each("reallocations"),
        "reallocations_scheduled": len(steps),
        "reallocations_committed": each("reallocations_committed"),
        "window_tail_s": TAIL,
        "broken": each("broken"),
        "r1_expected": per["R1"]["sessions_expected_broken_by_r1_rule"],
        "requests_per_s_in_window": each("requests_per_s_in_window"),
        "moved_latency_p99_over_unmoved": each("moved_latency_p99_over_unmoved"),
        "control_messages_per_reallocation": each("control_messages_per_reallocation"),
        "techniques": per,
    }


def _ratio(value: float | None, baseline: float | None) -> float | None:
    return round(value / baseline, 3) if value is not None and baseline else None


if __name__ == "__main__":
    main()
