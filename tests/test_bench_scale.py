"""bench/scale.py at small pools: it runs, its JSON line carries every field, the figures
are those of the protocol as configured (the gossip membership's probes at the top
level; heartbeats every 100 ms, dead after 3, under `heartbeat`), and its memoized
decoders change no outcome."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(autouse=True)
def _bench_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    plots = tmp_path_factory.mktemp("plots")
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH / "scale.py"),
            "--max-n",
            "16",
            "--skip-etcd",
            # the simulator part on the small preset (pool-1000 takes about 2 minutes)
            "--sim-preset",
            "pool-20",
            "--sim-duration",
            "1.5",
            "--plots",
            str(plots),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip().splitlines()[-1]
    parsed: dict[str, Any] = json.loads(line)
    parsed["_plots_dir"] = str(plots)
    parsed["_stderr"] = done.stderr
    return parsed


def test_the_json_line_carries_every_field(result: dict[str, Any]) -> None:
    assert result["bench"] == "scale"
    assert result["membership"] == "swim"
    assert result["sizes"] == [4, 16]
    assert result["heartbeat"]["membership"] == "heartbeat"
    assert result["heartbeat"]["sizes"] == [4, 16]
    for key in (
        "control_msgs_per_server_ratio_1024_over_16",
        "detection_ratio_1024_over_16",
        "sim_1000_servers_wall_s",
        "exponents",
        "load_average",
    ):
        assert key in result, key
    # No N = 1024 in a quick run: the ratios say so rather than inventing a figure.
    assert result["control_msgs_per_server_ratio_1024_over_16"] is None
    exponents = result["exponents"]
    for key in (
        "idle_msgs_per_server_per_s_vs_n",
        "change_msgs_per_server_per_s_vs_n",
        "detection_all_s_vs_n",
        "converged_set_share_s_vs_n",
        "converged_add_s_vs_n",
        "converged_death_s_vs_n",
        "forwarding_entries_vs_sources",
        "forwarding_mask_pairs_vs_portions",
    ):
        assert isinstance(exponents[key], float), key
    assert "k (~N^k)" in result["_stderr"]  # the table of curves is printed


def test_the_gossip_membership_keeps_each_servers_load_flat(result: dict[str, Any]) -> None:
    for run in result["runs"]:
        idle = run["idle_msgs_per_server_per_s"]
        # One ping and one ACK per 100 ms period each way, whatever N.
        assert 17 <= idle["sent"] <= 22, run
        assert 17 <= idle["received"] <= 22, run
        assert all(v is not None for v in run["converged_s"].values()), run
        # Probed within a few periods, one period to give up, 0.2 s of suspicion.
        assert 0.2 <= run["detection_first_s"] <= run["detection_all_s"] <= 0.9, run
    assert abs(result["exponents"]["idle_received_per_server_per_s_vs_n"]) <= 0.1


def test_the_figures_are_those_of_all_to_all_heartbeats(result: dict[str, Any]) -> None:
    for run in result["heartbeat"]["runs"]:
        n = run["n"]
        idle = run["idle_msgs_per_server_per_s"]
        # One heartbeat every 100 ms from each server, heard by every other.
        assert 8 <= idle["sent"] <= 11, run
        assert 0.9 * 10 * (n - 1) <= idle["received"] <= 1.1 * 10 * (n - 1), run
        # Every change reached every router; the death was seen after about 3 missed
        # heartbeats by every live server (within one interval), and not before.
        assert all(v is not None for v in run["converged_s"].values()), run
        assert 0.2 <= run["detection_first_s"] <= run["detection_all_s"] <= 0.45, run
        assert run["converged_s"]["death"] >= run["detection_first_s"]
        forwarding = run["forwarding"]
        assert forwarding["active_sources"] == 2 * n
        # Forwarding entries follow the portions' cells, not the sources (2 per
        # portion here): at most one per portion at the clients' edge router;
        # membership: the allocation's portions, on every router.
        assert forwarding["entries_per_router"]["ra"] <= forwarding["portions"]
        assert forwarding["entries_per_router"]["ra"] < forwarding["active_sources"]
        assert set(forwarding["mask_pairs_per_router"].values()) == {forwarding["portions"]}
    # Messages each server receives grow linearly with N today.
    assert 0.8 <= result["heartbeat"]["exponents"]["idle_received_per_server_per_s_vs_n"] <= 1.3


def test_the_simulator_part_reports_its_preset(result: dict[str, Any]) -> None:
    sim = result["sim"]
    assert sim["preset"] == "pool-20" and sim["servers"] == 20
    assert sim["simulated_s"] == 1.5 and sim["wall_s"] > 0
    # The command's wall time: the topology compiled, simulated, the report written.
    assert sim["command_wall_s"] >= sim["wall_s"]
    assert sim["every_address_served_once"] is True
    assert sim["control_per_server_per_s"]["idle"] > 0
    # The figure is the 1000-server preset's for 60 simulated seconds, nothing else.
    assert result["sim_1000_servers_wall_s"] is None


def test_plots_are_written(result: dict[str, Any]) -> None:
    directory = Path(result["_plots_dir"])
    names = sorted(p.name for p in directory.iterdir())
    assert names == ["scale.json", "scale_curves.png", "scale_forwarding.png"]
    assert (directory / "scale_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_memoized_decoders_change_no_outcome() -> None:
    import scale

    plain = scale.measure(4, seed=3)
    with scale.memoized_decoders():
        fast = scale.measure(4, seed=3)
    for key in ("idle_msgs_per_server_per_s", "converged_s", "detection_all_s", "forwarding"):
        assert plain[key] == fast[key], key
    assert plain["events"] == fast["events"]


def test_growth_exponents() -> None:
    import scale

    assert scale.exponent([4, 16, 64], [8, 32, 128]) == pytest.approx(1.0)
    assert scale.exponent([4, 16, 64], [16, 256, 4096]) == pytest.approx(2.0)
    assert scale.exponent([4, 16], [None, 3.0]) is None  # one point is no curve


def test_a_size_over_budget_is_projected_not_measured() -> None:
    import scale

    def run(n: int) -> dict[str, Any]:
        return {
            "n": n,
            "events": 10 * n * n,
            "virtual_s": 2.0,
            "wall_s": n * n / 1000,
            "plan": {"warm_up_s": 0.5, "idle_s": 1.0},
            "idle_msgs_per_server_per_s": {"sent": 10.0, "received": 10.0 * n, "total": 10.0 * n},
            "change_msgs_per_server_per_s": 20.0 * n,
            "detection_first_s": 0.27,
            "detection_all_s": 0.27,
            "converged_s": {"set_share": 0.03, "add": 0.31, "death": 0.39},
            "forwarding": {
                "entries": 2 * n,
                "mask_pairs": n,
                "active_sources": 2 * n,
                "portions": n,
            },
        }

    done = [run(4), run(16), run(64)]
    # Events per virtual second grow as N^2 here: 16 times as many at 256, each as dear,
    # over 256's plan (0.5 s warm-up, 0.5 s idle) and the 0.5 s the changes took at 64.
    expected = 16 * done[-1]["wall_s"] * (0.5 + 0.5 + 0.5) / done[-1]["virtual_s"]
    assert scale.projected_wall_s(done, 256) == pytest.approx(expected)
    projected = scale.projected_figures(done, [1024])
    assert projected["1024"]["idle_msgs_per_server_per_s"] == pytest.approx(10240, rel=1e-3)
    assert projected["control_msgs_per_server_ratio_1024_over_16"] == pytest.approx(64, rel=1e-3)
    assert projected["detection_ratio_1024_over_16"] == pytest.approx(1.0)


def test_the_1000_server_figure_is_the_whole_commands_wall_time() -> None:
    import _scale_sim

    part = {"preset": "pool-1000", "simulated_s": 60.0, "stopped": None}
    part |= {"wall_s": 101.5, "command_wall_s": 109.25}
    assert _scale_sim.wall_of_1000_servers(part) == 109.25
    stopped = part | {"stopped": "the wall limit (900 s) at 35.5 simulated seconds of 60"}
    assert _scale_sim.wall_of_1000_servers(stopped) is None
    assert _scale_sim.wall_of_1000_servers(part | {"simulated_s": 20.0}) is None
