"""Technique D, the dynamic destination (seed Fig 20-21), measured against R1-R3 in one run.

Part 1, reallocation under load: bench/reallocation.py's pool and sequence, run
with D and, in the same command, with R1, R2 and R3 (the overlay on 127.0.0.1, the
clients in one process and the routers and servers in another, 1000 clients with
one session each, 52 seeded random share changes 0.6-0.9 s apart). For each
technique, as bench/reallocation.py counts them:

- `broken`: sessions broken, one per (client, moment) (goal for D: 0), and
  `clients_ever_moved`, beside R1's (the same allocations, so the same order of
  magnitude, or nothing moved).
- `control_messages_per_reallocation`: control messages the servers sent during the
  reallocations, less heartbeats and the idle rate, per committed reallocation; D's
  over R2's and R3's.

Part 2, moves up close (bench/_redirect_moves.py: the overlay, the clients in one
process and the routers and servers in another, 80 clients at 2 requests/s): a
quiet window gives the steady-state round trip (`rtt_ms`: the median request
latency), then six share changes move connections. For every move, `pause` =
when the client accepted the signed change-destination minus when the old server
let the connection go, on the machine's wall clock (`move_pause_p50_over_rtt`,
`move_pause_p99_over_rtt`; goal p99 <= 2). Then every live connection gets one of
each kind of hijack from an attacker's address: forged signature, another key, a
replayed serial, a stale timestamp, a wrong cookie, no signature
(`hijacks_refused` over `hijacks_tried`; goal: all refused,
`connections_disturbed` 0: no connection moved, no request failed).

Part 3, the second server (Fig 20): the overlay, 40 clients with short
connections (a new one every 4 answers), s1 holding 70% of them; the same run
with `redirect_above = 0` (no passing: the baseline) and 1.3. Reported: the new
connections s1 handed to less loaded servers (`redirected_new_connections`) and
the load spread, max/mean of the servers' request rates over the last 6 s, of
both runs.

`--plots DIR` writes the JSON result there with two plots: sessions broken and
control messages per reallocation by technique, and the move pauses' CDF.

Its last line on stdout is one json object (`_common.run_and_emit`): the result,
or why it stopped (an error, a missing package, SIGTERM or Ctrl-C).
"""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
import argparse
import os
import time
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import _plots
import _redirect_moves
from _common import progress, run_and_emit
from _pool import table
from manycast.ports import free_base_port
from manycast.runtime import PoolRun
from manycast.steps import SetShare
from manycast.topology import loads
from reallocation import CLIENTS_PER_LAN, RATE, SEED, run_technique, schedule

TECHNIQUES = ("D", "R1", "R2", "R3")


def pool_text(
    clients: int,
    rate: float,
    *,
    per_connection: int = 0,
    redirect_above: float = 1.5,
    duration: float = 60.0,
    misses: int = 10,
    steps: Sequence[tuple[float, str, dict[str, Any]]] = (),
) -> str:
    """clients a1.. -- ra -- core -- rs1 (s1, s3) / rs2 (s2, s4), technique D."""
    lines = [
        "[pool]",
        'group = "232.1.1.1"',
        'technique = "D"',
        f"redirect_above = {redirect_above}",
        "heartbeat_ms = 100",
        f"heartbeat_misses = {misses}",
        "report_interval_ms = 1000",
    ]
    for name in ("ra", "core", "rs1", "rs2"):
        lines += ["[[router]]", f'name = "{name}"']
    for a, b, delay in (("ra", "core", 2), ("core", "rs1", 1), ("core", "rs2", 3)):
        lines += ["[[link]]", f'between = ["{a}", "{b}"]', f"delay_ms = {delay}"]
    for index in range(1, 5):
        lines += ["[[server]]", f'name = "s{index}"', f'router = "rs{2 - index % 2}"']
    lines += [
        "[[clients]]",
        'name = "a"',
        f"count = {clients}",
        'router = "ra"',
        'subnet = "10.1.0.0/16"',
        "stride = 97",
        f"rate = {rate}",
        f"requests_per_connection = {per_connection}",
    ]
    lines += [table("scenario", at=at, action=action, **args) for at, action, args in steps]
    lines += ["[run]", f"duration = {duration}"]
    return "\n".join(lines) + "\n"


def overlay_run(text: str, seed: int) -> PoolRun:
    topo = loads(text)
    return PoolRun(topo, "overlay", seed=seed, base_port=free_base_port(topo.attachment_count))


def call(run: PoolRun, action: Any) -> None:
    """Do `action` on the overlay's clock, as the driver does a scenario step."""
    run.network.call_at(run.now, action)
    run.network.run_until(run.now + 0.001)


def wait(run: PoolRun, condition: Any, limit: float) -> bool:
    deadline = run.now + limit
    while run.now < deadline:
        run.network.run_until(run.now + 0.05)
        if condition():
            return True
    return False


# -- part 1 ------------------------------------------------------------------------------


def part1(techniques: tuple[str, ...]) -> dict[str, Any]:
    steps = schedule(SEED)
    per: dict[str, dict[str, Any]] = {}
    for technique in techniques:
        progress(f"part 1, {technique}: {2 * CLIENTS_PER_LAN} clients, {len(steps)} share changes")
        per[technique] = run_technique(technique, steps)
    return per


# -- part 2 ------------------------------------------------------------------------------


def part2(clients: int, rate: float) -> dict[str, Any]:
    servers = [f"s{index}" for index in range(1, 5)]
    text = pool_text(
        clients, rate, duration=_redirect_moves.DURATION, steps=_redirect_moves.steps(SEED, servers)
    )
    return _redirect_moves.measure(text, SEED, clients)


# -- part 3 ------------------------------------------------------------------------------


def part3(clients: int, redirect_above: float, seconds: float = 14.0) -> dict[str, Any]:
    run = overlay_run(
        pool_text(clients, 4.0, per_connection=4, redirect_above=redirect_above), seed=SEED
    )
    nodes = run.nodes
    try:
        # Short connections: a client is between two of them now and then.
        if not wait(run, lambda: all(c.stats.requests_ok for c in nodes.clients.values()), 30.0):
            raise RuntimeError("part 3: the clients were never all served")
        step = SetShare(at=run.now, server="s1", share=Fraction(7, 10))
        call(run, lambda: run.engine.carry_out(step, run.now))
        start = run.now
        run.network.run_until(start + seconds - 6.0)
        counts = {n: s.app.requests for n, s in nodes.servers.items()}
        window = run.now
        run.network.run_until(start + seconds)
        elapsed = run.now - window
        rates = {n: (s.app.requests - counts[n]) / elapsed for n, s in nodes.servers.items()}
        mean = sum(rates.values()) / len(rates)
        redirectors = {n: s.redirector for n, s in nodes.servers.items()}
        failed = sum(c.stats.requests_failed for c in nodes.clients.values())
        return {
            "redirect_above": redirect_above,
            "load_spread_max_over_mean": round(max(rates.values()) / mean, 3) if mean else None,
            "requests_per_s": {n: round(r, 1) for n, r in sorted(rates.items())},
            "redirected_new_connections": sum(
                r.stats.passed for r in redirectors.values() if r is not None
            ),
            "taken": sum(r.stats.taken for r in redirectors.values() if r is not None),
            "connections_opened": sum(c.stats.connects for c in nodes.clients.values()),
            "requests_failed": failed,
        }
    finally:
        run.close()


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


def plot(result: Mapping[str, Any], directory: Path) -> list[Path]:
    """Sessions broken and control messages per reallocation by technique; the CDF of
    the move pauses over the round trip, with the goal."""
    fig, axes = _plots.grid("Technique D against R1-R3 (seed Fig 20-21)", 3)
    broken = result.get("broken_by_technique") or {}
    _plots.bars(axes[0], broken, ylabel="sessions broken", fmt="{:.0f}")
    axes[0].set_title(f"{result.get('clients')} clients, 52 share changes", fontsize=9)
    messages = result.get("control_messages_per_reallocation") or {}
    _plots.bars(axes[1], messages, ylabel="control messages per reallocation", fmt="{:.0f}")
    tried = result.get("hijacks_tried") or 0
    _plots.bars(
        axes[2],
        {"tried": tried, "refused": result.get("hijacks_refused") or 0},
        ylabel="change-destination hijacks",
        fmt="{:.0f}",
    )
    paths = [_plots.save(fig, directory, "redirect_techniques")]
    fig, ax = _plots.figure("Pause while a connection moves, over the round trip")
    pauses = (result.get("moves") or {}).get("move_pauses_over_rtt") or []
    _plots.cdf(ax, {"moves": pauses}, xlabel="pause / steady-state round trip")
    ax.set_ylabel("fraction of moves")
    _plots.vertical(ax, 2.0, "goal: p99 <= 2", colour="#1d9a5b")
    ax.legend(fontsize=8)
    paths.append(_plots.save(fig, directory, "redirect_pauses"))
    return paths


def main() -> None:
    args = parse_arguments()  # before run_and_emit, so that --help prints on stdout
    run_and_emit("redirect", lambda: measure(args))


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _plots.add_argument(parser)
    parser.add_argument(
        "--techniques",
        default=",".join(TECHNIQUES),
        help="part 1's techniques, comma separated (D first; R1-R3 are the baselines)",
    )
    parser.add_argument("--skip-part1", action="store_true", help="parts 2 and 3 only")
    return parser.parse_args()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    began = time.monotonic()
    load_start = round(os.getloadavg()[0], 2)
    techniques = tuple(t.strip().upper() for t in args.techniques.split(",") if t.strip())
    per = {} if args.skip_part1 else part1(techniques)
    progress("part 2: moves up close and hijacks")
    close = part2(80, 2.0)
    progress("part 3: the second server, without and with passing")
    baseline = part3(40, 0.0)
    passing = part3(40, 1.3)
    result: dict[str, Any] = {"bench": "redirect", "clients": 2 * CLIENTS_PER_LAN, "rate": RATE}
    if per:
        d = per.get("D", {})

        def of(t: str, key: str) -> Any:
            return per[t][key] if t in per else None

        cpr = {t: of(t, "control_messages_per_reallocation") for t in per}
        result.update(
            {
                "reallocations": {t: of(t, "reallocations") for t in per},
                "healthy": {t: of(t, "healthy") for t in per},
                "broken_by_technique": {t: of(t, "broken") for t in per},
                "broken": d.get("broken"),
                "clients_ever_moved": d.get("clients_ever_moved"),
                "clients_ever_moved_r1": of("R1", "clients_ever_moved"),
                "r1_expected": of("R1", "sessions_expected_broken_by_r1_rule"),
                "control_messages_per_reallocation": cpr,
                "control_messages_d_over_r2": _ratio(cpr.get("D"), cpr.get("R2")),
                "control_messages_d_over_r3": _ratio(cpr.get("D"), cpr.get("R3")),
                "moved_latency_p99_over_unmoved": {
                    t: of(t, "moved_latency_p99_over_unmoved") for t in per
                },
                "techniques": per,
            }
        )
    result.update(
        {
            "rtt_ms": close["rtt_ms"],
            "move_pause_p50_over_rtt": close["move_pause_p50_over_rtt"],
            "move_pause_p99_over_rtt": close["move_pause_p99_over_rtt"],
            "hijacks_tried": close["hijacks_tried"],
            "hijacks_refused": close["hijacks_refused"],
            "connections_disturbed_by_hijacks": close["connections_disturbed"],
            "moves": close,
            "redirected_new_connections": passing["redirected_new_connections"],
            "load_spread_before": baseline["load_spread_max_over_mean"],
            "load_spread_after": passing["load_spread_max_over_mean"],
            "second_server": {"without": baseline, "with": passing},
            "loadavg_1min_start_end": [load_start, round(os.getloadavg()[0], 2)],
            "seconds": round(time.monotonic() - began, 1),
        }
    )
    _plots.write(result, args.plots, plot)
    return result


if __name__ == "__main__":
    main()
