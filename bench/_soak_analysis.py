"""The soak's figures from what its processes recorded (bench/soak.py).

A session loss is one call of a client's `_lost` (a reset, an unanswered request, a
timed-out or closed connection), in bench time, with the first answer after it. It is
lost to a crash when, within a kill's window (the kill to the restart plus
CRASH_AFTER_S), the killed server owned the client in some allocation in effect from
LOOKBACK before the kill to the loss: its session state lived there (under R3 a
moved session's state stays with its old owner until the client's next packet, and a
client sends at least every 1.5 / rate s). Every other loss, and every wrong answer
not so explained, counts in `sessions_lost`.

A loss within a router restart's window (the kill to the restart plus ROUTER_AFTER_S)
of a client behind that router, or owned in that time by a server behind it, is
the restart's doing: it counts in `sessions_lost` (no state died: a lossless pool
should keep it) and is attributed to the restart. A restart's `recovery_s` runs
until every client behind the router, and every client whose session it broke,
was answered again.

A DNS restart's `recovery_s` runs until the restarted server answered the bench's
own lookup of the pool's key (as a router asks it) and every client whose session
it broke (the latest fault before the loss) was answered again.

Run alone, it prints one json object, its last line on stdout, naming the bench
to run (`_common.not_a_bench`).
"""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
import bisect
import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from _pool import median, percentile
from _soak_plan import ROUTER_LAN, ROUTER_SERVERS, WARMUP_S, Fault

CRASH_AFTER_S = 8.0
ATTRIBUTE_S = 10.0  # a loss no crash explains goes to the latest fault this recent
# A loss this long after a router came back may still be the restart's: a client
# gives a request up 2 s after sending it, an R3 server a state query after 1.5 s.
ROUTER_AFTER_S = 4.0


def owners_bytes(allocation: Any, order: list[str], addresses: np.ndarray) -> bytes:
    """Each client's owner in `allocation`, a byte per client: its index in `order`
    (the servers in the order first seen, extended here). What `Owners` reads; a
    list of 1000 would be 8 kB an epoch in the process whose memory is measured."""
    order.extend(n for n in allocation.servers if n not in order)
    index = np.array([order.index(n) for n in allocation.servers], dtype=np.uint8)
    return index[allocation.owner_many(addresses)].tobytes()


class Owners:
    """Which server owned each client, epoch by epoch, by when the infrastructure
    process first saw the epoch."""

    def __init__(self, infra: dict[str, Any]) -> None:
        epochs = sorted(infra["epochs"].items(), key=lambda kv: kv[1][0])
        self.times = [t for _, (t, _) in epochs]
        # each client's owner as a byte per client (the overlay's infrastructure
        # process) or a list (the lab's)
        self.owners = [
            np.frombuffer(o, dtype=np.uint8) if isinstance(o, bytes) else np.array(o, np.int32)
            for _, (_, o) in epochs
        ]
        self.servers: list[str] = infra["servers"]

    def owned(self, client: int, server: str, start: float, end: float) -> bool:
        if server not in self.servers or not self.times:
            return False
        index = self.servers.index(server)
        first = max(0, bisect.bisect_right(self.times, start) - 1)
        last = bisect.bisect_right(self.times, end)
        return any(int(o[client]) == index for o in self.owners[first:last])

    def sequence(self, client: int, start: float, end: float) -> list[str]:
        """The client's owners, in order, in the allocations in effect from start to end."""
        first = max(0, bisect.bisect_right(self.times, start) - 1)
        last = bisect.bisect_right(self.times, end)
        seen: list[str] = []
        for o in self.owners[first:last]:
            index = int(o[client])
            name = self.servers[index] if 0 <= index < len(self.servers) else "none"
            if not seen or seen[-1] != name:
                seen.append(name)
        return seen


def held_by_name(topology: Any) -> dict[str, str]:
    """The address a client's connection was sent to -> the server's name (or
    "group"): under D the server that holds it, which may not be its owner yet."""
    names = {str(topology.address(s)): s for s in topology.servers}
    names[str(topology.pool.group)] = "group"
    return names


def held_by(client: Any, names: dict[str, str]) -> str | None:
    """The name of the server `client`'s connection is sent to (`held_by_name`), or
    None with no connection."""
    key = client.conn_key
    return None if key is None else names.get(str(key[1][0]), str(key[1][0]))


def on_losses(
    clients: Sequence[Any], topology: Any, record: Callable[[int, float, str, str | None], None]
) -> None:
    """Call `record(index, now, cause, via)` at every session loss of `clients[index]`
    (the overlay's clients' process and the memory driver's replay alike): the cause
    is "reset", the client's own, or its failure at that instant; `via`, the server
    its connection was sent to (`held_by`)."""
    names = held_by_name(topology)
    for index, client in enumerate(clients):
        original = client._lost

        def lost(
            now: float,
            reset: bool = False,
            cause: str = "",
            i: int = index,
            c: Any = client,
            f: Any = original,
        ) -> None:
            fails = c.stats.failures
            why = "reset" if reset else cause
            if not why:
                why = fails[-1][1] if fails and fails[-1][0] == now else "closed"
            record(i, now, why, held_by(c, names))
            f(now, reset, cause)

        client._lost = lost


def _crash(
    faults: Sequence[Fault],
    owners: Owners,
    client: int,
    t: float,
    lookback: float,
    held_by: str | None = None,
) -> Fault | None:
    """The kill whose server held the client's session when it was lost: a server
    that owned the client, or `held_by`, the server its connection was sent to. With
    D a connection lives on the server it was sent to, which need not be its owner (a
    loaded owner passes new connections to a less loaded server, which keeps them as
    guests; a move waits its turn): finding 23."""
    for fault in faults:
        if fault.kind != "kill" or not fault.at <= t <= (fault.until or fault.at) + CRASH_AFTER_S:
            continue
        victim = fault.args["server"]
        if held_by == victim or owners.owned(client, victim, fault.at - lookback, t):
            return fault
    return None


def _behind(name: str) -> bool:
    """A client on the restarted router's LAN (clients are named LAN + number)."""
    return name.rstrip("0123456789") == ROUTER_LAN


def _router_restart(
    faults: Sequence[Fault], owners: Owners, name: str, client: int, t: float, lookback: float
) -> Fault | None:
    for fault in faults:
        if fault.kind != "router_restart":
            continue
        if not fault.at <= t <= (fault.until or fault.at) + ROUTER_AFTER_S:
            continue
        if _behind(name) or any(
            owners.owned(client, server, fault.at - lookback, t) for server in ROUTER_SERVERS
        ):
            return fault
    return None


def _latest(faults: Sequence[Fault], t: float) -> Fault | None:
    before = [f for f in faults if f.at <= t and t - f.at <= ATTRIBUTE_S]
    return before[-1] if before else None


def analyse(
    faults: list[Fault],
    infra: dict[str, Any],
    clients: dict[str, Any],
    seconds: float,
    technique: str,
    rate: float,
) -> dict[str, Any]:
    owners = Owners(infra)
    lookback = 1.5 / rate + 2.0
    lost: list[dict[str, Any]] = []
    crashed = 0
    per_fault: dict[int, list[float | None]] = defaultdict(list)
    # the sessions_lost each fault broke, by cause, and how many of them behind rb
    causes_of: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    behind_of: dict[int, int] = defaultdict(int)
    crashed_by: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    crash_causes: dict[str, int] = defaultdict(int)
    ids = {id(f): i for i, f in enumerate(faults)}
    warmup = 0
    names: list[str] = clients["names"]
    for client, t, cause, first_ok, *via in clients["losses"]:
        if t < WARMUP_S:  # clients connecting while the pool forms, before any fault
            warmup += 1
            continue
        crash = _crash(faults, owners, client, t, lookback, via[0] if via else None)
        fault = (
            crash
            or _router_restart(faults, owners, names[client], client, t, lookback)
            or _latest(faults, t)
        )
        if fault is not None:
            per_fault[ids[id(fault)]].append(None if first_ok is None else first_ok - fault.at)
        if crash is not None:
            crashed += 1
            crash_causes[cause] += 1
            crashed_by[ids[id(crash)]][cause] += 1
        else:
            if fault is not None:
                causes_of[ids[id(fault)]][cause] += 1
                behind_of[ids[id(fault)]] += _behind(names[client])
            lost.append(
                {
                    "client": client,
                    "name": names[client],
                    "t": t,
                    "cause": cause,
                    "after": None if fault is None else f"{fault.kind}@{fault.at:.1f}",
                    "owners": owners.sequence(client, t - lookback, t),
                    # the server the connection was sent to (overlay only)
                    **({"via": via[0]} if via else {}),
                }
            )
    wrong = [
        w
        for w in clients["wrong"]
        if w[1] >= WARMUP_S and _crash(faults, owners, w[0], w[1], lookback) is None
    ]
    watch: list[float] = clients.get("watch", [])
    recovery: dict[str, list[float | None]] = defaultdict(list)
    fault_rows = []
    for i, fault in enumerate(faults):
        times = per_fault.get(i, [])
        row = {**fault.as_dict(), "affected": len(times)}
        if i in causes_of:
            row["lost_by_cause"] = dict(causes_of[i])
            row["lost_behind_router"] = behind_of[i]
        if i in crashed_by:
            row["crashed_by_cause"] = dict(crashed_by[i])
        if fault.kind == "router_restart" and (fault.until or fault.at) in watch:
            # Every client behind the router was cut off: until each is answered again.
            again = clients["again"][watch.index(fault.until or fault.at)]
            behind = [
                None if again[c] is None else again[c] - fault.at
                for c, name in enumerate(names)
                if _behind(name)
            ]
            row["behind_not_answered_again"] = behind.count(None)
            # from the restart: the clients' own request spacing (up to 1.5 / rate)
            # bounds this from below, however fast the router learns its members
            after = [t - (fault.until - fault.at) for t in behind if t is not None and fault.until]
            row["behind_answered_again_s"] = {
                "p50": None if not after else round(median(after) or 0.0, 3),
                "max": None if not after else round(max(after), 3),
            }
            times = times + behind
        if fault.kind == "dns_restart":
            back = fault.args.get("answered_again_at")
            row["answered_again_s"] = (
                None if back is None or fault.until is None else round(back - fault.until, 4)
            )
            times = [*times, None if back is None else back - fault.at]
        value = (
            None
            if None in times
            else round(max((x for x in times if x is not None), default=0.0), 3)
        )
        recovery[fault.kind].append(value)
        fault_rows.append({**row, "recovery_s": value})
    by_kind = {}
    for kind, values in recovery.items():
        known = [v for v in values if v is not None]
        by_kind[kind] = {
            "count": len(values),
            "unrecovered": len(values) - len(known),
            "recovery_s_p50": median(known),
            "recovery_s_p99": percentile(known, 99),
            "recovery_s_max": max(known) if known else None,
        }
    ok, failed = clients["ok_per_s"], clients["failed_per_s"]
    minutes = int(seconds // 60) + (1 if seconds % 60 else 0)
    per_minute = []
    for m in range(minutes):
        lat = clients["latency_per_min"].get(m, [])
        per_minute.append(
            {
                "minute": m,
                "answered": sum(ok.get(s, 0) for s in range(60 * m, 60 * m + 60)),
                "failed": sum(failed.get(s, 0) for s in range(60 * m, 60 * m + 60)),
                "latency_ms_p50": None if not lat else round(1000 * (median(lat) or 0), 2),
                "latency_ms_p99": None if not lat else round(1000 * (percentile(lat, 99) or 0), 2),
            }
        )
    causes: dict[str, int] = defaultdict(int)
    kinds: dict[str, int] = defaultdict(int)
    for row in lost:
        causes[row["cause"]] += 1
        kinds[row["after"].split("@")[0] if row["after"] else "none"] += 1
    return {
        "technique": technique,
        "faults": {
            kind: sum(1 for f in faults if f.kind == kind)
            for kind in sorted({f.kind for f in faults})
        },
        "faults_total": len(faults),
        "sessions_lost": len(lost) + len({w[0] for w in wrong}),
        "sessions_lost_by_cause": dict(causes),
        "sessions_lost_by_fault_kind": dict(kinds),
        "sessions_lost_detail": lost[:50],
        "sessions_lost_all": lost,
        "sessions_lost_to_crashes": crashed,
        "sessions_lost_to_crashes_by_cause": dict(crash_causes),
        "sessions_lost_in_warmup": warmup,
        "wrong_answers": len(clients["wrong"]),
        "wrong_answers_not_crash": wrong[:50],
        "requests_answered": sum(ok.values()),
        "requests_failed": sum(failed.values()),
        "requests_answered_late": clients.get("late_answers"),
        "redirects": clients.get("redirects"),
        "per_minute": per_minute,
        "recovery_by_kind": by_kind,
        "per_fault": fault_rows,
        "epochs_seen": len(owners.times),
        "infra_faults_done": len(infra["done"]),
        "clients_connected_at_end": clients["connected_at_end"],
        "clients_served_at_end": clients.get("served_at_end"),
    }


def keep_every_loss(result: dict[str, Any], logs: Path | None) -> None:
    """Take the full list of losses out of `analyse`'s result (the JSON keeps the first
    50) and write it to `sessions_lost.json` in the --logs directory, if there is one."""
    every = result.pop("sessions_lost_all")
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
        (logs / "sessions_lost.json").write_text(json.dumps(every, indent=0) + "\n")


if __name__ == "__main__":
    from _common import not_a_bench

    not_a_bench(__file__, "bench/soak.py")
