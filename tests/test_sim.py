"""`manycast sim`: a pool too large to run live, simulated on the virtual clock.

The small preset (20 servers, 10^4 modelled addresses, 40 sample clients, 5 s with
two share changes, two deaths and two joins) runs through the installed command, and
its report says what a user checks: every address served by exactly one live
server at the end, every share within one bucket, the sample sessions broken, the
control traffic per server; and each step of the scenario settled.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from manycast.cli import app
from manycast.drivers.memory import MemoryNetwork
from manycast.errors import ConfigError
from manycast.policy import equal_split
from manycast.sim import PoolShape, Population, topology_text
from manycast.space import AddressSpace
from manycast.topology import loads

_SCRIPT = Path(sys.executable).with_name("manycast")
MANYCAST = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "manycast"]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, str]:
    out = tmp_path_factory.mktemp("sim")
    done = subprocess.run(
        [*MANYCAST, "sim", "pool-20", "--out", str(out), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report, out, done.stderr


def test_the_small_preset_ends_with_every_address_served_once(
    small: tuple[dict[str, Any], Path, str],
) -> None:
    report, _, _ = small
    assert report["pool"] == {
        "servers": 20,
        "standby": 2,
        "routers": 4,
        "links": report["pool"]["links"],
        "buckets": 65536,
        "technique": "R3",
        "membership": report["pool"]["membership"],
    }
    assert report["population"]["addresses"] == 10_000
    assert report["simulated_s"] == 5.0
    assert report["ok"] is True
    assert report["every_address_served_once"] is True
    assert report["share_error_within_one_bucket"] is True
    end = report["end"]
    assert end["unserved"] == 0 and end["served_twice"] == 0
    assert end["share_error_buckets"] <= 1
    assert end["live_servers"] == 20  # 2 died, 2 joined


def test_the_scenario_is_seen_and_each_step_settles(
    small: tuple[dict[str, Any], Path, str],
) -> None:
    report, _, _ = small
    steps = report["recovery"]
    assert [(s["at"], s["what"].split()[0], s["steps"]) for s in steps] == [
        (0.5, "set_share", 2),
        (1.0, "kill", 2),
        (4.0, "add", 2),
    ]
    for step in steps:
        assert step["settled_s"] is not None and 0 < step["settled_s"] <= 1.0, step
    # The dead servers' addresses had no server until the pool moved them: about their
    # share of the population (2 of 20 servers), seen by the samples.
    kill = steps[1]
    assert 0.05 <= kill["worst_unserved"] <= 0.15, kill
    assert kill["worst_share_error_buckets"] > 1000
    series = report["series"]
    assert len(series["t"]) == 51 and series["live_servers"][0] == 20
    assert min(series["live_servers"]) == 18


def test_sessions_broken_and_control_traffic_are_counted(
    small: tuple[dict[str, Any], Path, str],
) -> None:
    report, _, _ = small
    sessions = report["sessions"]
    assert sessions["sample_clients"] == 40
    assert sessions["requests_ok"] > 150  # 40 clients at 1 request/s for 5 s
    # Sessions on the two dead servers break (their clients reconnect elsewhere);
    # under R3 the share change and the joins break none.
    assert 1 <= sessions["broken"] <= 10
    assert 1 <= sessions["clients_broken"] <= sessions["broken"]
    breaks = [step["sessions_broken"] for step in report["recovery"]]
    assert breaks == [0, sessions["broken"], 0]
    control = report["control_per_server_per_s"]
    assert control["idle"] > 0 and control["max"] >= control["mean"] >= control["idle"] * 0.5


def test_the_report_summary_and_plots_are_written(
    small: tuple[dict[str, Any], Path, str],
) -> None:
    report, out, stderr = small
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "control_traffic.png",
        "load_spread.png",
        "report.json",
        "sessions_broken.png",
        "share_error.png",
        "summary.txt",
    ]
    assert json.loads((out / "report.json").read_text())["end"] == report["end"]
    summary = (out / "summary.txt").read_text()
    assert "every address served by exactly one live server: yes" in summary
    assert "every share within one bucket of the agreed one:  yes" in summary
    assert "sample sessions broken:" in summary
    assert (out / "share_error.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "manycast sim pool-20: 20 servers" in stderr


def test_a_bad_preset_name_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["sim", "pool-7", "--out", str(tmp_path)])
    assert result.exit_code == 2
    message = " ".join(result.stderr.split())
    assert "no preset named 'pool-7' (presets: pool-20, pool-100, pool-1000)" in message
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not list(tmp_path.iterdir())


def test_a_broken_topology_file_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(
        '[pool]\ngroup = "232.1.1.1"\n[[router]]\nname = "r"\n'
        '[[server]]\nname = "s"\nrouter = "nope"\n'
    )
    result = CliRunner().invoke(app, ["sim", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert f"{path}:7" in " ".join(result.stderr.split())


def test_a_topology_file_runs_with_its_own_scenario(tmp_path: Path) -> None:
    shape = PoolShape(
        servers=4,
        sample_clients=8,
        steps=[(1.0, "kill", {"server": "s3"})],
        duration=2.0,
    )
    path = tmp_path / "four.toml"
    path.write_text(topology_text(shape))
    out = tmp_path / "out"
    args = ["sim", str(path), "--out", str(out), "--addresses", "2000", "--no-plots", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["sim"] == "four" and report["simulated_s"] == 2.0
    assert report["population"]["addresses"] == 2000
    assert report["end"]["live_servers"] == 3 and report["every_address_served_once"]
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "summary.txt"]


def test_the_population_load_is_its_owners_by_address() -> None:
    space = AddressSpace.create("10.0.0.0/8", bits=8)
    population = Population.generate(space, 5000, mean_rate=0.5, seed=3)
    assert len(np.unique(population.addresses)) == 5000
    assert all(space.contains(int(a)) for a in population.addresses[:100])
    allocation = equal_split(space, ["s1", "s2", "s3"])
    loads = population.loads(allocation)
    by_hand = dict.fromkeys(allocation.servers, 0.0)
    for address, rate in zip(population.addresses.tolist(), population.rates.tolist(), strict=True):
        owner = allocation.owner(address)
        assert owner is not None
        by_hand[owner] += rate
    assert loads.tolist() == pytest.approx([by_hand[s] for s in allocation.servers])
    assert loads.sum() == pytest.approx(population.total_rate) == pytest.approx(2500, rel=0.1)


def test_the_large_preset_topology_is_an_ordinary_topology() -> None:
    from manycast.sim import preset

    chosen = preset("pool-1000")
    topology = loads(topology_text(chosen.shape))
    assert len(topology.routers) == 14
    assert sum(1 for s in topology.servers.values() if not s.standby) == 1000
    assert sum(1 for s in topology.servers.values() if s.standby) == 100
    assert len(topology.clients) == 300
    kills = [s for s in topology.scenario if s.action == "kill"]
    assert len(kills) == 100 and chosen.settings.addresses == 10**6
    widest = loads(topology_text(PoolShape(servers=100, server_routers=90, client_routers=9)))
    assert len(widest.routers) == 100
    with pytest.raises(ConfigError, match="at most 100"):
        topology_text(PoolShape(servers=10, server_routers=90, client_routers=10))


def test_memoized_decoders_change_no_outcome() -> None:
    """The simulator parses each distinct datagram once, applies each proposal once and
    covers each bucket set once; a pool runs exactly as without it, event for event."""
    from manycast.runtime import PoolRun
    from manycast.sim import memoized_decoders

    shape = PoolShape(
        servers=8,
        standby=1,
        sample_clients=8,
        steps=[
            (0.5, "set_share", {"server": "s2", "share": 0.25}),
            (1.0, "kill", {"server": "s5"}),
            (1.5, "add", {"server": "s9"}),
        ],
        duration=2.5,
    )

    def outcome(memoized: bool) -> tuple[int, list[tuple[str, int, str]], list[int]]:
        run = PoolRun(loads(topology_text(shape)), "memory", 3)
        if memoized:
            with memoized_decoders():
                run.network.run_until(2.5)
        else:
            run.network.run_until(2.5)
        servers = {**run.nodes.servers, **run.nodes.standby}
        views = [(n, s.coordinator.epoch, s.coordinator.digest) for n, s in sorted(servers.items())]
        answered = [c.stats.requests_ok for _, c in sorted(run.nodes.clients.items())]
        assert isinstance(run.network, MemoryNetwork)
        return run.network.events_processed, views, answered

    plain, fast = outcome(False), outcome(True)
    assert plain == fast
    assert plain[1][0][1] >= 4  # the share change, the removal and the addition happened


def test_a_wall_limit_stops_the_run_and_says_so(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["sim", "pool-20", "--out", str(out), "--wall-limit", "0.3", "--no-plots", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["ok"] is False
    assert report["stopped"].startswith("the wall limit (0.3 s) at ")
    assert report["simulated_s"] < 5.0
    assert (out / "summary.txt").read_text().startswith("STOPPED by the wall limit")


def test_the_small_preset_with_the_gossip_membership(tmp_path: Path) -> None:
    args = ["sim", "pool-20", "--membership", "swim", "--out", str(tmp_path), "--no-plots"]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["pool"]["membership"] == "swim"
    assert report["every_address_served_once"] and report["share_error_within_one_bucket"]
    assert [step["settled_s"] is not None for step in report["recovery"]] == [True] * 3
    wrong = CliRunner().invoke(app, ["sim", "pool-20", "--membership", "gossip", *args[4:]])
    assert wrong.exit_code == 2
    assert "membership 'gossip'" in " ".join(wrong.stderr.split())
