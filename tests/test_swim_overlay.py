"""The gossip membership on real sockets: the bundled `demo-swim` pool on the overlay
(every node in this process, 240 clients through Python routers, a probe every
100 ms). Its round trips swing from 20 ms to most of a second as the host gets busy;
a wait fixed at half a period took live servers for dead there and removed them
(this test then failed 3 times in 4 with a dozen removals or more). Lifeguard's
parts (`protocol/lifeguard.py`) must keep every live server in the pool for the
whole run (at least 3 s past the kill) and still replace the killed one.
"""

from __future__ import annotations

from importlib.resources import files

import pytest

from manycast.ports import free_base_port
from manycast.runtime import PoolRun
from manycast.topology import loads
from pooltools import DEADLINE, Settled, every, patient, run_pool_until, served_now

pytestmark = pytest.mark.slow

KILL_AT = 5.0  # the clients have connected and the start's round trips have settled
STEPS = f"""
[[scenario]]
at = {KILL_AT}
action = "kill"
server = "s3"

[run]
duration = {KILL_AT + 3.0}
"""


def demo_with_one_kill() -> str:
    """The bundled demo-swim topology with its steps replaced by s3's death."""
    text = files("manycast").joinpath("topologies", "demo-swim.toml").read_text("utf-8")
    return text[: text.index("[[scenario]]")] + STEPS


def test_a_swim_pool_under_load_keeps_its_live_servers_and_replaces_a_dead_one() -> None:
    topo = loads(demo_with_one_kill())
    assert topo.pool.membership == "swim" and topo.pool.heartbeat_s == 0.1
    run = patient(PoolRun(topo, "overlay", seed=1, base_port=free_base_port(topo.attachment_count)))
    replaced = Settled(run, lambda alloc: "s3" not in alloc.servers, since=KILL_AT)
    done, summary = run_pool_until(
        run,
        every(
            run,
            0.1,
            lambda: (
                run.now >= KILL_AT + 3.0
                and "s3" in run.engine.dead
                and replaced()
                and served_now(run)
            ),
        ),
    )
    servers = run.nodes.servers
    changes = {name: server.coordinator.changes for name, server in servers.items()}
    assert done, f"not settled after {DEADLINE} s: {summary}; changes: {changes}"
    # The one change is s3's removal: no live server was removed (and added back).
    committed = [what for log in changes.values() for _, _, what in log]
    assert "commit remove s3" in committed
    assert [what for what in committed if "remove" in what] == ["commit remove s3"]
    live = {"s1", "s2", "s4"}
    assert {summary["servers"][name]["epoch"] for name in live} == {2}
    for name in live:
        swim = servers[name].coordinator.swim
        assert swim is not None
        assert {m for m in swim.members if swim.alive(m)} == live - {name}, name
    assert summary["clients_served_at_end"] == summary["clients"] == 240
