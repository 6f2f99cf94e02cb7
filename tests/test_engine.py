"""The one scenario engine and summary schema, on every in-process driver."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from manycast.drivers.memory import MemoryNetwork
from manycast.ports import free_base_port
from manycast.runtime import PoolRun
from manycast.summary import EVENT_KEYS, SERVER_KEYS, SUMMARY_KEYS
from manycast.topology import loads
from pooltools import pool_toml, table

SCENARIO = (
    (2.0, "set_share", {"server": "s1", "share": 0.1}),
    (3.0, "client_rate", {"clients": "edge2", "rate": 8.0}),
    (4.0, "kill", {"server": "s2"}),
    (5.0, "add", {"server": "s5"}),
)


def topology_text(duration: float = 8.0) -> str:
    """The pool of `pooltools` (group `a` at 2 requests/s) plus a group named
    `edge2`, whose name ends in a digit, at 1 request/s."""
    text = pool_toml(servers=4, standby=1, clients=12, scenario=SCENARIO, duration=duration)
    edge = table("clients", name="edge2", count=6, router="ra", subnet="10.2.0.0/24", rate=1.0)
    return text.replace("[run]\n", edge + "\n[run]\n")


def memory_run(seed: int) -> tuple[PoolRun, list[tuple[float, str, str, str, bytes]]]:
    run = PoolRun(loads(topology_text()), "memory", seed=seed)
    net = run.network
    assert isinstance(net, MemoryNetwork)
    net.trace = []
    run.run(8.0)
    return run, net.trace


def digest(trace: list[tuple[float, str, str, str, bytes]]) -> str:
    h = hashlib.sha256()
    for at, kind, node, iface, packet in trace:
        h.update(f"{at!r} {kind} {node} {iface} {len(packet)}".encode() + packet)
    return h.hexdigest()


def test_two_memory_runs_with_one_seed_are_identical_byte_for_byte() -> None:
    first, trace_a = memory_run(seed=3)
    second, trace_b = memory_run(seed=3)
    assert len(trace_a) > 10_000  # the whole run: every delivery and timer
    assert digest(trace_a) == digest(trace_b)
    assert [(e.at, e.what) for e in first.engine.events] == [
        (e.at, e.what) for e in second.engine.events
    ]
    assert json.dumps(first.summary()) == json.dumps(second.summary())
    # ...and a different seed is a different run (the trace can tell them apart).
    _, trace_c = memory_run(seed=4)
    assert digest(trace_c) != digest(trace_a)


def edge_rate(run: PoolRun) -> set[float]:
    return {c.rate for c in run.nodes.clients.values() if c.name.startswith("edge2")}


def check_summary(summary: dict[str, Any]) -> None:
    assert tuple(summary) == SUMMARY_KEYS
    for event in summary["events"]:
        assert tuple(event) == EVENT_KEYS
    for server in summary["servers"].values():
        assert tuple(server) == SERVER_KEYS


def outcome(summary: dict[str, Any]) -> dict[str, Any]:
    """What must agree between drivers: who is up, what happened, everyone served."""
    return {
        "clients": summary["clients"],
        "served": summary["clients_served_at_end"],
        "status": {name: s["status"] for name, s in summary["servers"].items()},
        "events": [e["what"] for e in summary["events"]],
        "recovered": all(e["recovery_s"] is not None for e in summary["events"]),
        "state_lost": summary["state_lost"],
    }


@pytest.mark.slow
def test_one_scenario_gives_one_summary_on_memory_and_overlay() -> None:
    topo = loads(topology_text())
    memory = PoolRun(topo, "memory", seed=5)
    memory.run(8.0)
    overlay = PoolRun(topo, "overlay", seed=5, base_port=free_base_port(topo.attachment_count))
    overlay.run(8.0)
    summaries = {"memory": memory.summary(), "overlay": overlay.summary()}
    for driver, summary in summaries.items():
        check_summary(summary)
        assert summary["driver"] == driver
        assert summary["clients"] == 18
    assert outcome(summaries["memory"]) == outcome(summaries["overlay"])
    assert outcome(summaries["memory"])["served"] == 18
    assert outcome(summaries["memory"])["status"] == {
        "s1": "up",
        "s2": "dead",
        "s3": "up",
        "s4": "up",
        "s5": "up",
    }
    # The step named the group `edge2`: its clients (and only they) changed rate.
    for run in (memory, overlay):
        assert edge_rate(run) == {8.0}
        assert {c.rate for n, c in run.nodes.clients.items() if n.startswith("a")} == {2.0}
    # The same policy operations in the same order: the same shares on both drivers.
    shares = {d: {n: s["share"] for n, s in summaries[d]["servers"].items()} for d in summaries}
    assert shares["memory"] == shares["overlay"]
    assert sum(shares["memory"].values()) == pytest.approx(1.0)


def test_a_group_named_with_a_trailing_digit_changes_rate() -> None:
    run = PoolRun(loads(topology_text()), "memory", seed=1)
    run.run(2.9)
    assert edge_rate(run) == {1.0}
    run.run(3.1)
    assert edge_rate(run) == {8.0}
