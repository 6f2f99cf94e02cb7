"""The soak's pool and its seeded fault schedule (bench/soak.py runs them).

The pool is `_pool.two_router_pool` (ra with s1, s2 and client LAN a; rb with s3, s4
and client LAN b; ra-rb 1 ms) plus two standby servers on ra (s5, s6). Faults are
drawn from `random.Random(seed)`: every kind in turn at a random offset inside each
cycle, so that every kind happens in any run and faults overlap. Router restarts
and DNS restarts each come from a stream of their own
(`random.Random(f"{seed}:router_restart")`, `...:dns_restart`), so that the other
kinds fall where they fell before these kinds existed.

A private pool (`--private`) is the same pool with `private = true`, its key in a
key file and its records on a DNS server of its own process (`[pool] dns`), which
the `dns_restart` fault SIGKILLs and starts again.

Beside it, when `vip_router_kill` is drawn, a small VIP pool (Fig 17-19) with its
own clients (`vip_pool_text`): its nearest VIP router vr1 runs alone in a process
that the fault SIGKILLs and starts again; that kind has a stream of its own too.

Run alone, it prints one json object, its last line on stdout, naming the bench
to run (`_common.not_a_bench`).
"""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from _pool import table, two_router_pool

VICTIMS = ("s3", "s4")  # each in its own `manycast run --nodes` process
ROUTER = "rb"  # in its own process, SIGKILLed and restarted: the edge router of
ROUTER_SERVERS = VICTIMS  # these servers
ROUTER_LAN = "b"  # and of this client LAN
LOCAL_SERVERS = ("s1", "s2")  # with the routers, in the infrastructure process
STANDBY = ("s5", "s6")  # join once each
CORE_LINK = "ra-rb"  # the only link with emulated delay: loss and delay can change there

WARMUP_S = 10.0  # the pool settles with every client served before the first fault
TAIL_S = 12.0  # no fault starts in the last TAIL_S: every fault can be recovered from
CYCLE_S = 20.0  # every kind of fault once per cycle, at random offsets
RESTART_S = (2.0, 5.0)  # a killed server's process starts again this long after
BURST_S = (2.0, 5.0)  # loss bursts and delay spikes last this long
BURST_LOSS = (0.1, 0.3)
SPIKE_DELAY_S = (0.02, 0.1)
SHARE = (0.10, 0.35)
FLOOD_S = 2.0
FLOOD_PACKETS = 1500
# A killed router's process is started again this long after. A supervisor
# restarts a crashed daemon in a fraction of a second to about a second (systemd's
# RestartSec is 100 ms by default, then the process starts and reads its
# configuration): 0.3 s is about the fastest such restart, and already the pool's
# failure-detection time (3 missed 100 ms heartbeats), so every restart splits the
# pool for a moment; 1.5 s keeps the outage plus the membership's recovery (0.1 s)
# inside the clients' 2 s request timeout, so a restart can be lived through
# without losing a session. A longer outage is a router lost, which no pool can
# hide from clients whose only way in is that router.
ROUTER_DOWN_S = (0.3, 1.5)
# The soak's pool finds a death after this long (`heartbeat_misses` is this over the
# heartbeat period, 20 at 100 ms): longer than the longest router outage drawn, so
# that the servers behind a restarted router live through it as an outage, not as a
# death followed by a return. The pool's default (3 missed 100 ms heartbeats, 0.3 s)
# is shorter than every outage drawn: each restart then split the pool and merged it
# again, which cost about ten times the sessions (docs/soak.md, finding 15). A user
# whose routers restart picks it so too; `--heartbeat-misses 3` runs the default.
DETECTION_S = 2.0
# A private pool's DNS server is started again this long after it was killed: "a few
# seconds", a supervisor's restart of a server that reads its zone files first.
DNS_DOWN_S = (2.0, 6.0)
# The TTL of the private pool's records: short enough that every router's cached key
# expires, and is looked up again, many times in a run, so that some expiries fall
# while the DNS server is down (the default TTL, 300 s, would put about six in 30 min).
KEY_TTL_S = 30
VIP_DOWN_S = (2.0, 5.0)  # a killed VIP router's process starts again this long after
VIP_VICTIM = "vr1"  # the VIP pool's nearest VIP router (vr2 takes new flows meanwhile)
VIP_LAN = "v"  # the VIP pool's client LANs: v (long connections), n (a new flow
VIP_SHORT_LAN = "n"  # every few requests)

_DRAWN_TOGETHER = ("kill", "join", "set_share", "rebalance", "loss_burst", "delay_spike", "flood")
_OWN_STREAM = ("router_restart", "dns_restart", "vip_router_kill")
KINDS = (*_DRAWN_TOGETHER, *_OWN_STREAM)
PRIVATE_ONLY = ("dns_restart",)  # kinds a public pool (`--no-private`) does not have
VIP_KINDS = ("vip_router_kill",)  # kinds of the VIP pool, not of the manycast pool


@dataclass
class Fault:
    """One fault at bench time `at`; `until` when it ends (restart, burst end)."""

    kind: str
    at: float
    until: float | None = None
    args: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "at": round(self.at, 3), "until": self.until, **self.args}


def pool_text(
    technique: str,
    clients_per_lan: int,
    rate: float,
    duration: float,
    private: tuple[str, tuple[str, int]] | None = None,
    membership: str = "heartbeat",
    heartbeat_ms: int = 100,
    heartbeat_misses: int = 3,
    client_options: Mapping[str, Any] | None = None,
) -> str:
    """The soak's pool; `private`: (key file, DNS server's host and port) for a private
    pool whose routers read its key from that server; the failure detection's settings
    as `[pool]` has them."""
    text = two_router_pool(
        technique=technique,
        clients_per_lan=clients_per_lan,
        rate=rate,
        duration=duration,
        membership=membership,
        heartbeat_ms=heartbeat_ms,
        heartbeat_misses=heartbeat_misses,
        client_options=client_options,
    )
    if private is not None:
        key_file, (host, port) = private
        head, rest = text.split("\n", 1)  # "[pool]" and its keys
        keys = table("pool", array=False, private=True, key_file=key_file, dns=f"{host}:{port}")
        text = head + "\n" + keys.split("\n", 1)[1] + rest
    head, run = text.rsplit("[run]", 1)
    standby = [table("server", name=name, router="ra", standby=True) for name in STANDBY]
    return head + "\n".join(standby) + "\n[run]" + run


def vip_pool_text(long: int, short: int, duration: float) -> str:
    """The VIP pool (as bench/vip.py's): clients on ra, a core with VIP router vr1 (the
    nearest), servers s1, s3 and VIP router vr2 on rs1, s2, s4 on rs2. `long` clients
    keep one connection at 0.5 requests/s; `short` ones open a new one (a new flow,
    placed by a VIP router) every 4 answers at 2 requests/s."""
    parts = [
        table(
            "pool",
            array=False,
            name="service.vip.test",
            approach="vip",
            vip="203.0.113.80",
            heartbeat_ms=100,
            heartbeat_misses=3,
            report_interval_ms=1000,
        )
    ]
    parts += [table("router", name=n) for n in ("ra", "core", "rs1", "rs2")]
    for a, b, delay in (("ra", "core", 2), ("core", "rs1", 1), ("core", "rs2", 3)):
        parts.append(table("link", between=[a, b], delay_ms=delay))
    for index, name in enumerate(("s1", "s2", "s3", "s4")):
        parts.append(table("server", name=name, router="rs1" if index % 2 == 0 else "rs2"))
    parts.append(table("vip_router", name=VIP_VICTIM, router="core"))
    parts.append(table("vip_router", name="vr2", router="rs1"))
    for name, count, rate, per, subnet in (
        (VIP_LAN, long, 0.5, 0, "10.1.0.0/16"),
        (VIP_SHORT_LAN, short, 2.0, 4, "10.2.0.0/16"),
    ):
        parts.append(
            table(
                "clients",
                name=name,
                count=count,
                router="ra",
                subnet=subnet,
                rate=rate,
                requests_per_connection=per,
                delay_ms=0,
            )
        )
    parts.append(table("run", array=False, duration=duration))
    return "\n".join(parts)


def schedule(
    seed: int, seconds: float, kinds: tuple[str, ...] = KINDS, cycle_s: float = CYCLE_S
) -> list[Fault]:
    """Every kind once per `cycle_s` (the last cycle may be short), kills only of a
    victim that is up at that time, joins while a standby is left. Only `kinds` are
    kept, from the same draws: a subset's faults fall where the full schedule's do."""
    rng = random.Random(seed)
    restarts = random.Random(f"{seed}:router_restart")
    dns = random.Random(f"{seed}:dns_restart")
    dns_back = 0.0  # when the DNS server is started again after its last kill
    vip = random.Random(f"{seed}:vip_router_kill")
    vip_back = 0.0
    faults: list[Fault] = []
    last = seconds - TAIL_S
    down_until = dict.fromkeys(VICTIMS, 0.0)
    standby = list(STANDBY)
    start = WARMUP_S
    while start < last:
        end = min(start + cycle_s, last)
        for kind in _DRAWN_TOGETHER:
            at = rng.uniform(start, end)
            fault = _draw(rng, kind, at, down_until, standby)
            if fault is not None and kind in kinds:
                faults.append(fault)
        at = restarts.uniform(start, end)
        down = restarts.uniform(*ROUTER_DOWN_S)
        if "router_restart" in kinds:
            args = {"router": ROUTER, "down_s": round(down, 3)}
            faults.append(Fault("router_restart", at, round(at + down, 3), args))
        at = dns.uniform(start, end)
        down = dns.uniform(*DNS_DOWN_S)
        if "dns_restart" in kinds and at > dns_back + 1.0:  # up again before the next kill
            dns_back = at + down
            faults.append(Fault("dns_restart", at, round(at + down, 3), {"down_s": round(down, 3)}))
        at = vip.uniform(start, end)
        down = vip.uniform(*VIP_DOWN_S)
        if "vip_router_kill" in kinds and at > vip_back + 3.0:  # a member again before
            vip_back = at + down
            args = {"vip_router": VIP_VICTIM, "down_s": round(down, 3)}
            faults.append(Fault("vip_router_kill", at, round(at + down, 3), args))
        start = end
    return sorted(faults, key=lambda f: f.at)


def _draw(
    rng: random.Random, kind: str, at: float, down_until: dict[str, float], standby: list[str]
) -> Fault | None:
    if kind == "kill":
        up = [v for v in VICTIMS if down_until[v] < at - 1.0]
        if not up:
            return None
        victim = rng.choice(up)
        restart = at + rng.uniform(*RESTART_S)
        down_until[victim] = restart + 3.0  # started again and a member before the next kill
        return Fault("kill", at, round(restart, 3), {"server": victim})
    if kind == "join":
        if not standby:
            return None
        return Fault("join", at, None, {"server": standby.pop(0)})
    if kind == "set_share":
        candidates = [*LOCAL_SERVERS, *(v for v in VICTIMS if down_until[v] < at)]
        server = rng.choice(candidates)
        return Fault(
            "set_share", at, None, {"server": server, "share": round(rng.uniform(*SHARE), 3)}
        )
    if kind == "rebalance":
        return Fault("rebalance", at, None, {"target": 1.1})
    if kind == "loss_burst":
        until = at + rng.uniform(*BURST_S)
        return Fault(
            "loss_burst",
            at,
            round(until, 3),
            {"link": CORE_LINK, "loss": round(rng.uniform(*BURST_LOSS), 3)},
        )
    if kind == "delay_spike":
        until = at + rng.uniform(*BURST_S)
        delay = round(rng.uniform(*SPIKE_DELAY_S), 4)
        return Fault("delay_spike", at, round(until, 3), {"link": CORE_LINK, "delay_s": delay})
    if kind == "flood":
        return Fault(
            "flood", at, round(at + FLOOD_S, 3), {"packets": FLOOD_PACKETS, "router": "ra"}
        )
    raise ValueError(kind)


def scenario_text(seed: int, seconds: float, clients_per_lan: int, technique: str = "R3") -> str:
    """The pool with the schedule's in-pool faults (share changes, rebalances, joins)
    as `[[scenario]]` steps: the same faults in one process, on any driver."""
    faults = schedule(seed, seconds, ("set_share", "rebalance", "join"))
    text = pool_text(technique, clients_per_lan, 0.5, seconds)
    head, run = text.rsplit("[run]", 1)
    steps = []
    for f in faults:
        if f.kind == "set_share":
            args = {"server": f.args["server"], "share": f.args["share"]}
            steps.append(table("scenario", at=round(f.at, 3), action="set_share", **args))
        elif f.kind == "rebalance":
            steps.append(table("scenario", at=round(f.at, 3), action="rebalance"))
        else:
            steps.append(
                table("scenario", at=round(f.at, 3), action="add", server=f.args["server"])
            )
    return head + "\n".join(steps) + "\n[run]" + run


if __name__ == "__main__":
    from _common import not_a_bench

    not_a_bench(__file__, "bench/soak.py")
