"""The soak's VIP pool (Fig 17-19) and what the `vip_router_kill` fault does to it.

A small pool of its own beside the manycast pool (bench/soak.py runs it when the
kind is drawn): one process hosts its routers, servers, VIP router vr2 and clients
(`vip_child`); the nearest VIP router, vr1, runs alone in a `manycast run --nodes`
process that the fault SIGKILLs and starts again 2-5 s later. Its clients' figures
are kept as the manycast pool's are (`_soak_hosts._clients_setup`): each session
loss with the first answer after it, and each client's first answer after each kill.

What a user should see: connections the edge already tags go on untouched (they no
longer pass a VIP router); a new flow whose first packet went to the dead vr1 waits
for its SYN's retransmission, which vr2 places once the routers stop hearing vr1
(the pool's failure detection, 0.3 s); a restarted vr1 takes new flows again.

Run alone, it prints one json object, its last line on stdout, naming the bench
to run (`_common.not_a_bench`).
"""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
from collections import defaultdict
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from _pool import HeapProbe, host_pool, median, percentile
from _soak_hosts import (
    LIVE_HEAP_S,
    _clients_setup,
    _tee,
    client_line,
    clients_state,
    served_at_end,
)
from _soak_plan import VIP_VICTIM, WARMUP_S, Fault
from manycast.runtime import PoolRun
from manycast.topology import loads

AFTER_S = 4.0  # a loss this long after vr1 came back may still be the kill's


def vip_child(
    conn: Connection,
    text: str,
    base: int,
    seed: int,
    duration: float,
    watch: list[float],
    log: Path,
    progress_every: float,
    heap_probe: HeapProbe | None = None,
) -> None:
    """Every node of the VIP pool but vr1; `watch`: bench times (the kills) after
    which to note each client's first answer."""
    _tee(log)
    topology = loads(text)
    names = sorted(topology.clients)
    state = clients_state(names, watch, log.with_suffix(".figures"))

    def collect(run: PoolRun, offset: float) -> dict[str, Any]:
        state["finish"]()
        kept = {k: v for k, v in state.items() if k != "finish"}
        kept["served_at_end"] = served_at_end(run, duration)
        kept["vip_routers"] = {
            name: {k: v for k, v in vars(r.stats).items() if k != "picks"}
            for name, r in run.nodes.vip_routers.items()
        }
        return {**kept, "offset": offset}

    host_pool(
        conn,
        text,
        set(topology.interfaces) - {VIP_VICTIM},
        base,
        seed,
        duration,
        "vip",
        _clients_setup(state),
        collect,
        progress_every=progress_every,
        progress_line=client_line,
        heap_every=LIVE_HEAP_S,
        heap_probe=heap_probe,
    )


def analyse_vip(faults: list[Fault], vip: dict[str, Any]) -> dict[str, Any]:
    """The VIP pool's figures and a row per `vip_router_kill` fault.

    A session loss after the warm-up is the kill's when it falls between a kill and
    AFTER_S after its restart (every client's new flows pass a VIP router), else
    nobody's; all count in `sessions_lost` (no server died: a VIP router holds no
    session). A kill's `recovery_s` runs until every client of the pool was answered
    again and every client whose session it broke was too: the clients' own request
    spacing (up to 1.5 / 0.5 = 3 s for the long connections) bounds it from below."""
    kills = [f for f in faults if f.kind == "vip_router_kill"]
    names: list[str] = vip["names"]
    broke: dict[int, list[float | None]] = defaultdict(list)
    lost = []
    for client, t, cause, first_ok, *_via in vip["losses"]:  # as `_clients_setup` keeps them
        if t < WARMUP_S:
            continue
        fault = next((f for f in kills if f.at <= t <= (f.until or f.at) + AFTER_S), None)
        if fault is not None:
            broke[id(fault)].append(None if first_ok is None else first_ok - fault.at)
        after = None if fault is None else f"{fault.kind}@{fault.at:.1f}"
        lost.append({"client": names[client], "t": t, "cause": cause, "after": after})
    watch: list[float] = vip["watch"]
    rows = []
    for fault in kills:
        times = broke.get(id(fault), [])
        row: dict[str, Any] = {**fault.as_dict(), "affected": len(times)}
        if fault.at in watch:
            again = vip["again"][watch.index(fault.at)]
            everyone = [None if a is None else a - fault.at for a in again]
            row["not_answered_again"] = everyone.count(None)
            known = [a for a in everyone if a is not None]
            row["answered_again_s"] = {
                "p50": None if not known else round(median(known) or 0.0, 3),
                "max": None if not known else round(max(known), 3),
            }
            times = times + everyone
        value = (
            None
            if None in times
            else round(max((x for x in times if x is not None), default=0.0), 3)
        )
        rows.append({**row, "recovery_s": value})
    known = [r["recovery_s"] for r in rows if r["recovery_s"] is not None]
    causes: dict[str, int] = defaultdict(int)
    for row in lost:
        causes[row["cause"]] += 1
    ok, failed = vip["ok_per_s"], vip["failed_per_s"]
    return {
        "rows": rows,
        "by_kind": {
            "count": len(rows),
            "unrecovered": len(rows) - len(known),
            "recovery_s_p50": median(known),
            "recovery_s_p99": percentile(known, 99),
            "recovery_s_max": max(known) if known else None,
        },
        "summary": {
            "clients": len(names),
            "sessions_lost": len(lost) + len({w[0] for w in vip["wrong"] if w[1] >= WARMUP_S}),
            "sessions_lost_by_cause": dict(causes),
            "sessions_lost_detail": lost[:50],
            "sessions_lost_in_warmup": sum(1 for x in vip["losses"] if x[1] < WARMUP_S),
            "wrong_answers": len(vip["wrong"]),
            "requests_answered": sum(ok.values()),
            "requests_failed": sum(failed.values()),
            "clients_served_at_end": vip.get("served_at_end"),
            "vip_routers": vip.get("vip_routers", {}),
        },
    }


if __name__ == "__main__":
    from _common import not_a_bench

    not_a_bench(__file__, "bench/soak.py")
