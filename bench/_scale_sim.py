"""bench/scale.py's simulator part: `manycast sim`'s 1000-server preset (pool-1000: 1000
servers, 100 on standby, 14 routers, 300 sample clients, 10^6 modelled client
addresses; 10 share changes at 10 s, 100 servers die at 20 s, 100 join at 35 s) for 60
simulated seconds, timed on the wall clock (`sim_1000_servers_wall_s`, goal <= 120):
the whole command, from reading the preset (its topology is compiled then) to the
report written, as a user waits for `manycast sim pool-1000`; the report's own `wall_s`
starts after the topology is compiled.
A run still going after `WALL_LIMIT_S` is stopped: its figures are those of that
moment, `stopped` says where it was, and `sim_1000_servers_wall_s` is null.

The preset runs as `manycast sim` runs it (`manycast.sim.command`), with the pool's
gossip membership where it has one (`membership = "swim"`), and its report's figures
a user checks come along: whether every address ends served by exactly one live
server with every share within one bucket, the sample sessions broken, the control
datagrams per server per second, and how long each step took to settle.

Run alone, it prints one json object, its last line on stdout, naming the bench
to run (`_common.not_a_bench`).
"""

from __future__ import annotations

import _common  # isort: skip  # first: a missing package ends in the JSON line
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import progress
from manycast.sim.command import resolve, run_and_write

PRESET = "pool-1000"
DURATION_S = 60.0
WALL_LIMIT_S = 900.0  # the run stops there, and says so, rather than hold the bench up


def run(
    preset: str = PRESET, duration: float | None = DURATION_S, wall_limit_s: float = WALL_LIMIT_S
) -> dict[str, Any]:
    began = time.perf_counter()
    name, topology, settings = resolve(preset, duration=duration, wall_limit_s=wall_limit_s)
    with tempfile.TemporaryDirectory(prefix="scale-sim-") as directory:
        report, _, _ = run_and_write(
            name, topology, settings, Path(directory), progress=progress, plots=False
        )
    command_wall = time.perf_counter() - began
    return {
        "preset": name,
        "membership": report["pool"]["membership"],
        "servers": report["pool"]["servers"],
        "routers": report["pool"]["routers"],
        "addresses": report["population"]["addresses"],
        "simulated_s": report["simulated_s"],
        "wall_s": report["wall_s"],
        "command_wall_s": round(command_wall, 3),
        "build_s": report["build_s"],
        "cpu_s": report["cpu_s"],
        "network_events": report["network_events"],
        "ok": report["ok"],
        "stopped": report["stopped"],
        "every_address_served_once": report["every_address_served_once"],
        "share_error_within_one_bucket": report["share_error_within_one_bucket"],
        "sessions": report["sessions"],
        "control_per_server_per_s": report["control_per_server_per_s"],
        "recovery": report["recovery"],
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def wall_of_1000_servers(part: dict[str, Any]) -> float | None:
    """The figure `sim_1000_servers_wall_s`: the wall time of the whole command running
    the 1000-server preset for 60 simulated seconds; None when this part ran something
    else, did not finish within its wall limit (`stopped` says where it was), or did not
    run."""
    if part.get("preset") != PRESET or part.get("simulated_s") != DURATION_S:
        return None
    if part.get("stopped"):
        return None
    wall: float = part["command_wall_s"]
    return wall


if __name__ == "__main__":
    _common.not_a_bench(__file__, "bench/scale.py")
